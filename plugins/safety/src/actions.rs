//! What the interlock does on a trip and on a clear: run a command, POST JSON, and (with
//! robotics mode) publish ROS messages through the local zenoh router. Each command and http
//! action has one worker that applies only the latest generation: a run that a newer transition
//! supersedes is cancelled (the command's process group killed), and a failed run is retried
//! with backoff until it succeeds or is superseded.

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

    /// What the action acts on: the program, the URL or the topic.
    pub fn target(&self) -> String {
        match self {
            Self::RosLock { topic, .. } | Self::RosZeroTwist { topic, .. } => topic.clone(),
            Self::Command { argv, .. } => argv.first().cloned().unwrap_or_default(),
            Self::Http { url, .. } => url.clone(),
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
    /// Grows with every transition, across restarts: the newest generation is the current state.
    pub generation: u64,
    pub node: String,
    /// `stopped` or `armed`.
    pub state: &'static str,
    /// `startup`, `latency`, `heartbeat`, `cleared` or `rearmed`.
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
        .env("MYELIN_SAFETY_GENERATION", notice.generation.to_string())
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
        // Its own process group, so that a superseded or timed-out run is stopped whole, shell
        // children included, before the next one starts.
        .process_group(0)
        .kill_on_drop(true);
    // If this plugin process dies (killed with its node, or by the supervisor), a run still in
    // progress dies with it: a restarted interlock's newer run must be the last one applied.
    // SAFETY: the closure runs in the forked child before exec and only makes one prctl call,
    // which is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let mut group = ProcessGroup(Some(child));
    let Some(child) = group.0.as_mut() else {
        return Err(format!("{program}: lost its process"));
    };
    let result = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{program} exited with {status}")),
        Ok(Err(e)) => Err(format!("{program}: {e}")),
        Err(_) => Err(format!(
            "{program} did not finish within {timeout:?} and was killed"
        )),
    };
    drop(group);
    result
}

/// A started command. Dropped before its leader was reaped (the run timed out or was
/// superseded), every process of its group is killed; the group id cannot have been reused while
/// the leader is unreaped. After a normal exit, what the command left running is its own.
struct ProcessGroup(Option<tokio::process::Child>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            if let Some(pid) = child
                .id()
                .and_then(|id| rustix::process::Pid::from_raw(id as i32))
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            // kill_on_drop reaps the leader.
            drop(child);
        }
    }
}

/// What one command or http action has done, for the status route and the panel.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ActionStatus {
    pub index: usize,
    pub kind: &'static str,
    /// The program, URL or topic.
    pub target: String,
    /// The newest generation handed to the action.
    pub generation: u64,
    /// The newest generation it applied, and that generation's state.
    pub applied_generation: Option<u64>,
    pub applied_state: Option<String>,
    /// Whether the newest generation is still being applied (running or waiting to retry).
    pub pending: bool,
    /// Whether the latest run failed (cleared once a run applies).
    pub failing: bool,
    pub attempts: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub last_error_unix_ms: Option<u128>,
}

/// How long to wait before retry `n` (1-based) of a failed run: 0.2 s, doubling, at most 5 s.
pub fn retry_delay(n: u32) -> Duration {
    let ms = 200u64.saturating_mul(1u64 << n.saturating_sub(1).min(10));
    Duration::from_millis(ms.min(5000))
}

/// What an action worker reports back; the caller turns it into status, metrics and logs.
pub trait Report: Send + Sync + 'static {
    fn attempt(&self, index: usize, generation: u64);
    fn applied(&self, index: usize, generation: u64, state: &str);
    fn failed(&self, index: usize, generation: u64, error: String, retry_in: Duration);
}

