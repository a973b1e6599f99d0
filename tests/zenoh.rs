//! Robotics mode end to end: Myelin nodes in namespaces with the zenoh plugin, emulated ROS 2
//! nodes (plain Cyclone DDS plus the ros_discovery_info announcement) and an eclipse-zenoh
//! client, none of them written against our code.

mod common;

use common::python::Py;
use common::{state, Node};
use serde_json::Value;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const ROBOT: &str = "[plugins.zenoh]\n";
const OPERATOR: &str = "[plugins.zenoh]\nrole = \"operator\"\n";
const LONG: Duration = Duration::from_secs(60);

/// robot1, operator and robot2 in a full mesh, formed through a lighthouse by certificate;
/// robot2 is started later by the test.
fn fleet() -> common::MeshFleet {
    common::mesh_formed_fleet("zen", &["robot1", "operator", "robot2"], "10.88.0")
}

fn status(node: &Node) -> Value {
    node.get("/plugins/zenoh/status")
}

fn connected(status: &Value, peer: &str) -> bool {
    status["peers"].as_array().is_some_and(|ps| {
        ps.iter()
            .any(|p| p["name"] == peer && p["connected"] == true)
    })
}

fn has_route(status: &Value, kind: &str, key: &str) -> bool {
    status["routes"]
        .as_array()
        .is_some_and(|rs| rs.iter().any(|r| r["kind"] == kind && r["key"] == key))
}

fn wait_route(node: &Node, kind: &str, key: &str) {
    node.poll(
        &format!("a {kind} route for {key}"),
        LONG,
        || status(node),
        |s| has_route(s, kind, key),
    );
}

fn wait_connected(node: &Node, peer: &str) {
    node.poll(
        &format!("a zenoh connection to {peer}"),
        LONG,
        || status(node),
        |s| connected(s, peer),
    );
}

fn wait_running(node: &Node) {
    node.wait_plugin("zenoh", LONG, "running", |p| state(p) == "running");
}

/// tcpdump on a namespace's TUN interface, writing to `file`; returns once it listens.
fn capture(ns: &common::netns::Netns, file: &std::path::Path) -> Child {
    use std::io::BufRead;
    let mut child = ns
        .command("tcpdump")
        .args(["-i", "myelin0", "-n", "-U", "-w"])
        .arg(file)
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (install tcpdump)");
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains("listening on") => return child,
            Ok(_) => {}
            Err(_) => panic!("tcpdump did not start listening on myelin0 within 20 s"),
        }
    }
}

