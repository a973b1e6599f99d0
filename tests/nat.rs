//! The NAT lab: two lighthouses and a public operator on an "internet" bridge, robots behind
//! NAT routers in namespaces (nftables masquerade, as a home router; `fully-random`, as a
//! carrier-grade NAT), the recipe of ../shared/natlab. Members learn the address each
//! lighthouse sees them at and classify their NAT, and robots behind either kind reach a
//! public operator directly.

mod common;

use common::mesh::Fleetca;
use common::netns::Netns;
use common::{ping_every_until, ping_until, Node, Spec};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Each run of this binary starts six nodes; on two cores they take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[derive(Clone, Copy)]
enum NatKind {
    /// Endpoint-independent mapping (masquerade keeps the port), filtered by conntrack.
    Easy,
    /// A new random port per destination (`masquerade fully-random`).
    Hard,
}

/// The "internet": a bridge in its own namespace; every host on it gets a veth named `wan`.
struct Internet {
    ns: Arc<Netns>,
    ports: usize,
}

impl Internet {
    fn new() -> Internet {
        let ns = Arc::new(Netns::new("inet"));
        ns.run("ip", &["link", "add", "br0", "type", "bridge"]);
        ns.run("ip", &["link", "set", "br0", "up"]);
        Internet { ns, ports: 0 }
    }

    /// A namespace on the internet at `addr` (/24).
    fn host(&mut self, tag: &str, addr: &str) -> Arc<Netns> {
        let ns = Arc::new(Netns::new(tag));
        self.ports += 1;
        let port = format!("p{}", self.ports);
        self.ns.run(
            "ip",
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "wan", "netns", &ns.name,
            ],
        );
        self.ns
            .run("ip", &["link", "set", &port, "master", "br0", "up"]);
        ns.run("ip", &["addr", "add", &format!("{addr}/24"), "dev", "wan"]);
        ns.run("ip", &["link", "set", "wan", "up"]);
        ns
    }

    /// A NAT router at `public` with a LAN at 10.`site`.0.0/24 behind it (hosts come with
    /// `Site::host`).
    fn behind_nat(&mut self, tag: &str, public: &str, site: u8, kind: NatKind) -> Site {
        let router = self.host(&format!("{tag}r"), public);
        router.run("ip", &["link", "add", "lan", "type", "bridge"]);
        router.run(
            "ip",
            &["addr", "add", &format!("10.{site}.0.1/24"), "dev", "lan"],
        );
        router.run("ip", &["link", "set", "lan", "up"]);
        let s = Site {
            router: router.clone(),
            site,
            hosts: 0,
        };
        router.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        let masquerade = match kind {
            NatKind::Easy => "masquerade",
            NatKind::Hard => "masquerade fully-random",
        };
        // The input policy stays `drop`: a router that accepts unsolicited datagrams creates
        // conntrack entries for them and breaks hole punching (natlab's trap).
        let rules = format!(
            "table ip natlab {{\n\
               chain postr {{ type nat hook postrouting priority srcnat; oifname \"wan\" {masquerade}; }}\n\
               chain fwdc {{ type filter hook forward priority 0; policy drop; ct state established,related accept; iifname \"lan\" oifname {{ \"wan\", \"lan\" }} accept; }}\n\
               chain inp {{ type filter hook input priority 0; policy drop; ct state established,related accept; iifname \"lan\" accept; }}\n\
             }}\n"
        );
        let mut nft = router
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft (install nftables)");
        use std::io::Write;
        nft.stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(
            nft.wait().unwrap().success(),
            "nft rules in {}",
            router.name
        );
        s
    }
}

/// A NAT router's LAN (a bridge named `lan`) and the hosts on it.
struct Site {
    router: Arc<Netns>,
    site: u8,
    hosts: u8,
}

impl Site {
    /// The next host on this site's LAN, at 10.`site`.0.`2 + n`.
    fn host(&mut self, tag: &str) -> Arc<Netns> {
        let host = Arc::new(Netns::new(tag));
        let port = format!("h{}", self.hosts);
        let addr = format!("10.{}.0.{}", self.site, 2 + self.hosts);
        self.hosts += 1;
        self.router.run(
            "ip",
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &host.name,
            ],
        );
        self.router
            .run("ip", &["link", "set", &port, "master", "lan", "up"]);
        host.run("ip", &["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        host.run("ip", &["link", "set", "eth0", "up"]);
        host.run(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                &format!("10.{}.0.1", self.site),
            ],
        );
        host
    }
}

impl Site {
    /// Gives `host` (already elsewhere) an interface `ifname` on this site's LAN, at
    /// 10.`site`.0.`2 + n`, without a route yet; returns the address.
    fn attach(&mut self, host: &Netns, ifname: &str) -> String {
        let port = format!("h{}", self.hosts);
        let addr = format!("10.{}.0.{}", self.site, 2 + self.hosts);
        self.hosts += 1;
        self.router.run(
            "ip",
            &[
                "link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", &host.name,
            ],
        );
        self.router
            .run("ip", &["link", "set", &port, "master", "lan", "up"]);
        host.run("ip", &["link", "set", ifname, "up"]);
        addr
    }
}

/// Moves `host` onto the LAN on `to` (address `addr` on site `site`): the new address and
/// default route first, then the old interface `from` loses its address, as a robot's
/// connection manager does when it changes networks.
fn roam(host: &Netns, to: &str, addr: &str, site: u8, from: &str) {
    host.run("ip", &["addr", "add", &format!("{addr}/24"), "dev", to]);
    host.run(
        "ip",
        &[
            "route",
            "replace",
            "default",
            "via",
            &format!("10.{site}.0.1"),
            "dev",
            to,
        ],
    );
    host.run("ip", &["addr", "flush", "dev", from]);
}

/// A NAT lab fleet's certificates and configs: lighthouse `n` at overlay 10.78.0.(249 + n) and
/// the `n`th public address (port 51820), serving (and so relaying); members that find them.
struct LabFleet {
    ca: Fleetca,
    lighthouses: Vec<Spec>,
    entries: String,
}

impl LabFleet {
    fn new(name: &str, publics: &[&str]) -> LabFleet {
        let ca = Fleetca::new(name);
        let mut lighthouses: Vec<Spec> = (1..=publics.len())
            .map(|n| {
                Spec::new(
                    &format!("lighthouse{n}"),
                    &[&format!("10.78.0.{}/16", 249 + n)],
                )
            })
            .collect();
        let entries = lighthouses
            .iter()
            .zip(publics)
            .map(|(l, public)| lighthouse_entry(l, public, &l.name))
            .collect::<Vec<_>>()
            .join(", ");
        let mut fleet = LabFleet {
            ca,
            lighthouses: Vec::new(),
            entries,
        };
        for l in &mut lighthouses {
            l.rest = format!(
                "{}[lighthouse]\nenabled = true\n",
                fleet.section(l, "lighthouses", &[])
            );
        }
        fleet.lighthouses = lighthouses;
        fleet
    }

