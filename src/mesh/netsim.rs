//! A deterministic in-memory network for the connectivity state machines: hosts on public
//! addresses or behind NAT routers (endpoint-independent, address-dependent or
//! address-and-port-dependent mapping and filtering, no hairpinning), IPv6 hosts behind
//! stateful firewalls, delay with jitter, loss, blocked routes and address changes. Runs in
//! milliseconds, without root or sockets. The tests at the bottom check the state machines
//! against a reference model of which pairs can meet directly.

use super::*;
use proptest::prelude::*;
use std::collections::{BinaryHeap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

const PORT: u16 = 51820;
const DATA_EVERY: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NatKind {
    pub mapping: Rule,
    pub filtering: Rule,
}

/// A home router: Linux masquerade keeps one mapping per inside endpoint, conntrack filters
/// by address and port.
pub const EASY: NatKind = NatKind {
    mapping: Rule::EndpointIndependent,
    filtering: Rule::AddressAndPortDependent,
};
/// Carrier-grade / symmetric NAT: a new random port per destination.
pub const HARD: NatKind = NatKind {
    mapping: Rule::AddressAndPortDependent,
    filtering: Rule::AddressAndPortDependent,
};
/// A full-cone NAT.
pub const CONE: NatKind = NatKind {
    mapping: Rule::EndpointIndependent,
    filtering: Rule::EndpointIndependent,
};

pub(crate) struct Nat {
    public: Ipv4Addr,
    site: u8,
    kind: NatKind,
    table: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// Endpoint-independent mappings keep the inside port while it is free (Linux
    /// masquerade), until the router forgets its mappings once.
    preserve: bool,
    back: HashMap<u16, (SocketAddr, HashSet<SocketAddr>)>,
}

impl Nat {
    /// A router with public address `public` for the hosts of site `site` (10.`site`.0.0/16).
    pub(crate) fn new(public: Ipv4Addr, site: u8, kind: NatKind) -> Nat {
        Nat {
            public,
            site,
            kind,
            table: HashMap::new(),
            preserve: true,
            back: HashMap::new(),
        }
    }

    /// The router forgets every mapping (a reboot, or a carrier's timeout): each flow gets a
    /// new port.
    pub(crate) fn rebind(&mut self) {
        self.table.clear();
        self.back.clear();
        self.preserve = false;
    }

    pub(crate) fn set_kind(&mut self, kind: NatKind) {
        self.kind = kind;
        self.rebind();
    }

    pub(crate) fn public(&self) -> Ipv4Addr {
        self.public
    }

    pub(crate) fn inside(&self, ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10 && v4.octets()[1] == self.site)
    }

    pub(crate) fn outbound(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
        rng: &mut Rng,
    ) -> SocketAddr {
        let key = match self.kind.mapping {
            Rule::EndpointIndependent => (src, None),
            Rule::AddressDependent => (src, Some(SocketAddr::new(dst.ip(), 0))),
            Rule::AddressAndPortDependent => (src, Some(dst)),
        };
        let port = match self.table.get(&key) {
            Some(p) => *p,
            None => {
                let mut port = if self.kind.mapping == Rule::EndpointIndependent
                    && self.preserve
                    && !self.back.contains_key(&src.port())
                {
                    src.port()
                } else {
                    1024 + (rng.next() % 60000) as u16
                };
                while self.back.contains_key(&port) {
                    port = 1024 + (rng.next() % 60000) as u16;
                }
                self.table.insert(key, port);
                self.back.insert(port, (src, HashSet::new()));
                port
            }
        };
        if let Some((_, sent)) = self.back.get_mut(&port) {
            sent.insert(dst);
        }
        SocketAddr::new(IpAddr::V4(self.public), port)
    }

    pub(crate) fn inbound(&self, port: u16, remote: SocketAddr) -> Option<SocketAddr> {
        let (inside, sent) = self.back.get(&port)?;
        let allowed = match self.kind.filtering {
            Rule::EndpointIndependent => true,
            Rule::AddressDependent => sent.iter().any(|s| s.ip() == remote.ip()),
            Rule::AddressAndPortDependent => sent.contains(&remote),
        };
        allowed.then_some(*inside)
    }
}

pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

#[derive(Clone, Debug)]
enum Wire {
    Signal(Signal),
    Data { sent: Instant },
}

enum Node {
    Member(Box<Agent>),
    Lighthouse(Rendezvous, bool),
}

struct Host {
    key: Key,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    nat: Option<usize>,
    /// IPv6 stateful firewall: the remotes this host has sent to (None: no firewall).
    firewall6: Option<HashSet<SocketAddr>>,
    node: Node,
    wakeups: u64,
}

impl Host {
    fn addresses(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        if let Some(v4) = self.v4 {
            out.push(IpAddr::V4(v4));
        }
        if let Some(v6) = self.v6 {
            out.push(IpAddr::V6(v6));
        }
        out
    }
    fn agent(&mut self) -> Option<&mut Agent> {
        match &mut self.node {
            Node::Member(a) => Some(a),
            Node::Lighthouse(..) => None,
        }
    }
}

