//! Serving a router on a TCP listener with the limits every network-facing listener needs
//! (the core's API listeners and the plugins' overlay ports use it): a deadline for a
//! request's headers, a cap on connections in all and per source address, and a graceful stop.
//! `axum::serve` has none of these, so a few hundred idle sockets would starve real clients.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// The two ends of the TCP connection a request came on, in every request's extensions, so
/// a handler can tell which of a host's addresses was dialled (an overlay address answers
/// only through the TUN) and who dialled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The client's address.
    pub remote: SocketAddr,
    /// The listener's address the client dialled (a concrete address even on a wildcard
    /// listener).
    pub local: SocketAddr,
}

/// Connection limits of one listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A connection that has not sent a whole request head by then is closed (also between
    /// keep-alive requests).
    pub header_read_timeout: Duration,
    /// Open connections at most, in all.
    pub max_connections: usize,
    /// Open connections at most from one source address, so one host cannot take them all.
    pub max_per_source: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 512,
            max_per_source: 64,
        }
    }
}

/// Open connections per source address.
#[derive(Default)]
struct Slots {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One admitted connection; frees its slot when dropped.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    source: IpAddr,
}

impl Slot {
    fn take(slots: &Arc<Mutex<Slots>>, source: IpAddr, limits: &Limits) -> Option<Slot> {
        let mut s = slots.lock().ok()?;
        let mine = s.by_source.get(&source).copied().unwrap_or(0);
        if s.total >= limits.max_connections || mine >= limits.max_per_source {
            return None;
        }
        s.total += 1;
        s.by_source.insert(source, mine + 1);
        Some(Slot {
            slots: slots.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.lock() {
            s.total = s.total.saturating_sub(1);
            if let Some(n) = s.by_source.get_mut(&self.source) {
                *n -= 1;
                if *n == 0 {
                    s.by_source.remove(&self.source);
                }
            }
        }
    }
}

/// How long connections get to finish once `shutdown` resolves.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Serves `router` on `listener` until `shutdown` resolves, within `limits`. A connection over
/// a limit is closed at once (counted in `myelin_http_refused_connections_total`).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, source) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                tracing::warn!("accepting on {local}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = Slot::take(&slots, source.ip(), &limits) else {
            metrics::counter!("myelin_http_refused_connections_total", "listener" => local.clone())
                .increment(1);
            drop(stream);
            continue;
        };
        // Without its local address a connection carries no Connection (and so no identity).
        let connection = stream.local_addr().ok().map(|local| Connection {
            remote: source,
            local,
        });
        let service = TowerToHyperService::new(tower::ServiceExt::map_request(
            router.clone(),
            move |mut req: axum::http::Request<hyper::body::Incoming>| {
                if let Some(c) = connection {
                    req.extensions_mut().insert(c);
                }
                req
            },
        ));
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_GRACE, connection).await;
                }
            }
        });
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(STOP_GRACE + Duration::from_millis(500), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_each_source_and_the_total_and_come_back_on_drop() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(1),
            max_connections: 3,
            max_per_source: 2,
        };
        let slots = Arc::new(Mutex::new(Slots::default()));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = Slot::take(&slots, a, &limits).unwrap();
        let _a2 = Slot::take(&slots, a, &limits).unwrap();
        assert!(Slot::take(&slots, a, &limits).is_none(), "per source");
        let _b1 = Slot::take(&slots, b, &limits).unwrap();
        assert!(Slot::take(&slots, b, &limits).is_none(), "in all");
        drop(a1);
        assert!(Slot::take(&slots, b, &limits).is_some());
    }
}
