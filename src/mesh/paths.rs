//! Connectivity, sans-IO: which path carries each peer's traffic. A member gathers endpoint
//! candidates (its interface addresses and the reflexive address each lighthouse observes),
//! classifies its NAT's mapping, asks a lighthouse to introduce it to a peer so both probe each
//! other's candidates at the same moment, keeps every path measured, prefers the best direct
//! path (IPv6 first, then the lowest RTT), falls back to a relay, and re-punches at once when
//! its own addresses change. The lighthouse half ([`Rendezvous`]) observes, introduces and
//! relays with a per-member rate cap.
//!
//! Every [`Signal`] rides inside WireGuard (to the lighthouse, or to the peer on the path being
//! probed), so the sender's key is authenticated before anything here sees it; relayed payloads
//! are the two members' own WireGuard datagrams, opaque to the relay.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

pub type Key = [u8; 32];

/// Probes sent to every candidate after an introduction, this far apart...
pub const PUNCH_INTERVAL: Duration = Duration::from_millis(100);
/// ...for this long.
pub const PUNCH_BURST: Duration = Duration::from_secs(1);
/// While a peer has no direct path, it is introduced (and punched) again this often.
pub const RETRY_DIRECT: Duration = Duration::from_secs(5);
/// While only IPv4 works between two members that both offer IPv6, they are introduced again
/// this often.
pub const UPGRADE_RETRY: Duration = Duration::from_secs(15);
/// The chosen path is probed this often while traffic flows, so a dead path is noticed well
/// inside a second.
pub const ACTIVE_HEARTBEAT: Duration = Duration::from_millis(250);
/// Every other working path, and the chosen one of an idle peer, is probed this often (under
/// the shortest common NAT mapping timeout of 30 s).
pub const IDLE_HEARTBEAT: Duration = Duration::from_secs(10);
/// A peer counts as active this long after the data plane last sent it something.
pub const ACTIVE_FOR: Duration = Duration::from_secs(5);
/// A probe unanswered this long is lost (or twice the smoothed RTT, if that is longer).
pub const PONG_TIMEOUT: Duration = Duration::from_millis(400);
/// Two lost probes in a row and a path stops counting as working.
const LOST_IN_A_ROW: u8 = 2;
/// A member registers again this often (keeps the lighthouse's view of its address fresh).
pub const REGISTER_REFRESH: Duration = Duration::from_secs(20);
/// A registration not answered is sent again after this long.
const REGISTER_RETRY: Duration = Duration::from_secs(1);
/// A lighthouse that refuses us is registered with again at most this often.
const REREGISTER_GAP: Duration = Duration::from_millis(250);
/// A better direct path replaces the chosen one only when its RTT is below this share of the
/// chosen one's, so two similar paths do not flap.
const SWITCH_RATIO: f64 = 0.8;
/// Direct paths kept per peer at most.
const MAX_PATHS: usize = 32;
/// Unconfirmed peer-reflexive addresses kept per peer.
const MAX_LEARNED: usize = 4;
/// Candidates taken from one introduction; more are ignored.
pub const MAX_CANDIDATES: usize = 16;

/// One member's connectivity message. It always arrives from an authenticated key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// Member to lighthouse: "here I am, and these are my interface addresses".
    Register { candidates: Vec<SocketAddr> },
    /// Lighthouse to member: the address its datagrams came from.
    Observed { addr: SocketAddr },
    /// Member to lighthouse: "introduce me to `peer`". Lighthouse to both members: the other
    /// one's candidates, sent to both at once so they probe each other at the same moment.
    Connect {
        peer: Key,
        candidates: Vec<SocketAddr>,
    },
    /// Lighthouse to member: it does not know the sender (it restarted, or forgot it): register
    /// again. `peer`, when set, is the member a relay or an introduction could not reach.
    Unknown { peer: Option<Key> },
    /// Member to member, on the path being measured.
    Ping { tx: u64 },
    /// The answer, with the address the ping came from.
    Pong { tx: u64, observed: SocketAddr },
    /// Member to relay: forward `payload` to `peer`. Relay to member: `payload` from `peer`.
    Relay { peer: Key, payload: Vec<u8> },
}

