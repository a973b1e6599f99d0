//! Streaming mode: H.264 RTP that the robot's camera pipeline sends to a local UDP port is served
//! over WHEP (WebRTC-HTTP Egress Protocol) on the node's overlay addresses, so a browser on any
//! VPN peer plays it with plain `RTCPeerConnection`. ICE uses one host candidate on the overlay
//! address: the mesh already gives reachability, so there is no STUN, TURN or mDNS.

mod h264;
mod panel;
mod session;

use h264::{GopCache, Ingested};
use myelin_sdk::axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{Html, IntoResponse, Response},
    routing::{delete, get, post},
    Json, Router,
};
use myelin_sdk::{
    async_trait, CancellationToken, Health, Plugin, PluginContext, PluginError, Registration,
};
use rtc::shared::marshal::Unmarshal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamConfig {
    name: String,
    /// Where the camera pipeline sends H.264 RTP, e.g. 127.0.0.1:5004.
    rtp: SocketAddr,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebrtcConfig {
    /// WHEP port on the overlay addresses (MediaMTX's).
    #[serde(default = "default_port")]
    listen_port: u16,
    /// A file holding a bearer token viewers must send; none means open to the VPN.
    token_file: Option<std::path::PathBuf>,
    /// Viewers per stream.
    #[serde(default = "default_max_viewers")]
    max_viewers: usize,
    #[serde(default)]
    streams: Vec<StreamConfig>,
}

fn default_port() -> u16 {
    8889
}
fn default_max_viewers() -> usize {
    8
}

fn config_error(message: impl Into<String>) -> PluginError {
    PluginError::Config {
        message: message.into(),
    }
}

impl WebrtcConfig {
    fn parse(section: &myelin_sdk::toml::Table) -> Result<Self, PluginError> {
        let c: WebrtcConfig = myelin_sdk::parse_section(section)?;
        if c.listen_port == 0 {
            return Err(config_error(
                "listen_port = 0: viewers need a fixed port; use 8889",
            ));
        }
        if c.max_viewers == 0 {
            return Err(config_error(
                "max_viewers = 0 would refuse every viewer; use at least 1 (default 8)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &c.streams {
            if s.name.is_empty()
                || !s
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
            {
                return Err(config_error(format!(
                    "streams: name = \"{}\" must be letters, digits, `_` or `-` (it is part of the URL /<name>/whep)",
                    s.name
                )));
            }
            if !seen.insert(s.name.clone()) {
                return Err(config_error(format!(
                    "streams: `{}` appears twice; names must be unique",
                    s.name
                )));
            }
        }
        Ok(c)
    }
}

/// Counters of one stream, shared by its viewers.
#[derive(Debug, Default)]
struct StreamCounters {
    packets_in: AtomicU64,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    dropped: AtomicU64,
    keyframe_waits: AtomicU64,
}

struct Stream {
    name: String,
    rtp: SocketAddr,
    tx: broadcast::Sender<Arc<Ingested>>,
    cache: Mutex<GopCache>,
    viewers: Mutex<HashMap<String, CancellationToken>>,
    counters: StreamCounters,
    metrics: myelin_sdk::PluginMetrics,
}

impl Stream {
    fn viewer_count(&self) -> usize {
        self.viewers.lock().map(|v| v.len()).unwrap_or(0)
    }

    fn publish_viewers(&self) {
        self.metrics
            .gauge_with("myelin_webrtc_viewers", &[("stream", &self.name)])
            .set(self.viewer_count() as f64);
    }
}

struct Shared {
    streams: HashMap<String, Arc<Stream>>,
    token: Option<String>,
    max_viewers: usize,
    port: u16,
    /// Peers' streams, for the dashboard panel.
    remote: Mutex<Vec<PeerStreams>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StreamInfo {
    name: String,
    whep: String,
    viewers: usize,
}

#[derive(Clone, Debug, Serialize)]
struct PeerStreams {
    peer: String,
    base: String,
    streams: Vec<StreamInfo>,
}

struct Webrtc {
    config: WebrtcConfig,
    ctx: Option<PluginContext>,
    shared: Option<Arc<Shared>>,
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
    cors(
        (
            code,
            Json(serde_json::json!({ "error": message, "hint": hint })),
        )
            .into_response(),
    )
}

fn stream_list(shared: &Shared) -> Vec<StreamInfo> {
    let mut list: Vec<StreamInfo> = shared
        .streams
        .values()
        .map(|s| StreamInfo {
            name: s.name.clone(),
            whep: format!("/{}/whep", s.name),
            viewers: s.viewer_count(),
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list
}

/// The WHEP server on one overlay address.
fn whep_router(shared: Arc<Shared>, local: IpAddr) -> Router {
    Router::new()
        .route(
            "/streams",
            get(|State((s, _)): State<(Arc<Shared>, IpAddr)>| async move {
                cors(Json(stream_list(&s)).into_response())
            }),
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
        .with_state((shared, local))
}

async fn preflight() -> Response {
    cors(StatusCode::NO_CONTENT.into_response())
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(token) = &shared.token else {
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
    State((shared, local)): State<(Arc<Shared>, IpAddr)>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
            "send Authorization: Bearer <the token in [plugins.webrtc].token_file>",
        );
    }
    let Some(stream) = shared.streams.get(&name).cloned() else {
        let names: Vec<String> = stream_list(&shared).into_iter().map(|s| s.name).collect();
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
    if stream.viewer_count() >= shared.max_viewers {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stream `{name}` already has {} viewers", shared.max_viewers),
            "try again later, or raise [plugins.webrtc].max_viewers",
        );
    }
    let Ok(offer) = String::from_utf8(body.to_vec()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the offer is not UTF-8 text".into(),
            "send an SDP offer",
        );
    };
    match session::start(stream.clone(), local, offer).await {
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
    State((shared, _)): State<(Arc<Shared>, IpAddr)>,
    Path((name, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&shared, &headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
            "send the same Authorization header as for the offer",
        );
    }
    let token = shared
        .streams
        .get(&name)
        .and_then(|s| s.viewers.lock().ok().and_then(|mut v| v.remove(&id)));
    match token {
        Some(t) => {
            t.cancel();
            if let Some(s) = shared.streams.get(&name) {
                s.publish_viewers();
            }
            cors(StatusCode::OK.into_response())
        }
        None => error(
            StatusCode::NOT_FOUND,
            format!("no session `{id}` on stream `{name}`"),
            "it may have ended already",
        ),
    }
}

/// Receives one stream's RTP: numbers each packet, notes keyframes, caches the current GOP and
/// fans it out. Nothing here waits on a viewer.
async fn ingest(stream: Arc<Stream>, socket: tokio::net::UdpSocket, cancel: CancellationToken) {
    let mut buf = vec![0u8; 2048];
    let mut index = 0u64;
    let packets_in = stream.metrics.counter_with(
        "myelin_webrtc_rtp_packets_in_total",
        &[("stream", &stream.name)],
    );
    loop {
        let n = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, _)) => n,
                Err(_) => continue,
            },
        };
        let mut raw = Bytes::copy_from_slice(&buf[..n]);
        let Ok(packet) = rtc::rtp::Packet::unmarshal(&mut raw) else {
            continue;
        };
        let p = Arc::new(Ingested::new(index, packet, n));
        index += 1;
        stream.counters.packets_in.fetch_add(1, Ordering::Relaxed);
        packets_in.increment(1);
        if let Ok(mut c) = stream.cache.lock() {
            c.push(p.clone());
        }
        // No receivers is fine: nobody is watching.
        let _ = stream.tx.send(p);
    }
}

/// Asks every peer that is up for its streams, for the panel.
async fn discover(ctx: PluginContext, shared: Arc<Shared>) {
    let cancel = ctx.cancellation();
    let mesh = ctx.mesh();
    loop {
        let peers = mesh.borrow().peers.clone();
        let mut found = Vec::new();
        for p in peers.iter().filter(|p| p.up) {
            let Some(ip) = p
                .overlay_ips
                .iter()
                .find(|n| n.prefix_len() == n.max_prefix_len())
                .map(|n| n.addr())
            else {
                continue;
            };
            let addr = SocketAddr::new(ip, shared.port);
            if let Ok(Ok(streams)) =
                tokio::time::timeout(Duration::from_secs(2), panel::fetch_streams(addr)).await
            {
                let base = match ip {
                    IpAddr::V4(v4) => format!("http://{v4}:{}", shared.port),
                    IpAddr::V6(v6) => format!("http://[{v6}]:{}", shared.port),
                };
                found.push(PeerStreams {
                    peer: p.name.clone(),
                    base,
                    streams,
                });
            }
        }
        if let Ok(mut r) = shared.remote.lock() {
            *r = found;
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3)) => {}
        }
    }
}

