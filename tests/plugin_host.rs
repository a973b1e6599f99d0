//! The plugin host contains failing plugins: measured against a real node process with the
//! chaos plugin, in both isolation modes.

mod common;

use common::{state, wait_gone, Node, FAST_HOST};
use serde_json::Value;
use std::time::Duration;

const FAIL_WAIT: Duration = Duration::from_secs(60);

fn section(name: &str, isolation: &str, mode: &str) -> String {
    format!("[plugins.{name}]\nplugin = \"chaos\"\nisolation = \"{isolation}\"\nmode = \"{mode}\"\nafter_ms = 50\n")
}

/// Waits for `name` to be marked failed and checks the whole restart history.
fn assert_failed_with_backoff(node: &Node, name: &str, reason: &str) -> Value {
    let v = node.wait_plugin(name, FAIL_WAIT, "failed", |v| state(v) == "failed");
    let failures = v["failures"].as_array().expect("failures");
    assert_eq!(
        failures.len(),
        5,
        "{name}: five failures before giving up: {v:#}"
    );
    for f in failures {
        let r = f["reason"].as_str().unwrap_or("");
        assert!(
            r.contains(reason),
            "{name}: failure reason {r:?} should contain {reason:?}"
        );
    }
    let backoffs: Vec<Option<u64>> = failures
        .iter()
        .map(|f| f["restart_after_ms"].as_u64())
        .collect();
    assert_eq!(
        backoffs,
        vec![Some(200), Some(400), Some(800), Some(1600), None],
        "{name}: backoff doubles"
    );
    let at: Vec<u64> = failures
        .iter()
        .map(|f| f["at_ms"].as_u64().unwrap())
        .collect();
    let gaps: Vec<u64> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        let waited = backoffs[i].unwrap();
        assert!(
            *gap >= waited,
            "{name}: restart {i} came after {gap} ms, before its {waited} ms backoff"
        );
    }
    assert!(
        gaps.windows(2).all(|w| w[1] > w[0]),
        "{name}: measured gaps between failures grow: {gaps:?}"
    );
    assert_eq!(v["restarts"].as_u64(), Some(4), "{name}: {v:#}");
    assert_eq!(
        v["pid"],
        Value::Null,
        "{name}: a failed plugin has no process"
    );
    eprintln!("{name}: failed as expected; gaps between failures {gaps:?} ms");
    v
}

/// The healthy plugin ran the whole time: same process, no failure, no missed deadline.
fn assert_undisturbed(node: &Node, name: &str, pid_before: &Value) {
    let v = node.plugin(name);
    assert_eq!(state(&v), "running", "{name}: {v:#}");
    assert_eq!(&v["pid"], pid_before, "{name} was never restarted");
    assert_eq!(
        v["health_checks_missed"].as_u64(),
        Some(0),
        "{name} never missed a health deadline: {v:#}"
    );
    assert!(
        v["failures"].as_array().unwrap().is_empty(),
        "{name}: {v:#}"
    );
    let ok = v["health_checks_ok"].as_u64().unwrap();
    assert!(ok >= 20, "{name} kept answering health checks ({ok})");
}

fn assert_host_alive(node: &mut Node) {
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "the node process must survive; log:\n{}",
        node.log()
    );
    let status = node.get("/api/v1/status");
    assert_eq!(status["node"]["name"], "robot1");
}

#[test]
fn process_isolation_contains_panic_abort_error_hang_and_block() {
    let sections = [
        section("steady", "process", "none"),
        section("panicky", "process", "panic"),
        section("aborter", "process", "abort"),
        section("erring", "process", "error"),
        section("hanger", "process", "hang"),
        section("blocker", "process", "block"),
    ]
    .concat();
    let mut node = Node::start(FAST_HOST, &sections);
    let steady = node.wait_plugin("steady", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    let steady_pid = steady["pid"].clone();
    assert!(steady_pid.is_u64());

    assert_failed_with_backoff(&node, "panicky", "status 101 (panic)");
    assert_failed_with_backoff(&node, "aborter", "SIGABRT");
    assert_failed_with_backoff(&node, "erring", "start failed on purpose");
    assert_failed_with_backoff(&node, "hanger", "missed its health deadline");
    assert_failed_with_backoff(&node, "blocker", "missed its health deadline");
    for name in ["hanger", "blocker"] {
        let v = node.plugin(name);
        assert_eq!(v["health_checks_missed"].as_u64(), Some(5), "{name}: {v:#}");
    }

    assert_undisturbed(&node, "steady", &steady_pid);
    assert_host_alive(&mut node);

    // Every plugin's metrics reach the node's one Prometheus output, children's included.
    let metrics = node.metrics();
    for needle in [
        "myelin_chaos_health_checks_total{plugin=\"steady\"}",
        "# HELP myelin_chaos_health_checks_total Health checks the chaos plugin answered.",
        "myelin_plugin_restarts_total{plugin=\"panicky\"} 4",
        "myelin_plugin_up{plugin=\"steady\"} 1",
        "myelin_plugin_state{plugin=\"aborter\",state=\"failed\"} 1",
        "myelin_plugin_health_missed_total{plugin=\"hanger\"} 5",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle}:\n{metrics}"
        );
    }

    // Re-enabling a failed plugin starts it again with a fresh backoff.
    let (code, v) = node.call("POST", "/api/v1/plugins/panicky/enable");
    assert_eq!(code, 200, "{v}");
    node.wait_plugin("panicky", FAIL_WAIT, "restarting after re-enable", |v| {
        state(v) == "restarting" && v["next_restart_in_ms"].as_u64() == Some(200)
    });
}

