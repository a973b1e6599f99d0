//! The packet engine: every decision the packet path makes, without a socket, a device or a
//! clock of its own. Which peer a datagram belongs to (receiver index or handshake), the
//! allowed-IPs check, the firewall and multicast caps, endpoint and path updates from
//! authenticated datagrams only, relay framing and forwarding, first-contact copies, IPv6
//! offers, many-port steps, and boringtun's timers. Time comes in through `Engine::now_ms`
//! (the I/O shell sets it once per wake-up); datagrams go out, and decapsulated packets go to
//! the TUN, through the shell's `Io`. The data-plane thread (`dataplane.rs`) implements `Io`
//! over epoll, `recvmmsg`/GSO and the TUN; `sim.rs` implements it over an in-memory network
//! with NAT models, where the tests drive several engines with virtual time.

use super::batch::{Batcher, HANDSHAKE_INIT_LEN, OVERHEAD};
use super::manyports::{self, Ports, Step};
use super::path::{Direct, Seen, Tick};
use super::{multicast, relay, MeshHook, Peer, PeerChangeError, PeerTable};
use crate::mesh::wire::Leg;
use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult};
use boringtun::x25519;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tun_rs::GROTable;

/// Where the engine's output goes: datagrams to the network, decapsulated packets to the TUN.
/// The engine's state is reached through it (`Deref`), so one reference carries both.
pub(crate) trait Io: std::ops::Deref<Target = Engine> {
    /// Sends `contents` (one datagram, or equal segments of `segment` bytes) to `to`.
    fn send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>);
    /// Writes the packets gathered in `out` to the TUN and empties it.
    fn write_tun(&self, out: &mut TunWriter);
}

/// The packet path's state: the peers, this node's keys, and what the tunnel is configured
/// to do. Shared by the data-plane thread and the control tasks.
pub(crate) struct Engine {
    /// Loaded per packet batch; replaced whole on every change.
    pub table: ArcSwap<PeerTable>,
    /// Serialises changes to `table`, so two changes never race and lose one.
    table_writer: Mutex<()>,
    /// Wakes the control task when the peers change.
    pub table_changed: tokio::sync::Notify,
    pub static_private: x25519::StaticSecret,
    pub static_public: x25519::PublicKey,
    /// The socket reaches IPv6 (dual-stack) as well as IPv4.
    pub udp_is_v6: bool,
    /// Checks mac1 of every handshake message and, past its rate, asks for a cookie (mac2),
    /// before any Diffie-Hellman work is spent on the datagram.
    pub handshakes: Arc<RateLimiter>,
    /// This node's first IPv4 overlay address: the source of its mesh control messages.
    pub overlay_v4: Option<Ipv4Addr>,
    /// Set once a mesh controller runs.
    pub mesh: std::sync::OnceLock<MeshHook>,
    /// `[firewall]`: only the data-plane thread takes the lock (the API reads through it).
    pub firewall: Option<Mutex<FirewallState>>,
    /// `[multicast]`: only the data-plane thread takes the lock.
    pub multicast: Option<Mutex<multicast::Replicator>>,
    /// The data plane's clock: milliseconds since `epoch`, read once per wake-up (per-packet
    /// path decisions need no finer time, and no clock read per packet).
    pub epoch: Instant,
    pub clock_ms: AtomicU64,
    /// The relays this node may send through, in order of preference (its lighthouses that
    /// said they relay); empty: every peer is reached directly.
    pub relays: ArcSwap<Vec<[u8; 32]>>,
    /// `[relay]`: this node forwards members' datagrams; only the data-plane thread locks it.
    pub relay: Option<Mutex<relay::Relay>>,
    /// What this node does in a many-port try (`manyports::Role`, from its own NAT).
    pub many_ports: AtomicU8,
    /// `[probe].interval_ms`: how often a peer without its own cadence is probed.
    pub probe_interval: Duration,
}

/// Handshake messages per second the node takes before it asks senders for a cookie (what
/// boringtun's own device uses).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

impl Engine {
    /// An engine for `static_private` with `table`'s peers, no firewall, multicast or relay
    /// (the caller sets those it is configured with).
    pub fn new(
        static_private: x25519::StaticSecret,
        table: PeerTable,
        udp_is_v6: bool,
        overlay_v4: Option<Ipv4Addr>,
        probe_interval: Duration,
    ) -> Engine {
        let static_public = x25519::PublicKey::from(&static_private);
        Engine {
            table: ArcSwap::from_pointee(table),
            table_writer: Mutex::new(()),
            table_changed: tokio::sync::Notify::new(),
            handshakes: Arc::new(RateLimiter::new(&static_public, HANDSHAKE_RATE_LIMIT)),
            static_private,
            static_public,
            udp_is_v6,
            overlay_v4,
            mesh: std::sync::OnceLock::new(),
            firewall: None,
            multicast: None,
            epoch: Instant::now(),
            clock_ms: AtomicU64::new(1),
            relays: ArcSwap::from_pointee(Vec::new()),
            relay: None,
            many_ports: AtomicU8::new(0),
            probe_interval,
        }
    }

    /// The data plane's clock (`clock_ms`); never 0, which path state reads as "never".
    pub fn now_ms(&self) -> u64 {
        self.clock_ms.load(Ordering::Relaxed).max(1)
    }

    /// The engine's clock as an `Instant`, for the firewall's and multicast's own timers.
    pub fn instant(&self) -> Instant {
        self.epoch + Duration::from_millis(self.now_ms())
    }

    /// Reads the clock again (the data-plane thread, once per wake-up).
    pub(super) fn tick_clock(&self) -> u64 {
        let now = (self.epoch.elapsed().as_millis() as u64).max(1);
        self.clock_ms.store(now, Ordering::Relaxed);
        now
    }

