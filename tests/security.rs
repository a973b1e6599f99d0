//! Regression tests for the attack surface a security review found (docs/security.md has the
//! threat model): each test plays the attacker, from a web page, from the robot's LAN or from
//! an internet host that knows a public key, and checks that the attack gets nowhere while
//! the real peers keep working.

mod common;

use common::netns::{ip, Fleet, Netns};
use common::{ping_until, Node, Spec, FAST_HOST};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HANDSHAKE: Duration = Duration::from_secs(20);

/// One raw HTTP/1.1 request from `ns` to `addr`; returns the status and the body.
fn raw_http(ns: &Netns, addr: SocketAddr, request: String) -> (u16, String) {
    ns.enter(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, body)
    })
}

fn request(method: &str, path: &str, host: &str, origin: Option<&str>) -> String {
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let body = if method == "POST" { "a=1" } else { "" };
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{origin}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn the_loopback_api_refuses_other_hosts_and_cross_site_posts() {
    let node = Node::start(FAST_HOST, "[plugins.cam]\nplugin = \"chaos\"\n");
    node.wait_plugin("cam", Duration::from_secs(20), "running", |p| {
        common::state(p) == "running"
    });
    let api = node.api;
    let own = api.to_string();
    let local = format!("localhost:{}", api.port());
    let send = |method: &str, path: &str, host: &str, origin: Option<&str>| {
        raw_http(&node.ns, api, request(method, path, host, origin))
    };

    // DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1.
    let (status, body) = send(
        "GET",
        "/api/v1/status",
        &format!("evil.example:{}", api.port()),
        None,
    );
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).expect("a JSON error");
    assert!(v["error"].as_str().unwrap().contains("evil.example"), "{v}");
    assert!(v["hint"].as_str().unwrap().contains("remote_listen"), "{v}");
    assert_eq!(
        send("GET", "/", "evil.example", None).0,
        403,
        "the page too"
    );
    assert_eq!(
        send(
            "GET",
            "/api/v1/status",
            &format!("127.0.0.1:{}", api.port() ^ 1),
            None
        )
        .0,
        403,
        "another port is another origin"
    );

    // A plain HTML form on another origin posting to the API or to a plugin's route.
    for path in [
        "/api/v1/plugins/cam/disable",
        "/api/v1/plugins/cam/restart",
        "/plugins/cam/trigger/panic",
    ] {
        for origin in ["http://evil.example", "null", "http://127.0.0.1:1"] {
            let (status, body) = send("POST", path, &own, Some(origin));
            assert_eq!(status, 403, "POST {path} from {origin}: {body}");
            assert!(body.contains("origin"), "{body}");
        }
    }
    let cam = node.plugin("cam");
    assert_eq!(common::state(&cam), "running", "{cam:#}");
    assert!(cam["failures"].as_array().unwrap().is_empty(), "{cam:#}");

    // What must keep working: reads by name, the dashboard's own posts, and curl (no Origin).
    assert_eq!(send("GET", "/api/v1/status", &own, None).0, 200);
    assert_eq!(send("GET", "/api/v1/status", &local, None).0, 200);
    assert_eq!(
        send(
            "GET",
            "/api/v1/plugins",
            &local,
            Some("http://evil.example")
        )
        .0,
        200,
        "a cross-origin read is left to the browser's same-origin policy"
    );
    let (status, body) = send(
        "POST",
        "/api/v1/plugins/cam/disable",
        &own,
        Some(&format!("http://{own}")),
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = send("POST", "/api/v1/plugins/cam/enable", &local, None);
    assert_eq!(status, 200, "{body}");
    // The CLI's client.
    assert_eq!(node.call("POST", "/api/v1/plugins/cam/restart").0, 200);
}

/// Node `i` (from 1) of a lab fabric's namespaces; the attacker's namespace on the same
/// underlay is attached here and removed on drop.
struct Attacker {
    ns: Arc<Netns>,
    underlay: String,
}

impl Attacker {
    fn on(fabric: &myelin::lab::Fabric, n: usize) -> Attacker {
        let a = fabric.attach(n, "evil").expect("attach the attacker");
        Attacker {
            ns: Arc::new(Netns { name: a.namespace }),
            underlay: a.underlay,
        }
    }

    /// Routes the overlay prefix via `gateway` (a robot's underlay address), as a host on the
    /// robot's LAN can.
    fn route_overlay_via(&self, prefix: &str, gateway: &str) {
        ip(&["-n", &self.ns.name, "route", "add", prefix, "via", gateway]);
    }

    /// True when a TCP connection to `addr` completes within a second.
    fn connects(&self, addr: SocketAddr) -> bool {
        self.ns
            .enter(move || TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
    }
}

/// Every TCP port a process in `ns` listens on for `overlay` (bound to it or to a wildcard).
fn overlay_tcp_ports(ns: &Netns, overlay: &str) -> Vec<u16> {
    let out = ns.run("ss", &["-Hlnt"]);
    let mut ports: Vec<u16> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|local| {
            let (host, port) = local.rsplit_once(':')?;
            let host = host.trim_matches(|c| c == '[' || c == ']');
            let covers = host == overlay || host == "0.0.0.0" || host == "*" || host == "::";
            covers.then(|| port.parse().ok()).flatten()
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

#[test]
fn overlay_ports_answer_only_through_the_tunnel() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_string();
    let (mut up, _) = common::lab_up_on("8", 3, &d);
    let lab = myelin::lab::LabState::load(dir.path()).expect("lab state");
    let robot = lab.node("robot1").unwrap().clone();
    let operator = lab.node("operator").unwrap().clone();
    let overlay = robot.overlay[0].split('/').next().unwrap().to_string();
    // The lab owns these namespaces and removes them itself.
    let robot_ns = std::mem::ManuallyDrop::new(Netns {
        name: robot.namespace.clone(),
    });
    let operator_ns = std::mem::ManuallyDrop::new(Netns {
        name: operator.namespace.clone(),
    });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let evil = Attacker::on(&lab.fabric, 200);
        evil.route_overlay_via("10.77.0.0/16", &robot.underlay);
        ping_until(&operator_ns, &overlay, HANDSHAKE);
        // Every plugin's listener is up once the lab says so; list them all.
        let ports = overlay_tcp_ports(&robot_ns, &overlay);
        assert!(
            ports.len() >= 3,
            "the robot listens on its overlay address (telemetry, WHEP, zenoh): {ports:?}"
        );
        let reachable: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| evil.connects(SocketAddr::new(overlay.parse().unwrap(), *p)))
            .collect();
        assert!(
            reachable.is_empty(),
            "from the LAN ({}), overlay ports {reachable:?} of {ports:?} answered",
            evil.underlay
        );
        let pinged = evil
            .ns
            .command("ping")
            .args(["-c", "2", "-W", "1", &overlay])
            .status()
            .unwrap();
        assert!(
            !pinged.success(),
            "the overlay address answers ICMP from the LAN"
        );
        // Through the tunnel everything still answers.
        let unreachable: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| {
                let addr = SocketAddr::new(overlay.parse().unwrap(), *p);
                !operator_ns.enter(move || {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
                })
            })
            .collect();
        assert!(
            unreachable.is_empty(),
            "over the tunnel, ports {unreachable:?} did not answer"
        );
        // The attack path is real: without the node's guard table the same ports answer.
        let tables = robot_ns.run("nft", &["list", "tables"]);
        let table = tables
            .lines()
            .find_map(|l| {
                l.strip_prefix("table inet ")
                    .filter(|t| t.starts_with("myelin_"))
            })
            .unwrap_or_else(|| panic!("no overlay guard table: {tables}"))
            .to_string();
        robot_ns.run("nft", &["delete", "table", "inet", &table]);
        let open: Vec<u16> = ports
            .iter()
            .copied()
            .filter(|p| evil.connects(SocketAddr::new(overlay.parse().unwrap(), *p)))
            .collect();
        assert_eq!(
            open, ports,
            "without the guard the LAN reaches the overlay ports"
        );
    }));
    // SAFETY: interrupting our own child, as Ctrl-C would.
    unsafe { libc::kill(up.id() as i32, libc::SIGINT) };
    let _ = up.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Two meshed nodes `a` and `b` (overlay 10.78.0.1 and .2) and an attacker `evil` on the same
