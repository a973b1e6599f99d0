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
    async_trait, config_error, CancellationToken, Health, Plugin, PluginContext, PluginError,
    Registration,
};
use rtc::shared::marshal::Unmarshal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamConfig {
    name: String,
    /// Where the camera pipeline sends H.264 RTP, e.g. 127.0.0.1:5004.
    rtp: SocketAddr,
    /// The only source addresses RTP is taken from; required when `rtp` is not a loopback
    /// address. Without it only this machine (loopback) may send.
    rtp_sources: Option<Vec<IpAddr>>,
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
            if !valid_stream_name(&s.name) {
                return Err(config_error(format!(
                    "streams: name = {:?} must be 1 to {MAX_NAME} letters, digits, `_` or `-` (it is part of the URL /<name>/whep)",
                    s.name
                )));
            }
            check_rtp_sources(s)?;
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

/// Longest stream name; names travel to every peer's dashboard.
const MAX_NAME: usize = 64;

/// Stream names are path segments of the WHEP URL and are shown in peers' dashboards, so both
/// our config and what peers announce are held to this.
fn valid_stream_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-')
}

/// RTP is unauthenticated: whoever can reach the port can replace the video. Listening beyond
/// loopback therefore needs an explicit list of senders.
fn check_rtp_sources(s: &StreamConfig) -> Result<(), PluginError> {
    let bind = s.rtp.ip().to_canonical();
    match &s.rtp_sources {
        None if !bind.is_loopback() => Err(config_error(format!(
            "streams `{}`: rtp = \"{}\" listens beyond this machine, so anyone who can reach it could inject video; bind 127.0.0.1:{} for a local camera pipeline, or list the camera's addresses in rtp_sources = [\"<camera IP>\"]",
            s.name, s.rtp, s.rtp.port()
        ))),
        Some(list) if list.is_empty() => Err(config_error(format!(
            "streams `{}`: rtp_sources = [] would refuse every packet; list the camera's addresses, or remove the key to accept only this machine (rtp on 127.0.0.1)",
            s.name
        ))),
        Some(list) if bind.is_loopback() => match list.iter().find(|a| !a.to_canonical().is_loopback()) {
            Some(remote) => Err(config_error(format!(
                "streams `{}`: rtp_sources lists {remote}, but rtp = \"{}\" is loopback and only hears this machine; bind the address the camera sends to (e.g. 0.0.0.0:{})",
                s.name, s.rtp, s.rtp.port()
            ))),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Counters of one stream, shared by its viewers.
#[derive(Debug, Default)]
struct StreamCounters {
    packets_in: AtomicU64,
    /// RTP packets from a source not allowed by `rtp_sources` (or not loopback).
    rtp_refused: AtomicU64,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    dropped: AtomicU64,
    keyframe_waits: AtomicU64,
}

/// One viewer session; dropping it (DELETE, end of session, plugin stop) frees its slot.
struct Viewer {
    cancel: CancellationToken,
    _slot: Slot,
}

/// Viewer slots of one stream: taken when an offer arrives, before anything is awaited, so
/// concurrent offers can never exceed `max_viewers`.
struct Slots {
    used: AtomicUsize,
    max: usize,
    gauge: myelin_sdk::metrics::Gauge,
}

/// One taken slot, given back on drop: a failed offer, an abandoned one or an ended session
/// frees it whichever way it ends.
struct Slot {
    slots: Arc<Slots>,
    /// When the offer arrived; the viewer must connect within `session::ICE_CONNECT` of it.
    taken: tokio::time::Instant,
}

impl Slots {
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

struct Stream {
    name: String,
    rtp: SocketAddr,
    /// None: loopback senders only.
    rtp_sources: Option<Vec<IpAddr>>,
    tx: broadcast::Sender<Arc<Ingested>>,
    cache: Mutex<GopCache>,
    viewers: Mutex<HashMap<String, Viewer>>,
    slots: Arc<Slots>,
    counters: StreamCounters,
    metrics: myelin_sdk::PluginMetrics,
}

impl Stream {
    fn new(
        config: &StreamConfig,
        max_viewers: usize,
        metrics: myelin_sdk::PluginMetrics,
    ) -> Arc<Stream> {
        // Only ever moved by increments and decrements: a restarted plugin's new streams share
        // the gauge with sessions of the old ones still ending.
        let gauge = metrics.gauge_with("myelin_webrtc_viewers", &[("stream", &config.name)]);
        let (tx, _) = broadcast::channel(2048);
        Arc::new(Stream {
            name: config.name.clone(),
            rtp: config.rtp,
            rtp_sources: config.rtp_sources.clone(),
            tx,
            cache: Mutex::new(GopCache::new(4096)),
            viewers: Mutex::new(HashMap::new()),
            slots: Arc::new(Slots {
                used: AtomicUsize::new(0),
                max: max_viewers,
                gauge,
            }),
            counters: StreamCounters::default(),
            metrics,
        })
    }

    /// Sessions holding a slot: connected viewers and offers still connecting.
    fn viewer_count(&self) -> usize {
        self.slots.used.load(Ordering::Acquire)
    }

    fn source_allowed(&self, from: IpAddr) -> bool {
        let from = from.to_canonical();
        match &self.rtp_sources {
            None => from.is_loopback(),
            Some(list) => list.iter().any(|a| a.to_canonical() == from),
        }
    }
}

struct Shared {
    streams: HashMap<String, Arc<Stream>>,
    token: Option<String>,
    port: u16,
    /// Peers' streams, for the dashboard panel.
    remote: Mutex<Vec<PeerStreams>>,
    metrics: myelin_sdk::PluginMetrics,
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
    /// Announced streams dropped for an unsafe name.
    refused: usize,
}

struct Webrtc {
    config: WebrtcConfig,
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
    cors(myelin_sdk::error_response(code, message, hint))
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

/// Receives one stream's RTP: numbers each packet, notes keyframes, caches the current GOP and
/// fans it out. Nothing here waits on a viewer.
async fn ingest(stream: Arc<Stream>, socket: tokio::net::UdpSocket, cancel: CancellationToken) {
    let mut buf = vec![0u8; 2048];
    let mut index = 0u64;
    let packets_in = stream.metrics.counter_with(
        "myelin_webrtc_rtp_packets_in_total",
        &[("stream", &stream.name)],
    );
    let refused = stream.metrics.counter_with(
        "myelin_webrtc_rtp_refused_total",
        &[("stream", &stream.name)],
    );
    let mut told = false;
    loop {
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(got) => got,
                Err(_) => continue,
            },
        };
        if !stream.source_allowed(from.ip()) {
            stream.counters.rtp_refused.fetch_add(1, Ordering::Relaxed);
            refused.increment(1);
            if !told {
                told = true;
                eprintln!(
                    "webrtc: stream `{}` refused RTP from {from} (not in rtp_sources; only the first is logged, myelin_webrtc_rtp_refused_total counts them)",
                    stream.name
                );
            }
            continue;
        }
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
    let mut warned = std::collections::HashSet::new();
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
            if let Ok(Ok(announced)) =
                tokio::time::timeout(Duration::from_secs(2), panel::fetch_streams(addr)).await
            {
                let base = match ip {
                    IpAddr::V4(v4) => format!("http://{v4}:{}", shared.port),
                    IpAddr::V6(v6) => format!("http://[{v6}]:{}", shared.port),
                };
                // A peer inventing new names forever must not grow this without end.
                if warned.len() > 1024 {
                    warned.clear();
                }
                for bad in &announced.refused {
                    if warned.insert((p.name.clone(), bad.clone())) {
                        eprintln!(
                            "webrtc: peer `{}` announced a stream named {bad:?}; ignored: names must be 1 to {MAX_NAME} letters, digits, `_` or `-` (check that peer's [plugins.webrtc] or what answers on {addr})",
                            p.name
                        );
                    }
                }
                if !announced.refused.is_empty() {
                    shared
                        .metrics
                        .counter_with(
                            "myelin_webrtc_peer_streams_refused_total",
                            &[("peer", &p.name)],
                        )
                        .increment(announced.refused.len() as u64);
                }
                found.push(PeerStreams {
                    peer: p.name.clone(),
                    base,
                    streams: announced.streams,
                    refused: announced.refused.len(),
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

    async fn start(&mut self, ctx: PluginContext) -> Result<(), PluginError> {
        let token = match &self.config.token_file {
            None => None,
            Some(path) => Some(
                myelin_sdk::secret::read_secret(path)
                    .map_err(|e| PluginError::Failed(format!("[plugins.webrtc].token_file: {e}")))?
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
            let stream = Stream::new(s, self.config.max_viewers, metrics.clone());
            sockets.push((stream.clone(), socket));
            streams.insert(s.name.clone(), stream);
        }
        let shared = Arc::new(Shared {
            streams,
            token,
            port: self.config.listen_port,
            remote: Mutex::new(Vec::new()),
            metrics,
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
            tokio::spawn(myelin_sdk::serve::serve(
                listener,
                app,
                myelin_sdk::serve::Limits::default(),
                async move { cancel.cancelled().await },
            ));
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
                    for (_, viewer) in v.drain() {
                        viewer.cancel.cancel();
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
        let long = format!(
            "[[streams]]\nname = \"{}\"\nrtp = \"127.0.0.1:1\"",
            "a".repeat(65)
        );
        assert!(parse(&long).unwrap_err().contains("64"));
    }

    #[test]
    fn rtp_beyond_loopback_needs_an_allow_list() {
        let err = parse("[[streams]]\nname = \"front\"\nrtp = \"0.0.0.0:5004\"").unwrap_err();
        assert!(
            err.contains("rtp_sources") && err.contains("127.0.0.1:5004"),
            "{err}"
        );
        assert!(parse("[[streams]]\nname = \"front\"\nrtp = \"[::]:5004\"").is_err());
        let c = parse(
            "[[streams]]\nname = \"front\"\nrtp = \"0.0.0.0:5004\"\nrtp_sources = [\"192.168.1.20\"]",
        )
        .unwrap();
        assert_eq!(
            c.streams[0].rtp_sources,
            Some(vec!["192.168.1.20".parse().unwrap()])
        );
        assert!(
            parse("[[streams]]\nname = \"front\"\nrtp = \"0.0.0.0:5004\"\nrtp_sources = []")
                .unwrap_err()
                .contains("refuse every packet")
        );
        assert!(parse(
            "[[streams]]\nname = \"front\"\nrtp = \"127.0.0.1:5004\"\nrtp_sources = [\"10.0.0.5\"]"
        )
        .unwrap_err()
        .contains("loopback"));
        assert!(parse("[[streams]]\nname = \"front\"\nrtp = \"[::1]:5004\"").is_ok());
    }

    fn metrics() -> myelin_sdk::PluginMetrics {
        let (_tx, rx) = tokio::sync::watch::channel(myelin_sdk::MeshView::default());
        PluginContext::new(
            myelin_sdk::NodeIdentity::default(),
            "webrtc_test",
            myelin_sdk::toml::Table::new(),
            rx,
            CancellationToken::new(),
        )
        .metrics()
    }

    fn stream(name: &str, rtp: &str, sources: Option<&[&str]>, max: usize) -> Arc<Stream> {
        let config = StreamConfig {
            name: name.into(),
            rtp: rtp.parse().unwrap(),
            rtp_sources: sources.map(|l| l.iter().map(|a| a.parse().unwrap()).collect()),
        };
        Stream::new(&config, max, metrics())
    }

    fn rtp_packet(seq: u16) -> Vec<u8> {
        let mut p = vec![0x80, 96];
        p.extend_from_slice(&seq.to_be_bytes());
        // An IDR slice, so the GOP cache keeps it.
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 7, 0x65, 0x88, 0x80]);
        p
    }

    async fn ingested_after(s: &Stream, want: u64) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            let c = &s.counters;
            if c.packets_in.load(Ordering::Relaxed) + c.rtp_refused.load(Ordering::Relaxed) >= want
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn rtp_from_other_sources_is_dropped_and_counted() {
        // The allow-list: 127.0.0.2 may send, 127.0.0.1 (any other address) may not.
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = socket.local_addr().unwrap();
        let s = stream("front", &to.to_string(), Some(&["127.0.0.2"]), 1);
        let cancel = CancellationToken::new();
        tokio::spawn(ingest(s.clone(), socket, cancel.clone()));
        let camera = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
        let stranger = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for seq in 0..3 {
            stranger.send_to(&rtp_packet(seq), to).await.unwrap();
        }
        camera.send_to(&rtp_packet(3), to).await.unwrap();
        assert!(ingested_after(&s, 4).await, "the packets never arrived");
        assert_eq!(s.counters.rtp_refused.load(Ordering::Relaxed), 3);
        assert_eq!(s.counters.packets_in.load(Ordering::Relaxed), 1);
        assert_eq!(s.cache.lock().unwrap().snapshot().len(), 1);
        cancel.cancel();

        // Without a list, only loopback: a source that is not loopback is refused.
        let s = stream("back", "127.0.0.1:9", None, 1);
        assert!(s.source_allowed("127.0.0.1".parse().unwrap()));
        assert!(s.source_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!s.source_allowed("10.90.0.2".parse().unwrap()));
        let s = stream("yard", "0.0.0.0:9", Some(&["10.0.0.5"]), 1);
        assert!(s.source_allowed("::ffff:10.0.0.5".parse().unwrap()));
        assert!(!s.source_allowed("127.0.0.1".parse().unwrap()));
    }

    /// A recvonly H.264 offer from a client that never does ICE: its only candidate is a port
    /// nobody answers on.
    const ABANDONED_OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\na=msid-semantic: WMS\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 127.0.0.1\r\na=rtcp:9 IN IP4 0.0.0.0\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\na=fingerprint:sha-256 01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF\r\na=setup:actpass\r\na=mid:0\r\na=recvonly\r\na=rtcp-mux\r\na=rtpmap:102 H264/90000\r\na=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n";

    fn shared_with(stream: Arc<Stream>) -> Arc<Shared> {
        Arc::new(Shared {
            streams: HashMap::from([(stream.name.clone(), stream)]),
            token: None,
            port: 8889,
            remote: Mutex::new(Vec::new()),
            metrics: metrics(),
        })
    }

    async fn offer(shared: &Arc<Shared>) -> StatusCode {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/sdp"),
        );
        whep_post(
            State((shared.clone(), IpAddr::from([127, 0, 0, 1]))),
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
        let shared = shared_with(s.clone());
        let start = tokio::time::Instant::now();
        let mut offers = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let shared = shared.clone();
            offers.spawn(async move { offer(&shared).await });
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
        assert_eq!(offer(&shared).await, StatusCode::SERVICE_UNAVAILABLE);
        loop {
            let code = offer(&shared).await;
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
        let shared = shared_with(s.clone());
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/sdp"),
        );
        let r = whep_post(
            State((shared.clone(), IpAddr::from([127, 0, 0, 1]))),
            Path("front".into()),
            headers,
            Bytes::from_static(b"this is not SDP"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(s.viewer_count(), 0);
    }
}
