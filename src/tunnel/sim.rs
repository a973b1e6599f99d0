//! The packet engine (`engine.rs`) in a deterministic in-memory network: hosts on public
//! addresses or behind the connectivity simulation's NAT models, a relay, delay, loss, NAT
//! rebinding and spoofed datagrams, with virtual time. Each host is a real `Engine` with
//! real boringtun sessions; only the sockets and the TUN are replaced (`Io` collects what it
//! sends and what it writes). Runs in milliseconds, without root.

use super::batch::{Batcher, OVERHEAD};
use super::engine::{self, Engine, Io, TunWriter};
use super::{relay, ControlDatagram, MeshHook, PeerSpec, PeerTable};
use crate::mesh::paths::netsim::{Nat, NatKind, Rng, CONE, EASY, HARD};
use boringtun::x25519;
use proptest::prelude::*;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

const PORT: u16 = 51820;
/// The data plane's timer tick.
const TICK_MS: u64 = 250;
/// Where the simulated hosts' inner packets go (any port but the mesh's).
const APP_PORT: u16 = 9000;

/// The I/O shell of a simulated host: datagrams and TUN writes are collected, not sent.
struct Shell {
    engine: Engine,
    sent: RefCell<Vec<(SocketAddr, Vec<u8>)>>,
    tun: RefCell<Vec<Vec<u8>>>,
}

impl std::ops::Deref for Shell {
    type Target = Engine;

    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl Io for Shell {
    fn send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) {
        for datagram in contents.chunks(segment.unwrap_or(contents.len()).max(1)) {
            self.sent.borrow_mut().push((to, datagram.to_vec()));
        }
    }

    fn write_tun(&self, out: &mut TunWriter) {
        for b in out.bufs.iter().take(out.ready) {
            self.tun
                .borrow_mut()
                .push(b.get(out.off..).unwrap_or_default().to_vec());
        }
        out.ready = 0;
    }
}

struct Host {
    shell: Shell,
    writer: TunWriter,
    /// Its own address: public, or 10.site.0.n behind `nat`.
    addr: SocketAddr,
    nat: Option<usize>,
    /// A second address on a LAN (10.9.0.0/16) that the host sends LAN destinations from.
    lan: Option<SocketAddr>,
    overlay: Ipv4Addr,
    key: x25519::StaticSecret,
    last_tick: u64,
    /// The mesh hook's far ends, kept open (relay frames need a hook; control messages are
    /// not read here).
    _control: tokio::sync::mpsc::Receiver<ControlDatagram>,
    _misses: tokio::sync::mpsc::Receiver<IpAddr>,
}

impl Host {
    fn public_key(&self) -> [u8; 32] {
        self.shell.static_public.to_bytes()
    }
}

/// One datagram on the wire, after its sender's NAT.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Datagram {
    at: u64,
    seq: u64,
    src: SocketAddr,
    dst: SocketAddr,
    bytes: Vec<u8>,
}

struct Net {
    hosts: Vec<Host>,
    nats: Vec<Nat>,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Datagram>>,
    /// One-way delay, uniform in this range (ms).
    delay: (u64, u64),
    /// Loss of data datagrams that carry a packet. Handshakes and keepalives are never lost:
    /// boringtun retries a handshake on its own clock (every 5 s of real time), which
    /// virtual time does not drive.
    loss: f64,
    next_tick: u64,
    /// One-way delay between two LAN addresses (ms).
    lan_delay: u64,
    /// Every datagram delivered to a host: (host, source as it saw it, bytes).
    delivered: Vec<(usize, SocketAddr, Vec<u8>)>,
}

impl Net {
    fn new(seed: u64) -> Net {
        Net {
            hosts: Vec::new(),
            nats: Vec::new(),
            rng: Rng::new(seed),
            now: 1,
            seq: 0,
            queue: BinaryHeap::new(),
            delay: (5, 5),
            loss: 0.0,
            next_tick: TICK_MS,
            lan_delay: 1,
            delivered: Vec::new(),
        }
    }