    /// `spec`'s `[mesh]` section: a certificate for `group`, talking to `talk_to`.
    fn section(&self, spec: &Spec, group: &str, talk_to: &[&str]) -> String {
        let talk_to: Vec<String> = talk_to.iter().map(|g| format!("\"{g}\"")).collect();
        format!(
            "[mesh]\nca = \"{}\"\ncert = \"{}\"\ntalk_to = [{}]\nrefresh_s = 2\nlighthouses = [{}]\n",
            self.ca.ca(),
            self.ca.sign(spec, group),
            talk_to.join(", "),
            self.entries
        )
    }

    /// Member `name` at overlay 10.78.0.`host`.
    fn member(&self, name: &str, host: u8, group: &str, talk_to: &[&str]) -> Spec {
        let mut s = Spec::new(name, &[&format!("10.78.0.{host}/16")]);
        s.rest = self.section(&s, group, talk_to);
        s
    }
}

/// `spec` with many-port probing switched off (`[mesh]` is the last section of its `rest`).
fn without_many_ports(mut spec: Spec) -> Spec {
    spec.rest.push_str("many_ports = false\n");
    spec
}

fn lighthouse_entry(l: &Spec, endpoint: &str, name: &str) -> String {
    format!(
        "{{ name = \"{name}\", endpoint = \"{endpoint}:51820\", public_key = \"{}\", overlay = \"{}\" }}",
        l.public,
        l.addresses[0].split('/').next().unwrap()
    )
}

fn connectivity(node: &Node, want: &str) -> serde_json::Value {
    node.poll(
        &format!("{}'s NAT to be classified as {want}", node.ns.name),
        Duration::from_secs(20),
        || node.get("/api/v1/status")["connectivity"].clone(),
        |c| c["nat"] == want,
    )
}

