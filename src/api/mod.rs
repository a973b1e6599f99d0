//! The local HTTP control API: node status, peers, plugins and their toggles, Prometheus
//! metrics, and a proxy of `/plugins/<name>/...` to each plugin's own socket.

pub mod client;
mod events;
pub mod fleet;

use crate::host::{Action, HostError, PluginHost};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use myelin_sdk::{Caller, MeshView, NodeIdentity, Via, CALLER_HEADER};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

pub struct ApiState {
    pub host: Arc<PluginHost>,
    pub node: NodeIdentity,
    pub mesh: watch::Receiver<MeshView>,
    pub started: Instant,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub tunnel: TunnelInfo,
    /// Adds and removes peers of the running tunnel.
    pub peers: crate::tunnel::PeerControl,
    /// Mesh members as this node knows them (empty without [mesh]).
    pub members: watch::Receiver<Vec<crate::mesh::control::MemberView>>,
    /// The mesh's view of this node's own reachability (None without `[mesh]`).
    pub connectivity: watch::Receiver<Option<crate::mesh::control::Connectivity>>,
    /// Open `/api/v1/events` streams (capped at `events::MAX_STREAMS`).
    pub event_streams: Arc<std::sync::atomic::AtomicUsize>,
    /// The config file, read again by `POST /api/v1/firewall/reload`.
    pub config_path: std::path::PathBuf,
    /// The fleet view: members' API port and the timeline.
    pub fleet: fleet::Fleet,
}

/// What `status` shows about the data plane.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TunnelInfo {
    pub interface: String,
    pub listen_port: u16,
    pub mtu: u16,
    /// TUN virtio-net offload (TSO/GRO) is active.
    pub offload: bool,
}

/// A JSON error `{error, hint}` with a status code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    hint: String,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            hint: hint.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"error": self.error, "hint": self.hint})),
        )
            .into_response()
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        match e {
            HostError::UnknownPlugin(name) => ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no plugin instance `{name}`"),
                "GET /api/v1/plugins lists the configured instances",
            ),
            HostError::Disabled(name) => ApiError::new(
                StatusCode::CONFLICT,
                format!("plugin `{name}` is disabled, so there is nothing to restart"),
                format!("enable it: POST /api/v1/plugins/{name}/enable"),
            ),
            HostError::ShuttingDown(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                e.to_string(),
                "the node is stopping",
            ),
            other => {
                let text = other.to_string();
                let (error, hint) = text.split_once("\n  fix: ").unwrap_or((&text, ""));
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error, hint)
            }
        }
    }
}

/// Who may use the remote listeners: holders of the bearer token, and mesh members in
/// `allow_groups` whose requests came through the tunnel.
pub struct RemoteAuth {
    pub token: Option<Arc<str>>,
    pub allow_groups: Vec<String>,
    /// This node's overlay addresses: only a connection dialled to one of them came through
    /// the TUN (the overlay guard drops them from anywhere else).
    pub overlay: Vec<std::net::IpAddr>,
    /// Names a browser may use for this node in `Host` besides the dialled address (its
    /// `<name>.<domain>` under `[dns]`).
    pub names: Vec<String>,
}

impl RemoteAuth {
    /// For the log line of each listener.
    pub fn describe(&self) -> String {
        match (&self.token, self.allow_groups.is_empty()) {
            (Some(_), true) => "bearer token required".into(),
            (None, false) => format!(
                "members of {} through the tunnel",
                self.allow_groups.join(", ")
            ),
            _ => format!(
                "bearer token, or members of {} through the tunnel",
                self.allow_groups.join(", ")
            ),
        }
    }

