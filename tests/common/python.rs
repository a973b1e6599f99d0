//! Test clients written by others, run from the Python venv that scripts/setup.sh makes
//! (`$MYELIN_VENV`, default /var/cache/myelin/venv) inside a test namespace.

use super::netns::Netns;
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn venv_python() -> String {
    let venv = std::env::var("MYELIN_VENV").unwrap_or_else(|_| "/var/cache/myelin/venv".into());
    let python = format!("{venv}/bin/python");
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} is missing: run scripts/setup.sh (it makes the venv with the test clients)"
    );
    python
}

pub fn script(name: &str) -> String {
    format!("{}/tests/python/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A running client; its stdout and stderr lines arrive on a channel. Killed on drop.
pub struct Py {
    pub what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Py {
    pub fn spawn(ns: &Netns, script_name: &str, args: &[&str]) -> Py {
        let mut child = ns
            .command(&venv_python())
            .arg(script(script_name))
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {l}"));
            }
        });
        Py {
            what: format!("{script_name} {} in {}", args.join(" "), ns.name),
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for a line that satisfies `want`; fails after `timeout` with everything seen.
    pub fn wait_line(&mut self, timeout: Duration, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if want(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "timed out after {timeout:?} waiting on {}; it printed:\n{}",
                    self.what,
                    self.seen.join("\n")
                ),
            }
        }
    }

    pub fn ready(&mut self) {
        self.wait_line(Duration::from_secs(30), |l| l == "ready");
    }

    /// Tells a `--go` publisher to start.
    pub fn go(&mut self) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(b"go\n");
            let _ = stdin.flush();
        }
    }

    /// The client's JSON result line.
    pub fn result(&mut self, timeout: Duration) -> serde_json::Value {
        // Every client ends with one JSON line carrying "done": true.
        let line = self.wait_line(timeout, |l| {
            l.starts_with('{') && l.contains("\"done\": true")
        });
        serde_json::from_str(&line).expect("result JSON")
    }

    /// The next line within `within`, or `None` if the client stayed silent that long.
    pub fn next_line(&mut self, within: Duration) -> Option<String> {
        let line = self.lines.recv_timeout(within).ok()?;
        self.seen.push(line.clone());
        Some(line)
    }

    pub fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
