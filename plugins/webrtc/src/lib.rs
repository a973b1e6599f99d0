//! Streaming mode: H.264 RTP that the robot's camera pipeline sends to a local UDP port is served
//! over WHEP (WebRTC-HTTP Egress Protocol) on the node's overlay addresses, so a browser on any
//! VPN peer plays it with plain `RTCPeerConnection`. ICE uses one host candidate on the overlay
//! address: the mesh already gives reachability, so there is no STUN, TURN or mDNS.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod config;
mod discovery;
mod h264;
mod panel;
mod session;
mod streams;
mod whep;

use config::WebrtcConfig;
use discovery::discover;
use myelin_sdk::axum::{response::Html, routing::get, Json, Router};
use myelin_sdk::{async_trait, Health, Plugin, PluginContext, PluginError, Registration};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use streams::{ingest, Stream, StreamHub};
use whep::whep_router;

struct Webrtc {
    config: WebrtcConfig,
    hub: Option<Arc<StreamHub>>,
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
        let hub = Arc::new(StreamHub {
            streams,
            token,
            port: self.config.listen_port,
            own: own_base(&ctx, self.config.listen_port),
            origins: crate::whep::Origins {
                extra: self.config.allow_origins.clone(),
                own: ctx
                    .node()
                    .overlay_addresses
                    .iter()
                    .map(|n| n.addr())
                    .collect(),
                mesh: Some(ctx.mesh()),
            },
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
            let app = whep_router(hub.clone(), net.addr());
            let cancel = cancel.clone();
            tokio::spawn(myelin_sdk::serve::serve(
                listener,
                app,
                myelin_sdk::serve::Limits::default(),
                async move { cancel.cancelled().await },
            ));
            eprintln!("WHEP on http://{addr}/<stream>/whep");
        }
        tokio::spawn(discover(ctx.clone(), hub.clone()));
        self.hub = Some(hub);
        Ok(())
    }

    async fn stop(&mut self) -> Result<(), PluginError> {
        if let Some(hub) = &self.hub {
            for s in hub.streams.values() {
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
        let hub = self.hub.clone();
        let summary_hub = self.hub.clone();
        Some(
            Router::new()
                .route(
                    "/status",
                    get(move || {
                        let body = hub.as_ref().map(|s| panel::status(s)).unwrap_or_default();
                        async move { Json(body) }
                    }),
                )
                .route(
                    "/summary",
                    get(move || {
                        let body = summary_hub
                            .as_ref()
                            .map(|s| panel::summary(s))
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
    Ok(Box::new(Webrtc { config, hub: None }))
}

myelin_sdk::inventory::submit! {
    Registration {
        name: "webrtc",
        about: "streaming mode: robot camera H.264 RTP served over WHEP to browsers on the VPN",
        build,
        process_only: false,
        mesh_every_probe: false,
        init_section: Some(init_section),
        lab_section: Some(lab_section),
    }
}

fn init_section() -> String {
    "[plugins.webrtc]\nenabled = true\n".into()
}

/// Robots serve a camera stream (fed H.264 RTP on 127.0.0.1:5004); the operator watches.
/// This node's name and its WHEP base URL on its first overlay address (IPv4 first).
fn own_base(ctx: &PluginContext, port: u16) -> Option<(String, String)> {
    let node = ctx.node();
    let mut addresses: Vec<std::net::IpAddr> =
        node.overlay_addresses.iter().map(|n| n.addr()).collect();
    addresses.sort_by_key(|a| a.is_ipv6());
    let base = match addresses.first()? {
        std::net::IpAddr::V4(v4) => format!("http://{v4}:{port}"),
        std::net::IpAddr::V6(v6) => format!("http://[{v6}]:{port}"),
    };
    Some((node.name.clone(), base))
}

/// Every node serves WHEP to the lab host's browser, which opens the dashboards on the lab's
/// underlay; robots feed a `front` stream (the lab camera).
fn lab_section(node: &myelin_sdk::LabNode) -> String {
    let origins: Vec<String> = node.dashboards.iter().map(|d| format!("{d:?}")).collect();
    let mut section = format!(
        "\n[plugins.webrtc]\nallow_origins = [{}]\n",
        origins.join(", ")
    );
    if !node.operator {
        section
            .push_str("[[plugins.webrtc.streams]]\nname = \"front\"\nrtp = \"127.0.0.1:5004\"\n");
    }
    section
}