    /// The caller of `req`, or why it is refused. A bearer token, when sent, decides alone;
    /// otherwise the identity of the mesh member the connection came from through the tunnel.
    fn authorise(
        &self,
        req: &Request,
        peers: &crate::tunnel::PeerControl,
    ) -> Result<Caller, ApiError> {
        let connection = req
            .extensions()
            .get::<myelin_sdk::serve::Connection>()
            .copied();
        // A browser on a member's machine carries that member's identity to any address it is
        // pointed at: only requests that name this listener, and state changes from its own
        // pages, are taken (no cross-site request, no DNS rebinding).
        if let Some(refusal) = connection.and_then(|c| request_refusal(req, c.local, &self.names)) {
            return Err(refusal);
        }
        let remote = connection.map(|c| c.remote.ip().to_canonical());
        let bearer = req
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(given) = bearer {
            return match &self.token {
                Some(token)
                    if crate::keys::constant_time_eq(given.as_bytes(), token.as_bytes()) =>
                {
                    Ok(Caller {
                        via: Via::Token,
                        name: None,
                        address: remote,
                        groups: Vec::new(),
                    })
                }
                _ => Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "wrong bearer token",
                    "send `Authorization: Bearer <token>` with the token from [control].token_file",
                )),
            };
        }
        let member = connection
            .filter(|c| self.overlay.contains(&c.local.ip().to_canonical()))
            .and_then(|c| {
                let table = peers.table();
                let peer = table
                    .route(c.remote.ip().to_canonical())
                    .and_then(|slot| table.get(slot))?;
                Some(Caller {
                    via: Via::Mesh,
                    name: Some(peer.name.clone()),
                    address: remote,
                    groups: peer.spec.groups.clone(),
                })
            });
        match member {
            Some(caller) if caller.in_any_group(&self.allow_groups) => Ok(caller),
            Some(caller) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "{} is not in group {}, which this node's remote API requires",
                    caller.describe(),
                    if self.allow_groups.is_empty() {
                        "(none: [control].allow_groups is empty)".to_string()
                    } else {
                        self.allow_groups.join(" or ")
                    }
                ),
                "its certificate's groups decide ([control].allow_groups on this node); or send the bearer token",
            )),
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing bearer token, and the request did not come through the tunnel from a mesh member",
                if self.allow_groups.is_empty() {
                    "send `Authorization: Bearer <token>` with the token from [control].token_file"
                } else {
                    "send `Authorization: Bearer <token>`, or call this node's overlay address from a member of [control].allow_groups"
                },
            )),
        }
    }
}

/// The same API for the remote listeners, for the callers `auth` admits.
/// The dashboard page itself holds no data, so it loads without the token; the page reads the
/// token from its URL fragment and sends it with every API call.
pub fn remote_router(state: Arc<ApiState>, auth: Arc<RemoteAuth>) -> Router {
    let peers = state.peers.clone();
    let api = api_routes(state).layer(axum::middleware::from_fn(
        move |mut req: Request, next: axum::middleware::Next| {
            let (auth, peers) = (auth.clone(), peers.clone());
            async move {
                match auth.authorise(&req, &peers) {
                    Ok(caller) => {
                        req.extensions_mut().insert(caller);
                        next.run(req).await
                    }
                    Err(e) => e.into_response(),
                }
            }
        },
    ));
    dashboard_routes().merge(api)
}

/// The token-free API on the loopback listener at `own`. Every request must name that
/// listener in `Host` (so a DNS-rebound name cannot read it), and a state-changing request that
/// carries an `Origin` must come from the API's own origin (so no other web page can post to it).
pub fn router(state: Arc<ApiState>, own: std::net::SocketAddr) -> Router {
    dashboard_routes()
        .merge(api_routes(state))
        .layer(axum::middleware::from_fn(
            move |mut req: Request, next: axum::middleware::Next| async move {
                match request_refusal(&req, own, &[]) {
                    None => {
                        req.extensions_mut().insert(Caller::local());
                        next.run(req).await
                    }
                    Some(e) => e.into_response(),
                }
            },
        ))
}

