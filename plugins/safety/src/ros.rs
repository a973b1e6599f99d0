//! ROS actions through robotics mode: a zenoh client session to the zenoh plugin's router on
//! loopback, publishing CDR-encoded messages on the keys the robot's own bridge maps to its
//! local topics. No in-memory handle is shared with the zenoh plugin.

use crate::actions::{cdr_bool, cdr_zero_twist, zenoh_key, ActionConfig};
use crate::{log, note_error, Status};
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

/// Connects (retrying every second), then runs one publishing task per ROS action.
pub async fn run(
    actions: Vec<ActionConfig>,
    namespace: String,
    port: u16,
    stopped: watch::Receiver<bool>,
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
                note_error(&status, format!("zenoh router 127.0.0.1:{port}: {e}"));
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
    for action in actions {
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
                note_error(&status, format!("{topic}: cannot publish on {key}: {e}"));
                continue;
            }
        };
        log(&format!(
            "{} on {topic} (zenoh key {key}) at {rate_hz} Hz",
            if lock { "twist_mux lock" } else { "zero twist" }
        ));
        let mut stopped = stopped.clone();
        let cancel = cancel.clone();
        let status = status.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate_hz));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                    // A change is published at once, not at the next tick.
                    changed = stopped.changed() => if changed.is_err() { return },
                }
                let stop = *stopped.borrow_and_update();
                let payload = match (lock, stop) {
                    (true, s) => cdr_bool(s),
                    (false, true) => cdr_zero_twist(),
                    (false, false) => continue,
                };
                let put = publisher.put(payload);
                match tokio::time::timeout(timeout, async { put.wait() }).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => note_error(&status, format!("{topic}: {e}")),
                    Err(_) => note_error(&status, format!("{topic}: put took over {timeout:?}")),
                }
            }
        });
    }
    // The session lives as long as the plugin's process.
    cancel.cancelled().await;
    drop(session);
}