    fn nat(&mut self, kind: NatKind) -> usize {
        let i = self.nats.len();
        self.nats.push(Nat::new(
            Ipv4Addr::new(203, 0, 113, 100 + i as u8),
            i as u8 + 1,
            kind,
        ));
        i
    }

    fn host(&mut self, nat: Option<usize>) -> usize {
        let i = self.hosts.len();
        let n = i as u8 + 1;
        let ip = match nat {
            Some(site) => Ipv4Addr::new(10, site as u8 + 1, 0, n),
            None => Ipv4Addr::new(198, 51, 100, n),
        };
        let key = x25519::StaticSecret::from([n; 32]);
        let overlay = Ipv4Addr::new(100, 64, 0, n);
        let engine = Engine::new(
            key.clone(),
            PeerTable::default(),
            false,
            Some(overlay),
            Duration::from_secs(1),
        );
        let (tx, control) = tokio::sync::mpsc::channel(1024);
        let (miss_tx, misses) = tokio::sync::mpsc::channel(16);
        let _ = engine.mesh.set(MeshHook {
            tx,
            misses: miss_tx,
            accept_unknown: false,
        });
        self.hosts.push(Host {
            shell: Shell {
                engine,
                sent: RefCell::default(),
                tun: RefCell::default(),
            },
            writer: TunWriter::new(8, 0),
            addr: SocketAddr::new(IpAddr::V4(ip), PORT),
            nat,
            lan: None,
            overlay,
            key,
            last_tick: 1,
            _control: control,
            _misses: misses,
        });
        i
    }

    /// Host `h` forwards members' datagrams (`[relay] enabled`).
    fn relays(&mut self, h: usize) {
        self.hosts[h].shell.engine.relay = Some(Mutex::new(relay::Relay::new(100_000)));
    }

    /// Host `a` may send through the relay at host `r`.
    fn uses_relay(&self, a: usize, r: usize) {
        let key = self.hosts[r].public_key();
        self.hosts[a]
            .shell
            .relays
            .store(std::sync::Arc::new(vec![key]));
    }

    /// Host `a` gets `b` as a peer (or its spec again: a roster push), at `endpoint`.
    fn know(&self, a: usize, b: usize, endpoint: Option<SocketAddr>, certified: bool) {
        self.know_with(a, b, endpoint, certified, Vec::new());
    }

    /// As `know`, with `b`'s candidates (its own addresses besides `endpoint`).
    fn know_with(
        &self,
        a: usize,
        b: usize,
        endpoint: Option<SocketAddr>,
        certified: bool,
        candidates: Vec<SocketAddr>,
    ) {
        let (key, overlay) = (self.hosts[b].public_key(), self.hosts[b].overlay);
        let spec = PeerSpec {
            name: format!("h{b}"),
            public_key: key,
            allowed_ips: vec![ipnet::IpNet::from(IpAddr::V4(overlay))],
            endpoint,
            persistent_keepalive: None,
            probe_interval: None,
            idles: false,
            groups: Vec::new(),
            multicast: Vec::new(),
            candidates,
            certified,
            behind_nat: self.hosts[b].nat.is_some(),
        };
        let me = &self.hosts[a];
        me.shell
            .change(|t| t.upsert(&me.key, spec))
            .expect("the peer is added");
    }

    /// What the mesh does every second: each member is probed by the lighthouse (here: sends
    /// it a packet), and each hears where the lighthouse sees the others (a roster push).
    fn refresh(&mut self, l: usize, members: &[usize]) {
        for &m in members {
            self.send(m, l, 0, None);
        }
        for &m in members {
            for &other in members.iter().filter(|o| **o != m) {
                let seen = self.endpoint(l, other);
                self.know(m, other, seen, true);
            }
        }
    }

    /// Members `a` and `b` send each other packet `n`, `n + 1`, ... every 100 ms until
    /// `until`, and the lighthouse at `l` refreshes them every second; `n` is left at the
    /// last packet sent.
    fn talk(&mut self, (l, a, b): (usize, usize, usize), n: &mut u64, until: u64) {
        while self.now < until {
            *n += 1;
            self.send(a, b, *n, None);
            self.send(b, a, *n, None);
            if *n % 10 == 0 {
                self.refresh(l, &[a, b]);
            }
            let t = self.now + 100;
            self.run_until(t);
        }
    }