    pub(super) fn change(
        &self,
        f: impl FnOnce(&PeerTable) -> Result<Option<PeerTable>, PeerChangeError>,
    ) -> Result<bool, PeerChangeError> {
        let _writer = self.table_writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.table.load_full();
        match f(&current)? {
            Some(next) => {
                self.table.store(Arc::new(next));
                self.table_changed.notify_one();
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// The first byte of a WireGuard handshake initiation (message type 1, little-endian).
pub(super) const HANDSHAKE_INIT: u8 = 1;
/// The first byte of a WireGuard handshake response (message type 2).
pub(super) const HANDSHAKE_RESPONSE: u8 = 2;
/// The first byte of a WireGuard cookie reply (message type 3).
pub(super) const COOKIE_REPLY: u8 = 3;
/// The first byte of a WireGuard data message (type 4).
pub(super) const DATA: u8 = 4;
/// Encapsulates one packet from the TUN into the open GSO batch (or a new one): its peer by
/// route, the firewall, then `Batcher::push`.
pub(super) fn encapsulate(shared: &impl Io, packet: &[u8], batcher: &mut Batcher) {
    let Some(dst) = Tunn::dst_address(packet) else {
        return;
    };
    if dst.is_multicast() {
        replicate(shared, packet, batcher);
        return;
    }
    let table = shared.table.load();
    let Some(peer) = table.route(dst).and_then(|p| table.get(p)) else {
        // The mesh may find who holds it (a member outside this node's roster).
        if let Some(hook) = shared.mesh.get() {
            let _ = hook.misses.try_send(dst);
        }
        return;
    };
    if !firewall_allows(shared, packet, peer, false) {
        return;
    }
    push(shared, peer, packet, batcher);
}

/// One packet for `peer` on its path: into the GSO batch for its endpoint, or encapsulated
/// on its own and framed for its relay.
pub(super) fn push(shared: &impl Io, peer: &Peer, packet: &[u8], batcher: &mut Batcher) {
    peer.path.sending.store(true, Ordering::Relaxed);
    // A member never heard from goes on its own too: what comes out may be the handshake
    // initiation that `transmit` sends to every candidate.
    if peer.path.relayed.load(Ordering::Relaxed) || (peer.spec.certified && !peer.endpoint_proven())
    {
        let mut out = vec![0u8; (packet.len() + OVERHEAD).max(HANDSHAKE_INIT_LEN)];
        let len = match peer.tunn.lock() {
            Ok(mut t) => {
                if awaiting_confirmation(shared, peer, &t) {
                    metrics::counter!("myelin_tunnel_awaiting_handshake_dropped_total")
                        .increment(1);
                    return;
                }
                match t.encapsulate(packet, &mut out) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => return,
                }
            }
            Err(_) => return,
        };
        peer.tx_packets.fetch_add(1, Ordering::Relaxed);
        if let Some(p) = out.get(..len) {
            transmit(shared, peer, p);
        }
        return;
    }
    let Some(to) = peer.endpoint() else { return };
    batcher.push(peer, to, packet, &mut |to, contents, segment| {
        shared.send(to, contents, segment)
    });
}

/// Where a datagram came from: straight from the network, or out of a relay's frame (`via`
/// the relay's key, `at` the relay's own address).
#[derive(Clone, Copy, Debug)]
pub(super) enum Source {
    Direct(SocketAddr),
    Relayed { via: [u8; 32], at: SocketAddr },
}

impl Source {
    fn addr(self) -> SocketAddr {
        match self {
            Source::Direct(a) | Source::Relayed { at: a, .. } => a,
        }
    }
}

/// Sends one datagram to `peer` on its path: to its endpoint, or through its relay. False
/// when it has neither.
pub(super) fn transmit(shared: &impl Io, peer: &Peer, datagram: &[u8]) -> bool {
    match peer.path.relay() {
        Some(via) => {
            if datagram.first() == Some(&HANDSHAKE_INIT) {
                peer.path
                    .relay_handshake_at
                    .store(shared.now_ms(), Ordering::Relaxed);
            }
            relay_out(shared, &via, &peer.public_key_bytes, datagram)
        }
        None => match peer.endpoint() {
            Some(to) => {
                shared.send(to, datagram, None);
                if datagram.first() == Some(&HANDSHAKE_INIT) {
                    first_contact(shared, peer, to, datagram);
                }
                true
            }
            None => false,
        },
    }
}

/// A handshake initiation just sent to `endpoint` of a member goes to its other candidates
/// too (`path::first_contact`). Never heard from: once per attempt (boringtun repeats an
/// unanswered initiation every 5 s), and again only minutes later, since the candidates are
/// the member's own word. Already reached: a rekey races its paths of the endpoint's family
/// (`path::REKEY_RACE_AGAIN_MS`), and the answer's source is the fastest.
pub(super) fn first_contact(
    shared: &impl Io,
    peer: &Peer,
    endpoint: SocketAddr,
    initiation: &[u8],
) {
    if !peer.spec.certified {
        return;
    }
    let proven = peer.endpoint_proven();
    let again = if proven {
        super::path::REKEY_RACE_AGAIN_MS
    } else {
        super::path::FIRST_CONTACT_AGAIN_MS
    };
    let now = shared.now_ms();
    let last = peer.path.first_contact_at.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < again {
        return;
    }
    peer.path
        .first_contact_at
        .store(now.max(1), Ordering::Relaxed);
    let copies = super::path::first_contact(endpoint, &peer.spec.candidates, shared.udp_is_v6)
        .filter(|c| !proven || c.is_ipv4() == endpoint.is_ipv4());
    for also in copies {
        if proven {
            metrics::counter!("myelin_path_rekey_race_copies_total").increment(1);
        } else {
            metrics::counter!("myelin_path_first_contact_copies_total").increment(1);
        }
        shared.send(also, initiation, None);
    }
}

/// An answer to a datagram from `source`: back the way it came.
pub(super) fn reply(shared: &impl Io, peer: &Peer, source: Source, datagram: &[u8]) {
    match source {
        Source::Direct(to) => shared.send(to, datagram, None),
        Source::Relayed { via, .. } => {
            relay_out(shared, &via, &peer.public_key_bytes, datagram);
        }
    }
}

/// Frames `datagram` for `target` and sends it to relay `via` inside the tunnel with it,
/// straight to the relay's endpoint (a relay is never reached through another).
pub(super) fn relay_out(
    shared: &impl Io,
    via: &[u8; 32],
    target: &[u8; 32],
    datagram: &[u8],
) -> bool {
    let table = shared.table.load();
    let Some((_, relay)) = table.by_key(via) else {
        return false;
    };
    metrics::counter!("myelin_relayed_bytes_total", "direction" => "out")
        .increment(datagram.len() as u64);
    let frame = crate::mesh::wire::relay_frame(Leg::ToRelay, target, datagram);
    control_packet(shared, relay, &frame, Route::Direct)
}

/// A relay frame from member `sender` for `target`: forwarded inside the target's tunnel,
/// framed with the sender's key, when both are certified members and the sender is within
/// its rate.
pub(super) fn forward(
    shared: &impl Io,
    table: &PeerTable,
    sender: &Peer,
    target: &[u8; 32],
    datagram: &[u8],
) {
    let Some(relay) = &shared.relay else {
        return;
    };
    let verdict = (|| {
        use super::relay::Refused;
        if !sender.spec.certified {
            return Err(Refused::NotMember);
        }
        if *target == sender.public_key_bytes || *target == shared.static_public.to_bytes() {
            return Err(Refused::Loop);
        }
        // Only WireGuard messages (types 1-4) travel: anything else is nobody's datagram.
        if !matches!(datagram.first(), Some(1..=4)) {
            return Err(Refused::NotWireGuard);
        }
        let (_, to) = table.by_key(target).ok_or(Refused::UnknownTarget)?;
        if !to.spec.certified || to.path.relayed.load(Ordering::Relaxed) {
            return Err(Refused::UnknownTarget);
        }
        // Never queued for a member without a session (offline, or its session expired):
        // boringtun would hold up to 256 frames per target until it came back.
        let session = to
            .tunn
            .lock()
            .is_ok_and(|t| t.time_since_last_handshake().is_some());
        if !session {
            return Err(Refused::UnknownTarget);
        }
        let mut relay = relay.lock().map_err(|_| Refused::UnknownTarget)?;
        if !relay.admit(&sender.public_key_bytes, datagram.len(), shared.now_ms()) {
            return Err(Refused::OverRate);
        }
        Ok(to)
    })();
    match verdict {
        Ok(to) => {
            let frame =
                crate::mesh::wire::relay_frame(Leg::FromRelay, &sender.public_key_bytes, datagram);
            if control_packet(shared, to, &frame, Route::Direct) {
                metrics::counter!("myelin_relay_bytes_total").increment(datagram.len() as u64);
            }
        }
        Err(why) => {
            metrics::counter!("myelin_relay_refused_total", "reason" => why.label()).increment(1);
            tracing::debug!(from = %sender.name, "relay refused: {}", why.label());
        }
    }
}

/// An authenticated datagram from `peer` came from `source`: its endpoint and path follow.
pub(super) fn heard(shared: &impl Io, peer: &Peer, source: Source) {
    let now = shared.now_ms();
    let link = &peer.path;
    match source {
        Source::Direct(from) => {
            link.direct_rx.store(now, Ordering::Relaxed);
            if !link.relayed.load(Ordering::Relaxed) {
                if peer.saw(from, now) {
                    probe_direct(shared, peer, from);
                }
                return;
            }
            let verdict = match link.state.lock() {
                Ok(mut s) => {
                    let v = s.heard_direct(from, now);
                    link.relayed.store(s.relay().is_some(), Ordering::Relaxed);
                    v
                }
                Err(_) => return,
            };
            match verdict {
                Direct::Follow => {
                    peer.saw(from, now);
                }
                Direct::Upgrade => {
                    peer.saw(from, now);
                    path_changed(peer, "direct", &from.to_string());
                }
                Direct::ManyPorts => {
                    peer.saw(from, now);
                    metrics::counter!("myelin_path_many_port_found_total").increment(1);
                    path_changed(
                        peer,
                        "direct",
                        &format!("{from}, found by many-port probing"),
                    );
                }
                Direct::Probe(to) => probe_direct(shared, peer, to),
                Direct::Ignore => {}
            }
        }
        Source::Relayed { via, .. } => {
            link.relayed_rx.store(now, Ordering::Relaxed);
            let direct_rx = link.direct_rx.load(Ordering::Relaxed);
            let moved = match link.state.lock() {
                Ok(mut s) => {
                    // Of two sides on different relays, the one with the larger key follows.
                    let yields = yields_to(shared, peer);
                    let moved = s.heard_relayed(via, direct_rx, now, yields);
                    link.relayed.store(s.relay().is_some(), Ordering::Relaxed);
                    moved
                }
                Err(_) => return,
            };
            if moved {
                path_changed(peer, "relay", &relay_name(shared, &via));
            }
        }
    }
}

pub(super) fn relay_name(shared: &impl Io, via: &[u8; 32]) -> String {
    match shared.table.load().by_key(via) {
        Some((_, p)) => p.name.clone(),
        None => crate::mesh::cert::hex(&via[..6]),
    }
}

pub(super) fn path_changed(peer: &Peer, to: &'static str, detail: &str) {
    metrics::counter!("myelin_path_changes_total", "to" => to).increment(1);
    tracing::info!(peer = %peer.name, "path: {to} ({detail})");
}

/// A keepalive straight to `to` under the current session (never a handshake: that would
/// replace the one in flight through the relay).
pub(super) fn probe_direct(shared: &impl Io, peer: &Peer, to: SocketAddr) {
    let mut out = [0u8; HANDSHAKE_INIT_LEN + 64];
    if let Some(p) = keepalive(peer, &mut out) {
        shared.send(to, p, None);
    }
}

/// A keepalive under `peer`'s current session; none without one.
pub(super) fn keepalive<'a>(peer: &Peer, out: &'a mut [u8]) -> Option<&'a [u8]> {
    let mut t = peer.tunn.lock().ok()?;
    t.time_since_last_handshake()?;
    match t.encapsulate(&[], out) {
        TunnResult::WriteToNetwork(p) if p.first() == Some(&DATA) => Some(p),
        _ => None,
    }
}

/// The easy side's share of a many-port try this tick: one keepalive (the same datagram;
/// the peer accepts the first copy that reaches it) to each port of `ip`.
pub(super) fn spray(shared: &impl Io, peer: &Peer, ip: Ipv4Addr, ports: Ports) {
    let mut out = [0u8; HANDSHAKE_INIT_LEN + 64];
    let Some(p) = keepalive(peer, &mut out) else {
        return;
    };
    let mut sent = 0;
    for port in ports {
        shared.send(SocketAddr::new(IpAddr::V4(ip), port), p, None);
        sent += 1;
    }
    metrics::counter!("myelin_path_many_port_probes_total").increment(sent);
}

/// A many-port try a peer's path asked for on the hard side (`manyports::Step::Open`).
pub(super) struct OpenPorts {
    pub(super) peer: [u8; 32],
    pub(super) to: SocketAddr,
    pub(super) until: u64,
}
/// A multicast packet from the TUN: one copy, inside WireGuard, to every member that
/// `[multicast]` sends its group to and that takes part in the group. Without `[multicast]`
/// nothing (a group is nobody's overlay address, so it is never looked up in the mesh).
pub(super) fn replicate(shared: &impl Io, packet: &[u8], batcher: &mut Batcher) {
    let Some(state) = &shared.multicast else {
        return;
    };
    let table = shared.table.load();
    let (group, targets): (IpAddr, Vec<usize>) = {
        let Ok(mut replicator) = state.lock() else {
            return;
        };
        let group = match replicator.outbound(packet, shared.instant()) {
            Ok(group) => group,
            Err(drop) => {
                metrics::counter!("myelin_multicast_dropped_total", "direction" => "out", "reason" => drop.label())
                    .increment(1);
                return;
            }
        };
        let targets = table
            .iter()
            .filter(|(_, p)| replicator.wants(group, &p.name, &p.spec.groups, &p.spec.multicast))
            .map(|(slot, _)| slot)
            .collect();
        (group, targets)
    };
    let label = group.to_string();
    metrics::counter!("myelin_multicast_packets_total", "direction" => "out", "group" => label.clone())
        .increment(1);
    let mut copies = 0u64;
    for peer in targets.into_iter().filter_map(|slot| table.get(slot)) {
        if !firewall_allows(shared, packet, peer, false) {
            continue;
        }
        if peer.endpoint().is_none() && !peer.path.relayed.load(Ordering::Relaxed) {
            continue;
        }
        push(shared, peer, packet, batcher);
        copies += 1;
    }
    metrics::counter!("myelin_multicast_replicas_total", "group" => label.clone())
        .increment(copies);
    metrics::counter!("myelin_multicast_bytes_total", "direction" => "out", "group" => label)
        .increment(copies * packet.len() as u64);
}

/// Whether a multicast packet from a member goes to the TUN: only groups `[multicast]` takes
/// part in, within their caps.
pub(super) fn multicast_accepts(shared: &impl Io, packet: &[u8]) -> bool {
    let verdict = match &shared.multicast {
        None => Err(super::multicast::Drop::NotConfigured),
        Some(state) => match state.lock() {
            Ok(mut replicator) => replicator.inbound(packet, shared.instant()),
            Err(_) => return false,
        },
    };
    match verdict {
        Ok(group) => {
            let label = group.to_string();
            metrics::counter!("myelin_multicast_packets_total", "direction" => "in", "group" => label.clone())
                .increment(1);
            metrics::counter!("myelin_multicast_bytes_total", "direction" => "in", "group" => label)
                .increment(packet.len() as u64);
            true
        }
        Err(drop) => {
            metrics::counter!("myelin_multicast_dropped_total", "direction" => "in", "reason" => drop.label())
                .increment(1);
            false
        }
    }
}

/// Which peer a verified datagram belongs to. Only a handshake initiation that passed the mac1
/// (and, under load, cookie) check costs a Diffie-Hellman step here.
pub(super) fn find_peer(
    shared: &impl Io,
    table: &PeerTable,
    packet: &Packet,
    from: Option<SocketAddr>,
) -> Option<usize> {
    match packet {
        Packet::HandshakeInit(init) => {
            metrics::counter!("myelin_tunnel_handshake_dh_total").increment(1);
            let half =
                parse_handshake_anon(&shared.static_private, &shared.static_public, init).ok()?;
            match table.by_key(&half.peer_static_public) {
                Some((slot, _)) => Some(slot),
                // Through a relay only members already known: the relay vouched for the
                // sender, not for a stranger's handshake.
                None => restricted_peer(shared, table, half.peer_static_public, from?),
            }
        }
        Packet::HandshakeResponse(r) => Some((r.receiver_idx >> 8) as usize),
        Packet::PacketCookieReply(c) => Some((c.receiver_idx >> 8) as usize),
        Packet::PacketData(d) => Some((d.receiver_idx >> 8) as usize),
    }
}

/// A mesh node answers a handshake from a key it does not know with a restricted peer: no
/// allowed IPs, so only mesh control messages (its certificate) get through, until the mesh
/// admits it. Their number is capped; the mesh controller expires the ones never admitted.
pub(super) fn restricted_peer(
    shared: &impl Io,
    table: &PeerTable,
    key: [u8; 32],
    from: SocketAddr,
) -> Option<usize> {
    if !shared.mesh.get().is_some_and(|m| m.accept_unknown) {
        return None;
    }
    let restricted = table
        .iter()
        .filter(|(_, p)| p.allowed_ips.is_empty())
        .count();
    if restricted >= super::MAX_RESTRICTED {
        metrics::counter!("myelin_mesh_restricted_refused_total").increment(1);
        return None;
    }
    let spec = super::PeerSpec {
        name: format!("pending-{}", crate::mesh::cert::hex(&key[..6])),
        public_key: key,
        allowed_ips: Vec::new(),
        endpoint: Some(from),
        // The keepalive a mesh peer gets, so that admitting it keeps this very session (an
        // update with another keepalive would start a fresh `Tunn`).
        persistent_keepalive: Some(crate::mesh::control::MESH_KEEPALIVE),
        probe_interval: None,
        idles: false,
        groups: Vec::new(),
        multicast: Vec::new(),
        certified: false,
        behind_nat: false,
        candidates: Vec::new(),
    };
    let key_of = spec.public_key;
    // The mesh may have admitted this key since `table` was loaded: never overwrite a peer.
    let made = shared.change(|t| match t.by_key(&key_of) {
        Some(_) => Ok(None),
        None => t.upsert(&shared.static_private, spec),
    });
    match made {
        Ok(_) => shared.table.load().by_key(&key_of).map(|(slot, _)| slot),
        Err(e) => {
            tracing::debug!("no restricted peer for an unknown key: {e}");
            None
        }
    }
}

/// The UDP payload of a mesh control message (IPv4 or IPv6 UDP to `MESH_PORT`), if it is one.
pub(super) fn mesh_payload(packet: &[u8]) -> Option<&[u8]> {
    let (udp_at, proto) = match packet.first()? >> 4 {
        4 => (usize::from(packet.first()? & 0x0f) * 4, *packet.get(9)?),
        6 => (40, *packet.get(6)?),
        _ => return None,
    };
    if proto != 17 {
        return None;
    }
    let udp = packet.get(udp_at..)?;
    let dst_port = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    if dst_port != crate::mesh::wire::MESH_PORT {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    udp.get(8..len)
}

/// Drops the session with `peer` and starts a new handshake now: the other side may have
/// restarted and lost the session this side still holds. What is sent until the handshake
/// completes waits for the new session instead of going out under the dead one.
pub(super) fn rehandshake(shared: &impl Io, slot: usize, peer: &Peer) -> bool {
    if peer.endpoint().is_none() && peer.path.relay().is_none() {
        return false;
    }
    let mut out = [0u8; HANDSHAKE_INIT_LEN];
    let len = match peer.tunn.lock() {
        Ok(mut t) => {
            *t = Peer::fresh_tunn(&shared.static_private, &peer.spec, slot);
            match t.format_handshake_initiation(&mut out, false) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => return false,
            }
        }
        Err(_) => return false,
    };
    if let Some(p) = out.get(..len) {
        transmit(shared, peer, p);
    }
    true
}

/// Sends `peer` a keepalive under the current session (a handshake initiation where there is
/// none) from wherever this node is now: the peer moves its endpoint on it, as on any
/// authenticated datagram. False when the peer has no endpoint.
pub(super) fn announce(shared: &impl Io, peer: &Peer) -> bool {
    if peer.endpoint().is_none() && peer.path.relay().is_none() {
        return false;
    }
    let mut out = [0u8; HANDSHAKE_INIT_LEN + 64];
    let len = match peer.tunn.lock() {
        Ok(mut t) => match t.encapsulate(&[], &mut out) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return false,
        },
        Err(_) => return false,
    };
    out.get(..len).is_some_and(|p| transmit(shared, peer, p))
}