#[test]
fn thread_isolation_contains_panic_error_and_block() {
    let sections = [
        section("steady", "thread", "none"),
        section("steady_proc", "process", "none"),
        section("panicky", "thread", "panic"),
        section("erring", "thread", "error"),
        section("blocker", "thread", "block"),
    ]
    .concat();
    let mut node = Node::start(FAST_HOST, &sections);
    let steady = node.wait_plugin("steady", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    assert_eq!(
        steady["pid"],
        Value::Null,
        "thread plugins run inside the node"
    );
    let proc_pid = node.wait_plugin("steady_proc", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    })["pid"]
        .clone();

    assert_failed_with_backoff(&node, "panicky", "panicked: chaos: panicking on purpose");
    assert_failed_with_backoff(&node, "erring", "start failed on purpose");
    let blocker = assert_failed_with_backoff(&node, "blocker", "missed its health deadline");
    assert_eq!(
        blocker["abandoned_threads"].as_u64(),
        Some(5),
        "a blocked thread cannot be killed: counted"
    );

    let v = node.plugin("steady");
    assert_eq!(state(&v), "running");
    assert_eq!(v["health_checks_missed"].as_u64(), Some(0), "{v:#}");
    assert!(v["failures"].as_array().unwrap().is_empty());
    assert_undisturbed(&node, "steady_proc", &proc_pid);
    assert_host_alive(&mut node);
    assert!(node
        .metrics()
        .contains("myelin_plugin_abandoned_threads_total{plugin=\"blocker\"} 5"));
}

#[test]
fn no_plugin_process_outlives_a_killed_node() {
    let sections = [
        section("one", "process", "none"),
        section("two", "process", "none"),
    ]
    .concat();
    let mut node = Node::start(FAST_HOST, &sections);
    let pids: Vec<u64> = ["one", "two"]
        .iter()
        .map(|n| {
            node.wait_plugin(n, Duration::from_secs(20), "running", |v| {
                state(v) == "running"
            })["pid"]
                .as_u64()
                .unwrap()
        })
        .collect();
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(node.pid(), libc::SIGKILL) };
    let _ = node.child.wait();
    for pid in pids {
        wait_gone(
            pid,
            Duration::from_secs(5),
            "plugin child after the node was SIGKILLed",
        );
    }
}

#[test]
fn sigterm_stops_plugins_and_exits_zero() {
    let sections = [
        section("one", "process", "none"),
        section("two", "thread", "none"),
    ]
    .concat();
    let mut node = Node::start(FAST_HOST, &sections);
    let pid = node.wait_plugin("one", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    })["pid"]
        .as_u64()
        .unwrap();
    node.wait_plugin("two", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(node.pid(), libc::SIGTERM) };
    let status = node.child.wait().unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        node.log()
    );
    wait_gone(pid, Duration::from_secs(5), "plugin child after SIGTERM");
    let log = node.log();
    let two = log.find("stopping: plugins in reverse").unwrap();
    assert!(log[two..].contains("stopped"), "{log}");
}

