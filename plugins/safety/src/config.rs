//! The `[plugins.safety]` section: the watched peers, the trip and clear thresholds, the latch
//! and the actions, checked with the key and the fix in the message.

use crate::actions::ActionConfig;
use crate::interlock::Settings;
use myelin_sdk::{config_error, PluginError};
use serde::Deserialize;
use std::time::Duration;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetyConfig {
    /// Peer names whose link guards motion.
    pub watch: Vec<String>,
    #[serde(default = "default_max_rtt")]
    pub max_rtt_ms: u64,
    #[serde(default = "default_trip_after")]
    pub trip_after: u32,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_timeout_ms: u64,
    #[serde(default = "default_clear_below")]
    pub clear_below_ms: u64,
    #[serde(default = "default_clear_after")]
    pub clear_after_s: f64,
    #[serde(default = "default_latch")]
    pub latch: bool,
    /// The robot's ROS namespace in robotics mode (default `/<node name>`, as the zenoh
    /// plugin's robot role uses).
    pub namespace: Option<String>,
    /// The zenoh plugin's router port on loopback.
    #[serde(default = "default_zenoh_port")]
    pub zenoh_port: u16,
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
    /// Certificate groups whose members may re-arm through the tunnel.
    #[serde(default = "default_rearm_groups")]
    pub rearm_groups: Vec<String>,
}

fn default_rearm_groups() -> Vec<String> {
    vec!["operators".into()]
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
    pub fn parse(section: &myelin_sdk::toml::Table) -> Result<Self, PluginError> {
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

    pub fn settings(&self) -> Settings {
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