/// Wraps `payload` in IPv4/UDP from this node's overlay address to the peer's, and sends it
/// through the peer's tunnel.
pub(super) fn send_control(shared: &impl Io, peer: &Peer, payload: &[u8]) -> bool {
    control_packet(shared, peer, payload, Route::Path)
}

/// How a control packet leaves: on the peer's path (perhaps a relay), or straight to its
/// endpoint (relay frames: a relay is never reached through another).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Path,
    Direct,
}

pub(super) fn control_packet(shared: &impl Io, peer: &Peer, payload: &[u8], route: Route) -> bool {
    let (Some(src), Some(IpAddr::V4(dst))) = (
        shared.overlay_v4,
        peer.probe_addr
            .or_else(|| peer.allowed_ips.first().map(|n| n.addr())),
    ) else {
        tracing::debug!(peer = %peer.name, "no IPv4 overlay path for a mesh message");
        return false;
    };
    let relayed = route == Route::Path && peer.path.relayed.load(Ordering::Relaxed);
    if peer.endpoint().is_none() && !relayed {
        return false;
    }
    let port = crate::mesh::wire::MESH_PORT.to_be_bytes();
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let (Ok(total16), Ok(udp16)) = (u16::try_from(total), u16::try_from(udp_len)) else {
        return false;
    };
    let mut packet = Vec::with_capacity(total);
    packet.extend_from_slice(&[0x45, 0]);
    packet.extend_from_slice(&total16.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    packet.extend_from_slice(&src.octets());
    packet.extend_from_slice(&dst.octets());
    let checksum = ipv4_checksum(&packet);
    packet[10..12].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(&port);
    packet.extend_from_slice(&port);
    packet.extend_from_slice(&udp16.to_be_bytes());
    // IPv4 allows a zero UDP checksum; WireGuard's tag already covers the bytes.
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(payload);
    let mut out = vec![0u8; (total + OVERHEAD).max(HANDSHAKE_INIT_LEN)];
    let len = match peer.tunn.lock() {
        Ok(mut t) => {
            if awaiting_confirmation(shared, peer, &t) {
                return false;
            }
            match t.encapsulate(&packet, &mut out) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => return true,
            }
        }
        Err(_) => return false,
    };
    let Some(p) = out.get(..len) else {
        return false;
    };
    match (route, peer.endpoint()) {
        (Route::Path, _) => transmit(shared, peer, p),
        (Route::Direct, Some(to)) => {
            shared.send(to, p, None);
            true
        }
        (Route::Direct, None) => false,
    }
}

