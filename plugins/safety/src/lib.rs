//! The safety interlock: watches the probes to the operator's node(s) and, when the link is too
//! slow or silent, triggers a latched safe stop on the robot through its actions. A person
//! re-arms it once the link is good again; re-arming only permits motion, it never commands it.
//!
//! This is a supplementary measure, not a certified safety function (docs/safety.md).

mod actions;
mod interlock;
mod persist;
#[cfg(feature = "ros")]
mod ros;

use actions::{ActionConfig, ActionStatus, Notice};
use interlock::{Event, Interlock, Settings, State};
use myelin_sdk::axum::{
    http::StatusCode, response::Html, response::IntoResponse, routing::get, routing::post, Json,
    Router,
};
use myelin_sdk::{async_trait, Health, Plugin, PluginContext, PluginError, Registration};
use myelin_sdk::{config_error, log, unix_ms};
use persist::{Restored, Saved};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SafetyConfig {
    /// Peer names whose link guards motion.
    watch: Vec<String>,
    #[serde(default = "default_max_rtt")]
    max_rtt_ms: u64,
    #[serde(default = "default_trip_after")]
    trip_after: u32,
    #[serde(default = "default_heartbeat")]
    heartbeat_timeout_ms: u64,
    #[serde(default = "default_clear_below")]
    clear_below_ms: u64,
    #[serde(default = "default_clear_after")]
    clear_after_s: f64,
    #[serde(default = "default_latch")]
    latch: bool,
    /// The robot's ROS namespace in robotics mode (default `/<node name>`, as the zenoh
    /// plugin's robot role uses).
    namespace: Option<String>,
    /// The zenoh plugin's router port on loopback.
    #[serde(default = "default_zenoh_port")]
    zenoh_port: u16,
    #[serde(default)]
    actions: Vec<ActionConfig>,
}

fn default_max_rtt() -> u64 {
    200
}
fn default_trip_after() -> u32 {
    3
}
fn default_heartbeat() -> u64 {
    500
}
fn default_clear_below() -> u64 {
    150
}
fn default_clear_after() -> f64 {
    5.0
}
fn default_latch() -> bool {
    true
}
fn default_zenoh_port() -> u16 {
    7447
}

impl SafetyConfig {
    fn parse(section: &myelin_sdk::toml::Table) -> Result<Self, PluginError> {
        let c: SafetyConfig = myelin_sdk::parse_section(section)?;
        if c.watch.is_empty() {
            return Err(config_error(
                "watch is empty: name the peers whose link guards motion, e.g. watch = [\"operator\"]",
            ));
        }
        if c.max_rtt_ms > 60_000 || c.heartbeat_timeout_ms > 600_000 || c.trip_after > 10_000 {
            return Err(config_error(format!(
                "max_rtt_ms = {}, heartbeat_timeout_ms = {}, trip_after = {}: at most 60000, 600000 and 10000 (an interlock that waits longer protects nothing)",
                c.max_rtt_ms, c.heartbeat_timeout_ms, c.trip_after
            )));
        }
        if c.max_rtt_ms == 0 || c.heartbeat_timeout_ms == 0 || c.trip_after == 0 {
            return Err(config_error(
                "max_rtt_ms, heartbeat_timeout_ms and trip_after must be at least 1 (defaults: 200, 500, 3)",
            ));
        }
        if c.clear_below_ms > c.max_rtt_ms {
            return Err(config_error(format!(
                "clear_below_ms = {} is above max_rtt_ms = {}: the link must be better to clear than to stay armed; e.g. clear_below_ms = 150",
                c.clear_below_ms, c.max_rtt_ms
            )));
        }
        if !(c.clear_after_s.is_finite() && c.clear_after_s >= 0.0 && c.clear_after_s <= 3600.0) {
            return Err(config_error(format!(
                "clear_after_s = {} must be between 0 and 3600 seconds",
                c.clear_after_s
            )));
        }
        for (n, a) in c.actions.iter().enumerate() {
            a.check(n).map_err(config_error)?;
            if a.is_ros() && !cfg!(feature = "ros") {
                return Err(config_error(format!(
                    "actions[{n}]: kind = \"{}\" publishes through robotics mode, which this binary was built without; build with --features zenoh,safety, or use kind = \"command\" or \"http\"",
                    a.kind()
                )));
            }
        }
        if let Some(ns) = &c.namespace {
            if !ns.starts_with('/') {
                return Err(config_error(format!(
                    "namespace = \"{ns}\" must start with / (the same value as [plugins.zenoh].namespace)"
                )));
            }
        }
        Ok(c)
    }