#[test]
fn enable_disable_restart_act_at_once_and_persist() {
    let mut node = Node::start(FAST_HOST, &section("cam", "process", "none"));
    let first = node.wait_plugin("cam", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });

    let (code, v) = node.call("POST", "/api/v1/plugins/cam/disable");
    assert_eq!(code, 200, "{v}");
    assert_eq!(state(&v), "disabled");
    wait_gone(
        first["pid"].as_u64().unwrap(),
        Duration::from_secs(5),
        "disabled plugin's process",
    );
    let text = std::fs::read_to_string(&node.config).unwrap();
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(
        parsed["plugins"]["cam"]["enabled"].as_bool(),
        Some(false),
        "{text}"
    );

    let (code, v) = node.call("POST", "/api/v1/plugins/cam/restart");
    assert_eq!(
        code, 409,
        "a disabled plugin is not restarted behind the user's back: {v}"
    );
    assert!(v["hint"].as_str().unwrap().contains("enable"), "{v}");
    assert_eq!(state(&node.plugin("cam")), "disabled");

    let (code, v) = node.call("POST", "/api/v1/plugins/cam/enable");
    assert_eq!(code, 200, "{v}");
    let second = node.wait_plugin("cam", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    let parsed: toml::Table =
        toml::from_str(&std::fs::read_to_string(&node.config).unwrap()).unwrap();
    assert_eq!(parsed["plugins"]["cam"]["enabled"].as_bool(), Some(true));

    let (code, _) = node.call("POST", "/api/v1/plugins/cam/restart");
    assert_eq!(code, 200);
    let third = node.wait_plugin("cam", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    assert_ne!(second["pid"], third["pid"], "restart gives a new process");
    assert!(
        third["failures"].as_array().unwrap().is_empty(),
        "a manual restart is no failure"
    );

    // The plugin's own routes are proxied under /plugins/<name>/.
    let (code, v) = node.call("GET", "/plugins/cam/");
    assert_eq!((code, v["mode"].as_str()), (200, Some("none")), "{v}");
    let (code, _) = node.call("POST", "/plugins/cam/trigger/explode");
    assert_eq!(code, 400);
    let (code, _) = node.call("POST", "/plugins/cam/trigger/panic");
    assert_eq!(code, 202);
    let v = node.wait_plugin("cam", FAIL_WAIT, "restarted after a triggered panic", |v| {
        state(v) == "running" && v["failures"].as_array().is_some_and(|f| f.len() == 1)
    });
    assert!(v["failures"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("panic"));

    // Bad input: JSON errors with a hint, never a 500.
    for (method, path, want) in [
        ("POST", "/api/v1/plugins/nope/enable", 404),
        ("GET", "/api/v1/plugins/nope", 404),
        ("POST", "/api/v1/plugins/cam/explode", 404),
        ("GET", "/api/v1/plugins/cam/enable", 405),
        ("GET", "/plugins/nope/", 404),
        ("GET", "/api/v2/status", 404),
    ] {
        let (code, v) = node.call(method, path);
        assert_eq!(code, want, "{method} {path}: {v}");
        if code == 404 {
            assert!(
                v["error"].is_string() && v["hint"].is_string(),
                "{method} {path}: {v}"
            );
        }
    }
    assert_host_alive(&mut node);
}

#[test]
fn children_drop_to_the_configured_user_without_capabilities() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root, like the rest of the end-to-end suite"
    );
    let host = format!("{FAST_HOST}\nuser = \"nobody\"\n");
    let node = Node::start(&host, &section("cam", "process", "none"));
    let v = node.wait_plugin("cam", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    let pid = v["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert!(field("Uid:").iter().all(|u| u == "65534"), "{status}");
    assert!(field("Gid:").iter().all(|g| g == "65534"), "{status}");
    for cap in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
        assert_eq!(
            field(cap),
            vec!["0000000000000000".to_string()],
            "{cap} in {status}"
        );
    }
    assert_eq!(field("NoNewPrivs:"), vec!["1".to_string()]);
    let (code, _) = node.call("GET", "/plugins/cam/");
    assert_eq!(code, 200, "routes still work from the unprivileged child");
}

/// A field of /proc/<pid>/status, split on whitespace.
fn proc_status(pid: u64, name: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|rest| rest.split_whitespace().map(str::to_string).collect())
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

fn owner(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).unwrap().uid()
}

/// A node whose config is written into `dir` as `Node::start_full` would, with the plugin
/// directories given.
fn start_in(
    dir: tempfile::TempDir,
    runtime: &std::path::Path,
    state: &std::path::Path,
    host: &str,
    sections: &str,
) -> Node {
    let key = common::write_key(dir.path());
    let config = dir.path().join("myelin.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nname = \"robot1\"\nprivate_key_file = \"{}\"\naddress = [\"10.77.0.1/16\"]\n\n[control]\nlisten = \"127.0.0.1:0\"\n\n[plugins]\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\n{host}\n{sections}\n",
            key.display(),
            runtime.display(),
            state.display()
        ),
    )
    .unwrap();
    Node::start_with(std::sync::Arc::new(common::Netns::new("user")), dir, config)
}