struct InFlight {
    at: Instant,
    seq: u64,
    src: SocketAddr,
    dst: SocketAddr,
    from: Key,
    wire: Wire,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

pub struct Sim {
    pub now: Instant,
    rng: Rng,
    nats: Vec<Nat>,
    hosts: Vec<Host>,
    queue: BinaryHeap<InFlight>,
    seq: u64,
    relayed: HashMap<u64, Wire>,
    pub loss: f64,
    blocked: HashSet<(IpAddr, IpAddr)>,
    flows: Vec<(usize, usize)>,
    next_data: Instant,
    /// Data arrivals: (from, to) -> (sent, received).
    arrivals: HashMap<(usize, usize), Vec<(Instant, Instant)>>,
    pub changes: Vec<(Instant, usize, Event)>,
    next_public: u8,
}

impl Sim {
    pub fn new(seed: u64) -> Self {
        let now = Instant::now();
        Sim {
            now,
            rng: Rng::new(seed),
            nats: Vec::new(),
            hosts: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            relayed: HashMap::new(),
            loss: 0.0,
            blocked: HashSet::new(),
            flows: Vec::new(),
            next_data: now,
            arrivals: HashMap::new(),
            changes: Vec::new(),
            next_public: 20,
        }
    }

    pub fn nat(&mut self, kind: NatKind) -> usize {
        let i = self.nats.len();
        self.nats.push(Nat::new(
            Ipv4Addr::new(203, 0, 113, 100 + i as u8),
            i as u8 + 1,
            kind,
        ));
        i
    }

    fn key(i: usize) -> Key {
        [i as u8 + 1; 32]
    }

    fn public_v4(&mut self) -> Ipv4Addr {
        self.next_public += 1;
        Ipv4Addr::new(198, 51, 100, self.next_public)
    }

    /// Lighthouses come first: members are given every lighthouse added before them.
    pub fn lighthouse(&mut self, relay: bool) -> usize {
        let i = self.hosts.len();
        let v4 = self.public_v4();
        self.hosts.push(Host {
            key: Self::key(i),
            v4: Some(v4),
            v6: None,
            nat: None,
            firewall6: None,
            node: Node::Lighthouse(Rendezvous::new(relay, 1_000_000), relay),
            wakeups: 0,
        });
        i
    }

    fn site_v4(&mut self, nat: Option<usize>) -> Ipv4Addr {
        match nat {
            Some(n) => {
                self.next_public += 1;
                Ipv4Addr::new(10, self.nats[n].site, 0, self.next_public)
            }
            None => self.public_v4(),
        }
    }

    /// A member on a public address (`nat` None) or behind `nat`, with a global IPv6 address
    /// behind a stateful firewall if `v6`.
    pub fn member(&mut self, nat: Option<usize>, v6: bool) -> usize {
        let i = self.hosts.len();
        let v4 = self.site_v4(nat);
        let points: Vec<RendezvousPoint> = self
            .hosts
            .iter()
            .filter_map(|h| match h.node {
                Node::Lighthouse(_, relay) => Some(RendezvousPoint {
                    key: h.key,
                    endpoint: SocketAddr::new(IpAddr::V4(h.v4?), PORT),
                    relay,
                }),
                Node::Member(_) => None,
            })
            .collect();
        let v6 = v6.then(|| Ipv6Addr::new(0x2001, 0xdb8, i as u16, 0, 0, 0, 0, 1));
        let mut host = Host {
            key: Self::key(i),
            v4: Some(v4),
            v6,
            nat,
            firewall6: nat.map(|_| HashSet::new()),
            node: Node::Lighthouse(Rendezvous::new(false, 0), false),
            wakeups: 0,
        };
        host.node = Node::Member(Box::new(Agent::new(
            PORT,
            host.addresses(),
            points,
            self.now,
        )));
        self.hosts.push(host);
        i
    }

    pub fn connect(&mut self, a: usize, b: usize) {
        let (now, kb) = (self.now, self.hosts[b].key);
        if let Some(agent) = self.hosts[a].agent() {
            agent.connect(kb, now);
        }
    }

    /// Data both ways between `a` and `b`, every 20 ms, from now on.
    pub fn flow(&mut self, a: usize, b: usize) {
        self.flows.push((a, b));
        self.flows.push((b, a));
    }

    pub fn route(&self, a: usize, b: usize) -> Option<Via> {
        match &self.hosts[a].node {
            Node::Member(agent) => agent.route(&self.hosts[b].key),
            Node::Lighthouse(..) => None,
        }
    }

    pub fn agent_of(&self, a: usize) -> &Agent {
        match &self.hosts[a].node {
            Node::Member(agent) => agent,
            Node::Lighthouse(..) => panic!("host {a} is a lighthouse"),
        }
    }

    pub fn stats(&self, lh: usize) -> RendezvousStats {
        match &self.hosts[lh].node {
            Node::Lighthouse(r, _) => r.stats(),
            Node::Member(_) => RendezvousStats::default(),
        }
    }

    pub fn v6_of(&self, a: usize) -> Option<Ipv6Addr> {
        self.hosts[a].v6
    }

