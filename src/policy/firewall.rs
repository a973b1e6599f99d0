//! The group firewall, sans-IO: rules that match a peer's identity (certificate groups, name,
//! or overlay range), a protocol and a port; a bounded connection table so replies to allowed
//! flows pass; and the verdict for each packet, given the packet, the peer it comes from or
//! goes to, and `now`. The data plane asks it for every decapsulated packet and every packet
//! read from the TUN.

use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Idle timeouts of a tracked flow (Nebula's defaults).
pub const TCP_TIMEOUT: Duration = Duration::from_secs(12 * 60);
pub const UDP_TIMEOUT: Duration = Duration::from_secs(3 * 60);
pub const OTHER_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Flows tracked at once; a new flow past it is refused (fails closed).
pub const MAX_FLOWS: usize = 65_536;
/// Myelin's own probes (UDP to this port on the overlay) always pass.
const PROBE_PORT: u16 = crate::tunnel::PROBE_PORT;

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    fn matches(self, proto: u8) -> bool {
        match self {
            Proto::Any => true,
            Proto::Tcp => proto == TCP,
            Proto::Udp => proto == UDP,
            Proto::Icmp => proto == ICMP || proto == ICMPV6,
        }
    }
}

/// Which peers a rule is about: all that are set must hold; none set means any peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Peers {
    /// The peer's certificate carries one of these groups.
    pub groups: Vec<String>,
    /// The peer is one of these names.
    pub hosts: Vec<String>,
    /// The packet's remote address is in this range.
    pub cidr: Option<IpNet>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    /// How drops and matches are counted and shown: `inbound[0]`, or the rule's own name.
    pub name: String,
    pub peers: Peers,
    pub proto: Proto,
    /// Local port for inbound rules, remote port for outbound ones; inclusive.
    pub ports: (u16, u16),
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RuleSet {
    pub default_inbound_allow: bool,
    pub default_outbound_allow: bool,
    pub inbound: Vec<Rule>,
    pub outbound: Vec<Rule>,
    pub timeouts: Timeouts,
}

/// The longest idle timeout a config may set: a flow kept longer only fills the table.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How long a tracked flow lives without a packet, by protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Timeouts {
    pub tcp: Duration,
    pub udp: Duration,
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            tcp: TCP_TIMEOUT,
            udp: UDP_TIMEOUT,
            other: OTHER_TIMEOUT,
        }
    }
}

impl Timeouts {
    fn of(&self, proto: u8) -> Duration {
        match proto {
            TCP => self.tcp,
            UDP => self.udp,
            _ => self.other,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("{rule}: proto {0:?} is not one of tcp, udp, icmp, any", .proto)]
    Proto { rule: String, proto: String },
    #[error("{rule}: port {port:?} is not \"22\", \"8000-8100\" or \"any\"")]
    Port { rule: String, port: String },
    #[error("{rule}: a port needs proto tcp or udp (icmp and any have none)")]
    PortWithoutProto { rule: String },
    #[error("[firewall].{key} = {value:?}: use \"allow\" or \"deny\"")]
    Default { key: &'static str, value: String },
    #[error("[firewall].{key} = {value:?}: {why}")]
    Timeout {
        key: &'static str,
        value: String,
        why: String,
    },
}

/// Parses `"22"`, `"8000-8100"` or `"any"`.
pub fn parse_ports(rule: &str, text: &str) -> Result<(u16, u16), RuleError> {
    let bad = || RuleError::Port {
        rule: rule.to_string(),
        port: text.to_string(),
    };
    let t = text.trim();
    if t.eq_ignore_ascii_case("any") {
        return Ok((0, u16::MAX));
    }
    let (lo, hi) = match t.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (t, t),
    };
    let lo: u16 = lo.parse().map_err(|_| bad())?;
    let hi: u16 = hi.parse().map_err(|_| bad())?;
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

pub fn parse_proto(rule: &str, text: &str) -> Result<Proto, RuleError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "any" => Ok(Proto::Any),
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        "icmp" => Ok(Proto::Icmp),
        _ => Err(RuleError::Proto {
            rule: rule.to_string(),
            proto: text.to_string(),
        }),
    }
}

pub fn parse_default(key: &'static str, text: &str) -> Result<bool, RuleError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "allow" => Ok(true),
        "deny" => Ok(false),
        _ => Err(RuleError::Default {
            key,
            value: text.to_string(),
        }),
    }
}

