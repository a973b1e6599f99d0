//! The safety interlock: watches the probes to the operator's node(s) and, when the link is too
//! slow or silent, triggers a latched safe stop on the robot through its actions. A person
//! re-arms it once the link is good again; re-arming only permits motion, it never commands it.
//!
//! This is a supplementary measure, not a certified safety function (docs/safety.md).

mod actions;
mod interlock;
#[cfg(feature = "ros")]
mod ros;

use actions::{ActionConfig, Notice};
use interlock::{Event, Interlock, Settings, State};
use myelin_sdk::axum::{
    http::StatusCode, response::Html, response::IntoResponse, routing::get, routing::post, Json,
    Router,
};
use myelin_sdk::{async_trait, Health, Plugin, PluginContext, PluginError, Registration};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
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

fn config_error(message: impl Into<String>) -> PluginError {
    PluginError::Config {
        message: message.into(),
    }
}

impl SafetyConfig {
    fn parse(section: &myelin_sdk::toml::Table) -> Result<Self, PluginError> {
        let c: SafetyConfig = myelin_sdk::parse_section(section)?;
        if c.watch.is_empty() {
            return Err(config_error(
                "watch is empty: name the peers whose link guards motion, e.g. watch = [\"operator\"]",
            ));
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
    /// Problems with actions (a failed command, an unreachable router), newest last.
    action_errors: Vec<String>,
    ros_connected: Option<bool>,
}

type RearmReply = oneshot::Sender<Result<(), String>>;

struct Safety {
    config: SafetyConfig,
    ctx: Option<PluginContext>,
    status: Arc<Mutex<Status>>,
    rearm_tx: Option<mpsc::Sender<RearmReply>>,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn log(line: &str) {
    // A plugin child's stderr goes into the node's log, tagged with the plugin name.
    eprintln!("{line}");
}

fn note_error(status: &Mutex<Status>, error: String) {
    log(&format!("action failed: {error}"));
    if let Ok(mut s) = status.lock() {
        s.action_errors.push(error);
        let excess = s.action_errors.len().saturating_sub(10);
        s.action_errors.drain(..excess);
    }
}

#[async_trait]
impl Plugin for Safety {
    fn name(&self) -> &str {
        "safety"
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
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let (rearm_tx, rearm_rx) = mpsc::channel(4);
        self.rearm_tx = Some(rearm_tx);
        if let Ok(mut s) = self.status.lock() {
            s.state = Some(State::Armed);
            s.latch = self.config.latch;
            s.since_unix_ms = unix_ms();
        }
        let ros_actions: Vec<ActionConfig> = self
            .config
            .actions
            .iter()
            .filter(|a| a.is_ros())
            .cloned()
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
                    self.status.clone(),
                    ctx.cancellation(),
                ));
            }
        }
        drop(stopped_rx);
        tokio::spawn(interlock_loop(
            ctx,
            self.config.clone(),
            stopped_tx,
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
        if s.stopped {
            return Health::Degraded {
                reason: format!(
                    "safe stop active ({}), {}",
                    s.reason.as_deref().unwrap_or("tripped"),
                    match s.state {
                        Some(State::Latched) => "link good: re-arm to permit motion",
                        Some(State::Clearing) => "link good, clearing",
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
    let refused = |code: StatusCode, error: String, hint: &str| {
        (
            code,
            Json(serde_json::json!({ "error": error, "hint": hint })),
        )
    };
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
        ),
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

/// Feeds the interlock with mesh views and its own deadlines, answers re-arm requests, and
/// carries out what it decides.
async fn interlock_loop(
    ctx: PluginContext,
    config: SafetyConfig,
    stopped: watch::Sender<bool>,
    mut rearm: mpsc::Receiver<RearmReply>,
    status: Arc<Mutex<Status>>,
) {
    let cancel = ctx.cancellation();
    let mut mesh = ctx.mesh();
    let mut il = Interlock::new(config.settings(), &config.watch, Instant::now());
    let metrics = ctx.metrics();
    let state_gauge = metrics.gauge("myelin_safety_state");
    state_gauge.set(State::Armed.code());
    // Both reasons exist from the start, so a dashboard shows 0 rather than nothing.
    for reason in ["latency", "heartbeat"] {
        metrics
            .counter_with("myelin_safety_trips_total", &[("reason", reason)])
            .absolute(0);
    }
    let node = ctx.node().name.clone();
    log(&format!(
        "interlock armed, watching {} (max RTT {} ms × {}, heartbeat {} ms, clear below {} ms for {} s, latch {})",
        config.watch.join(", "),
        config.max_rtt_ms,
        config.trip_after,
        config.heartbeat_timeout_ms,
        config.clear_below_ms,
        config.clear_after_s,
        config.latch
    ));
    loop {
        let deadline = il
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
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
            _ = tokio::time::sleep_until(deadline) => il.handle_timeout(Instant::now()),
            Some(reply) = rearm.recv() => {
                let result = il.rearm(Instant::now()).map_err(|e| e.to_string());
                match &result {
                    Ok(()) => log("re-arm accepted: motion permitted"),
                    Err(e) => log(&format!("re-arm refused: {e}")),
                }
                let _ = reply.send(result);
            }
        }
        let now = Instant::now();
        while let Some(event) = il.poll_event() {
            let notice = |state: &'static str, reason: String, peer, rtt_ms| Notice {
                node: node.clone(),
                state,
                reason,
                peer,
                rtt_ms,
                time_unix_ms: unix_ms(),
            };
            match event {
                Event::Tripped {
                    reason,
                    peer,
                    rtt_ms,
                } => {
                    stopped.send_replace(true);
                    metrics
                        .counter_with("myelin_safety_trips_total", &[("reason", reason.as_str())])
                        .increment(1);
                    log(&format!(
                        "SAFE STOP: {} on the link to {peer}{}",
                        reason.as_str(),
                        rtt_ms
                            .map(|r| format!(", probe {r:.0} ms"))
                            .unwrap_or_default()
                    ));
                    if let Ok(mut s) = status.lock() {
                        s.trips += 1;
                    }
                    dispatch(
                        &config.actions,
                        notice("stopped", reason.as_str().into(), Some(peer), rtt_ms),
                        &status,
                    );
                }
                Event::Cleared { rearmed } => {
                    stopped.send_replace(false);
                    let reason = if rearmed { "rearmed" } else { "cleared" };
                    log(&format!("safe stop ended ({reason}): motion permitted"));
                    dispatch(
                        &config.actions,
                        notice("armed", reason.into(), None, None),
                        &status,
                    );
                }
                Event::State(state) => {
                    state_gauge.set(state.code());
                    log(&format!("interlock state: {state:?}"));
                    if let Ok(mut s) = status.lock() {
                        s.since_unix_ms = unix_ms();
                    }
                }
            }
        }
        if let Ok(mut s) = status.lock() {
            s.state = Some(il.state());
            s.stopped = il.state().stopped();
            let trip = il.trip().cloned();
            s.reason = trip.as_ref().map(|t| t.0.as_str().to_string());
            s.peer = trip.as_ref().map(|t| t.1.clone());
            s.rtt_ms = trip.and_then(|t| t.2);
            s.links = il.links(now);
        }
    }
}

/// Runs the one-shot actions (command, http) for a trip or a clear, each on its own task with
/// its own timeout, so a slow one never delays the others or the interlock.
fn dispatch(actions: &[ActionConfig], notice: Notice, status: &Arc<Mutex<Status>>) {
    for action in actions {
        let timeout = action.timeout();
        let notice = notice.clone();
        let status = status.clone();
        match action.clone() {
            ActionConfig::Command { argv, .. } => {
                tokio::spawn(async move {
                    if let Err(e) = actions::run_command(&argv, &notice, timeout).await {
                        note_error(&status, format!("command: {e}"));
                    }
                });
            }
            ActionConfig::Http { url, .. } => {
                tokio::spawn(async move {
                    if let Err(e) = actions::post(&url, &notice, timeout).await {
                        note_error(&status, format!("http {url}: {e}"));
                    }
                });
            }
            // Published continuously by the ROS task, following the stop state.
            ActionConfig::RosLock { .. } | ActionConfig::RosZeroTwist { .. } => {}
        }
    }
}

const PANEL: &str = r##"<!doctype html><meta charset="utf-8"><body style="font:13px system-ui;margin:8px">
<p style="margin:0 0 6px"><b id="state">…</b> <span id="why"></span></p>
<button id="rearm" disabled>Re-arm (permit motion)</button> <span id="answer"></span>
<table id="links" style="margin-top:6px;border-collapse:collapse"><tbody></tbody></table>
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
  document.getElementById("why").textContent = s.reason ? s.reason + " on " + s.peer + (s.rtt_ms ? ", " + Math.round(s.rtt_ms) + " ms" : "") + " · trips: " + s.trips : "trips: " + s.trips;
  document.getElementById("rearm").disabled = s.state === "armed";
  const tb = document.querySelector("#links tbody");
  tb.replaceChildren();
  for (const l of s.links) {
    const tr = document.createElement("tr");
    for (const v of [l.peer, l.rtt_ms == null ? "no RTT" : l.rtt_ms.toFixed(1) + " ms", "last answer " + Math.round(l.since_answer_ms) + " ms ago", l.good_for_s == null ? "" : "good for " + l.good_for_s.toFixed(1) + " s"]) {
      const td = document.createElement("td"); td.textContent = v; td.style.paddingRight = "12px"; tr.appendChild(td);
    }
    tb.appendChild(tr);
  }
});
document.getElementById("rearm").onclick = () => call(2, "POST", "rearm");
call(1, "GET", "status");
setInterval(() => call(1, "GET", "status"), 1000);
</script>"##;

fn build(section: &myelin_sdk::toml::Table) -> Result<Box<dyn Plugin>, PluginError> {
    let config = SafetyConfig::parse(section)?;
    Ok(Box::new(Safety {
        config,
        ctx: None,
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