#[test]
fn members_learn_their_nat_from_two_lighthouses_and_robots_behind_nat_reach_a_public_operator() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut internet = Internet::new();
    let lh1_ns = internet.host("lh1", "203.0.113.10");
    let lh2_ns = internet.host("lh2", "203.0.113.11");
    let op_ns = internet.host("op", "203.0.113.20");
    // The operator also has a global IPv6 address (no lighthouse speaks IPv6 here).
    op_ns.run(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            "2001:db8:113::20/64",
            "dev",
            "wan",
            "nodad",
        ],
    );
    let mut easy_site = internet.behind_nat("easy", "203.0.113.21", 1, NatKind::Easy);
    let easy_ns = easy_site.host("easy");
    let neighbour_ns = easy_site.host("near");
    let mut hard_site = internet.behind_nat("hard", "203.0.113.22", 2, NatKind::Hard);
    let hard_ns = hard_site.host("hard");
    let mut home_site = internet.behind_nat("home", "203.0.113.23", 3, NatKind::Easy);
    let home_ns = home_site.host("home");

    let fleet = LabFleet::new("natlab-fleet", &["203.0.113.10", "203.0.113.11"]);
    let (lh1, lh2) = (&fleet.lighthouses[0], &fleet.lighthouses[1]);
    let members: Vec<Spec> = [
        ("operator", "operators", 1),
        ("robot1", "robots", 2),
        ("robot2", "robots", 3),
        ("robot3", "robots", 4),
        ("robot4", "robots", 5),
    ]
    .iter()
    .map(|(name, group, host)| fleet.member(name, *host, group, &["robots", "operators"]))
    .collect();
    let _lh1 = Node::start_spec(lh1_ns, lh1, "");
    let _lh2 = Node::start_spec(lh2_ns, lh2, "");
    let started = Instant::now();
    let operator = Node::start_spec(op_ns.clone(), &members[0], "");
    let robot1 = Node::start_spec(easy_ns.clone(), &members[1], "");
    let robot2 = Node::start_spec(hard_ns.clone(), &members[2], "");
    let _robot3 = Node::start_spec(home_ns.clone(), &members[3], "");
    let _robot4 = Node::start_spec(neighbour_ns.clone(), &members[4], "");

    let op = connectivity(&operator, "none (public address)");
    // Its candidates: its address toward the lighthouses, then its global IPv6 address.
    assert_eq!(
        op["candidates"],
        serde_json::json!(["203.0.113.20:51820", "[2001:db8:113::20]:51820"]),
        "{op}"
    );
    let easy = connectivity(&robot1, "endpoint-independent (easy)");
    let hard = connectivity(&robot2, "endpoint-dependent (hard)");
    eprintln!("operator {op}\nrobot1 {easy}\nrobot2 {hard}");
    for o in easy["observed"].as_array().unwrap() {
        assert!(
            o["endpoint"].as_str().unwrap().starts_with("203.0.113.21:"),
            "{easy}"
        );
    }
    let ports: Vec<&str> = hard["observed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["endpoint"].as_str().unwrap())
        .collect();
    assert!(
        ports.len() == 2
            && ports[0] != ports[1]
            && ports.iter().all(|p| p.starts_with("203.0.113.22:")),
        "{hard}"
    );

    // `myelin status` says it in words.
    let out = easy_ns
        .command(common::BIN)
        .args(["status", "--api", &robot1.api.to_string()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("nat:        endpoint-independent (easy)") && text.contains("by lighthouse1"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // easy-public and hard-public meet directly (no relay exists yet).
    let easy_first = ping_until(&easy_ns, "10.78.0.1", Duration::from_secs(30));
    let hard_first = ping_until(&hard_ns, "10.78.0.1", Duration::from_secs(30));
    ping_until(&op_ns, "10.78.0.2", Duration::from_secs(10));
    ping_until(&op_ns, "10.78.0.3", Duration::from_secs(10));
    eprintln!(
        "NAT lab: nodes up to classified {:.1} s; first ping robot1 (easy) -> operator after {} ms more, robot2 (hard) -> operator {} ms",
        started.elapsed().as_secs_f64(),
        easy_first.as_millis(),
        hard_first.as_millis()
    );
    // easy-easy: both behind NAT; the roster gives each the other's reflexive address and
    // their handshakes cross.
    let punched = Instant::now();
    let easy_easy = ping_until(&easy_ns, "10.78.0.4", Duration::from_secs(40));
    ping_until(&home_ns, "10.78.0.2", Duration::from_secs(10));
    eprintln!(
        "NAT lab: robot1 (easy) <-> robot3 (easy) direct after {} ms",
        punched.elapsed().as_millis().max(easy_easy.as_millis())
    );
    // Two robots behind one NAT (which does not hairpin) meet on their shared LAN.
    let lan = ping_until(&easy_ns, "10.78.0.5", Duration::from_secs(20));
    let robot4 = robot1.wait_peer(
        "robot4",
        Duration::from_secs(5),
        "at its LAN address",
        |p| {
            p["endpoint"]
                .as_str()
                .is_some_and(|e| e.starts_with("10.1.0."))
        },
    );
    eprintln!(
        "NAT lab: robot1 <-> robot4 on one site: {} ms, at {}",
        lan.as_millis(),
        robot4["endpoint"]
    );
    // Every pair here meets directly (a relay exists: the lighthouses relay by default).
    for (node, peer) in [
        (&robot1, "operator"),
        (&robot2, "operator"),
        (&robot1, "robot3"),
        (&robot1, "robot4"),
    ] {
        let p = node.wait_peer(peer, Duration::from_secs(12), "reached directly", |p| {
            p["relay"].is_null() && p["endpoint"].is_string()
        });
        eprintln!(
            "NAT lab: {} -> {peer}: direct at {}, {} path changes",
            node.ns.name, p["endpoint"], p["path_changes"]
        );
    }
    let view = operator.wait_peer(
        "robot1",
        Duration::from_secs(10),
        "seen behind its NAT",
        |p| {
            p["endpoint"]
                .as_str()
                .is_some_and(|e| e.starts_with("203.0.113.21:"))
        },
    );
    assert_eq!(view["up"], true);
    // Members learn each other's candidates from the roster, IPv6 included.
    let members = robot1.get("/api/v1/members");
    let op_member = members["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "operator"))
        .cloned()
        .unwrap_or_default();
    assert!(
        op_member["candidates"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == "[2001:db8:113::20]:51820")),
        "{members}"
    );
}

/// Round trips of `count` pings from `ns` to `addr`, 100 ms apart: (answered, median ms).
fn ping_rtt(ns: &Netns, addr: &str, count: u32) -> (usize, f64) {
    let out = ns
        .command("ping")
        .args(["-c", &count.to_string(), "-i", "0.1", "-W", "1", addr])
        .output()
        .unwrap();
    let mut rtts: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    rtts.sort_by(f64::total_cmp);
    let median = rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN);
    (rtts.len(), median)
}

#[test]
fn members_that_cannot_meet_directly_are_relayed_and_survive_a_lighthouse_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut internet = Internet::new();
    let lh1_ns = internet.host("rl1", "203.0.113.10");
    let lh2_ns = internet.host("rl2", "203.0.113.11");
    let mut easy_site = internet.behind_nat("reasy", "203.0.113.21", 1, NatKind::Easy);
    let easy_ns = easy_site.host("reasyh");
    let mut hard_site = internet.behind_nat("rhard", "203.0.113.22", 2, NatKind::Hard);
    let hard_ns = hard_site.host("rhardh");
    let mut hard2_site = internet.behind_nat("rhard2", "203.0.113.24", 4, NatKind::Hard);
    let hard2_ns = hard2_site.host("rhard2h");

    // Lighthouses relay unless told not to.
    let fleet = LabFleet::new("natlab-relay", &["203.0.113.10", "203.0.113.11"]);
    // Many-port probing would find a direct path between the easy and the hard NAT
    // (`an_easy_and_a_hard_nat_leave_the_relay_for_a_path_many_ports_found`): off here.
    let members: Vec<Spec> = [("robot1", 2), ("robot2", 3), ("robot5", 6)]
        .iter()
        .map(|(name, host)| without_many_ports(fleet.member(name, *host, "robots", &["robots"])))
        .collect();
    let mut lighthouse1 = Node::start_spec(lh1_ns, &fleet.lighthouses[0], "");
    let _lighthouse2 = Node::start_spec(lh2_ns, &fleet.lighthouses[1], "");
    let started = Instant::now();
    let robot1 = Node::start_spec(easy_ns.clone(), &members[0], "");
    let robot2 = Node::start_spec(hard_ns.clone(), &members[1], "");
    let robot5 = Node::start_spec(hard2_ns.clone(), &members[2], "");
    for node in [&robot1, &robot2, &robot5] {
        let c = node.poll(
            &format!("{} to learn that both lighthouses relay", node.ns.name),
            Duration::from_secs(20),
            || node.get("/api/v1/status")["connectivity"].clone(),
            |c| c["relays"].as_array().is_some_and(|r| r.len() == 2),
        );
        assert_eq!(c["relays"][0], "lighthouse1", "{c}");
    }
    let ready = started.elapsed();

    // easy-hard: robot1's NAT filters by address and port, robot2's maps every destination
    // anew, so no direct path exists: the lighthouse relays.
    let easy_hard = ping_until(&easy_ns, "10.78.0.3", Duration::from_secs(30));
    let relayed = |node: &Node, peer: &str| {
        node.wait_peer(peer, Duration::from_secs(5), "relayed", |p| {
            p["relay"]
                .as_str()
                .is_some_and(|r| r.starts_with("lighthouse"))
        })
    };
    let view = relayed(&robot1, "robot2");
    relayed(&robot2, "robot1");
    let (answered, easy_hard_rtt) = ping_rtt(&easy_ns, "10.78.0.3", 20);
    assert!(answered >= 18, "{answered}/20 pings through the relay");
    // hard-hard.
    let hard_hard = ping_until(&hard_ns, "10.78.0.6", Duration::from_secs(30));
    relayed(&robot2, "robot5");
    relayed(&robot5, "robot2");
    let (answered, hard_hard_rtt) = ping_rtt(&hard_ns, "10.78.0.6", 20);
    assert!(answered >= 18, "{answered}/20 pings through the relay");
    eprintln!(
        "NAT lab relay: nodes up to relays known {:.1} s; easy-hard first ping after {} ms more, relayed via {}, RTT median {easy_hard_rtt:.2} ms; hard-hard first ping {} ms, RTT median {hard_hard_rtt:.2} ms",
        ready.as_secs_f64(),
        easy_hard.as_millis(),
        view["relay"],
        hard_hard.as_millis()
    );
    // The relay sees every datagram (only ciphertext) and counts it.
    let forwarded = common::metric_sum(&lighthouse1.metrics(), "myelin_relay_bytes_total", &[]);
    assert!(forwarded > 0.0, "lighthouse1 forwarded {forwarded} bytes");
    // While relayed, the direct path is tried again every 5 s.
    let tries = common::metric_sum(&robot1.metrics(), "myelin_path_direct_tries_total", &[]);
    robot1.poll(
        "robot1 to try robot2 directly again",
        Duration::from_secs(12),
        || {
            serde_json::json!(common::metric_sum(
                &robot1.metrics(),
                "myelin_path_direct_tries_total",
                &[]
            ))
        },
        |n| n.as_f64().is_some_and(|n| n > tries),
    );
    relayed(&robot1, "robot2");

    // The relay in use restarts (its sessions lost): the pair moves to the other relay and
    // comes back; pings resume.
    let cut = Instant::now();
    lighthouse1.kill_and_restart();
    let restarted = cut.elapsed();
    let resumed = ping_until(&easy_ns, "10.78.0.3", Duration::from_secs(20));
    ping_until(&hard_ns, "10.78.0.6", Duration::from_secs(20));
    let (answered, _) = ping_rtt(&easy_ns, "10.78.0.3", 20);
    assert!(answered >= 18, "{answered}/20 pings after the restart");
    eprintln!(
        "NAT lab relay: lighthouse1 killed and started again in {} ms; robot1 -> robot2 answered {} ms after the kill (now via {})",
        restarted.as_millis(),
        (restarted + resumed).as_millis(),
        robot1.peer("robot2")["relay"]
    );
    // `myelin peers` says how each peer is reached.
    let out = easy_ns
        .command(common::BIN)
        .args(["peers", "--api", &robot1.api.to_string()])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("path:             relayed via lighthouse"),
        "{text}"
    );
    // And the addresses each member offered (its own, behind its NAT).
    assert!(text.contains("candidates:       10.2.0.2:51820"), "{text}");
}