    fn peer(&self, a: usize, b: usize) -> std::sync::Arc<super::Peer> {
        let key = self.hosts[b].public_key();
        let table = self.hosts[a].shell.table.load();
        table.by_key(&key).expect("a peer of a").1.clone()
    }

    /// Where `a` sends `b`'s datagrams now.
    fn endpoint(&self, a: usize, b: usize) -> Option<SocketAddr> {
        self.peer(a, b).endpoint()
    }

    fn relayed(&self, a: usize, b: usize) -> bool {
        self.peer(a, b).path.relay().is_some()
    }

    /// An inner packet (IPv4/UDP) from `a`'s overlay address, claiming `src`, to `b`'s,
    /// carrying `n`.
    fn packet(src: Ipv4Addr, dst: Ipv4Addr, n: u64) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0];
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(&APP_PORT.to_be_bytes());
        p.extend_from_slice(&APP_PORT.to_be_bytes());
        p.extend_from_slice(&[0, 16, 0, 0]);
        p.extend_from_slice(&n.to_be_bytes());
        p
    }

    /// `a` sends packet `n` from its TUN to `b`'s overlay address (its source: `a`'s own
    /// overlay address, or `claim`).
    fn send(&mut self, a: usize, b: usize, n: u64, claim: Option<Ipv4Addr>) {
        let src = claim.unwrap_or(self.hosts[a].overlay);
        let packet = Net::packet(src, self.hosts[b].overlay, n);
        let shell = &self.hosts[a].shell;
        shell.clock_ms.store(self.now, Ordering::Relaxed);
        let mut batcher = Batcher::new(65535 + 1420 + OVERHEAD, 64);
        engine::encapsulate(shell, &packet, &mut batcher);
        batcher.flush(&mut |to, contents, segment| shell.send(to, contents, segment));
        self.pump(a);
    }

    /// What `a` sent goes on the wire: through its NAT unless it stays inside the site.
    fn pump(&mut self, a: usize) {
        let sent: Vec<_> = self.hosts[a].shell.sent.borrow_mut().drain(..).collect();
        let (addr, nat, lan) = (self.hosts[a].addr, self.hosts[a].nat, self.hosts[a].lan);
        for (dst, bytes) in sent {
            if let Some(lan) = lan.filter(|_| on_lan(dst)) {
                self.inject(lan, dst, bytes);
                continue;
            }
            let src = match nat {
                Some(n) if !self.nats[n].inside(dst.ip()) => {
                    self.nats[n].outbound(addr, dst, &mut self.rng)
                }
                _ => addr,
            };
            self.inject(src, dst, bytes);
        }
    }

    /// A datagram from `src` (as the network sees it) to `dst`.
    fn inject(&mut self, src: SocketAddr, dst: SocketAddr, bytes: Vec<u8>) {
        let carries_data = bytes.first() == Some(&4) && bytes.len() > 32;
        if carries_data && self.rng.chance(self.loss) {
            return;
        }
        let (lo, hi) = self.delay;
        let delay = if on_lan(src) && on_lan(dst) {
            self.lan_delay
        } else {
            lo + self.rng.next() % (hi - lo + 1)
        };
        let at = self.now + delay;
        self.seq += 1;
        self.queue.push(Reverse(Datagram {
            at,
            seq: self.seq,
            src,
            dst,
            bytes,
        }));
    }

    /// The host a datagram reaches, through the destination's NAT (no hairpinning).
    fn destination(&self, d: &Datagram) -> Option<usize> {
        let inside = match self
            .nats
            .iter()
            .find(|n| IpAddr::V4(n.public()) == d.dst.ip())
        {
            Some(nat) => nat.inbound(d.dst.port(), d.src)?,
            None => d.dst,
        };
        self.hosts
            .iter()
            .position(|h| h.addr == inside || h.lan == Some(inside))
    }

    fn deliver(&mut self, d: Datagram) {
        let Some(h) = self.destination(&d) else {
            return;
        };
        self.delivered.push((h, d.src, d.bytes.clone()));
        let host = &mut self.hosts[h];
        host.shell.clock_ms.store(self.now, Ordering::Relaxed);
        engine::receive_datagram(&host.shell, &mut host.writer, d.src, &d.bytes);
        host.shell.write_tun(&mut host.writer);
        self.pump(h);
    }

    /// Every host's timers, as the data plane runs them once a tick.
    fn tick(&mut self) {
        let mut buf = vec![0u8; 2048];
        for h in 0..self.hosts.len() {
            let host = &mut self.hosts[h];
            host.shell.clock_ms.store(self.now, Ordering::Relaxed);
            let _ = engine::timers(&host.shell, &mut buf, host.last_tick, false);
            host.last_tick = self.now;
            self.pump(h);
        }
    }

    /// Runs the network until virtual time `until` (ms).
    fn run_until(&mut self, until: u64) {
        loop {
            let next = self.queue.peek().map(|Reverse(d)| d.at);
            match next {
                Some(at) if at <= until && at < self.next_tick => {
                    self.now = self.now.max(at);
                    if let Some(Reverse(d)) = self.queue.pop() {
                        self.deliver(d);
                    }
                }
                _ if self.next_tick <= until => {
                    self.now = self.next_tick;
                    self.next_tick += TICK_MS;
                    self.tick();
                }
                _ => {
                    self.now = until;
                    return;
                }
            }
        }
    }

    /// The numbers of the packets from `from`'s overlay address that reached `h`'s TUN, and
    /// how many packets reached it in all.
    fn received(&self, h: usize, from: usize) -> (Vec<u64>, usize) {
        let tun = self.hosts[h].shell.tun.borrow();
        let src = self.hosts[from].overlay.octets();
        let numbers = tun
            .iter()
            .filter(|p| p.get(12..16) == Some(&src[..]))
            .filter_map(|p| p.get(28..36)?.try_into().ok().map(u64::from_be_bytes))
            .collect();
        (numbers, tun.len())
    }
}