pub(super) fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Checks a datagram before any peer state sees it: malformed packets and handshakes with a
/// bad mac1 are dropped; past the handshake rate, a handshake without a valid cookie is
/// answered with a cookie reply (to `from`, which needs no trust) and goes no further.
pub(super) fn verify<'a>(
    shared: &impl Io,
    from: SocketAddr,
    datagram: &'a [u8],
    reply: &mut [u8],
) -> Option<Packet<'a>> {
    match shared
        .handshakes
        .verify_packet(Some(from.ip()), datagram, reply)
    {
        Ok(packet) => Some(packet),
        Err(TunnResult::WriteToNetwork(cookie)) => {
            metrics::counter!("myelin_tunnel_handshake_refused_total", "reason" => "under_load")
                .increment(1);
            // Through a relay there is no address to answer: the sender retries.
            shared.send(from, cookie, None);
            None
        }
        Err(TunnResult::Err(WireGuardError::InvalidMac)) => {
            metrics::counter!("myelin_tunnel_handshake_refused_total", "reason" => "mac1")
                .increment(1);
            None
        }
        Err(_) => None,
    }
}

/// Decapsulated packets on their way to the TUN, and the buffers that hold them.
pub(super) struct TunWriter {
    pub(super) bufs: Vec<Vec<u8>>,
    pub(super) ready: usize,
    pub(super) off: usize,
    pub(super) reply: Vec<u8>,
    pub(super) gro: GROTable,
}