fn open_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn by_default_children_run_as_the_unprivileged_myelin_user_without_capabilities() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test needs root");
    let dir = open_dir();
    let (runtime, state_dir) = (dir.path().join("run"), dir.path().join("state"));
    // What a plugin that ran as root before this default left behind, and a link out of its
    // directory that handing the directory over must not follow.
    let old = state_dir.join("cam/sub");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::write(old.join("latched.json"), b"{}").unwrap();
    std::fs::set_permissions(
        old.join("latched.json"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"root's").unwrap();
    std::os::unix::fs::symlink(&outside, state_dir.join("cam/escape")).unwrap();
    let sections = [
        section("cam", "process", "none"),
        section("other", "process", "none"),
        section("inside", "thread", "none"),
    ]
    .concat();
    let node = start_in(dir, &runtime, &state_dir, FAST_HOST, &sections);
    let mut uids = Vec::new();
    for name in ["cam", "other"] {
        let v = node.wait_plugin(name, Duration::from_secs(20), "running", |v| {
            state(v) == "running"
        });
        let pid = v["pid"].as_u64().unwrap();
        let uid = proc_status(pid, "Uid:");
        assert!(
            uid.len() == 4 && uid.iter().all(|u| u == &uid[0]) && uid[0] != "0",
            "{name}: real, effective, saved and fs uid are one non-root uid: {uid:?}"
        );
        for cap in ["CapEff:", "CapPrm:", "CapInh:", "CapAmb:"] {
            assert_eq!(
                proc_status(pid, cap),
                vec!["0000000000000000".to_string()],
                "{name}: {cap}"
            );
        }
        assert_eq!(proc_status(pid, "NoNewPrivs:"), vec!["1".to_string()]);
        assert_eq!(proc_status(pid, "Groups:"), Vec::<String>::new(), "{name}");
        uids.push(uid[0].parse::<u32>().unwrap());
    }
    let log = node.log();
    let myelin = std::process::Command::new("id")
        .args(["-u", "myelin"])
        .output()
        .unwrap();
    if log.contains("which no user owns") {
        eprintln!("the myelin user could not be created here; children use a dynamic uid");
    } else {
        assert!(
            myelin.status.success(),
            "the node creates the user when it is absent; log:\n{log}"
        );
        let want: u32 = String::from_utf8_lossy(&myelin.stdout)
            .trim()
            .parse()
            .unwrap();
        assert_eq!(uids, vec![want, want], "children run as `myelin`");
    }
    assert!(
        log.contains("process plugins run as user `myelin`") || log.contains("which no user owns"),
        "{log}"
    );
    assert!(
        log.contains("isolation = \"thread\": this plugin runs inside the node"),
        "in-process plugins keep the node's privileges, and the log says so:\n{log}"
    );
    assert_eq!(
        node.plugin("inside")["pid"],
        Value::Null,
        "thread plugins run inside the node"
    );

    // Its directories are its own, old files included; nothing outside was touched.
    for p in [
        state_dir.join("cam"),
        state_dir.join("cam/sub"),
        state_dir.join("cam/sub/latched.json"),
        runtime.join("cam"),
        runtime.join("cam/http.sock"),
    ] {
        assert_eq!(owner(&p), uids[0], "{}", p.display());
    }
    assert_eq!(
        owner(&outside),
        0,
        "a symlink in the plugin's directory is not followed"
    );
    let (code, v) = node.call("GET", "/plugins/cam/");
    assert_eq!(code, 200, "routes work from the unprivileged child: {v}");
}

