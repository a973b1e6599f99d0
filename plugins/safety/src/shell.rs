//! The interlock's I/O shell: the task that feeds `Interlock` mesh views, its own deadlines and
//! re-arm requests, saves every transition and hands each to the actions; and the re-arm route.

use crate::actions::Notice;
use crate::config::SafetyConfig;
use crate::interlock::{self, Event, Interlock};
use crate::persist::{self, Restored, Saved};
use crate::status::{Reporter, Status};
use myelin_sdk::axum::{http::StatusCode, response::IntoResponse, Json};
use myelin_sdk::{log, unix_ms, Caller, PluginContext, Via};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};

/// Where a re-arm's outcome goes.
pub type RearmReply = oneshot::Sender<Result<(), String>>;

/// A person's re-arm: who asked (for the log and the status), and where the answer goes.
pub struct RearmRequest {
    pub by: String,
    pub reply: RearmReply,
}

/// What the interlock loop drives besides the status.
pub struct Loop {
    pub restored: Restored,
    pub state_file: std::path::PathBuf,
    /// (generation, stopped) for the ROS actions.
    pub stopped: watch::Sender<(u64, bool)>,
    /// The newest notice for the command/http workers.
    pub desired: watch::Sender<Option<Notice>>,
    pub reporter: Arc<Reporter>,
}

/// Feeds the interlock with mesh views and its own deadlines, answers re-arm requests, saves
/// every transition, and hands each one to the actions as a new generation.
pub async fn interlock_loop(
    ctx: PluginContext,
    config: SafetyConfig,
    out: Loop,
    mut rearm: mpsc::Receiver<RearmRequest>,
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
    // A re-arm's answer goes out once the status and the state file show its outcome, so
    // whoever asked reads the new state right after.
    let mut answer: Option<(RearmReply, Result<(), String>)> = None;
    loop {
        if let Some((reply, result)) = answer.take() {
            let _ = reply.send(result);
        }
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
                Some(RearmRequest { by, reply }) = rearm.recv() => {
                    let result = il.rearm(Instant::now()).map_err(|e| e.to_string());
                    match &result {
                        Ok(()) => {
                            log(&format!("re-arm by {by} accepted: motion permitted"));
                            if let Ok(mut s) = status.lock() {
                                s.last_rearm = Some(crate::status::Rearm { by, at_unix_ms: unix_ms() });
                            }
                        }
                        Err(e) => log(&format!("re-arm by {by} refused: {e}")),
                    }
                    answer = Some((reply, result));
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

/// `POST /rearm`. Through the tunnel, only members of `groups` may re-arm (their
/// certificates say so); on this machine, or with the node's API token, anyone who got that
/// far may. A request without the node's caller header reached the plugin's socket on this
/// machine, so it counts as local.
pub async fn rearm_request(
    tx: Option<mpsc::Sender<RearmRequest>>,
    groups: Arc<Vec<String>>,
    headers: myelin_sdk::axum::http::HeaderMap,
) -> impl IntoResponse {
    let refused =
        |code: StatusCode, error: String, hint: &str| myelin_sdk::error_response(code, error, hint);
    let sent = headers.contains_key(myelin_sdk::CALLER_HEADER);
    let caller = match (sent, Caller::from_headers(&headers)) {
        (_, Some(caller)) => caller,
        (false, None) => Caller::local(),
        (true, None) => {
            return refused(
                StatusCode::BAD_REQUEST,
                "re-arm refused: the caller header does not parse".into(),
                "re-arm through the node's API, which sets it",
            )
        }
    };
    if caller.via == Via::Mesh && !caller.in_any_group(&groups) {
        log(&format!(
            "re-arm by {} refused: not in group {}",
            caller.describe(),
            groups.join(" or ")
        ));
        return refused(
            StatusCode::FORBIDDEN,
            format!(
                "re-arm refused: {} is not in group {}",
                caller.describe(),
                groups.join(" or ")
            ),
            "re-arm from a member of those groups (their certificates decide), or on the robot itself; [plugins.safety].rearm_groups sets them",
        );
    }
    let Some(tx) = tx else {
        return refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "the interlock is not running".into(),
            "enable the safety plugin",
        );
    };
    let (reply_tx, reply_rx) = oneshot::channel();
    let request = RearmRequest {
        by: caller.describe(),
        reply: reply_tx,
    };
    if tx.send(request).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use myelin_sdk::axum::http::HeaderMap;
    use myelin_sdk::CALLER_HEADER;

    fn from(caller: &Caller) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CALLER_HEADER, caller.to_header().parse().unwrap());
        h
    }

    fn member(name: &str, group: &str) -> Caller {
        Caller {
            via: Via::Mesh,
            name: Some(name.into()),
            address: "10.77.0.9".parse().ok(),
            groups: vec![group.into()],
        }
    }

    /// Answers every re-arm with Ok and hands back who asked.
    fn interlock() -> (mpsc::Sender<RearmRequest>, mpsc::Receiver<RearmRequest>) {
        mpsc::channel(4)
    }

    #[tokio::test]
    async fn only_operators_rearm_through_the_tunnel_and_the_loop_learns_who() {
        let groups = Arc::new(vec!["operators".to_string()]);
        let (tx, mut rx) = interlock();
        let robot = rearm_request(
            Some(tx.clone()),
            groups.clone(),
            from(&member("robot2", "robots")),
        )
        .await
        .into_response();
        assert_eq!(robot.status(), StatusCode::FORBIDDEN);
        assert!(
            rx.try_recv().is_err(),
            "a refused caller never reaches the interlock"
        );

        for (headers, who) in [
            (
                from(&member("operator", "operators")),
                "operator (10.77.0.9, groups operators)",
            ),
            (HeaderMap::new(), "a local client of the node's API"),
        ] {
            let answer = tokio::spawn(rearm_request(Some(tx.clone()), groups.clone(), headers));
            let request = rx.recv().await.unwrap();
            assert_eq!(request.by, who);
            request.reply.send(Ok(())).unwrap();
            assert_eq!(
                answer.await.unwrap().into_response().status(),
                StatusCode::OK
            );
        }
    }
}
