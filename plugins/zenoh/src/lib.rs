//! Robotics mode: a zenoh router embedded in the node with the ROS 2 DDS bridge
//! (zenoh-plugin-ros2dds) linked in statically. Local ROS 2 traffic stays on DDS inside the
//! robot; between nodes it travels as zenoh over the VPN. The routers find each other through
//! the mesh (no multicast), and each robot's ROS names get its own namespace.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod config;
mod panel;
mod peers;

use config::ZenohConfig;
use myelin_sdk::axum::{response::Html, routing::get, Json, Router};
use myelin_sdk::tokio::sync::Mutex as AsyncMutex;
use myelin_sdk::{async_trait, Health, Plugin, PluginContext, PluginError, Registration};
use serde::Serialize;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use zenoh::internal::plugins::PluginsManager;
use zenoh::internal::runtime::{Runtime, RuntimeBuilder};
use zenoh::Session;

/// How often connections and routes are checked besides mesh changes.
const TICK: Duration = Duration::from_secs(1);

/// What the panel, the status route and health show.
#[derive(Clone, Debug, Default, Serialize)]
struct Status {
    zid: String,
    namespace: String,
    listen: Vec<String>,
    peers: Vec<PeerStatus>,
    routes: Vec<RouteStatus>,
}

#[derive(Clone, Debug, Serialize)]
struct PeerStatus {
    name: String,
    zid: String,
    locator: String,
    connected: bool,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
struct RouteStatus {
    /// `topic/pub`, `topic/sub`, `service/srv`, ...
    kind: String,
    /// The zenoh key expression the route uses.
    key: String,
    /// The local ROS name and type, as the bridge reports them.
    ros_name: Option<String>,
    ros_type: Option<String>,
}

struct Running {
    runtime: Runtime,
    /// Held so the session is never dropped while the router runs.
    _session: Session,
}

struct Zenoh {
    config: ZenohConfig,
    status: Arc<Mutex<Status>>,
    running: Arc<AsyncMutex<Option<Running>>>,
}

#[async_trait]
impl Plugin for Zenoh {
    fn name(&self) -> &str {
        "zenoh"
    }

    async fn start(&mut self, ctx: PluginContext) -> Result<(), PluginError> {
        let node = ctx.node().clone();
        let zid = peers::zid_for(&node.public_key);
        let namespace = self.config.namespace(&node.name);
        let overlay: Vec<_> = node.overlay_addresses.iter().map(|n| n.addr()).collect();
        let zconfig = self.config.zenoh(&zid, &node.name, &overlay)?;
        let listen: Vec<String> = serde_json::from_str(
            &zconfig
                .get_json("listen/endpoints")
                .unwrap_or_else(|_| "[]".into()),
        )
        .unwrap_or_default();
        // The bridge reads ROS_DISTRO once, when it first needs it; this process runs only
        // this plugin (process_only), so the variable is ours to set.
        std::env::set_var("ROS_DISTRO", &self.config.ros_distro);

        let mut plugins = PluginsManager::static_plugins_only();
        plugins.declare_static_plugin::<zenoh_plugin_ros2dds::ROS2Plugin, &str>("ros2dds", true);
        let mut runtime = RuntimeBuilder::new(zconfig)
            .plugins_manager(plugins)
            .build()
            .await
            .map_err(|e| {
                PluginError::Failed(format!(
                    "cannot start the zenoh router on {}: {e} (is [plugins.zenoh].listen_port free on every address?)",
                    listen.join(", ")
                ))
            })?;
        runtime
            .start()
            .await
            .map_err(|e| PluginError::Failed(format!("zenoh router did not start: {e}")))?;
        let session = zenoh::session::init(runtime.clone().into())
            .await
            .map_err(|e| PluginError::Failed(format!("zenoh session: {e}")))?;
        tracing_line(&format!(
            "zenoh router {zid} listening on {}; ROS namespace {namespace}",
            listen.join(", ")
        ));
        if let Ok(mut s) = self.status.lock() {
            *s = Status {
                zid: zid.clone(),
                namespace,
                listen,
                ..Status::default()
            };
        }
        *self.running.lock().await = Some(Running {
            runtime: runtime.clone(),
            _session: session.clone(),
        });
        myelin_sdk::tokio::spawn(connect_loop(
            ctx.clone(),
            runtime,
            session,
            self.config.listen_port,
            zid,
            self.status.clone(),
        ));
        Ok(())
    }