    fn settings(&self) -> Settings {
        Settings {
            max_rtt: Duration::from_millis(self.max_rtt_ms),
            trip_after: self.trip_after,
            heartbeat_timeout: Duration::from_millis(self.heartbeat_timeout_ms),
            clear_below: Duration::from_millis(self.clear_below_ms),
            clear_after: Duration::from_secs_f64(self.clear_after_s),
            latch: self.latch,
        }
    }
}

/// What `GET /status` answers.
#[derive(Clone, Debug, Default, Serialize)]
struct Status {
    state: Option<State>,
    stopped: bool,
    reason: Option<String>,
    peer: Option<String>,
    rtt_ms: Option<f64>,
    /// Unix milliseconds of the latest state change.
    since_unix_ms: u128,
    trips: u64,
    links: Vec<interlock::LinkStatus>,
    latch: bool,
    /// Whether the current stop ends only with a re-arm.
    rearm_required: bool,
    /// The trip that made the re-arm necessary (kept across restarts).
    rearm_cause: Option<persist::Cause>,
    /// The newest transition's generation; every action applies only this one.
    generation: u64,
    /// Each action: what it applied, whether it is still applying, its failures.
    actions: Vec<ActionStatus>,
    /// Problems with actions (a failed command, an unreachable router), newest last.
    action_errors: Vec<String>,
    /// Where the state is saved, and why saving it failed last (none once it works again).
    state_file: String,
    state_file_error: Option<String>,
    ros_connected: Option<bool>,
}

type RearmReply = oneshot::Sender<Result<(), String>>;

struct Safety {
    config: SafetyConfig,
    status: Arc<Mutex<Status>>,
    rearm_tx: Option<mpsc::Sender<RearmReply>>,
}

fn note_error(status: &Mutex<Status>, error: String) {
    log(&format!("action failed: {error}"));
    if let Ok(mut s) = status.lock() {
        s.action_errors.push(error);
        let excess = s.action_errors.len().saturating_sub(10);
        s.action_errors.drain(..excess);
    }
}

/// Where the actions' progress goes: the status route, the log and
/// `myelin_safety_action_failures_total{action,index}`.
struct Reporter {
    status: Arc<Mutex<Status>>,
    failures: Vec<myelin_sdk::metrics::Counter>,
    /// When each action's failure was last logged: a ROS put failing at 10 Hz logs once a second.
    logged: Mutex<Vec<Option<Instant>>>,
}

impl Reporter {
    fn new(
        actions: &[ActionConfig],
        status: Arc<Mutex<Status>>,
        metrics: &myelin_sdk::PluginMetrics,
    ) -> Reporter {
        let failures = actions
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let c = metrics.counter_with(
                    "myelin_safety_action_failures_total",
                    &[("action", a.kind()), ("index", &i.to_string())],
                );
                // Present from the start, so a dashboard shows 0 rather than nothing.
                c.absolute(0);
                c
            })
            .collect();
        if let Ok(mut s) = status.lock() {
            s.actions = actions
                .iter()
                .enumerate()
                .map(|(index, a)| ActionStatus {
                    index,
                    kind: a.kind(),
                    target: a.target(),
                    ..ActionStatus::default()
                })
                .collect();
        }
        let logged = Mutex::new(vec![None; actions.len()]);
        Reporter {
            status,
            failures,
            logged,
        }
    }

    fn update(&self, index: usize, f: impl FnOnce(&mut ActionStatus)) {
        if let Ok(mut s) = self.status.lock() {
            if let Some(a) = s.actions.get_mut(index) {
                f(a);
            }
        }
    }

    /// A new generation is handed to every action.
    fn desired(&self, generation: u64) {
        if let Ok(mut s) = self.status.lock() {
            s.generation = generation;
            for a in &mut s.actions {
                a.generation = generation;
                a.pending = true;
            }
        }
    }
}

