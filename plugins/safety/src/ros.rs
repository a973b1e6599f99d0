//! ROS actions through robotics mode: a zenoh client session to the zenoh plugin's router on
//! loopback, publishing CDR-encoded messages on the keys the robot's own bridge maps to its
//! local topics. No in-memory handle is shared with the zenoh plugin.

use crate::actions::{cdr_bool, cdr_zero_twist, zenoh_key, ActionConfig, Report};
use crate::{log, Reporter, Status};
use myelin_sdk::CancellationToken;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use zenoh::Wait;

async fn open(port: u16) -> Result<zenoh::Session, String> {
    let mut c = zenoh::Config::default();
    for (key, value) in [
        ("mode", "\"client\"".to_string()),
        ("connect/endpoints", format!("[\"tcp/127.0.0.1:{port}\"]")),
        ("scouting/multicast/enabled", "false".to_string()),
    ] {
        c.insert_json5(key, &value)
            .map_err(|e| format!("{key}: {e}"))?;
    }
    zenoh::open(c).await.map_err(|e| e.to_string())
}

/// Connects (retrying every second), then runs one publishing task per ROS action. `stopped`
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
    let session = loop {
        match open(port).await {
            Ok(s) => break s,
            Err(e) => {
                let generation = stopped.borrow().0;
                for (index, _) in &actions {
                    report.failed(
                        *index,
                        generation,
                        format!("zenoh router 127.0.0.1:{port}: {e}"),
                        Duration::from_secs(1),
                    );
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    set_connected(true);
    log(&format!(
        "ROS actions publish through the zenoh router on 127.0.0.1:{port}"
    ));
    for (index, action) in actions {
        let (topic, rate_hz, timeout, lock) = match &action {
            ActionConfig::RosLock { topic, rate_hz, .. } => {
                (topic.clone(), *rate_hz, action.timeout(), true)
            }
            ActionConfig::RosZeroTwist { topic, rate_hz, .. } => {
                (topic.clone(), *rate_hz, action.timeout(), false)
            }
            _ => continue,
        };
        let key = zenoh_key(&namespace, &topic);
        let publisher = match session
            .declare_publisher(key.clone())
            .congestion_control(zenoh::qos::CongestionControl::Drop)
            .priority(zenoh::qos::Priority::RealTime)
            .express(true)
            .await
        {
            Ok(p) => p,
            Err(e) => {
                report.failed(
                    index,
                    stopped.borrow().0,
                    format!("{topic}: cannot publish on {key}: {e}"),
                    Duration::ZERO,
                );
                continue;
            }
        };
        log(&format!(
            "{} on {topic} (zenoh key {key}) at {rate_hz} Hz",
            if lock { "twist_mux lock" } else { "zero twist" }
        ));
        let mut stopped = stopped.clone();
        let cancel = cancel.clone();
        let report = report.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate_hz));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Zero twists while armed: nothing to send, so no tick to wake for.
                let idle = !lock && !stopped.borrow().1;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick(), if !idle => {}
                    // A change is published at once, not at the next tick.
                    changed = stopped.changed() => if changed.is_err() { return },
                }
                let (generation, stop) = *stopped.borrow_and_update();
                let state = if stop { "stopped" } else { "armed" };
                let payload = match (lock, stop) {
                    (true, s) => cdr_bool(s),
                    (false, true) => cdr_zero_twist(),
                    // Zero twists are only sent while stopped: armed is applied by sending none.
                    (false, false) => {
                        report.applied(index, generation, state);
                        continue;
                    }
                };
                let put = publisher.put(payload);
                match tokio::time::timeout(timeout, async { put.wait() }).await {
                    Ok(Ok(())) => report.applied(index, generation, state),
                    Ok(Err(e)) => report.failed(index, generation, format!("{topic}: {e}"), Duration::ZERO),
                    Err(_) => report.failed(index, generation, format!("{topic}: put took over {timeout:?}"), Duration::ZERO),
                }
            }
        });
    }
    // The session lives as long as the plugin's process.
    cancel.cancelled().await;
    drop(session);
}
