//! The tunnel end to end, in network namespaces: two Myelin nodes, Myelin against
//! wireguard-go, roaming, restarts, a TUN device deleted under a node, and throughput while
//! plugins crash.

mod common;

use common::netns::Link;
use common::{ping_until, state, Netns, Node, Spec};
use std::io::{BufRead, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HANDSHAKE: Duration = Duration::from_secs(15);

/// The tests in this binary take turns: on two cores, one test's traffic and process start-ups
/// would skew another's throughput measurement.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// alpha (10.77.0.1, fd77::1) in link.a and beta (10.77.0.2, fd77::2) in link.b.
fn pair(link: &Link, alpha_plugins: &str) -> (Node, Node, Spec, Spec) {
    let mut alpha = Spec::new("alpha", &["10.77.0.1/16", "fd77::1/64"]);
    let mut beta = Spec::new("beta", &["10.77.0.2/16", "fd77::2/64"]);
    alpha.peer(&beta, Some(&format!("{}:51820", link.b_addr)), "");
    beta.peer(&alpha, Some(&format!("{}:51820", link.a_addr)), "");
    let a = Node::start_spec(link.a.clone(), &alpha, alpha_plugins);
    let b = Node::start_spec(link.b.clone(), &beta, "");
    (a, b, alpha, beta)
}

/// `pair`'s alpha (10.77.0.1) and beta (10.77.0.2) as a mesh-formed fleet: certificates and a
/// lighthouse (10.77.0.250), no static peers. Namespaces: alpha's `fleet.nodes[0]`, beta's
/// `fleet.nodes[1]`.
fn mesh_pair(tag: &str, alpha_plugins: &str) -> (Node, Node, common::MeshFleet) {
    let mesh = common::mesh_formed_fleet(tag, &["alpha", "beta"], "10.77.0");
    let a = Node::start_spec(mesh.fleet.nodes[0].clone(), &mesh.specs[0], alpha_plugins);
    let b = Node::start_spec(mesh.fleet.nodes[1].clone(), &mesh.specs[1], "");
    (a, b, mesh)
}

/// iperf3 TCP from `link.a` to `server_addr` in `link.b` for `secs`; returns Mbit/s received.
fn iperf(link: &Link, server_addr: &str, secs: u32) -> f64 {
    common::iperf_tcp(&link.b, &link.a, server_addr, secs)
}

#[test]
fn two_nodes_carry_ipv4_ipv6_and_tcp_encrypted_on_the_wire() {
    let _serial = serial();
    let link = Link::new("t2");
    let (a, _b, _, _) = pair(&link, "");
    // Capture the underlay at beta while traffic flows.
    let pcap = tempfile::NamedTempFile::new().unwrap();
    let mut dump = link
        .b
        .command("tcpdump")
        .args([
            "-i",
            &link.b_if,
            "-n",
            "-U",
            "-w",
            pcap.path().to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (the test script installs it)");
    let mut err = std::io::BufReader::new(dump.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "tcpdump: {line}");

    let first = ping_until(&link.a, "10.77.0.2", HANDSHAKE);
    eprintln!("first IPv4 ping answered after {first:?} (handshake included)");
    ping_until(&link.a, "fd77::2", HANDSHAKE);
    let marker = "4d59454c494e2d534543524554"; // "MYELIN-SECRET"
    link.a
        .run("ping", &["-c", "3", "-i", "0.2", "-p", marker, "10.77.0.2"]);
    link.a
        .run("ping", &["-c", "3", "-i", "0.2", "-p", marker, "fd77::2"]);
    let mbits = iperf(&link, "10.77.0.2", 3);
    eprintln!("iperf3 through the tunnel: {mbits:.0} Mbit/s");
    assert!(mbits > 10.0, "TCP crosses the tunnel: {mbits} Mbit/s");

    // SAFETY: signalling our own child.
    unsafe { libc::kill(dump.id() as i32, libc::SIGINT) };
    let _ = dump.wait();
    let mut bytes = Vec::new();
    std::fs::File::open(pcap.path())
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    assert!(
        bytes.len() > 100_000,
        "the capture saw the traffic ({} bytes)",
        bytes.len()
    );
    assert!(
        !bytes.windows(13).any(|w| w == b"MYELIN-SECRET"),
        "the payload marker must never appear on the wire"
    );
    let summary = link.b.run(
        "tcpdump",
        &["-r", pcap.path().to_str().unwrap(), "-n", "-q"],
    );
    let lines: Vec<&str> = summary.lines().collect();
    assert!(lines.len() > 100, "{} packets captured", lines.len());
    for l in &lines {
        let wireguard = l.contains("UDP") && l.contains(".51820");
        // Link-local housekeeping of the underlay itself (neighbour discovery, multicast joins).
        let neighbour = l.contains("ARP")
            || l.contains("ICMP6")
            || l.contains("ip6-allnodes")
            || l.contains("igmp");
        assert!(
            wireguard || neighbour,
            "only WireGuard UDP on the underlay, found: {l}"
        );
    }

    // Probes give RTT and loss; the API shows the peer up with traffic counters.
    let beta = a.wait_peer("beta", Duration::from_secs(10), "up with an RTT", |p| {
        p["up"] == true && p["rtt_ms"].as_f64().is_some() && p["loss"].as_f64().is_some()
    });
    assert!(beta["rtt_ms"].as_f64().unwrap() < 50.0, "{beta:#}");
    assert!(
        beta["tx_bytes"].as_u64().unwrap() > 1_000_000,
        "alpha sent the iperf3 data: {beta:#}"
    );
    assert_eq!(beta["endpoint"], format!("{}:51820", link.b_addr));
    // The same figures reach Prometheus: bounded labels (peer name only), RTT buckets 1 ms – 2 s.
    let metrics = a.metrics();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
    };
    assert!(value("myelin_peer_tx_packets_total{peer=\"beta\"}") > 1000.0);
    assert!(value("myelin_peer_tx_bytes_total{peer=\"beta\"}") > 1_000_000.0);
    assert!(value("myelin_peer_rtt_seconds_count{peer=\"beta\"}") > 0.0);
    assert_eq!(value("myelin_peer_up{peer=\"beta\"}"), 1.0);
    assert!(
        metrics.contains("myelin_peer_rtt_seconds_bucket{peer=\"beta\",le=\"0.001\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("myelin_build_info{version="), "{metrics}");
    assert!(
        !metrics.contains("endpoint=") && !metrics.contains(":51820\""),
        "no endpoints or ports as labels"
    );
    let out = link
        .a
        .run(common::BIN, &["peers", "--api", &a.api.to_string()]);
    assert!(
        out.contains("peer: beta") && out.contains("rtt:") && out.contains("ms"),
        "{out}"
    );
}

/// A wireguard-go process; dropping it kills it and removes its UAPI socket, which lives in
/// /var/run/wireguard outside any namespace and would outlast a SIGKILL.
struct WgGo {
    child: std::process::Child,
    iface: String,
}

impl Drop for WgGo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.iface));
    }
}

fn wg_go(
    link: &Link,
    iface: &str,
    private: &str,
    peer_pub: &str,
    peer_allowed: &str,
    endpoint: Option<&str>,
    address: &str,
) -> WgGo {
    let child = link
        .b
        .command("wireguard-go")
        .args(["-f", iface])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("wireguard-go (the test script installs it)");
    let wg = WgGo {
        child,
        iface: iface.to_string(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !link
        .b
        .command("wg")
        .args(["show", iface])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            Instant::now() < deadline,
            "wireguard-go did not create {iface}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key.path(), private).unwrap();
    let mut args = vec![
        "set",
        iface,
        "private-key",
        key.path().to_str().unwrap(),
        "listen-port",
        "51820",
        "peer",
        peer_pub,
        "allowed-ips",
        peer_allowed,
    ];
    if let Some(e) = endpoint {
        args.extend(["endpoint", e]);
    }
    link.b.run("wg", &args);
    link.b.run("ip", &["addr", "add", address, "dev", iface]);
    link.b.run("ip", &["link", "set", iface, "up"]);
    wg
}

#[test]
fn interoperates_with_wireguard_go_both_ways() {
    let _serial = serial();
    for (round, myelin_initiates) in [(0, true), (1, false)] {
        let link = Link::new(&format!("wg{round}"));
        let iface = format!("wgt{}{round}", std::process::id() % 10000);
        let mut alpha = Spec::new("alpha", &["10.77.0.1/16"]);
        let beta = Spec::new("beta", &["10.77.0.2/16"]);
        // Myelin knows wireguard-go's endpoint only when it initiates; otherwise it waits.
        let endpoint = format!("{}:51820", link.b_addr);
        alpha.peer(&beta, myelin_initiates.then_some(endpoint.as_str()), "");
        let a = Node::start_spec(link.a.clone(), &alpha, "");
        let alpha_endpoint = format!("{}:51820", link.a_addr);
        let wg = wg_go(
            &link,
            &iface,
            &beta.private,
            &alpha.public,
            "10.77.0.1/32",
            (!myelin_initiates).then_some(alpha_endpoint.as_str()),
            "10.77.0.2/16",
        );
        if myelin_initiates {
            ping_until(&link.a, "10.77.0.2", HANDSHAKE);
            ping_until(&link.b, "10.77.0.1", HANDSHAKE);
        } else {
            ping_until(&link.b, "10.77.0.1", HANDSHAKE);
            ping_until(&link.a, "10.77.0.2", HANDSHAKE);
        }
        let view = a.wait_peer("beta", Duration::from_secs(5), "up", |p| p["up"] == true);
        assert_eq!(
            view["rtt_ms"],
            serde_json::Value::Null,
            "a plain WireGuard peer has no probe RTT"
        );
        assert_eq!(
            view["endpoint"], endpoint,
            "the endpoint is learned from the peer's packets"
        );
        let shown = link.b.run("wg", &["show", &iface, "latest-handshakes"]);
        assert!(
            shown.split_whitespace().nth(1).is_some_and(|t| t != "0"),
            "wireguard-go saw a handshake: {shown}"
        );
        drop(wg);
    }
}

#[test]
fn roaming_peer_is_followed_quickly() {
    let _serial = serial();
    let link = Link::new("roam");
    let (a, _b, _, _) = pair(&link, "");
    ping_until(&link.a, "10.77.0.2", HANDSHAKE);
    let new_addr = format!("{}.3", link.b_addr.rsplit_once('.').unwrap().0);
    let moved = Instant::now();
    link.b.run(
        "ip",
        &[
            "addr",
            "del",
            &format!("{}/24", link.b_addr),
            "dev",
            &link.b_if,
        ],
    );
    link.b.run(
        "ip",
        &["addr", "add", &format!("{new_addr}/24"), "dev", &link.b_if],
    );
    ping_until(&link.a, "10.77.0.2", Duration::from_secs(10));
    let outage = moved.elapsed();
    eprintln!("roaming outage: {} ms", outage.as_millis());
    assert!(
        outage < Duration::from_secs(3),
        "traffic resumed after {outage:?}, over 3 s"
    );
    let view = a.wait_peer("beta", Duration::from_secs(5), "at its new endpoint", |p| {
        p["endpoint"] == format!("{new_addr}:51820")
    });
    assert_eq!(view["up"], true);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Roaming with the peers told at once. Probes are slowed to one a minute and there is no
/// persistent keepalive, so nothing but the node's own address watch can move the other
/// side's endpoint in time: 20 roams with the roaming node as initiator (it pings first) and
/// 20 as responder (the other side pings it). The outage runs from the new address being
/// configured to the first answered ping (each ping waits at most 50 ms: the overlay RTT here
/// is well under a millisecond).
#[test]
fn a_roam_is_announced_to_every_peer_at_once() {
    let _serial = serial();
    let link = Link::new("roam20");
    let mut alpha = Spec::new("alpha", &["10.77.0.1/16"]);
    let mut beta = Spec::new("beta", &["10.77.0.2/16"]);
    alpha.probe_ms = 60_000;
    beta.probe_ms = 60_000;
    alpha.peer(&beta, Some(&format!("{}:51820", link.b_addr)), "");
    beta.peer(&alpha, Some(&format!("{}:51820", link.a_addr)), "");
    let a = Node::start_spec(link.a.clone(), &alpha, "");
    let b = Node::start_spec(link.b.clone(), &beta, "");
    ping_until(&link.a, "10.77.0.2", HANDSHAKE);
    let prefix = link.b_addr.rsplit_once('.').unwrap().0.to_string();
    let mut current = link.b_addr.clone();
    let (mut initiator, mut responder) = (Vec::new(), Vec::new());
    for trial in 0..40 {
        // Pacing, not synchronisation: a robot roams a few times a minute at most, and the
        // node backs off from address changes that come more than ten a second (a flapping
        // interface); 250 ms apart keeps these roams under that.
        std::thread::sleep(Duration::from_millis(250));
        let next = format!("{prefix}.{}", 100 + trial);
        link.b.run(
            "ip",
            &["addr", "del", &format!("{current}/24"), "dev", &link.b_if],
        );
        link.b.run(
            "ip",
            &["addr", "add", &format!("{next}/24"), "dev", &link.b_if],
        );
        let moved = Instant::now();
        let (from, to) = if trial % 2 == 0 {
            (&link.a, "10.77.0.2")
        } else {
            (&link.b, "10.77.0.1")
        };
        while !from
            .command("ping")
            .args(["-c", "1", "-W", "0.05", to])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                moved.elapsed() < Duration::from_secs(10),
                "no answer from {to} within 10 s of roam {trial}"
            );
        }
        if trial % 2 == 0 {
            responder.push(moved.elapsed());
        } else {
            initiator.push(moved.elapsed());
        }
        current = next;
    }
    initiator.sort();
    responder.sort();
    let figures = |v: &[Duration]| (percentile(v, 0.5), percentile(v, 0.99));
    let (i50, i99) = figures(&initiator);
    let (r50, r99) = figures(&responder);
    eprintln!(
        "roam outage over 20 roams each: roaming node as initiator p50 {} ms p99 {} ms; as responder p50 {} ms p99 {} ms",
        i50.as_millis(),
        i99.as_millis(),
        r50.as_millis(),
        r99.as_millis()
    );
    assert!(i99 < Duration::from_secs(1), "initiator p99 {i99:?}");
    assert!(r99 < Duration::from_secs(1), "responder p99 {r99:?}");
    drop(a);
    let metrics = b.metrics();
    let roams = metrics
        .lines()
        .find_map(|l| l.strip_prefix("myelin_roams_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        roams >= 40.0,
        "beta counted {roams} roams for 40 address changes"
    );
}

#[test]
fn a_restarted_node_reconnects_without_touching_the_other() {
    let _serial = serial();
    let link = Link::new("rst");
    let (a, b, _, beta) = pair(&link, "");
    ping_until(&link.a, "10.77.0.2", HANDSHAKE);
    let a_pid = a.pid();
    drop(b);
    let b = Node::start_spec(link.b.clone(), &beta, "");
    let back = ping_until(&link.a, "10.77.0.2", HANDSHAKE);
    eprintln!("session back {back:?} after the restart");
    ping_until(&link.b, "10.77.0.1", HANDSHAKE);
    assert_eq!(a.pid(), a_pid);
    b.wait_peer("alpha", Duration::from_secs(5), "up", |p| p["up"] == true);
}

/// CPU seconds (user + system, all threads) that process `pid` has used.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a constant.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[test]
fn a_tun_device_deleted_under_the_node_is_reported_once_without_spinning() {
    let _serial = serial();
    let link = Link::new("tdl");
    let (mut a, _b, _, _) = pair(&link, "");
    ping_until(&link.a, "10.77.0.2", HANDSHAKE);
    link.a.run("ip", &["link", "del", "myelin0"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.log().contains("the TUN device failed") {
        assert!(
            Instant::now() < deadline,
            "no error logged 10 s after the TUN device was deleted; log:\n{}",
            a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A level-triggered epoll that kept the broken device would burn a core from here on.
    let (cpu0, wall0) = (cpu_seconds(a.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(2)); // the measuring window, not a wait for an event
    let busy = (cpu_seconds(a.pid()) - cpu0) / wall0.elapsed().as_secs_f64();
    eprintln!("node CPU after its TUN device was deleted: {busy:.3} s/s");
    assert!(
        busy < 0.2,
        "the node uses {busy:.2} CPU s/s after losing its TUN device"
    );
    assert_eq!(
        a.log().matches("the TUN device failed").count(),
        1,
        "the failure is reported once; log:\n{}",
        a.log()
    );
    assert_eq!(a.call("GET", "/api/v1/status").0, 200);
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(a.pid(), libc::SIGTERM) };
    let status = a.child.wait().unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        a.log()
    );
}

/// How often the host has restarted a plugin: a counter that, unlike the failure list, is
/// never trimmed.
fn restarts(plugin: &serde_json::Value) -> u64 {
    plugin["restarts"].as_u64().unwrap()
}

#[test]
fn plugins_crashing_during_traffic_do_not_slow_the_tunnel() {
    let _serial = serial();
    let link = Link::new("chs");
    let plugins = "health_interval_ms = 100\nhealth_timeout_ms = 500\nstop_grace_ms = 300\nrestart_backoff_ms = 500\nrestart_backoff_max_ms = 500\nfailure_threshold = 1000\n\
        [plugins.panicky]\nplugin = \"chaos\"\nenabled = false\nmode = \"panic\"\nafter_ms = 100\n\
        [plugins.hanging]\nplugin = \"chaos\"\nenabled = false\nmode = \"block\"\nafter_ms = 100\n";
    let (a, _b, _, _) = pair(&link, plugins);
    ping_until(&link.a, "10.77.0.2", HANDSHAKE);
    // A 2-core CI machine is shared and noisy: one chaos run can land on a burst of someone
    // else's load. Each attempt is bracketed by quiet runs and compared with the slower of
    // the two; the tunnel must hold up in one of three attempts, and every figure is printed.
    let mut quiet_before = iperf(&link, "10.77.0.2", 4);
    let mut ratios = Vec::new();
    for attempt in 1..=3 {
        for p in ["panicky", "hanging"] {
            assert_eq!(
                a.call("POST", &format!("/api/v1/plugins/{p}/enable")).0,
                200
            );
        }
        let before = (
            restarts(&a.plugin("panicky")),
            restarts(&a.plugin("hanging")),
        );
        let chaos = iperf(&link, "10.77.0.2", 4);
        let panicky = a.plugin("panicky");
        let hanging = a.plugin("hanging");
        for p in ["panicky", "hanging"] {
            assert_eq!(
                a.call("POST", &format!("/api/v1/plugins/{p}/disable")).0,
                200
            );
        }
        let quiet_after = iperf(&link, "10.77.0.2", 4);
        let base = quiet_before.min(quiet_after);
        let ratio = chaos / base;
        eprintln!("attempt {attempt}: iperf3 {quiet_before:.0} and {quiet_after:.0} Mbit/s without chaos, {chaos:.0} Mbit/s with plugins crashing: ratio {ratio:.2}");
        assert!(
            restarts(&panicky) >= before.0 + 3,
            "the panicking plugin really crashed during the run: {panicky:#}"
        );
        assert!(
            restarts(&hanging) >= before.1 + 2,
            "the hanging plugin really hung during the run: {hanging:#}"
        );
        ratios.push(ratio);
        if ratio >= 0.8 {
            break;
        }
        quiet_before = quiet_after;
    }
    assert!(
        ratios.iter().any(|r| *r >= 0.8),
        "throughput with crashing plugins fell below 0.8 of the slower quiet run in every attempt: {ratios:.2?}"
    );
    assert_ne!(state(&a.plugin("panicky")), "failed");
}

#[test]
fn clear_errors_for_a_taken_port_and_missing_privileges() {
    let _serial = serial();
    let ns = std::sync::Arc::new(common::Netns::new("err"));
    let first = Spec::new("first", &["10.77.0.1/16"]);
    let _running = Node::start_spec(ns.clone(), &first, "");

    // A second node in the same namespace on the same UDP port.
    let dir = tempfile::tempdir().unwrap();
    let key = common::write_key(dir.path());
    let config = dir.path().join("second.toml");
    std::fs::write(
        &config,
        format!("[node]\nname = \"second\"\nprivate_key_file = \"{}\"\ninterface = \"myelin1\"\naddress = [\"10.78.0.1/16\"]\n[control]\nlisten = \"127.0.0.1:0\"\n", key.display()),
    )
    .unwrap();
    let out = ns
        .command(common::BIN)
        .args(["up", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("port 51820 is in use") && err.contains("[node].listen_port"),
        "{err}"
    );

    // Without CAP_NET_ADMIN the TUN device cannot be made.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&key, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let other = Netns::new("nopriv");
    let out = other
        .command("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--inh-caps=-all",
            common::BIN,
            "up",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot create TUN device `myelin1`") && err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// An HTTP GET from inside `ns` (a scraper on another node of the mesh).
fn try_http_get(ns: &common::Netns, addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let (addr, path) = (addr.to_string(), path.to_string());
    ns.enter(move || {
        let mut s = std::net::TcpStream::connect(&addr)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: scrape\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })
}

fn http_get(ns: &common::Netns, addr: &str, path: &str) -> String {
    try_http_get(ns, addr, path).unwrap_or_else(|e| panic!("GET http://{addr}{path}: {e}"))
}

// Runs on a mesh-formed fleet (certificates + lighthouse, no static peers).
#[test]
fn telemetry_is_scraped_over_the_vpn() {
    let _serial = serial();
    let (a, _b, mesh) = mesh_pair("tel", "[plugins.telemetry]\n");
    let (b_ns, a_addr) = (&mesh.fleet.nodes[1], &mesh.fleet.underlay[0]);
    ping_until(b_ns, "10.77.0.1", HANDSHAKE);
    a.wait_plugin("telemetry", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });
    a.wait_peer("beta", Duration::from_secs(10), "probed", |p| {
        p["rtt_ms"].as_f64().is_some()
    });
    // beta scrapes alpha's overlay address through the tunnel, as an operator's Prometheus would.
    let scrape = http_get(b_ns, "10.77.0.1:9477", "/metrics");
    assert!(
        scrape.lines().next().is_some_and(|l| l.contains(" 200 ")),
        "{scrape}"
    );
    for needle in [
        "myelin_peer_rtt_seconds_count{peer=\"beta\"}",
        "myelin_plugin_up{plugin=\"telemetry\"} 1",
        "myelin_build_info{",
        "# TYPE node_cpu_seconds_total counter",
        "node_load1 ",
        "node_memory_MemTotal_bytes ",
        "node_filesystem_avail_bytes{mountpoint=\"/\"}",
        "node_network_receive_bytes_total{device=\"eth0\"}",
        "process_resident_memory_bytes ",
    ] {
        assert!(scrape.contains(needle), "scrape lacks {needle}:\n{scrape}");
    }
    // The underlay address does not serve it: only the overlay and loopback do.
    let underlay = b_ns.enter({
        let addr = format!("{}:9477", a_addr);
        move || std::net::TcpStream::connect(addr).is_err()
    });
    assert!(underlay, "telemetry must not listen on the underlay");
    // Disabling the plugin closes the listener; enabling opens it again.
    assert_eq!(a.call("POST", "/api/v1/plugins/telemetry/disable").0, 200);
    assert!(
        try_http_get(b_ns, "10.77.0.1:9477", "/metrics").is_err(),
        "a disabled telemetry plugin listens nowhere"
    );
    assert_eq!(a.call("POST", "/api/v1/plugins/telemetry/enable").0, 200);
    a.wait_plugin("telemetry", Duration::from_secs(20), "running again", |v| {
        state(v) == "running"
    });
    assert!(http_get(b_ns, "10.77.0.1:9477", "/metrics").contains("node_load1 "));
    let (code, figures) = a.call("GET", "/plugins/telemetry/figures");
    assert_eq!(code, 200);
    assert!(
        figures.as_str().unwrap_or_default().contains("node_load1"),
        "{figures}"
    );
    // The dashboard panel names the scrape URL.
    let (code, panel) = a.call("GET", "/plugins/telemetry/panel");
    assert_eq!(code, 200);
    assert!(
        panel
            .as_str()
            .unwrap_or_default()
            .contains("http://10.77.0.1:9477/metrics"),
        "{panel}"
    );
}

/// Prometheus's instant query `q` from inside `ns`; the first sample's value.
fn prom_query(ns: &common::Netns, q: &str) -> Option<f64> {
    let encoded: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    // Until the server listens there is no answer yet, which the caller's poll allows for.
    let resp = try_http_get(
        ns,
        "127.0.0.1:9090",
        &format!("/api/v1/query?query={encoded}"),
    )
    .ok()?;
    let body = resp.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

fn prom_wait(ns: &common::Netns, q: &str, what: &str, pred: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = prom_query(ns, q);
        if let Some(v) = v.filter(|v| pred(*v)) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus: `{q}` never became {what} (last {v:?})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_real_prometheus_scrapes_a_robot_over_the_vpn() {
    let _serial = serial();
    let link = Link::new("prom");
    let (a, _b, _, _) = pair(&link, "[plugins.telemetry]\n");
    ping_until(&link.b, "10.77.0.1", HANDSHAKE);
    a.wait_plugin("telemetry", Duration::from_secs(20), "running", |v| {
        state(v) == "running"
    });

    // The exposition passes Prometheus's own linter.
    let scrape = http_get(&link.b, "10.77.0.1:9477", "/metrics");
    let body = scrape
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (the test script installs Debian's prometheus package)");
    std::io::Write::write_all(&mut lint.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let lint = lint.wait_with_output().unwrap();
    // node_exporter's own `node_memory_MemTotal_bytes` family fails the snake_case lint; we keep
    // node_exporter's names (dashboards expect them), so those findings are the only ones allowed.
    let findings: Vec<String> = String::from_utf8_lossy(&lint.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&lint.stderr).lines())
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.starts_with("node_memory_Mem") && l.contains("snake_case")))
        .map(str::to_string)
        .collect();
    assert!(findings.is_empty(), "promtool check metrics: {findings:#?}");

    // A Prometheus server on the operator side scrapes the robot's overlay address.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: robots\n    static_configs:\n      - targets: ['10.77.0.1:9477']\n",
    )
    .unwrap();
    let mut server = link
        .b
        .command("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .args(["--web.listen-address=127.0.0.1:9090"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus");
    prom_wait(&link.b, "up{job=\"robots\"}", "1", |v| v == 1.0);
    let rtt = "myelin_peer_rtt_seconds_count{peer=\"beta\"}";
    let first = prom_wait(&link.b, rtt, "present", |_| true);
    prom_wait(&link.b, rtt, "growing", |v| v > first);
    let rx = "myelin_peer_rx_bytes_total{peer=\"beta\"}";
    let tx = "myelin_peer_tx_bytes_total{peer=\"beta\"}";
    let (rx0, tx0) = (
        prom_wait(&link.b, rx, "present", |_| true),
        prom_wait(&link.b, tx, "present", |_| true),
    );
    let mbits = iperf(&link, "10.77.0.2", 2);
    assert!(mbits > 10.0);
    prom_wait(&link.b, tx, "grown by the iperf3 run", |v| {
        v > tx0 + 1_000_000.0
    });
    prom_wait(&link.b, rx, "grown", |v| v > rx0);
    prom_wait(&link.b, "node_load1", "present", |_| true);
    let _ = server.kill();
    let _ = server.wait();
}