/// underlay.
fn meshed_with_attacker(tag: &str) -> (Fleet, Node, Node, Spec, Spec) {
    let fleet = Fleet::new(tag, &["a", "b", "evil"]);
    let mut a = Spec::new("a", &["10.78.0.1/16"]);
    let mut b = Spec::new("b", &["10.78.0.2/16"]);
    a.peer(&b, Some(&format!("{}:51820", fleet.underlay[1])), "");
    b.peer(&a, Some(&format!("{}:51820", fleet.underlay[0])), "");
    let na = Node::start_spec(fleet.nodes[0].clone(), &a, "");
    let nb = Node::start_spec(fleet.nodes[1].clone(), &b, "");
    ping_until(&fleet.nodes[0], "10.78.0.2", HANDSHAKE);
    (fleet, na, nb, a, b)
}

#[test]
fn forged_pongs_from_the_underlay_do_not_count() {
    let (fleet, a, b, _, _) = meshed_with_attacker("pong");
    a.wait_peer("b", HANDSHAKE, "answering probes", |p| {
        p["rtt_ms"].is_number()
    });
    drop(b);
    let evil = &fleet.nodes[2];
    // The attacker claims b's overlay address on the LAN and sends pongs for every sequence
    // number a has used, in the old format and the new one, with every nonce it can guess.
    ip(&[
        "-n",
        &evil.name,
        "addr",
        "add",
        "10.78.0.2/32",
        "dev",
        "eth0",
    ]);
    ip(&[
        "-n",
        &evil.name,
        "route",
        "add",
        "10.78.0.1/32",
        "via",
        &fleet.underlay[0],
        "src",
        "10.78.0.2",
    ]);
    let silent_since = Instant::now();
    let forged = evil.enter(move || {
        let sock = UdpSocket::bind("10.78.0.2:51821").expect("bind the forger");
        let mut sent = 0u64;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            for seq in 1..=400u64 {
                let mut v1 = [0u8; 16];
                v1[..4].copy_from_slice(b"MYP1");
                v1[4] = 2;
                v1[8..].copy_from_slice(&seq.to_be_bytes());
                let _ = sock.send_to(&v1, "10.78.0.1:51821");
                for nonce in [0u64, 1, seq] {
                    let mut v2 = [0u8; 24];
                    v2[..4].copy_from_slice(b"MYP2");
                    v2[4] = 2;
                    v2[8..16].copy_from_slice(&seq.to_be_bytes());
                    v2[16..].copy_from_slice(&nonce.to_be_bytes());
                    let _ = sock.send_to(&v2, "10.78.0.1:51821");
                }
                sent += 4;
            }
        }
        sent
    });
    let peer = a.peer("b");
    let last_seen = peer["last_seen_ms"].as_u64().unwrap_or(0);
    assert!(
        last_seen as u128 >= silent_since.elapsed().as_millis() - 200,
        "{forged} forged pongs made a silent peer look alive (last seen {last_seen} ms ago): {peer:#}"
    );
    assert!(
        peer["recent_probes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["rtt_ms"].is_null()),
        "{peer:#}"
    );
}