fn packets(file: &std::path::Path, filter: &str) -> Vec<String> {
    let out = std::process::Command::new("tcpdump")
        .args(["-n", "-r"])
        .arg(file)
        .arg(filter)
        .output()
        .expect("tcpdump -r");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn count_packets(file: &std::path::Path, filter: &str) -> usize {
    packets(file, filter).len()
}

fn received(v: &Value) -> u64 {
    v["received"].as_u64().unwrap_or(0)
}

// Runs on a mesh-formed fleet (certificates + lighthouse, no static peers).
#[test]
fn ros2_topics_cross_the_vpn_in_robot_namespaces() {
    let mesh = fleet();
    let (fleet, specs) = (&mesh.fleet, &mesh.specs);
    let (robot1_ns, operator_ns, robot2_ns) = (
        fleet.nodes[0].clone(),
        fleet.nodes[1].clone(),
        fleet.nodes[2].clone(),
    );
    let mut robot1 = Node::start_spec(robot1_ns.clone(), &specs[0], ROBOT);
    let operator = Node::start_spec(operator_ns.clone(), &specs[1], OPERATOR);
    wait_running(&robot1);
    wait_running(&operator);
    let s = status(&robot1);
    assert_eq!(s["namespace"], "/robot1", "{s:#}");
    assert_eq!(status(&operator)["namespace"], "/");
    wait_connected(&robot1, "operator");
    wait_connected(&operator, "robot1");

    let pcap_dir = tempfile::tempdir().unwrap();
    let pcap = pcap_dir.path().join("tun.pcap");
    let mut tcpdump = capture(&operator_ns, &pcap);

    // robot1's local /chatter reaches the operator as /robot1/chatter: over DDS and over zenoh.
    let mut sub = Py::spawn(
        &operator_ns,
        "ros_node.py",
        &[
            "sub",
            "--topic",
            "rt/robot1/chatter",
            "--expect",
            "100",
            "--quiet",
            "3",
            "--timeout",
            "60",
        ],
    );
    sub.ready();
    let mut zsub = Py::spawn(
        &operator_ns,
        "zenoh_sub.py",
        &[
            "--connect",
            "tcp/127.0.0.1:7447",
            "--key",
            "robot1/chatter",
            "--expect",
            "100",
            "--quiet",
            "3",
            "--timeout",
            "60",
        ],
    );
    zsub.ready();
    let mut publisher = Py::spawn(
        &robot1_ns,
        "ros_node.py",
        &[
            "pub",
            "--topic",
            "rt/chatter",
            "--name",
            "talker",
            "--count",
            "100",
            "--rate",
            "20",
            "--go",
        ],
    );
    publisher.ready();
    wait_route(&robot1, "topic/pub", "robot1/chatter");
    wait_route(&operator, "topic/sub", "robot1/chatter");
    publisher.go();
    let got = sub.result(LONG);
    println!("operator's /robot1/chatter subscriber: {got}");
    assert!(
        received(&got) >= 95,
        "DDS subscriber got {got}\n{}",
        sub.output()
    );
    let zgot = zsub.result(LONG);
    println!("eclipse-zenoh client on robot1/chatter: {zgot}");
    assert!(
        received(&zgot) >= 90,
        "zenoh client got {zgot}\n{}",
        zsub.output()
    );
    drop(publisher);

    // The other direction: the operator publishes /robot1/cmd_vel; robot1's /cmd_vel gets it.
    let mut cmd_sub = Py::spawn(
        &robot1_ns,
        "ros_node.py",
        &[
            "sub",
            "--topic",
            "rt/cmd_vel",
            "--type",
            "twist",
            "--name",
            "base",
            "--expect",
            "100",
            "--quiet",
            "3",
            "--timeout",
            "60",
        ],
    );
    cmd_sub.ready();
    let mut teleop = Py::spawn(
        &operator_ns,
        "ros_node.py",
        &[
            "pub",
            "--topic",
            "rt/robot1/cmd_vel",
            "--type",
            "twist",
            "--name",
            "teleop",
            "--count",
            "100",
            "--rate",
            "20",
            "--go",
        ],
    );
    teleop.ready();
    wait_route(&operator, "topic/pub", "robot1/cmd_vel");
    wait_route(&robot1, "topic/sub", "robot1/cmd_vel");
    teleop.go();
    let got = cmd_sub.result(LONG);
    println!("robot1's /cmd_vel subscriber: {got}");
    assert!(received(&got) >= 95, "cmd_vel subscriber got {got}");
    drop(teleop);

    // What safety does: a zenoh put of CDR bytes on robot1/e_stop from a session on robot1's
    // own router reaches robot1's local ROS subscriber of /e_stop.
    let mut estop = Py::spawn(
        &robot1_ns,
        "ros_node.py",
        &[
            "sub",
            "--topic",
            "rt/e_stop",
            "--type",
            "bool",
            "--name",
            "twist_mux",
            "--expect",
            "100",
            "--quiet",
            "3",
            "--timeout",
            "60",
        ],
    );
    estop.ready();
    wait_route(&robot1, "topic/sub", "robot1/e_stop");
    let mut put = Py::spawn(
        &robot1_ns,
        "zenoh_put.py",
        &[
            "--connect",
            "tcp/127.0.0.1:7447",
            "--key",
            "robot1/e_stop",
            "--count",
            "100",
        ],
    );
    put.result(LONG);
    let got = estop.result(LONG);
    println!("robot1's /e_stop subscriber from zenoh puts: {got}");
    assert_eq!(received(&got), 100, "CDR puts on robot1/e_stop: {got}");

    // Only zenoh's TCP crossed the tunnel, never RTPS.
    let _ = tcpdump.kill();
    let _ = tcpdump.wait();
    let zenoh_tcp = count_packets(&pcap, "tcp port 7447");
    let rtps = count_packets(&pcap, "udp portrange 7400-7600");
    let probes = count_packets(&pcap, "udp port 51821");
    let total = count_packets(&pcap, "");
    println!(
        "TUN capture: {total} packets: {zenoh_tcp} zenoh TCP, {probes} Myelin probes, {rtps} RTPS"
    );
    // Anything else may only be the kernel's own IPv6 housekeeping (ICMPv6).
    let other = packets(&pcap, "not (tcp port 7447 or udp port 51821 or icmp6)");
    assert!(
        other.is_empty(),
        "unexpected traffic on the tunnel:\n{}",
        other.join("\n")
    );
    assert!(
        zenoh_tcp > 100,
        "expected zenoh TCP on the tunnel, saw {zenoh_tcp}"
    );
    assert_eq!(rtps, 0, "RTPS crossed the tunnel");

    // Five disable/enable cycles on robot1 while its publisher runs: the node stays up and
    // delivery resumes every time.
    let node_pid = robot1.pid();
    let mut talker = Py::spawn(
        &robot1_ns,
        "ros_node.py",
        &[
            "pub",
            "--topic",
            "rt/chatter",
            "--name",
            "talker",
            "--count",
            "0",
            "--rate",
            "20",
        ],
    );
    talker.ready();
    for round in 1..=5 {
        let (code, body) = robot1.call("POST", "/api/v1/plugins/zenoh/disable");
        assert_eq!(code, 200, "disable round {round}: {body}");
        robot1.wait_plugin("zenoh", LONG, "disabled", |p| state(p) == "disabled");
        let (code, body) = robot1.call("POST", "/api/v1/plugins/zenoh/enable");
        assert_eq!(code, 200, "enable round {round}: {body}");
        wait_running(&robot1);
        let started = Instant::now();
        let mut sub = Py::spawn(
            &operator_ns,
            "ros_node.py",
            &[
                "sub",
                "--topic",
                "rt/robot1/chatter",
                "--expect",
                "10",
                "--timeout",
                "60",
            ],
        );
        let got = sub.result(LONG);
        assert!(received(&got) >= 10, "round {round}: {got}");
        println!(
            "toggle round {round}: delivery resumed, 10 messages in {:?}",
            started.elapsed()
        );
        assert!(
            robot1.child.try_wait().unwrap().is_none(),
            "robot1's node exited"
        );
        assert_eq!(robot1.pid(), node_pid);
    }
    let p = robot1.plugin("zenoh");
    assert_eq!(
        p["restarts"].as_u64().unwrap_or(0),
        0,
        "a toggle counted as a crash: {p:#}"
    );
    // A restart from the API: a fresh plugin process, delivery resumes.
    let old_pid = robot1.plugin("zenoh")["pid"].clone();
    let (code, body) = robot1.call("POST", "/api/v1/plugins/zenoh/restart");
    assert_eq!(code, 200, "restart: {body}");
    robot1.wait_plugin("zenoh", LONG, "running in a new process", |p| {
        state(p) == "running" && p["pid"] != old_pid
    });
    let mut sub = Py::spawn(
        &operator_ns,
        "ros_node.py",
        &[
            "sub",
            "--topic",
            "rt/robot1/chatter",
            "--expect",
            "10",
            "--timeout",
            "60",
        ],
    );
    let got = sub.result(LONG);
    assert!(received(&got) >= 10, "after the restart: {got}");
    drop(talker);

    // robot2 joins later: the running routers reach it without a restart.
    let robot2 = Node::start_spec(robot2_ns.clone(), &specs[2], ROBOT);
    wait_running(&robot2);
    let up = Instant::now();
    operator.wait_peer("robot2", LONG, "up", |p| p["up"] == true);
    wait_connected(&operator, "robot2");
    let joined = up.elapsed();
    println!("operator's zenoh router connected to robot2 {joined:?} after robot2's plugin ran");
    assert!(
        joined < Duration::from_secs(5),
        "robot2 connected after {joined:?}"
    );
    wait_connected(&robot1, "robot2");
    let mut sub = Py::spawn(
        &operator_ns,
        "ros_node.py",
        &[
            "sub",
            "--topic",
            "rt/robot2/chatter",
            "--expect",
            "10",
            "--timeout",
            "60",
        ],
    );
    sub.ready();
    let mut talker2 = Py::spawn(
        &robot2_ns,
        "ros_node.py",
        &[
            "pub",
            "--topic",
            "rt/chatter",
            "--name",
            "talker",
            "--count",
            "0",
            "--rate",
            "20",
        ],
    );
    talker2.ready();
    let got = sub.result(LONG);
    assert!(
        received(&got) >= 10,
        "robot2's chatter at the operator: {got}"
    );
    assert_eq!(robot1.pid(), node_pid, "robot1 was restarted");
}