    /// Move `a` to `nat` (or a public address): its addresses change, as on a roam.
    pub fn roam(&mut self, a: usize, nat: Option<usize>, v6: bool) {
        let v4 = self.site_v4(nat);
        let salt = self.rng.next() as u16;
        let now = self.now;
        let h = &mut self.hosts[a];
        h.nat = nat;
        h.v4 = Some(v4);
        h.v6 = v6.then(|| Ipv6Addr::new(0x2001, 0xdb8, 0x1000 + a as u16, salt, 0, 0, 0, 1));
        h.firewall6 = nat.map(|_| HashSet::new());
        let addresses = h.addresses();
        if let Some(agent) = h.agent() {
            agent.set_local_addresses(addresses, now);
        }
        self.drain();
    }

    /// `nat` forgets every mapping (a reboot, or mappings timing out): ports change.
    pub fn rebind(&mut self, nat: usize) {
        self.nats[nat].rebind();
    }

    pub fn set_nat_kind(&mut self, nat: usize, kind: NatKind) {
        self.nats[nat].kind = kind;
        self.rebind(nat);
    }

    pub fn restart_lighthouse(&mut self, lh: usize) {
        if let Node::Lighthouse(r, relay) = &mut self.hosts[lh].node {
            *r = Rendezvous::new(*relay, 1_000_000);
        }
    }

    /// Drop everything between the public addresses of `a` and `b` (both ways).
    pub fn block(&mut self, a: IpAddr, b: IpAddr) {
        self.blocked.insert((a, b));
        self.blocked.insert((b, a));
    }

    pub fn unblock_all(&mut self) {
        self.blocked.clear();
    }

    pub fn public_of(&self, a: usize) -> IpAddr {
        match self.hosts[a].nat {
            Some(n) => IpAddr::V4(self.nats[n].public),
            None => self.hosts[a]
                .v4
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V4),
        }
    }

    fn host_of(&self, ip: IpAddr) -> Option<usize> {
        self.hosts.iter().position(|h| {
            (h.nat.is_none() && h.v4.map(IpAddr::V4) == Some(ip))
                || h.v6.map(IpAddr::V6) == Some(ip)
        })
    }

    fn send(&mut self, from: usize, dst: SocketAddr, wire: Wire) {
        let h = &self.hosts[from];
        let Some(src_ip) = (if dst.is_ipv4() {
            h.v4.map(IpAddr::V4)
        } else {
            h.v6.map(IpAddr::V6)
        }) else {
            return;
        };
        let key = h.key;
        let nat = h.nat;
        let mut src = SocketAddr::new(src_ip, PORT);
        let mut delay = Duration::from_millis(10);
        if let (Some(n), true) = (nat, dst.is_ipv4()) {
            if self.nats[n].inside(dst.ip()) {
                delay = Duration::from_millis(1);
            } else if dst.ip() == IpAddr::V4(self.nats[n].public) {
                return; // no hairpinning
            } else {
                src = self.nats[n].outbound(src, dst, &mut self.rng);
                delay += Duration::from_millis(5);
            }
        }
        if dst.is_ipv6() {
            if let Some(fw) = self.hosts[from].firewall6.as_mut() {
                fw.insert(dst);
                delay += Duration::from_millis(4);
            }
        }
        if self.blocked.contains(&(src.ip(), dst.ip())) || self.rng.chance(self.loss) {
            return;
        }
        delay += Duration::from_micros(self.rng.next() % 2000);
        self.seq += 1;
        self.queue.push(InFlight {
            at: self.now + delay,
            seq: self.seq,
            src,
            dst,
            from: key,
            wire,
        });
    }

    fn resolve(&self, p: &InFlight) -> Option<usize> {
        if let IpAddr::V4(v4) = p.dst.ip() {
            if let Some(n) = self.nats.iter().position(|n| n.public == v4) {
                let inside = self.nats[n].inbound(p.dst.port(), p.src)?;
                return self
                    .hosts
                    .iter()
                    .position(|h| h.nat == Some(n) && h.v4.map(IpAddr::V4) == Some(inside.ip()));
            }
            if v4.octets()[0] == 10 {
                // A private address is reachable only from inside its own site.
                let from = self.hosts.iter().find(|h| h.key == p.from)?;
                let site = from.nat?;
                return self
                    .hosts
                    .iter()
                    .position(|h| h.nat == Some(site) && h.v4 == Some(v4));
            }
        }
        let to = self.host_of(p.dst.ip())?;
        if let (IpAddr::V6(_), Some(fw)) = (p.dst.ip(), &self.hosts[to].firewall6) {
            if !fw.contains(&p.src) {
                return None;
            }
        }
        Some(to)
    }