    async fn stop(&mut self) -> Result<(), PluginError> {
        // The router is never closed: zenoh 1.10.2 aborts the process when a runtime that ran
        // the bridge is torn down. The plugin runs in its own process (process_only), and the
        // host ends that process after this returns.
        Ok(())
    }

    async fn health(&self) -> Health {
        let running = self.running.lock().await;
        let Some(r) = running.as_ref() else {
            return Health::Unhealthy {
                reason: "the zenoh router is not running".into(),
            };
        };
        let bridge = r
            .runtime
            .plugins_manager()
            .started_plugins_iter()
            .any(|p| p.id() == "ros2dds");
        if !bridge {
            return Health::Unhealthy {
                reason: "the ROS 2 bridge did not start (see the plugin's log)".into(),
            };
        }
        let Ok(status) = self.status.lock() else {
            return Health::Healthy;
        };
        let missing: Vec<&str> = status
            .peers
            .iter()
            .filter(|p| !p.connected)
            .map(|p| p.name.as_str())
            .collect();
        if missing.is_empty() {
            Health::Healthy
        } else {
            Health::Degraded {
                reason: format!(
                    "no zenoh connection yet to {} (their tunnel is up; is robotics mode enabled there?)",
                    missing.join(", ")
                ),
            }
        }
    }

    fn routes(&self) -> Option<Router> {
        let status = self.status.clone();
        let panel_status = self.status.clone();
        Some(
            Router::new()
                .route(
                    "/status",
                    get(move || {
                        let s = status.lock().map(|s| s.clone()).unwrap_or_default();
                        async move { Json(s) }
                    }),
                )
                .route(
                    "/panel",
                    get(move || {
                        let ns = panel_status
                            .lock()
                            .map(|s| s.namespace.clone())
                            .unwrap_or_default();
                        async move { Html(panel::html(&ns)) }
                    }),
                ),
        )
    }
}

fn tracing_line(line: &str) {
    // Plugin children's stderr goes into the node's log, tagged with the plugin name.
    eprintln!("{line}");
}

/// Keeps a zenoh connection to the router of every peer whose tunnel is up, and refreshes the
/// status: every second, and at once when the set of peers that are up changes (not on every
/// mesh update: those come with every probe, ten times a second per peer).
async fn connect_loop(
    ctx: PluginContext,
    runtime: Runtime,
    session: Session,
    port: u16,
    own_zid: String,
    status: Arc<Mutex<Status>>,
) {
    let cancel = ctx.cancellation();
    let mut mesh = ctx.mesh();
    let dialling: Arc<Mutex<HashSet<String>>> = Arc::default();
    let metrics = ctx.metrics();
    let connected_gauge = metrics.gauge("myelin_zenoh_connected_peers");
    let routes_gauge = metrics.gauge("myelin_zenoh_routes");
    let mut tick = myelin_sdk::tokio::time::interval(TICK);
    // A slow admin query must not make the missed ticks fire back to back.
    tick.set_missed_tick_behavior(myelin_sdk::tokio::time::MissedTickBehavior::Delay);
    let mut last_targets: Vec<(String, String)> = Vec::new();
    loop {
        myelin_sdk::tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
            changed = mesh.changed() => {
                if changed.is_err() { return }
                let now: Vec<(String, String)> = peers::targets(&mesh.borrow(), port)
                    .into_iter()
                    .map(|t| (t.zid, t.locator))
                    .collect();
                if now == last_targets {
                    continue;
                }
            }
        }
        let view = mesh.borrow_and_update().clone();
        last_targets = peers::targets(&view, port)
            .into_iter()
            .map(|t| (t.zid, t.locator))
            .collect();
        let connected: HashSet<String> = session
            .info()
            .routers_zid()
            .await
            .map(|z| z.to_string())
            .collect();
        let in_flight = dialling.lock().map(|d| d.clone()).unwrap_or_default();
        for target in peers::to_dial(&view, port, &connected, &in_flight) {
            let Ok(zid) = target.zid.parse::<zenoh::config::ZenohId>() else {
                continue;
            };
            let Ok(locator) = target.locator.parse::<zenoh::config::Locator>() else {
                continue;
            };
            if let Ok(mut d) = dialling.lock() {
                d.insert(target.zid.clone());
            }
            let runtime = runtime.clone();
            let dialling = dialling.clone();
            // Each dial on its own task: a peer that does not answer never delays the others.
            // zenoh bounds each attempt with transport/unicast/open_timeout.
            myelin_sdk::tokio::spawn(async move {
                if runtime.connect_peer(&zid.into(), &[locator]).await {
                    tracing_line(&format!(
                        "connected to {} ({})",
                        target.peer, target.locator
                    ));
                }
                if let Ok(mut d) = dialling.lock() {
                    d.remove(&target.zid);
                }
            });
        }
        let peers: Vec<PeerStatus> = peers::targets(&view, port)
            .into_iter()
            .map(|t| PeerStatus {
                connected: connected.contains(&t.zid),
                name: t.peer,
                zid: t.zid,
                locator: t.locator,
            })
            .collect();
        let routes = bridge_routes(&session, &own_zid).await;
        connected_gauge.set(peers.iter().filter(|p| p.connected).count() as f64);
        routes_gauge.set(routes.len() as f64);
        if let Ok(mut s) = status.lock() {
            s.peers = peers;
            s.routes = routes;
        }
    }
}