/// An address on the simulated LAN, 10.9.0.0/16.
fn on_lan(a: SocketAddr) -> bool {
    matches!(a.ip(), IpAddr::V4(v4) if v4.octets()[..2] == [10, 9])
}

/// Packets that reached `h`'s TUN addressed to another overlay address (a relay that
/// decrypted a member's traffic would show them here).
fn foreign(net: &Net, h: usize) -> usize {
    let own = net.hosts[h].overlay.octets();
    let tun = net.hosts[h].shell.tun.borrow();
    tun.iter()
        .filter(|p| p.get(16..20) != Some(&own[..]))
        .count()
}

/// The NAT a host sits behind in a generated topology (`None`: a public address).
fn nat_kind() -> impl Strategy<Value = Option<NatKind>> {
    prop_oneof![
        Just(None),
        Just(Some(EASY)),
        Just(Some(HARD)),
        Just(Some(CONE))
    ]
}

/// A relay at a public address and two members, `a` behind `na` and `b` behind `nb`, each
/// with a session to the relay, and each other at the address the relay sees them at (what
/// the lighthouses tell them). Returns (relay, a, b).
fn fleet(net: &mut Net, na: Option<NatKind>, nb: Option<NatKind>) -> (usize, usize, usize) {
    let l = net.host(None);
    net.relays(l);
    let na = na.map(|k| net.nat(k));
    let nb = nb.map(|k| net.nat(k));
    let a = net.host(na);
    let b = net.host(nb);
    for m in [a, b] {
        let at = Some(net.hosts[l].addr);
        net.know(m, l, at, true);
        net.know(l, m, None, true);
        net.uses_relay(m, l);
        net.send(m, l, 0, None);
    }
    let t = net.now + 500 + 4 * net.delay.1;
    net.run_until(t);
    for (m, other) in [(a, b), (b, a)] {
        let seen = net.endpoint(l, other);
        assert!(seen.is_some(), "the relay has heard from member {other}");
        net.know(m, other, seen, true);
    }
    (l, a, b)
}