/// Drops the direct WireGuard path between `ns` and `peer` (both ways), leaving every other
/// address (the lighthouse) alone.
fn cut_direct(ns: &Netns, peer: &str) {
    let rules = format!(
        "table inet cut {{\n\
           chain out {{ type filter hook output priority 0; ip daddr {peer} udp dport 51820 drop; }}\n\
           chain inp {{ type filter hook input priority 0; ip saddr {peer} udp sport 51820 drop; }}\n\
         }}\n"
    );
    let mut nft = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    use std::io::Write;
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft cut in {}", ns.name);
}

/// The longest run of 100 ms intervals in which a stream delivered under a tenth of its
/// median, in milliseconds (iperf3 -J intervals, as the receiver counted them).
fn longest_stall(report: &serde_json::Value) -> u64 {
    let bytes: Vec<f64> = report["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["sum"]["bytes"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    let mut sorted = bytes.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let (mut run, mut longest) = (0u64, 0u64);
    for b in bytes {
        run = if b < median / 10.0 { run + 100 } else { 0 };
        longest = longest.max(run);
    }
    longest
}

#[test]
fn a_stream_moves_to_the_relay_when_the_direct_path_dies_and_back_when_it_returns() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut internet = Internet::new();
    let lh_ns = internet.host("sl1", "203.0.113.10");
    let op_ns = internet.host("sop", "203.0.113.20");
    let robot_ns = internet.host("srob", "203.0.113.30");
    let fleet = LabFleet::new("natlab-switch", &["203.0.113.10"]);
    let op = fleet.member("operator", 1, "operators", &["robots"]);
    let robot = fleet.member("robot1", 2, "robots", &["operators"]);
    let _lighthouse = Node::start_spec(lh_ns, &fleet.lighthouses[0], "");
    let operator = Node::start_spec(op_ns.clone(), &op, "");
    let robot1 = Node::start_spec(robot_ns.clone(), &robot, "");
    ping_until(&op_ns, "10.78.0.2", Duration::from_secs(20));
    operator.wait_peer("robot1", Duration::from_secs(5), "direct", |p| {
        p["relay"].is_null() && p["endpoint"] == "203.0.113.30:51820"
    });
    robot1.poll(
        "robot1 to learn that lighthouse1 relays",
        Duration::from_secs(10),
        || robot1.get("/api/v1/status")["connectivity"].clone(),
        |c| c["relays"].as_array().is_some_and(|r| !r.is_empty()),
    );

    // A 10 Mbit/s TCP stream robot1 -> operator, counted by the operator every 100 ms.
    let mut server = robot_ns
        .command("iperf3")
        .args(["-s", "-1", "-B", "10.78.0.2"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3");
    common::wait_for(
        Duration::from_secs(10),
        "iperf3 to listen on robot1",
        || {
            robot_ns
                .command("ss")
                .args(["-ltn", "sport = :5201"])
                .output()
                .ok()
                .filter(|o| String::from_utf8_lossy(&o.stdout).contains("5201"))
                .map(|_| ())
        },
    );
    let mut client = op_ns
        .command("iperf3")
        .args([
            "-c",
            "10.78.0.2",
            "-R",
            "-b",
            "10M",
            "-t",
            "24",
            "-i",
            "0.1",
            "-J",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("iperf3 client");
    let mut flowing = |what: &str| {
        let from = operator.peer("robot1")["rx_bytes"].as_u64().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = operator.peer("robot1");
            if now["rx_bytes"]
                .as_u64()
                .is_some_and(|b| b > from + 1_000_000)
            {
                return;
            }
            if let Ok(Some(status)) = client.try_wait() {
                panic!("iperf3 ended ({status}) before {what}");
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 10 s waiting for {what}: robot1 as the operator sees it: {now:#}\nrobot1's view of the operator: {:#}\noperator log:\n{}\nrobot1 log:\n{}",
                robot1.peer("operator"),
                operator.log(),
                robot1.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    flowing("the stream to flow directly");
    let cut = Instant::now();
    cut_direct(&robot_ns, "203.0.113.20");
    let relayed = operator.wait_peer("robot1", Duration::from_secs(5), "relayed", |p| {
        p["relay"] == "lighthouse1"
    });
    let to_relay = cut.elapsed();
    robot1.wait_peer("operator", Duration::from_secs(5), "relayed", |p| {
        p["relay"] == "lighthouse1"
    });
    flowing("the stream to flow through the relay");
    let healed = Instant::now();
    robot_ns.run("nft", &["delete", "table", "inet", "cut"]);
    operator.wait_peer("robot1", Duration::from_secs(12), "direct again", |p| {
        p["relay"].is_null()
    });
    let to_direct = healed.elapsed();
    robot1.wait_peer("operator", Duration::from_secs(5), "direct again", |p| {
        p["relay"].is_null()
    });
    flowing("the stream to flow directly again");
    let out = client.wait_with_output().unwrap();
    let _ = server.wait();
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("iperf3 JSON report");
    let stall = longest_stall(&report);
    let intervals = report["intervals"].as_array().map_or(0, Vec::len);
    eprintln!(
        "NAT lab path switch: direct cut -> relayed after {} ms (at {}), healed -> direct after {} ms; longest stall of the 10 Mbit/s TCP stream {stall} ms over {intervals} intervals of 100 ms",
        to_relay.as_millis(),
        relayed["relay"],
        to_direct.as_millis()
    );
    assert!(intervals >= 200, "{report}");
    assert!(stall <= 1_000, "the stream stalled {stall} ms");
}

#[test]
fn a_robot_roams_from_one_nat_to_another_and_its_peers_follow_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut internet = Internet::new();
    let lh_ns = internet.host("ml1", "203.0.113.10");
    let op_ns = internet.host("mop", "203.0.113.20");
    let mut site_a = internet.behind_nat("msa", "203.0.113.21", 1, NatKind::Easy);
    let robot_ns = site_a.host("mrob");
    let mut site_b = internet.behind_nat("msb", "203.0.113.25", 5, NatKind::Easy);
    let mut hard_site = internet.behind_nat("mhd", "203.0.113.22", 2, NatKind::Hard);
    let hard_ns = hard_site.host("mhdh");
    let fleet = LabFleet::new("natlab-roam", &["203.0.113.10"]);
    let op = fleet.member("operator", 1, "operators", &["robots"]);
    let robot = fleet.member("robot1", 2, "robots", &["operators", "robots"]);
    let robot2 = fleet.member("robot2", 3, "robots", &["operators", "robots"]);
    let _lighthouse = Node::start_spec(lh_ns, &fleet.lighthouses[0], "");
    let operator = Node::start_spec(op_ns.clone(), &op, "");
    let robot1 = Node::start_spec(robot_ns.clone(), &robot, "");
    let _robot2 = Node::start_spec(hard_ns.clone(), &robot2, "");
    ping_until(&robot_ns, "10.78.0.1", Duration::from_secs(20));
    // robot2 sits behind a hard NAT: robot1 reaches it through the lighthouse.
    ping_until(&robot_ns, "10.78.0.3", Duration::from_secs(20));
    robot1.wait_peer("robot2", Duration::from_secs(10), "relayed", |p| {
        p["relay"] == "lighthouse1"
    });

    let b_addr = site_b.attach(&robot_ns, "eth1");
    let mut times = Vec::new();
    for trial in 0..6 {
        // Back and forth between site A (eth0, 10.1.0.2) and site B (eth1).
        let (to, addr, site, from, public) = if trial % 2 == 0 {
            ("eth1", b_addr.as_str(), 5, "eth0", "203.0.113.25:")
        } else {
            ("eth0", "10.1.0.2", 1, "eth1", "203.0.113.21:")
        };
        let moved = Instant::now();
        roam(&robot_ns, to, addr, site, from);
        // Odd trials: the operator speaks first (robot1 answers); even: robot1 does.
        if trial % 2 == 0 {
            ping_until(&robot_ns, "10.78.0.1", Duration::from_secs(10))
        } else {
            ping_until(&op_ns, "10.78.0.2", Duration::from_secs(10))
        };
        let usable = moved.elapsed();
        operator.wait_peer("robot1", Duration::from_secs(5), "at its new NAT", |p| {
            p["endpoint"]
                .as_str()
                .is_some_and(|e| e.starts_with(public))
        });
        let relayed = ping_until(&robot_ns, "10.78.0.3", Duration::from_secs(10));
        eprintln!(
            "NAT lab roam {trial}: robot1 to {} ({}), usable with the operator after {} ms (robot1 {}), with robot2 (relayed) {} ms later",
            public.trim_end_matches(':'),
            to,
            usable.as_millis(),
            if trial % 2 == 0 { "initiator" } else { "responder" },
            relayed.as_millis()
        );
        times.push(usable);
    }
    let worst = times.iter().max().unwrap();
    assert!(
        *worst < Duration::from_secs(1),
        "a roam took {worst:?} (all: {times:?})"
    );
}

/// Hosts `a` and `b` (each behind its own IPv4 NAT) also share an IPv6 link without a NAT:
/// `<prefix>::2` and `<prefix>::3`, global addresses that only their candidates tell of.
fn share_ipv6(a: &Netns, b: &Netns, prefix: &str) {
    a.run(
        "ip",
        &[
            "link", "add", "v6", "type", "veth", "peer", "name", "v6", "netns", &b.name,
        ],
    );
    for (ns, host) in [(a, 2), (b, 3)] {
        let addr = format!("{prefix}::{host}/64");
        ns.run("ip", &["-6", "addr", "add", &addr, "dev", "v6", "nodad"]);
        ns.run("ip", &["link", "set", "v6", "up"]);
    }
}

/// Blocks (or, with `false`, unblocks) every datagram on `ns`'s interface `ifname`, as a
/// firewall would; the interface and its addresses stay.
fn block(ns: &Netns, ifname: &str, blocked: bool) {
    let script = if blocked {
        format!(
            "table inet natlab_block {{\n\
               chain i {{ type filter hook input priority 0; iifname \"{ifname}\" drop; }}\n\
               chain o {{ type filter hook output priority 0; oifname \"{ifname}\" drop; }}\n\
             }}\n"
        )
    } else {
        "delete table inet natlab_block\n".to_string()
    };
    let mut nft = ns
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft (install nftables)");
    use std::io::Write;
    nft.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft block in {}", ns.name);
}

/// Two robots behind hard IPv4 NATs that also share IPv6 meet over IPv6 from their first
/// handshake (it goes to every candidate at once); when IPv6 stops working they are relayed,
/// and when it works again they move back to it from the relay.
#[test]
fn a_relayed_pair_moves_to_a_direct_ipv6_path_when_one_exists() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut internet = Internet::new();
    let lh_ns = internet.host("vl1", "203.0.113.10");
    let mut site_a = internet.behind_nat("vha", "203.0.113.22", 2, NatKind::Hard);
    let a_ns = site_a.host("vhah");
    let mut site_b = internet.behind_nat("vhb", "203.0.113.24", 4, NatKind::Hard);
    let b_ns = site_b.host("vhbh");
    // Behind their IPv4 NATs the two robots also share IPv6 without a NAT (one link here,
    // global addresses), which only their candidates tell of.
    share_ipv6(&a_ns, &b_ns, "2001:db8:99");
    let fleet = LabFleet::new("natlab-v6", &["203.0.113.10"]);
    let a = fleet.member("robot1", 2, "robots", &["robots"]);
    let b = fleet.member("robot2", 3, "robots", &["robots"]);
    let _lighthouse = Node::start_spec(lh_ns, &fleet.lighthouses[0], "");
    let robot1 = Node::start_spec(a_ns.clone(), &a, "");
    let robot2 = Node::start_spec(b_ns.clone(), &b, "");
    let on_ipv6 = |node: &Node, other: &str, addr: &str, timeout: u64| {
        node.wait_peer(
            other,
            Duration::from_secs(timeout),
            "direct over IPv6",
            |p| p["relay"].is_null() && p["endpoint"].as_str().is_some_and(|e| e.starts_with(addr)),
        )
    };
    // The first handshake went to every candidate: the IPv6 copy completed it.
    let first = ping_until(&a_ns, "10.78.0.3", Duration::from_secs(30));
    for (node, other, addr) in [
        (&robot1, "robot2", "[2001:db8:99::3]"),
        (&robot2, "robot1", "[2001:db8:99::2]"),
    ] {
        let p = on_ipv6(node, other, addr, 5);
        assert_eq!(p["path_changes"], 0, "never relayed: {p}");
    }
    // IPv6 stops working (a firewall drops it): traffic moves to the relay.
    block(&a_ns, "v6", true);
    let cut = Instant::now();
    ping_until(&a_ns, "10.78.0.3", Duration::from_secs(10));
    robot1.wait_peer("robot2", Duration::from_secs(5), "relayed", |p| {
        p["relay"] == "lighthouse1"
    });
    let relayed = cut.elapsed();
    // It works again: the next direct try goes to every candidate; the IPv6 one answers both
    // ways.
    block(&a_ns, "v6", false);
    let healed = Instant::now();
    let direct = on_ipv6(&robot1, "robot2", "[2001:db8:99::3]", 15);
    let upgraded = healed.elapsed();
    let (answered, rtt) = ping_rtt(&a_ns, "10.78.0.3", 20);
    assert!(answered >= 18, "{answered}/20 pings over IPv6");
    robot1.wait_peer("robot2", Duration::from_secs(1), "still direct", |p| {
        p["relay"].is_null()
    });
    eprintln!(
        "NAT lab IPv6: hard-hard first ping after {} ms, direct over IPv6; IPv6 blocked -> relayed after {} ms; unblocked -> direct over IPv6 at {} {} ms later; RTT median {rtt:.2} ms",
        first.as_millis(),
        relayed.as_millis(),
        direct["endpoint"],
        upgraded.as_millis()
    );
}

/// Two robots behind easy NATs meet directly over IPv4; they also share IPv6, which their
/// candidates tell of, and move to it without a relay in between.
#[test]
fn a_direct_pair_moves_to_ipv6_when_it_works_both_ways() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut internet = Internet::new();
    let lh_ns = internet.host("vp1", "203.0.113.10");
    let mut site_a = internet.behind_nat("vpa", "203.0.113.26", 6, NatKind::Easy);
    let a_ns = site_a.host("vpah");
    let mut site_b = internet.behind_nat("vpb", "203.0.113.27", 7, NatKind::Easy);
    let b_ns = site_b.host("vpbh");
    share_ipv6(&a_ns, &b_ns, "2001:db8:98");
    let fleet = LabFleet::new("natlab-v6-direct", &["203.0.113.10"]);
    let a = fleet.member("robot1", 2, "robots", &["robots"]);
    let b = fleet.member("robot2", 3, "robots", &["robots"]);
    let _lighthouse = Node::start_spec(lh_ns, &fleet.lighthouses[0], "");
    let robot1 = Node::start_spec(a_ns.clone(), &a, "");
    let robot2 = Node::start_spec(b_ns.clone(), &b, "");
    let first = ping_until(&a_ns, "10.78.0.3", Duration::from_secs(30));
    let met = Instant::now();
    for (node, other, addr) in [
        (&robot1, "robot2", "[2001:db8:98::3]"),
        (&robot2, "robot1", "[2001:db8:98::2]"),
    ] {
        node.wait_peer(other, Duration::from_secs(10), "direct over IPv6", |p| {
            p["relay"].is_null() && p["endpoint"].as_str().is_some_and(|e| e.starts_with(addr))
        });
    }
    let moved = met.elapsed();
    let (answered, rtt) = ping_rtt(&a_ns, "10.78.0.3", 20);
    assert!(answered >= 19, "{answered}/20 pings over IPv6");
    let p = robot1.wait_peer("robot2", Duration::from_secs(1), "still on IPv6", |p| {
        p["endpoint"]
            .as_str()
            .is_some_and(|e| e.starts_with("[2001:db8:98::3]"))
    });
    assert_eq!(p["path_changes"], 0, "never relayed: {p}");
    eprintln!(
        "NAT lab IPv6 preference: easy-easy first ping after {} ms; both sides direct over IPv6 {} ms later; RTT median {rtt:.2} ms",
        first.as_millis(),
        moved.as_millis()
    );
}

/// A hard NAT forgets the robot's mapping (its connection table flushed, as a router reboot or
/// a mapping timeout would) and maps it to a new port: the public operator follows the first
/// authenticated datagram from the new port, without a relay and without a new handshake.
#[test]
fn a_nat_that_rebinds_the_robots_port_is_followed_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut internet = Internet::new();
    let lh_ns = internet.host("vr1", "203.0.113.10");
    let op_ns = internet.host("vro", "203.0.113.20");
    let mut site = internet.behind_nat("vrh", "203.0.113.28", 8, NatKind::Hard);
    let robot_ns = site.host("vrhh");
    let router = site.router.clone();
    let fleet = LabFleet::new("natlab-rebind", &["203.0.113.10"]);
    let op = fleet.member("operator", 1, "operators", &["robots"]);
    let rb = fleet.member("robot1", 2, "robots", &["operators"]);
    let _lighthouse = Node::start_spec(lh_ns, &fleet.lighthouses[0], "");
    let operator = Node::start_spec(op_ns.clone(), &op, "");
    let _robot = Node::start_spec(robot_ns, &rb, "");
    ping_until(&op_ns, "10.78.0.2", Duration::from_secs(30));
    let mut outages = Vec::new();
    for round in 0..6 {
        let before = operator.wait_peer(
            "robot1",
            Duration::from_secs(5),
            "direct, behind its NAT",
            |p| {
                p["relay"].is_null()
                    && p["endpoint"]
                        .as_str()
                        .is_some_and(|e| e.starts_with("203.0.113.28:"))
            },
        );
        router.run("conntrack", &["-F"]);
        // The operator pings (each waiting at most 50 ms) until one is answered.
        let outage = ping_every_until(&op_ns, "10.78.0.2", "0.05", Duration::from_secs(5));
        let after = operator.wait_peer("robot1", Duration::from_secs(1), "at its new port", |p| {
            p["relay"].is_null() && p["endpoint"] != before["endpoint"]
        });
        assert_eq!(after["path_changes"], 0, "never relayed: {after}");
        eprintln!(
            "NAT lab rebinding {round}: robot1 {} -> {}, the operator reaches it again {} ms after the flush",
            before["endpoint"],
            after["endpoint"],
            outage.as_millis()
        );
        outages.push(outage);
    }
    outages.sort();
    eprintln!(
        "NAT lab rebinding: outage median {} ms, worst {} ms over {} rebinds",
        outages[outages.len() / 2].as_millis(),
        outages[outages.len() - 1].as_millis(),
        outages.len()
    );
}

/// Robots that are not in each other's roster (they talk to operators only) meet on demand:
/// robot1's first packet for another robot makes it ask a lighthouse, and the lighthouse
/// introduces robot1 to that robot as it answers. Behind two home NATs both send their first
/// handshakes at the same moment and each opens its own NAT for the other's: the pair is direct
/// from the start, never relayed. Behind a home NAT and a carrier-grade one no direct path
/// exists (many-port probing is off here), and the pair is relayed (before introductions it
/// never met at all: the robot behind NAT dropped robot1's handshake, and refused a
/// stranger's through the relay).
#[test]
fn members_found_on_demand_are_introduced_and_punch_through_two_nats() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut internet = Internet::new();
    let lh1_ns = internet.host("ip1", "203.0.113.10");
    let lh2_ns = internet.host("ip2", "203.0.113.11");
    let mut site_a = internet.behind_nat("ipa", "203.0.113.29", 9, NatKind::Easy);
    let a_ns = site_a.host("ipah");
    let mut site_b = internet.behind_nat("ipb", "203.0.113.30", 10, NatKind::Easy);
    let b_ns = site_b.host("ipbh");
    let mut site_c = internet.behind_nat("ipc", "203.0.113.31", 11, NatKind::Hard);
    let c_ns = site_c.host("ipch");
    let fleet = LabFleet::new("natlab-punch", &["203.0.113.10", "203.0.113.11"]);
    let specs: Vec<Spec> = [("robot1", 2), ("robot2", 3), ("robot3", 4)]
        .iter()
        .map(|(name, host)| without_many_ports(fleet.member(name, *host, "robots", &["operators"])))
        .collect();
    let _lighthouse1 = Node::start_spec(lh1_ns, &fleet.lighthouses[0], "");
    let _lighthouse2 = Node::start_spec(lh2_ns, &fleet.lighthouses[1], "");
    let robot1 = Node::start_spec(a_ns.clone(), &specs[0], "");
    let robot2 = Node::start_spec(b_ns.clone(), &specs[1], "");
    let robot3 = Node::start_spec(c_ns.clone(), &specs[2], "");
    // All registered, and all know their lighthouses relay.
    for node in [&robot1, &robot2, &robot3] {
        node.poll(
            &format!("{} to learn that both lighthouses relay", node.ns.name),
            Duration::from_secs(20),
            || node.get("/api/v1/status")["connectivity"].clone(),
            |c| c["relays"].as_array().is_some_and(|r| r.len() == 2),
        );
    }
    for (node, other) in [
        (&robot1, "robot2"),
        (&robot2, "robot1"),
        (&robot1, "robot3"),
    ] {
        assert!(
            node.peer(other).is_null(),
            "robots talk to operators only: {other} is not in {}'s roster",
            node.ns.name
        );
    }
    // easy-easy, found on demand: direct from the first answer.
    let first = ping_every_until(&a_ns, "10.78.0.3", "0.05", Duration::from_secs(20));
    for (node, other, behind) in [
        (&robot1, "robot2", "203.0.113.30:"),
        (&robot2, "robot1", "203.0.113.29:"),
    ] {
        let p = node.wait_peer(
            other,
            Duration::from_secs(5),
            "direct, behind its NAT",
            |p| {
                p["relay"].is_null()
                    && p["endpoint"]
                        .as_str()
                        .is_some_and(|e| e.starts_with(behind))
            },
        );
        assert_eq!(p["path_changes"], 0, "never relayed: {p}");
    }
    let (answered, rtt) = ping_rtt(&a_ns, "10.78.0.3", 20);
    assert!(answered >= 19, "{answered}/20 pings on the punched path");
    let p = robot1.peer("robot2");
    assert_eq!(p["path_changes"], 0, "still never relayed: {p}");
    // easy-hard, found on demand: relayed.
    let relayed_first = ping_every_until(&a_ns, "10.78.0.4", "0.05", Duration::from_secs(20));
    for (node, other) in [(&robot1, "robot3"), (&robot3, "robot1")] {
        node.wait_peer(other, Duration::from_secs(5), "relayed", |p| {
            p["relay"]
                .as_str()
                .is_some_and(|r| r.starts_with("lighthouse"))
        });
    }
    let (answered, relayed_rtt) = ping_rtt(&a_ns, "10.78.0.4", 20);
    assert!(answered >= 19, "{answered}/20 pings through the relay");
    eprintln!(
        "NAT lab introduction (found on demand): easy-easy first ping answered {} ms after the first packet, direct, RTT median {rtt:.2} ms; easy-hard {} ms, relayed, RTT median {relayed_rtt:.2} ms",
        first.as_millis(),
        relayed_first.as_millis()
    );
}

/// Many-port ("birthday") probing between an easy NAT (endpoint-independent mapping, filtered
/// by address and port) and a hard one (a random port per destination), plain UDP in the NAT
/// lab: the hard side opens `ports` mappings toward the easy side's, the easy side sprays
/// distinct random ports of the hard NAT's address until one answers. A measurement for
/// docs/benchmarks.md (`cargo test --all-features --test nat -- --ignored --nocapture
/// many_port`; `MYELIN_BIRTHDAY_TRIALS`, default 20), not a test of the node.
#[test]
#[ignore = "a measurement: run it by name with --ignored"]
fn many_port_probing_between_an_easy_and_a_hard_nat() {
    use common::python::Py;
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let trials: usize = std::env::var("MYELIN_BIRTHDAY_TRIALS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(20);
    let mut internet = Internet::new();
    let mut easy_site = internet.behind_nat("bpe", "203.0.113.32", 12, NatKind::Easy);
    let easy_ns = easy_site.host("bpeh");
    let mut hard_site = internet.behind_nat("bph", "203.0.113.33", 13, NatKind::Hard);
    let hard_ns = hard_site.host("bphh");
    let mut found_any = false;
    for (ports, rate) in [(256, 1000), (256, 100), (64, 1000)] {
        let mut times = Vec::new();
        let mut probes = Vec::new();
        for trial in 0..trials {
            for router in [&easy_site.router, &hard_site.router] {
                router.run("conntrack", &["-F"]);
            }
            let port = (40_000 + trial).to_string();
            let mut hard = Py::spawn(
                &hard_ns,
                "birthday.py",
                &[
                    "hard",
                    "203.0.113.32",
                    &port,
                    "--ports",
                    &ports.to_string(),
                    "--seconds",
                    "12",
                ],
            );
            hard.ready();
            let mut easy = Py::spawn(
                &easy_ns,
                "birthday.py",
                &[
                    "easy",
                    &port,
                    "203.0.113.33",
                    "--rate",
                    &rate.to_string(),
                    "--seconds",
                    "10",
                ],
            );
            let got = easy.result(Duration::from_secs(20));
            if got["ok"] == true {
                times.push(got["ms"].as_f64().unwrap_or(f64::NAN));
                probes.push(got["probes"].as_u64().unwrap_or(0));
                // The hard side saw the path from its end too.
                let h = hard.result(Duration::from_secs(15));
                assert_eq!(h["ok"], true, "the hard side heard nothing: {h}");
            }
        }
        found_any |= !times.is_empty();
        times.sort_by(f64::total_cmp);
        probes.sort();
        let at = |q: f64| {
            times
                .get(((times.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        eprintln!(
            "NAT lab many-port probing, {ports} hard-side ports, {rate} probes/s: {}/{trials} found a path within 10 s; time p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms; probes p50 {}",
            times.len(),
            at(0.5),
            at(0.9),
            at(1.0),
            probes.get(probes.len() / 2).copied().unwrap_or(0)
        );
    }
    assert!(found_any, "many-port probing never found a path");
}

/// An easy NAT (robot1) and a hard one (robot2): crossing handshakes cannot meet, so the pair
/// is relayed; then many-port probing finds a direct path (robot2 opens 256 ports toward
/// robot1, robot1 sprays 2 048 ports of robot2's NAT) and the pair leaves the relay for it.
#[test]
fn an_easy_and_a_hard_nat_leave_the_relay_for_a_path_many_ports_found() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut internet = Internet::new();
    let lh1_ns = internet.host("mp1", "203.0.113.10");
    let lh2_ns = internet.host("mp2", "203.0.113.11");
    let mut easy_site = internet.behind_nat("mpe", "203.0.113.34", 14, NatKind::Easy);
    let easy_ns = easy_site.host("mpeh");
    let mut hard_site = internet.behind_nat("mph", "203.0.113.35", 15, NatKind::Hard);
    let hard_ns = hard_site.host("mphh");
    let fleet = LabFleet::new("natlab-many-ports", &["203.0.113.10", "203.0.113.11"]);
    let a = fleet.member("robot1", 2, "robots", &["robots"]);
    let b = fleet.member("robot2", 3, "robots", &["robots"]);
    let _lighthouse1 = Node::start_spec(lh1_ns.clone(), &fleet.lighthouses[0], "");
    let _lighthouse2 = Node::start_spec(lh2_ns, &fleet.lighthouses[1], "");
    let robot1 = Node::start_spec(easy_ns.clone(), &a, "");
    let robot2 = Node::start_spec(hard_ns.clone(), &b, "");
    connectivity(&robot1, "endpoint-independent (easy)");
    connectivity(&robot2, "endpoint-dependent (hard)");
    let fds = |node: &Node| {
        std::fs::read_dir(format!("/proc/{}/fd", node.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let fds_before = fds(&robot2);
    let first = ping_until(&easy_ns, "10.78.0.3", Duration::from_secs(30));
    let met = Instant::now();
    let direct = robot1.wait_peer(
        "robot2",
        Duration::from_secs(20),
        "direct through robot2's NAT",
        |p| {
            p["relay"].is_null()
                && p["endpoint"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("203.0.113.35:"))
                && p["path_changes"].as_u64().is_some_and(|n| n >= 2)
        },
    );
    let found = met.elapsed();
    robot2.wait_peer(
        "robot1",
        Duration::from_secs(5),
        "direct at robot1's NAT",
        |p| p["relay"].is_null() && p["endpoint"] == "203.0.113.34:51820",
    );
    let opened = common::metric_sum(&robot2.metrics(), "myelin_path_many_port_found_total", &[]);
    assert!(
        opened >= 1.0,
        "robot2 counted a path many-port probing found"
    );
    let sprayed = common::metric_sum(&robot1.metrics(), "myelin_path_many_port_probes_total", &[]);
    let (answered, rtt) = ping_rtt(&easy_ns, "10.78.0.3", 20);
    assert!(
        answered >= 19,
        "{answered}/20 pings on the path many ports found"
    );
    let (answered, _) = ping_rtt(&hard_ns, "10.78.0.2", 20);
    assert!(answered >= 19, "{answered}/20 pings back on it");
    let p = robot1.peer("robot2");
    assert!(p["relay"].is_null(), "still direct: {p}");
    assert_eq!(p["path_changes"], direct["path_changes"], "{p}");
    // The try's other 255 sockets are closed; the one that found the path stays.
    let fds_after = fds(&robot2);
    assert!(
        fds_after <= fds_before + 2,
        "robot2 holds {fds_after} descriptors, {fds_before} before the try"
    );
    // Bulk both ways on it (robot2 sends from the socket the try found, one datagram per
    // system call), and still direct afterwards.
    let to_hard = common::iperf_tcp(&hard_ns, &easy_ns, "10.78.0.3", 3);
    let from_hard = common::iperf_tcp(&easy_ns, &hard_ns, "10.78.0.2", 3);
    // The same from robot2 on its WireGuard socket (to lighthouse1, public), for comparison.
    let main_socket = common::iperf_tcp(&lh1_ns, &hard_ns, "10.78.0.250", 3);
    assert!(
        to_hard > 10.0 && from_hard > 10.0,
        "TCP on the found path: {to_hard:.0} and {from_hard:.0} Mbit/s"
    );
    let p = robot1.peer("robot2");
    assert!(p["relay"].is_null(), "direct after the streams: {p}");
    eprintln!(
        "NAT lab many ports: easy-hard first ping (relayed) after {} ms; direct at {} {} ms later ({sprayed} ports sprayed); RTT median {rtt:.2} ms; TCP to robot2 {to_hard:.0} Mbit/s, from it {from_hard:.0} Mbit/s (from it to lighthouse1 on its WireGuard socket {main_socket:.0} Mbit/s)",
        first.as_millis(),
        direct["endpoint"],
        found.as_millis()
    );
}