/// The bridge's routes, from its admin space (`@/<zid>/ros2/route/<kind>/<key>`).
async fn bridge_routes(session: &Session, zid: &str) -> Vec<RouteStatus> {
    let prefix = format!("@/{zid}/ros2/route/");
    let Ok(replies) = session
        .get(format!("{prefix}**"))
        .timeout(Duration::from_secs(1))
        .await
    else {
        return Vec::new();
    };
    let mut routes = Vec::new();
    while let Ok(reply) = replies.recv_async().await {
        let Ok(sample) = reply.result() else { continue };
        let key = sample.key_expr().as_str();
        let Some(rest) = key.strip_prefix(&prefix) else {
            continue;
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(a), Some(b), Some(zkey)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let info: serde_json::Value = sample
            .payload()
            .try_to_string()
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let field = |k: &str| info.get(k).and_then(|v| v.as_str()).map(str::to_string);
        routes.push(RouteStatus {
            kind: format!("{a}/{b}"),
            key: zkey.to_string(),
            ros_name: field("ros2_name"),
            ros_type: field("ros2_type"),
        });
    }
    routes.sort_by(|x, y| (&x.kind, &x.key).cmp(&(&y.kind, &y.key)));
    routes
}

fn build(section: &myelin_sdk::toml::Table) -> Result<Box<dyn Plugin>, PluginError> {
    let config = ZenohConfig::parse(section)?;
    Ok(Box::new(Zenoh {
        config,
        status: Arc::default(),
        running: Arc::default(),
    }))
}

myelin_sdk::inventory::submit! {
    Registration {
        name: "zenoh",
        about: "robotics mode: ROS 2 topics, services and actions across the VPN (zenoh + ROS 2 DDS bridge)",
        build,
        process_only: true,
        mesh_every_probe: false,
        init_section: Some(init_section),
        lab_section: Some(lab_section),
    }
}

fn init_section() -> String {
    "[plugins.zenoh]\nenabled = true\n".into()
}

/// The operator station sees every robot's namespace.
fn lab_section(node: &myelin_sdk::LabNode) -> String {
    if node.operator {
        "\n[plugins.zenoh]\nrole = \"operator\"\n".into()
    } else {
        "\n[plugins.zenoh]\n".into()
    }
}
