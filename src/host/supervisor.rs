//! One supervisor task per plugin instance: runs it, checks its health against a deadline,
//! kills it on failure (SIGTERM, grace, SIGKILL; threads: cancel, grace, abandon) and restarts
//! it with backoff until the restart policy gives up.

use super::policy::{Decision, RestartPolicy};
use super::protocol::{HostMsg, Init, PluginMsg};
use super::worker::{self, Worker, WorkerEvent};
use super::{Action, ActionRequest, FailureRecord, PluginState, PluginStatus, SupervisorShared};
use crate::config::{Isolation, PluginInstanceConfig};
use myelin_sdk::Health;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

const MAX_FAILURE_RECORDS: usize = 20;

pub(crate) struct Supervisor {
    inst: PluginInstanceConfig,
    shared: Arc<SupervisorShared>,
    status: watch::Sender<PluginStatus>,
    commands: mpsc::Receiver<ActionRequest>,
    policy: RestartPolicy,
    seq: u64,
}

enum RunEnd {
    Failed(String),
    Command(Option<ActionRequest>),
}

impl Supervisor {
    pub fn new(
        inst: PluginInstanceConfig,
        shared: Arc<SupervisorShared>,
        status: watch::Sender<PluginStatus>,
        commands: mpsc::Receiver<ActionRequest>,
    ) -> Self {
        let s = &shared.settings;
        let policy = RestartPolicy::new(
            Duration::from_millis(s.restart_backoff_ms),
            Duration::from_millis(s.restart_backoff_max_ms),
            s.failure_threshold,
            Duration::from_secs(s.failure_window_s),
        );
        let sup = Self {
            inst,
            shared,
            status,
            commands,
            policy,
            seq: 0,
        };
        let initial = sup.status.borrow().state;
        sup.set_state(initial);
        sup
    }

    fn update(&self, f: impl FnOnce(&mut PluginStatus)) {
        self.status.send_modify(f);
        self.shared.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn set_state(&self, state: PluginState) {
        self.update(|s| {
            s.state = state;
            if state != PluginState::Restarting {
                s.next_restart_in_ms = None;
            }
            if !matches!(state, PluginState::Running | PluginState::Starting) {
                s.pid = None;
            }
        });
        let plugin = self.inst.name.clone();
        metrics::gauge!("myelin_plugin_up", "plugin" => plugin.clone()).set(
            if state == PluginState::Running {
                1.0
            } else {
                0.0
            },
        );
        for st in PluginState::ALL {
            metrics::gauge!("myelin_plugin_state", "plugin" => plugin.clone(), "state" => st.as_str())
                .set(if st == state { 1.0 } else { 0.0 });
        }
    }

    fn ms_since_epoch(&self) -> u64 {
        self.shared.epoch.elapsed().as_millis() as u64
    }

    pub async fn run(mut self) {
        let mut pending: Option<ActionRequest> = None;
        let mut enabled = self.inst.enabled;
        loop {
            if let Some(cmd) = pending.take() {
                match cmd.action {
                    Action::Shutdown => {
                        self.set_state(PluginState::Stopped);
                        let _ = cmd.ack.send(());
                        return;
                    }
                    Action::Disable => enabled = false,
                    Action::Enable | Action::Restart => {
                        enabled = true;
                        self.policy.reset();
                    }
                }
                self.update(|s| s.enabled = enabled);
                let ack = cmd.ack;
                if !enabled {
                    self.set_state(PluginState::Disabled);
                    let _ = ack.send(());
                    pending = self.commands.recv().await.or_else(shutdown_without_ack);
                    continue;
                }
                // Acknowledge once the new run has started (or failed to).
                match self.run_once(Some(ack)).await {
                    RunEnd::Command(c) => pending = c.or_else(shutdown_without_ack),
                    RunEnd::Failed(reason) => pending = self.after_failure(reason).await,
                }
                continue;
            }
            if !enabled {
                self.set_state(PluginState::Disabled);
                pending = self.commands.recv().await.or_else(shutdown_without_ack);
                continue;
            }
            match self.run_once(None).await {
                RunEnd::Command(c) => pending = c.or_else(shutdown_without_ack),
                RunEnd::Failed(reason) => pending = self.after_failure(reason).await,
            }
        }
    }

    /// Records a failure, then waits out the backoff (or stays failed) unless a command comes.
    async fn after_failure(&mut self, reason: String) -> Option<ActionRequest> {
        let decision = self.policy.on_failure(Instant::now());
        let restart_after = match decision {
            Decision::RestartAfter(d) => Some(d),
            Decision::GiveUp => None,
        };
        tracing::warn!(plugin = %self.inst.name, "plugin failed: {reason}; {}", match restart_after {
            Some(d) => format!("restarting in {} ms", d.as_millis()),
            None => format!("{} failures within {} s: marked failed until re-enabled", self.shared.settings.failure_threshold, self.shared.settings.failure_window_s),
        });
        let at_ms = self.ms_since_epoch();
        self.update(|s| {
            s.failures.push(FailureRecord {
                at_ms,
                reason,
                restart_after_ms: restart_after.map(|d| d.as_millis() as u64),
            });
            if s.failures.len() > MAX_FAILURE_RECORDS {
                s.failures.remove(0);
            }
        });
        match restart_after {
            Some(delay) => {
                self.set_state(PluginState::Restarting);
                self.update(|s| s.next_restart_in_ms = Some(delay.as_millis() as u64));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {
                        self.update(|s| s.restarts += 1);
                        metrics::counter!("myelin_plugin_restarts_total", "plugin" => self.inst.name.clone()).increment(1);
                        None
                    }
                    cmd = self.commands.recv() => cmd.or_else(shutdown_without_ack),
                }
            }
            None => {
                self.set_state(PluginState::Failed);
                self.commands.recv().await.or_else(shutdown_without_ack)
            }
        }
    }