#[test]
fn plugins_run_as_root_only_when_asked_and_the_log_warns() {
    let host = format!("{FAST_HOST}\nuser = \"root\"\n");
    let node = Node::start(&host, &section("cam", "process", "none"));
    let v = node.wait_plugin("cam", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    let pid = v["pid"].as_u64().unwrap();
    assert!(proc_status(pid, "Uid:").iter().all(|u| u == "0"));
    let log = node.log();
    assert!(
        log.contains("WARN")
            && log.contains(
                "[plugins].user = \"root\": process plugins run as root with the node's capabilities"
            )
            && log.contains("fix: remove [plugins].user"),
        "{log}"
    );
}

#[test]
fn a_plugin_user_kept_out_of_its_directories_fails_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = open_dir();
    let private = dir.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (runtime, state) = (private.join("run"), dir.path().join("state"));
    let host = FAST_HOST.replace("restart_backoff_ms = 200", "restart_backoff_ms = 60000");
    let node = start_in(
        dir,
        &runtime,
        &state,
        &host,
        &section("cam", "process", "none"),
    );
    let v = node.wait_plugin("cam", Duration::from_secs(20), "failed once", |v| {
        v["failures"].as_array().is_some_and(|f| !f.is_empty())
    });
    let reason = v["failures"][0]["reason"].as_str().unwrap().to_string();
    for want in [
        format!(
            "cannot use its runtime directory {}",
            runtime.join("cam").display()
        ),
        format!("cannot enter {} (mode 700, owner uid 0)", private.display()),
        "chmod o+x".to_string(),
        "[plugins].runtime_dir".to_string(),
    ] {
        assert!(reason.contains(&want), "{reason:?} should contain {want:?}");
    }
}

#[test]
fn the_remote_listener_needs_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("api.token");
    std::fs::write(&token, "0123456789abcdef-remote-token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let control = format!(
        "remote_listen = \"127.0.0.2:7801\"\ntoken_file = \"{}\"",
        token.display()
    );
    let ns = std::sync::Arc::new(common::Netns::new("remote"));
    let node = Node::start_full(
        ns,
        &control,
        FAST_HOST,
        "[plugins.cam]\nplugin = \"chaos\"\n",
    );
    let remote: std::net::SocketAddr = "127.0.0.2:7801".parse().unwrap();
    let (code, v) = node.call_at(remote, None, "GET", "/api/v1/status");
    assert_eq!(code, 401, "{v}");
    assert!(v["hint"].as_str().unwrap().contains("Bearer"), "{v}");
    let (code, _) = node.call_at(
        remote,
        Some("0123456789abcdef-wrong-token"),
        "GET",
        "/api/v1/status",
    );
    assert_eq!(code, 401);
    let (code, v) = node.call_at(
        remote,
        Some("0123456789abcdef-remote-token"),
        "GET",
        "/api/v1/status",
    );
    assert_eq!(
        (code, v["node"]["name"].as_str()),
        (200, Some("robot1")),
        "{v}"
    );
    let (code, _) = node.call_at(
        remote,
        Some("0123456789abcdef-remote-token"),
        "POST",
        "/api/v1/plugins/cam/restart",
    );
    assert_eq!(code, 200);
    let (code, _) = node.call_at(remote, None, "POST", "/api/v1/plugins/cam/disable");
    assert_eq!(code, 401, "no toggles without the token");
    assert_eq!(
        node.call("GET", "/api/v1/status").0,
        200,
        "loopback stays token-free"
    );
}

#[test]
fn events_stream_reports_plugin_changes_as_they_happen() {
    use std::io::{BufRead, Write};
    let node = Node::start(FAST_HOST, &section("cam", "process", "none"));
    node.wait_plugin("cam", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    let api = node.api;
    let seen = node.ns.enter(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut events = std::net::TcpStream::connect(api).unwrap();
        events.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(events, "GET /api/v1/events HTTP/1.1\r\nHost: {api}\r\n\r\n").unwrap();
        let mut lines = std::io::BufReader::new(events).lines();
        let mut seen = Vec::new();
        let mut kind = String::new();
        let mut disabled_sent = false;
        while std::time::Instant::now() < deadline {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(k) = line.strip_prefix("event: ") {
                kind = k.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                if kind == "plugin" {
                    seen.push(v["state"].as_str().unwrap_or("").to_string());
                    if v["state"] == "running" && !disabled_sent {
                        let mut post = std::net::TcpStream::connect(api).unwrap();
                        write!(post, "POST /api/v1/plugins/cam/disable HTTP/1.1\r\nHost: {api}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
                        // Wait for the answer: a connection closed before it may cancel the
                        // request on the server.
                        let mut answer = String::new();
                        std::io::Read::read_to_string(&mut post, &mut answer).unwrap();
                        assert!(answer.starts_with("HTTP/1.1 200"), "disable: {answer}");
                        disabled_sent = true;
                    }
                    if v["state"] == "disabled" {
                        break;
                    }
                }
            }
        }
        seen
    });
    assert_eq!(
        seen.first().map(String::as_str),
        Some("running"),
        "the stream starts with the present: {seen:?}"
    );
    assert_eq!(
        seen.last().map(String::as_str),
        Some("disabled"),
        "and reports the change: {seen:?}"
    );
}
