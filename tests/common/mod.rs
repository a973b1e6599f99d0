//! Test harness: starts a real `myelin up` process with a generated key and config, and talks
//! to its control API. Every wait is a bounded poll that fails with a message.

#![allow(dead_code)]

pub mod mesh;
pub mod netns;
pub mod python;
pub mod relay;

// Not every test binary builds a mesh-formed fleet.
#[allow(unused_imports)]
pub use mesh::{mesh_formed_fleet, mesh_formed_fleet_with, MeshFleet};
pub use netns::Netns;

use serde_json::Value;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_myelin");

/// Fast supervision settings so failures play out in seconds.
pub const FAST_HOST: &str = r#"
health_interval_ms = 100
health_timeout_ms = 600
stop_grace_ms = 400
restart_backoff_ms = 200
restart_backoff_max_ms = 60000
failure_threshold = 5
failure_window_s = 300
start_timeout_ms = 10000
"#;

pub struct Node {
    pub child: Child,
    pub ns: Arc<Netns>,
    pub api: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    log: PathBuf,
}

pub fn write_key(dir: &std::path::Path) -> PathBuf {
    let out = Command::new(BIN)
        .arg("keygen")
        .output()
        .expect("run keygen");
    assert!(out.status.success());
    let path = dir.join("private.key");
    std::fs::write(&path, &out.stdout).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

impl Node {
    /// `host` goes under `[plugins]`; `sections` follow as-is.
    pub fn start(host: &str, sections: &str) -> Node {
        Self::start_in(Arc::new(Netns::new("node")), host, sections)
    }

    /// A node alone in network namespace `ns`.
    pub fn start_in(ns: Arc<Netns>, host: &str, sections: &str) -> Node {
        Self::start_full(ns, "", host, sections)
    }

    /// `control` adds keys to `[control]`.
    pub fn start_full(ns: Arc<Netns>, control: &str, host: &str, sections: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = write_key(dir.path());
        let config = dir.path().join("myelin.toml");
        let text = format!(
            "[node]\nname = \"robot1\"\nprivate_key_file = \"{}\"\naddress = [\"10.77.0.1/16\"]\n\n[control]\nlisten = \"127.0.0.1:0\"\n{control}\n\n[plugins]\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\n{host}\n{sections}\n",
            key.display(),
            dir.path().join("run").display(),
            dir.path().join("state").display()
        );
        std::fs::write(&config, text).unwrap();
        Self::start_with(ns, dir, config)
    }

    /// Starts the node the way `myelin lab` does, and finds its API address in its log.
    pub fn start_with(ns: Arc<Netns>, dir: tempfile::TempDir, config: PathBuf) -> Node {
        let log = dir.path().join("node.log");
        let out = std::fs::File::create(&log).unwrap();
        // Backtraces of crash-looping test plugins would cost more CPU than the tests measure.
        let child = myelin::lab::node_command(std::path::Path::new(BIN), &ns.name, &config)
            .env_remove("RUST_BACKTRACE")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start myelin up");
        let mut node = Node {
            child,
            ns,
            api: "127.0.0.1:0".parse().unwrap(),
            dir,
            config,
            log,
        };
        node.wait_api(0);
        node
    }

    /// Finds the control API address the node logs after byte `from` of its log.
    fn wait_api(&mut self, from: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = self.log();
            let fresh = text.get(from..).unwrap_or("");
            if let Some(rest) = fresh.split("control API listening on http://").nth(1) {
                let addr: String = rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '\x1b')
                    .collect();
                self.api = addr.parse().expect("API address");
                return;
            }
            let exited = self.child.try_wait().unwrap().is_some();
            if exited || Instant::now() > deadline {
                panic!("node did not report its control API (exited: {exited}); log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the node with SIGKILL (as a crash or power loss would end it) and starts it again
    /// with the same config and directories; its log goes on in the same file.
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let from = self.log().len();
        let out = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child =
            myelin::lab::node_command(std::path::Path::new(BIN), &self.ns.name, &self.config)
                .env_remove("RUST_BACKTRACE")
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("start myelin up again");
        self.wait_api(from);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn call(&self, method: &str, path: &str) -> (u16, Value) {
        self.call_at(self.api, None, method, path)
    }

    /// A request with a JSON body to this node's local API.
    pub fn call_json(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let (api, m, p) = (self.api, method.to_string(), path.to_string());
        let (status, answer) = self
            .ns
            .enter(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(myelin::api::client::call(api, &m, &p, Some(body), None))
            })
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nlog:\n{}", self.log()));
        let value = serde_json::from_slice(&answer)
            .unwrap_or(Value::String(String::from_utf8_lossy(&answer).into()));
        (status, value)
    }

    /// A request to `api` (any listener of this node) with an optional bearer token.
    pub fn call_at(
        &self,
        api: SocketAddr,
        bearer: Option<&str>,
        method: &str,
        path: &str,
    ) -> (u16, Value) {
        let (m, p, b) = (
            method.to_string(),
            path.to_string(),
            bearer.map(str::to_string),
        );
        let (status, body) = self
            .ns
            .enter(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(myelin::api::client::call(api, &m, &p, None, b.as_deref()))
            })
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nlog:\n{}", self.log()));
        let value = serde_json::from_slice(&body)
            .unwrap_or(Value::String(String::from_utf8_lossy(&body).into()));
        (status, value)
    }

    pub fn get(&self, path: &str) -> Value {
        let (status, v) = self.call("GET", path);
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    pub fn plugin(&self, name: &str) -> Value {
        self.get(&format!("/api/v1/plugins/{name}"))
    }

    /// Polls the plugin's status until `pred` holds, or fails after `timeout` saying `what`.
    pub fn wait_plugin(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.poll(
            &format!("plugin `{name}` to be {what}"),
            timeout,
            || self.plugin(name),
            pred,
        )
    }

    /// Fetches with `fetch` until `pred` holds, or fails after `timeout` naming `what`.
    pub fn poll(
        &self,
        what: &str,
        timeout: Duration,
        fetch: impl Fn() -> Value,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = fetch();
            if pred(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; last seen: {v:#}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> String {
        let (status, v) = self.call("GET", "/metrics");
        assert_eq!(status, 200);
        v.as_str().unwrap_or_default().to_string()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True once `pid` no longer runs (gone, or a zombie awaiting its reaper).
pub fn process_gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

pub fn wait_gone(pid: u64, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while !process_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "{what}: process {pid} still runs after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("")
}

/// A fresh key pair as (private, public), both base64.
pub fn keypair() -> (String, String) {
    let private =
        String::from_utf8(Command::new(BIN).arg("keygen").output().unwrap().stdout).unwrap();
    let mut child = Command::new(BIN)
        .arg("pubkey")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), private.as_bytes()).unwrap();
    let public = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    (private.trim().to_string(), public.trim().to_string())
}

/// One node of a test mesh.
#[derive(Clone)]
pub struct Spec {
    pub name: String,
    pub private: String,
    pub public: String,
    pub addresses: Vec<String>,
    /// `[[peers]]` tables, `[plugins...]` sections and anything else, appended as-is.
    pub rest: String,
    /// Lines added to `[control]` (remote_listen, allow_groups, ...).
    pub control: String,
    /// `[probe].interval_ms`.
    pub probe_ms: u64,
}

impl Spec {
    pub fn new(name: &str, addresses: &[&str]) -> Spec {
        let (private, public) = keypair();
        Spec {
            name: name.into(),
            private,
            public,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            rest: String::new(),
            control: String::new(),
            probe_ms: 100,
        }
    }

    /// Adds `other` as a peer, reachable at `endpoint` if given.
    pub fn peer(&mut self, other: &Spec, endpoint: Option<&str>, extra: &str) {
        let allowed: Vec<String> = other
            .addresses
            .iter()
            .map(|a| {
                let ip = a.split('/').next().unwrap();
                format!("\"{ip}/{}\"", if ip.contains(':') { 128 } else { 32 })
            })
            .collect();
        self.rest.push_str(&format!(
            "[[peers]]\nname = \"{}\"\npublic_key = \"{}\"\nallowed_ips = [{}]\n{}{extra}\n",
            other.name,
            other.public,
            allowed.join(", "),
            endpoint
                .map(|e| format!("endpoint = \"{e}\"\n"))
                .unwrap_or_default()
        ));
    }
}

impl Node {
    pub fn start_spec(ns: Arc<Netns>, spec: &Spec, plugins: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = dir.path().join("private.key");
        std::fs::write(&key, &spec.private).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let addresses: Vec<String> = spec.addresses.iter().map(|a| format!("\"{a}\"")).collect();
        let text = format!(
            "[node]\nname = \"{}\"\nprivate_key_file = \"{}\"\nlisten_port = 51820\naddress = [{}]\n\n[control]\nlisten = \"127.0.0.1:0\"\n{}\n[probe]\ninterval_ms = {}\n\n{}\n[plugins]\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\n{plugins}\n",
            spec.name,
            key.display(),
            addresses.join(", "),
            spec.control,
            spec.probe_ms,
            spec.rest,
            dir.path().join("run").display(),
            dir.path().join("state").display()
        );
        let config = dir.path().join("myelin.toml");
        std::fs::write(&config, text).unwrap();
        Self::start_with(ns, dir, config)
    }

    pub fn peer(&self, name: &str) -> Value {
        let peers = self.get("/api/v1/peers");
        peers["peers"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
            .unwrap_or(Value::Null)
    }

    /// Polls the peer's view until `pred` holds, or fails after `timeout` saying `what`.
    pub fn wait_peer(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.poll(
            &format!("peer `{name}` to be {what}"),
            timeout,
            || self.peer(name),
            pred,
        )
    }
}

/// The summed value of every series of metric `name` in a Prometheus exposition whose
/// labels hold each of `labels` (e.g. `direction="in"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
                && labels.iter().all(|want| l.contains(want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sends single pings from `ns` to `addr` until one is answered; fails after `timeout`.
pub fn ping_until(ns: &Netns, addr: &str, timeout: Duration) -> Duration {
    ping_every_until(ns, addr, "0.3", timeout)
}

/// `ping_until`, each ping waiting `wait` seconds for its answer (the resolution of the time
/// returned).
pub fn ping_every_until(ns: &Netns, addr: &str, wait: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let ok = ns
            .command("ping")
            .args(["-c", "1", "-W", wait, addr])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "no ping answer from {addr} within {timeout:?} (from {})",
            ns.name
        );
    }
}

/// The tests' lab fabric: its own bridge, namespaces and subnet, so a lab the user left
/// running (`scripts/lab.sh --detach`) and the tests never meet.
pub const LAB_BRIDGE: &str = "mlab7";
pub const LAB_PREFIX: &str = "mlab7-";
pub const LAB_SUBNET: &str = "10.210.7";

/// `myelin` with the tests' lab fabric chosen.
pub fn lab_command() -> Command {
    let mut command = Command::new(BIN);
    command.env("MYELIN_LAB_FABRIC", "7");
    command
}

/// `myelin lab up --nodes <n> --dir <dir>` in the foreground, as a user starts it; returns the
/// running process and what it printed once it says the lab is up (bounded wait).
pub fn lab_up(nodes: usize, dir: &str) -> (std::process::Child, String) {
    lab_up_on("7", nodes, dir)
}

/// Polls `check` every 100 ms until it gives a value; panics after `timeout` saying `what`.
#[allow(dead_code)]
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `lab_up` on lab fabric `fabric` (1..=9), for tests that must not meet the others' labs.
pub fn lab_up_on(fabric: &str, nodes: usize, dir: &str) -> (std::process::Child, String) {
    lab_up_with(fabric, nodes, dir, &[])
}

/// `lab_up_on` with more `lab up` arguments.
pub fn lab_up_with(
    fabric: &str,
    nodes: usize,
    dir: &str,
    extra: &[&str],
) -> (std::process::Child, String) {
    use std::io::BufRead;
    // The nodes' plugin directories go in it, and plugins run as the unprivileged `myelin`
    // user, which must be able to enter it (a tempdir is 0700).
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut up = lab_command()
        .env(myelin::lab::FABRIC_ENV, fabric)
        .args(["lab", "up", "--nodes", &nodes.to_string(), "--dir", dir])
        .args(extra)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(up.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(90 + 3 * nodes as u64);
    let mut transcript = String::new();
    while !transcript.contains("Ctrl-C stops the lab") {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 || Instant::now() > deadline {
            let _ = up.kill();
            let _ = lab_command()
                .env(myelin::lab::FABRIC_ENV, fabric)
                .args(["lab", "down", "--dir", dir])
                .status();
            panic!("lab up did not come up:\n{transcript}");
        }
        transcript.push_str(&line);
    }
    // Keep reading, so the lab can still print while it shuts down.
    std::thread::spawn(move || for _ in out.lines() {});
    (up, transcript)
}

/// Nodes `names` on one lab fabric in a full mesh: node `i` has overlay `<overlay>.<i + 1>/16`
/// and every other node as a peer at its underlay address (static peers; `mesh_formed_fleet`
/// is the same fleet formed by certificates and a lighthouse).
pub fn meshed_fleet(tag: &str, names: &[&str], overlay: &str) -> (netns::Fleet, Vec<Spec>) {
    let fleet = netns::Fleet::new(tag, names);
    let mut specs: Vec<Spec> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Spec::new(n, &[&format!("{overlay}.{}/16", i + 1)]))
        .collect();
    let all = specs.clone();
    for (i, spec) in specs.iter_mut().enumerate() {
        for (j, other) in all.iter().enumerate() {
            if i != j {
                spec.peer(other, Some(&format!("{}:51820", fleet.underlay[j])), "");
            }
        }
    }
    (fleet, specs)
}

/// The uid plugin children run as by default (the `myelin` system user), created here the way
/// the node creates it when it is missing.
pub fn plugin_uid() -> u32 {
    let id = || {
        Command::new("id")
            .args(["-u", "myelin"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
    };
    if let Some(uid) = id() {
        return uid;
    }
    let _ = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "myelin",
        ])
        .status();
    id().expect("the myelin system user (useradd failed)")
}

/// iperf3 TCP from `client` to a one-shot server on `server_addr` in `server` for `secs`;
/// the Mbit/s received.
pub fn iperf_tcp(server: &Netns, client: &Netns, server_addr: &str, secs: u32) -> f64 {
    use std::io::BufRead;
    let mut child = server
        .command("iperf3")
        .args(["-s", "-1", "--forceflush", "-B", server_addr])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("iperf3 (the test script installs it)");
    let out = child.stdout.take().expect("iperf3 stdout");
    let mut reader = std::io::BufReader::new(out);
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !line.contains("Server listening") {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap_or(0) > 0 && Instant::now() < deadline,
            "iperf3 server did not start"
        );
    }
    let report = client.run(
        "iperf3",
        &["-c", server_addr, "-t", &secs.to_string(), "-J"],
    );
    let _ = child.wait();
    let v: Value = serde_json::from_str(&report).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e6
}