/// How a datagram to a peer travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    Direct(SocketAddr),
    /// Through this relay (a lighthouse), wrapped in a [`Signal::Relay`].
    Relay(Key),
}

impl Via {
    pub fn is_direct(&self) -> bool {
        matches!(self, Via::Direct(_))
    }
}

/// A message for the shell to send: to `to` (its WireGuard key) over `via`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub to: Key,
    pub via: Via,
    pub signal: Signal,
}

/// How this node's NAT maps its endpoint, judged from what the lighthouses observe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NatMapping {
    /// Fewer than two lighthouses have answered yet.
    Unknown,
    /// A lighthouse sees one of this node's own addresses: no NAT.
    None,
    /// Every lighthouse sees the same address: peers can reach the mapping the lighthouses saw.
    EndpointIndependent,
    /// Lighthouses see different ports: each destination gets its own mapping ("hard" NAT).
    EndpointDependent,
}

impl NatMapping {
    pub fn as_str(&self) -> &'static str {
        match self {
            NatMapping::Unknown => "unknown",
            NatMapping::None => "none (public address)",
            NatMapping::EndpointIndependent => "endpoint-independent (easy)",
            NatMapping::EndpointDependent => "endpoint-dependent (hard)",
        }
    }
}

/// Whether a candidate another member offered may be probed at all: never loopback,
/// multicast, broadcast, the unspecified address or port 0.
pub fn routable(addr: &SocketAddr) -> bool {
    let ip = addr.ip();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
        || addr.port() == 0)
}

/// The NAT mapping implied by the addresses lighthouses see (`seen`, one per lighthouse) and
/// this node's own addresses (`local`).
pub fn classify(local: &[IpAddr], seen: &[SocketAddr]) -> NatMapping {
    if seen.iter().any(|s| local.contains(&s.ip())) {
        NatMapping::None
    } else if seen.len() < 2 {
        NatMapping::Unknown
    } else if seen.iter().all(|s| *s == seen[0]) {
        NatMapping::EndpointIndependent
    } else {
        NatMapping::EndpointDependent
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    PathChanged {
        peer: Key,
        from: Option<Via>,
        to: Option<Via>,
    },
    NatMapping(NatMapping),
}

/// A lighthouse a member registers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendezvousPoint {
    pub key: Key,
    pub endpoint: SocketAddr,
    /// It forwards datagrams between members that cannot reach each other.
    pub relay: bool,
}

#[derive(Clone, Debug, Default)]
struct Measured {
    rtt: Option<Duration>,
    last_pong: Option<Instant>,
    lost_in_a_row: u8,
    next_ping: Option<Instant>,
    /// Learned from a ping's source address (peer-reflexive), not from the peer's candidates.
    learned: bool,
}

impl Measured {
    fn working(&self) -> bool {
        self.last_pong.is_some() && self.lost_in_a_row < LOST_IN_A_ROW
    }
    fn timeout(&self) -> Duration {
        self.rtt.map_or(PONG_TIMEOUT, |r| PONG_TIMEOUT.max(r * 2))
    }
    fn pong(&mut self, rtt: Duration, now: Instant) {
        self.rtt = Some(match self.rtt {
            Some(old) => (old * 7 + rtt) / 8,
            None => rtt,
        });
        self.last_pong = Some(now);
        self.lost_in_a_row = 0;
    }
    fn forget(&mut self) {
        self.lost_in_a_row = LOST_IN_A_ROW;
    }
}

#[derive(Debug)]
struct Peer {
    candidates: BTreeSet<SocketAddr>,
    direct: BTreeMap<SocketAddr, Measured>,
    relayed: Measured,
    relay: Option<Key>,
    chosen: Option<Via>,
    punch_until: Option<Instant>,
    next_punch: Option<Instant>,
    next_connect: Instant,
    active_until: Option<Instant>,
}