/// mac1 of a handshake message for the responder with public key `to` (WireGuard §5.4.4).
fn with_mac1(mut msg: Vec<u8>, to: &[u8; 32]) -> Vec<u8> {
    use blake2::digest::{consts::U16, Digest, Mac};
    let key = blake2::Blake2s256::new()
        .chain_update(b"mac1----")
        .chain_update(to)
        .finalize();
    let n = msg.len() - 32;
    let mac = blake2::Blake2sMac::<U16>::new_from_slice(&key)
        .unwrap()
        .chain_update(&msg[..n])
        .finalize()
        .into_bytes();
    msg[n..n + 16].copy_from_slice(&mac);
    msg
}

fn public_key_bytes(spec: &Spec) -> [u8; 32] {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(spec.public.trim())
        .unwrap()
        .try_into()
        .unwrap()
}

#[test]
fn only_authenticated_packets_move_an_endpoint_and_garbage_costs_no_diffie_hellman() {
    let (fleet, a, _b, a_spec, _) = meshed_with_attacker("endp");
    let b_endpoint = format!("{}:51820", fleet.underlay[1]);
    let before = a.peer("b");
    assert_eq!(before["endpoint"], b_endpoint.as_str(), "{before:#}");
    let dh_before = metric(&a, "myelin_tunnel_handshake_dh_total");
    let to: SocketAddr = format!("{}:51820", fleet.underlay[0]).parse().unwrap();
    let a_public = public_key_bytes(&a_spec);
    // Traffic runs while the attacker sends handshake responses with a valid mac1 (all it
    // needs is a's public key) aimed at every session index of a's peer b, 20 a second plus
    // bursts past the rate limit, and a flood of garbage initiations.
    let pinger = fleet.nodes[0]
        .command("ping")
        .args(["-i", "0.05", "-c", "80", "-W", "1", "10.78.0.2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let attack = fleet.nodes[2].enter(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut sent = (0u64, 0u64);
        for round in 0..3u32 {
            for i in 0..20u32 {
                let mut resp = vec![0u8; 92];
                resp[0] = 2;
                resp[4..8].copy_from_slice(&(round * 1000 + i).to_le_bytes());
                resp[8..12].copy_from_slice(&(i & 0xff).to_le_bytes());
                let resp = with_mac1(resp, &a_public);
                for _ in 0..10 {
                    sock.send_to(&resp, to).unwrap();
                    sent.0 += 1;
                }
                let mut init = vec![0u8; 148];
                init[0] = 1;
                init[4..8].copy_from_slice(&i.to_le_bytes());
                for (k, byte) in init[8..].iter_mut().enumerate() {
                    *byte = (k as u32 * 31 + i + round) as u8;
                }
                for _ in 0..50 {
                    sock.send_to(&init, to).unwrap();
                    sent.1 += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        sent
    });
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let received: u32 = text
        .split(", ")
        .find_map(|s| s.strip_suffix(" received"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let after = a.peer("b");
    assert_eq!(
        after["endpoint"],
        b_endpoint.as_str(),
        "{} forged responses moved b's endpoint: {after:#}",
        attack.0
    );
    assert!(
        received >= 70,
        "traffic went on during the attack: {received}/80 pings answered\n{text}"
    );
    let metrics = a.metrics();
    let refused = metric_in(
        &metrics,
        "myelin_tunnel_handshake_refused_total{reason=\"mac1\"}",
    );
    assert!(
        refused >= attack.1 as f64 * 0.9,
        "{} garbage initiations were refused on mac1: {refused}",
        attack.1
    );
    assert_eq!(
        metric_in(&metrics, "myelin_tunnel_handshake_dh_total"),
        dh_before,
        "garbage initiations reached the Diffie-Hellman step"
    );
    ping_until(&fleet.nodes[0], "10.78.0.2", Duration::from_secs(5));
}

fn metric(node: &Node, name: &str) -> f64 {
    metric_in(&node.metrics(), name)
}

fn metric_in(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_thousand_idle_connections_do_not_stop_a_real_client() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("api.token");
    std::fs::write(&token, "0123456789abcdef-remote-token\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let control = format!(
        "remote_listen = \"127.0.0.2:7801\"\ntoken_file = \"{}\"",
        token.display()
    );
    // 1 000 sockets in this process: lift the soft descriptor limit to the hard one.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.max(limit.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let ns = Arc::new(Netns::new("idle"));
    let node = Node::start_full(ns.clone(), &control, FAST_HOST, "");
    let remote: SocketAddr = "127.0.0.2:7801".parse().unwrap();
    // A host (127.0.0.3) opens 1 000 connections and sends nothing.
    let held = ns.enter(move || {
        let mut held = Vec::new();
        for _ in 0..1000 {
            let s =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&"127.0.0.3:0".parse::<SocketAddr>().unwrap().into())
                .unwrap();
            if s.connect_timeout(&remote.into(), Duration::from_secs(1))
                .is_ok()
            {
                held.push(TcpStream::from(s));
            }
        }
        held
    });
    assert!(
        held.len() >= 100,
        "the attacker's connections were accepted by the kernel"
    );
    // A real client still gets its answer at once.
    let asked = Instant::now();
    let (code, v) = node.call_at(
        remote,
        Some("0123456789abcdef-remote-token"),
        "GET",
        "/api/v1/status",
    );
    assert_eq!(code, 200, "{v}");
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the real client waited {:?}",
        asked.elapsed()
    );
    // Connections that never send a request head are closed by the server.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut first = held.into_iter().next().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut byte = [0u8; 1];
    let n = first.read(&mut byte).unwrap_or(0);
    assert_eq!(n, 0, "an idle connection was closed");
    assert!(
        Instant::now() < deadline,
        "idle connections are closed within the header timeout"
    );
    let refused = metric(
        &node,
        "myelin_http_refused_connections_total{listener=\"127.0.0.2:7801\"}",
    );
    assert!(
        refused >= 800.0,
        "connections over the per-source cap were refused: {refused}"
    );
}