impl TunWriter {
    /// Room for `batch` packets of up to 64 KB after `off` bytes of header.
    pub(super) fn new(batch: usize, off: usize) -> TunWriter {
        TunWriter {
            bufs: (0..batch)
                .map(|_| Vec::with_capacity(off + 65536))
                .collect(),
            ready: 0,
            off,
            // Room for a handshake answer, and for a queued packet of any MTU on its way out.
            reply: vec![0u8; 65535 + OVERHEAD],
            gro: GROTable::default(),
        }
    }
}

/// One datagram: decapsulated into the next TUN buffer, or answered.
pub(super) fn receive_datagram(
    shared: &impl Io,
    out: &mut TunWriter,
    from: SocketAddr,
    datagram: &[u8],
) {
    let Some(packet) = verify(shared, from, datagram, &mut out.reply) else {
        return;
    };
    if let Some(Decapsulated::Relayed {
        via,
        from,
        datagram,
    }) = receive_packet(shared, out, packet, Source::Direct(from), datagram)
    {
        receive_relayed(shared, out, via, from, &datagram);
    }
}

/// A datagram that relay `via` (at `at`) framed as coming from member `from`: decapsulated
/// like a direct one, answered through the relay.
pub(super) fn receive_relayed(
    shared: &impl Io,
    out: &mut TunWriter,
    (via, at): ([u8; 32], SocketAddr),
    from: [u8; 32],
    datagram: &[u8],
) {
    metrics::counter!("myelin_relayed_bytes_total", "direction" => "in")
        .increment(datagram.len() as u64);
    // Relays are reached directly: a relay naming itself or another relay is refused.
    if from == via || shared.relays.load().contains(&from) {
        return;
    }
    let packet = match shared
        .handshakes
        .verify_packet(Some(at.ip()), datagram, &mut out.reply)
    {
        Ok(packet) => packet,
        // Under load: the cookie goes back the way the handshake came.
        Err(TunnResult::WriteToNetwork(cookie)) => {
            metrics::counter!("myelin_tunnel_handshake_refused_total", "reason" => "under_load")
                .increment(1);
            relay_out(shared, &via, &from, cookie);
            return;
        }
        Err(_) => return,
    };
    let table = shared.table.load();
    let Some(idx) = find_peer(shared, &table, &packet, None) else {
        return;
    };
    // The relay said who sent it; a datagram of another member's session, or of a peer
    // that is not a certified member, is dropped.
    if table
        .get(idx)
        .is_none_or(|p| p.public_key_bytes != from || !p.spec.certified)
    {
        return;
    }
    // A frame inside a frame is never unpacked again.
    let _ = receive_packet(shared, out, packet, Source::Relayed { via, at }, datagram);
}

/// What `decapsulate` made of a datagram.
pub(super) enum Decapsulated {
    /// Nothing for the TUN (answered, refused, or a control message handed on).
    Nothing,
    /// A packet for the TUN, in the next buffer.
    Packet,
    /// A relay this node uses framed a member's datagram: `via` (the relay and its address),
    /// `from` (the member it says sent it).
    Relayed {
        via: ([u8; 32], SocketAddr),
        from: [u8; 32],
        datagram: Vec<u8>,
    },
}

