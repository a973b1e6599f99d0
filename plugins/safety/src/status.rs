//! What `GET /status` answers, and the reporter through which the actions' progress reaches it,
//! the log and the metrics.

use crate::actions::{self, ActionConfig, ActionStatus};
use crate::interlock::{self, State};
use crate::persist;
use myelin_sdk::{log, unix_ms};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `GET /status` answers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub state: Option<State>,
    pub stopped: bool,
    pub reason: Option<String>,
    pub peer: Option<String>,
    pub rtt_ms: Option<f64>,
    /// Unix milliseconds of the latest state change.
    pub since_unix_ms: u128,
    pub trips: u64,
    pub links: Vec<interlock::LinkStatus>,
    pub latch: bool,
    /// Whether the current stop ends only with a re-arm.
    pub rearm_required: bool,
    /// The trip that made the re-arm necessary (kept across restarts).
    pub rearm_cause: Option<persist::Cause>,
    /// The last accepted re-arm: who and when.
    pub last_rearm: Option<Rearm>,
    /// The newest transition's generation; every action applies only this one.
    pub generation: u64,
    /// Each action: what it applied, whether it is still applying, its failures.
    pub actions: Vec<ActionStatus>,
    /// Problems with actions (a failed command, an unreachable router), newest last.
    pub action_errors: Vec<String>,
    /// Where the state is saved, and why saving it failed last (none once it works again).
    pub state_file: String,
    pub state_file_error: Option<String>,
    pub ros_connected: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Rearm {
    /// The caller as the node identified it, e.g. "operator (10.77.0.1, groups operators)".
    pub by: String,
    pub at_unix_ms: u128,
}

/// What the fleet page shows of the interlock (`GET /summary`): its state, why and since when,
/// and the last re-arm.
pub fn summary(s: &Status) -> serde_json::Value {
    serde_json::json!({
        "kind": "safety",
        "state": s.state,
        "stopped": s.stopped,
        "reason": s.reason,
        "peer": s.peer,
        "rtt_ms": s.rtt_ms,
        "since_unix_ms": s.since_unix_ms,
        "trips": s.trips,
        "rearm_required": s.rearm_required,
        "last_rearm": s.last_rearm,
        "failing_actions": s.actions.iter().filter(|a| a.failing).count(),
    })
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
pub struct Reporter {
    status: Arc<Mutex<Status>>,
    failures: Vec<myelin_sdk::metrics::Counter>,
    /// When each action's failure was last logged: a ROS put failing at 10 Hz logs once a second.
    logged: Mutex<Vec<Option<Instant>>>,
}

impl Reporter {
    pub fn new(
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
    pub fn desired(&self, generation: u64) {
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
