//! The dashboard in a real browser: headless Chromium, driven by playwright-core, opens a lab
//! node's dashboard from the host, sees the other peers with an RTT, switches a plugin off and
//! on, and the API follows each change. The screenshot is kept as a test artifact.

mod common;

use std::process::Command;

#[test]
fn dashboard_shows_the_fleet_and_toggles_a_plugin() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the lab needs root");
    let browser_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run scripts/setup.sh (it runs `npm ci` in tests/browser)"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let (mut up, transcript) = common::lab_up(3, &d);
    let url = transcript
        .lines()
        .filter(|l| l.contains("http://"))
        .find_map(|l| {
            l.trim()
                .strip_prefix("robot1")
                .map(|u| u.trim().to_string())
        })
        .expect("robot1's dashboard URL");
    let artifacts = std::path::PathBuf::from(
        std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()),
    )
    .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    eprintln!("dashboard URL: {url}");
    let run = Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .args([url.as_str(), shot.to_str().unwrap(), "chaos"])
        .output()
        .expect("node (the test script installs nodejs)");
    // SAFETY: interrupting our own child, as Ctrl-C would.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let stopped = up.wait().unwrap();
    assert!(
        stopped.success(),
        "lab up stops cleanly on Ctrl-C: {stopped:?}"
    );
    assert!(
        !std::path::Path::new(&format!("/sys/class/net/{}", common::LAB_BRIDGE)).exists(),
        "the lab removed its bridge"
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "browser run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains(
            "safety panel shows the interlock armed on the operator link, its lock action applied"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("switched chaos on; the API and the page agree"),
        "{stdout}"
    );
    assert!(
        stdout.contains("a panel's call to %2e%2e/%2e%2e/api/v1/plugins/safety/disable is refused"),
        "{stdout}"
    );
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "screenshot saved at {}",
        shot.display()
    );
    eprintln!("{stdout}screenshot: {}", shot.display());
}