/// What the firewall reads of a packet: addresses, protocol and ports (ICMP echo: its
/// identifier on both sides, so a reply finds its request's flow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

/// Reads an IPv4 or IPv6 packet's header; `None` for anything too short or malformed. IPv6
/// extension headers are not walked: the next-header value is the protocol (a packet with
/// extension headers matches only `proto = "any"` rules).
pub fn summarize(packet: &[u8]) -> Option<Summary> {
    let version = packet.first()? >> 4;
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, &[u8]) = match version {
        4 => {
            let ihl = usize::from(packet.first()? & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            let src: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            // A fragment after the first has no ports: it matches as port 0.
            let frag = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
            let l4 = if frag == 0 {
                packet.get(ihl..).unwrap_or(&[])
            } else {
                &[]
            };
            (src.into(), dst.into(), *packet.get(9)?, l4)
        }
        6 => {
            let src: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            (
                src.into(),
                dst.into(),
                *packet.get(6)?,
                packet.get(40..).unwrap_or(&[]),
            )
        }
        _ => return None,
    };
    let port = |at: usize| l4.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (sport, dport) = match proto {
        TCP | UDP => (port(0).unwrap_or(0), port(2).unwrap_or(0)),
        // Echo request/reply (v4: 8/0, v6: 128/129): the identifier.
        ICMP | ICMPV6 if matches!(l4.first(), Some(0 | 8 | 128 | 129)) => {
            let id = port(4).unwrap_or(0);
            (id, id)
        }
        _ => (0, 0),
    };
    Some(Summary {
        src,
        dst,
        proto,
        sport,
        dport,
    })
}

/// A flow from this node's side: local and remote address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    local: (IpAddr, u16),
    remote: (IpAddr, u16),
}

/// Who a packet comes from or goes to.
pub struct PeerIdentity<'a> {
    pub name: &'a str,
    pub groups: &'a [String],
}

/// Why a packet was dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Drop {
    /// No rule allowed it and the default denies: counted under `default_inbound` or
    /// `default_outbound`.
    Default(&'static str),
    /// The connection table is full and this is a new flow.
    TableFull,
    /// Not an IP packet the firewall can read.
    Malformed,
}

impl Drop {
    pub fn label(&self) -> &'static str {
        match self {
            Drop::Default(d) => d,
            Drop::TableFull => "table_full",
            Drop::Malformed => "malformed",
        }
    }
}

pub struct Firewall {
    rules: std::sync::Arc<RuleSet>,
    flows: HashMap<FlowKey, Instant>,
    max_flows: usize,
    next_sweep: Instant,
}

fn rule_matches(rule: &Rule, peer: &PeerIdentity, remote: IpAddr, proto: u8, port: u16) -> bool {
    let p = &rule.peers;
    rule.proto.matches(proto)
        && (rule.proto == Proto::Any || rule.proto == Proto::Icmp || {
            let (lo, hi) = rule.ports;
            (lo..=hi).contains(&port)
        })
        && (p.groups.is_empty() || p.groups.iter().any(|g| peer.groups.contains(g)))
        && (p.hosts.is_empty() || p.hosts.iter().any(|h| h == peer.name))
        && p.cidr.is_none_or(|c| c.contains(&remote))
}

impl Firewall {
    pub fn new(rules: std::sync::Arc<RuleSet>, now: Instant) -> Firewall {
        Firewall {
            rules,
            flows: HashMap::new(),
            max_flows: MAX_FLOWS,
            next_sweep: now + Duration::from_secs(1),
        }
    }

    /// New rules; established flows stay (a flow the new rules would refuse ends with its
    /// idle timeout, as in Nebula).
    pub fn set_rules(&mut self, rules: std::sync::Arc<RuleSet>, now: Instant) {
        // Shorter timeouts bind the flows already tracked too.
        let t = rules.timeouts;
        for (key, expires) in self.flows.iter_mut() {
            *expires = (*expires).min(now + t.of(key.proto));
        }
        self.rules = rules;
    }

    pub fn rules(&self) -> &std::sync::Arc<RuleSet> {
        &self.rules
    }

    pub fn flows(&self) -> usize {
        self.flows.len()
    }

    /// A packet that came out of `peer`'s tunnel, on its way to the TUN.
    pub fn inbound(
        &mut self,
        packet: &[u8],
        peer: &PeerIdentity,
        now: Instant,
    ) -> Result<(), Drop> {
        self.judge(packet, peer, now, true)
    }

