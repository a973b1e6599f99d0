//! `myelin lab` as a user runs it: up (foreground), status, exec across the mesh, Ctrl-C, and
//! nothing left behind; `down` is safe to repeat.

mod common;

use common::BIN;
use std::process::Command;
use std::time::Duration;

fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for line in String::from_utf8_lossy(&ns.stdout).lines() {
        if line.starts_with("mlab-") {
            found.push(format!("namespace {line}"));
        }
    }
    for link in std::fs::read_dir("/sys/class/net").unwrap().flatten() {
        let name = link.file_name().to_string_lossy().into_owned();
        if name == "mlab0" || name.starts_with("mlab0-") {
            found.push(format!("link {name}"));
        }
    }
    found
}

#[test]
fn lab_up_meshes_three_nodes_and_ctrl_c_removes_everything() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the lab needs root");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let (mut up, transcript) = common::lab_up(3, &d);
    assert!(transcript.contains("handshakes: 6/6"), "{transcript}");
    assert!(
        transcript.contains("http://10.210.0.1:7800/#token="),
        "{transcript}"
    );

    let status = Command::new(BIN)
        .args(["lab", "status", "--dir", &d, "--json"])
        .output()
        .unwrap();
    assert!(status.status.success());
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(v["sessions_up"], 6, "{v:#}");

    // Every node reaches every other through the tunnel.
    for (from, to) in [
        ("operator", "10.77.0.3"),
        ("robot1", "10.77.0.1"),
        ("robot2", "fd77::2"),
    ] {
        let ping = Command::new(BIN)
            .args([
                "lab", "exec", "--dir", &d, from, "--", "ping", "-c", "1", "-W", "2", to,
            ])
            .output()
            .unwrap();
        assert!(
            ping.status.success(),
            "{from} -> {to}: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
    }
    let failing = Command::new(BIN)
        .args(["lab", "exec", "--dir", &d, "robot1", "--", "false"])
        .status()
        .unwrap();
    assert_eq!(
        failing.code(),
        Some(1),
        "exec passes the command's exit status on"
    );
    let unknown = Command::new(BIN)
        .args(["lab", "exec", "--dir", &d, "robot9", "--", "true"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no lab node `robot9`"));

    let pids: Vec<u64> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pid"].as_u64().unwrap())
        .collect();
    // SAFETY: interrupting our own child, as Ctrl-C would.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let code = up.wait().unwrap();
    assert!(code.success(), "lab up exits 0 after Ctrl-C: {code:?}");
    for pid in pids {
        common::wait_gone(pid, Duration::from_secs(5), "lab node after Ctrl-C");
    }
    assert_eq!(
        leftovers(),
        Vec::<String>::new(),
        "the lab removed everything"
    );
    let again = Command::new(BIN)
        .args(["lab", "down", "--dir", &d])
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "down is idempotent: {}",
        String::from_utf8_lossy(&again.stderr)
    );
}