impl actions::Report for Reporter {
    fn attempt(&self, index: usize, _generation: u64) {
        self.update(index, |a| a.attempts += 1);
    }

    fn applied(&self, index: usize, generation: u64, state: &str) {
        self.update(index, |a| {
            if a.applied_generation != Some(generation) {
                log(&format!(
                    "actions[{index}] ({} {}) applied {state} (generation {generation})",
                    a.kind, a.target
                ));
            }
            a.applied_generation = Some(generation);
            a.applied_state = Some(state.to_string());
            a.pending = a.generation > generation;
            a.failing = false;
        });
    }

    fn failed(&self, index: usize, generation: u64, error: String, retry_in: Duration) {
        if let Some(c) = self.failures.get(index) {
            c.increment(1);
        }
        let line = if retry_in.is_zero() {
            format!("actions[{index}] generation {generation}: {error}")
        } else {
            format!(
                "actions[{index}] generation {generation}: {error}; retrying in {:.1} s",
                retry_in.as_secs_f64()
            )
        };
        let log_now = self.logged.lock().is_ok_and(|mut l| {
            let now = Instant::now();
            match l.get_mut(index) {
                Some(last) if last.is_none_or(|t| now - t >= Duration::from_secs(1)) => {
                    *last = Some(now);
                    true
                }
                _ => false,
            }
        });
        if log_now {
            note_error(&self.status, line);
        }
        self.update(index, |a| {
            a.failing = true;
            a.failures += 1;
            a.last_error = Some(error);
            a.last_error_unix_ms = Some(unix_ms());
        });
    }
}

#[async_trait]
impl Plugin for Safety {
    fn name(&self) -> &str {
        "safety"
    }

    async fn start(&mut self, ctx: PluginContext) -> Result<(), PluginError> {
        let mesh = ctx.mesh();
        let known: Vec<String> = mesh.borrow().peers.iter().map(|p| p.name.clone()).collect();
        for name in &self.config.watch {
            if !known.contains(name) {
                return Err(config_error(format!(
                    "watch: no peer named `{name}` (peers: {}); fix the name in [plugins.safety].watch",
                    known.join(", ")
                )));
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
        let rearm = self.rearm_tx.clone();
        Some(
            Router::new()
                .route(
                    "/status",
                    get(move || {
                        let s = status.lock().map(|s| s.clone()).unwrap_or_default();
                        async move { Json(s) }
                    }),
                )
                .route("/rearm", post(move || rearm_request(rearm.clone())))
                .route("/panel", get(|| async { Html(PANEL) })),
        )
    }
}

async fn rearm_request(tx: Option<mpsc::Sender<RearmReply>>) -> impl IntoResponse {
    let refused =
        |code: StatusCode, error: String, hint: &str| myelin_sdk::error_response(code, error, hint);
    let Some(tx) = tx else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "the interlock is not running".into(),
            "enable the safety plugin",
        );
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    if tx.send(reply_tx).await.is_err() {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "the interlock is not running".into(),
            "restart the safety plugin",
        );
    }
    match reply_rx.await {
        Ok(Ok(())) => (
            StatusCode::OK,
            Json(
                serde_json::json!({ "state": "armed", "note": "motion is permitted; nothing was commanded" }),
            ),
        )
            .into_response(),
        Ok(Err(why)) => refused(
            StatusCode::CONFLICT,
            format!("re-arm refused: {why}"),
            "wait until the link to the watched peers is good, then re-arm",
        ),
        Err(_) => refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "the interlock stopped".into(),
            "restart the safety plugin",
        ),
    }
}

/// What the interlock loop drives besides the status.
struct Loop {
    restored: Restored,
    state_file: std::path::PathBuf,
    /// (generation, stopped) for the ROS actions.
    stopped: watch::Sender<(u64, bool)>,
    /// The newest notice for the command/http workers.
    desired: watch::Sender<Option<Notice>>,
    reporter: Arc<Reporter>,
}