    /// A packet read from the TUN, on its way into `peer`'s tunnel.
    pub fn outbound(
        &mut self,
        packet: &[u8],
        peer: &PeerIdentity,
        now: Instant,
    ) -> Result<(), Drop> {
        self.judge(packet, peer, now, false)
    }

    /// Reads the packet and keys its flow from this node's side: an inbound packet's
    /// destination is local, an outbound one's source.
    fn judge(
        &mut self,
        packet: &[u8],
        peer: &PeerIdentity,
        now: Instant,
        inbound: bool,
    ) -> Result<(), Drop> {
        let s = summarize(packet).ok_or(Drop::Malformed)?;
        let (src, dst) = ((s.src, s.sport), (s.dst, s.dport));
        let (local, remote) = if inbound { (dst, src) } else { (src, dst) };
        let key = FlowKey {
            proto: s.proto,
            local,
            remote,
        };
        self.decide(key, peer, now, inbound)
    }

    fn decide(
        &mut self,
        key: FlowKey,
        peer: &PeerIdentity,
        now: Instant,
        inbound: bool,
    ) -> Result<(), Drop> {
        // Myelin's own probes, both ways.
        if key.proto == UDP && (key.local.1 == PROBE_PORT || key.remote.1 == PROBE_PORT) {
            return Ok(());
        }
        // The copies of one multicast packet go to many members under one key (the group is
        // the remote end): each copy is judged by the rules for its member, and none opens a
        // flow that would let the next member's copy through.
        let replicated = !inbound && key.remote.0.is_multicast();
        if !replicated {
            if let Some(expires) = self.flows.get_mut(&key) {
                if *expires > now {
                    *expires = now + self.rules.timeouts.of(key.proto);
                    return Ok(());
                }
            }
        }
        let rules = if inbound {
            &self.rules.inbound
        } else {
            &self.rules.outbound
        };
        // Inbound rules name the local port (the service here); outbound ones the remote.
        let port = if inbound { key.local.1 } else { key.remote.1 };
        let allowed = rules
            .iter()
            .any(|r| rule_matches(r, peer, key.remote.0, key.proto, port))
            || if inbound {
                self.rules.default_inbound_allow
            } else {
                self.rules.default_outbound_allow
            };
        if !allowed {
            return Err(Drop::Default(if inbound {
                "default_inbound"
            } else {
                "default_outbound"
            }));
        }
        if replicated {
            return Ok(());
        }
        if self.flows.len() >= self.max_flows {
            self.sweep(now);
            if self.flows.len() >= self.max_flows {
                return Err(Drop::TableFull);
            }
        }
        self.flows
            .insert(key, now + self.rules.timeouts.of(key.proto));
        Ok(())
    }