/// Why a request to the listener at `own` is refused, if it is: its `Host` names neither
/// `own` nor one of `names`, or it changes state from another origin (an `Origin` that is not
/// this listener's, or a browser's `Sec-Fetch-Site` other than same-origin).
fn request_refusal(req: &Request, own: std::net::SocketAddr, names: &[String]) -> Option<ApiError> {
    let header = |name| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("\u{fffd}"))
    };
    let host = header(axum::http::header::HOST);
    let same = |authority: &str| is_own_authority(authority, own, names);
    if !host.is_some_and(same) {
        return Some(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "Host `{}` is not this API's address",
                host.unwrap_or("(none)")
            ),
            if own.ip().is_loopback() {
                format!(
                    "address the local API as http://{own} or http://localhost:{}; for remote access use [control].remote_listen (with a token_file or allow_groups)",
                    own.port()
                )
            } else {
                format!(
                    "address this API as http://{own}{}",
                    names
                        .first()
                        .map(|n| format!(" or http://{n}:{}", own.port()))
                        .unwrap_or_default()
                )
            },
        ));
    }
    // Another site's page may link to the dashboard, but may not use the API, even to read:
    // a read can start work (an event stream gathers the whole fleet) and take a stream place.
    let page = matches!(req.uri().path(), "/" | "/index.html");
    if let Some(site) = header(axum::http::HeaderName::from_static("sec-fetch-site")) {
        if site != "same-origin" && site != "none" && !page {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("a request from a {site} page is refused"),
                format!("only pages served by this API (http://{own}) may use it; scripts and curl send no Sec-Fetch-Site"),
            ));
        }
    }
    let changes_state = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if changes_state {
        if let Some(site) = header(axum::http::HeaderName::from_static("sec-fetch-site")) {
            if site != "same-origin" && site != "none" {
                return Some(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("a {} from a {site} page is refused", req.method()),
                    format!("only pages served by this API (http://{own}) may change state; scripts and curl send no Sec-Fetch-Site"),
                ));
            }
        }
        if let Some(origin) = header(axum::http::header::ORIGIN) {
            let own_origin = origin.strip_prefix("http://").is_some_and(same);
            if !own_origin {
                return Some(ApiError::new(
                    StatusCode::FORBIDDEN,
                    format!("a {} from origin `{origin}` is refused", req.method()),
                    format!("only pages served by this API (http://{own}) may change state; scripts and curl send no Origin"),
                ));
            }
        }
    }
    None
}

/// `authority` (a `Host` value or an origin without its scheme) names the listener at `own`:
/// its own IP, `localhost` (loopback listeners) or one of `names`, with its port (or no port
/// when that is 80).
fn is_own_authority(authority: &str, own: std::net::SocketAddr, names: &[String]) -> bool {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().ok()),
        _ => (authority, Some(80)),
    };
    if port != Some(own.port()) {
        return false;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return own.ip().is_loopback();
    }
    if names.iter().any(|n| host.eq_ignore_ascii_case(n)) {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.to_canonical() == own.ip().to_canonical())
}

const DASHBOARD: &str = include_str!("dashboard.html");

fn dashboard_routes() -> Router {
    let page = || async {
        (
            [
                ("content-type", "text/html; charset=utf-8"),
                ("cache-control", "no-cache"),
            ],
            DASHBOARD,
        )
    };
    Router::new()
        .route("/", get(page))
        .route("/index.html", get(page))
}

fn api_routes(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/peers", get(peers).post(add_peer))
        .route("/api/v1/peers/{name}", axum::routing::delete(remove_peer))
        .route("/api/v1/members", get(members))
        .route("/api/v1/firewall", get(firewall))
        .route("/api/v1/whois/{addr}", get(whois))
        .route("/api/v1/firewall/reload", post(reload_firewall))
        .route("/api/v1/plugins", get(plugins))
        .route("/api/v1/plugins/{name}", get(plugin))
        .route("/api/v1/plugins/{name}/{action}", post(plugin_action))
        .route("/api/v1/events", get(events::stream))
        .route("/api/v1/summary", get(fleet::summary))
        .route("/api/v1/fleet", get(fleet::fleet))
        .route("/api/v1/fleet/events", get(fleet::events))
        .route("/api/v1/fleet/{member}/rearm", post(fleet::rearm))
        .route("/metrics", get(prometheus))
        .route("/plugins/{name}", any(proxy_root))
        .route("/plugins/{name}/", any(proxy_root))
        .route("/plugins/{name}/{*rest}", any(proxy))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such endpoint",
                "the API lives under /api/v1/ (status, peers, members, plugins, events, summary, fleet)",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed here",
                "reads are GET; enable, disable, restart and adding a peer are POST; removing a peer is DELETE",
            )
        })
        .with_state(state)
}

async fn status(State(s): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    let info = crate::build_info::build_info();
    let plugins = s.host.statuses();
    Json(json!({
        "node": s.node,
        "version": info.version,
        "git": info.git,
        "features": info.features,
        "tunnel": s.tunnel,
        "uptime_s": s.started.elapsed().as_secs_f64(),
        "peers": s.mesh.borrow().peers.len(),
        "peers_up": s.mesh.borrow().peers.iter().filter(|p| p.up).count(),
        "connectivity": s.connectivity.borrow().clone(),
        "plugins": plugins.iter().map(|p| json!({"name": p.name, "state": p.state})).collect::<Vec<_>>(),
    }))
}

async fn peers(State(s): State<Arc<ApiState>>) -> Json<MeshView> {
    Json(s.mesh.borrow().clone())
}