    fn deliver(&mut self, p: InFlight) {
        let Some(to) = self.resolve(&p) else {
            return;
        };
        let now = self.now;
        let from_host = self.hosts.iter().position(|h| h.key == p.from);
        let member_keys: HashSet<Key> = self
            .hosts
            .iter()
            .filter(|h| matches!(h.node, Node::Member(_)))
            .map(|h| h.key)
            .collect();
        match (&mut self.hosts[to].node, p.wire) {
            (Node::Lighthouse(r, _), Wire::Signal(s)) => {
                let member = member_keys.contains(&p.from);
                r.handle(p.from, p.src, member, s, now)
            }
            (Node::Lighthouse(..), Wire::Data { .. }) => {}
            (Node::Member(agent), Wire::Signal(Signal::Relay { peer, payload })) => {
                let id = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
                match self.relayed.remove(&id) {
                    Some(Wire::Signal(s)) => agent.handle(peer, Via::Relay(p.from), s, now),
                    Some(Wire::Data { sent }) => {
                        if let Some(f) = self.hosts.iter().position(|h| h.key == peer) {
                            self.arrivals.entry((f, to)).or_default().push((sent, now));
                        }
                    }
                    None => {}
                }
            }
            (Node::Member(agent), Wire::Signal(s)) => {
                agent.handle(p.from, Via::Direct(p.src), s, now)
            }
            (Node::Member(_), Wire::Data { sent }) => {
                if let Some(f) = from_host {
                    self.arrivals.entry((f, to)).or_default().push((sent, now));
                }
            }
        }
    }

    fn transmit(&mut self, from: usize, to: Key, via: Via, wire: Wire, len: usize) {
        match via {
            Via::Direct(dst) => self.send(from, dst, wire),
            Via::Relay(relay) => {
                let Some(r) = self.hosts.iter().position(|h| h.key == relay) else {
                    return;
                };
                let Some(v4) = self.hosts[r].v4 else {
                    return;
                };
                self.seq += 1;
                let id = self.seq;
                self.relayed.insert(id, wire);
                let mut payload = id.to_le_bytes().to_vec();
                payload.resize(len.max(8), 0);
                self.send(
                    from,
                    SocketAddr::new(IpAddr::V4(v4), PORT),
                    Wire::Signal(Signal::Relay { peer: to, payload }),
                );
            }
        }
    }

    fn drain(&mut self) {
        loop {
            let mut any = false;
            for i in 0..self.hosts.len() {
                let now = self.now;
                let out: Vec<(Key, Via, Signal)> = match &mut self.hosts[i].node {
                    Node::Member(agent) => {
                        while let Some(e) = agent.poll_event() {
                            self.changes.push((now, i, e));
                        }
                        std::iter::from_fn(|| agent.poll_transmit())
                            .map(|t| (t.to, t.via, t.signal))
                            .collect()
                    }
                    Node::Lighthouse(r, _) => std::iter::from_fn(|| r.poll_transmit())
                        .map(|(k, a, s)| (k, Via::Direct(a), s))
                        .collect(),
                };
                for (to, via, signal) in out {
                    any = true;
                    self.transmit(i, to, via, Wire::Signal(signal), 64);
                }
            }
            if !any {
                break;
            }
        }
    }

    fn send_data(&mut self) {
        let now = self.now;
        for (a, b) in self.flows.clone() {
            let kb = self.hosts[b].key;
            let Some(agent) = self.hosts[a].agent() else {
                continue;
            };
            agent.note_traffic(&kb, now);
            if let Some(via) = agent.route(&kb) {
                self.transmit(a, kb, via, Wire::Data { sent: now }, 1200);
            }
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        let mut same_instant = 0u32;
        loop {
            let timer = self
                .hosts
                .iter()
                .filter_map(|h| match &h.node {
                    Node::Member(a) => a.poll_timeout(),
                    Node::Lighthouse(..) => None,
                })
                .min();
            let packet = self.queue.peek().map(|p| p.at);
            let data = (!self.flows.is_empty()).then_some(self.next_data);
            let Some(next) = [timer, packet, data].into_iter().flatten().min() else {
                break;
            };
            if next > until {
                break;
            }
            if next <= self.now {
                same_instant += 1;
                assert!(
                    same_instant < 100_000,
                    "a state machine asks to be woken again and again at the same instant"
                );
            } else {
                same_instant = 0;
            }
            self.now = self.now.max(next);
            while self.queue.peek().is_some_and(|p| p.at <= self.now) {
                if let Some(p) = self.queue.pop() {
                    self.deliver(p);
                }
            }
            let now = self.now;
            for h in &mut self.hosts {
                if let Node::Member(a) = &mut h.node {
                    if a.poll_timeout().is_some_and(|t| t <= now) {
                        h.wakeups += 1;
                        a.handle_timeout(now);
                    }
                }
            }
            if !self.flows.is_empty() && self.next_data <= now {
                self.next_data = now + DATA_EVERY;
                self.send_data();
            }
            self.drain();
        }
        self.now = until;
    }

    pub fn wakeups(&self, a: usize) -> u64 {
        self.hosts[a].wakeups
    }

    /// The longest time between two data arrivals from `a` at `b` within [since, now].
    pub fn max_gap(&self, a: usize, b: usize, since: Instant) -> Duration {
        let mut last = since;
        let mut gap = Duration::ZERO;
        for (_, at) in self.arrivals.get(&(a, b)).into_iter().flatten() {
            if *at >= since {
                gap = gap.max(*at - last);
                last = *at;
            }
        }
        gap.max(self.now - last)
    }

    /// When the first datagram sent by `a` at or after `since` reached `b`.
    pub fn first_after(&self, a: usize, b: usize, since: Instant) -> Option<Instant> {
        self.arrivals
            .get(&(a, b))?
            .iter()
            .filter(|(sent, _)| *sent >= since)
            .map(|(_, at)| *at)
            .min()
    }
}

/// What a pair should end up with, by the reference model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    DirectV6,
    DirectV4,
    Relayed,
}

