//! What the interlock does on a trip and on a clear: run a command, POST JSON, and (with
//! robotics mode) publish ROS messages through the local zenoh router.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ActionConfig {
    /// std_msgs/Bool on a twist_mux lock topic: true while stopped, false while armed (the
    /// dead-man heartbeat), both at `rate_hz`.
    RosLock {
        topic: String,
        #[serde(default = "default_rate")]
        rate_hz: f64,
        #[serde(default = "default_ros_timeout")]
        timeout_ms: u64,
    },
    /// geometry_msgs/Twist zeros on `topic` at `rate_hz` while stopped.
    RosZeroTwist {
        topic: String,
        #[serde(default = "default_rate")]
        rate_hz: f64,
        #[serde(default = "default_ros_timeout")]
        timeout_ms: u64,
    },
    /// Run once per trip and once per clear, with the details in `MYELIN_SAFETY_*`.
    Command {
        argv: Vec<String>,
        #[serde(default = "default_command_timeout")]
        timeout_ms: u64,
    },
    /// POST a JSON notice once per trip and once per clear.
    Http {
        url: String,
        #[serde(default = "default_http_timeout")]
        timeout_ms: u64,
    },
}

fn default_rate() -> f64 {
    10.0
}
fn default_ros_timeout() -> u64 {
    1000
}
fn default_command_timeout() -> u64 {
    5000
}
fn default_http_timeout() -> u64 {
    2000
}

impl ActionConfig {
    pub fn is_ros(&self) -> bool {
        matches!(self, Self::RosLock { .. } | Self::RosZeroTwist { .. })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::RosLock { .. } => "ros_lock",
            Self::RosZeroTwist { .. } => "ros_zero_twist",
            Self::Command { .. } => "command",
            Self::Http { .. } => "http",
        }
    }

    /// Checks the action's own values; `Err` names the key and the fix.
    pub fn check(&self, n: usize) -> Result<(), String> {
        let at = format!("actions[{n}] (kind = \"{}\")", self.kind());
        match self {
            Self::RosLock { topic, rate_hz, .. } | Self::RosZeroTwist { topic, rate_hz, .. } => {
                if !topic.starts_with('/') || topic.len() < 2 || topic.contains("//") {
                    return Err(format!(
                        "{at}: topic = \"{topic}\" must be an absolute ROS name such as \"/e_stop\""
                    ));
                }
                if !(rate_hz.is_finite() && *rate_hz > 0.0 && *rate_hz <= 1000.0) {
                    return Err(format!("{at}: rate_hz = {rate_hz} must be in (0, 1000]; twist_mux locks typically use 10"));
                }
            }
            Self::Command { argv, .. } => {
                if argv.first().is_none_or(|p| p.is_empty()) {
                    return Err(format!(
                        "{at}: argv is empty; give the program and its arguments, e.g. argv = [\"/usr/local/bin/brake\", \"--engage\"]"
                    ));
                }
            }
            Self::Http { url, .. } => {
                parse_http_url(url).map_err(|e| format!("{at}: {e}"))?;
            }
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        let ms = match self {
            Self::RosLock { timeout_ms, .. }
            | Self::RosZeroTwist { timeout_ms, .. }
            | Self::Command { timeout_ms, .. }
            | Self::Http { timeout_ms, .. } => *timeout_ms,
        };
        Duration::from_millis(ms.max(1))
    }
}

/// What a trip or clear notice carries.
#[derive(Clone, Debug, Serialize)]
pub struct Notice {
    pub node: String,
    /// `stopped` or `armed`.
    pub state: &'static str,
    /// `latency`, `heartbeat`, `cleared` or `rearmed`.
    pub reason: String,
    pub peer: Option<String>,
    pub rtt_ms: Option<f64>,
    pub time_unix_ms: u128,
}

/// `http://host:port/path` → (host:port, path). Only plain HTTP: the VPN already encrypts.
pub fn parse_http_url(url: &str) -> Result<(String, String), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "url = \"{url}\" must start with http:// (the VPN already encrypts; https is not supported here)"
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("url = \"{url}\" has no host"));
    }
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path.to_string()))
}

