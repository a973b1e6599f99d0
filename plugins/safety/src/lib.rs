//! The safety interlock: watches the probes to the operator's node(s) and, when the link is too
//! slow or silent, triggers a latched safe stop on the robot through its actions. A person
//! re-arms it once the link is good again; re-arming only permits motion, it never commands it.
//!
//! This is a supplementary measure, not a certified safety function (docs/safety.md).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod actions;
mod config;
mod interlock;
mod panel;
mod persist;
#[cfg(feature = "ros")]
mod ros;
mod shell;
mod status;

use actions::{ActionConfig, Notice};
use config::SafetyConfig;
use interlock::State;
use myelin_sdk::axum::{response::Html, routing::get, routing::post, Json, Router};
use myelin_sdk::{async_trait, log, unix_ms};
use myelin_sdk::{Health, Plugin, PluginContext, PluginError, Registration};
use shell::{interlock_loop, rearm_request, Loop, RearmRequest};
use status::{Reporter, Status};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

struct Safety {
    config: SafetyConfig,
    status: Arc<Mutex<Status>>,
    rearm_tx: Option<mpsc::Sender<RearmRequest>>,
}

#[async_trait]
impl Plugin for Safety {
    fn name(&self) -> &str {
        "safety"
    }

    async fn start(&mut self, ctx: PluginContext) -> Result<(), PluginError> {
        let mesh = ctx.mesh();
        let known: Vec<String> = mesh.borrow().peers.iter().map(|p| p.name.clone()).collect();
        // Mesh peers arrive with the roster, after the plugins start: a watched peer that is not
        // there yet is a link that is down, which keeps the robot stopped, not a config error.
        for name in &self.config.watch {
            if !known.contains(name) {
                log(&format!(
                    "watch: no peer named `{name}` yet (peers now: {}); stopped until it appears and its link is good (check the name in [plugins.safety].watch if it never does)",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ));
            }
        }
        let state_dir = ctx.state_dir().ok_or(PluginError::NotReady(
            "the host gave no state directory; the interlock cannot keep a stop across restarts",
        ))?;
        let state_file = persist::path(state_dir);
        let restored = persist::load(&state_file);
        log(&restored.describe(&state_file, self.config.latch));
        // Every start is a stop until the link proves good: the lock publishes `true` first.
        let (stopped_tx, stopped_rx) = watch::channel((0u64, true));
        let (rearm_tx, rearm_rx) = mpsc::channel(4);
        self.rearm_tx = Some(rearm_tx);
        if let Ok(mut s) = self.status.lock() {
            s.state = Some(State::Tripped);
            s.stopped = true;
            s.reason = Some("startup".into());
            s.rearm_required = self.config.latch && restored.rearm_required();
            s.rearm_cause = restored.cause();
            s.latch = self.config.latch;
            s.since_unix_ms = unix_ms();
            s.state_file = state_file.display().to_string();
        }
        let reporter = Arc::new(Reporter::new(
            &self.config.actions,
            self.status.clone(),
            &ctx.metrics(),
        ));
        let ros_actions: Vec<(usize, ActionConfig)> = self
            .config
            .actions
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_ros())
            .map(|(i, a)| (i, a.clone()))
            .collect();
        if !ros_actions.is_empty() {
            #[cfg(feature = "ros")]
            {
                let namespace = self
                    .config
                    .namespace
                    .clone()
                    .unwrap_or_else(|| format!("/{}", ctx.node().name));
                tokio::spawn(ros::run(
                    ros_actions,
                    namespace,
                    self.config.zenoh_port,
                    stopped_rx.clone(),
                    reporter.clone(),
                    self.status.clone(),
                    ctx.cancellation(),
                ));
            }
        }
        drop(stopped_rx);
        // One worker per command/http action, each following the newest generation.
        let (desired_tx, _) = watch::channel::<Option<Notice>>(None);
        for (index, action) in self.config.actions.iter().enumerate() {
            if action.is_ros() {
                continue;
            }
            tokio::spawn(actions::worker(
                index,
                action.clone(),
                desired_tx.subscribe(),
                reporter.clone(),
                ctx.cancellation(),
            ));
        }
        tokio::spawn(interlock_loop(
            ctx,
            self.config.clone(),
            Loop {
                restored,
                state_file,
                stopped: stopped_tx,
                desired: desired_tx,
                reporter,
            },
            rearm_rx,
            self.status.clone(),
        ));
        Ok(())
    }

    async fn stop(&mut self) -> Result<(), PluginError> {
        Ok(())
    }

    async fn health(&self) -> Health {
        let Ok(s) = self.status.lock() else {
            return Health::Healthy;
        };
        if s.ros_connected == Some(false) {
            return Health::Degraded {
                reason: format!(
                    "ROS actions cannot reach the zenoh router on 127.0.0.1:{} (is robotics mode enabled?)",
                    self.config.zenoh_port
                ),
            };
        }
        if let Some(e) = &s.state_file_error {
            return Health::Degraded {
                reason: format!("cannot save the interlock state to {}: {e}", s.state_file),
            };
        }
        if let Some(a) = s.actions.iter().find(|a| a.failing) {
            return Health::Degraded {
                reason: format!(
                    "actions[{}] ({} {}) failing, retrying: {}",
                    a.index,
                    a.kind,
                    a.target,
                    a.last_error.as_deref().unwrap_or("")
                ),
            };
        }
        if s.stopped {
            return Health::Degraded {
                reason: format!(
                    "safe stop active ({}), {}",
                    s.reason.as_deref().unwrap_or("tripped"),
                    match s.state {
                        Some(State::Latched) => "link good: re-arm to permit motion",
                        Some(State::Clearing) => "link good, clearing",
                        _ if s.reason.as_deref() == Some("startup") => {
                            "waiting for the link to be good"
                        }
                        _ => "link bad",
                    }
                ),
            };
        }
        Health::Healthy
    }

    fn routes(&self) -> Option<Router> {
        let status = self.status.clone();
        let summary_status = self.status.clone();
        let rearm = self.rearm_tx.clone();
        let groups = Arc::new(self.config.rearm_groups.clone());
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
                    "/summary",
                    get(move || {
                        let s = summary_status
                            .lock()
                            .map(|s| crate::status::summary(&s))
                            .unwrap_or_default();
                        async move { Json(s) }
                    }),
                )
                .route(
                    "/rearm",
                    post(move |headers| rearm_request(rearm.clone(), groups.clone(), headers)),
                )
                .route("/panel", get(|| async { Html(panel::PANEL) })),
        )
    }
}