#[test]
fn a_first_packet_handshakes_through_an_easy_nat_and_the_answer_comes_back() {
    let mut net = Net::new(1);
    let nat = net.nat(EASY);
    let a = net.host(Some(nat));
    let b = net.host(None);
    let at = Some(net.hosts[b].addr);
    net.know(a, b, at, false);
    // The server knows the robot's key, not where it is.
    net.know(b, a, None, false);
    net.send(a, b, 1, None);
    net.run_until(200);
    assert_eq!(
        net.received(b, a).0,
        vec![1],
        "the packet that started the handshake"
    );
    let learned = net
        .endpoint(b, a)
        .expect("the server learned the robot's endpoint");
    assert_eq!(learned.ip(), IpAddr::V4(net.nats[nat].public()));
    net.send(b, a, 2, None);
    net.run_until(400);
    assert_eq!(
        net.received(a, b).0,
        vec![2],
        "the answer came back through the NAT"
    );
}

#[test]
fn an_endpoint_moves_only_on_an_authenticated_datagram_and_follows_a_nat_rebinding() {
    let mut net = Net::new(2);
    let nat = net.nat(EASY);
    let a = net.host(Some(nat));
    let b = net.host(None);
    let attacker = SocketAddr::from(([192, 0, 2, 66], 4444));
    let at = Some(net.hosts[b].addr);
    net.know(a, b, at, false);
    net.know(b, a, None, false);
    net.send(a, b, 1, None);
    net.run_until(200);
    net.send(a, b, 2, None);
    net.run_until(400);
    let before = net.endpoint(b, a).expect("learned");
    let captured: Vec<Vec<u8>> = net
        .delivered
        .iter()
        .filter(|(h, _, _)| *h == b)
        .map(|(_, _, bytes)| bytes.clone())
        .collect();
    assert!(
        captured.len() >= 3,
        "an initiation and data reached the server"
    );
    // Replays of everything the robot sent, and a forged data message, from elsewhere.
    let mut forged = captured.last().cloned().unwrap_or_default();
    if let Some(last) = forged.last_mut() {
        *last ^= 1;
    }
    let server = net.hosts[b].addr;
    for bytes in captured.into_iter().chain([forged]) {
        net.inject(attacker, server, bytes);
    }
    net.run_until(600);
    assert_eq!(
        net.endpoint(b, a),
        Some(before),
        "no replay or forgery moved it"
    );
    assert_eq!(
        net.received(b, a).0,
        vec![1, 2],
        "nothing replayed reached the TUN"
    );
    assert!(
        !net.delivered.iter().any(|(h, _, _)| *h != b && *h != a),
        "nothing answered the attacker"
    );
    // The robot's NAT forgets its mapping: the next packet comes from a new port, and the
    // server follows it because it is authentic.
    net.nats[nat].rebind();
    net.send(a, b, 3, None);
    net.run_until(800);
    let after = net.endpoint(b, a).expect("still known");
    assert_ne!(after, before, "the server follows the new mapping");
    assert_eq!(after.ip(), IpAddr::V4(net.nats[nat].public()));
    net.send(b, a, 4, None);
    net.run_until(1_000);
    assert_eq!(
        net.received(a, b).0,
        vec![4],
        "the answer takes the new mapping"
    );
}

#[test]
fn a_packet_from_outside_the_peers_allowed_ips_never_reaches_the_tun() {
    let mut net = Net::new(3);
    let a = net.host(None);
    let b = net.host(None);
    for (x, y) in [(a, b), (b, a)] {
        let at = Some(net.hosts[y].addr);
        net.know(x, y, at, false);
    }
    net.send(a, b, 1, None);
    net.run_until(200);
    net.send(a, b, 2, Some(Ipv4Addr::new(100, 64, 0, 99)));
    net.send(a, b, 3, None);
    net.run_until(400);
    let (from_a, all) = net.received(b, a);
    assert_eq!(from_a, vec![1, 3]);
    assert_eq!(
        all, 2,
        "the packet claiming another overlay address was dropped"
    );
}

