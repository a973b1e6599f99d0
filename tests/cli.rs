//! The command line against real processes: keys byte-compatible with `wg`, `init`, config
//! and key-file errors, `version`, and the commands that talk to a running node.

mod common;

use common::{keypair, state, Netns, Node, BIN, FAST_HOST};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run myelin")
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {cmd}: {e} (the test script installs wireguard-tools)")
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn keys_are_byte_compatible_with_wg() {
    for _ in 0..5 {
        // wg's key, our public key.
        let wg_key = Command::new("wg")
            .arg("genkey")
            .output()
            .expect("wg genkey (install wireguard-tools)");
        let wg_key = String::from_utf8(wg_key.stdout).unwrap();
        assert_eq!(
            run_stdin(BIN, &["pubkey"], &wg_key),
            run_stdin("wg", &["pubkey"], &wg_key)
        );
        // Our key, wg's public key.
        let ours = stdout(&run(&["keygen"]));
        assert_eq!(
            ours.len(),
            45,
            "44 base64 characters and a newline: {ours:?}"
        );
        assert_eq!(
            run_stdin(BIN, &["pubkey"], &ours),
            run_stdin("wg", &["pubkey"], &ours)
        );
    }
    let bad = Command::new(BIN)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut bad = bad;
    bad.stdin.take().unwrap().write_all(b"not a key\n").unwrap();
    let out = bad.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("44 characters of base64"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn version_lists_exactly_the_compiled_plugins() {
    let out = run(&["version", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut plugins: Vec<String> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let mut features: Vec<String> = v["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        // Feature sets, and a plugin's second backend, are not plugins of their own.
        .filter(|f| f != "full" && f != "static")
        .map(|f| {
            if f == "ai-onnxruntime" {
                "ai".to_string()
            } else {
                f
            }
        })
        .collect();
    plugins.sort();
    features.sort();
    features.dedup();
    assert_eq!(
        plugins, features,
        "every plugin feature shows up as a registered plugin, and nothing else"
    );
    assert!(
        plugins.contains(&"chaos".to_string()),
        "the suite is built with --features chaos"
    );
    for key in ["version", "git", "target", "profile", "rustc"] {
        assert!(
            v[key].as_str().is_some_and(|s| !s.is_empty()),
            "{key} in {v}"
        );
    }
    let text = stdout(&run(&["version"]));
    assert!(text.contains("chaos") && text.contains("target:"), "{text}");
}

#[test]
fn init_writes_a_private_key_and_a_config_that_starts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("etc");
    let out = run(&[
        "init",
        "--name",
        "robot-7",
        "--address",
        "10.77.0.7/16",
        "--address",
        "fd77::7/64",
        "--dir",
        d.to_str().unwrap(),
        "--control",
        "127.0.0.1:0",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let key = d.join("private.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = stdout(&out);
    let public = text
        .lines()
        .find_map(|l| l.strip_prefix("public key: "))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        run_stdin("wg", &["pubkey"], &std::fs::read_to_string(&key).unwrap()).trim(),
        public
    );
    let config = std::fs::read_to_string(d.join("myelin.toml")).unwrap();
    assert!(
        config.contains("name = \"robot_7\""),
        "the name is sanitised: {config}"
    );
    assert!(
        config.contains("[plugins.telemetry]"),
        "compiled product plugins are enabled: {config}"
    );
    assert!(
        !config.contains("[plugins.chaos]"),
        "the test plugin is not: {config}"
    );

    // A second init refuses to overwrite.
    let again = run(&[
        "init",
        "--name",
        "robot7",
        "--address",
        "10.77.0.7/16",
        "--dir",
        d.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));

    // The generated config starts a node.
    let node = Node::start_with(Arc::new(Netns::new("init")), dir, d.join("myelin.toml"));
    let status = node.get("/api/v1/status");
    assert_eq!(status["node"]["name"], "robot_7");
    assert_eq!(status["node"]["public_key"], public.as_str());
}

#[test]
fn a_group_readable_key_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(run(&[
        "init",
        "--name",
        "r1",
        "--address",
        "10.77.0.1/16",
        "--dir",
        d.to_str().unwrap()
    ])
    .status
    .success());
    let key = d.join("private.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ns = Netns::new("key");
    let out = ns
        .command(BIN)
        .args(["up", "--config", d.join("myelin.toml").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );
}

#[test]
fn config_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = common::write_key(dir.path());
    let mut cases = vec![
        ("mtu_typo", "[node]\nname = \"r\"\nprivate_key_file = \"KEY\"\nmtuu = 1400\n", "line 4", "node.mtuu"),
        ("bad_addr", "[node]\nname = \"r\"\nprivate_key_file = \"KEY\"\naddress = [\"10.0.0.300/8\"]\n", "line 4", "node.address"),
        ("digit_name", "[node]\nname = \"1robot\"\nprivate_key_file = \"KEY\"\n", "line 2", "node.name"),
        ("bad_isolation", "[node]\nname = \"r\"\nprivate_key_file = \"KEY\"\n[plugins.chaos]\nisolation = \"vm\"\n", "line 5", "plugins.chaos.isolation"),
        ("plugin_key", "[node]\nname = \"r\"\nprivate_key_file = \"KEY\"\n[control]\nlisten = \"127.0.0.1:0\"\n[plugins.chaos]\nmode = \"explode\"\n", "line 6", "plugins.chaos"),
        ("not_compiled", "[node]\nname = \"r\"\nprivate_key_file = \"KEY\"\n[control]\nlisten = \"127.0.0.1:0\"\n[plugins.warp]\n", "line 6", "--features warp"),
    ];
    if cfg!(feature = "zenoh") {
        cases.push(("zenoh_thread", "[node]\nname = \"r\"\nprivate_key_file = \"KEY\"\n[control]\nlisten = \"127.0.0.1:0\"\n[plugins.zenoh]\nisolation = \"thread\"\n", "line 7", "plugins.zenoh.isolation"));
        cases.push(("zenoh_namespace", "[node]\nname = \"r\"\nprivate_key_file = \"KEY\"\n[control]\nlisten = \"127.0.0.1:0\"\n[plugins.zenoh]\nnamespace = \"robot-1\"\n", "line 6", "namespace `robot-1` must start with `/`"));
    }
    let ns = Netns::new("cfg");
    for (name, text, line, key_name) in cases {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text.replace("KEY", key.to_str().unwrap())).unwrap();
        let out = ns
            .command(BIN)
            .args(["up", "--config", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{name} must fail");
        assert!(
            err.contains(path.to_str().unwrap()),
            "{name}: names the file: {err}"
        );
        assert!(err.contains(line), "{name}: names the line ({line}): {err}");
        assert!(err.contains(key_name), "{name}: names {key_name}: {err}");
        assert!(err.contains("fix:"), "{name}: says how to fix it: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
}

#[test]
fn status_peers_and_plugins_talk_to_the_running_node() {
    let node = Node::start(FAST_HOST, "[plugins.cam]\nplugin = \"chaos\"\n");
    node.wait_plugin("cam", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    let api = node.api.to_string();
    // The node's API listens on loopback inside its namespace.
    let run = |args: &[&str]| node.ns.command(BIN).args(args).output().unwrap();
    let status = run(&["status", "--api", &api]);
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        stdout(&status).contains("robot1") && stdout(&status).contains("cam (running)"),
        "{}",
        stdout(&status)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&run(&["status", "--api", &api, "--json"]).stdout).unwrap();
    assert_eq!(json["node"]["name"], "robot1");
    assert_eq!(json["tunnel"]["interface"], "myelin0");
    assert_eq!(json["tunnel"]["listen_port"], 51820);
    assert!(
        stdout(&status).contains("tunnel:     myelin0 (UDP 51820, MTU 1420"),
        "{}",
        stdout(&status)
    );

    let peers = run(&["peers", "--api", &api, "--json"]);
    assert!(peers.status.success());
    let json: serde_json::Value = serde_json::from_slice(&peers.stdout).unwrap();
    assert!(json["peers"].is_array());

    let list = run(&["plugins", "--api", &api]);
    assert!(
        stdout(&list).contains("cam") && stdout(&list).contains("running"),
        "{}",
        stdout(&list)
    );
    let off = run(&["plugins", "disable", "cam", "--api", &api, "--json"]);
    assert!(off.status.success(), "{}", stderr(&off));
    let json: serde_json::Value = serde_json::from_slice(&off.stdout).unwrap();
    assert_eq!(json["plugins"][0]["state"], "disabled");
    let on = run(&["plugins", "enable", "cam", "--api", &api]);
    assert!(on.status.success());
    node.wait_plugin("cam", Duration::from_secs(20), "running again", |v| {
        state(v) == "running"
    });

    let unknown = run(&["plugins", "restart", "nope", "--api", &api]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("no plugin instance `nope`"),
        "{}",
        stderr(&unknown)
    );
    let missing = run(&["plugins", "restart", "--api", &api]);
    assert!(stderr(&missing).contains("needs a plugin name"));

    // Nothing listening: a clear error, not a hang or a panic.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = run(&["status", "--api", &port.to_string()]);
    assert!(!down.status.success());
    assert!(
        stderr(&down).contains("is the node running"),
        "{}",
        stderr(&down)
    );
}

/// `myelin ca` in a fresh directory: a CA, a node signed by it, a constrained signer and the
/// nodes it may and may not sign, each checked by `ca verify` as a user would.
#[test]
fn ca_signs_nodes_and_constrained_signers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let in_dir = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("run myelin")
    };
    let ok = |o: Output| {
        assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
        stdout(&o)
    };
    let out = ok(in_dir(&["ca", "init", "--name", "acme-fleet"]));
    assert!(out.contains("fingerprint:"), "{out}");
    let mode = std::fs::metadata(dir.path().join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the CA key is private");
    let again = in_dir(&["ca", "init", "--name", "acme-fleet"]);
    assert!(!again.status.success() && stderr(&again).contains("--force"));
    let (_, public) = keypair();
    ok(in_dir(&[
        "ca",
        "sign",
        "--name",
        "robot7",
        "--pubkey",
        &public,
        "--address",
        "10.77.0.7/16",
        "--groups",
        "robots,cameras",
    ]));
    let show = ok(in_dir(&["ca", "show", "robot7.crt", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(v[0]["public_key"], public.as_str());
    assert_eq!(v[0]["groups"], serde_json::json!(["cameras", "robots"]));
    assert!(ok(in_dir(&["ca", "verify", "robot7.crt"])).contains("valid: `robot7`"));

    // A signer for lighthouses: robots in 10.77.0.0/16 for at most 30 days.
    ok(in_dir(&[
        "ca",
        "sign",
        "--signer",
        "--name",
        "lh1",
        "--range",
        "10.77.0.0/16",
        "--groups",
        "robots",
    ]));
    let by_signer = |name: &str, addr: &str, groups: &str, days: &str| {
        in_dir(&[
            "ca",
            "sign",
            "--name",
            name,
            "--pubkey",
            &public,
            "--address",
            addr,
            "--groups",
            groups,
            "--days",
            days,
            "--ca-key",
            "lh1.key",
            "--ca-cert",
            "lh1.crt",
        ])
    };
    ok(by_signer("robot8", "10.77.0.8/16", "robots", "30"));
    let verified = ok(in_dir(&["ca", "verify", "robot8.crt"]));
    assert!(verified.contains("signed by `lh1`"), "{verified}");
    for (addr, groups, days, words) in [
        (
            "10.78.0.9/16",
            "robots",
            "30",
            "address 10.78.0.9/16 is outside",
        ),
        (
            "10.77.0.9/16",
            "operators",
            "30",
            "group operators is outside",
        ),
        (
            "10.77.0.9/16",
            "robots",
            "31",
            "lifetime 31 days left is outside",
        ),
    ] {
        let o = by_signer("robot9", addr, groups, days);
        assert!(
            !o.status.success() && stderr(&o).contains(words),
            "{}",
            stderr(&o)
        );
        assert!(
            !dir.path().join("robot9.crt").exists(),
            "nothing is written on refusal"
        );
    }

    // Another fleet's CA does not accept this fleet's node; a tampered file is refused.
    let other = tempfile::tempdir().unwrap();
    ok(Command::new(BIN)
        .args([
            "ca",
            "init",
            "--name",
            "other",
            "--dir",
            other.path().to_str().unwrap(),
        ])
        .output()
        .unwrap());
    let foreign = in_dir(&[
        "ca",
        "verify",
        "robot7.crt",
        "--ca",
        &format!("{}/ca.crt", other.path().display()),
    ]);
    assert!(
        !foreign.status.success() && stderr(&foreign).contains("not by this fleet's CA"),
        "{}",
        stderr(&foreign)
    );
    let pem = std::fs::read_to_string(format!("{d}/robot7.crt")).unwrap();
    let lines: Vec<&str> = pem.lines().collect();
    let mut body = lines[1].to_string();
    let flipped = if body.as_bytes()[10] == b'A' {
        "B"
    } else {
        "A"
    };
    body.replace_range(10..11, flipped);
    let tampered = format!("{}\n{}\n{}\n", lines[0], body, lines[2..].join("\n"));
    std::fs::write(format!("{d}/tampered.crt"), tampered).unwrap();
    let t = in_dir(&["ca", "verify", "tampered.crt"]);
    assert!(!t.status.success(), "a tampered certificate verified");
    let bad_name = in_dir(&[
        "ca",
        "sign",
        "--name",
        "Robot_9",
        "--pubkey",
        &public,
        "--address",
        "10.77.0.9/16",
    ]);
    assert!(
        stderr(&bad_name).contains("invalid name `Robot_9`"),
        "{}",
        stderr(&bad_name)
    );
}