/// A peer to add at run time, as `POST /api/v1/peers` takes it (the fields of `[[peers]]`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPeer {
    name: String,
    public_key: String,
    allowed_ips: Vec<String>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    persistent_keepalive: Option<u16>,
}

fn bad_peer(error: String, hint: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, error, hint)
}

fn peer_spec(body: &[u8]) -> Result<crate::tunnel::PeerSpec, ApiError> {
    const EXAMPLE: &str = r#"{"name": "robot3", "public_key": "<44 base64 chars>", "allowed_ips": ["10.77.0.3/32"], "endpoint": "192.0.2.3:51820", "persistent_keepalive": 25}"#;
    let p: NewPeer = serde_json::from_slice(body)
        .map_err(|e| bad_peer(format!("the peer is not valid JSON: {e}"), EXAMPLE))?;
    if crate::config::sanitize_name(&p.name).as_deref() != Ok(p.name.as_str()) {
        return Err(bad_peer(
            format!(
                "peer name `{}` must be letters, digits and `_`, not starting with a digit",
                p.name
            ),
            "e.g. \"robot3\"",
        ));
    }
    let key = crate::keys::PublicKey::try_from(p.public_key.clone())
        .map_err(|e| bad_peer(format!("public_key: {e}"), EXAMPLE))?;
    if p.allowed_ips.is_empty() {
        return Err(bad_peer(
            "allowed_ips is empty".into(),
            "give the peer's overlay address, e.g. [\"10.77.0.3/32\"]",
        ));
    }
    let allowed_ips = p
        .allowed_ips
        .iter()
        .map(|a| {
            a.parse::<ipnet::IpNet>().map_err(|e| {
                bad_peer(
                    format!("allowed_ips `{a}`: {e}"),
                    "use address/prefix, e.g. 10.77.0.3/32",
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let endpoint = p
        .endpoint
        .as_deref()
        .map(|e| {
            e.parse::<std::net::SocketAddr>().map_err(|err| {
                bad_peer(
                    format!("endpoint `{e}`: {err}"),
                    "use ip:port, e.g. 192.0.2.3:51820",
                )
            })
        })
        .transpose()?;
    Ok(crate::tunnel::PeerSpec {
        name: p.name,
        public_key: key.0,
        allowed_ips,
        endpoint,
        persistent_keepalive: p.persistent_keepalive,
        probe_interval: None,
        idles: false,
        groups: Vec::new(),
        multicast: Vec::new(),
        certified: false,
        behind_nat: false,
        candidates: Vec::new(),
    })
}

/// Adds a peer to the running tunnel (or updates the one with that key) without touching
/// the others' sessions. Not written to the config: like `wg set`, it lasts until the node stops.
async fn add_peer(
    State(s): State<Arc<ApiState>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let spec = peer_spec(&body)?;
    let name = spec.name.clone();
    let changed = s.peers.upsert(spec).map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            e.to_string(),
            "GET /api/v1/peers lists the peers",
        )
    })?;
    Ok(Json(json!({ "peer": name, "changed": changed })).into_response())
}

async fn remove_peer(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.peers.remove(&name).map_err(|e| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            e.to_string(),
            "GET /api/v1/peers lists the peers",
        )
    })?;
    Ok(Json(json!({ "peer": name, "removed": true })).into_response())
}

async fn members(State(s): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    Json(json!({ "members": *s.members.borrow() }))
}

async fn firewall(State(s): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    Json(match s.peers.firewall_status() {
        Some(v) => json!({ "enabled": true, "firewall": v }),
        None => json!({ "enabled": false }),
    })
}

/// Who holds an overlay address: the peer whose allowed IPs route it, with the identity its
/// certificate gives it (mesh members) or none (static peers).
async fn whois(
    State(s): State<Arc<ApiState>>,
    Path(addr): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ip: std::net::IpAddr = addr.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("`{addr}` is not an IP address"),
            "ask for an overlay address, e.g. /api/v1/whois/10.77.0.2",
        )
    })?;
    let table = s.peers.table();
    let Some(peer) = table.route(ip).and_then(|slot| table.get(slot)) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no peer holds {ip}"),
            "`myelin peers` lists the peers and their overlay addresses",
        ));
    };
    let member = s
        .members
        .borrow()
        .iter()
        .find(|m| m.public_key == peer.public_key)
        .cloned();
    Ok(Json(json!({
        "address": ip,
        "name": peer.name,
        "public_key": peer.public_key,
        "overlay_ips": peer.allowed_ips,
        "groups": peer.spec.groups,
        "certificate": member.as_ref().map(|m| json!({
            "fingerprint": m.fingerprint,
            "not_after": m.not_after,
            "source": m.source,
        })),
    })))
}