impl Peer {
    fn new(now: Instant) -> Self {
        Peer {
            candidates: BTreeSet::new(),
            direct: BTreeMap::new(),
            relayed: Measured::default(),
            relay: None,
            chosen: None,
            punch_until: None,
            next_punch: None,
            next_connect: now,
            active_until: None,
        }
    }
    fn has_working_direct(&self) -> bool {
        self.direct.values().any(Measured::working)
    }
    /// How often to ask for another introduction: often while relayed, rarely while only
    /// IPv4 works though both sides have IPv6, never once the best kind of path works.
    fn introduce_every(&self, local_v6: bool) -> Option<Duration> {
        if !self.has_working_direct() {
            return Some(RETRY_DIRECT);
        }
        let v6_works = self.direct.iter().any(|(a, m)| a.is_ipv6() && m.working());
        let v6_offered = self.candidates.iter().any(SocketAddr::is_ipv6);
        (local_v6 && v6_offered && !v6_works).then_some(UPGRADE_RETRY)
    }
    fn active(&self, now: Instant) -> bool {
        self.active_until.is_some_and(|t| t > now)
    }
}

#[derive(Debug)]
struct Lighthouse {
    point: RendezvousPoint,
    observed: Option<SocketAddr>,
    answered: bool,
    next_register: Instant,
    registered_at: Option<Instant>,
}

/// A member's connectivity state machine.
#[derive(Debug)]
pub struct Agent {
    port: u16,
    local: Vec<IpAddr>,
    lighthouses: Vec<Lighthouse>,
    peers: HashMap<Key, Peer>,
    pings: HashMap<u64, (Key, Via, Instant)>,
    next_tx: u64,
    mapping: NatMapping,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    path_changes: u64,
}

fn usable_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_loopback(),
        // Global unicast only: link-local needs a scope, and ULAs do not cross sites.
        IpAddr::V6(v6) => (v6.segments()[0] & 0xe000) == 0x2000,
    }
}