#[test]
fn two_hard_nats_meet_through_the_relay_which_sees_only_ciphertext_then_go_direct_when_the_nats_open(
) {
    let mut net = Net::new(4);
    net.delay = (2, 20);
    let (l, a, b) = fleet(&mut net, Some(HARD), Some(HARD));
    let start = net.now;
    let mut n = 0;
    net.talk((l, a, b), &mut n, start + 10_000);
    let sent = n;
    assert!(
        net.relayed(a, b) && net.relayed(b, a),
        "two hard NATs: relayed"
    );
    let (got, _) = net.received(b, a);
    assert!(
        got.len() as u64 >= sent - 15,
        "through the relay: {} of {sent}",
        got.len()
    );
    assert!(
        net.received(l, a).1 > 0,
        "the relay's own traffic reaches its TUN"
    );
    assert_eq!(foreign(&net, l), 0, "the relay decrypted nothing of theirs");
    let direct = |net: &Net| {
        let nats: Vec<IpAddr> = net.nats.iter().map(|n| IpAddr::V4(n.public())).collect();
        net.delivered
            .iter()
            .filter(|(h, src, _)| (*h == a || *h == b) && nats.contains(&src.ip()))
            .count()
    };
    assert_eq!(direct(&net), 0, "no datagram passed between the NATs");
    // Both routers become full-cone (and forget their mappings); the relay hears the members
    // at their new ports and the lighthouses tell each the other's (a roster push).
    for nat in &mut net.nats {
        nat.set_kind(CONE);
    }
    let t = net.now + 1_000;
    net.talk((l, a, b), &mut n, t);
    net.refresh(l, &[a, b]);
    let switch = net.now;
    net.talk((l, a, b), &mut n, switch + 15_000);
    let sent = n;
    assert!(
        !net.relayed(a, b) && !net.relayed(b, a),
        "direct once the NATs allow it"
    );
    assert!(direct(&net) > 0);
    // No stall across the switch: every 100 ms a packet, and none missing for a second.
    let (got, _) = net.received(b, a);
    let mut seen: Vec<u64> = got.into_iter().filter(|n| *n > sent - 150).collect();
    seen.sort_unstable();
    let worst = seen
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(u64::MAX);
    assert!(
        worst <= 10,
        "the longest gap was {worst} packets (100 ms apart)"
    );
}

#[test]
fn two_robots_behind_one_nat_meet_on_the_lan_at_first_contact() {
    let mut net = Net::new(5);
    let (l, a, _) = fleet(&mut net, Some(EASY), None);
    // A second robot on the first one's LAN: the router does not hairpin, so the address
    // the relay sees is no use between them, but its LAN candidate is.
    let site = net.hosts[a].nat;
    let c = net.host(site);
    let at = Some(net.hosts[l].addr);
    net.know(c, l, at, true);
    net.know(l, c, None, true);
    net.uses_relay(c, l);
    net.send(c, l, 0, None);
    let t = net.now + 300;
    net.run_until(t);
    for (x, y) in [(a, c), (c, a)] {
        let (seen, lan) = (net.endpoint(l, y), net.hosts[y].addr);
        net.know_with(x, y, seen, true, vec![lan]);
    }
    net.send(a, c, 1, None);
    let t = net.now + 100;
    net.run_until(t);
    assert_eq!(net.received(c, a).0, vec![1], "met at once, over the LAN");
    assert_eq!(net.endpoint(c, a), Some(net.hosts[a].addr));
    assert_eq!(net.endpoint(a, c), Some(net.hosts[c].addr));
    assert!(!net.relayed(a, c));
}

