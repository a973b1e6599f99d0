//! The mesh in namespaces: peers added to and removed from a running node while iperf3
//! traffic to another peer flows.

mod common;

use common::mesh::{mesh_section, Fleetca};
use common::netns::Fleet;
use common::{ping_until, Node, Spec};
use serde_json::{json, Value};
use std::io::BufRead;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A mesh path that breaks while members come and go recovers by WireGuard's own re-handshake
/// (up to ~25 s after a lost session); the deadline leaves room for that on a loaded 2-core
/// machine.
const LONG: Duration = Duration::from_secs(45);

/// The tests in this binary take turns: each starts up to six nodes, and on two cores their
/// start-ups and iperf3 traffic would stretch each other's deadlines.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

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
    let _serial = serial();
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
        .args(["-c", "10.93.0.2", "-u", "-b", "20M", "-t", "8", "-J"])
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
    assert!(mbit >= 0.9 * 20.0, "alpha→beta fell to {mbit:.1} Mbit/s");
    assert!(beta.peer("alpha")["up"] == true);
    // Unknown peers are a 404 that says so.
    let (status, answer) = alpha.call("DELETE", "/api/v1/peers/gamma");
    assert_eq!(status, 404, "{answer}");
}

/// Polls `node`'s members until `pred` holds; fails after `timeout` saying `what`.
fn wait_members(node: &Node, what: &str, timeout: Duration, pred: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        let names = member_names(node);
        if pred(&names) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; members: {names:?}\nlog:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn member_names(node: &Node) -> Vec<String> {
    node.get("/api/v1/members")["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

/// A lighthouse, an operator and two robots with certificates and no static peers: the
/// operator reaches both robots, each robot reaches the operator but not the other robot, and
/// a node with another fleet's certificate, or one that expires, never keeps a session.
#[test]
fn a_fleet_forms_its_mesh_through_a_lighthouse() {
    let _serial = serial();
    let names = [
        "lighthouse",
        "operator",
        "robot1",
        "robot2",
        "intruder",
        "ephemeral",
    ];
    let fleet = Fleet::new("lh", &names);
    let specs: Vec<Spec> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Spec::new(n, &[&format!("10.94.0.{}/16", i + 1)]))
        .collect();
    let ca = Fleetca::new("test-fleet");
    let other = Fleetca::new("other-fleet");
    let lh_endpoint = format!("{}:51820", fleet.underlay[0]);
    let lighthouse = Some((&specs[0], lh_endpoint.as_str()));
    let mut configs = Vec::new();
    let revocations = format!("{}/revoked.crl", ca.dir.path().display());
    configs.push(format!(
        "{}revocations = \"{revocations}\"\n[lighthouse]\nenabled = true\n",
        mesh_section(&ca.ca(), &ca.sign(&specs[0], "lighthouses"), None, "")
    ));
    configs.push(mesh_section(
        &ca.ca(),
        &ca.sign(&specs[1], "operators"),
        lighthouse,
        "\"robots\", \"operators\"",
    ));
    configs.push(mesh_section(
        &ca.ca(),
        &ca.sign(&specs[2], "robots"),
        lighthouse,
        "\"operators\"",
    ));
    configs.push(mesh_section(
        &ca.ca(),
        &ca.sign(&specs[3], "robots"),
        lighthouse,
        "\"operators\"",
    ));
    // The intruder trusts its own CA (so its node starts) and knows the lighthouse's key.
    configs.push(mesh_section(
        &other.ca(),
        &other.sign(&specs[4], "robots"),
        lighthouse,
        "\"operators\"",
    ));
    // Ephemeral: valid for 25 seconds from now, signed with the library as `ca sign` does.
    let ephemeral_until = myelin::mesh::shell::unix_now() + 25;
    let ephemeral_cert = {
        use myelin::mesh::cert::{signing_key_from_pem, CertBody, Certificate, Role};
        let key_text = std::fs::read_to_string(ca.dir.path().join("ca.key")).unwrap();
        let key = signing_key_from_pem(&key_text).unwrap();
        let now = myelin::mesh::shell::unix_now();
        let public = myelin::keys::PublicKey::try_from(specs[5].public.clone()).unwrap();
        let cert = Certificate::sign(
            CertBody {
                role: Role::Node,
                name: "ephemeral".into(),
                public_key: public.0,
                networks: vec![specs[5].addresses[0].parse().unwrap()],
                groups: vec!["robots".into()],
                not_before: now,
                not_after: ephemeral_until,
                max_days: 0,
                issuer: [0; 32],
            },
            &key,
        )
        .unwrap();
        let path = ca.dir.path().join("ephemeral.crt");
        std::fs::write(&path, cert.to_pem()).unwrap();
        path.display().to_string()
    };
    configs.push(mesh_section(
        &ca.ca(),
        &ephemeral_cert,
        lighthouse,
        "\"operators\"",
    ));
    let mut nodes: Vec<Node> = specs
        .iter()
        .zip(&configs)
        .zip(&fleet.nodes)
        .map(|((spec, mesh), ns)| {
            let mut spec = spec.clone();
            spec.rest = mesh.clone();
            Node::start_spec(ns.clone(), &spec, "")
        })
        .collect();
    let (lh, operator, robot1) = (&nodes[0], &nodes[1], &nodes[2]);
    let ns = |i: usize| &fleet.nodes[i];
    // Every robot reaches the operator and back, found through the lighthouse alone.
    ping_until(ns(1), "10.94.0.3", LONG);
    ping_until(ns(1), "10.94.0.4", LONG);
    ping_until(ns(2), "10.94.0.2", LONG);
    ping_until(ns(3), "10.94.0.2", LONG);
    let started = Instant::now();
    wait_members(operator, "the operator to list both robots", LONG, |m| {
        m.contains(&"robot1".to_string()) && m.contains(&"robot2".to_string())
    });
    assert!(
        !member_names(robot1).contains(&"robot2".to_string()),
        "robots talk to operators only"
    );
    // A packet for robot2 makes robot1 ask the lighthouse who holds 10.94.0.4 (on demand, as
    // Nebula does): robot2 becomes a peer of robot1 without being in its roster.
    let asked = Instant::now();
    ping_until(ns(2), "10.94.0.4", Duration::from_secs(10));
    eprintln!("robot1 reached robot2 on demand in {:?}", asked.elapsed());
    let found = robot1.get("/api/v1/members");
    assert!(
        found["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "robot2" && m["source"] == "lookup"),
        "{found}"
    );
    let peer = operator.peer("robot1");
    assert_eq!(peer["overlay_ips"], json!(["10.94.0.3/32"]), "{peer}");
    // The intruder never joins: the lighthouse does not list it, and nobody reaches it.
    let lh_members = member_names(lh);
    assert!(
        !lh_members.contains(&"intruder".to_string()),
        "{lh_members:?}"
    );
    assert!(!pings(ns(1), "10.94.0.5"));
    assert!(
        !pings(ns(4), "10.94.0.2"),
        "the intruder reaches the operator"
    );
    // The ephemeral robot is admitted while valid, then dropped within 5 s of expiry.
    wait_members(operator, "the ephemeral robot to be listed", LONG, |m| {
        m.contains(&"ephemeral".to_string())
    });
    wait_members(
        operator,
        "the expired robot to be dropped",
        Duration::from_secs(40),
        |m| !m.contains(&"ephemeral".to_string()),
    );
    let late = myelin::mesh::shell::unix_now().saturating_sub(ephemeral_until);
    assert!(
        late <= 5,
        "the expired robot was dropped {late} s after its certificate expired"
    );
    eprintln!("mesh formed and checked in {:?}", started.elapsed());
    assert!(
        operator.peer("ephemeral").is_null(),
        "an expired member is no peer"
    );
    assert!(!pings(ns(1), "10.94.0.6"));

    // Revoking robot2 by name at the CA, with the list dropped where the lighthouse reads it:
    // every member lets go of robot2 within 5 s.
    eprintln!(
        "members before revocation: {:?}; robot2 peer: {}",
        member_names(operator),
        operator.peer("robot2")
    );
    ping_until(ns(1), "10.94.0.4", LONG);
    let revoked_at = Instant::now();
    let out = std::process::Command::new(common::BIN)
        .args([
            "ca",
            "revoke",
            "robot2",
            "--ca-dir",
            ca.dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("every certificate for `robot2`"));
    wait_members(
        operator,
        "the operator to drop revoked robot2",
        Duration::from_secs(10),
        |m| !m.contains(&"robot2".to_string()),
    );
    let took = revoked_at.elapsed();
    eprintln!("revocation took effect at the operator in {took:?}");
    assert!(took <= Duration::from_secs(5), "revocation took {took:?}");
    assert!(operator.peer("robot2").is_null());
    assert!(
        !pings(ns(1), "10.94.0.4"),
        "the operator still reaches revoked robot2"
    );
    assert!(!member_names(lh).contains(&"robot2".to_string()));
    ping_until(ns(1), "10.94.0.3", LONG);

    // A lighthouse keeps no state: restarted, it lists the members again from their
    // registrations within one refresh interval (2 s here; plus up to 1 s for a member to
    // notice the lighthouse lost their session), and the operator keeps robot1.
    nodes[0].kill_and_restart();
    let restarted = Instant::now();
    wait_members(
        &nodes[0],
        "the restarted lighthouse to list the operator and robot1",
        Duration::from_secs(10),
        |m| m.contains(&"operator".to_string()) && m.contains(&"robot1".to_string()),
    );
    let took = restarted.elapsed();
    eprintln!("the restarted lighthouse rebuilt its roster in {took:?}");
    assert!(
        took <= Duration::from_millis(3500),
        "rebuilt in {took:?}, more than one refresh and the answer timeout"
    );
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(5) {
        assert!(
            member_names(&nodes[1]).contains(&"robot1".to_string()),
            "the operator dropped robot1 while the lighthouse rebuilt its roster"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    ping_until(ns(1), "10.94.0.3", Duration::from_secs(2));
}

fn myelin_in(ns: &common::Netns, args: &[&str]) -> std::process::Output {
    ns.command(common::BIN)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// Lifetime of the certificates the join test's lighthouse signs: short, so renewal happens
/// within the test.
const CERT_LIFETIME_S: u64 = 45;

/// `myelin join` with a token from `myelin ca token`: a robot enrolls with the lighthouse's
/// signer and reaches the operator. The token works once; an expired token, another fleet's
/// token and an unreachable lighthouse are refused with those words.
#[test]
fn a_robot_joins_with_a_token_once() {
    let _serial = serial();
    let names = ["lighthouse", "operator", "robot7", "robot8"];
    let fleet = Fleet::new("join", &names);
    let specs: Vec<Spec> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Spec::new(n, &[&format!("10.95.0.{}/16", i + 1)]))
        .collect();
    let ca = Fleetca::new("join-fleet");
    let dir = ca.dir.path().display().to_string();
    // The lighthouse's signer: robots in 10.95.0.0/16, at most 30 days.
    let out = std::process::Command::new(common::BIN)
        .args([
            "ca",
            "sign",
            "--signer",
            "--name",
            "lh-signer",
            "--range",
            "10.95.0.0/16",
            "--groups",
            "robots",
            "--ca-dir",
            &dir,
            "--out",
            &format!("{dir}/signer.crt"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lh_endpoint = format!("{}:51820", fleet.underlay[0]);
    let state_dir = tempfile::tempdir().unwrap();
    let lighthouse_rest = format!(
        "{}[lighthouse]\nenabled = true\nenroll_listen = \"0.0.0.0:51823\"\nsigner_key = \"{dir}/signer.key\"\nsigner_cert = \"{dir}/signer.crt\"\nstate_file = \"{}/lighthouse.json\"\ncert_lifetime = \"{CERT_LIFETIME_S}s\"\n",
        mesh_section(&ca.ca(), &ca.sign(&specs[0], "lighthouses"), None, ""),
        state_dir.path().display()
    );
    let mut lh_spec = specs[0].clone();
    lh_spec.rest = lighthouse_rest;
    let lh = Node::start_spec(fleet.nodes[0].clone(), &lh_spec, "");
    let mut op_spec = specs[1].clone();
    op_spec.rest = mesh_section(
        &ca.ca(),
        &ca.sign(&specs[1], "operators"),
        Some((&specs[0], &lh_endpoint)),
        "\"robots\"",
    );
    let operator = Node::start_spec(fleet.nodes[1].clone(), &op_spec, "");

    // The lighthouse's config is where tokens are made.
    let token_out = myelin_in(
        &fleet.nodes[0],
        &[
            "ca",
            "token",
            "--name",
            "robot7",
            "--groups",
            "robots",
            "--talk-to",
            "operators",
            "--ttl",
            "10m",
            "--config",
            lh.config.to_str().unwrap(),
            "--endpoint",
            &fleet.underlay[0],
        ],
    );
    assert!(
        token_out.status.success(),
        "{}",
        String::from_utf8_lossy(&token_out.stderr)
    );
    let token = String::from_utf8(token_out.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert!(token.starts_with("myelin1-"), "{token}");

    let robot_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        robot_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let rd = robot_dir.path().to_str().unwrap();
    let joined = myelin_in(&fleet.nodes[2], &["join", &token, "--dir", rd]);
    assert!(
        joined.status.success(),
        "{}{}",
        String::from_utf8_lossy(&joined.stdout),
        String::from_utf8_lossy(&joined.stderr)
    );
    let said = String::from_utf8_lossy(&joined.stdout).to_string();
    assert!(
        said.contains("joined fleet `join-fleet` as `robot7`"),
        "{said}"
    );
    let key_mode = std::fs::metadata(robot_dir.path().join("private.key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
        0o600
    );
    // The config `join` wrote, with the plugins' directories moved into the test's.
    let config_path = robot_dir.path().join("myelin.toml");
    let written = std::fs::read_to_string(&config_path).unwrap();
    assert!(
        written.contains("[mesh]") && written.contains("talk_to = [\"operators\"]"),
        "{written}"
    );
    let head = written.split("# Process plugins run as").next().unwrap();
    let config = format!(
        "{}\n[plugins]\nruntime_dir = \"{rd}/run\"\nstate_dir = \"{rd}/state\"\n",
        head.replace("127.0.0.1:7800", "127.0.0.1:0")
    );
    std::fs::write(&config_path, config).unwrap();
    let cert_path = robot_dir.path().join("node.crt");
    let not_after = |path: &std::path::Path| {
        let text = std::fs::read_to_string(path).unwrap();
        myelin::mesh::cert::Certificate::parse_pem(&text).unwrap()[0]
            .body()
            .not_after
    };
    let first_until = not_after(&cert_path);
    let robot = Node::start_with(fleet.nodes[2].clone(), robot_dir, config_path);
    let deadline = Instant::now() + LONG;
    while !pings(&fleet.nodes[2], "10.95.0.2") {
        assert!(
            Instant::now() < deadline,
            "robot7 does not reach the operator\nlh members {}\nrobot7 members {}\noperator members {}\n--- robot7\n{}\n--- lh\n{}\n--- operator\n{}",
            lh.get("/api/v1/members"),
            robot.get("/api/v1/members"),
            operator.get("/api/v1/members"),
            robot.log(),
            lh.log(),
            operator.log()
        );
    }
    wait_members(&operator, "the operator to see robot7", LONG, |m| {
        m.contains(&"robot7".to_string())
    });
    let robot_address = robot.get("/api/v1/status")["node"]["overlay_addresses"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(robot_address.starts_with("10.95.0."), "{robot_address}");
    ping_until(
        &fleet.nodes[1],
        robot_address.split('/').next().unwrap(),
        LONG,
    );

    // Once only.
    let again_dir = tempfile::tempdir().unwrap();
    let again = myelin_in(
        &fleet.nodes[3],
        &["join", &token, "--dir", again_dir.path().to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(
        !again.status.success() && err.contains("already used"),
        "{err}"
    );
    assert!(
        !again_dir.path().join("myelin.toml").exists(),
        "a refused join writes no config"
    );

    // An expired token: made with the lighthouse's own key, so only time is wrong.
    let expired = {
        use myelin::mesh::token::{enroll_key, Token};
        let signer = myelin::mesh::cert::signing_key_from_pem(
            &std::fs::read_to_string(format!("{dir}/signer.key")).unwrap(),
        )
        .unwrap();
        let mut t = Token::parse(&token).unwrap();
        t.grant.id = [9; 16];
        t.grant.expires = myelin::mesh::shell::unix_now() - 60;
        Token::issue(t.grant, &enroll_key(&signer.to_bytes())).to_text()
    };
    let out = myelin_in(
        &fleet.nodes[3],
        &[
            "join",
            &expired,
            "--dir",
            again_dir.path().to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("expired"), "{err}");

    // Another fleet's token that names this lighthouse.
    let foreign = {
        use myelin::mesh::token::{enroll_key, Token};
        let mut t = Token::parse(&token).unwrap();
        t.grant.id = [8; 16];
        Token::issue(t.grant, &enroll_key(&[5; 32])).to_text()
    };
    let out = myelin_in(
        &fleet.nodes[3],
        &[
            "join",
            &foreign,
            "--dir",
            again_dir.path().to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("not issued by this lighthouse's fleet"),
        "{err}"
    );

    // A lighthouse nobody answers at.
    let unreachable = {
        use myelin::mesh::token::{enroll_key, Token};
        let mut t = Token::parse(&token).unwrap();
        for l in &mut t.grant.lighthouses {
            l.enroll = format!("{}:9", fleet.underlay[1]).parse().unwrap();
        }
        Token::issue(t.grant, &enroll_key(&[5; 32])).to_text()
    };
    let out = myelin_in(
        &fleet.nodes[3],
        &[
            "join",
            &unreachable,
            "--dir",
            again_dir.path().to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && err.contains("lighthouse unreachable"),
        "{err}"
    );

    // robot7's certificate lives CERT_LIFETIME_S seconds; in its last third the robot asks the
    // lighthouse for a new one, stores it, and stays a member past the first one's end.
    let deadline = Instant::now() + Duration::from_secs(CERT_LIFETIME_S + 15);
    while not_after(&cert_path) <= first_until {
        assert!(
            Instant::now() < deadline,
            "robot7's certificate was not renewed before it expired\n--- robot7\n{}\n--- lh\n{}",
            robot.log(),
            lh.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let renewed_at = myelin::mesh::shell::unix_now();
    eprintln!(
        "renewed {} s before the first certificate's end",
        first_until as i64 - renewed_at as i64
    );
    assert!(renewed_at + 5 <= first_until, "renewed too late to be safe");
    while myelin::mesh::shell::unix_now() <= first_until + 3 {
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_members(
        &operator,
        "robot7 to stay a member after renewal",
        Duration::from_secs(1),
        |m| m.contains(&"robot7".to_string()),
    );
    ping_until(
        &fleet.nodes[1],
        robot_address.split('/').next().unwrap(),
        Duration::from_secs(5),
    );
    drop(lh);
}

/// Starts the node `myelin join` configured in `dir`, with its plugin directories moved into
/// `dir` and its control API on a free loopback port.
fn start_joined(ns: std::sync::Arc<common::Netns>, dir: tempfile::TempDir) -> Node {
    let config_path = dir.path().join("myelin.toml");
    let written = std::fs::read_to_string(&config_path).unwrap();
    let head = written.split("# Process plugins run as").next().unwrap();
    let d = dir.path().display();
    let config = format!(
        "{}\n[plugins]\nruntime_dir = \"{d}/run\"\nstate_dir = \"{d}/state\"\n",
        head.replace("127.0.0.1:7800", "127.0.0.1:0")
    );
    std::fs::write(&config_path, config).unwrap();
    Node::start_with(ns, dir, config_path)
}

/// Two lighthouses; every member registers with both. Killing one changes nothing for a
/// session in progress (no ping lost), and a new robot still joins through the other and
/// reaches the operator.
#[test]
fn a_fleet_keeps_working_when_one_of_two_lighthouses_dies() {
    let _serial = serial();
    let names = ["lh1", "lh2", "operator", "robot1", "robot9"];
    let fleet = Fleet::new("ha", &names);
    let specs: Vec<Spec> = names
        .iter()
        .enumerate()
        .map(|(i, n)| Spec::new(n, &[&format!("10.96.0.{}/16", i + 1)]))
        .collect();
    let ca = Fleetca::new("ha-fleet");
    let dir = ca.dir.path().display().to_string();
    let out = std::process::Command::new(common::BIN)
        .args([
            "ca",
            "sign",
            "--signer",
            "--name",
            "lh2-signer",
            "--range",
            "10.96.0.0/16",
            "--groups",
            "robots",
            "--ca-dir",
            &dir,
            "--out",
            &format!("{dir}/signer.crt"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let endpoints: Vec<String> = (0..2)
        .map(|i| format!("{}:51820", fleet.underlay[i]))
        .collect();
    let both = format!(
        "lighthouses = [{{ name = \"lh1\", endpoint = \"{}\", public_key = \"{}\", overlay = \"10.96.0.1\" }}, {{ name = \"lh2\", endpoint = \"{}\", public_key = \"{}\", overlay = \"10.96.0.2\" }}]\n",
        endpoints[0], specs[0].public, endpoints[1], specs[1].public
    );
    let state = tempfile::tempdir().unwrap();
    let rest = |i: usize, groups: &str, talk_to: &str| {
        format!(
            "[mesh]\nca = \"{}\"\ncert = \"{}\"\ntalk_to = [{talk_to}]\nrefresh_s = 2\n",
            ca.ca(),
            ca.sign(&specs[i], groups)
        )
    };
    let mut nodes = Vec::new();
    for (i, config) in [
        format!("{}[lighthouse]\nenabled = true\n", rest(0, "lighthouses", "")),
        // Lighthouses know each other, so neither hands out the other's address.
        format!(
            "{}lighthouses = [{{ name = \"lh1\", endpoint = \"{}\", public_key = \"{}\", overlay = \"10.96.0.1\" }}]\n[lighthouse]\nenabled = true\nenroll_listen = \"0.0.0.0:51823\"\nsigner_key = \"{dir}/signer.key\"\nsigner_cert = \"{dir}/signer.crt\"\nstate_file = \"{}/lh2.json\"\n",
            rest(1, "lighthouses", ""),
            endpoints[0],
            specs[0].public,
            state.path().display()
        ),
        format!("{}{both}", rest(2, "operators", "\"robots\"")),
        format!("{}{both}", rest(3, "robots", "\"operators\"")),
    ]
    .into_iter()
    .enumerate()
    {
        let mut spec = specs[i].clone();
        spec.rest = config;
        nodes.push(Some(Node::start_spec(fleet.nodes[i].clone(), &spec, "")));
    }
    let ns = |i: usize| fleet.nodes[i].clone();
    let deadline = Instant::now() + LONG;
    while !pings(&ns(2), "10.96.0.4") {
        if Instant::now() > deadline {
            let log = |i: usize| nodes[i].as_ref().map(|n| n.log()).unwrap_or_default();
            panic!(
                "the operator does not reach robot1\noperator members {:?} peers {}\n--- operator log\n{}\n--- robot1 log\n{}\n--- lh1 log\n{}",
                member_names(nodes[2].as_ref().unwrap()),
                nodes[2].as_ref().unwrap().get("/api/v1/peers"),
                log(2),
                log(3),
                log(0)
            );
        }
    }
    for lh in [&nodes[0], &nodes[1]] {
        wait_members(lh.as_ref().unwrap(), "both members registered", LONG, |m| {
            m.contains(&"operator".to_string()) && m.contains(&"robot1".to_string())
        });
    }
    // A session in progress while lh1 dies: 60 pings, 50 ms apart, none lost.
    let pinger = ns(2)
        .command("ping")
        .args(["-c", "60", "-i", "0.05", "-W", "1", "10.96.0.4"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    drop(nodes[0].take());
    let out = pinger.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        summary.contains("60 received"),
        "pings lost while a lighthouse died:\n{summary}"
    );

    // A new robot joins through lh2 and reaches the operator.
    let lh2 = nodes[1].as_ref().unwrap();
    let token = myelin_in(
        &ns(1),
        &[
            "ca",
            "token",
            "--name",
            "robot9",
            "--groups",
            "robots",
            "--talk-to",
            "operators",
            "--config",
            lh2.config.to_str().unwrap(),
            "--endpoint",
            &fleet.underlay[1],
        ],
    );
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    let robot_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        robot_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let joined = myelin_in(
        &ns(4),
        &["join", &token, "--dir", robot_dir.path().to_str().unwrap()],
    );
    assert!(
        joined.status.success(),
        "{}",
        String::from_utf8_lossy(&joined.stderr)
    );
    let robot9 = start_joined(ns(4), robot_dir);
    let address = robot9.get("/api/v1/status")["node"]["overlay_addresses"][0]
        .as_str()
        .unwrap()
        .to_string();
    let ip = address.split('/').next().unwrap().to_string();
    let deadline = Instant::now() + LONG;
    while !pings(&ns(4), "10.96.0.3") {
        assert!(
            Instant::now() < deadline,
            "robot9 ({ip}) does not reach the operator\nlh2 members {}\nrobot9 members {:?} peers {}\noperator members {:?} peers {}\n--- operator log\n{}\n--- robot9 log\n{}\n--- lh2 log\n{}",
            lh2.get("/api/v1/members"),
            member_names(&robot9),
            robot9.get("/api/v1/peers"),
            member_names(nodes[2].as_ref().unwrap()),
            nodes[2].as_ref().unwrap().get("/api/v1/peers"),
            nodes[2].as_ref().unwrap().log(),
            robot9.log(),
            lh2.log()
        );
    }
    ping_until(&ns(2), &ip, LONG);
    wait_members(
        nodes[2].as_ref().unwrap(),
        "the operator to list robot9",
        LONG,
        |m| m.contains(&"robot9".to_string()),
    );
}