#[async_trait]
impl Plugin for Webrtc {
    fn name(&self) -> &str {
        "webrtc"
    }

    async fn on_tunnel_up(&mut self, ctx: PluginContext) -> Result<(), PluginError> {
        self.ctx = Some(ctx);
        Ok(())
    }

    async fn start(&mut self) -> Result<(), PluginError> {
        let ctx = self
            .ctx
            .clone()
            .ok_or(PluginError::NotReady("start called before on_tunnel_up"))?;
        let token = match &self.config.token_file {
            None => None,
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| PluginError::Io {
                        context: format!("reading [plugins.webrtc].token_file {}", path.display()),
                        cause: e,
                    })?
                    .trim()
                    .to_string(),
            ),
        };
        let metrics = ctx.metrics();
        let mut streams = HashMap::new();
        let mut sockets = Vec::new();
        for s in &self.config.streams {
            let socket = tokio::net::UdpSocket::bind(s.rtp)
                .await
                .map_err(|e| PluginError::Io {
                    context: format!(
                        "binding stream `{}` RTP port {} (is another program on it?)",
                        s.name, s.rtp
                    ),
                    cause: e,
                })?;
            let (tx, _) = broadcast::channel(2048);
            let stream = Arc::new(Stream {
                name: s.name.clone(),
                rtp: s.rtp,
                tx,
                cache: Mutex::new(GopCache::new(4096)),
                viewers: Mutex::new(HashMap::new()),
                counters: StreamCounters::default(),
                metrics: metrics.clone(),
            });
            stream.publish_viewers();
            sockets.push((stream.clone(), socket));
            streams.insert(s.name.clone(), stream);
        }
        let shared = Arc::new(Shared {
            streams,
            token,
            max_viewers: self.config.max_viewers,
            port: self.config.listen_port,
            remote: Mutex::new(Vec::new()),
        });
        let cancel = ctx.cancellation();
        for (stream, socket) in sockets {
            tokio::spawn(ingest(stream, socket, cancel.clone()));
        }
        // WHEP only on the overlay: the underlay never serves video.
        for net in &ctx.node().overlay_addresses {
            let addr = SocketAddr::new(net.addr(), self.config.listen_port);
            let listener =
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| PluginError::Io {
                        context: format!(
                            "WHEP on {addr} (set [plugins.webrtc].listen_port to a free port)"
                        ),
                        cause: e,
                    })?;
            let app = whep_router(shared.clone(), net.addr());
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let _ = myelin_sdk::axum::serve(listener, app)
                    .with_graceful_shutdown(async move { cancel.cancelled().await })
                    .await;
            });
            eprintln!("WHEP on http://{addr}/<stream>/whep");
        }
        tokio::spawn(discover(ctx.clone(), shared.clone()));
        self.shared = Some(shared);
        Ok(())
    }

    async fn stop(&mut self) -> Result<(), PluginError> {
        if let Some(shared) = &self.shared {
            for s in shared.streams.values() {
                if let Ok(mut v) = s.viewers.lock() {
                    for (_, t) in v.drain() {
                        t.cancel();
                    }
                }
            }
        }
        Ok(())
    }

    async fn health(&self) -> Health {
        Health::Healthy
    }

    fn routes(&self) -> Option<Router> {
        let shared = self.shared.clone();
        Some(
            Router::new()
                .route(
                    "/status",
                    get(move || {
                        let body = shared
                            .as_ref()
                            .map(|s| panel::status(s))
                            .unwrap_or_default();
                        async move { Json(body) }
                    }),
                )
                .route("/panel", get(|| async { Html(panel::HTML) })),
        )
    }
}