/// Feeds the interlock with mesh views and its own deadlines, answers re-arm requests, saves
/// every transition, and hands each one to the actions as a new generation.
async fn interlock_loop(
    ctx: PluginContext,
    config: SafetyConfig,
    out: Loop,
    mut rearm: mpsc::Receiver<RearmReply>,
    status: Arc<Mutex<Status>>,
) {
    let cancel = ctx.cancellation();
    let mut mesh = ctx.mesh();
    let mut il = Interlock::new(
        config.settings(),
        &config.watch,
        Instant::now(),
        out.restored.rearm_required(),
    );
    let mut generation = out.restored.generation();
    // The trip that made a re-arm necessary, kept across restarts until the re-arm.
    let mut cause = out.restored.cause();
    let metrics = ctx.metrics();
    let state_gauge = metrics.gauge("myelin_safety_state");
    // Both reasons exist from the start, so a dashboard shows 0 rather than nothing.
    for reason in ["latency", "heartbeat"] {
        metrics
            .counter_with("myelin_safety_trips_total", &[("reason", reason)])
            .absolute(0);
    }
    let node = ctx.node().name.clone();
    log(&format!(
        "interlock started stopped, watching {} (max RTT {} ms × {}, heartbeat {} ms, clear below {} ms for {} s, latch {}{})",
        config.watch.join(", "),
        config.max_rtt_ms,
        config.trip_after,
        config.heartbeat_timeout_ms,
        config.clear_below_ms,
        config.clear_after_s,
        config.latch,
        if il.rearm_required() { ", re-arm required" } else { "" }
    ));
    // The start-up stop is the first transition; the loop below handles it before any wait.
    let mut woke = true;
    loop {
        if !woke {
            let deadline = il.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = mesh.changed() => {
                    if changed.is_err() { return }
                    let now = Instant::now();
                    let view = mesh.borrow_and_update().clone();
                    for name in &config.watch {
                        if let Some(peer) = view.peer(name) {
                            il.handle_probes(name, &peer.recent_probes, now);
                        }
                    }
                    il.handle_timeout(now);
                }
                // No deadline (nothing pending): wait for the mesh or a person only.
                _ = sleep_until(deadline) => il.handle_timeout(Instant::now()),
                Some(reply) = rearm.recv() => {
                    let result = il.rearm(Instant::now()).map_err(|e| e.to_string());
                    match &result {
                        Ok(()) => log("re-arm accepted: motion permitted"),
                        Err(e) => log(&format!("re-arm refused: {e}")),
                    }
                    let _ = reply.send(result);
                }
            }
        }
        woke = false;
        let now = Instant::now();
        let mut transitioned = false;
        let mut notices = Vec::new();
        while let Some(event) = il.poll_event() {
            transitioned = true;
            let notice = |generation, state: &'static str, reason: String, peer, rtt_ms| Notice {
                generation,
                node: node.clone(),
                state,
                reason,
                peer,
                rtt_ms,
                time_unix_ms: unix_ms(),
            };
            let notice = match event {
                Event::Stopped {
                    reason,
                    peer,
                    rtt_ms,
                } => {
                    if reason == interlock::Reason::Startup {
                        log("SAFE STOP: startup (motion is permitted once the link has been good for the clearing time)");
                    } else {
                        metrics
                            .counter_with(
                                "myelin_safety_trips_total",
                                &[("reason", reason.as_str())],
                            )
                            .increment(1);
                        log(&format!(
                            "SAFE STOP: {} on the link to {}{}",
                            reason.as_str(),
                            peer.as_deref().unwrap_or("?"),
                            rtt_ms
                                .map(|r| format!(", probe {r:.0} ms"))
                                .unwrap_or_default()
                        ));
                        if let Ok(mut s) = status.lock() {
                            s.trips += 1;
                        }
                    }
                    generation += 1;
                    notice(generation, "stopped", reason.as_str().into(), peer, rtt_ms)
                }
                Event::Cleared { rearmed } => {
                    let reason = if rearmed { "rearmed" } else { "cleared" };
                    log(&format!("safe stop ended ({reason}): motion permitted"));
                    generation += 1;
                    notice(generation, "armed", reason.into(), None, None)
                }
                Event::State(state) => {
                    state_gauge.set(state.code());
                    log(&format!("interlock state: {state:?}"));
                    if let Ok(mut s) = status.lock() {
                        s.since_unix_ms = unix_ms();
                    }
                    continue;
                }
            };
            notices.push(notice);
        }
        // Saved before any action applies it, so a crash right after never forgets it.
        if transitioned {
            if let Some((reason, peer)) = notices.iter().rev().find_map(|n| {
                (n.state == "stopped" && n.reason != "startup")
                    .then(|| (n.reason.clone(), n.peer.clone()))
            }) {
                cause = Some(persist::Cause {
                    reason,
                    peer,
                    since_unix_ms: unix_ms(),
                });
            }
            if !il.rearm_required() {
                cause = None;
            }
            save(&out, &il, generation, cause.clone(), &status).await;
        }
        for notice in notices {
            // Marked pending before any action can report it applied.
            out.reporter.desired(notice.generation);
            out.stopped
                .send_replace((notice.generation, notice.state == "stopped"));
            out.desired.send_replace(Some(notice));
        }
        if let Ok(mut s) = status.lock() {
            s.state = Some(il.state());
            s.stopped = il.state().stopped();
            s.rearm_required = il.rearm_required();
            let trip = il.trip().cloned();
            s.reason = trip.as_ref().map(|t| t.0.as_str().to_string());
            s.peer = trip.as_ref().and_then(|t| t.1.clone());
            s.rtt_ms = trip.and_then(|t| t.2);
            s.links = il.links(now);
        }
    }
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Writes the interlock's state to its file (off the async threads: an fsync on an SD card can
/// take long); a failure is logged and shown in the status (the interlock goes on: a stop is
/// still a stop).
async fn save(
    out: &Loop,
    il: &Interlock,
    generation: u64,
    cause: Option<persist::Cause>,
    status: &Mutex<Status>,
) {
    let trip = il.trip();
    let saved = Saved::new(
        il.state(),
        trip.map(|t| t.0.as_str().to_string()),
        trip.and_then(|t| t.1.clone()),
        il.rearm_required(),
        generation,
        unix_ms(),
        cause.clone(),
    );
    let path = out.state_file.clone();
    let result = match tokio::task::spawn_blocking(move || persist::store(&path, &saved)).await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e.to_string())),
    };
    if let Err(e) = &result {
        log(&format!(
            "cannot save the interlock state to {}: {e}; a restart now would not know it (fix: make [plugins].state_dir writable)",
            out.state_file.display()
        ));
    }
    if let Ok(mut s) = status.lock() {
        s.state_file_error = result.err().map(|e| e.to_string());
        s.rearm_cause = cause;
    }
}