fn build(section: &myelin_sdk::toml::Table) -> Result<Box<dyn Plugin>, PluginError> {
    let config = SafetyConfig::parse(section)?;
    Ok(Box::new(Safety {
        config,
        status: Arc::default(),
        rearm_tx: None,
    }))
}

myelin_sdk::inventory::submit! {
    Registration {
        name: "safety",
        about: "safety interlock: a latched safe stop when the operator link is too slow or silent",
        build,
        process_only: false,
        mesh_every_probe: true,
        init_section: Some(init_section),
        lab_section: Some(lab_section),
    }
}

/// Off until the user names the peers whose link guards motion (docs/safety.md).
fn init_section() -> String {
    "# Name the peers whose link guards motion, then enable it (docs/safety.md).\n[plugins.safety]\nenabled = false\nwatch = [\"operator\"]\n".into()
}

/// Robots guard motion on the operator link and latch, as the product's default does (the
/// operator re-arms them from the fleet page); the operator has no interlock.
fn lab_section(node: &myelin_sdk::LabNode) -> String {
    if node.operator {
        return "\n[plugins.safety]\nenabled = false\nwatch = [\"operator\"]\n".into();
    }
    let mut section = "\n# A trip latches, as on a real robot: re-arm from the operator's fleet page.\n[plugins.safety]\nwatch = [\"operator\"]\nlatch = true\n".to_string();
    if myelin_sdk::registration("zenoh").is_some() {
        section.push_str("[[plugins.safety.actions]]\nkind = \"ros_lock\"\ntopic = \"/e_stop\"\n");
    }
    section
}
