//! Multicast over the overlay end to end: plain Cyclone DDS with its default discovery
//! (multicast SPDP, no CYCLONEDDS_URI, no peer list) and plain UDP multicast sockets that name
//! no interface, between mesh members in namespaces whose underlay carries no multicast at
//! all, so every packet that arrives crossed the mesh.

mod common;

use common::python::Py;
use common::{MeshFleet, Node};
use serde_json::Value;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());
const LONG: Duration = Duration::from_secs(60);
const SPDP: &str = "239.255.0.1";
const SITE6: &str = "ff05::1:3";
const LINK6: &str = "ff02::1:3";

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn section(groups: &[&str], to: &[&str], extra: &str) -> String {
    let quote = |v: &[&str]| {
        v.iter()
            .map(|g| format!("\"{g}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "[multicast]\ngroups = [{}]\nto = [{}]\n{extra}",
        quote(groups),
        quote(to)
    )
}

/// Takes multicast off every namespace's underlay: `eth0` loses its MULTICAST flag (so DDS
/// does not choose it) and nftables drops any multicast that would leave through it anyway.
fn underlay_without_multicast(mesh: &MeshFleet) {
    for ns in &mesh.fleet.nodes {
        ns.run("ip", &["link", "set", "eth0", "multicast", "off"]);
        ns.run("nft", &["add", "table", "inet", "no_multicast"]);
        ns.run(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                "no_multicast",
                "out",
                "{ type filter hook output priority 0; }",
            ],
        );
        for (family, net) in [("ip", "224.0.0.0/4"), ("ip6", "ff00::/8")] {
            ns.run(
                "nft",
                &[
                    "add",
                    "rule",
                    "inet",
                    "no_multicast",
                    "out",
                    "oifname",
                    "eth0",
                    family,
                    "daddr",
                    net,
                    "counter",
                    "drop",
                ],
            );
        }
    }
}

/// Starts the fleet's nodes on an underlay without multicast and waits until each has a
/// session with every other and knows that they take part in `group`.
fn start_fleet(mesh: &MeshFleet, group: &str) -> Vec<Node> {
    underlay_without_multicast(mesh);
    let nodes = mesh.start_nodes(&[]);
    let named: Vec<(&str, &Node)> = mesh
        .specs
        .iter()
        .map(|s| s.name.as_str())
        .zip(nodes.iter())
        .collect();
    wait_mesh(&named, group);
    nodes
}

/// Waits until every node has a session with every other and knows their groups.
fn wait_mesh(nodes: &[(&str, &Node)], group: &str) {
    for (name, node) in nodes {
        for (other, _) in nodes.iter().filter(|(o, _)| o != name) {
            node.wait_peer(other, LONG, "up", |p| p["up"] == true);
            node.poll(
                &format!("{name} to learn {other}'s multicast groups"),
                LONG,
                || node.get("/api/v1/members"),
                |v| {
                    v["members"].as_array().is_some_and(|ms| {
                        ms.iter().any(|m| {
                            m["name"] == *other
                                && m["multicast"]
                                    .as_array()
                                    .is_some_and(|g| g.iter().any(|x| x == group))
                        })
                    })
                },
            );
        }
    }
}

fn metric(node: &Node, name: &str, labels: &[&str]) -> f64 {
    common::metric_sum(&node.metrics(), name, labels)
}

#[test]
fn dds_default_discovery_crosses_the_mesh() {
    let _serial = serial();
    let mut mesh = common::mesh_formed_fleet("mcd", &["robot1", "operator", "robot2"], "10.89.0");
    for spec in mesh.specs.iter_mut() {
        spec.rest
            .push_str(&section(&[SPDP], &["robots", "operators"], ""));
    }
    let nodes = start_fleet(&mesh, SPDP);
    let (robot1_ns, operator_ns, robot2_ns) = (
        &mesh.fleet.nodes[0],
        &mesh.fleet.nodes[1],
        &mesh.fleet.nodes[2],
    );
    let route = robot1_ns.run("ip", &["route", "show", "table", "all", SPDP]);
    assert!(
        route.contains("dev myelin0"),
        "the group is routed to the TUN: {route}"
    );

    let mut sub_operator = Py::spawn(
        operator_ns,
        "dds_plain.py",
        &["sub", "--expect", "100", "--timeout", "45"],
    );
    let mut sub_robot2 = Py::spawn(
        robot2_ns,
        "dds_plain.py",
        &["sub", "--expect", "100", "--timeout", "45"],
    );
    sub_operator.ready();
    sub_robot2.ready();
    let mut publisher = Py::spawn(
        robot1_ns,
        "dds_plain.py",
        &[
            "pub",
            "--count",
            "100",
            "--subscribers",
            "2",
            "--timeout",
            "45",
        ],
    );
    let operator = sub_operator.result(LONG);
    let robot2 = sub_robot2.result(LONG);
    let published = publisher.result(LONG);
    eprintln!("publisher {published}, operator {operator}, robot2 {robot2}");
    for (who, r) in [("operator", &operator), ("robot2", &robot2)] {
        assert_eq!(r["received"], 100, "{who}: {r}\n{}", publisher.output());
        assert_eq!(r["unique"], 100, "{who}: each message once: {r}");
    }

    // A late joiner finds the running publisher through the overlay's multicast.
    let started = Instant::now();
    let mut late = Py::spawn(
        operator_ns,
        "dds_plain.py",
        &["sub", "--expect", "0", "--timeout", "10"],
    );
    let joined = late.result(Duration::from_secs(20));
    let discovered = joined["discovered_s"]
        .as_f64()
        .unwrap_or_else(|| panic!("the late joiner never discovered the publisher: {joined}"));
    eprintln!(
        "late joiner discovered the publisher {discovered:.3} s after it started ({:.3} s with Python's start)",
        started.elapsed().as_secs_f64()
    );
    assert!(
        discovered < 2.0,
        "late joiner discovery took {discovered} s"
    );
    let replicas = metric(&nodes[0], "myelin_multicast_replicas_total", &[SPDP]);
    assert!(replicas > 0.0, "robot1 replicated the group: {replicas}");
    for ns in &mesh.fleet.nodes {
        let counters = ns.run("nft", &["list", "chain", "inet", "no_multicast", "out"]);
        // DDS runs on IPv4 here: its rule's counter stays at zero. (The IPv6 rule counts the
        // kernel's own MLD and neighbour discovery for eth0, which is not DDS.)
        let v4_drops = counters
            .lines()
            .find(|l| l.contains("224.0.0.0/4"))
            .and_then(|l| l.split("packets ").nth(1))
            .and_then(|rest| rest.split_whitespace().next());
        assert_eq!(
            v4_drops,
            Some("0"),
            "nothing tried the underlay in {}: {counters}",
            ns.name
        );
    }
    drop(publisher);
    // Stopping removes the routes (and the device).
    drop(nodes);
    let route = robot1_ns.run("ip", &["route", "show", "table", "all", SPDP]);
    assert!(!route.contains("myelin0"), "route left behind: {route}");
}

#[test]
fn multicast_reaches_only_its_members_and_groups_within_the_caps() {
    let _serial = serial();
    let mut mesh = common::mesh_formed_fleet_with(
        "mcr",
        &["robot1", "operator", "robot2"],
        "10.90.0",
        Some("fd90"),
    );
    // robot1 sends to operators only, at most 100 packets a second per group.
    mesh.specs[0].rest.push_str(&section(
        &[SPDP, SITE6, LINK6],
        &["operators"],
        "max_packets_per_s = 100\nmax_bytes_per_s = 1000000\n",
    ));
    // The operator's firewall takes UDP 7500-7502 and 7504 from robots (and ICMP, iperf3): a
    // replicated packet to another port is judged like any other and dropped.
    mesh.specs[1].rest.push_str(&section(
        &[SPDP, SITE6, LINK6, "239.255.0.9"],
        &["robots"],
        "[[firewall.inbound]]\ngroups = [\"robots\"]\nproto = \"udp\"\nport = \"7500-7502\"\n\
         [[firewall.inbound]]\ngroups = [\"robots\"]\nproto = \"udp\"\nport = \"7504\"\n\
         [[firewall.inbound]]\nproto = \"icmp\"\n\
         [[firewall.inbound]]\ngroups = [\"robots\"]\nproto = \"tcp\"\nport = \"5201\"\n",
    ));
    mesh.specs[2]
        .rest
        .push_str(&section(&[SPDP, SITE6], &["operators"], ""));
    let nodes = start_fleet(&mesh, SITE6);
    let (robot1_ns, operator_ns, robot2_ns) = (
        &mesh.fleet.nodes[0],
        &mesh.fleet.nodes[1],
        &mesh.fleet.nodes[2],
    );

    // Within the cap: every packet to the operator, none to robot2 (not in robot1's `to`),
    // IPv4 and IPv6 alike; a group robot1 does not take part in goes nowhere.
    let mut receivers = [
        Py::spawn(
            operator_ns,
            "mc_udp.py",
            &["recv", SPDP, "7500", "--seconds", "30"],
        ),
        Py::spawn(
            robot2_ns,
            "mc_udp.py",
            &["recv", SPDP, "7500", "--seconds", "30"],
        ),
        Py::spawn(
            operator_ns,
            "mc_udp.py",
            &["recv", SITE6, "7501", "--seconds", "30"],
        ),
        Py::spawn(
            operator_ns,
            "mc_udp.py",
            &["recv", "239.255.0.9", "7502", "--seconds", "30"],
        ),
        Py::spawn(
            operator_ns,
            "mc_udp.py",
            &["recv", SPDP, "7503", "--seconds", "30"],
        ),
        Py::spawn(
            operator_ns,
            "mc_udp.py",
            &["recv", LINK6, "7504", "--seconds", "30"],
        ),
    ];
    for r in receivers.iter_mut() {
        r.ready();
    }
    let before = metric(
        &nodes[0],
        "myelin_multicast_dropped_total",
        &["reason=\"not_configured\"", "direction=\"out\""],
    );
    for (group, port, ifname) in [
        (SPDP, "7500", None),
        (SITE6, "7501", None),
        ("239.255.0.9", "7502", Some("myelin0")),
        (SPDP, "7503", None),
        (LINK6, "7504", None),
    ] {
        let mut args = vec!["send", group, port, "--count", "100", "--rate", "50"];
        if let Some(i) = ifname {
            args.extend(["--ifname", i]);
        }
        let sent = Py::spawn(robot1_ns, "mc_udp.py", &args).result(LONG);
        assert_eq!(sent["sent"], 100, "{sent}");
    }
    // The last datagrams have had time to cross once a unicast ping has made a round trip.
    common::ping_until(operator_ns, "10.90.0.1", LONG);
    let got: Vec<Value> = receivers
        .iter_mut()
        .map(|r| {
            r.go();
            r.result(LONG)
        })
        .collect();
    eprintln!(
        "operator v4 {}, robot2 v4 {}, operator v6 site {}, operator unconfigured {}, firewalled {}, v6 link {}",
        got[0], got[1], got[2], got[3], got[4], got[5]
    );
    assert_eq!(got[0]["unique"], 100, "operator, IPv4: {}", got[0]);
    assert_eq!(got[0]["received"], 100, "each packet once: {}", got[0]);
    assert_eq!(
        got[1]["received"], 0,
        "robot2 is not in robot1's `to`: {}",
        got[1]
    );
    assert_eq!(got[2]["unique"], 100, "operator, IPv6: {}", got[2]);
    assert_eq!(got[2]["received"], 100, "each packet once: {}", got[2]);
    assert_eq!(
        got[3]["received"], 0,
        "a group robot1 does not take part in: {}",
        got[3]
    );
    assert_eq!(
        got[4]["received"], 0,
        "the operator's firewall refuses port 7503: {}",
        got[4]
    );
    assert_eq!(
        got[5]["unique"], 100,
        "operator, IPv6 link scope (an overlay source, no link-local on the TUN): {}",
        got[5]
    );
    assert_eq!(got[5]["received"], 100, "each packet once: {}", got[5]);
    assert!(
        metric(&nodes[1], "myelin_firewall_drops_total", &[]) >= 100.0,
        "the firewall counted the refused copies"
    );
    let after = metric(
        &nodes[0],
        "myelin_multicast_dropped_total",
        &["reason=\"not_configured\"", "direction=\"out\""],
    );
    assert!(
        after - before >= 100.0,
        "the unconfigured group's packets are counted: {}",
        after - before
    );

    // A flood far above the cap is cut to it, and the unicast tunnel keeps its throughput.
    let mut ratios = Vec::new();
    for attempt in 1..=3 {
        let quiet = common::iperf_tcp(operator_ns, robot1_ns, "10.90.0.2", 3);
        let mut receiver = Py::spawn(
            operator_ns,
            "mc_udp.py",
            &["recv", SPDP, "7500", "--seconds", "30"],
        );
        receiver.ready();
        let capped_before = metric(
            &nodes[0],
            "myelin_multicast_dropped_total",
            &["reason=\"rate_limited\"", "direction=\"out\""],
        );
        let flood = Py::spawn(
            robot1_ns,
            "mc_udp.py",
            &[
                "send", SPDP, "7500", "--count", "4000", "--rate", "1000", "--size", "1000",
            ],
        );
        let loaded = common::iperf_tcp(operator_ns, robot1_ns, "10.90.0.2", 3);
        let mut flood = flood;
        let sent = flood.result(LONG);
        common::ping_until(operator_ns, "10.90.0.1", LONG);
        receiver.go();
        let got = receiver.result(LONG);
        let seconds = sent["seconds"].as_f64().unwrap();
        let received = got["received"].as_f64().unwrap();
        let capped = metric(
            &nodes[0],
            "myelin_multicast_dropped_total",
            &["reason=\"rate_limited\"", "direction=\"out\""],
        ) - capped_before;
        let ratio = loaded / quiet;
        eprintln!(
            "attempt {attempt}: flood of 4000 in {seconds:.2} s, operator got {received}, {capped} capped at robot1; iperf3 {quiet:.0} Mbit/s quiet, {loaded:.0} under the flood ({ratio:.2}x)"
        );
        assert!(
            received <= 100.0 + 100.0 * seconds + 5.0 && received >= 100.0,
            "the flood is cut to the cap (100 a second, one second's burst): {received} in {seconds} s"
        );
        assert!(
            capped >= 4000.0 - received - 5.0,
            "capped packets are counted: {capped}"
        );
        ratios.push(ratio);
        if ratio >= 0.7 {
            break;
        }
    }
    assert!(
        ratios.iter().any(|r| *r >= 0.7),
        "unicast throughput under a capped multicast flood, against the same run without: {ratios:?}"
    );
}

/// A peer's tunnel byte counter on `node` (what it sent to `peer`).
fn tx_bytes(node: &Node, peer: &str) -> f64 {
    node.peer(peer)["tx_bytes"].as_f64().unwrap_or(0.0)
}

/// The replication cost of a ROS-like workload, for docs/benchmarks.md (a measurement, not a
/// check: `cargo test --all-features --test multicast -- --ignored --nocapture`). robot1
/// publishes 10 topics at 10 Hz (200-byte samples) with Cyclone's default transport; the
/// operator reads all ten; robot2 runs a participant that reads none, then one that reads all.
#[test]
#[ignore = "a measurement for docs/benchmarks.md"]
fn replication_cost_of_a_ros_like_workload() {
    let _serial = serial();
    let mut mesh = common::mesh_formed_fleet("mcc", &["robot1", "operator", "robot2"], "10.91.0");
    for spec in mesh.specs.iter_mut() {
        spec.rest
            .push_str(&section(&[SPDP], &["robots", "operators"], ""));
    }
    let nodes = start_fleet(&mesh, SPDP);
    for robot2_topics in ["0", "10"] {
        let mut all = Py::spawn(
            &mesh.fleet.nodes[1],
            "dds_load.py",
            &["sub", "--topics", "10", "--seconds", "14"],
        );
        let mut none = Py::spawn(
            &mesh.fleet.nodes[2],
            "dds_load.py",
            &["sub", "--topics", robot2_topics, "--seconds", "14"],
        );
        all.ready();
        none.ready();
        let mut publisher = Py::spawn(
            &mesh.fleet.nodes[0],
            "dds_load.py",
            &[
                "pub",
                "--topics",
                "10",
                "--rate",
                "10",
                "--size",
                "200",
                "--seconds",
                "12",
            ],
        );
        publisher.ready();
        // Discovery settles in the first two seconds; the window is the ten after.
        let settle = Instant::now() + Duration::from_secs(2);
        while Instant::now() < settle {
            std::thread::park_timeout(settle.saturating_duration_since(Instant::now()));
        }
        // Multicast in at the operator and robot2 (packets, bytes), and every tunnel byte
        // robot1 sent each of them.
        let inbound = ["direction=\"in\""];
        let snapshot = || {
            [
                metric(&nodes[1], "myelin_multicast_packets_total", &inbound),
                metric(&nodes[1], "myelin_multicast_bytes_total", &inbound),
                metric(&nodes[2], "myelin_multicast_packets_total", &inbound),
                metric(&nodes[2], "myelin_multicast_bytes_total", &inbound),
                tx_bytes(&nodes[0], "operator"),
                tx_bytes(&nodes[0], "robot2"),
            ]
        };
        let start = Instant::now();
        let before = snapshot();
        let window = start + Duration::from_secs(8);
        while Instant::now() < window {
            std::thread::park_timeout(window.saturating_duration_since(Instant::now()));
        }
        let after = snapshot();
        let secs = start.elapsed().as_secs_f64();
        let rate = |i: usize| (after[i] - before[i]) / secs;
        let published = publisher.result(LONG);
        let got_all = all.result(LONG);
        let got_none = none.result(LONG);
        eprintln!(
            "10 topics x 10 Hz x 200 B from robot1 ({published}); operator reads all ({got_all}), robot2 reads {robot2_topics} ({got_none})"
        );
        eprintln!(
            "multicast in, per subscriber: operator {:.1} packets/s {:.0} B/s; robot2 {:.1} packets/s {:.0} B/s",
            rate(0),
            rate(1),
            rate(2),
            rate(3)
        );
        eprintln!(
            "all tunnel bytes robot1 sent (WireGuard, with unicast DDS): to operator {:.0} B/s, to robot2 {:.0} B/s",
            rate(4),
            rate(5)
        );
        assert!(
            got_all["received"].as_f64().unwrap_or(0.0) > 0.0,
            "{got_all}"
        );
    }
}
