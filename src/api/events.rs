//! `GET /api/v1/events`: Server-Sent Events for the dashboard and scripts: `peer_up` and
//! `peer_down` on session changes, `rtt` on every new probe figure, `plugin` on any change of
//! a plugin's state, restarts or enabled flag. The first events describe the present.

use super::ApiState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Event streams open at once, over both listeners: each holds a task and a connection for
/// as long as the client stays, so there must be a bound.
pub const MAX_STREAMS: usize = 32;

/// One open stream; gives its place back when the stream ends.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub async fn stream(State(s): State<Arc<ApiState>>) -> Response {
    open(s, produce).await
}

/// Opens an event stream fed by `producer` (which returns when the client goes away), within
/// the cap on open streams.
pub(super) async fn open<F, Fut>(s: Arc<ApiState>, producer: F) -> Response
where
    F: FnOnce(Arc<ApiState>, mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let open = s.event_streams.clone();
    if open.fetch_add(1, Ordering::Relaxed) >= MAX_STREAMS {
        open.fetch_sub(1, Ordering::Relaxed);
        return super::ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} event streams are open already"),
            "close a dashboard tab or an idle `curl .../events`, then retry",
        )
        .into_response();
    }
    let guard = Open(open);
    let (tx, mut rx) = mpsc::channel::<Event>(256);
    tokio::spawn(producer(s, tx));
    Sse::new(futures::stream::poll_fn(move |cx| {
        let _held = &guard;
        rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>))
    }))
    .keep_alive(KeepAlive::default())
    .into_response()
}

pub(super) fn event(kind: &str, data: serde_json::Value) -> Event {
    Event::default().event(kind).data(data.to_string())
}

/// Sends events until the client goes away (the channel closes).
async fn produce(s: Arc<ApiState>, tx: mpsc::Sender<Event>) {
    let mut mesh = s.mesh.clone();
    let mut changes = s.host.changes();
    let mut peers_up: HashMap<String, bool> = HashMap::new();
    let mut rtts: HashMap<String, Option<f64>> = HashMap::new();
    let mut plugins: HashMap<String, (String, u64, bool)> = HashMap::new();
    loop {
        let view = mesh.borrow_and_update().clone();
        for p in &view.peers {
            if peers_up.insert(p.name.clone(), p.up) != Some(p.up) {
                let kind = if p.up { "peer_up" } else { "peer_down" };
                if tx
                    .send(event(kind, json!({"peer": p.name, "endpoint": p.endpoint})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if rtts.insert(p.name.clone(), p.rtt_ms) != Some(p.rtt_ms) && p.rtt_ms.is_some() {
                let data = json!({"peer": p.name, "rtt_ms": p.rtt_ms, "jitter_ms": p.jitter_ms, "loss": p.loss});
                if tx.send(event("rtt", data)).await.is_err() {
                    return;
                }
            }
        }
        changes.borrow_and_update();
        for status in s.host.statuses() {
            let key = (
                status.state.as_str().to_string(),
                status.restarts,
                status.enabled,
            );
            if plugins.insert(status.name.clone(), key.clone()) != Some(key) {
                let data = serde_json::to_value(&status).unwrap_or_default();
                if tx.send(event("plugin", data)).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            changed = mesh.changed() => if changed.is_err() { return },
            changed = changes.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}