/// Two public hosts that also share a LAN, reached over the internet first; the LAN
/// candidate comes with a later roster push. `lan_faster`: the LAN's delay is below the
/// internet's. Returns the network and the hosts after a handshake that races the paths.
fn rekey_race(lan_faster: bool) -> (Net, usize, usize) {
    let mut net = Net::new(6);
    net.delay = (20, 20);
    net.lan_delay = if lan_faster { 1 } else { 60 };
    let a = net.host(None);
    let b = net.host(None);
    for (h, n) in [(a, 1), (b, 2)] {
        net.hosts[h].lan = Some(SocketAddr::from(([10, 9, 0, n], PORT)));
    }
    let at = Some(net.hosts[b].addr);
    net.know(a, b, at, true);
    net.know(b, a, None, true);
    net.send(a, b, 1, None);
    net.run_until(200);
    assert_eq!(net.endpoint(a, b), at, "met over the internet");
    // The roster now names b's LAN address as a candidate: a handshake before
    // REKEY_RACE_AGAIN_MS still uses the path it has.
    let (key, lan) = (net.hosts[b].public_key(), net.hosts[b].lan);
    net.know_with(a, b, at, true, lan.into_iter().collect());
    let rekey = |net: &mut Net| {
        let table = net.hosts[a].shell.table.load();
        let (slot, peer) = table.by_key(&key).expect("b");
        assert!(engine::rehandshake(&net.hosts[a].shell, slot, peer));
        net.pump(a);
    };
    rekey(&mut net);
    let t = net.now + 500;
    net.run_until(t);
    assert_eq!(net.endpoint(a, b), at, "no race within REKEY_RACE_AGAIN_MS");
    // The next rekey, minutes later, races every path of the endpoint's family.
    let t = net.now + super::path::REKEY_RACE_AGAIN_MS;
    net.run_until(t);
    rekey(&mut net);
    let t = net.now + 500;
    net.run_until(t);
    net.send(a, b, 2, None);
    net.send(b, a, 3, None);
    let t = net.now + 500;
    net.run_until(t);
    assert_eq!(net.received(b, a).0, vec![1, 2]);
    assert_eq!(net.received(a, b).0, vec![3]);
    (net, a, b)
}

#[test]
fn a_rekey_races_the_paths_and_a_faster_lan_that_appeared_wins() {
    let (net, a, b) = rekey_race(true);
    assert_eq!(net.endpoint(a, b), net.hosts[b].lan, "a sends over the LAN");
    assert_eq!(net.endpoint(b, a), net.hosts[a].lan, "and b follows");
}

#[test]
fn a_rekey_race_keeps_the_faster_internet_path_over_a_slow_lan() {
    let (net, a, b) = rekey_race(false);
    assert_eq!(net.endpoint(a, b), Some(net.hosts[b].addr));
    assert_eq!(net.endpoint(b, a), Some(net.hosts[a].addr));
}

#[test]
fn a_handshake_through_a_slow_relay_completes() {
    // 600 ms each way, so 2.4 s from an initiation through the relay to its answer: quick
    // retries must not outrun the answers (boringtun keeps two initiations in flight), and
    // the answering side must not be kept quiet by them.
    let mut net = Net::new(7);
    net.delay = (600, 600);
    let (l, a, b) = fleet(&mut net, Some(HARD), Some(HARD));
    let start = net.now;
    let mut n = 0;
    net.talk((l, a, b), &mut n, start + 20_000);
    assert!(net.relayed(a, b) && net.relayed(b, a));
    for (to, from) in [(b, a), (a, b)] {
        let got = net.received(to, from).0;
        let late = got.iter().filter(|x| (100..170).contains(*x)).count();
        assert!(
            late >= 65,
            "{late} of the 70 packets sent 10-17 s in arrived"
        );
    }
}