impl Agent {
    /// `port` is the WireGuard listen port; `local` the node's interface addresses.
    pub fn new(port: u16, local: Vec<IpAddr>, points: Vec<RendezvousPoint>, now: Instant) -> Self {
        let lighthouses = points
            .into_iter()
            .map(|point| Lighthouse {
                point,
                observed: None,
                answered: false,
                next_register: now,
                registered_at: None,
            })
            .collect();
        Agent {
            port,
            local: local.into_iter().filter(usable_local).collect(),
            lighthouses,
            peers: HashMap::new(),
            pings: HashMap::new(),
            next_tx: 1,
            mapping: NatMapping::Unknown,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            path_changes: 0,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Where a datagram to `peer` goes now, if anywhere.
    pub fn route(&self, peer: &Key) -> Option<Via> {
        self.peers.get(peer).and_then(|p| p.chosen)
    }

    /// The data plane sent `peer` something: keep its path probed closely.
    pub fn note_traffic(&mut self, peer: &Key, now: Instant) {
        if let Some(p) = self.peers.get_mut(peer) {
            let was_idle = !p.active(now);
            p.active_until = Some(now + ACTIVE_FOR);
            if was_idle {
                if let Some(Via::Direct(addr)) = p.chosen {
                    if let Some(m) = p.direct.get_mut(&addr) {
                        m.next_ping = Some(now);
                    }
                }
                if p.chosen.is_some_and(|v| !v.is_direct()) {
                    p.relayed.next_ping = Some(now);
                }
            }
        }
    }

    pub fn nat_mapping(&self) -> NatMapping {
        self.mapping
    }

    /// This node's candidates: its interface addresses and what the lighthouses observe.
    pub fn candidates(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self
            .local
            .iter()
            .map(|ip| SocketAddr::new(*ip, self.port))
            .collect();
        for lh in &self.lighthouses {
            if let Some(o) = lh.observed {
                if !out.contains(&o) {
                    out.push(o);
                }
            }
        }
        out.truncate(MAX_CANDIDATES);
        out
    }

    /// A peer's candidates as last learned, and the measured RTT of each working path.
    pub fn peer_paths(&self, peer: &Key) -> Vec<(Via, Option<Duration>, bool)> {
        let Some(p) = self.peers.get(peer) else {
            return Vec::new();
        };
        let mut out: Vec<_> = p
            .direct
            .iter()
            .map(|(a, m)| (Via::Direct(*a), m.rtt, m.working()))
            .collect();
        if let Some(r) = p.relay {
            out.push((Via::Relay(r), p.relayed.rtt, p.relayed.working()));
        }
        out
    }

    pub fn path_changes(&self) -> u64 {
        self.path_changes
    }

    /// Ask to reach `peer` (a roster push or the first packet to it).
    pub fn connect(&mut self, peer: Key, now: Instant) {
        let p = self.peers.entry(peer).or_insert_with(|| Peer::new(now));
        p.next_connect = p.next_connect.min(now);
    }

    fn relay_point(&self) -> Option<&Lighthouse> {
        self.lighthouses
            .iter()
            .find(|l| l.point.relay && l.answered)
            .or_else(|| self.lighthouses.iter().find(|l| l.answered))
    }

    fn introducer(&self) -> Option<&Lighthouse> {
        self.relay_point().or(self.lighthouses.first())
    }

    fn send(&mut self, to: Key, via: Via, signal: Signal) {
        self.transmits.push_back(Transmit { to, via, signal });
    }

    fn register(&mut self, index: usize, now: Instant) {
        let candidates = self.candidates();
        let Some(lh) = self.lighthouses.get_mut(index) else {
            return;
        };
        lh.next_register = now
            + if lh.answered {
                REGISTER_REFRESH
            } else {
                REGISTER_RETRY
            };
        lh.registered_at = Some(now);
        let (key, endpoint) = (lh.point.key, lh.point.endpoint);
        self.send(
            key,
            Via::Direct(endpoint),
            Signal::Register {
                candidates: candidates
                    .into_iter()
                    .filter(|c| self.local.contains(&c.ip()))
                    .collect(),
            },
        );
    }

    fn ping(&mut self, peer: Key, via: Via, now: Instant) {
        let tx = self.next_tx;
        self.next_tx = self.next_tx.wrapping_add(1);
        self.pings.insert(tx, (peer, via, now));
        self.send(peer, via, Signal::Ping { tx });
    }

    fn reachable(&self, addr: &SocketAddr) -> bool {
        let ip = addr.ip();
        let same_family = self.local.iter().any(|l| l.is_ipv4() == addr.is_ipv4());
        let own =
            self.local.contains(&ip) || self.lighthouses.iter().any(|l| l.observed == Some(*addr));
        routable(addr) && same_family && !own
    }

    fn start_punch(&mut self, peer: Key, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.punch_until = Some(now + PUNCH_BURST);
            p.next_punch = Some(now);
        }
    }

    /// An authenticated signal from `from`, which arrived over `via`.
    pub fn handle(&mut self, from: Key, via: Via, signal: Signal, now: Instant) {
        if let Via::Relay(r) = via {
            if !self
                .lighthouses
                .iter()
                .any(|l| l.point.key == r && l.point.relay)
            {
                return;
            }
        }
        let lighthouse = self.lighthouses.iter().position(|l| l.point.key == from);
        match (signal, lighthouse) {
            (Signal::Observed { addr }, Some(i)) => {
                self.lighthouses[i].answered = true;
                self.lighthouses[i].next_register = now + REGISTER_REFRESH;
                self.lighthouses[i].observed = Some(addr);
                self.classify();
            }
            (Signal::Unknown { peer: None }, Some(i)) => {
                // The lighthouse lost us (a restart): register again, at most once per
                // `REREGISTER_GAP` however many datagrams it refuses meanwhile.
                let lh = &mut self.lighthouses[i];
                let earliest = lh
                    .registered_at
                    .map_or(now, |t| (t + REREGISTER_GAP).max(now));
                lh.next_register = lh.next_register.min(earliest);
            }
            (Signal::Connect { peer, candidates }, Some(i)) => {
                self.introduced(peer, i, candidates, now)
            }
            (Signal::Ping { tx }, _) => {
                let observed = match via {
                    Via::Direct(a) => a,
                    Via::Relay(_) => SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0),
                };
                self.send(from, via, Signal::Pong { tx, observed });
                let reachable = matches!(via, Via::Direct(a) if self.reachable(&a));
                let p = self.peers.entry(from).or_insert_with(|| Peer::new(now));
                if let Via::Relay(r) = via {
                    p.relay.get_or_insert(r);
                }
                // A ping from an address we did not know is a peer-reflexive candidate (the
                // peer's NAT gave this path its own port): measure it from our side too. Two
                // NATs that map each destination anew would teach each other a new address
                // per probe, so only a few unconfirmed ones are kept at once.
                if let (Via::Direct(addr), true) = (via, reachable) {
                    let unconfirmed = p
                        .direct
                        .values()
                        .filter(|m| m.learned && !m.working())
                        .count();
                    if !p.direct.contains_key(&addr) && unconfirmed < MAX_LEARNED {
                        p.direct.insert(
                            addr,
                            Measured {
                                learned: true,
                                ..Measured::default()
                            },
                        );
                    }
                }
            }
            (Signal::Pong { tx, .. }, _) => {
                let Some((peer, sent_via, sent)) = self.pings.get(&tx).copied() else {
                    return;
                };
                // The answer may come back from another address than the one probed: two
                // NATs that map every destination anew still carry both directions, each to
                // the address the other's datagrams come from. The probed path is what the
                // answer confirms, for sending.
                if peer != from {
                    return;
                }
                self.pings.remove(&tx);
                let rtt = now.saturating_duration_since(sent);
                if let Some(p) = self.peers.get_mut(&peer) {
                    match sent_via {
                        Via::Direct(a) => {
                            if let Some(m) = p.direct.get_mut(&a) {
                                m.pong(rtt, now)
                            }
                        }
                        Via::Relay(_) => p.relayed.pong(rtt, now),
                    }
                }
                self.reselect(peer, now);
            }
            _ => {}
        }
    }

