//! The group firewall end to end, on a mesh-formed fleet (certificates + lighthouse): robots
//! take SSH (TCP 22) from operators only; replies to what a robot opens itself come back; the
//! refused are counted.

mod common;

use common::Node;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

const ROBOT_FIREWALL: &str = "[firewall]\ndefault_inbound = \"deny\"\n[[firewall.inbound]]\nname = \"ssh-from-operators\"\ngroups = [\"operators\"]\nproto = \"tcp\"\nport = \"22\"\n[[firewall.inbound]]\nproto = \"icmp\"\n";

/// A TCP listener on `port` inside `ns` that greets every connection with one line, then
/// echoes what it reads.
fn listen(ns: &common::Netns, port: u16) {
    let listener = ns.enter(move || TcpListener::bind(("0.0.0.0", port)).expect("bind"));
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = conn.write_all(b"hello\n");
                let mut buf = [0u8; 64];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Connects from `ns` to `to` and reads the greeting; the error if it does not come.
fn greeting(ns: &common::Netns, to: &str) -> std::io::Result<String> {
    let to: SocketAddr = to.parse().expect("address");
    ns.enter(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        let mut buf = [0u8; 16];
        let n = s.read(&mut buf)?;
        line.push_str(&String::from_utf8_lossy(&buf[..n]));
        Ok(line)
    })
}

/// Adds `rule` (TOML lines of one `[[firewall.inbound]]`) after the config's ICMP rule, sends
/// the node SIGHUP and waits until it runs three inbound rules. Returns the config before.
fn add_rule_and_reload(node: &Node, rule: &str) -> String {
    let config = std::fs::read_to_string(&node.config).unwrap();
    let icmp = "[[firewall.inbound]]\nproto = \"icmp\"\n";
    std::fs::write(
        &node.config,
        config.replace(icmp, &format!("{icmp}[[firewall.inbound]]\n{rule}")),
    )
    .unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(node.pid(), libc::SIGHUP) };
    node.poll(
        "the reloaded rules",
        Duration::from_secs(10),
        || node.get("/api/v1/firewall"),
        |v: &Value| v["firewall"]["rules"]["inbound"].as_array().map(Vec::len) == Some(3),
    );
    config
}