impl Sim {
    fn nat_kind(&self, a: usize) -> Option<NatKind> {
        self.hosts[a].nat.map(|n| self.nats[n].kind)
    }

    /// The reference model. IPv6 when both have it (stateful firewalls open to simultaneous
    /// probes); IPv4 when both share a site, or when one side's probe to the mapping the
    /// lighthouse saw gets into the other side and the answer, sent to the probe's source,
    /// gets back; a relay otherwise. A public host maps and filters nothing.
    fn expect(&self, a: usize, b: usize) -> Expect {
        if self.hosts[a].v6.is_some() && self.hosts[b].v6.is_some() {
            return Expect::DirectV6;
        }
        if self.hosts[a].nat.is_some() && self.hosts[a].nat == self.hosts[b].nat {
            return Expect::DirectV4;
        }
        let (ka, kb) = (
            self.nat_kind(a).unwrap_or(CONE),
            self.nat_kind(b).unwrap_or(CONE),
        );
        let ei = |k: NatKind| k.mapping == Rule::EndpointIndependent;
        let into = |x: NatKind, y: NatKind| match y.filtering {
            Rule::EndpointIndependent => true,
            Rule::AddressDependent => ei(y),
            Rule::AddressAndPortDependent => ei(y) && ei(x),
        };
        let back = |y: NatKind, x: NatKind| ei(y) || x.filtering != Rule::AddressAndPortDependent;
        if (into(ka, kb) && back(kb, ka)) || (into(kb, ka) && back(ka, kb)) {
            Expect::DirectV4
        } else {
            Expect::Relayed
        }
    }