/// Which pairs can meet directly: a side behind an endpoint-dependent mapping (hard) sends
/// from a port nobody has seen, so the other side must be public or filter nothing (full
/// cone); anything else meets once both sides have sent to each other.
fn direct_possible(na: Option<NatKind>, nb: Option<NatKind>) -> bool {
    let opens_to_strangers = |k: Option<NatKind>| k.is_none() || k == Some(CONE);
    let ok =
        |me: Option<NatKind>, other: Option<NatKind>| me != Some(HARD) || opens_to_strangers(other);
    ok(na, nb) && ok(nb, na)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any pair of NATs, delays, loss and order of who starts: the pair ends direct exactly
    /// where the NATs allow it and relayed otherwise, packets flow both ways, the relay
    /// decrypts none of them, and every endpoint either side ever used belongs to the other.
    #[test]
    fn any_two_members_connect_direct_where_the_nats_allow_and_through_the_relay_otherwise(
        na in nat_kind(),
        nb in nat_kind(),
        seed in 1u64..u64::MAX,
        delay in (1u64..40, 0u64..30),
        loss in 0.0f64..0.05,
        b_starts_at in 0u64..3_000,
        mut rebind in proptest::option::of(0u64..20_000),
    ) {
        let mut net = Net::new(seed);
        net.delay = (delay.0, delay.0 + delay.1);
        let (l, a, b) = fleet(&mut net, na, nb);
        net.loss = loss;
        let start = net.now;
        let mut n = 0;
        let mut used = Vec::new();
        while net.now < start + 30_000 {
            n += 1;
            net.send(a, b, n, None);
            if net.now >= start + b_starts_at {
                net.send(b, a, n, None);
            }
            if n % 10 == 0 {
                net.refresh(l, &[a, b]);
            }
            if rebind.is_some_and(|t| net.now >= start + t) {
                // The first member's router forgets its mappings.
                rebind = None;
                if let Some(nat) = net.hosts[a].nat {
                    net.nats[nat].rebind();
                }
            }
            used.extend(net.endpoint(a, b).map(|e| (b, e)));
            used.extend(net.endpoint(b, a).map(|e| (a, e)));
            let t = net.now + 100;
            net.run_until(t);
        }
        let direct = !net.relayed(a, b) && !net.relayed(b, a);
        prop_assert_eq!(direct, direct_possible(na, nb), "direct: {}", direct);
        let (got, all) = net.received(b, a);
        // Up to 5 % loss on each leg, two legs through a relay.
        let late = got.iter().filter(|x| **x + 50 > n).count();
        prop_assert!(late >= 30, "{} of the last 50 packets arrived", late);
        prop_assert_eq!(all, got.len(), "only the member's own packets reached the TUN");
        prop_assert_eq!(foreign(&net, b), 0);
        let back = net.received(a, b).0.iter().filter(|x| **x + 50 > n).count();
        prop_assert!(back >= 30, "{} of the last 50 packets came back", back);
        prop_assert_eq!(foreign(&net, l), 0, "the relay decrypted none of it");
        for (whose, e) in used {
            let h = &net.hosts[whose];
            let theirs = e == h.addr
                || h.nat.is_some_and(|nat| e.ip() == IpAddr::V4(net.nats[nat].public()));
            prop_assert!(theirs, "an endpoint of host {} was {}", whose, e);
        }
    }
}

#[test]
fn two_sides_that_move_to_the_relay_at_once_while_both_send_complete_a_handshake() {
    // Both initiate through the relay at the same moment, some relayed handshake messages
    // are lost, and each side sends a packet every 100 ms, faster than the relayed round
    // trip (about 130 ms): a packet encapsulated between answering the other's handshake
    // and its confirmation would start another handshake and replace this side's own, on
    // both sides, for as long as both send (0 of 30 arrived before `CONFIRM_WAIT_MS`).
    let mut net = Net::new(1866554956208797302);
    net.delay = (29, 35);
    let (l, a, b) = fleet(&mut net, Some(HARD), Some(EASY));
    net.loss = 0.0257;
    let start = net.now;
    let mut n = 0;
    net.talk((l, a, b), &mut n, start + 6_000);
    assert!(net.relayed(a, b) && net.relayed(b, a));
    for (to, from) in [(b, a), (a, b)] {
        let got = net.received(to, from).0;
        let between = got.iter().filter(|x| (20..50).contains(*x)).count();
        assert!(
            between >= 28,
            "{between} of the 30 packets sent 2-5 s in arrived"
        );
    }
}