/// A verified datagram: its peer, then `decapsulate` into the next TUN buffer.
pub(super) fn receive_packet(
    shared: &impl Io,
    out: &mut TunWriter,
    packet: Packet,
    source: Source,
    datagram: &[u8],
) -> Option<Decapsulated> {
    let mut table = shared.table.load();
    let direct = match source {
        Source::Direct(a) => Some(a),
        Source::Relayed { .. } => None,
    };
    let idx = find_peer(shared, &table, &packet, direct)?;
    if table.get(idx).is_none() {
        // A restricted peer was just made for this handshake.
        table = shared.table.load();
    }
    let peer = table.get(idx)?;
    if out.ready == out.bufs.len() {
        shared.write_tun(out);
    }
    let buf = out.bufs.get_mut(out.ready)?;
    // Only the length matters: decapsulation overwrites the packet and tun-rs writes the
    // virtio-net header, so the old bytes need no zeroing on every packet.
    buf.resize(out.off + datagram.len(), 0);
    let authenticates = !matches!(packet, Packet::PacketCookieReply(_));
    let outcome = decapsulate(
        shared,
        (&table, peer, idx),
        source,
        (datagram, authenticates),
        buf,
        out.off,
        &mut out.reply,
    );
    if let Decapsulated::Packet = outcome {
        out.ready += 1;
    }
    Some(outcome)
}

/// Sends what `peer`'s session queued while it had none.
fn send_queued(shared: &impl Io, peer: &Peer, buf: &mut [u8]) {
    loop {
        let queued = match peer.tunn.lock() {
            Ok(mut t) => match t.decapsulate(None, &[], buf) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => break,
            },
            Err(_) => break,
        };
        // Along the peer's path (a flush after a direct probe must not bypass its relay).
        if let Some(r) = buf.get(..queued) {
            transmit(shared, peer, r);
        }
    }
}

/// The session this side answered a handshake for is confirmed (an authenticated datagram
/// under it came): the wait ends, and what queued meanwhile goes out.
fn confirmed(shared: &impl Io, peer: &Peer, buf: &mut [u8]) {
    if peer.path.responded_at.load(Ordering::Relaxed) != 0 {
        peer.path.responded_at.store(0, Ordering::Relaxed);
        send_queued(shared, peer, buf);
    }
}

/// Decapsulates one verified datagram into `buf[off..]`; true when it holds a packet for the
/// TUN. The peer's endpoint follows `from` only when the datagram proved the peer's key: a
/// data packet (keepalives included) or a handshake message that `Tunn` accepted. A cookie
/// reply proves nothing (anyone who knows a public key can make one), and neither does a
/// handshake that `Tunn` answered with a cookie reply; `datagram.1` is false for the former.
pub(super) fn decapsulate(
    shared: &impl Io,
    (table, peer, idx): (&PeerTable, &Peer, usize),
    source: Source,
    (datagram, authenticates): (&[u8], bool),
    buf: &mut Vec<u8>,
    off: usize,
    reply: &mut [u8],
) -> Decapsulated {
    let from = source.addr();
    let Some(dst) = buf.get_mut(off..) else {
        return Decapsulated::Nothing;
    };
    enum Outcome {
        Packet(usize, IpAddr),
        Reply(usize),
        Nothing,
        Rejected,
    }
    let outcome = match peer.tunn.lock() {
        Err(_) => Outcome::Rejected,
        Ok(mut t) => match t.decapsulate(Some(from.ip()), datagram, dst) {
            TunnResult::WriteToTunnelV4(p, src) => Outcome::Packet(p.len(), IpAddr::V4(src)),
            TunnResult::WriteToTunnelV6(p, src) => Outcome::Packet(p.len(), IpAddr::V6(src)),
            TunnResult::WriteToNetwork(p) => {
                let len = p.len();
                match (reply.get_mut(..len), dst.get(..len)) {
                    (Some(r), Some(d)) => {
                        r.copy_from_slice(d);
                        Outcome::Reply(len)
                    }
                    _ => Outcome::Rejected,
                }
            }
            TunnResult::Done => Outcome::Nothing,
            TunnResult::Err(e) => {
                tracing::trace!(peer = %peer.name, "rejected datagram from {from}: {e:?}");
                Outcome::Rejected
            }
        },
    };
    match outcome {
        Outcome::Rejected => Decapsulated::Nothing,
        Outcome::Nothing => {
            if authenticates {
                heard(shared, peer, source);
                confirmed(shared, peer, reply);
            }
            Decapsulated::Nothing
        }
        Outcome::Reply(len) => {
            let cookie = reply.first() == Some(&COOKIE_REPLY);
            let response = reply.first() == Some(&HANDSHAKE_RESPONSE);
            if authenticates && !cookie {
                heard(shared, peer, source);
            }
            if let Some(r) = reply.get(..len) {
                self::reply(shared, peer, source, r);
            }
            if response {
                peer.path
                    .responded_at
                    .store(shared.now_ms(), Ordering::Relaxed);
            }
            // Packets queued while the handshake ran go out once this side holds a session:
            // not after a handshake response, whose session waits for the initiator's
            // confirmation. A packet sent meanwhile would start another handshake and drop
            // the one this side has in flight, so two sides that initiate at once (both
            // moving to a relay, an introduction) would undo each other's, again and again.
            if !response {
                send_queued(shared, peer, reply);
            }
            Decapsulated::Nothing
        }
        Outcome::Packet(len, src) => {
            heard(shared, peer, source);
            confirmed(shared, peer, reply);
            if let Some(hook) = shared.mesh.get() {
                if let Some(payload) = buf.get(off..off + len).and_then(mesh_payload) {
                    if let Some((leg, member, inner)) = crate::mesh::wire::parse_relay(payload) {
                        // A frame inside a frame is never unpacked; a relay forwards only what
                        // is on its way to it; a member unpacks only what its relays send.
                        match (source, leg) {
                            (Source::Relayed { .. }, _) => {}
                            (Source::Direct(_), Leg::ToRelay) => {
                                forward(shared, table, peer, member, inner);
                            }
                            (Source::Direct(at), Leg::FromRelay) => {
                                if shared.relays.load().contains(&peer.public_key_bytes) {
                                    return Decapsulated::Relayed {
                                        via: (peer.public_key_bytes, at),
                                        from: *member,
                                        datagram: inner.to_vec(),
                                    };
                                }
                            }
                        }
                        return Decapsulated::Nothing;
                    }
                    let datagram = super::ControlDatagram {
                        from: peer.public_key_bytes,
                        endpoint: match source {
                            Source::Direct(a) => Some(a),
                            Source::Relayed { .. } => None,
                        },
                        payload: payload.to_vec(),
                    };
                    if hook.tx.try_send(datagram).is_err() {
                        metrics::counter!("myelin_mesh_control_dropped_total").increment(1);
                    }
                    return Decapsulated::Nothing;
                }
            }
            // Cryptokey routing: the inner source must be one of this peer's allowed IPs.
            // The snapshot the peer came from: one table load per datagram.
            if table.route(src) != Some(idx) {
                tracing::debug!(peer = %peer.name, "dropped a packet from {src}, outside its allowed IPs");
                return Decapsulated::Nothing;
            }
            let Some(inner) = buf.get(off..off + len) else {
                return Decapsulated::Nothing;
            };
            if !firewall_allows(shared, inner, peer, true) {
                return Decapsulated::Nothing;
            }
            // After the firewall: what it refuses takes nothing from the group's cap.
            if super::multicast::destination(inner).is_some() && !multicast_accepts(shared, inner) {
                return Decapsulated::Nothing;
            }
            buf.truncate(off + len);
            peer.rx_packets.fetch_add(1, Ordering::Relaxed);
            Decapsulated::Packet
        }
    }
}