    fn init(&self) -> Init {
        Init {
            node: self.shared.node.clone(),
            instance: self.inst.name.clone(),
            kind: self.inst.kind.clone(),
            config_toml: toml::to_string(&self.inst.section).unwrap_or_default(),
            http_socket: super::http_socket(&self.shared.settings, &self.inst.name),
            state_dir: self.shared.settings.state_dir.join(&self.inst.name),
            worker_threads: self.inst.worker_threads,
            mesh: self.shared.mesh.every.borrow().view.clone(),
        }
    }

    /// One run of the plugin, from spawn until it fails or a command ends it.
    async fn run_once(&mut self, mut ack: Option<tokio::sync::oneshot::Sender<()>>) -> RunEnd {
        let settings = self.shared.settings.clone();
        self.set_state(PluginState::Starting);
        self.update(|s| {
            s.health = None;
            s.serves_http = false;
        });
        let spawned = match self.inst.isolation {
            Isolation::Process => worker::spawn_process(self.init(), self.shared.run_as).await,
            Isolation::Thread => worker::spawn_thread(self.init()),
        };
        let mut worker = match spawned {
            Ok(w) => w,
            Err(e) => {
                if let Some(a) = ack.take() {
                    let _ = a.send(());
                }
                return RunEnd::Failed(format!("cannot start: {e}"));
            }
        };
        self.update(|s| s.pid = worker.pid());
        let start_deadline =
            tokio::time::Instant::now() + Duration::from_millis(settings.start_timeout_ms);
        let ready = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(start_deadline) => {
                    break Err(format!("did not start within {} ms", settings.start_timeout_ms));
                }
                ev = worker.events.recv() => match ev {
                    Some(WorkerEvent::Msg(PluginMsg::Ready { http })) => break Ok(http),
                    Some(WorkerEvent::Msg(PluginMsg::Failed { reason })) => break Err(reason),
                    Some(WorkerEvent::Msg(PluginMsg::Metrics(m))) => super::metrics_bridge::apply(&m),
                    Some(WorkerEvent::Msg(_)) => {}
                    Some(WorkerEvent::Exited(how)) => break Err(format!("{how} while starting")),
                    None => break Err("plugin channel closed while starting".into()),
                },
                cmd = self.commands.recv() => match cmd {
                    Some(c) if c.action == Action::Enable => { let _ = c.ack.send(()); }
                    other => {
                        self.stop_gracefully(&mut worker).await;
                        if let Some(a) = ack.take() { let _ = a.send(()); }
                        return RunEnd::Command(other);
                    }
                }
            }
        };
        if let Some(a) = ack.take() {
            let _ = a.send(());
        }
        let http = match ready {
            Ok(http) => http,
            Err(reason) => {
                self.kill(&mut worker).await;
                return RunEnd::Failed(reason);
            }
        };
        self.set_state(PluginState::Running);
        self.update(|s| s.serves_http = http);
        tracing::info!(plugin = %self.inst.name, pid = ?worker.pid(), "plugin running");

        let interval = Duration::from_millis(settings.health_interval_ms);
        let timeout = Duration::from_millis(settings.health_timeout_ms);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut outstanding: Option<(u64, tokio::time::Instant)> = None;
        // Threads share the view without encoding it, so they take every one.
        let every_probe = myelin_sdk::registration(&self.inst.kind)
            .is_none_or(|r| r.mesh_every_probe)
            || worker.is_thread();
        let mut mesh = if every_probe {
            self.shared.mesh.every.clone()
        } else {
            self.shared.mesh.paced.clone()
        };
        mesh.mark_unchanged();
        let failure = loop {
            let deadline = outstanding
                .map(|(_, at)| at + timeout)
                .unwrap_or_else(|| tokio::time::Instant::now() + timeout);
            tokio::select! {
                _ = tick.tick(), if outstanding.is_none() => {
                    self.seq += 1;
                    worker.send(HostMsg::Ping { seq: self.seq });
                    outstanding = Some((self.seq, tokio::time::Instant::now()));
                }
                _ = tokio::time::sleep_until(deadline), if outstanding.is_some() => {
                    self.update(|s| s.health_checks_missed += 1);
                    metrics::counter!("myelin_plugin_health_missed_total", "plugin" => self.inst.name.clone()).increment(1);
                    break format!("missed its health deadline (no answer within {} ms)", settings.health_timeout_ms);
                }
                ev = worker.events.recv() => match ev {
                    Some(WorkerEvent::Msg(PluginMsg::Pong { seq, health })) => {
                        let Some((want, sent)) = outstanding else { continue };
                        if seq != want { continue }
                        outstanding = None;
                        let rtt = sent.elapsed().as_secs_f64() * 1000.0;
                        self.update(|s| {
                            s.health_checks_ok += 1;
                            s.last_health_rtt_ms = Some(rtt);
                            s.health = Some(health.clone());
                        });
                        if let Health::Unhealthy { reason } = health {
                            break format!("reported unhealthy: {reason}");
                        }
                    }
                    Some(WorkerEvent::Msg(PluginMsg::Metrics(m))) => super::metrics_bridge::apply(&m),
                    Some(WorkerEvent::Msg(PluginMsg::Failed { reason })) => break reason,
                    Some(WorkerEvent::Msg(PluginMsg::Stopped)) => break "stopped on its own".into(),
                    Some(WorkerEvent::Msg(PluginMsg::Ready { .. })) => {}
                    Some(WorkerEvent::Exited(how)) => return RunEnd::Failed(how),
                    None => return RunEnd::Failed("plugin channel closed".into()),
                },
                Ok(()) = mesh.changed() => {
                    let frame = mesh.borrow_and_update().clone();
                    worker.send_mesh(&frame);
                }
                cmd = self.commands.recv() => match cmd {
                    Some(c) if c.action == Action::Enable => { let _ = c.ack.send(()); }
                    other => {
                        self.stop_gracefully(&mut worker).await;
                        return RunEnd::Command(other);
                    }
                }
            }
        };
        self.kill(&mut worker).await;
        RunEnd::Failed(failure)
    }

    /// Waits up to `within` for the worker to end, applying metrics that arrive meanwhile.
    async fn wait_exit(&self, worker: &mut Worker, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, worker.events.recv()).await {
                Err(_) => return false,
                Ok(None) | Ok(Some(WorkerEvent::Exited(_))) => return true,
                Ok(Some(WorkerEvent::Msg(PluginMsg::Metrics(m)))) => {
                    super::metrics_bridge::apply(&m)
                }
                Ok(Some(WorkerEvent::Msg(_))) => {}
            }
        }
    }

    /// Asks the plugin to stop; kills it if it does not within the grace period.
    async fn stop_gracefully(&self, worker: &mut Worker) {
        worker.send(HostMsg::Stop);
        let grace = Duration::from_millis(self.shared.settings.stop_grace_ms);
        if !self.wait_exit(worker, grace).await {
            tracing::warn!(plugin = %self.inst.name, "did not stop within {} ms", grace.as_millis());
            self.kill(worker).await;
        }
    }

    /// SIGTERM, grace, SIGKILL for a process; cancel, grace, abandon for a thread.
    async fn kill(&self, worker: &mut Worker) {
        let grace = Duration::from_millis(self.shared.settings.stop_grace_ms);
        worker.terminate();
        worker.send(HostMsg::Stop);
        if self.wait_exit(worker, grace).await {
            return;
        }
        if worker.kill() {
            if !self.wait_exit(worker, Duration::from_secs(10)).await {
                tracing::error!(plugin = %self.inst.name, pid = ?worker.pid(), "did not exit after SIGKILL");
            }
        } else if worker.is_thread() {
            tracing::error!(plugin = %self.inst.name, "thread did not stop within {} ms: abandoned (its resources stay in use until the node restarts)", grace.as_millis());
            self.update(|s| s.abandoned_threads += 1);
            metrics::counter!("myelin_plugin_abandoned_threads_total", "plugin" => self.inst.name.clone()).increment(1);
        }
    }
}

/// The host's command channel closed: behave as on shutdown.
fn shutdown_without_ack() -> Option<ActionRequest> {
    let (ack, _) = tokio::sync::oneshot::channel();
    Some(ActionRequest {
        action: Action::Shutdown,
        ack,
    })
}
