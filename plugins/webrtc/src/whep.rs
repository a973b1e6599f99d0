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

/// Which web pages may play this node's video from a browser: a page's fetch carries its
/// `Origin`, and WHEP answers it (and names it in `Access-Control-Allow-Origin`) only for the
/// dashboards of this fleet. Clients that are not pages (aiortc, ffmpeg, curl) send no
/// `Origin` and are not affected.
pub struct Origins {
    /// `[plugins.webrtc].allow_origins`, lowercased.
    pub extra: Vec<String>,
    /// This node's overlay addresses (its own dashboard on its remote listener).
    pub own: Vec<IpAddr>,
    /// The fleet: a dashboard on a member's overlay address is the fleet's.
    pub mesh: Option<myelin_sdk::tokio::sync::watch::Receiver<myelin_sdk::MeshView>>,
}

impl Origins {
    /// A dashboard on loopback (the operator's own machine), on this node's or a member's
    /// overlay address (any port), or one the config names.
    pub fn allows(&self, origin: &str) -> bool {
        let origin = origin.trim().to_ascii_lowercase();
        if self.extra.contains(&origin) {
            return true;
        }
        let Some(authority) = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
        else {
            return false;
        };
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        if host == "localhost" {
            return true;
        }
        let Ok(ip) = host.parse::<IpAddr>() else {
            return false;
        };
        if ip.is_loopback() || self.own.contains(&ip) {
            return true;
        }
        self.mesh.as_ref().is_some_and(|mesh| {
            mesh.borrow().peers.iter().any(|p| {
                p.overlay_ips
                    .iter()
                    .any(|n| n.prefix_len() == n.max_prefix_len() && n.addr() == ip)
            })
        })
    }
}

/// Refuses a page of any other origin (no CORS header, so its script cannot read the answer
/// either), and names an allowed page's origin instead of `*`.
async fn check_origin(
    State(hub): State<Arc<StreamHub>>,
    req: myelin_sdk::axum::extract::Request,
    next: myelin_sdk::axum::middleware::Next,
) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_string());
    let Some(origin) = origin else {
        return next.run(req).await;
    };
    if !hub.origins.allows(&origin) {
        return myelin_sdk::error_response(
            StatusCode::FORBIDDEN,
            format!("a page from {origin} may not play this node's video"),
            "open the video from a fleet member's dashboard, or add the page's origin to [plugins.webrtc].allow_origins",
        );
    }
    let mut r = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&origin) {
        r.headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        r.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    r
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
        .layer(myelin_sdk::axum::middleware::from_fn_with_state(
            hub.clone(),
            check_origin,
        ))
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
            own: None,
            origins: Origins {
                extra: vec!["http://10.210.0.1:7800".into()],
                own: vec![IpAddr::from([10, 77, 0, 2])],
                mesh: None,
            },
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

    /// A browser on the operator's dashboard (another origin) posts its offer with
    /// `Content-Type: application/sdp`, so it asks first: the preflight must allow that
    /// origin (and no other), POST and the header, and expose `Location` for the DELETE that
    /// ends a session.
    #[tokio::test]
    async fn a_dashboard_on_another_origin_passes_the_preflight() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let hub = hub_with(stream("front", "127.0.0.1:9", None, 2));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(myelin_sdk::serve::serve(
            listener,
            whep_router(hub, IpAddr::from([127, 0, 0, 1])),
            myelin_sdk::serve::Limits::default(),
            std::future::pending(),
        ));
        let ask = |request: String| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).await.unwrap();
            answer.to_ascii_lowercase()
        };
        let preflight = ask(format!(
            "OPTIONS /front/whep HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://10.210.0.1:7800\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(preflight.starts_with("http/1.1 204"), "{preflight}");
        assert!(
            preflight.contains("access-control-allow-origin: http://10.210.0.1:7800"),
            "{preflight}"
        );
        assert!(
            preflight.contains("access-control-allow-methods: get, post, delete, options"),
            "{preflight}"
        );
        assert!(
            preflight.contains("access-control-allow-headers: content-type, authorization"),
            "{preflight}"
        );
        // The session's DELETE is preflighted too, and an error answer carries CORS headers
        // (so the page can read why).
        let delete = ask(format!(
            "OPTIONS /front/whep/abc HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://10.210.0.1:7800\r\nAccess-Control-Request-Method: DELETE\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(delete.starts_with("http/1.1 204"), "{delete}");
        let refused = ask(format!(
            "POST /front/whep HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://10.210.0.1:7800\r\nContent-Type: application/sdp\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbad"
        ))
        .await;
        assert!(refused.starts_with("http/1.1 400"), "{refused}");
        assert!(
            refused.contains("access-control-allow-origin: http://10.210.0.1:7800"),
            "{refused}"
        );
        assert!(
            refused.contains("access-control-expose-headers: location"),
            "{refused}"
        );
        let preflight_from = |origin: &str| {
            ask(format!(
                "OPTIONS /front/whep HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
            ))
        };
        // Any other web page: refused, and told nothing it could read. Sandboxed frames
        // (origin `null`) too: any site can make one.
        for other in [
            "http://evil.example",
            "null",
            "http://10.77.0.9:7800",
            "http://10.210.0.1:7801",
        ] {
            let answer = preflight_from(other).await;
            assert!(answer.starts_with("http/1.1 403"), "{other}: {answer}");
            assert!(
                !answer.contains("access-control-allow-origin"),
                "{other}: {answer}"
            );
        }
        // Pages this node's fleet serves: loopback and its own overlay address, any port.
        for ok in [
            "http://127.0.0.1:7800",
            "http://localhost:7800",
            "http://[::1]:9",
            "http://10.77.0.2:7800",
        ] {
            let answer = preflight_from(ok).await;
            assert!(
                answer.contains(&format!("access-control-allow-origin: {ok}")),
                "{ok}: {answer}"
            );
        }
        // Clients that are not pages send no Origin and keep working.
        let plain = ask(format!(
            "GET /streams HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(plain.starts_with("http/1.1 200"), "{plain}");
    }
}
