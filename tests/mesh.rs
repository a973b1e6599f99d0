//! The mesh in namespaces: peers added to and removed from a running node while iperf3
//! traffic to another peer flows.

mod common;

use common::netns::Fleet;
use common::{ping_until, Node, Spec};
use serde_json::{json, Value};
use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(20);

fn pings(ns: &common::Netns, addr: &str) -> bool {
    ns.command("ping")
        .args(["-c", "1", "-W", "0.3", addr])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// alpha and beta know each other; gamma knows both, but alpha learns of gamma only through
/// the API, three times over, while iperf3 sends UDP at a fixed rate from alpha to beta.
#[test]
fn peers_join_and_leave_live_without_disturbing_the_others() {
    let fleet = Fleet::new("live", &["alpha", "beta", "gamma"]);
    let mut specs: Vec<Spec> = ["alpha", "beta", "gamma"]
        .iter()
        .enumerate()
        .map(|(i, n)| Spec::new(n, &[&format!("10.93.0.{}/16", i + 1)]))
        .collect();
    let all = specs.clone();
    let endpoint = |i: usize| format!("{}:51820", fleet.underlay[i]);
    specs[0].peer(&all[1], Some(&endpoint(1)), "");
    specs[1].peer(&all[0], Some(&endpoint(0)), "");
    specs[2].peer(&all[0], Some(&endpoint(0)), "");
    specs[2].peer(&all[1], Some(&endpoint(1)), "");
    let nodes: Vec<Node> = specs
        .iter()
        .zip(&fleet.nodes)
        .map(|(s, ns)| Node::start_spec(ns.clone(), s, ""))
        .collect();
    let (alpha, beta) = (&nodes[0], &nodes[1]);
    ping_until(&fleet.nodes[0], "10.93.0.2", LONG);
    assert!(
        !pings(&fleet.nodes[0], "10.93.0.3"),
        "gamma is not a peer of alpha yet"
    );

    // Bad input is refused with the field named, and changes nothing.
    let (status, answer) = alpha.call_json(
        "POST",
        "/api/v1/peers",
        json!({"name": "gamma", "public_key": "nope", "allowed_ips": ["10.93.0.3/32"]}),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("public_key"),
        "{answer}"
    );
    let (status, answer) = alpha.call_json(
        "POST",
        "/api/v1/peers",
        json!({"name": "gamma", "public_key": all[2].public, "allowed_ips": ["10.93.0.2/32"]}),
    );
    assert_eq!(status, 409, "beta's address cannot be taken: {answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("already routes to peer `beta`"),
        "{answer}"
    );

    let mut server = fleet.nodes[1]
        .command("iperf3")
        .args(["-s", "-1", "--forceflush", "-B", "10.93.0.2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("iperf3 (the test script installs it)");
    let mut lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lines
        .next()
        .and_then(Result::ok)
        .is_some_and(|l| l.contains("Server listening"))
    {
        assert!(Instant::now() < deadline, "iperf3 server did not start");
    }
    let client = fleet.nodes[0]
        .command("iperf3")
        .args(["-c", "10.93.0.2", "-u", "-b", "40M", "-t", "8", "-J"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let gamma = json!({
        "name": "gamma",
        "public_key": all[2].public,
        "allowed_ips": ["10.93.0.3/32"],
        "endpoint": endpoint(2),
    });
    let started = Instant::now();
    let mut cycles = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let (status, answer) = alpha.call_json("POST", "/api/v1/peers", gamma.clone());
        assert_eq!(status, 200, "{answer}");
        ping_until(&fleet.nodes[0], "10.93.0.3", LONG);
        assert!(alpha.peer("gamma")["overlay_ips"].is_array());
        let (status, answer) = alpha.call("DELETE", "/api/v1/peers/gamma");
        assert_eq!(status, 200, "{answer}");
        assert!(
            !pings(&fleet.nodes[0], "10.93.0.3"),
            "gamma still reachable after removal"
        );
        cycles += 1;
    }
    let out = client.wait_with_output().unwrap();
    let _ = server.wait();
    let v: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let sum = &v["end"]["sum"];
    let (lost, packets) = (
        sum["lost_packets"].as_u64().unwrap(),
        sum["packets"].as_u64().unwrap(),
    );
    let mbit = sum["bits_per_second"].as_f64().unwrap() / 1e6;
    eprintln!("{cycles} add/remove cycles of gamma; alpha→beta UDP: {mbit:.1} Mbit/s, {lost} of {packets} lost");
    assert!(cycles >= 2, "only {cycles} cycles");
    assert_eq!(
        lost, 0,
        "packets to beta were lost while gamma came and went"
    );
    assert!(mbit >= 0.9 * 40.0, "alpha→beta fell to {mbit:.1} Mbit/s");
    assert!(beta.peer("alpha")["up"] == true);
    // Unknown peers are a 404 that says so.
    let (status, answer) = alpha.call("DELETE", "/api/v1/peers/gamma");
    assert_eq!(status, 404, "{answer}");
}