/// Applies the newest notice in `desired` with `action`, until `cancel` fires. Only one run
/// at a time; a newer notice cancels the run in progress, a failed run is retried with
/// backoff, and an applied generation waits for the next.
pub async fn worker<R: Report>(
    index: usize,
    action: ActionConfig,
    mut desired: tokio::sync::watch::Receiver<Option<Notice>>,
    report: std::sync::Arc<R>,
    cancel: myelin_sdk::CancellationToken,
) {
    let timeout = action.timeout();
    // Whether the newest notice still has to be applied (the first one always does).
    let mut fresh = true;
    loop {
        if !fresh {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = desired.changed() => if changed.is_err() { return },
            }
        }
        fresh = false;
        let Some(notice) = desired.borrow_and_update().clone() else {
            continue;
        };
        let mut failures = 0u32;
        loop {
            report.attempt(index, notice.generation);
            let run = async {
                match &action {
                    ActionConfig::Command { argv, .. } => run_command(argv, &notice, timeout).await,
                    ActionConfig::Http { url, .. } => post(url, &notice, timeout)
                        .await
                        .map_err(|e| format!("{url}: {e}")),
                    ActionConfig::RosLock { .. } | ActionConfig::RosZeroTwist { .. } => Ok(()),
                }
            };
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                // Superseded: dropping the run cancels it (kills the command's group).
                changed = desired.changed() => {
                    if changed.is_err() { return }
                    None
                }
                result = run => Some(result),
            };
            match outcome {
                None => {
                    fresh = true;
                    break;
                }
                Some(Ok(())) => {
                    report.applied(index, notice.generation, notice.state);
                    break;
                }
                Some(Err(e)) => {
                    failures = failures.saturating_add(1);
                    let delay = retry_delay(failures);
                    report.failed(index, notice.generation, e, delay);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        changed = desired.changed() => {
                            if changed.is_err() { return }
                            fresh = true;
                            break;
                        }
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
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
            generation: 1,
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

    #[derive(Default)]
    struct Recorder {
        applied: std::sync::Mutex<Vec<(u64, String)>>,
        failed: std::sync::Mutex<Vec<(u64, String, Duration)>>,
        attempts: std::sync::atomic::AtomicU64,
    }

    impl Report for Recorder {
        fn attempt(&self, _: usize, _: u64) {
            self.attempts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn applied(&self, _: usize, generation: u64, state: &str) {
            self.applied
                .lock()
                .unwrap()
                .push((generation, state.to_string()));
        }
        fn failed(&self, _: usize, generation: u64, error: String, retry_in: Duration) {
            self.failed
                .lock()
                .unwrap()
                .push((generation, error, retry_in));
        }
    }

    fn notice(generation: u64, state: &'static str) -> Option<Notice> {
        Some(Notice {
            generation,
            node: "robot1".into(),
            state,
            reason: "test".into(),
            peer: None,
            rtt_ms: None,
            time_unix_ms: 1,
        })
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after 10 s waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[test]
    fn retry_backoff_doubles_from_200_ms_to_5_s() {
        let ms: Vec<u128> = (1..=8).map(|n| retry_delay(n).as_millis()).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_superseded_run_is_killed_and_the_newest_state_is_applied_last() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("applied");
        let started = dir.path().join("armed-started");
        let argv: Vec<String> = [
            "sh".to_string(),
            "-c".to_string(),
            format!(
                "if [ $MYELIN_SAFETY_STATE = armed ]; then touch {}; sleep 1; fi; echo $MYELIN_SAFETY_STATE $MYELIN_SAFETY_GENERATION >> {}",
                started.display(),
                out.display()
            ),
        ]
        .to_vec();
        let (tx, rx) = tokio::sync::watch::channel(notice(1, "stopped"));
        let report = std::sync::Arc::new(Recorder::default());
        let cancel = myelin_sdk::CancellationToken::new();
        tokio::spawn(worker(
            0,
            ActionConfig::Command {
                argv,
                timeout_ms: 5000,
            },
            rx,
            report.clone(),
            cancel.clone(),
        ));
        until("generation 1", || report.applied.lock().unwrap().len() == 1).await;
        // Clear, then trip again while the clear's command still runs.
        tx.send_replace(notice(2, "armed"));
        until("the armed run to start", || started.exists()).await;
        tx.send_replace(notice(3, "stopped"));
        until("generation 3", || {
            report.applied.lock().unwrap().last() == Some(&(3, "stopped".into()))
        })
        .await;
        // The armed run was killed with its whole group: it never writes, also not later.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        while tokio::time::Instant::now() < deadline {
            let text = std::fs::read_to_string(&out).unwrap();
            assert_eq!(text, "stopped 1\nstopped 3\n");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            *report.applied.lock().unwrap(),
            [(1, "stopped".to_string()), (3, "stopped".to_string())]
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_failing_post_is_retried_with_backoff_until_it_succeeds() {
        use tokio::io::AsyncBufReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/safety", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for n in 1.. {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let mut stream = tokio::io::BufReader::new(stream);
                let mut line = String::new();
                while stream.read_line(&mut line).await.unwrap_or(0) > 0 && line != "\r\n" {
                    line.clear();
                }
                let answer: &[u8] = if n <= 3 {
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = stream.get_mut().write_all(answer).await;
            }
        });
        let (_tx, rx) = tokio::sync::watch::channel(notice(1, "stopped"));
        let report = std::sync::Arc::new(Recorder::default());
        let cancel = myelin_sdk::CancellationToken::new();
        let start = tokio::time::Instant::now();
        tokio::spawn(worker(
            0,
            ActionConfig::Http {
                url,
                timeout_ms: 2000,
            },
            rx,
            report.clone(),
            cancel.clone(),
        ));
        until("the POST to succeed", || {
            !report.applied.lock().unwrap().is_empty()
        })
        .await;
        let took = start.elapsed();
        let failed = report.failed.lock().unwrap().clone();
        assert_eq!(failed.len(), 3, "{failed:?}");
        assert!(
            failed.iter().all(|(g, e, _)| *g == 1 && e.contains("503")),
            "{failed:?}"
        );
        let delays: Vec<u128> = failed.iter().map(|f| f.2.as_millis()).collect();
        assert_eq!(delays, [200, 400, 800]);
        assert!(took >= Duration::from_millis(1400), "{took:?}");
        assert_eq!(report.attempts.load(std::sync::atomic::Ordering::SeqCst), 4);
        cancel.cancel();
    }
}
