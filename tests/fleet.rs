//! The fleet view end to end, in labs started as a user starts them: the operator's fleet page in
//! headless Chromium on the lab host (every robot with its interlock, video from the lab
//! cameras, a trip shown within 2 s, a re-arm from the page), `myelin fleet` on the operator
//! and on a robot (which sees only what its identity may), and a 50-node lab listed in time.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Both labs route the overlay from the host through their operator: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());
const FABRIC: &str = "6";

fn artifacts() -> PathBuf {
    let dir = PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into()))
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `myelin lab up`, stopped with Ctrl-C when dropped (then `lab down`, in case the
/// test failed before the lab had started). Holds the fleet tests' turn.
struct Lab {
    up: std::process::Child,
    dir: tempfile::TempDir,
    transcript: String,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Lab {
    /// `myelin lab up --nodes <nodes> <extra>` on this file's fabric, up and meshed.
    fn start(nodes: usize, extra: &[&str]) -> Lab {
        let turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the lab needs root");
        let dir = tempfile::tempdir().unwrap();
        let (up, transcript) =
            common::lab_up_with(FABRIC, nodes, dir.path().to_str().unwrap(), extra);
        Lab {
            up,
            dir,
            transcript,
            _turn: turn,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SAFETY: interrupting our own child, as Ctrl-C would.
        unsafe { libc::kill(self.up.id() as i32, libc::SIGINT) };
        let _ = self.up.wait();
        let _ = common::lab_command()
            .env(myelin::lab::FABRIC_ENV, FABRIC)
            .args(["lab", "down", "--dir"])
            .arg(self.dir.path())
            .status();
    }
}

/// The last lines of every node log in the lab's directory (for a failure's message): 30 of
/// the operator's and the lighthouse's, and of each robot's in a small lab; 4 of each robot's
/// in a large one, so the message stays readable.
fn lab_logs(dir: &Path) -> String {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    let large = logs.len() > 8;
    let mut out = String::new();
    for path in logs {
        let robot = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("robot"));
        let keep = if large && robot { 4 } else { 30 };
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out += &format!("--- {} (last {keep} lines)\n", path.display());
        for l in &lines[lines.len().saturating_sub(keep)..] {
            out += l;
            out += "\n";
        }
    }
    out
}

/// Runs browser script `script` (in tests/browser) with `args`; its output, once it succeeded.
/// A failure shows the lab's logs from `logs`.
fn browser(script: &str, args: &[&str], logs: &Path) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run scripts/setup.sh (it runs `npm ci` in tests/browser)"
    );
    let run = Command::new("node")
        .arg(dir.join(script))
        .args(args)
        .output()
        .expect("node (the test script installs nodejs)");
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "browser run failed:\n{stdout}\n{}\nthe lab's logs:\n{}",
        String::from_utf8_lossy(&run.stderr),
        lab_logs(logs)
    );
    eprintln!("{stdout}");
    stdout
}

/// `myelin fleet --json` run inside lab namespace `ns`.
fn fleet_json(ns: &str) -> serde_json::Value {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, common::BIN, "fleet", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "myelin fleet --json in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn member<'a>(fleet: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    fleet["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{name} is missing from {fleet}"))
}

fn safety_state(card: &serde_json::Value) -> Option<String> {
    card["summary"]["summaries"]
        .as_object()?
        .values()
        .find(|s| s["kind"] == "safety")?["state"]
        .as_str()
        .map(str::to_string)
}

fn fleet_url(transcript: &str) -> String {
    transcript
        .lines()
        .find_map(|l| l.strip_prefix("the fleet page"))
        .and_then(|l| l.split_once(": http://"))
        .map(|(_, url)| format!("http://{}", url.trim()))
        .unwrap_or_else(|| panic!("lab up printed no fleet page URL:\n{transcript}"))
}