/// The firewall and when it last logged a drop (at most one line a second).
pub(crate) struct FirewallState {
    pub firewall: crate::policy::firewall::Firewall,
    last_log: Option<Instant>,
    /// Drops by cause, for `myelin firewall`.
    pub drops: std::collections::BTreeMap<&'static str, u64>,
}

impl FirewallState {
    pub fn new(rules: crate::policy::firewall::RuleSet) -> FirewallState {
        FirewallState {
            firewall: crate::policy::firewall::Firewall::new(Arc::new(rules), Instant::now()),
            last_log: None,
            drops: Default::default(),
        }
    }
}

/// Whether `[firewall]` lets `packet` through (no firewall: yes). Drops are counted by cause
/// and logged at most once a second.
pub(super) fn firewall_allows(shared: &impl Io, packet: &[u8], peer: &Peer, inbound: bool) -> bool {
    let Some(state) = &shared.firewall else {
        return true;
    };
    let Ok(mut state) = state.lock() else {
        return false;
    };
    let now = shared.instant();
    let identity = crate::policy::firewall::PeerIdentity {
        name: &peer.name,
        groups: &peer.spec.groups,
    };
    let verdict = if inbound {
        state.firewall.inbound(packet, &identity, now)
    } else {
        state.firewall.outbound(packet, &identity, now)
    };
    match verdict {
        Ok(()) => true,
        Err(drop) => {
            metrics::counter!("myelin_firewall_drops_total", "rule" => drop.label()).increment(1);
            *state.drops.entry(drop.label()).or_default() += 1;
            if state
                .last_log
                .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1))
            {
                state.last_log = Some(now);
                let s = crate::policy::firewall::summarize(packet);
                tracing::info!(
                    peer = %peer.name,
                    direction = if inbound { "in" } else { "out" },
                    cause = drop.label(),
                    "firewall dropped {:?}",
                    s.map(|s| format!("proto {} {}:{} -> {}:{}", s.proto, s.src, s.sport, s.dst, s.dport))
                );
            }
            false
        }
    }
}

/// Drives boringtun's timers: handshakes, retries, keepalives, session expiry; returns the
/// many-port tries the peers' paths ask this thread to open.
pub(super) fn timers(
    shared: &impl Io,
    buf: &mut [u8],
    since: u64,
    may_open: bool,
) -> Vec<OpenPorts> {
    if let Some(Ok(mut state)) = shared.firewall.as_ref().map(|f| f.lock()) {
        state.firewall.handle_timeout(shared.instant());
    }
    // The handshake rate is counted per second (the call is a no-op until a second passed).
    shared.handshakes.reset_count();
    let table = shared.table.load();
    for (_, peer) in table.iter() {
        let len = match peer.tunn.lock() {
            Ok(mut t) => match t.update_timers(buf) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => continue,
            },
            Err(_) => continue,
        };
        if let Some(p) = buf.get(..len) {
            transmit(shared, peer, p);
        }
    }
    paths(shared, &table, since, may_open)
}

/// A member reached directly over IPv4 is offered IPv6 now and then (`path::ipv6_offer`): a
/// keepalive to its IPv6 candidates, which it follows if IPv6 carries it.
pub(super) fn offer_ipv6(shared: &impl Io, peer: &Peer, now: u64) {
    let link = &peer.path;
    let endpoint = peer.endpoint();
    if endpoint.is_some_and(|e| e.is_ipv6()) {
        // Taken: should IPv6 fail later, the next offer waits the shortest time again.
        link.ipv6_offer_gap.store(0, Ordering::Relaxed);
        return;
    }
    let due = (
        link.next_ipv6_offer.load(Ordering::Relaxed),
        link.ipv6_offer_gap.load(Ordering::Relaxed),
    );
    let Some(offer) =
        super::path::ipv6_offer(endpoint, &peer.spec.candidates, shared.udp_is_v6, now, due)
    else {
        return;
    };
    link.next_ipv6_offer.store(offer.next, Ordering::Relaxed);
    link.ipv6_offer_gap.store(offer.gap, Ordering::Relaxed);
    metrics::counter!("myelin_path_ipv6_offers_total").increment(1);
    for to in offer.to {
        probe_direct(shared, peer, to);
    }
}

/// How long `peer`'s path may stay silent while something is sent (its probe cadence).
pub(super) fn dead_after(shared: &impl Io, peer: &Peer) -> u64 {
    let interval = peer.spec.probe_interval.unwrap_or(shared.probe_interval);
    super::path::dead_after(interval.as_millis() as u64)
}

/// Of two sides that would act at once (pick a relay, initiate through one), the one with the
/// larger key yields to the other.
fn yields_to(shared: &impl Io, peer: &Peer) -> bool {
    shared.static_public.to_bytes() > peer.public_key_bytes
}

/// Whether this side answered `peer`'s handshake within `path::CONFIRM_WAIT_MS`.
fn recently_responded(shared: &impl Io, peer: &Peer) -> bool {
    let at = peer.path.responded_at.load(Ordering::Relaxed);
    at != 0 && shared.now_ms().saturating_sub(at) < super::path::CONFIRM_WAIT_MS
}

/// Whether a packet for `peer` (its session `t`) must wait: this side answered the peer's
/// handshake a moment ago and the initiator has not confirmed the session yet. Encapsulating
/// now would make boringtun start a handshake of its own, which replaces the one this side
/// still has in flight; when both sides do that (both initiated at once and both send),
/// neither handshake ever completes. Dropped, as a packet without a session is.
fn awaiting_confirmation(shared: &impl Io, peer: &Peer, t: &Tunn) -> bool {
    recently_responded(shared, peer) && t.time_since_last_handshake().is_none()
}