/// Runs the command with the notice in its environment; killed at the timeout.
pub async fn run_command(
    argv: &[String],
    notice: &Notice,
    timeout: Duration,
) -> Result<(), String> {
    let (program, args) = argv.split_first().ok_or("empty argv")?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("MYELIN_SAFETY_STATE", notice.state)
        .env("MYELIN_SAFETY_REASON", &notice.reason)
        .env("MYELIN_SAFETY_PEER", notice.peer.as_deref().unwrap_or(""))
        .env(
            "MYELIN_SAFETY_RTT_MS",
            notice.rtt_ms.map(|r| format!("{r:.1}")).unwrap_or_default(),
        )
        .env("MYELIN_SAFETY_NODE", &notice.node)
        .env(
            "MYELIN_SAFETY_TIME_UNIX_MS",
            notice.time_unix_ms.to_string(),
        )
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{program} exited with {status}")),
        Ok(Err(e)) => Err(format!("{program}: {e}")),
        Err(_) => {
            let _ = child.kill().await;
            Err(format!(
                "{program} did not finish within {timeout:?} and was killed"
            ))
        }
    }
}

/// POSTs the notice as JSON; succeeds on a 2xx answer within the timeout.
pub async fn post(url: &str, notice: &Notice, timeout: Duration) -> Result<(), String> {
    let (authority, path) = parse_http_url(url)?;
    let body = serde_json::to_string(notice).map_err(|e| e.to_string())?;
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("{authority}: {e}"))?;
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 12];
        stream
            .read_exact(&mut head)
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let status = String::from_utf8_lossy(&head[9..12]).to_string();
        if status.starts_with('2') {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

#[cfg(any(feature = "ros", test))]
/// CDR (little endian, with the 4-byte encapsulation header) of std_msgs/Bool.
pub fn cdr_bool(value: bool) -> Vec<u8> {
    vec![0x00, 0x01, 0x00, 0x00, u8::from(value)]
}

#[cfg(any(feature = "ros", test))]
/// CDR of a zero geometry_msgs/Twist: six float64 zeros.
pub fn cdr_zero_twist() -> Vec<u8> {
    let mut v = vec![0x00, 0x01, 0x00, 0x00];
    v.extend_from_slice(&[0u8; 48]);
    v
}

#[cfg(any(feature = "ros", test))]
/// The zenoh key the robot's bridge maps to the local ROS `topic`: the namespace prefix, then
/// the topic, without the leading `/`.
pub fn zenoh_key(namespace: &str, topic: &str) -> String {
    let ns = namespace.trim_matches('/');
    let topic = topic.trim_start_matches('/');
    if ns.is_empty() {
        topic.to_string()
    } else {
        format!("{ns}/{topic}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_plain_http_with_a_port() {
        assert_eq!(
            parse_http_url("http://10.77.0.1:8080/stop").unwrap(),
            ("10.77.0.1:8080".into(), "/stop".into())
        );
        assert_eq!(
            parse_http_url("http://plc.local").unwrap(),
            ("plc.local:80".into(), "/".into())
        );
        assert!(parse_http_url("https://x/")
            .unwrap_err()
            .contains("http://"));
        assert!(parse_http_url("http:///x").is_err());
    }

    #[test]
    fn ros_payloads_are_cdr_with_the_encapsulation_header() {
        assert_eq!(cdr_bool(true), [0, 1, 0, 0, 1]);
        assert_eq!(cdr_zero_twist().len(), 4 + 6 * 8);
        assert_eq!(zenoh_key("/robot1", "/e_stop"), "robot1/e_stop");
        assert_eq!(zenoh_key("/", "/cmd_vel"), "cmd_vel");
        assert_eq!(zenoh_key("/fleet/r1", "/e_stop"), "fleet/r1/e_stop");
    }

    #[tokio::test]
    async fn a_command_gets_the_notice_and_a_slow_one_is_killed() {
        let dir = std::env::temp_dir().join(format!("myelin-safety-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("notice");
        let notice = Notice {
            node: "robot1".into(),
            state: "stopped",
            reason: "latency".into(),
            peer: Some("operator".into()),
            rtt_ms: Some(312.0),
            time_unix_ms: 1,
        };
        let argv: Vec<String> = [
            "sh",
            "-c",
            &format!(
                "echo $MYELIN_SAFETY_STATE $MYELIN_SAFETY_REASON $MYELIN_SAFETY_PEER $MYELIN_SAFETY_RTT_MS > {}",
                out.display()
            ),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        run_command(&argv, &notice, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap().trim(),
            "stopped latency operator 312.0"
        );
        let slow: Vec<String> = ["sleep", "5"].iter().map(|s| s.to_string()).collect();
        let err = run_command(&slow, &notice, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(err.contains("killed"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