const PANEL: &str = r##"<!doctype html><meta charset="utf-8"><body style="font:13px system-ui;margin:8px">
<p style="margin:0 0 6px"><b id="state">…</b> <span id="why"></span></p>
<button id="rearm" disabled>Re-arm (permit motion)</button> <span id="answer"></span>
<table id="links" style="margin-top:6px;border-collapse:collapse"><tbody></tbody></table>
<table id="actions" style="margin-top:6px;border-collapse:collapse"><tbody></tbody></table>
<p id="save" style="color:#cf222e;margin:4px 0 0"></p>
<p style="color:#666;margin:6px 0 0">Re-arming only permits motion; it never commands it. A supplementary measure, not a certified safety function.</p>
<script>
const call = (id, method, path) => parent.postMessage({ myelin: "call", id, method, path }, "*");
const colors = { armed: "#1a7f37", tripped: "#cf222e", clearing: "#bf8700", latched: "#cf222e" };
addEventListener("message", (e) => {
  if (!e.data || e.data.myelin !== "reply") return;
  if (e.data.id === 2) {
    let text = e.data.body;
    try { const b = JSON.parse(text); text = b.error || b.note || text; } catch (_) {}
    document.getElementById("answer").textContent = text;
    call(1, "GET", "status");
    return;
  }
  if (e.data.status !== 200) return;
  const s = JSON.parse(e.data.body);
  const st = document.getElementById("state");
  st.textContent = s.stopped ? "SAFE STOP (" + s.state + ")" : "armed";
  st.style.color = colors[s.state] || "";
  const why = s.reason ? s.reason + (s.peer ? " on " + s.peer : "") + (s.rtt_ms ? ", " + Math.round(s.rtt_ms) + " ms" : "") + " · " : "";
  document.getElementById("why").textContent = why + "trips: " + s.trips + (s.rearm_required ? " · re-arm required" : "");
  document.getElementById("rearm").disabled = s.state === "armed";
  const rows = (sel, list) => {
    const tb = document.querySelector(sel + " tbody");
    tb.replaceChildren();
    for (const cells of list) {
      const tr = document.createElement("tr");
      for (const [v, color] of cells) {
        const td = document.createElement("td"); td.textContent = v; td.style.paddingRight = "12px";
        if (color) td.style.color = color;
        tr.appendChild(td);
      }
      tb.appendChild(tr);
    }
  };
  rows("#links", s.links.map((l) => [[l.peer], [l.rtt_ms == null ? "no RTT" : l.rtt_ms.toFixed(1) + " ms"], ["last answer " + Math.round(l.since_answer_ms) + " ms ago"], [l.good_for_s == null ? "" : "good for " + l.good_for_s.toFixed(1) + " s"]]));
  rows("#actions", (s.actions || []).map((a) => [
    [a.kind + " " + a.target],
    [a.pending ? "applying #" + a.generation : "applied " + (a.applied_state || "—") + " #" + (a.applied_generation ?? "—"), a.pending ? "#bf8700" : ""],
    [a.failures ? a.failures + " failures" : "no failures", a.failures ? "#cf222e" : ""],
    [a.last_error ? "last: " + a.last_error : ""],
  ]));
  document.getElementById("save").textContent = s.state_file_error ? "cannot save state to " + s.state_file + ": " + s.state_file_error : "";
});
document.getElementById("rearm").onclick = () => call(2, "POST", "rearm");
call(1, "GET", "status");
setInterval(() => call(1, "GET", "status"), 1000);
</script>"##;

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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SafetyConfig, String> {
        SafetyConfig::parse(&myelin_sdk::toml::from_str(text).unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_documented_section_parses() {
        let c = parse(
            r#"
            watch = ["operator"]
            max_rtt_ms = 200
            trip_after = 3
            heartbeat_timeout_ms = 500
            clear_below_ms = 150
            clear_after_s = 5
            latch = true
            [[actions]]
            kind = "command"
            argv = ["/usr/local/bin/brake", "--engage"]
            [[actions]]
            kind = "http"
            url = "http://10.77.0.1:8080/safety"
            "#,
        )
        .unwrap();
        assert_eq!(c.actions.len(), 2);
        assert_eq!(c.settings().clear_after, Duration::from_secs(5));
    }

    #[test]
    fn bad_sections_name_the_key_and_the_fix() {
        for (text, needle) in [
            ("watch = []", "watch"),
            ("watch = [\"op\"]\nclear_below_ms = 300", "clear_below_ms"),
            ("watch = [\"op\"]\ntrip_after = 0", "trip_after"),
            (
                "watch = [\"op\"]\n[[actions]]\nkind = \"command\"\nargv = []",
                "argv",
            ),
            (
                "watch = [\"op\"]\n[[actions]]\nkind = \"http\"\nurl = \"https://x\"",
                "http://",
            ),
            (
                "watch = [\"op\"]\n[[actions]]\nkind = \"ros_lock\"\ntopic = \"e_stop\"",
                "topic",
            ),
            ("watch = [\"op\"]\n[[actions]]\nkind = \"beep\"", "beep"),
            (
                "watch = [\"op\"]\n[[actions]]\nkind = \"command\"\nargv = [\"x\"]\nretries = 2",
                "retries",
            ),
            ("watch = [\"op\"]\nmax_rtt = 1", "max_rtt"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn ros_actions_need_robotics_mode() {
        let r = parse("watch = [\"op\"]\n[[actions]]\nkind = \"ros_lock\"\ntopic = \"/e_stop\"");
        if cfg!(feature = "ros") {
            assert!(r.is_ok(), "{r:?}");
        } else {
            assert!(r.unwrap_err().contains("--features zenoh"));
        }
    }
}