    fn introduced(
        &mut self,
        peer: Key,
        lighthouse: usize,
        candidates: Vec<SocketAddr>,
        now: Instant,
    ) {
        let relay = self
            .lighthouses
            .get(lighthouse)
            .filter(|l| l.point.relay)
            .or_else(|| self.lighthouses.iter().find(|l| l.point.relay))
            .map(|l| l.point.key);
        let new: BTreeSet<SocketAddr> = candidates.into_iter().take(MAX_CANDIDATES).collect();
        let reachable: Vec<SocketAddr> =
            new.iter().copied().filter(|a| self.reachable(a)).collect();
        let p = self.peers.entry(peer).or_insert_with(|| Peer::new(now));
        if p.relay.is_none() {
            p.relay = relay;
        }
        // Different candidates mean the peer moved: its old direct paths are suspect until
        // they answer again, so traffic goes by the relay in the meantime.
        let moved = !p.candidates.is_empty() && p.candidates != new;
        if moved {
            p.direct.values_mut().for_each(Measured::forget);
        }
        // Paths to addresses the peer no longer offers go, unless they work.
        p.direct
            .retain(|a, m| m.working() || new.contains(a) || (m.learned && !moved));
        p.candidates = new;
        for a in reachable {
            if p.direct.len() >= MAX_PATHS {
                break;
            }
            p.direct.entry(a).or_default();
        }
        p.next_connect = now + RETRY_DIRECT;
        self.start_punch(peer, now);
        self.reselect(peer, now);
    }

    fn classify(&mut self) {
        let seen: Vec<SocketAddr> = self.lighthouses.iter().filter_map(|l| l.observed).collect();
        let mapping = classify(&self.local, &seen);
        if mapping != self.mapping && mapping != NatMapping::Unknown {
            self.events.push_back(Event::NatMapping(mapping));
        }
        if mapping != NatMapping::Unknown {
            self.mapping = mapping;
        }
    }

    /// The node's interface addresses changed (a roam): register again, re-introduce every
    /// peer and punch at once instead of waiting for a keepalive.
    pub fn set_local_addresses(&mut self, local: Vec<IpAddr>, now: Instant) {
        let local: Vec<IpAddr> = local.into_iter().filter(usable_local).collect();
        if local == self.local {
            return;
        }
        let lost_v4 = self.local.iter().any(|a| a.is_ipv4() && !local.contains(a));
        let lost_v6 = self.local.iter().any(|a| a.is_ipv6() && !local.contains(a));
        self.local = local;
        for lh in &mut self.lighthouses {
            lh.observed = None;
            lh.next_register = now;
        }
        self.mapping = NatMapping::Unknown;
        let peers: Vec<Key> = self.peers.keys().copied().collect();
        for key in peers {
            if let Some(p) = self.peers.get_mut(&key) {
                for (addr, m) in p.direct.iter_mut() {
                    if (addr.is_ipv4() && lost_v4) || (addr.is_ipv6() && lost_v6) {
                        m.forget();
                    }
                }
                p.next_connect = now;
                p.relayed.next_ping = Some(now);
            }
            self.start_punch(key, now);
            self.reselect(key, now);
        }
        for i in 0..self.lighthouses.len() {
            self.register(i, now);
        }
    }

