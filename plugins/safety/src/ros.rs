//! ROS actions through robotics mode: a zenoh client session to the zenoh plugin's router on
//! loopback, publishing CDR-encoded messages on the keys the robot's own bridge maps to its
//! local topics. No in-memory handle is shared with the zenoh plugin.
//!
//! Every publisher's first message is a stop (`true` on the lock, a zero twist), whatever the
//! state: after a start, or when the router comes up late, nothing ever reads `false` first.

use crate::actions::{cdr_bool, cdr_zero_twist, retry_delay, zenoh_key, ActionConfig, Report};
use crate::status::{Reporter, Status};
use myelin_sdk::log;
use myelin_sdk::CancellationToken;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use zenoh::Wait;

/// How long the router may be unreachable after the start before it counts as a failure of
/// the ROS actions: the zenoh plugin starts alongside this one.
const START_GRACE: Duration = Duration::from_secs(5);

/// Connects (retrying with backoff), then runs one publishing task per ROS action. `stopped`
/// carries (generation, stopped); each publish reports the generation it applied.
pub async fn run(
    actions: Vec<(usize, ActionConfig)>,
    namespace: String,
    port: u16,
    stopped: watch::Receiver<(u64, bool)>,
    report: Arc<Reporter>,
    status: Arc<Mutex<Status>>,
    cancel: CancellationToken,
) {
    let set_connected = |v: bool| {
        if let Ok(mut s) = status.lock() {
            s.ros_connected = Some(v);
        }
    };
    set_connected(false);
    let started = Instant::now();
    let mut attempts = 0u32;
    let session = loop {
        match myelin_sdk::zenoh_loopback(port).await {
            Ok(s) => break s,
            Err(e) => {
                attempts = attempts.saturating_add(1);
                let delay = retry_delay(attempts);
                if started.elapsed() >= START_GRACE {
                    let generation = stopped.borrow().0;
                    for (index, _) in &actions {
                        report.failed(
                            *index,
                            generation,
                            format!("zenoh router 127.0.0.1:{port}: {e}"),
                            delay,
                        );
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    set_connected(true);
    log(&format!(
        "ROS actions publish through the zenoh router on 127.0.0.1:{port}"
    ));
    let session = Arc::new(session);
    for (index, action) in actions {
        let (topic, rate_hz, lock) = match &action {
            ActionConfig::RosLock { topic, rate_hz, .. } => (topic.clone(), *rate_hz, true),
            ActionConfig::RosZeroTwist { topic, rate_hz, .. } => (topic.clone(), *rate_hz, false),
            _ => continue,
        };
        let publish = Publish {
            index,
            key: zenoh_key(&namespace, &topic),
            topic,
            rate_hz,
            timeout: action.timeout(),
            lock,
        };
        tokio::spawn(publish.run(
            session.clone(),
            stopped.clone(),
            report.clone(),
            cancel.clone(),
        ));
    }
    // The session lives as long as the plugin's process.
    cancel.cancelled().await;
    drop(session);
}

/// One ROS action's publisher.
struct Publish {
    index: usize,
    topic: String,
    key: String,
    rate_hz: f64,
    timeout: Duration,
    /// `true`: the twist_mux lock (std_msgs/Bool, always); `false`: zero twists while stopped.
    lock: bool,
}

impl Publish {
    async fn run(
        self,
        session: Arc<zenoh::Session>,
        mut stopped: watch::Receiver<(u64, bool)>,
        report: Arc<Reporter>,
        cancel: CancellationToken,
    ) {
        let mut attempts = 0u32;
        let publisher = loop {
            match session
                .declare_publisher(self.key.clone())
                .congestion_control(zenoh::qos::CongestionControl::Drop)
                .priority(zenoh::qos::Priority::RealTime)
                .express(true)
                .await
            {
                Ok(p) => break p,
                Err(e) => {
                    attempts = attempts.saturating_add(1);
                    let delay = retry_delay(attempts);
                    report.failed(
                        self.index,
                        stopped.borrow().0,
                        format!("{}: cannot publish on {}: {e}", self.topic, self.key),
                        delay,
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        log(&format!(
            "{} on {} (zenoh key {}) at {} Hz",
            if self.lock {
                "twist_mux lock"
            } else {
                "zero twist"
            },
            self.topic,
            self.key,
            self.rate_hz
        ));
        let stop_payload = if self.lock {
            cdr_bool(true)
        } else {
            cdr_zero_twist()
        };
        // A stop first, whatever the state now.
        let put = publisher.put(stop_payload);
        let first = match tokio::time::timeout(self.timeout, async { put.wait() }).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("put took over {:?}", self.timeout)),
        };
        if let Some(e) = first {
            let generation = stopped.borrow().0;
            report.failed(
                self.index,
                generation,
                format!("{}: {e}", self.topic),
                Duration::ZERO,
            );
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / self.rate_hz));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The loop publishes at once; the first tick is one period later.
        tick.reset();
        let mut reported_idle: Option<u64> = None;
        loop {
            let (generation, stop) = *stopped.borrow_and_update();
            let state = if stop { "stopped" } else { "armed" };
            // Zero twists while armed: nothing to send, so no tick to wake for.
            let idle = !self.lock && !stop;
            if idle {
                if reported_idle != Some(generation) {
                    report.applied(self.index, generation, state);
                    reported_idle = Some(generation);
                }
            } else {
                let payload = if self.lock {
                    cdr_bool(stop)
                } else {
                    cdr_zero_twist()
                };
                let put = publisher.put(payload);
                match tokio::time::timeout(self.timeout, async { put.wait() }).await {
                    Ok(Ok(())) => report.applied(self.index, generation, state),
                    Ok(Err(e)) => report.failed(
                        self.index,
                        generation,
                        format!("{}: {e}", self.topic),
                        Duration::ZERO,
                    ),
                    Err(_) => report.failed(
                        self.index,
                        generation,
                        format!("{}: put took over {:?}", self.topic, self.timeout),
                        Duration::ZERO,
                    ),
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick(), if !idle => {}
                // A change is published at once, not at the next tick.
                changed = stopped.changed() => if changed.is_err() { return },
            }
        }
    }
}