    /// Forgets idle flows; the data plane calls it from its timer (once a second at most).
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_sweep {
            self.next_sweep = now + Duration::from_secs(1);
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: Instant) {
        self.flows.retain(|_, expires| *expires > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, proto, 0, 0];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        p.extend_from_slice(&sport.to_be_bytes());
        p.extend_from_slice(&dport.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p
    }

    const OP: [u8; 4] = [10, 77, 0, 1];
    const R1: [u8; 4] = [10, 77, 0, 2];
    const R2: [u8; 4] = [10, 77, 0, 3];

    fn ssh_for_operators() -> RuleSet {
        RuleSet {
            default_inbound_allow: false,
            default_outbound_allow: true,
            timeouts: Default::default(),
            inbound: vec![
                Rule {
                    name: "inbound[0]".into(),
                    peers: Peers {
                        groups: vec!["operators".into()],
                        ..Peers::default()
                    },
                    proto: Proto::Tcp,
                    ports: (22, 22),
                },
                Rule {
                    name: "inbound[1]".into(),
                    peers: Peers::default(),
                    proto: Proto::Icmp,
                    ports: (0, u16::MAX),
                },
            ],
            outbound: vec![],
        }
    }

    fn ops() -> Vec<String> {
        vec!["operators".into()]
    }
    fn robots() -> Vec<String> {
        vec!["robots".into()]
    }

    #[test]
    fn operators_reach_ssh_robots_do_not_and_replies_pass() {
        let t0 = Instant::now();
        // robot1's firewall: packets from the operator and from robot2.
        let mut fw = Firewall::new(Arc::new(ssh_for_operators()), t0);
        let op_groups = ops();
        let op = PeerIdentity {
            name: "operator",
            groups: &op_groups,
        };
        let r_groups = robots();
        let r2 = PeerIdentity {
            name: "robot2",
            groups: &r_groups,
        };
        assert_eq!(fw.inbound(&v4(OP, R1, TCP, 40000, 22), &op, t0), Ok(()));
        assert_eq!(
            fw.inbound(&v4(R2, R1, TCP, 40001, 22), &r2, t0),
            Err(Drop::Default("default_inbound"))
        );
        assert_eq!(
            fw.inbound(&v4(OP, R1, TCP, 40000, 80), &op, t0),
            Err(Drop::Default("default_inbound"))
        );
        // robot1's answer to the operator's connection goes out (outbound default allows)...
        assert_eq!(fw.outbound(&v4(R1, OP, TCP, 22, 40000), &op, t0), Ok(()));
        // ...and robot1's own connection to robot2 brings robot2's replies back in, although
        // no inbound rule allows robot2.
        assert_eq!(fw.outbound(&v4(R1, R2, UDP, 5000, 7447), &r2, t0), Ok(()));
        assert_eq!(fw.inbound(&v4(R2, R1, UDP, 7447, 5000), &r2, t0), Ok(()));
        // Idle past the UDP timeout: the reply is a new flow, and refused.
        let later = t0 + UDP_TIMEOUT + Duration::from_secs(1);
        fw.handle_timeout(later);
        assert_eq!(
            fw.inbound(&v4(R2, R1, UDP, 7447, 5000), &r2, later),
            Err(Drop::Default("default_inbound"))
        );
        // Probes always pass.
        assert_eq!(fw.inbound(&v4(R2, R1, UDP, 51821, 51821), &r2, t0), Ok(()));
        // A reload that shortens the UDP timeout binds a flow tracked before it.
        assert_eq!(
            fw.outbound(&v4(R1, R2, UDP, 5001, 7447), &r2, later),
            Ok(())
        );
        let mut shorter = ssh_for_operators();
        shorter.timeouts.udp = Duration::from_secs(2);
        fw.set_rules(Arc::new(shorter), later);
        let after = later + Duration::from_secs(3);
        assert_eq!(
            fw.inbound(&v4(R2, R1, UDP, 7447, 5001), &r2, after),
            Err(Drop::Default("default_inbound"))
        );
    }

    #[test]
    fn each_copy_of_a_multicast_packet_is_judged_for_its_member() {
        let t0 = Instant::now();
        let mut rules = ssh_for_operators();
        rules.default_outbound_allow = false;
        rules.outbound = vec![Rule {
            name: "outbound[0]".into(),
            peers: Peers {
                groups: vec!["operators".into()],
                ..Peers::default()
            },
            proto: Proto::Udp,
            ports: (7400, 7400),
        }];
        let mut fw = Firewall::new(Arc::new(rules), t0);
        let (op_groups, r_groups) = (ops(), robots());
        let op = PeerIdentity {
            name: "operator",
            groups: &op_groups,
        };
        let r2 = PeerIdentity {
            name: "robot2",
            groups: &r_groups,
        };
        let spdp = v4(R1, [239, 255, 0, 1], UDP, 7400, 7400);
        for _ in 0..3 {
            assert_eq!(fw.outbound(&spdp, &op, t0), Ok(()));
            assert_eq!(
                fw.outbound(&spdp, &r2, t0),
                Err(Drop::Default("default_outbound")),
                "the operator's copy opened nothing for robot2's"
            );
        }
    }

    #[test]
    fn hosts_cidr_ranges_and_echo_replies() {
        let t0 = Instant::now();
        let rules = RuleSet {
            default_inbound_allow: false,
            default_outbound_allow: false,
            timeouts: Default::default(),
            inbound: vec![Rule {
                name: "web".into(),
                peers: Peers {
                    hosts: vec!["robot2".into()],
                    cidr: Some("10.77.0.0/24".parse().unwrap()),
                    ..Peers::default()
                },
                proto: Proto::Tcp,
                ports: (8000, 8100),
            }],
            outbound: vec![Rule {
                name: "ping".into(),
                peers: Peers::default(),
                proto: Proto::Icmp,
                ports: (0, u16::MAX),
            }],
        };
        let mut fw = Firewall::new(Arc::new(rules), t0);
        let g = robots();
        let r2 = PeerIdentity {
            name: "robot2",
            groups: &g,
        };
        let other = PeerIdentity {
            name: "robot3",
            groups: &g,
        };
        assert_eq!(fw.inbound(&v4(R2, R1, TCP, 1, 8050), &r2, t0), Ok(()));
        assert!(fw.inbound(&v4(R2, R1, TCP, 1, 8101), &r2, t0).is_err());
        assert!(fw.inbound(&v4(R2, R1, TCP, 2, 8050), &other, t0).is_err());
        assert!(fw
            .inbound(&v4([10, 77, 1, 9], R1, TCP, 3, 8050), &r2, t0)
            .is_err());
        // An echo request out, its reply (same identifier) back in.
        let mut echo = v4(R1, R2, ICMP, 0, 0);
        echo[20] = 8;
        echo[24..26].copy_from_slice(&77u16.to_be_bytes());
        let mut reply = v4(R2, R1, ICMP, 0, 0);
        reply[20] = 0;
        reply[24..26].copy_from_slice(&77u16.to_be_bytes());
        assert_eq!(fw.outbound(&echo, &r2, t0), Ok(()));
        assert_eq!(fw.inbound(&reply, &r2, t0), Ok(()));
        // TCP out is not allowed by the outbound rules.
        assert!(fw.outbound(&v4(R1, R2, TCP, 9, 22), &r2, t0).is_err());
    }

    #[test]
    fn a_full_table_refuses_new_flows_but_keeps_the_old() {
        let t0 = Instant::now();
        let mut rules = ssh_for_operators();
        rules.default_inbound_allow = true;
        let mut fw = Firewall::new(Arc::new(rules), t0);
        fw.max_flows = 3;
        let g = ops();
        let op = PeerIdentity {
            name: "operator",
            groups: &g,
        };
        for port in 0..3 {
            assert_eq!(fw.inbound(&v4(OP, R1, UDP, port, 9), &op, t0), Ok(()));
        }
        assert_eq!(
            fw.inbound(&v4(OP, R1, UDP, 3, 9), &op, t0),
            Err(Drop::TableFull)
        );
        assert_eq!(
            fw.inbound(&v4(OP, R1, UDP, 0, 9), &op, t0),
            Ok(()),
            "established"
        );
        let later = t0 + UDP_TIMEOUT + Duration::from_secs(1);
        assert_eq!(
            fw.inbound(&v4(OP, R1, UDP, 3, 9), &op, later),
            Ok(()),
            "room after expiry"
        );
    }

    #[test]
    fn rule_text_is_checked_with_the_rule_named() {
        assert_eq!(parse_ports("r", "22"), Ok((22, 22)));
        assert_eq!(parse_ports("r", "8000-8100"), Ok((8000, 8100)));
        assert_eq!(parse_ports("r", "any"), Ok((0, u16::MAX)));
        for bad in ["", "x", "9-1", "70000", "1-2-3"] {
            let e = parse_ports("inbound[2]", bad).unwrap_err().to_string();
            assert!(e.starts_with("inbound[2]: port"), "{e}");
        }
        assert!(parse_proto("r", "sctp")
            .unwrap_err()
            .to_string()
            .contains("tcp, udp, icmp, any"));
        assert_eq!(parse_default("default_inbound", "Deny"), Ok(false));
        assert!(parse_default("default_inbound", "drop").is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_are_summarized_or_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = summarize(&bytes);
            let t0 = Instant::now();
            let mut fw = Firewall::new(Arc::new(ssh_for_operators()), t0);
            let g = ops();
            let op = PeerIdentity { name: "operator", groups: &g };
            let _ = fw.inbound(&bytes, &op, t0);
            let _ = fw.outbound(&bytes, &op, t0);
        }

        #[test]
        fn a_reply_to_an_allowed_flow_always_passes(sport in 1u16.., dport in 1u16.., udp in any::<bool>()) {
            prop_assume!(sport != 51821 && dport != 51821);
            let t0 = Instant::now();
            let mut rules = ssh_for_operators();
            rules.default_outbound_allow = true;
            let mut fw = Firewall::new(Arc::new(rules), t0);
            let g = robots();
            let r2 = PeerIdentity { name: "robot2", groups: &g };
            let proto = if udp { UDP } else { TCP };
            prop_assert_eq!(fw.outbound(&v4(R1, R2, proto, sport, dport), &r2, t0), Ok(()));
            prop_assert_eq!(fw.inbound(&v4(R2, R1, proto, dport, sport), &r2, t0), Ok(()));
            // The same ports from another address are a new flow, and refused.
            prop_assert!(fw.inbound(&v4(OP, R1, proto, dport, sport), &r2, t0).is_err());
        }
    }
}
