//! The WHEP server on each overlay address: the stream list, offers (answered by `session`) and
//! session teardown, with the bearer token, CORS, and the viewer slots that cap each stream.

use crate::session;
use crate::streams::{stream_list, StreamHub};
use myelin_sdk::axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use myelin_sdk::CancellationToken;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// One viewer session; dropping it (DELETE, end of session, plugin stop) frees its slot.
pub struct Viewer {
    pub cancel: CancellationToken,
    pub _slot: Slot,
}

/// Viewer slots of one stream: taken when an offer arrives, before anything is awaited, so
/// concurrent offers can never exceed `max_viewers`.
pub struct Slots {
    used: AtomicUsize,
    max: usize,
    gauge: myelin_sdk::metrics::Gauge,
}

/// One taken slot, given back on drop: a failed offer, an abandoned one or an ended session
/// frees it whichever way it ends.
pub struct Slot {
    slots: Arc<Slots>,
    /// When the offer arrived; the viewer must connect within `session::ICE_CONNECT` of it.
    pub taken: tokio::time::Instant,
}

impl Slots {
    pub fn new(max: usize, gauge: myelin_sdk::metrics::Gauge) -> Slots {
        Slots {
            used: AtomicUsize::new(0),
            max,
            gauge,
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    fn take(self: &Arc<Self>) -> Option<Slot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        self.gauge.increment(1.0);
        Some(Slot {
            slots: self.clone(),
            taken: tokio::time::Instant::now(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.used.fetch_sub(1, Ordering::AcqRel);
        self.slots.gauge.decrement(1.0);
    }
}

fn cors(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type, Authorization"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location"),
    );
    r
}

fn error(code: StatusCode, message: String, hint: &str) -> Response {
    cors(myelin_sdk::error_response(code, message, hint))
}

/// The WHEP server on one overlay address.
pub fn whep_router(hub: Arc<StreamHub>, local: IpAddr) -> Router {
    Router::new()
        .route(
            "/streams",
            get(
                |State((s, _)): State<(Arc<StreamHub>, IpAddr)>| async move {
                    cors(Json(stream_list(&s)).into_response())
                },
            ),
        )
        .route("/{stream}/whep", post(whep_post).options(preflight))
        .route(
            "/{stream}/whep/{id}",
            delete(whep_delete).options(preflight),
        )
        .fallback(|method: Method| async move {
            if method == Method::OPTIONS {
                return cors(StatusCode::NO_CONTENT.into_response());
            }
            error(
                StatusCode::NOT_FOUND,
                "no such WHEP resource".into(),
                "POST an SDP offer to /<stream>/whep; GET /streams lists the streams",
            )
        })
        .with_state((hub, local))
}

async fn preflight() -> Response {
    cors(StatusCode::NO_CONTENT.into_response())
}

fn authorized(hub: &StreamHub, headers: &HeaderMap) -> bool {
    let Some(token) = &hub.token else {
        return true;
    };
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| {
            myelin_sdk::constant_time_eq(given.trim().as_bytes(), token.as_bytes())
        })
}

async fn whep_post(
    State((hub, local)): State<(Arc<StreamHub>, IpAddr)>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&hub, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
            "send Authorization: Bearer <the token in [plugins.webrtc].token_file>",
        );
    }
    let Some(stream) = hub.streams.get(&name).cloned() else {
        let names: Vec<String> = stream_list(&hub).into_iter().map(|s| s.name).collect();
        return error(
            StatusCode::NOT_FOUND,
            format!("no stream `{name}` (streams: {})", names.join(", ")),
            "GET /streams lists them",
        );
    };
    let sdp_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/sdp"));
    if !sdp_type {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a WHEP offer must be sent as Content-Type: application/sdp".into(),
            "POST the SDP offer text with Content-Type: application/sdp",
        );
    }
    let Some(slot) = stream.slots.take() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stream `{name}` already has {} viewers", stream.slots.max),
            "try again later, or raise [plugins.webrtc].max_viewers",
        );
    };
    let Ok(offer) = String::from_utf8(body.to_vec()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the offer is not UTF-8 text".into(),
            "send an SDP offer",
        );
    };
    match session::start(stream.clone(), slot, local, offer).await {
        Ok((id, answer)) => {
            let location = format!("/{name}/whep/{id}");
            let mut r = (StatusCode::CREATED, answer).into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/sdp"),
            );
            if let Ok(v) = HeaderValue::from_str(&location) {
                h.insert(header::LOCATION, v);
            }
            cors(r)
        }
        Err(session::SessionError::BadOffer(why)) => error(
            StatusCode::BAD_REQUEST,
            format!("bad SDP offer: {why}"),
            "offer recvonly video with H.264 (packetization-mode=1)",
        ),
        Err(session::SessionError::Internal(why)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not set up the session: {why}"),
            "see the node's log",
        ),
    }
}