#[test]
fn the_fleet_page_shows_every_robot_plays_video_and_re_arms() {
    let lab = Lab::start(3, &[]);
    let transcript = &lab.transcript;
    let url = fleet_url(transcript);
    let robot1_url = transcript
        .lines()
        .filter_map(|l| l.trim().strip_prefix("robot1 "))
        .map(str::trim)
        .find(|u| u.starts_with("http://"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no dashboard URL for robot1:\n{transcript}"));
    let ns = |node: &str| format!("mlab{FABRIC}-{node}");

    // The terminal view first: every member from the operator, each robot with its interlock.
    let fleet = common::wait_for(
        std::time::Duration::from_secs(60),
        "every robot's card with an interlock state on the operator",
        || {
            let v = fleet_json(&ns("operator"));
            ["robot1", "robot2"]
                .iter()
                .all(|r| safety_state(member(&v, r)).is_some())
                .then_some(v)
        },
    );
    assert_eq!(fleet["members"].as_array().unwrap().len(), 4, "{fleet}");
    for robot in ["robot1", "robot2"] {
        let card = member(&fleet, robot);
        assert_eq!(card["reachable"], true, "{card}");
        assert_eq!(
            card["overlay"],
            if robot == "robot1" {
                "10.77.0.2"
            } else {
                "10.77.0.3"
            }
        );
        let streams = card["summary"]["summaries"]["webrtc"]["streams"].clone();
        assert_eq!(streams[0]["name"], "front", "{card}");
    }
    let table = Command::new("ip")
        .args(["netns", "exec", &ns("operator"), common::BIN, "fleet"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    eprintln!("{table}");
    assert!(table.starts_with("MEMBER"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("robot1") && l.contains("running")),
        "{table}"
    );
    // A robot's own view: other robots' APIs admit only operators, so it sees why not.
    let from_robot = fleet_json(&ns("robot1"));
    let robot2 = member(&from_robot, "robot2");
    assert_eq!(robot2["reachable"], false, "{robot2}");
    assert!(
        robot2["error"].as_str().unwrap().contains("HTTP 403"),
        "{robot2}"
    );

    // The page, in Chromium on the lab host.
    let shot = artifacts().join("fleet.png");
    let stdout = browser(
        "fleet.mjs",
        &[
            url.as_str(),
            shot.to_str().unwrap(),
            &ns("robot1"),
            "myelin0",
            &robot1_url,
            "robot1",
            "robot2",
        ],
        lab.dir.path(),
    );
    for want in [
        "with their interlock",
        "one tile per stream, playing: ",
        "robot1's trip shown on the fleet page",
        "re-armed from the page",
        "panels themed",
        "no console errors",
        "robot1's fleet view: unreachable: HTTP 403",
        "robot1's video panel: one decoding tile each for robot1/front, robot2/front",
        "no console errors on robot1's page",
    ] {
        assert!(stdout.contains(want), "{want}:\n{stdout}");
    }
    // The re-arm reached robot1's interlock with the operator's identity.
    let after = fleet_json(&ns("operator"));
    let safety = &member(&after, "robot1")["summary"]["summaries"]["safety"];
    assert!(
        safety["last_rearm"]["by"]
            .as_str()
            .is_some_and(|by| by.starts_with("operator (10.77.0.1")),
        "{safety}"
    );
    assert!(
        after["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "trip" && e["member"] == "robot1"),
        "{after}"
    );
}

#[test]
fn a_fifty_node_fleet_is_listed_in_time() {
    // Every robot runs its interlock; the other plugins (a zenoh router each, inference) would
    // make 50 nodes more than a 2-core machine holds.
    let lab = Lab::start(50, &["--plugins", "safety", "--cameras", "0"]);
    let url = fleet_url(&lab.transcript);
    let started = std::time::Instant::now();
    let fleet = common::wait_for(
        std::time::Duration::from_secs(60),
        "all 51 members reachable with the robots' interlocks in myelin fleet --json",
        || {
            let v = fleet_json(&format!("mlab{FABRIC}-operator"));
            let members = v["members"].as_array()?;
            (members.len() == 51
                && members.iter().all(|m| m["reachable"] == true)
                && members
                    .iter()
                    .filter(|m| m["name"].as_str().is_some_and(|n| n.starts_with("robot")))
                    .all(|m| safety_state(m).is_some()))
            .then_some(v)
        },
    );
    let slowest = fleet["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["answered_in_ms"].as_f64())
        .fold(0.0, f64::max);
    eprintln!(
        "myelin fleet --json listed 51 members ({:.1} s after the lab was up); slowest member answered in {slowest:.0} ms",
        started.elapsed().as_secs_f64()
    );
    let t = std::time::Instant::now();
    fleet_json(&format!("mlab{FABRIC}-operator"));
    let once = t.elapsed();
    eprintln!("one myelin fleet --json of 51 members: {once:?}");
    assert!(once < std::time::Duration::from_secs(3), "{once:?}");
    let shot = artifacts().join("fleet50.png");
    let stdout = browser(
        "fleet50.mjs",
        &[url.as_str(), "51", shot.to_str().unwrap()],
        lab.dir.path(),
    );
    assert!(stdout.contains("51 cards ready"), "{stdout}");
    assert!(stdout.contains("keeps updating"), "{stdout}");
}