fn build(section: &myelin_sdk::toml::Table) -> Result<Box<dyn Plugin>, PluginError> {
    let config = WebrtcConfig::parse(section)?;
    Ok(Box::new(Webrtc {
        config,
        ctx: None,
        shared: None,
    }))
}

myelin_sdk::inventory::submit! {
    Registration {
        name: "webrtc",
        about: "streaming mode: robot camera H.264 RTP served over WHEP to browsers on the VPN",
        build,
        process_only: false,
        mesh_every_probe: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WebrtcConfig, String> {
        WebrtcConfig::parse(&myelin_sdk::toml::from_str(text).unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn config_is_checked() {
        let c = parse("[[streams]]\nname = \"front\"\nrtp = \"127.0.0.1:5004\"").unwrap();
        assert_eq!(
            (c.listen_port, c.max_viewers, c.streams.len()),
            (8889, 8, 1)
        );
        assert!(
            parse("[[streams]]\nname = \"front cam\"\nrtp = \"127.0.0.1:5004\"")
                .unwrap_err()
                .contains("name")
        );
        assert!(parse("[[streams]]\nname = \"a\"\nrtp = \"127.0.0.1:1\"\n[[streams]]\nname = \"a\"\nrtp = \"127.0.0.1:2\"").unwrap_err().contains("twice"));
        assert!(parse("[[streams]]\nname = \"a\"\nrtp = \"localhost\"").is_err());
        assert!(parse("max_viewers = 0")
            .unwrap_err()
            .contains("max_viewers"));
        assert!(parse("listen_prot = 1")
            .unwrap_err()
            .contains("listen_prot"));
    }
}