async fn whep_delete(
    State((hub, _)): State<(Arc<StreamHub>, IpAddr)>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&hub, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
            "send the same Authorization header as for the offer",
        );
    }
    let token = hub
        .streams
        .get(&name)
        .and_then(|s| s.viewers.lock().ok().and_then(|mut v| v.remove(&id)));
    match token {
        Some(viewer) => {
            viewer.cancel.cancel();
            cors(StatusCode::OK.into_response())
        }
        None => error(
            StatusCode::NOT_FOUND,
            format!("no session `{id}` on stream `{name}`"),
            "it may have ended already",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::streams::tests::{metrics, stream};
    use crate::streams::Stream;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A recvonly H.264 offer from a client that never does ICE: its only candidate is a port
    /// nobody answers on.
    const ABANDONED_OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\na=msid-semantic: WMS\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 127.0.0.1\r\na=rtcp:9 IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF\r\na=setup:actpass\r\na=mid:0\r\na=recvonly\r\na=rtcp-mux\r\na=rtpmap:102 H264/90000\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n";

    fn hub_with(stream: Arc<Stream>) -> Arc<StreamHub> {
        Arc::new(StreamHub {
            streams: HashMap::from([(stream.name.clone(), stream)]),
            token: None,
            port: 8889,
            remote: Mutex::new(Vec::new()),
            metrics: metrics(),
        })
    }

    async fn offer(hub: &Arc<StreamHub>) -> StatusCode {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/sdp"),
        );
        whep_post(
            State((hub.clone(), IpAddr::from([127, 0, 0, 1]))),
            Path("front".into()),
            headers,
            Bytes::from_static(ABANDONED_OFFER.as_bytes()),
        )
        .await
        .status()
    }

    #[tokio::test]
    async fn concurrent_offers_never_exceed_max_viewers_and_abandoned_ones_free_their_slot() {
        let max = 3;
        let s = stream("front", "127.0.0.1:9", None, max);
        let hub = hub_with(s.clone());
        let start = tokio::time::Instant::now();
        let mut offers = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let hub = hub.clone();
            offers.spawn(async move { offer(&hub).await });
        }
        let mut codes = Vec::new();
        while let Some(code) = offers.join_next().await {
            codes.push(code.unwrap());
        }
        let created = codes.iter().filter(|c| **c == StatusCode::CREATED).count();
        let refused = codes
            .iter()
            .filter(|c| **c == StatusCode::SERVICE_UNAVAILABLE)
            .count();
        assert_eq!((created, refused), (max, 50 - max), "{codes:?}");
        assert_eq!(s.viewer_count(), max);

        // The offers' clients never do ICE: their slots come free ICE_CONNECT after they
        // arrived, and a new viewer gets one.
        assert_eq!(offer(&hub).await, StatusCode::SERVICE_UNAVAILABLE);
        loop {
            let code = offer(&hub).await;
            if code == StatusCode::CREATED {
                break;
            }
            assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
            assert!(
                start.elapsed() < session::ICE_CONNECT + Duration::from_millis(500),
                "no slot came free within {:?} of the abandoned offers",
                start.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let waited = start.elapsed();
        assert!(
            waited >= session::ICE_CONNECT - Duration::from_millis(100),
            "slots came free after {waited:?}, before the connect deadline"
        );
        // A failed offer gives its slot back at once.
        let s = stream("front", "127.0.0.1:9", None, 1);
        let hub = hub_with(s.clone());
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/sdp"),
        );
        let r = whep_post(
            State((hub.clone(), IpAddr::from([127, 0, 0, 1]))),
            Path("front".into()),
            headers,
            Bytes::from_static(b"this is not SDP"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(s.viewer_count(), 0);
    }
}