    fn reselect(&mut self, peer: Key, now: Instant) {
        let answered: Vec<Key> = self
            .lighthouses
            .iter()
            .filter(|l| l.answered)
            .map(|l| l.point.key)
            .collect();
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let relay_ok = p.relay.is_some_and(|r| answered.contains(&r));
        let rank = |a: &SocketAddr, m: &Measured| (a.is_ipv4(), m.rtt.unwrap_or(Duration::MAX));
        let best = p
            .direct
            .iter()
            .filter(|(_, m)| m.working())
            .min_by_key(|(a, m)| rank(a, m))
            .map(|(a, m)| (*a, rank(a, m)));
        let next = match (best, p.chosen) {
            (Some((addr, (v4, rtt))), Some(Via::Direct(cur))) => match p.direct.get(&cur) {
                Some(m) if m.working() => {
                    let (cur_v4, cur_rtt) = rank(&cur, m);
                    let clearly_better = (cur_v4 && !v4)
                        || (v4 == cur_v4
                            && rtt.as_secs_f64() < cur_rtt.as_secs_f64() * SWITCH_RATIO);
                    Some(Via::Direct(if clearly_better { addr } else { cur }))
                }
                _ => Some(Via::Direct(addr)),
            },
            (Some((addr, _)), _) => Some(Via::Direct(addr)),
            (None, _) if relay_ok => p.relay.map(Via::Relay),
            (None, _) => None,
        };
        if next != p.chosen {
            let from = p.chosen;
            p.chosen = next;
            match next {
                Some(Via::Direct(a)) => {
                    if let Some(m) = p.direct.get_mut(&a) {
                        m.next_ping = Some(now + ACTIVE_HEARTBEAT);
                    }
                }
                Some(Via::Relay(_)) => p.relayed.next_ping = Some(now),
                None => {}
            }
            self.path_changes += 1;
            self.events.push_back(Event::PathChanged {
                peer,
                from,
                to: next,
            });
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |t| t.min(x)));
            }
        };
        for lh in &self.lighthouses {
            at(Some(lh.next_register));
        }
        for (peer, sent_via, sent) in self.pings.values() {
            let timeout = self
                .peers
                .get(peer)
                .map_or(PONG_TIMEOUT, |p| match sent_via {
                    Via::Direct(a) => p.direct.get(a).map_or(PONG_TIMEOUT, Measured::timeout),
                    Via::Relay(_) => p.relayed.timeout(),
                });
            at(Some(*sent + timeout));
        }
        let local_v6 = self.local.iter().any(IpAddr::is_ipv6);
        for p in self.peers.values() {
            if self.lighthouses.iter().any(|l| l.answered) && p.introduce_every(local_v6).is_some()
            {
                at(Some(p.next_connect));
            }
            if p.punch_until.is_some() {
                at(p.next_punch);
            }
            for m in p.direct.values() {
                if m.working() {
                    at(m.next_ping);
                }
            }
            if p.chosen.is_some_and(|v| !v.is_direct()) {
                at(p.relayed.next_ping);
            }
        }
        t
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for i in 0..self.lighthouses.len() {
            if self.lighthouses[i].next_register <= now {
                self.register(i, now);
            }
        }
        self.expire_pings(now);
        let keys: Vec<Key> = self.peers.keys().copied().collect();
        for key in keys {
            self.peer_timers(key, now);
            self.reselect(key, now);
        }
    }

    fn expire_pings(&mut self, now: Instant) {
        let mut lost = Vec::new();
        for (tx, (peer, via, sent)) in &self.pings {
            let timeout = self.peers.get(peer).map_or(PONG_TIMEOUT, |p| match via {
                Via::Direct(a) => p.direct.get(a).map_or(PONG_TIMEOUT, Measured::timeout),
                Via::Relay(_) => p.relayed.timeout(),
            });
            if *sent + timeout <= now {
                lost.push((*tx, *peer, *via));
            }
        }
        for (tx, peer, via) in lost {
            self.pings.remove(&tx);
            if let Some(p) = self.peers.get_mut(&peer) {
                let m = match via {
                    Via::Direct(a) => p.direct.get_mut(&a),
                    Via::Relay(_) => Some(&mut p.relayed),
                };
                if let Some(m) = m {
                    m.lost_in_a_row = m.lost_in_a_row.saturating_add(1);
                }
            }
        }
    }

    fn peer_timers(&mut self, key: Key, now: Instant) {
        let introducer = self
            .introducer()
            .filter(|l| l.answered)
            .map(|l| (l.point.key, l.point.endpoint));
        let candidates = self.candidates();
        let local_v6 = self.local.iter().any(IpAddr::is_ipv6);
        let Some(p) = self.peers.get_mut(&key) else {
            return;
        };
        let mut pings: Vec<Via> = Vec::new();
        let mut connect = false;
        if let (Some(every), true, true) = (
            p.introduce_every(local_v6),
            p.next_connect <= now,
            introducer.is_some(),
        ) {
            p.next_connect = now + every;
            connect = true;
        }
        if let (Some(until), Some(next)) = (p.punch_until, p.next_punch) {
            if next <= now {
                if now >= until {
                    p.punch_until = None;
                    p.next_punch = None;
                    let candidates = &p.candidates;
                    p.direct
                        .retain(|a, m| m.working() || !m.learned || candidates.contains(a));
                } else {
                    p.next_punch = Some(next + PUNCH_INTERVAL);
                    for (addr, m) in &p.direct {
                        if !m.working() {
                            pings.push(Via::Direct(*addr));
                        }
                    }
                }
            }
        }
        let active = p.active(now);
        let chosen = p.chosen;
        for (addr, m) in p.direct.iter_mut() {
            if !m.working() {
                continue;
            }
            let due = m.next_ping.is_none_or(|t| t <= now);
            if due {
                let every = if active && chosen == Some(Via::Direct(*addr)) {
                    ACTIVE_HEARTBEAT
                } else {
                    IDLE_HEARTBEAT
                };
                m.next_ping = Some(now + every);
                pings.push(Via::Direct(*addr));
            }
        }
        if let (Some(Via::Relay(r)), true) = (chosen, p.relayed.next_ping.is_none_or(|t| t <= now))
        {
            p.relayed.next_ping = Some(
                now + if active {
                    ACTIVE_HEARTBEAT
                } else {
                    IDLE_HEARTBEAT
                },
            );
            pings.push(Via::Relay(r));
        }
        pings.sort();
        pings.dedup();
        for via in pings {
            self.ping(key, via, now);
        }
        if let (true, Some((lh, endpoint))) = (connect, introducer) {
            self.send(
                lh,
                Via::Direct(endpoint),
                Signal::Connect {
                    peer: key,
                    candidates: candidates.clone(),
                },
            );
        }
    }
}