/// Reads the config again and applies its `[firewall]` rules, as SIGHUP does.
async fn reload_firewall(State(s): State<Arc<ApiState>>) -> Response {
    match crate::node::reload_firewall(&s.config_path, &s.peers) {
        Ok((inbound, outbound)) => Json(json!({
            "reloaded": true,
            "inbound": inbound,
            "outbound": outbound,
        }))
        .into_response(),
        Err(error) => (
            axum::http::StatusCode::CONFLICT,
            Json(json!({ "error": error })),
        )
            .into_response(),
    }
}

async fn plugins(State(s): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    Json(json!({ "plugins": s.host.statuses() }))
}

async fn plugin(
    State(s): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.host
        .status(&name)
        .map(|p| Json(p).into_response())
        .ok_or_else(|| HostError::UnknownPlugin(name).into())
}

async fn plugin_action(
    State(s): State<Arc<ApiState>>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let action = match action.as_str() {
        "enable" => Action::Enable,
        "disable" => Action::Disable,
        "restart" => Action::Restart,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown plugin action `{other}`"),
                "use enable, disable or restart",
            ))
        }
    };
    let status = s.host.act(&name, action).await?;
    Ok(Json(status).into_response())
}

async fn prometheus(State(s): State<Arc<ApiState>>) -> Response {
    match &s.metrics {
        Some(handle) => (
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics are not recorded in this process",
            "",
        )
        .into_response(),
    }
}

async fn proxy_root(
    state: State<Arc<ApiState>>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    forward(state, name, String::new(), req).await
}

async fn proxy(
    state: State<Arc<ApiState>>,
    Path((name, rest)): Path<(String, String)>,
    req: Request,
) -> Result<Response, ApiError> {
    forward(state, name, rest, req).await
}

/// The request as the plugin gets it: its path below `/plugins/<name>`, without the node's
/// bearer token (a plugin never sees it), and with the caller the node established in
/// [`CALLER_HEADER`] (whatever the client put there is dropped).
fn to_plugin(req: Request, rest: &str) -> Result<Request, ApiError> {
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(axum::http::header::AUTHORIZATION);
    parts.headers.remove(CALLER_HEADER);
    if let Some(caller) = parts.extensions.get::<Caller>() {
        let value = axum::http::HeaderValue::from_str(&caller.to_header()).map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the caller's identity cannot be put in a header",
                "",
            )
        })?;
        parts.headers.insert(CALLER_HEADER, value);
    }
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    parts.uri = format!("/{rest}{query}")
        .parse()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "malformed path", ""))?;
    Ok(Request::from_parts(parts, body))
}