    fn matches(&self, a: usize, b: usize, e: Expect) -> bool {
        match (self.route(a, b), e) {
            (Some(Via::Direct(addr)), Expect::DirectV6) => addr.is_ipv6(),
            (Some(Via::Direct(addr)), Expect::DirectV4) => addr.is_ipv4(),
            (Some(Via::Relay(_)), Expect::Relayed) => true,
            _ => false,
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pair(seed: u64, a: Option<NatKind>, b: Option<NatKind>) -> (Sim, usize, usize, usize) {
    let mut sim = Sim::new(seed);
    let relay = sim.lighthouse(true);
    sim.lighthouse(false);
    let na = a.map(|k| sim.nat(k));
    let nb = b.map(|k| sim.nat(k));
    let x = sim.member(na, false);
    let y = sim.member(nb, false);
    (sim, relay, x, y)
}

#[test]
fn the_nat_matrix_meets_directly_where_physics_allows_and_relays_otherwise() {
    let cases = [
        ("easy-easy", Some(EASY), Some(EASY), Expect::DirectV4),
        ("easy-public", Some(EASY), None, Expect::DirectV4),
        ("hard-public", Some(HARD), None, Expect::DirectV4),
        ("cone-hard", Some(CONE), Some(HARD), Expect::DirectV4),
        ("easy-hard", Some(EASY), Some(HARD), Expect::Relayed),
        ("hard-hard", Some(HARD), Some(HARD), Expect::Relayed),
    ];
    for (name, ka, kb, want) in cases {
        let (mut sim, relay, a, b) = pair(1, ka, kb);
        sim.run_for(Duration::from_millis(500));
        let asked = sim.now;
        sim.connect(a, b);
        sim.flow(a, b);
        sim.run_for(Duration::from_secs(12));
        assert_eq!(sim.expect(a, b), want, "{name}: the model");
        assert!(
            sim.matches(a, b, want) && sim.matches(b, a, want),
            "{name}: {:?} / {:?}, wanted {want:?}",
            sim.route(a, b),
            sim.route(b, a)
        );
        let first = sim.first_after(a, b, asked).map(|t| ms(t - asked));
        let rtt = sim
            .agent_of(a)
            .peer_paths(&Sim::key(b))
            .iter()
            .find(|(v, _, _)| Some(*v) == sim.route(a, b))
            .and_then(|(_, r, _)| *r);
        eprintln!(
            "{name}: {:?}, first packet after {first:?} ms, rtt {:?} ms",
            sim.route(a, b),
            rtt.map(ms)
        );
        assert!(
            first.is_some_and(|f| f < 200.0),
            "{name}: first packet after {first:?} ms"
        );
        if want == Expect::Relayed {
            assert!(sim.stats(relay).relayed_bytes > 0);
        }
    }
}

#[test]
fn the_nat_mapping_is_classified_from_two_lighthouses() {
    for (kind, want) in [
        (Some(EASY), NatMapping::EndpointIndependent),
        (Some(HARD), NatMapping::EndpointDependent),
        (None, NatMapping::None),
    ] {
        let (mut sim, _, a, _) = pair(2, kind, None);
        sim.run_for(Duration::from_millis(300));
        assert_eq!(sim.agent_of(a).nat_mapping(), want, "{kind:?}");
        let reported = sim
            .changes
            .iter()
            .any(|(_, h, e)| *h == a && *e == Event::NatMapping(want));
        assert!(reported, "{kind:?}: no event");
    }
}

#[test]
fn ipv6_direct_beats_ipv4_direct_and_a_site_meets_over_its_lan() {
    let mut sim = Sim::new(3);
    sim.lighthouse(true);
    sim.lighthouse(false);
    let home = sim.nat(EASY);
    let office = sim.nat(EASY);
    let a = sim.member(Some(home), true);
    let b = sim.member(Some(office), true);
    let c = sim.member(Some(home), false);
    sim.connect(a, b);
    sim.connect(a, c);
    sim.run_for(Duration::from_secs(8));
    assert!(
        sim.matches(a, b, Expect::DirectV6) && sim.matches(b, a, Expect::DirectV6),
        "{:?}",
        sim.route(a, b)
    );
    let both = sim.agent_of(a).peer_paths(&Sim::key(b));
    assert!(
        both.iter()
            .any(|(v, _, ok)| *ok && matches!(v, Via::Direct(x) if x.is_ipv4())),
        "the IPv4 path is kept measured: {both:?}"
    );
    match sim.route(a, c) {
        Some(Via::Direct(x)) => assert!(
            matches!(x.ip(), IpAddr::V4(v) if v.octets()[0] == 10),
            "{x}"
        ),
        other => panic!("a and c share a site: {other:?}"),
    }
}

#[test]
fn a_relayed_pair_keeps_trying_direct_and_switches_both_ways_without_a_stall() {
    let (mut sim, _, a, b) = pair(4, Some(EASY), Some(HARD));
    sim.connect(a, b);
    sim.flow(a, b);
    sim.run_for(Duration::from_secs(3));
    assert!(matches!(sim.route(a, b), Some(Via::Relay(_))));
    let since = sim.now;
    // The hard NAT is replaced by an easy one: the next retry finds the direct path.
    let nb = sim.hosts[b].nat.unwrap_or(0);
    sim.set_nat_kind(nb, EASY);
    sim.run_for(RETRY_DIRECT + Duration::from_secs(2));
    assert!(sim.matches(a, b, Expect::DirectV4) && sim.matches(b, a, Expect::DirectV4));
    let upgrade = sim.max_gap(a, b, since).max(sim.max_gap(b, a, since));
    // The direct path dies: back to the relay.
    let died = sim.now;
    sim.block(sim.public_of(a), sim.public_of(b));
    sim.run_for(Duration::from_secs(3));
    assert!(
        matches!(sim.route(a, b), Some(Via::Relay(_)))
            && matches!(sim.route(b, a), Some(Via::Relay(_)))
    );
    let fallback = sim.max_gap(a, b, died).max(sim.max_gap(b, a, died));
    // And it comes back.
    sim.unblock_all();
    let back = sim.now;
    sim.run_for(RETRY_DIRECT + Duration::from_secs(2));
    assert!(sim.matches(a, b, Expect::DirectV4));
    let again = sim.max_gap(a, b, back).max(sim.max_gap(b, a, back));
    eprintln!(
        "longest gap: relay->direct {:.0} ms, direct->relay {:.0} ms, relay->direct {:.0} ms",
        ms(upgrade),
        ms(fallback),
        ms(again)
    );
    assert!(
        upgrade < Duration::from_millis(100),
        "upgrade stalled {upgrade:?}"
    );
    assert!(
        fallback < Duration::from_secs(1),
        "fallback stalled {fallback:?}"
    );
    assert!(
        again < Duration::from_millis(100),
        "upgrade stalled {again:?}"
    );
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Time from a robot's new address to traffic flowing both ways again, over 20 trials.
fn roam_trials(robot_initiates: bool) -> (f64, f64, f64) {
    let mut usable = Vec::new();
    let mut direct = Vec::new();
    for seed in 0..20 {
        let mut sim = Sim::new(100 + seed);
        sim.lighthouse(true);
        sim.lighthouse(false);
        let cell = sim.nat(HARD);
        let wifi = sim.nat(EASY);
        let office = sim.nat(EASY);
        let robot = sim.member(Some(wifi), false);
        let operator = sim.member(Some(office), false);
        if robot_initiates {
            sim.connect(robot, operator);
        } else {
            sim.connect(operator, robot);
        }
        sim.flow(robot, operator);
        sim.run_for(Duration::from_secs(3) + Duration::from_millis(seed * 37));
        assert!(
            sim.matches(robot, operator, Expect::DirectV4),
            "seed {seed}"
        );
        // From the site's Wi-Fi onto the cellular modem, then to another Wi-Fi.
        for to in [cell, wifi] {
            let roam = sim.now;
            sim.roam(robot, Some(to), false);
            sim.run_for(Duration::from_secs(8));
            let there = sim.first_after(robot, operator, roam);
            let back = sim.first_after(operator, robot, roam);
            let (Some(there), Some(back)) = (there, back) else {
                panic!("seed {seed}: no traffic after the roam");
            };
            usable.push(ms(there.max(back) - roam));
            let want = sim.expect(robot, operator);
            assert!(
                sim.matches(robot, operator, want) && sim.matches(operator, robot, want),
                "seed {seed}: {:?}, wanted {want:?}",
                sim.route(robot, operator)
            );
            if want == Expect::DirectV4 {
                if let Some(t) = sim.changes.iter().rev().find(|(t, h, e)| {
                    *t >= roam
                        && *h == robot
                        && matches!(
                            e,
                            Event::PathChanged {
                                to: Some(Via::Direct(_)),
                                ..
                            }
                        )
                }) {
                    direct.push(ms(t.0 - roam));
                }
            }
        }
    }
    let p50 = percentile(&mut usable, 0.5);
    let p99 = percentile(&mut usable, 0.99);
    let direct50 = percentile(&mut direct, 0.5);
    (p50, p99, direct50)
}

#[test]
fn a_roam_is_usable_again_within_a_second_as_initiator_and_responder() {
    for initiates in [true, false] {
        let (p50, p99, direct50) = roam_trials(initiates);
        eprintln!("roaming robot as {}: usable again p50 {p50:.0} ms, p99 {p99:.0} ms; direct again p50 {direct50:.0} ms (40 roams)", if initiates { "initiator" } else { "responder" });
        assert!(p99 < 1000.0, "p99 {p99} ms");
    }
}

#[test]
fn the_other_sides_nat_rebinding_is_survived() {
    let (mut sim, _, a, b) = pair(5, Some(EASY), Some(EASY));
    sim.connect(a, b);
    sim.flow(a, b);
    sim.run_for(Duration::from_secs(3));
    assert!(sim.matches(a, b, Expect::DirectV4));
    let at = sim.now;
    let nb = sim.hosts[b].nat.unwrap_or(0);
    sim.rebind(nb);
    sim.run_for(Duration::from_secs(10));
    assert!(
        sim.matches(a, b, Expect::DirectV4) && sim.matches(b, a, Expect::DirectV4),
        "{:?}",
        sim.route(a, b)
    );
    let gap = sim.max_gap(a, b, at).max(sim.max_gap(b, a, at));
    eprintln!("NAT rebinding: longest gap {:.0} ms", ms(gap));
    assert!(gap < Duration::from_millis(1500), "{gap:?}");
}

#[test]
fn a_lighthouse_restart_while_relayed_heals_at_once() {
    let (mut sim, relay, a, b) = pair(6, Some(HARD), Some(HARD));
    sim.connect(a, b);
    sim.flow(a, b);
    sim.run_for(Duration::from_secs(3));
    assert!(matches!(sim.route(a, b), Some(Via::Relay(_))));
    let at = sim.now;
    sim.restart_lighthouse(relay);
    sim.run_for(Duration::from_secs(5));
    let gap = sim.max_gap(a, b, at).max(sim.max_gap(b, a, at));
    eprintln!(
        "lighthouse restart while relayed: longest gap {:.0} ms",
        ms(gap)
    );
    assert!(gap < Duration::from_secs(1), "{gap:?}");
}

#[test]
fn only_members_use_the_relay_and_each_is_capped() {
    let now = Instant::now();
    let mut r = Rendezvous::new(true, 10_000);
    let (a, b, stranger) = ([1; 32], [2; 32], [9; 32]);
    let (sa, sb): (SocketAddr, SocketAddr) = (
        "192.0.2.1:1"
            .parse()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        "192.0.2.2:2"
            .parse()
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
    );
    r.handle(
        stranger,
        sa,
        false,
        Signal::Register { candidates: vec![] },
        now,
    );
    assert_eq!(r.members(), 0);
    r.handle(a, sa, true, Signal::Register { candidates: vec![] }, now);
    r.handle(b, sb, true, Signal::Register { candidates: vec![] }, now);
    while r.poll_transmit().is_some() {}
    r.handle(
        stranger,
        sa,
        false,
        Signal::Relay {
            peer: b,
            payload: vec![0; 100],
        },
        now,
    );
    assert!(r.poll_transmit().is_none());
    // 10 kB/s: 20 datagrams of 1000 bytes in one instant, half get through.
    for _ in 0..20 {
        r.handle(
            a,
            sa,
            true,
            Signal::Relay {
                peer: b,
                payload: vec![7; 1000],
            },
            now,
        );
    }
    let out: Vec<_> = std::iter::from_fn(|| r.poll_transmit()).collect();
    assert_eq!(out.len(), 10);
    assert!(out.iter().all(|(to, at, s)| *to == b
        && *at == sb
        && matches!(s, Signal::Relay { peer, payload } if *peer == a && payload.len() == 1000)));
    assert_eq!(r.stats().over_cap, 10);
    assert_eq!(r.stats().refused, 2);
    // The allowance refills with time.
    r.handle(
        a,
        sa,
        true,
        Signal::Relay {
            peer: b,
            payload: vec![7; 1000],
        },
        now + Duration::from_millis(200),
    );
    assert_eq!(std::iter::from_fn(|| r.poll_transmit()).count(), 1);
}

#[test]
fn an_idle_member_wakes_rarely() {
    let (mut sim, _, a, b) = pair(7, Some(EASY), Some(EASY));
    sim.connect(a, b);
    sim.run_for(Duration::from_secs(10));
    let before = sim.wakeups(a);
    sim.run_for(Duration::from_secs(60));
    let idle = sim.wakeups(a) - before;
    eprintln!("idle member: {idle} wakeups in 60 s");
    assert!(idle <= 30, "{idle} wakeups in 60 s of idleness");
    assert!(
        sim.matches(a, b, Expect::DirectV4),
        "the idle path is kept alive"
    );
}

#[derive(Clone, Debug)]
enum Happening {
    Roam {
        member: usize,
        to: Option<usize>,
        fresh: Option<NatKind>,
    },
    Rebind(usize),
    RestartLighthouse,
    Loss {
        ms: u64,
    },
}

fn kind() -> impl Strategy<Value = NatKind> {
    let rule = prop_oneof![
        Just(Rule::EndpointIndependent),
        Just(Rule::AddressDependent),
        Just(Rule::AddressAndPortDependent)
    ];
    (rule.clone(), rule).prop_map(|(mapping, filtering)| NatKind { mapping, filtering })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_topologies_and_event_orders_end_on_the_paths_the_model_predicts(
        seed in any::<u64>(),
        members in proptest::collection::vec((proptest::option::of(kind()), any::<bool>(), 0usize..3), 2..5),
        happenings in proptest::collection::vec(
            (0u64..4000, prop_oneof![
                (0usize..4, proptest::option::of(0usize..4), proptest::option::of(kind()))
                    .prop_map(|(member, to, fresh)| Happening::Roam { member, to, fresh }),
                (0usize..4).prop_map(Happening::Rebind),
                Just(Happening::RestartLighthouse),
                (100u64..1500).prop_map(|ms| Happening::Loss { ms }),
            ]),
            0..5,
        ),
    ) {
        let mut sim = Sim::new(seed);
        let relay = sim.lighthouse(true);
        sim.lighthouse(false);
        let mut nats = Vec::new();
        let mut ids = Vec::new();
        for (kind, v6, share) in &members {
            let nat = match kind {
                // Some members share a site with an earlier one.
                Some(_) if *share == 0 && !nats.is_empty() => Some(nats[seed as usize % nats.len()]),
                Some(k) => { let n = sim.nat(*k); nats.push(n); Some(n) }
                None => None,
            };
            ids.push(sim.member(nat, *v6));
        }
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                if (seed >> (i % 60)) & 1 == 0 { sim.connect(*a, *b) } else { sim.connect(*b, *a) }
            }
        }
        sim.flow(ids[0], ids[1]);
        sim.run_for(Duration::from_secs(2));
        let mut order = happenings.clone();
        order.sort_by_key(|(at, _)| *at);
        let mut at = 0;
        for (when, what) in order {
            sim.run_for(Duration::from_millis(when - at));
            at = when;
            match what {
                Happening::Roam { member, to, fresh } => {
                    let m = ids[member % ids.len()];
                    let v6 = sim.v6_of(m).is_some();
                    let to = match (to, fresh) {
                        (_, Some(k)) => { let n = sim.nat(k); nats.push(n); Some(n) }
                        (Some(i), None) if !nats.is_empty() => Some(nats[i % nats.len()]),
                        _ => None,
                    };
                    sim.roam(m, to, v6);
                }
                Happening::Rebind(n) if !nats.is_empty() => sim.rebind(nats[n % nats.len()]),
                Happening::Rebind(_) => {}
                Happening::RestartLighthouse => sim.restart_lighthouse(relay),
                Happening::Loss { ms } => {
                    sim.loss = 0.3;
                    sim.run_for(Duration::from_millis(ms));
                    sim.loss = 0.0;
                }
            }
        }
        // Long enough for an idle peer to notice a dead path and for a member behind a NAT that
        // rebound to be seen at its new address by its next registration.
        sim.run_for(REGISTER_REFRESH + IDLE_HEARTBEAT * 2 + RETRY_DIRECT * 2);
        let settled = sim.now - Duration::from_secs(2);
        for (i, a) in ids.iter().enumerate() {
            for b in &ids[i + 1..] {
                let want = sim.expect(*a, *b);
                prop_assert!(sim.matches(*a, *b, want) && sim.matches(*b, *a, want),
                    "{a}->{b}: {:?} / {:?}, the model says {want:?}", sim.route(*a, *b), sim.route(*b, *a));
            }
        }
        let gap = sim.max_gap(ids[0], ids[1], settled).max(sim.max_gap(ids[1], ids[0], settled));
        prop_assert!(gap < Duration::from_millis(100), "traffic stalls {gap:?} after settling");
    }
}