/// Per-member relay allowance, a token bucket in bytes.
#[derive(Debug)]
struct Allowance {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
struct Registered {
    observed: SocketAddr,
    candidates: Vec<SocketAddr>,
    allowance: Allowance,
    last_seen: Instant,
}

/// A registration not refreshed for this long is gone (three missed refreshes).
pub const REGISTRATION_LIFETIME: Duration = Duration::from_secs(60);

/// Relay and introduction counters, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RendezvousStats {
    pub relayed_bytes: u64,
    pub relayed_packets: u64,
    pub over_cap: u64,
    pub refused: u64,
    pub introductions: u64,
}

/// The lighthouse's half: observes members' addresses, introduces them to each other and, with
/// `relay`, forwards their datagrams at up to `relay_rate` bytes per second per member.
#[derive(Debug)]
pub struct Rendezvous {
    relay: bool,
    relay_rate: u64,
    registered: HashMap<Key, Registered>,
    transmits: VecDeque<(Key, SocketAddr, Signal)>,
    stats: RendezvousStats,
    next_prune: Option<Instant>,
}

impl Rendezvous {
    pub fn new(relay: bool, relay_rate: u64) -> Self {
        Rendezvous {
            relay,
            relay_rate,
            registered: HashMap::new(),
            transmits: VecDeque::new(),
            stats: RendezvousStats::default(),
            next_prune: None,
        }
    }