async fn forward(
    State(s): State<Arc<ApiState>>,
    name: String,
    rest: String,
    req: Request,
) -> Result<Response, ApiError> {
    let status = s
        .host
        .status(&name)
        .ok_or_else(|| ApiError::from(HostError::UnknownPlugin(name.clone())))?;
    if !status.serves_http {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "plugin `{name}` is {} and serves no routes now",
                status.state.as_str()
            ),
            "check GET /api/v1/plugins; enable or restart the plugin",
        ));
    }
    let req = to_plugin(req, &rest)?;
    let socket = s.host.http_socket(&name);
    match client::unix(&socket, req).await {
        Ok(resp) => Ok(resp.map(Body::new)),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("plugin `{name}` did not answer: {e}"),
            "the plugin may be restarting; GET /api/v1/plugins shows its state",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, host: &str, origin: Option<&str>) -> Request {
        let mut b = Request::builder()
            .method(method)
            .uri("/api/v1/status")
            .header("host", host);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn only_the_listeners_own_host_and_origin_pass() {
        let own: std::net::SocketAddr = "127.0.0.1:7800".parse().unwrap();
        let refused = |method, host, origin| request_refusal(&req(method, host, origin), own, &[]);
        assert!(refused("GET", "127.0.0.1:7800", None).is_none());
        assert!(refused("GET", "localhost:7800", None).is_none());
        assert!(refused("GET", "LOCALHOST:7800", None).is_none());
        assert!(refused("GET", "evil.example:7800", None).is_some());
        assert!(refused("GET", "127.0.0.1:7801", None).is_some());
        assert!(
            refused("GET", "127.0.0.1", None).is_some(),
            "port 80 is not 7800"
        );
        assert!(refused("GET", "127.0.0.1:7800@evil", None).is_some());
        assert!(refused("POST", "127.0.0.1:7800", None).is_none(), "curl");
        assert!(refused("POST", "127.0.0.1:7800", Some("http://127.0.0.1:7800")).is_none());
        assert!(refused("POST", "127.0.0.1:7800", Some("http://localhost:7800")).is_none());
        assert!(refused("POST", "127.0.0.1:7800", Some("https://127.0.0.1:7800")).is_some());
        assert!(refused("POST", "127.0.0.1:7800", Some("null")).is_some());
        assert!(refused("DELETE", "127.0.0.1:7800", Some("http://evil.example")).is_some());
        let v6: std::net::SocketAddr = "[::1]:7800".parse().unwrap();
        assert!(request_refusal(&req("GET", "[::1]:7800", None), v6, &[]).is_none());
        assert!(request_refusal(&req("GET", "localhost:7800", None), v6, &[]).is_none());
        // A remote listener: its address or its DNS name, never localhost; no cross-site
        // state change even with a matching Host.
        let overlay: std::net::SocketAddr = "10.77.0.2:7800".parse().unwrap();
        let names = ["robot1.myelin.internal".to_string()];
        let remote = |r: Request| request_refusal(&r, overlay, &names);
        assert!(remote(req("POST", "10.77.0.2:7800", None)).is_none());
        assert!(remote(req("GET", "ROBOT1.myelin.internal:7800", None)).is_none());
        assert!(remote(req("GET", "localhost:7800", None)).is_some());
        assert!(
            remote(req("GET", "evil.example:7800", None)).is_some(),
            "rebinding"
        );
        assert!(remote(req("POST", "10.77.0.2:7800", Some("http://evil.example"))).is_some());
        let mut cross = req("POST", "10.77.0.2:7800", None);
        cross
            .headers_mut()
            .insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(remote(cross).is_some());
        let mut read = req("GET", "10.77.0.2:7800", None);
        read.headers_mut()
            .insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(remote(read).is_some(), "a cross-site read of the API");
        let mut link = Request::builder()
            .uri("/")
            .header("host", "10.77.0.2:7800")
            .header("sec-fetch-site", "cross-site")
            .body(Body::empty())
            .unwrap();
        assert!(remote(link).is_none(), "a link to the dashboard page");
        link = Request::builder()
            .uri("/api/v1/fleet/events")
            .header("host", "10.77.0.2:7800")
            .header("sec-fetch-site", "same-site")
            .body(Body::empty())
            .unwrap();
        assert!(remote(link).is_some(), "a same-site page is another origin");
        let mut same = req("POST", "10.77.0.2:7800", Some("http://10.77.0.2:7800"));
        same.headers_mut()
            .insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(remote(same).is_none());
    }

    #[test]
    fn a_plugin_never_sees_the_bearer_token() {
        let r = Request::builder()
            .uri("/plugins/cam/trigger/none?x=1")
            .header("authorization", "Bearer secret-token-0123456789")
            .header("accept", "application/json")
            .body(Body::empty())
            .unwrap();
        let out = to_plugin(r, "trigger/none").unwrap();
        assert!(out.headers().get("authorization").is_none());
        assert!(out.headers().get(CALLER_HEADER).is_none());
        assert_eq!(out.headers()["accept"], "application/json");
        assert_eq!(out.uri(), "/trigger/none?x=1");
    }

    #[test]
    fn a_plugin_sees_the_caller_the_node_set_never_the_clients() {
        let mut r = Request::builder()
            .uri("/plugins/safety/rearm")
            .header(
                CALLER_HEADER,
                r#"{"via":"mesh","name":"operator","groups":["operators"]}"#,
            )
            .body(Body::empty())
            .unwrap();
        let robot = Caller {
            via: Via::Mesh,
            name: Some("robot2".into()),
            address: "10.77.0.3".parse().ok(),
            groups: vec!["robots".into()],
        };
        r.extensions_mut().insert(robot.clone());
        let out = to_plugin(r, "rearm").unwrap();
        assert_eq!(Caller::from_headers(out.headers()), Some(robot));
    }
}