#[test]
fn robots_take_ssh_from_operators_only() {
    let mut mesh = common::mesh_formed_fleet("fw", &["operator", "robot1", "robot2"], "10.89.0");
    for spec in mesh.specs.iter_mut().skip(1) {
        spec.rest.push_str(ROBOT_FIREWALL);
    }
    let nodes = mesh.start_nodes(&[]);
    let ns = |i: usize| &mesh.fleet.nodes[i];
    let long = Duration::from_secs(30);
    // ICMP is allowed everywhere: the mesh is up when pings pass.
    common::ping_until(ns(0), "10.89.0.2", long);
    common::ping_until(ns(0), "10.89.0.3", long);
    common::ping_until(ns(2), "10.89.0.2", long);
    listen(ns(1), 22);
    listen(ns(1), 8080);
    listen(ns(0), 9000);

    // The operator opens SSH on robot1, and robot1's answer flows back.
    assert_eq!(
        greeting(ns(0), "10.89.0.2:22").expect("operator -> robot1:22"),
        "hello\n"
    );
    // robot2 (group robots) may not, and neither may the operator reach another port.
    let refused = greeting(ns(2), "10.89.0.2:22");
    assert!(refused.is_err(), "robot2 reached robot1's SSH: {refused:?}");
    assert!(
        greeting(ns(0), "10.89.0.2:8080").is_err(),
        "port 8080 is not allowed"
    );
    // What robot1 opens itself (to the operator, which has no firewall) gets its replies.
    assert_eq!(
        greeting(ns(1), "10.89.0.1:9000").expect("robot1 -> operator:9000"),
        "hello\n"
    );

    let metrics = nodes[1].metrics();
    let drops: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("myelin_firewall_drops_total{rule=\"default_inbound\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(drops >= 2.0, "drops counted: {drops}\n{metrics}");
    assert!(
        nodes[1].log().contains("firewall dropped"),
        "the drop is logged:\n{}",
        nodes[1].log()
    );
    let status = nodes[1].get("/api/v1/firewall");
    assert_eq!(status["enabled"], true, "{status}");
    assert_eq!(
        status["firewall"]["rules"]["inbound"][0]["name"],
        "ssh-from-operators"
    );
    assert!(
        status["firewall"]["drops"]["default_inbound"].as_u64() >= Some(2),
        "{status}"
    );
    let shown = ns(1)
        .command(common::BIN)
        .args(["firewall", "--api", &nodes[1].api.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("default inbound deny")
            && text.contains("ssh-from-operators")
            && text.contains("port 22"),
        "{text}"
    );

    // An SSH session stays open across a reload that also opens 8080 to operators.
    let to: SocketAddr = "10.89.0.2:22".parse().unwrap();
    let mut session = ns(0).enter(move || {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("ssh session");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    let mut buf = [0u8; 6];
    session.read_exact(&mut buf).unwrap();
    let config = add_rule_and_reload(
        &nodes[1],
        "name = \"web\"\ngroups = [\"operators\"]\nproto = \"tcp\"\nport = \"8000-8100\"\n",
    );
    assert_eq!(
        greeting(ns(0), "10.89.0.2:8080").expect("8080 after reload"),
        "hello\n"
    );
    session.write_all(b"still\n").unwrap();
    let mut echo = [0u8; 6];
    session
        .read_exact(&mut echo)
        .expect("the session survives the reload");
    assert_eq!(&echo, b"still\n");
    assert!(
        greeting(ns(2), "10.89.0.2:8080").is_err(),
        "robots still may not"
    );

    // A broken config changes nothing and says why; the API reload applies a good one.
    std::fs::write(
        &nodes[1].config,
        config.replace("port = \"22\"", "port = \"22-\""),
    )
    .unwrap();
    let (code, answer) = nodes[1].call("POST", "/api/v1/firewall/reload");
    assert_eq!(code, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap_or("")
            .contains("ssh-from-operators"),
        "{answer}"
    );
    assert_eq!(
        nodes[1].get("/api/v1/firewall")["firewall"]["rules"]["inbound"]
            .as_array()
            .map(Vec::len),
        Some(3),
        "the rules in force stay"
    );
    std::fs::write(&nodes[1].config, &config).unwrap();
    let (code, answer) = nodes[1].call("POST", "/api/v1/firewall/reload");
    assert_eq!(
        (code, answer["inbound"].as_u64()),
        (200, Some(2)),
        "{answer}"
    );
    assert!(
        greeting(ns(0), "10.89.0.2:8080").is_err(),
        "8080 is closed again"
    );

    // Who is behind an overlay address, as the operator's node knows it.
    let who = nodes[0].get("/api/v1/whois/10.89.0.2");
    assert_eq!(who["name"], "robot1", "{who}");
    assert_eq!(who["groups"], serde_json::json!(["robots"]), "{who}");
    assert!(who["certificate"]["fingerprint"].is_string(), "{who}");
    assert_eq!(nodes[0].call("GET", "/api/v1/whois/10.89.0.77").0, 404);
    assert_eq!(nodes[0].call("GET", "/api/v1/whois/robot1").0, 400);
    let shown = ns(0)
        .command(common::BIN)
        .args(["whois", "10.89.0.2", "--api", &nodes[0].api.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("10.89.0.2 is robot1") && text.contains("groups [robots]"),
        "{text}"
    );
}

/// The plugins a robot runs in `operators_rearm_by_identity`: an interlock that watches the
/// operator and latches.
const WATCH_OPERATOR: &str = "[plugins.safety]\nwatch = [\"operator\"]\nlatch = true\nheartbeat_timeout_ms = 300\nclear_after_s = 1\n";

#[test]
fn operators_rearm_a_robot_by_identity_and_nobody_else_does() {
    let mut mesh = common::mesh_formed_fleet("id", &["operator", "robot1", "robot2"], "10.88.0");
    let token_dir = tempfile::tempdir().unwrap();
    let token_file = token_dir.path().join("api.token");
    std::fs::write(&token_file, "id-test-token-0123456789\n").unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let underlay1 = mesh.fleet.underlay[1].clone();
    // robot1 serves its API on its overlay address to operators and robots, and on its
    // underlay address to token holders.
    mesh.specs[1].control = format!(
        "remote_listen = [\"10.88.0.2:7800\", \"{underlay1}:7800\"]\ntoken_file = \"{}\"\nallow_groups = [\"operators\", \"robots\"]\n",
        token_file.display()
    );
    let nodes = mesh.start_nodes(&["", WATCH_OPERATOR]);
    let (operator, robot1, robot2) = (&nodes[0], &nodes[1], &nodes[2]);
    let long = Duration::from_secs(30);
    let overlay_api: SocketAddr = "10.88.0.2:7800".parse().unwrap();
    let safety = |node: &Node| node.call_at(overlay_api, None, "GET", "/plugins/safety/status");
    common::ping_until(&mesh.fleet.nodes[0], "10.88.0.2", long);
    common::ping_until(&mesh.fleet.nodes[2], "10.88.0.2", long);
    robot1.wait_plugin("safety", long, "running", |p| common::state(p) == "running");

    // The operator reads robot1's API through the tunnel with no token.
    let (code, status) = operator.call_at(overlay_api, None, "GET", "/api/v1/status");
    assert_eq!(
        (code, status["node"]["name"].as_str()),
        (200, Some("robot1")),
        "{status}"
    );
    // A web page in the operator's browser gets nothing from it: not by another name (DNS
    // rebinding), not with a cross-site POST.
    let raw = |request: &'static str| {
        mesh.fleet.nodes[0].enter(move || {
            let mut s = TcpStream::connect_timeout(&overlay_api, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
    };
    let rebound =
        raw("GET /api/v1/status HTTP/1.1\r\nHost: evil.example:7800\r\nConnection: close\r\n\r\n")
            .unwrap();
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    let cross = raw("POST /plugins/safety/rearm HTTP/1.1\r\nHost: 10.88.0.2:7800\r\nOrigin: http://evil.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    assert!(cross.starts_with("HTTP/1.1 403"), "{cross}");
    // robot2 may read (robots are allowed on this node) but not re-arm: the interlock wants
    // an operator, and says so.
    assert_eq!(safety(robot2).0, 200);
    let (code, refused) = robot2.call_at(overlay_api, None, "POST", "/plugins/safety/rearm");
    assert_eq!(code, 403, "{refused}");
    let error = refused["error"].as_str().unwrap_or("");
    assert!(
        error.contains("robot2") && error.contains("not in group operators"),
        "{refused}"
    );
    // The lighthouse (group lighthouses) gets nothing from this node's API: 403 naming what
    // is missing.
    let (code, refused) = mesh
        .lighthouse
        .call_at(overlay_api, None, "GET", "/api/v1/status");
    assert_eq!(code, 403, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("operators or robots"),
        "{refused}"
    );
    // From the underlay, a token is needed, and the client's own header is no identity.
    let underlay_api: SocketAddr = format!("{underlay1}:7800").parse().unwrap();
    assert_eq!(
        operator
            .call_at(underlay_api, None, "GET", "/api/v1/status")
            .0,
        401
    );
    assert_eq!(
        operator
            .call_at(
                underlay_api,
                Some("id-test-token-0123456789"),
                "GET",
                "/api/v1/status"
            )
            .0,
        200
    );
    // A packet for the overlay address that arrives from the underlay, even with the
    // operator's overlay address as its source, is dropped before any socket sees it.
    let op_ns = &mesh.fleet.nodes[0];
    op_ns.run(
        "ip",
        &[
            "route",
            "add",
            "10.88.0.2/32",
            "via",
            &underlay1,
            "src",
            "10.88.0.1",
        ],
    );
    let spoofed = op_ns
        .enter(move || std::net::TcpStream::connect_timeout(&overlay_api, Duration::from_secs(2)));
    op_ns.run("ip", &["route", "del", "10.88.0.2/32"]);
    assert!(
        spoofed.is_err(),
        "the overlay API answered from the underlay"
    );

    // A real trip: robot1 stops hearing the operator, latches once the link is back, and the
    // operator re-arms it through the tunnel with no token.
    robot1.poll(
        "armed",
        long,
        || robot1.get("/plugins/safety/status"),
        |v| v["state"] == "armed",
    );
    let robot_ns = &mesh.fleet.nodes[1];
    let op_underlay = mesh.fleet.underlay[0].clone();
    robot_ns.run("nft", &["add", "table", "inet", "idtest"]);
    robot_ns.run(
        "nft",
        &[
            "add",
            "chain",
            "inet",
            "idtest",
            "in",
            "{ type filter hook input priority 0 ; }",
        ],
    );
    robot_ns.run(
        "nft",
        &[
            "add",
            "rule",
            "inet",
            "idtest",
            "in",
            "ip",
            "saddr",
            &op_underlay,
            "drop",
        ],
    );
    robot1.poll(
        "tripped",
        long,
        || robot1.get("/plugins/safety/status"),
        |v| v["stopped"] == true,
    );
    robot_ns.run("nft", &["delete", "table", "inet", "idtest"]);
    robot1.poll(
        "latched",
        long,
        || robot1.get("/plugins/safety/status"),
        |v| v["state"] == "latched",
    );
    let (code, answer) = operator.call_at(overlay_api, None, "POST", "/plugins/safety/rearm");
    assert_eq!(code, 200, "{answer}");
    let after = robot1.get("/plugins/safety/status");
    assert_eq!(after["state"], "armed", "{after}");
    assert_eq!(
        after["last_rearm"]["by"], "operator (10.88.0.1, groups operators)",
        "{after}"
    );
    assert!(
        robot1
            .log()
            .contains("re-arm by operator (10.88.0.1, groups operators) accepted"),
        "{}",
        robot1.log()
    );
}

/// `dig` from `ns`: the status line's code and the short answers.
fn dig(ns: &common::Netns, server: &str, name: &str, kind: &str) -> (String, Vec<String>) {
    let out = ns
        .command("dig")
        .args([
            &format!("@{server}"),
            name,
            kind,
            "+norecurse",
            "+time=2",
            "+tries=1",
        ])
        .output()
        .expect("dig (apt install dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or("no answer")
        .to_string();
    let answers = text
        .split(";; ANSWER SECTION:\n")
        .nth(1)
        .map(|a| {
            a.lines()
                .take_while(|l| !l.is_empty())
                .filter_map(|l| l.split_whitespace().last().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (status, answers)
}

#[test]
fn members_are_named_in_dns_and_a_member_that_leaves_loses_its_name() {
    let mut mesh = common::mesh_formed_fleet("dns", &["operator", "robot1", "robot2"], "10.87.0");
    // robot2's certificate carries an IPv6 overlay address too.
    mesh.specs[2].addresses.push("fd87::3/64".into());
    mesh.ca.sign(&mesh.specs[2], "robots");
    let nodes = mesh.start_nodes(&[]);
    let op = &mesh.fleet.nodes[0];
    let long = Duration::from_secs(30);
    common::ping_until(op, "10.87.0.2", long);
    common::ping_until(op, "10.87.0.3", long);
    common::ping_until(&mesh.fleet.nodes[1], "10.87.0.3", long);

    // The operator's own server, and robot1's through the tunnel, answer from the roster.
    let a = dig(op, "10.87.0.1", "robot2.myelin.internal", "A");
    assert_eq!(a, ("NOERROR".into(), vec!["10.87.0.3".into()]));
    let aaaa = dig(op, "10.87.0.2", "ROBOT2.myelin.internal", "AAAA");
    assert_eq!(aaaa, ("NOERROR".into(), vec!["fd87::3".into()]));
    let own = dig(op, "10.87.0.1", "operator.myelin.internal", "A");
    assert_eq!(own, ("NOERROR".into(), vec!["10.87.0.1".into()]));
    assert_eq!(
        dig(op, "10.87.0.1", "robot9.myelin.internal", "A").0,
        "NXDOMAIN"
    );
    assert_eq!(dig(op, "10.87.0.1", "example.com", "A").0, "REFUSED");
    // From the underlay the server is not there at all (the overlay guard).
    let underlay_ns = &mesh.fleet.nodes[3];
    let (status, _) = dig(
        underlay_ns,
        &mesh.fleet.underlay[0],
        "robot2.myelin.internal",
        "A",
    );
    assert_eq!(
        status, "no answer",
        "the DNS server answered on the underlay"
    );

    // robot2 stops: it says Leave, and within 5 s its name is gone everywhere.
    let stopped = std::time::Instant::now();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(nodes[2].pid(), libc::SIGTERM) };
    let deadline = stopped + Duration::from_secs(5);
    loop {
        let (status, _) = dig(op, "10.87.0.1", "robot2.myelin.internal", "A");
        if status == "NXDOMAIN" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "robot2 still has a name 5 s after it stopped:\n{}",
            nodes[0].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("robot2's name gone {:?} after SIGTERM", stopped.elapsed());
    assert!(
        nodes[0].log().contains("it left the mesh"),
        "{}",
        nodes[0].log()
    );
}

const IPERF_FIREWALL: &str = "[firewall]\ndefault_inbound = \"deny\"\nudp_timeout = \"2s\"\n[[firewall.inbound]]\nname = \"iperf-from-operators\"\ngroups = [\"operators\"]\nproto = \"tcp\"\nport = \"5201\"\n[[firewall.inbound]]\nproto = \"icmp\"\n";

#[test]
fn a_udp_flow_expires_when_idle_and_a_reload_keeps_an_iperf3_stream() {
    let mut mesh = common::mesh_formed_fleet("fwt", &["operator", "robot1"], "10.86.0");
    mesh.specs[1].rest.push_str(IPERF_FIREWALL);
    let nodes = mesh.start_nodes(&[]);
    let (op_ns, robot_ns) = (mesh.fleet.nodes[0].clone(), mesh.fleet.nodes[1].clone());
    common::ping_until(&op_ns, "10.86.0.2", Duration::from_secs(30));

    // robot1 opens a UDP flow to the operator: the operator's answers come back, for as long
    // as the flow is not idle for udp_timeout (2 s).
    let robot = robot_ns.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        s
    });
    let operator = op_ns.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:9000").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    robot.send_to(b"hello", "10.86.0.1:9000").unwrap();
    let mut buf = [0u8; 16];
    let (_, robot_addr) = operator.recv_from(&mut buf).expect("robot1 -> operator");
    operator.send_to(b"reply", robot_addr).unwrap();
    let n = robot.recv(&mut buf).expect("the reply passes");
    assert_eq!(&buf[..n], b"reply");
    operator.send_to(b"more", robot_addr).unwrap();
    assert!(robot.recv(&mut buf).is_ok(), "the flow is still fresh");
    // Idle for longer than the UDP timeout (the condition under test, not a wait for an event).
    std::thread::sleep(Duration::from_millis(3000));
    operator.send_to(b"late", robot_addr).unwrap();
    assert!(
        robot.recv(&mut buf).is_err(),
        "a datagram arrived on a flow idle past its timeout"
    );
    // robot1 opening the flow again lets the answers in again: only the stale flow was shut.
    robot.send_to(b"again", "10.86.0.1:9000").unwrap();
    operator
        .recv_from(&mut buf)
        .expect("robot1 -> operator again");
    operator.send_to(b"reply", robot_addr).unwrap();
    assert!(robot.recv(&mut buf).is_ok(), "the renewed flow passes");

    // An iperf3 stream from the operator keeps running across a reload that adds a rule.
    let mut server = robot_ns
        .command("iperf3")
        .args(["-s", "-p", "5201"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 (apt install iperf3)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let client = loop {
        let mut client = op_ns
            .command("iperf3")
            .args(["-c", "10.86.0.2", "-p", "5201", "-t", "6", "-i", "1", "-J"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The server may not listen yet: retry until it answers, within the deadline.
        let flowing = nodes[1].poll(
            "iperf3 traffic or its end",
            Duration::from_secs(5),
            || nodes[1].peer("operator"),
            |v| {
                v["rx_bytes"].as_u64().unwrap_or(0) > 5_000_000
                    || common::process_gone(u64::from(client.id()))
            },
        );
        let _ = flowing;
        if !common::process_gone(u64::from(client.id())) {
            break client;
        }
        let _ = client.wait();
        assert!(
            std::time::Instant::now() < deadline,
            "iperf3 never connected"
        );
    };
    add_rule_and_reload(
        &nodes[1],
        "name = \"dns\"\nproto = \"udp\"\nport = \"53\"\n",
    );
    let out = client.wait_with_output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let report: Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J output");
    assert!(report.get("error").is_none(), "{report}");
    let intervals = report["intervals"].as_array().cloned().unwrap_or_default();
    let rates: Vec<f64> = intervals
        .iter()
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .collect();
    println!(
        "iperf3 across the reload, Mbit/s per second: {:?}",
        rates.iter().map(|r| (r / 1e6).round()).collect::<Vec<_>>()
    );
    assert!(
        rates.len() >= 5 && rates.iter().all(|r| *r > 1e6),
        "a second without traffic: {rates:?}"
    );
}