/// A datagram to a peer just moved to a relay, through it: a keepalive under the session,
/// or a handshake initiation (sent again even while one is in flight) without one.
fn greet_through_relay(shared: &impl Io, peer: &Peer, session: bool) {
    let mut out = [0u8; HANDSHAKE_INIT_LEN + 64];
    let len = match peer.tunn.lock() {
        Ok(mut t) => {
            let made = if session {
                t.encapsulate(&[], &mut out)
            } else if recently_responded(shared, peer) {
                // The peer's handshake, answered a moment ago, completes the session.
                TunnResult::Done
            } else {
                t.format_handshake_initiation(&mut out, true)
            };
            match made {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => 0,
            }
        }
        Err(_) => 0,
    };
    if let Some(p) = out.get(..len).filter(|p| !p.is_empty()) {
        transmit(shared, peer, p);
    }
}

/// Each certified peer's path, once a tick: to a relay when the direct path went silent
/// (or never answered), and back when a direct try is answered. Without relays nothing is
/// judged; a peer that is itself a relay is always reached directly.
pub(super) fn paths(
    shared: &impl Io,
    table: &PeerTable,
    since: u64,
    mut may_open: bool,
) -> Vec<OpenPorts> {
    let relays = shared.relays.load();
    let now = shared.now_ms();
    let role = manyports::Role::from_u8(shared.many_ports.load(Ordering::Relaxed));
    let mut opens = Vec::new();
    // One peer's many-port step per tick at most: a spray is 256 datagrams a tick, and one
    // set of ports is open at a time.
    let mut may_spray = true;
    for (_, peer) in table.iter() {
        let link = &peer.path;
        if !peer.spec.certified || relays.contains(&peer.public_key_bytes) {
            continue;
        }
        let session = peer
            .tunn
            .lock()
            .is_ok_and(|t| t.time_since_last_handshake().is_some());
        if session && !link.relayed.load(Ordering::Relaxed) {
            offer_ipv6(shared, peer, now);
        }
        if relays.is_empty() && !link.relayed.load(Ordering::Relaxed) {
            continue;
        }
        let relay = link.relay();
        let sent = link.sending.swap(false, Ordering::Relaxed);
        let seen = Seen {
            now,
            since,
            sent,
            direct_rx: link.direct_rx.load(Ordering::Relaxed),
            relayed_rx: link.relayed_rx.load(Ordering::Relaxed),
            endpoint: peer.endpoint(),
            // Only a relayed peer's direct tries read them: where the lighthouses see it now
            // too, which differs from the endpoint it was last heard at once its NAT gave it
            // a new port (a filtering NAT on this side drops that port's datagrams until
            // this side has sent to it). An IPv4-only socket cannot send to IPv6 candidates.
            candidates: match relay {
                Some(_) => peer
                    .spec
                    .endpoint
                    .iter()
                    .chain(&peer.spec.candidates)
                    .filter(|c| shared.udp_is_v6 || c.is_ipv4())
                    .copied()
                    .collect(),
                None => Vec::new(),
            },
            session,
            dead_after: dead_after(shared, peer),
            relay_alive: relay.is_some_and(|via| {
                table.by_key(&via).is_some_and(|(_, r)| {
                    now.saturating_sub(r.path.direct_rx.load(Ordering::Relaxed))
                        < dead_after(shared, r)
                })
            }),
        };
        let (tick, relayed) = match link.state.lock() {
            Ok(mut s) => {
                let tick = s.tick(&seen, &relays);
                (tick, s.relay().is_some())
            }
            Err(_) => continue,
        };
        let was = link.relayed.swap(relayed, Ordering::Relaxed);
        match tick {
            Tick::Relay(via) => {
                path_changed(peer, "relay", &relay_name(shared, &via));
                // Tell the peer at once, through the relay: a keepalive under the session,
                // or a handshake where there is none. Both sides usually move at the same
                // moment, and two initiations that cross undo each other (boringtun keeps
                // two of its own in flight, and each one it answers displaces one): without
                // a session only the side with the smaller key initiates at once, and the
                // other waits a retry's time for the initiation to reach it.
                if session || !yields_to(shared, peer) {
                    greet_through_relay(shared, peer, session);
                } else {
                    link.relay_handshake_at.store(now, Ordering::Relaxed);
                }
            }
            Tick::TryDirect(targets) => {
                metrics::counter!("myelin_path_direct_tries_total").increment(1);
                for to in targets {
                    probe_direct(shared, peer, to);
                }
            }
            Tick::Stay => {
                if was && !relayed {
                    path_changed(peer, "direct", "no relay left");
                }
                // A handshake through the relay that went unanswered (lost at the switch, or
                // answered toward a mapping the peer's NAT just dropped) goes again a second
                // later while something waits to go, not after boringtun's 5 s.
                // Each retry waits twice as long as the last (1, 2, 4 s), so an answer that
                // takes longer than a second still finds its initiation among the two
                // boringtun remembers; from 8 s on, boringtun's own 5 s retry is sooner. A
                // side that answered the peer's initiation lately waits for its confirmation.
                let last = link.relay_handshake_at.load(Ordering::Relaxed);
                let tries = link.relay_handshake_tries.load(Ordering::Relaxed);
                let wait = super::path::RELAY_HANDSHAKE_AGAIN_MS << tries.min(3);
                if session {
                    if tries != 0 {
                        link.relay_handshake_tries.store(0, Ordering::Relaxed);
                    }
                } else if relayed
                    && sent
                    && tries < 3
                    && now.saturating_sub(last) >= wait
                    && !recently_responded(shared, peer)
                {
                    link.relay_handshake_tries
                        .store(tries + 1, Ordering::Relaxed);
                    greet_through_relay(shared, peer, false);
                }
            }
        }
        // One peer's many-port step per tick at most (see `may_spray`), none without a role.
        let may = match role {
            manyports::Role::Open => may_open,
            manyports::Role::Spray => may_spray,
            manyports::Role::Off => false,
        };
        if relayed && may {
            // Both the clock and the key vary the ports each try sprays.
            let seed = now
                ^ u64::from_le_bytes(
                    peer.public_key_bytes
                        .first_chunk::<8>()
                        .copied()
                        .unwrap_or_default(),
                );
            // Where the lighthouses see it now (not the last address a datagram came from, which
            // goes stale when the peer moves), and only behind a NAT: a public peer is reached
            // at its endpoint if at all.
            let endpoint = peer.spec.endpoint.filter(|_| peer.spec.behind_nat);
            let step = match link.state.lock() {
                Ok(mut s) => s.many_ports(role, (endpoint, session), (now, seed), true),
                Err(_) => Step::Nothing,
            };
            match step {
                Step::Nothing => {}
                Step::Open { to, until } => {
                    may_open = false;
                    opens.push(OpenPorts {
                        peer: peer.public_key_bytes,
                        to,
                        until,
                    });
                }
                Step::Spray { ip, ports } => {
                    may_spray = false;
                    spray(shared, peer, ip, ports);
                }
            }
        }
    }
    opens
}