    /// What to send: to a member's key, at the address it was last seen at.
    pub fn poll_transmit(&mut self) -> Option<(Key, SocketAddr, Signal)> {
        self.transmits.pop_front()
    }

    pub fn stats(&self) -> RendezvousStats {
        self.stats
    }

    pub fn members(&self) -> usize {
        self.registered.len()
    }

    /// Drops a member at once (it left, or its certificate was revoked): it is neither
    /// introduced nor relayed to from now on.
    pub fn forget(&mut self, key: &Key) {
        self.registered.remove(key);
    }

    /// A signal from `from`, seen from `src`. `member` is whether `from` holds a valid
    /// certificate (the control plane decides); nobody else is observed, introduced or relayed.
    pub fn handle(
        &mut self,
        from: Key,
        src: SocketAddr,
        member: bool,
        signal: Signal,
        now: Instant,
    ) {
        if !member {
            self.stats.refused += 1;
            return;
        }
        if let Signal::Register { candidates } = signal {
            let rate = self.relay_rate as f64;
            let entry = self.registered.entry(from).or_insert_with(|| Registered {
                observed: src,
                candidates: Vec::new(),
                allowance: Allowance {
                    tokens: rate,
                    at: now,
                },
                last_seen: now,
            });
            entry.observed = src;
            entry.last_seen = now;
            entry.candidates = candidates.into_iter().take(MAX_CANDIDATES).collect();
            self.transmits
                .push_back((from, src, Signal::Observed { addr: src }));
            return;
        }
        if self.next_prune.is_none_or(|t| now >= t) {
            self.next_prune = Some(now + REGISTRATION_LIFETIME / 6);
            self.registered
                .retain(|_, r| now.saturating_duration_since(r.last_seen) < REGISTRATION_LIFETIME);
        }
        let Some(me) = self.registered.get_mut(&from) else {
            self.transmits
                .push_back((from, src, Signal::Unknown { peer: None }));
            return;
        };
        // An authenticated datagram moves the member's endpoint (WireGuard's roaming rule).
        me.observed = src;
        me.last_seen = now;
        match signal {
            Signal::Connect { peer, candidates } => {
                let mut mine: Vec<SocketAddr> =
                    candidates.into_iter().take(MAX_CANDIDATES - 1).collect();
                if !mine.contains(&src) {
                    mine.push(src);
                }
                let Some(other) = self.registered.get(&peer) else {
                    self.transmits
                        .push_back((from, src, Signal::Unknown { peer: Some(peer) }));
                    return;
                };
                let mut theirs = other.candidates.clone();
                theirs.truncate(MAX_CANDIDATES - 1);
                if !theirs.contains(&other.observed) {
                    theirs.push(other.observed);
                }
                let at = other.observed;
                self.stats.introductions += 1;
                self.transmits.push_back((
                    peer,
                    at,
                    Signal::Connect {
                        peer: from,
                        candidates: mine,
                    },
                ));
                self.transmits.push_back((
                    from,
                    src,
                    Signal::Connect {
                        peer,
                        candidates: theirs,
                    },
                ));
            }
            Signal::Relay { peer, payload } if self.relay => {
                let rate = self.relay_rate as f64;
                let a = &mut me.allowance;
                let elapsed = now.saturating_duration_since(a.at).as_secs_f64();
                a.tokens = (a.tokens + elapsed * rate).min(rate);
                a.at = now;
                let len = payload.len() as f64;
                if a.tokens < len {
                    self.stats.over_cap += 1;
                    return;
                }
                a.tokens -= len;
                let Some(other) = self.registered.get(&peer) else {
                    self.transmits
                        .push_back((from, src, Signal::Unknown { peer: Some(peer) }));
                    return;
                };
                self.stats.relayed_packets += 1;
                self.stats.relayed_bytes += payload.len() as u64;
                self.transmits.push_back((
                    peer,
                    other.observed,
                    Signal::Relay {
                        peer: from,
                        payload,
                    },
                ));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "netsim.rs"]
pub(crate) mod netsim;
