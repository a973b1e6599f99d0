//! The packet loop: one thread per node that sleeps in a level-triggered epoll on the TUN
//! device and the WireGuard socket and does the packet work itself. There is no async runtime
//! between the kernel's wake-up and the packet; one thread serves both directions, so an
//! answer the kernel queues while a packet is written to the TUN (an ICMP reply, a TCP ACK)
//! goes out without waking another thread; and a wake-up that brings one packet makes one
//! read, not a second one that finds nothing (docs/benchmarks.md has the layouts measured).
//! Outbound: TUN (GSO segments split by tun-rs) → urgent packets (`lanes::urgent`) at once,
//! the rest through a bounded bulk queue → route lookup → encapsulate → UDP, consecutive
//! same-size packets to one endpoint sent as one GSO batch. Inbound: UDP (GRO trains split by
//! stride, drained into batches; datagrams small enough to be urgent first, the bulk
//! `BULK_PER_TURN` at a time) → peer by receiver index or handshake →
//! decapsulate → allowed-IPs check → TUN, coalesced again with tun-rs's GRO table.
//! The thread also drives boringtun's timers. Buffers are allocated once; per-packet work
//! allocates nothing and never panics.

use super::batch::{Batcher, HANDSHAKE_INIT_LEN, OVERHEAD};
use super::lanes::{self, BulkQueue};
use super::manyports::{self, Ports, Step};
use super::path::{Direct, Seen, Tick};
use super::{DataPlaneShared, Peer, PeerTable};
use crate::mesh::wire::Leg;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult};
use rustix::buffer::spare_capacity;
use rustix::event::{epoll, PollFd, PollFlags, Timespec};
use std::io::{ErrorKind, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// The first byte of a WireGuard handshake initiation (message type 1, little-endian).
const HANDSHAKE_INIT: u8 = 1;
/// The first byte of a WireGuard cookie reply (message type 3).
const COOKIE_REPLY: u8 = 3;
/// The first byte of a WireGuard data message (type 4).
const DATA: u8 = 4;
/// Room for one UDP datagram (a GRO train or a single packet).
const RX_SLOT: usize = 65536;
const RX_BATCH: usize = 8;
const TIMER_TICK: Duration = Duration::from_millis(250);
/// How long one wait for room in the UDP send buffer lasts before the stop flag is checked.
const SEND_WAIT: Duration = Duration::from_millis(100);
/// Reads of one source per wake-up before the other source and the timers get their turn
/// (a TUN read is up to 64 KB, a UDP read up to `RX_BATCH` GRO trains).
const READS_PER_WAKE: usize = 16;

/// What an epoll event is about (its data).
pub(super) const TUN: u64 = 0;
pub(super) const UDP: u64 = 1;
pub(super) const STOP: u64 = 2;
/// From here up: many-port sockets (`AUX_BASE` + their slot in `Aux`).
const AUX_BASE: u64 = 1 << 32;

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Sends `contents` (one datagram, or equal segments of `segment` bytes) to `to`, waiting
/// for room in the socket's send buffer when it is full: from the WireGuard socket, or from
/// the socket a many-port try found for that address.
fn send(shared: &DataPlaneShared, to: SocketAddr, contents: &[u8], segment: Option<usize>) {
    if shared.aux_any.load(Ordering::Relaxed) {
        let routes = shared.aux_routes.load();
        if let Some((_, io)) = routes.iter().find(|(a, _)| *a == to) {
            match io.state.get() {
                Some(state) => send_on(shared, (&io.sock, state, false), to, contents, segment),
                // Not carrying the peer yet (a try's answer being judged): no GSO state.
                None => {
                    for datagram in contents.chunks(segment.unwrap_or(contents.len()).max(1)) {
                        let _ = io.sock.send_to(datagram, to);
                    }
                }
            }
            return;
        }
    }
    send_on(
        shared,
        (&shared.udp, &shared.udp_state, shared.udp_is_v6),
        to,
        contents,
        segment,
    );
}

fn send_on(
    shared: &DataPlaneShared,
    (udp, state, is_v6): (&std::net::UdpSocket, &quinn_udp::UdpSocketState, bool),
    to: SocketAddr,
    contents: &[u8],
    segment: Option<usize>,
) {
    let destination = match (to, is_v6) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        (other, _) => other,
    };
    let transmit = quinn_udp::Transmit {
        destination,
        ecn: None,
        contents,
        segment_size: segment.filter(|s| *s < contents.len()),
        src_ip: None,
    };
    loop {
        match state.try_send(udp.into(), &transmit) {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if shared.stopping() {
                    return;
                }
                let mut fds = [PollFd::new(udp, PollFlags::OUT)];
                let timeout = Timespec::try_from(SEND_WAIT).ok();
                if let Err(e) = rustix::event::poll(&mut fds, timeout.as_ref()) {
                    if e != rustix::io::Errno::INTR {
                        tracing::debug!("waiting for room in the UDP socket: {e}");
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::debug!("send to {to} failed: {e}");
                return;
            }
        }
    }
}

/// The data-plane thread's epoll (level-triggered) and its stop signal.
pub(super) struct Poller {
    epoll: OwnedFd,
    /// An eventfd; once written it stays readable, so every later wait returns `STOP`.
    stop: OwnedFd,
}

impl Poller {
    /// An epoll that watches the TUN and the UDP socket for input, and the stop eventfd.
    pub(super) fn new(shared: &DataPlaneShared) -> std::io::Result<Poller> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let stop = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        for (source, what) in [
            (shared.tun.as_fd(), TUN),
            (shared.udp.as_fd(), UDP),
            (stop.as_fd(), STOP),
        ] {
            epoll::add(
                &epoll,
                source,
                epoll::EventData::new_u64(what),
                epoll::EventFlags::IN,
            )?;
        }
        Ok(Poller { epoll, stop })
    }

    /// A handle that stops the thread waiting on this poller.
    pub(super) fn stopper(&self) -> std::io::Result<OwnedFd> {
        self.stop.try_clone()
    }
}

/// Wakes the data-plane thread so that it sees the stop flag.
pub(super) fn wake(stop: &OwnedFd) -> std::io::Result<()> {
    rustix::io::write(stop, &1u64.to_ne_bytes())?;
    Ok(())
}

/// Which sources are ready after one wait.
#[derive(Default)]
struct Ready {
    tun: bool,
    udp: bool,
    /// Many-port sockets that are readable (their slots); `aux_n` of them.
    aux: [usize; 4],
    aux_n: usize,
}

/// Waits until a source is readable or `timeout` passes; `None` when the loop should end
/// (stop requested or the epoll broke).
fn wait(
    shared: &DataPlaneShared,
    poller: &Poller,
    events: &mut Vec<epoll::Event>,
    timeout: Duration,
) -> Option<Ready> {
    events.clear();
    let timeout = Timespec::try_from(timeout).ok();
    match epoll::wait(&poller.epoll, spare_capacity(events), timeout.as_ref()) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return (!shared.stopping()).then(Ready::default),
        Err(e) => {
            tracing::error!("data plane epoll failed: {e}; the tunnel stops");
            return None;
        }
    }
    let mut ready = Ready::default();
    for event in events.iter() {
        match event.data.u64() {
            TUN => ready.tun = true,
            UDP => ready.udp = true,
            d if d >= AUX_BASE => {
                if let Some(slot) = ready.aux.get_mut(ready.aux_n) {
                    *slot = usize::try_from(d - AUX_BASE).unwrap_or(usize::MAX);
                    ready.aux_n += 1;
                }
            }
            _ => {}
        }
    }
    (!shared.stopping()).then_some(ready)
}
/// Reads the TUN into the two lanes: urgent packets are encrypted and sent as they are read,
/// bulk packets wait in `bulk` and go out `BULK_PER_TURN` at a time between reads.
struct TunReader {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    batcher: Batcher,
    bulk: BulkQueue,
}

/// How much bulk may wait for encryption: about 10 ms of the tunnel's throughput, less than
/// the kernel's TUN queue holds in 64 KB TSO segments, and enough that a TCP stream rarely
/// meets a full queue (each drop costs it throughput; urgent packets never wait here).
const BULK_LIMIT: usize = 4 << 20;
/// Bulk packets encrypted (or datagrams decrypted) per turn of the loop, before the TUN and
/// the socket are looked at again: one TSO read's worth, so an urgent packet waits at most
/// that long inside Myelin.
const BULK_PER_TURN: usize = 64;
/// Packets read from the TUN per turn at most: reading costs a copy, encrypting costs the
/// cipher, so the reader outpaces the encryptor and the kernel's queue stays empty.
const READ_BUDGET: usize = 256;

/// Packets one TUN read can split into: a 64 KB TSO segment of the smallest IPv6 MSS.
const SEGMENTS_PER_READ: usize = 64;

impl TunReader {
    fn new(shared: &DataPlaneShared) -> TunReader {
        // A segment never exceeds the MTU; the slack covers a device MTU raised by hand.
        let segment = shared.mtu.max(1500) + 256;
        TunReader {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
            bufs: vec![vec![0u8; segment]; SEGMENTS_PER_READ],
            sizes: vec![0usize; SEGMENTS_PER_READ],
            batcher: Batcher::new(
                65535 + shared.mtu + OVERHEAD,
                shared.udp_state.max_gso_segments().clamp(1, 64),
            ),
            bulk: BulkQueue::new(BULK_LIMIT),
        }
    }

    /// Reads the readable TUN: urgent packets are encapsulated and sent at once, the rest
    /// queued as bulk (dropped and counted when the queue is full, so that the kernel's queue
    /// never holds an urgent packet behind bulk). One read when it gave a single packet (the
    /// epoll is level-triggered and says whether more wait, which spares the latency path a
    /// read that finds nothing); more while reads bring TSO batches or bulk waits, up to
    /// `READ_BUDGET` packets.
    /// An error is the device's, not a packet's: the TUN was removed under the node.
    fn read(&mut self, shared: &DataPlaneShared) -> std::io::Result<()> {
        let mut read = 0;
        for _ in 0..READ_BUDGET {
            let n = match shared.tun.recv_multiple(
                &mut self.original,
                &mut self.bufs,
                &mut self.sizes,
                0,
            ) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error().is_some() => return Err(e),
                Err(e) => {
                    // One packet tun-rs could not split; the epoll says whether more wait.
                    tracing::debug!("TUN read: {e}");
                    return Ok(());
                }
            };
            for (buf, &len) in self.bufs.iter_mut().zip(self.sizes.iter()).take(n) {
                let Some(packet) = buf.get(..len) else {
                    continue;
                };
                if lanes::urgent(packet) {
                    encapsulate(shared, packet, &mut self.batcher);
                } else {
                    self.bulk.push(buf, len);
                }
            }
            self.batcher
                .flush(&mut |to, contents, segment| send(shared, to, contents, segment));
            let dropped = self.bulk.take_dropped();
            if dropped > 0 {
                metrics::counter!("myelin_tunnel_bulk_dropped_total", "direction" => "out")
                    .increment(dropped);
            }
            read += n;
            // Idle, one packet means the epoll knows whether more wait; under load the TUN
            // is drained (an urgent packet may be next in the kernel's queue).
            if (n < 2 && self.bulk.is_empty()) || read >= READ_BUDGET {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Encrypts and sends up to `BULK_PER_TURN` queued bulk packets.
    fn serve_bulk(&mut self, shared: &DataPlaneShared) {
        for _ in 0..BULK_PER_TURN {
            let Some((buf, len)) = self.bulk.pop() else {
                break;
            };
            if let Some(packet) = buf.get(..len) {
                encapsulate(shared, packet, &mut self.batcher);
            }
            self.bulk.recycle(buf);
        }
        self.batcher
            .flush(&mut |to, contents, segment| send(shared, to, contents, segment));
    }
}

/// Encapsulates one packet from the TUN into the open GSO batch (or a new one): its peer by
/// route, the firewall, then `Batcher::push`.
fn encapsulate(shared: &DataPlaneShared, packet: &[u8], batcher: &mut Batcher) {
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
fn push(shared: &DataPlaneShared, peer: &Peer, packet: &[u8], batcher: &mut Batcher) {
    peer.path.sending.store(true, Ordering::Relaxed);
    // A member never heard from goes on its own too: what comes out may be the handshake
    // initiation that `transmit` sends to every candidate.
    if peer.path.relayed.load(Ordering::Relaxed) || (peer.spec.certified && !peer.endpoint_proven())
    {
        let mut out = vec![0u8; (packet.len() + OVERHEAD).max(HANDSHAKE_INIT_LEN)];
        let len = match peer.tunn.lock() {
            Ok(mut t) => match t.encapsulate(packet, &mut out) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => return,
            },
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
        send(shared, to, contents, segment)
    });
}

/// Where a datagram came from: straight from the network, or out of a relay's frame (`via`
/// the relay's key, `at` the relay's own address).
#[derive(Clone, Copy, Debug)]
enum Source {
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
fn transmit(shared: &DataPlaneShared, peer: &Peer, datagram: &[u8]) -> bool {
    match peer.path.relay() {
        Some(via) => relay_out(shared, &via, &peer.public_key_bytes, datagram),
        None => match peer.endpoint() {
            Some(to) => {
                send(shared, to, datagram, None);
                if datagram.first() == Some(&HANDSHAKE_INIT) {
                    first_contact(shared, peer, to, datagram);
                }
                true
            }
            None => false,
        },
    }
}

/// A handshake initiation just sent to `endpoint` of a member never heard from goes to its
/// other candidates too (`path::first_contact`): once per attempt (boringtun repeats an
/// unanswered initiation every 5 s), and again only minutes later, since the candidates are
/// the member's own word.
fn first_contact(shared: &DataPlaneShared, peer: &Peer, endpoint: SocketAddr, initiation: &[u8]) {
    if !peer.spec.certified || peer.endpoint_proven() {
        return;
    }
    let now = shared.now_ms();
    let last = peer.path.first_contact_at.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < super::path::FIRST_CONTACT_AGAIN_MS {
        return;
    }
    peer.path
        .first_contact_at
        .store(now.max(1), Ordering::Relaxed);
    for also in super::path::first_contact(endpoint, &peer.spec.candidates, shared.udp_is_v6) {
        metrics::counter!("myelin_path_first_contact_copies_total").increment(1);
        send(shared, also, initiation, None);
    }
}

/// An answer to a datagram from `source`: back the way it came.
fn reply(shared: &DataPlaneShared, peer: &Peer, source: Source, datagram: &[u8]) {
    match source {
        Source::Direct(to) => send(shared, to, datagram, None),
        Source::Relayed { via, .. } => {
            relay_out(shared, &via, &peer.public_key_bytes, datagram);
        }
    }
}

/// Frames `datagram` for `target` and sends it to relay `via` inside the tunnel with it,
/// straight to the relay's endpoint (a relay is never reached through another).
fn relay_out(shared: &DataPlaneShared, via: &[u8; 32], target: &[u8; 32], datagram: &[u8]) -> bool {
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
fn forward(
    shared: &DataPlaneShared,
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
fn heard(shared: &DataPlaneShared, peer: &Peer, source: Source) {
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
                    let yields = shared.static_public.to_bytes() > peer.public_key_bytes;
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

fn relay_name(shared: &DataPlaneShared, via: &[u8; 32]) -> String {
    match shared.table.load().by_key(via) {
        Some((_, p)) => p.name.clone(),
        None => crate::mesh::cert::hex(&via[..6]),
    }
}

fn path_changed(peer: &Peer, to: &'static str, detail: &str) {
    metrics::counter!("myelin_path_changes_total", "to" => to).increment(1);
    tracing::info!(peer = %peer.name, "path: {to} ({detail})");
}

/// A keepalive straight to `to` under the current session (never a handshake: that would
/// replace the one in flight through the relay).
fn probe_direct(shared: &DataPlaneShared, peer: &Peer, to: SocketAddr) {
    let mut out = [0u8; HANDSHAKE_INIT_LEN + 64];
    if let Some(p) = keepalive(peer, &mut out) {
        send(shared, to, p, None);
    }
}

/// A keepalive under `peer`'s current session; none without one.
fn keepalive<'a>(peer: &Peer, out: &'a mut [u8]) -> Option<&'a [u8]> {
    let mut t = peer.tunn.lock().ok()?;
    t.time_since_last_handshake()?;
    match t.encapsulate(&[], out) {
        TunnResult::WriteToNetwork(p) if p.first() == Some(&DATA) => Some(p),
        _ => None,
    }
}

/// The easy side's share of a many-port try this tick: one keepalive (the same datagram;
/// the peer accepts the first copy that reaches it) to each port of `ip`.
fn spray(shared: &DataPlaneShared, peer: &Peer, ip: Ipv4Addr, ports: Ports) {
    let mut out = [0u8; HANDSHAKE_INIT_LEN + 64];
    let Some(p) = keepalive(peer, &mut out) else {
        return;
    };
    let mut sent = 0;
    for port in ports {
        send(shared, SocketAddr::new(IpAddr::V4(ip), port), p, None);
        sent += 1;
    }
    metrics::counter!("myelin_path_many_port_probes_total").increment(sent);
}

/// A many-port try a peer's path asked for on the hard side (`manyports::Step::Open`).
struct OpenPorts {
    peer: [u8; 32],
    to: SocketAddr,
    until: u64,
}

/// A many-port socket, and quinn-udp's state for it (GSO sends) once it carries a peer.
pub(crate) struct AuxIo {
    sock: std::net::UdpSocket,
    state: std::sync::OnceLock<quinn_udp::UdpSocketState>,
}

/// One many-port socket: one of a try's, or the one it found (`kept`), which carries the
/// peer's datagrams from then on.
struct AuxSocket {
    sock: Arc<AuxIo>,
    peer: [u8; 32],
    to: SocketAddr,
    kept: bool,
}

/// Sockets a many-port try found, kept at most (each carries one peer, and holds a
/// descriptor and a NAT mapping for as long).
const MAX_KEPT: usize = 32;

/// The many-port sockets, owned by the data-plane thread: at most one try at a time.
#[derive(Default)]
struct Aux {
    slots: Vec<Option<AuxSocket>>,
    /// The try in progress: its peer, and until when its sockets listen.
    trying: Option<([u8; 32], u64)>,
    buf: Vec<u8>,
}

/// Sends datagrams to `to` from `sock` from now on (none: from the WireGuard socket again).
fn set_aux_route(shared: &DataPlaneShared, to: SocketAddr, sock: Option<Arc<AuxIo>>) {
    let mut routes: Vec<(SocketAddr, Arc<AuxIo>)> = shared
        .aux_routes
        .load()
        .iter()
        .filter(|(a, _)| *a != to)
        .cloned()
        .collect();
    if let Some(sock) = sock {
        routes.push((to, sock));
    }
    let any = !routes.is_empty();
    shared.aux_routes.store(Arc::new(routes));
    shared.aux_any.store(any, Ordering::Relaxed);
}

impl Aux {
    /// Whether a try may open its sockets now: none is open, and fewer than `MAX_KEPT`
    /// sockets carry peers.
    fn may_open(&self) -> bool {
        self.trying.is_none()
            && self
                .slots
                .iter()
                .filter(|s| s.as_ref().is_some_and(|s| s.kept))
                .count()
                < MAX_KEPT
    }

    /// Closes `slot`'s socket: out of the epoll first (a send on another thread may still
    /// hold the socket a moment, and its readiness must not wake the thread meanwhile), and
    /// its route with it when it carried the peer.
    fn close(&mut self, shared: &DataPlaneShared, poller: &Poller, slot: usize) {
        let Some(s) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if let Err(e) = epoll::delete(&poller.epoll, &s.sock.sock) {
            tracing::debug!("many-port socket out of the epoll: {e}");
        }
        if s.kept {
            set_aux_route(shared, s.to, None);
        }
    }

    /// Opens the try's sockets; each sends a keepalive to the peer's public address, which
    /// the peer's NAT drops, but which opens a mapping in this node's NAT.
    fn open(&mut self, shared: &DataPlaneShared, poller: &Poller, open: OpenPorts) {
        if self.trying.is_some() {
            return;
        }
        let table = shared.table.load();
        let Some((_, peer)) = table.by_key(&open.peer) else {
            return;
        };
        let mut out = [0u8; HANDSHAKE_INIT_LEN + 64];
        let Some(datagram) = keepalive(peer, &mut out) else {
            return;
        };
        let mut opened = 0;
        for _ in 0..manyports::OPEN_SOCKETS {
            let sock = match std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!("many-port try: cannot open another socket: {e}");
                    break;
                }
            };
            if sock.set_nonblocking(true).is_err() {
                continue;
            }
            let slot = match self.slots.iter().position(Option::is_none) {
                Some(free) => free,
                None => {
                    self.slots.push(None);
                    self.slots.len() - 1
                }
            };
            let data = epoll::EventData::new_u64(AUX_BASE + slot as u64);
            if epoll::add(&poller.epoll, &sock, data, epoll::EventFlags::IN).is_err() {
                continue;
            }
            let _ = sock.send_to(datagram, open.to);
            if let Some(s) = self.slots.get_mut(slot) {
                *s = Some(AuxSocket {
                    sock: Arc::new(AuxIo {
                        sock,
                        state: std::sync::OnceLock::new(),
                    }),
                    peer: open.peer,
                    to: open.to,
                    kept: false,
                });
                opened += 1;
            }
        }
        metrics::counter!("myelin_path_many_port_tries_total").increment(1);
        tracing::info!(
            peer = %peer.name,
            "many-port try: {opened} ports opened toward {}",
            open.to
        );
        if opened > 0 {
            self.trying = Some((open.peer, open.until));
        }
    }

    /// Reads the readable many-port sockets (`ready`: their slots): datagrams from the peer's
    /// address only. The first on a try's socket that moves the peer off its relay (only an
    /// authenticated datagram does) keeps that socket for the peer and closes the others.
    fn receive(
        &mut self,
        shared: &DataPlaneShared,
        poller: &Poller,
        writer: &mut TunWriter,
        ready: &[usize],
    ) {
        if self.buf.is_empty() {
            self.buf = vec![0u8; RX_SLOT];
        }
        let mut found = None;
        'slots: for &i in ready {
            for _ in 0..READS_PER_WAKE {
                let Some(s) = self.slots.get(i).and_then(Option::as_ref) else {
                    break;
                };
                let Ok((n, from)) = s.sock.sock.recv_from(&mut self.buf) else {
                    break;
                };
                let from = canonical(from);
                let Some(datagram) = self.buf.get(..n).filter(|_| from == s.to) else {
                    continue;
                };
                if s.kept {
                    receive_datagram(shared, writer, from, datagram);
                    continue;
                }
                let table = shared.table.load();
                let Some((_, peer)) = table.by_key(&s.peer) else {
                    continue;
                };
                // A try answers only for a relayed peer: for one already direct, nothing
                // here would prove the datagram authentic.
                if !peer.path.relayed.load(Ordering::Relaxed) {
                    continue;
                }
                // Anything answered while this datagram is judged leaves by its socket.
                set_aux_route(shared, from, Some(s.sock.clone()));
                receive_datagram(shared, writer, from, datagram);
                if !peer.path.relayed.load(Ordering::Relaxed) {
                    found = Some(i);
                    break 'slots;
                }
                set_aux_route(shared, from, None);
            }
        }
        write_tun(shared, writer);
        if let Some(i) = found {
            self.keep(shared, poller, i);
        }
    }

    /// Closes the sockets of `key`'s try that found nothing (a kept one stays).
    fn end_try(&mut self, shared: &DataPlaneShared, poller: &Poller, key: [u8; 32]) {
        for j in 0..self.slots.len() {
            let open = self
                .slots
                .get(j)
                .and_then(Option::as_ref)
                .is_some_and(|s| !s.kept && s.peer == key);
            if open {
                self.close(shared, poller, j);
            }
        }
        self.trying = None;
    }

    fn keep(&mut self, shared: &DataPlaneShared, poller: &Poller, i: usize) {
        let Some(Some(winner)) = self.slots.get_mut(i) else {
            return;
        };
        winner.kept = true;
        // It carries the peer's traffic from now on: buffers like the WireGuard socket's, and
        // GSO sends.
        let io = &winner.sock;
        let sock = socket2::SockRef::from(&io.sock);
        for size in [4 << 20, 1 << 20] {
            if sock.set_send_buffer_size(size).is_ok() && sock.set_recv_buffer_size(size).is_ok() {
                break;
            }
        }
        match quinn_udp::UdpSocketState::new((&io.sock).into()) {
            Ok(state) => {
                let _ = io.state.set(state);
                // quinn-udp turns receive offload (GRO) on; this socket is read one datagram
                // at a time, so a coalesced train must not arrive as one.
                use std::os::fd::AsRawFd;
                let off: libc::c_int = 0;
                // SAFETY: setsockopt on a socket `io` owns, with a c_int that lives across the
                // call and its exact size.
                let done = unsafe {
                    libc::setsockopt(
                        io.sock.as_raw_fd(),
                        libc::SOL_UDP,
                        libc::UDP_GRO,
                        (&off as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if done != 0 {
                    tracing::debug!("many-port socket: GRO stays on");
                }
            }
            Err(e) => tracing::debug!("many-port socket without GSO: {e}"),
        }
        let (key, to) = (winner.peer, winner.to);
        let port = winner.sock.sock.local_addr().map(|a| a.port()).unwrap_or(0);
        self.end_try(shared, poller, key);
        if let Some((_, peer)) = shared.table.load().by_key(&key) {
            tracing::info!(peer = %peer.name, "many-port try: direct to {to} from local port {port}");
            // The other side takes it as the answer to its spray.
            probe_direct(shared, peer, to);
        }
    }

    /// Once a tick: a try whose time is up closes its sockets; a kept socket whose peer left,
    /// went back to a relay or moved is closed.
    fn tick(&mut self, shared: &DataPlaneShared, poller: &Poller, now: u64) {
        if let Some((key, until)) = self.trying {
            if now > until {
                self.end_try(shared, poller, key);
                tracing::debug!("many-port try: no port answered");
            }
        }
        if self.slots.is_empty() {
            return;
        }
        let table = shared.table.load();
        let obsolete: Vec<usize> = (0..self.slots.len())
            .filter(|j| {
                self.slots
                    .get(*j)
                    .and_then(Option::as_ref)
                    .is_some_and(|s| {
                        s.kept
                            && table.by_key(&s.peer).is_none_or(|(_, p)| {
                                p.path.relayed.load(Ordering::Relaxed) || p.endpoint() != Some(s.to)
                            })
                    })
            })
            .collect();
        for j in obsolete {
            self.close(shared, poller, j);
        }
        while self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }
    }
}

/// A multicast packet from the TUN: one copy, inside WireGuard, to every member that
/// `[multicast]` sends its group to and that takes part in the group. Without `[multicast]`
/// nothing (a group is nobody's overlay address, so it is never looked up in the mesh).
fn replicate(shared: &DataPlaneShared, packet: &[u8], batcher: &mut Batcher) {
    let Some(state) = &shared.multicast else {
        return;
    };
    let table = shared.table.load();
    let (group, targets): (IpAddr, Vec<usize>) = {
        let Ok(mut replicator) = state.lock() else {
            return;
        };
        let group = match replicator.outbound(packet, Instant::now()) {
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
fn multicast_accepts(shared: &DataPlaneShared, packet: &[u8]) -> bool {
    let verdict = match &shared.multicast {
        None => Err(super::multicast::Drop::NotConfigured),
        Some(state) => match state.lock() {
            Ok(mut replicator) => replicator.inbound(packet, Instant::now()),
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
fn find_peer(
    shared: &DataPlaneShared,
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
fn restricted_peer(
    shared: &DataPlaneShared,
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
fn mesh_payload(packet: &[u8]) -> Option<&[u8]> {
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
pub(super) fn rehandshake(shared: &DataPlaneShared, slot: usize, peer: &Peer) -> bool {
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
pub(super) fn announce(shared: &DataPlaneShared, peer: &Peer) -> bool {
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
pub(super) fn send_control(shared: &DataPlaneShared, peer: &Peer, payload: &[u8]) -> bool {
    control_packet(shared, peer, payload, Route::Path)
}

/// How a control packet leaves: on the peer's path (perhaps a relay), or straight to its
/// endpoint (relay frames: a relay is never reached through another).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Path,
    Direct,
}

fn control_packet(shared: &DataPlaneShared, peer: &Peer, payload: &[u8], route: Route) -> bool {
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
        Ok(mut t) => match t.encapsulate(&packet, &mut out) {
            TunnResult::WriteToNetwork(p) => p.len(),
            _ => return true,
        },
        Err(_) => return false,
    };
    let Some(p) = out.get(..len) else {
        return false;
    };
    match (route, peer.endpoint()) {
        (Route::Path, _) => transmit(shared, peer, p),
        (Route::Direct, Some(to)) => {
            send(shared, to, p, None);
            true
        }
        (Route::Direct, None) => false,
    }
}

fn ipv4_checksum(header: &[u8]) -> u16 {
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
fn verify<'a>(
    shared: &DataPlaneShared,
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
            send(shared, from, cookie, None);
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
struct TunWriter {
    bufs: Vec<Vec<u8>>,
    ready: usize,
    off: usize,
    reply: Vec<u8>,
    gro: GROTable,
}

/// One `recvmmsg` worth of datagrams, and how far its bulk has been decrypted.
struct RxBatch {
    slots: Box<[[u8; RX_SLOT]; RX_BATCH]>,
    meta: [quinn_udp::RecvMeta; RX_BATCH],
    received: usize,
    /// Where decryption of the bulk resumes: a GRO train and a byte offset in it.
    train: usize,
    at: usize,
}

/// Batches of received datagrams: the socket is drained into them, urgent-sized datagrams
/// are decrypted at once, and the bulk waits in `queued` (oldest first) to be decrypted
/// `BULK_PER_TURN` at a time, so an urgent datagram overtakes up to this many batches of bulk.
const RX_BATCHES: usize = 3;

/// The inbound half's buffers, allocated once.
struct Inbound {
    batches: Vec<RxBatch>,
    queued: std::collections::VecDeque<usize>,
    free: Vec<usize>,
    writer: TunWriter,
}

impl Inbound {
    fn idle(&self) -> bool {
        self.queued.is_empty()
    }
}

/// The data-plane thread: waits for the TUN, the UDP socket, the next timer tick or the stop
/// signal, and serves whatever is ready.
pub(super) fn run(shared: Arc<DataPlaneShared>, poller: Poller) {
    let mut events = Vec::with_capacity(8);
    let mut batches = Vec::with_capacity(RX_BATCHES);
    for _ in 0..RX_BATCHES {
        // Zeroed memory comes untouched from the kernel: an idle node pays for none of it.
        let Ok(slots): Result<Box<[[u8; RX_SLOT]; RX_BATCH]>, _> =
            vec![[0u8; RX_SLOT]; RX_BATCH].into_boxed_slice().try_into()
        else {
            tracing::error!("cannot allocate receive buffers; the tunnel stops");
            return;
        };
        batches.push(RxBatch {
            slots,
            meta: [quinn_udp::RecvMeta::default(); RX_BATCH],
            received: 0,
            train: 0,
            at: 0,
        });
    }
    let off = if shared.offload {
        VIRTIO_NET_HDR_LEN
    } else {
        0
    };
    let mut inbound = Inbound {
        batches,
        queued: std::collections::VecDeque::with_capacity(RX_BATCHES),
        free: (0..RX_BATCHES).rev().collect(),
        writer: TunWriter {
            bufs: (0..IDEAL_BATCH_SIZE)
                .map(|_| Vec::with_capacity(off + 65536))
                .collect(),
            ready: 0,
            off,
            reply: vec![0u8; 2048],
            gro: GROTable::default(),
        },
    };
    let mut reader = TunReader::new(&shared);
    let mut timer_buf = vec![0u8; 2048];
    let mut aux = Aux::default();
    let mut next_tick = Instant::now() + TIMER_TICK;
    let mut last_tick = shared.tick_clock();
    loop {
        // Queued bulk means more work now: look at the sources without sleeping.
        let timeout = if reader.bulk.is_empty() && inbound.idle() {
            next_tick.saturating_duration_since(Instant::now())
        } else {
            Duration::ZERO
        };
        let Some(ready) = wait(&shared, &poller, &mut events, timeout) else {
            return;
        };
        shared.tick_clock();
        if ready.udp {
            receive(&shared, &mut inbound);
        }
        if ready.aux_n > 0 {
            let slots = ready.aux.get(..ready.aux_n).unwrap_or_default();
            aux.receive(&shared, &poller, &mut inbound.writer, slots);
        }
        if ready.tun {
            if let Err(e) = reader.read(&shared) {
                // A level-triggered epoll would report the broken device forever.
                tracing::error!(
                    "the TUN device failed ({e}): outbound traffic stops; restart the node \
                     (was the interface deleted by hand?)"
                );
                if let Err(e) = epoll::delete(&poller.epoll, &shared.tun) {
                    tracing::error!(
                        "cannot stop watching the failed TUN device: {e}; the tunnel stops"
                    );
                    return;
                }
            }
        }
        serve_inbound(&shared, &mut inbound);
        reader.serve_bulk(&shared);
        let now = Instant::now();
        if now >= next_tick {
            reader.bulk.shrink_when_empty();
            for open in timers(&shared, &mut timer_buf, last_tick, aux.may_open()) {
                aux.open(&shared, &poller, open);
            }
            last_tick = shared.now_ms();
            aux.tick(&shared, &poller, last_tick);
            next_tick = now + TIMER_TICK;
        }
    }
}

/// Drains the readable UDP socket into free batches: one `recvmmsg`, more (up to
/// `READS_PER_WAKE`) while they come back full. Datagrams small enough to carry an urgent
/// packet (an ACK, a ping, a probe, a handshake) are decrypted and written to the TUN at
/// once; the rest is queued for `serve_inbound`.
fn receive(shared: &DataPlaneShared, io: &mut Inbound) {
    for _ in 0..READS_PER_WAKE {
        // With every batch holding bulk the rest waits in the kernel's queue: dropping
        // backlog here to read on costs a TCP stream a third of its throughput, and an
        // urgent datagram waits at most for one batch's decryption.
        let Some(idx) = io.free.pop() else {
            return;
        };
        let Some(batch) = io.batches.get_mut(idx) else {
            return;
        };
        let received = {
            let mut iovs = batch.slots.each_mut().map(|b| IoSliceMut::new(b));
            shared
                .udp_state
                .recv((&shared.udp).into(), &mut iovs, &mut batch.meta)
        };
        let n = match received {
            Ok(n) => n,
            Err(e) => {
                io.free.push(idx);
                match e.kind() {
                    ErrorKind::WouldBlock => return,
                    ErrorKind::Interrupted => continue,
                    // ICMP errors (port unreachable) surface here and leave the socket usable.
                    _ => {
                        tracing::debug!("UDP receive: {e}");
                        return;
                    }
                }
            }
        };
        batch.received = n;
        batch.train = 0;
        batch.at = 0;
        for (slot, m) in batch.slots.iter().zip(batch.meta.iter()).take(n) {
            let from = canonical(m.addr);
            let Some(data) = slot.get(..m.len) else {
                continue;
            };
            for datagram in data.chunks(stride(m)) {
                if datagram.len() <= lanes::URGENT_MAX_DATAGRAM {
                    receive_datagram(shared, &mut io.writer, from, datagram);
                }
            }
        }
        write_tun(shared, &mut io.writer);
        io.queued.push_back(idx);
        if n < RX_BATCH {
            return;
        }
    }
}

/// The size of each datagram in a received GRO train (one datagram: its length).
fn stride(m: &quinn_udp::RecvMeta) -> usize {
    let stride = if m.stride == 0 { m.len } else { m.stride };
    stride.max(1)
}

/// Decrypts up to `BULK_PER_TURN` queued bulk datagrams, oldest first, and writes them to
/// the TUN.
fn serve_inbound(shared: &DataPlaneShared, io: &mut Inbound) {
    let mut budget = BULK_PER_TURN;
    while budget > 0 {
        let Some(&idx) = io.queued.front() else {
            break;
        };
        let Some(batch) = io.batches.get_mut(idx) else {
            io.queued.pop_front();
            continue;
        };
        while budget > 0 && batch.train < batch.received {
            let (Some(m), Some(slot)) = (batch.meta.get(batch.train), batch.slots.get(batch.train))
            else {
                // Out of range cannot happen (received <= RX_BATCH); retire the batch rather
                // than spin on it.
                batch.train = batch.received;
                break;
            };
            let end = (batch.at + stride(m)).min(m.len);
            let datagram = slot.get(batch.at..end).unwrap_or_default();
            if end >= m.len {
                batch.train += 1;
                batch.at = 0;
            } else {
                batch.at = end;
            }
            if datagram.len() > lanes::URGENT_MAX_DATAGRAM {
                receive_datagram(shared, &mut io.writer, canonical(m.addr), datagram);
                budget -= 1;
            }
        }
        if batch.train >= batch.received {
            io.queued.pop_front();
            io.free.push(idx);
        }
    }
    write_tun(shared, &mut io.writer);
}

/// One datagram: decapsulated into the next TUN buffer, or answered.
fn receive_datagram(
    shared: &DataPlaneShared,
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
fn receive_relayed(
    shared: &DataPlaneShared,
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
enum Decapsulated {
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
fn receive_packet(
    shared: &DataPlaneShared,
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
        write_tun(shared, out);
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

/// Decapsulates one verified datagram into `buf[off..]`; true when it holds a packet for the
/// TUN. The peer's endpoint follows `from` only when the datagram proved the peer's key: a
/// data packet (keepalives included) or a handshake message that `Tunn` accepted. A cookie
/// reply proves nothing (anyone who knows a public key can make one), and neither does a
/// handshake that `Tunn` answered with a cookie reply; `datagram.1` is false for the former.
fn decapsulate(
    shared: &DataPlaneShared,
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
            }
            Decapsulated::Nothing
        }
        Outcome::Reply(len) => {
            let cookie = reply.first() == Some(&COOKIE_REPLY);
            if authenticates && !cookie {
                heard(shared, peer, source);
            }
            if let Some(r) = reply.get(..len) {
                self::reply(shared, peer, source, r);
            }
            // Packets queued while the handshake ran go out now.
            loop {
                let queued = match peer.tunn.lock() {
                    Ok(mut t) => match t.decapsulate(None, &[], reply) {
                        TunnResult::WriteToNetwork(p) => p.len(),
                        _ => break,
                    },
                    Err(_) => break,
                };
                if let Some(r) = reply.get(..queued) {
                    self::reply(shared, peer, source, r);
                }
            }
            Decapsulated::Nothing
        }
        Outcome::Packet(len, src) => {
            heard(shared, peer, source);
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

/// Writes the decapsulated packets gathered so far to the TUN.
fn write_tun(shared: &DataPlaneShared, io: &mut TunWriter) {
    let Some(bufs) = io.bufs.get_mut(..io.ready) else {
        return;
    };
    io.ready = 0;
    if bufs.is_empty() {
        return;
    }
    if shared.offload {
        if let Err(e) = shared.tun.send_multiple(&mut io.gro, bufs, io.off) {
            tracing::debug!("TUN write: {e}");
        }
    } else {
        for b in bufs.iter() {
            if let Err(e) = shared.tun.send(b) {
                tracing::debug!("TUN write: {e}");
            }
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
fn firewall_allows(shared: &DataPlaneShared, packet: &[u8], peer: &Peer, inbound: bool) -> bool {
    let Some(state) = &shared.firewall else {
        return true;
    };
    let Ok(mut state) = state.lock() else {
        return false;
    };
    let now = Instant::now();
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
fn timers(shared: &DataPlaneShared, buf: &mut [u8], since: u64, may_open: bool) -> Vec<OpenPorts> {
    if let Some(Ok(mut state)) = shared.firewall.as_ref().map(|f| f.lock()) {
        state.firewall.handle_timeout(Instant::now());
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
fn offer_ipv6(shared: &DataPlaneShared, peer: &Peer, now: u64) {
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
fn dead_after(shared: &DataPlaneShared, peer: &Peer) -> u64 {
    let interval = peer.spec.probe_interval.unwrap_or(shared.probe_interval);
    super::path::dead_after(interval.as_millis() as u64)
}

/// Each certified peer's path, once a tick: to a relay when the direct path went silent
/// (or never answered), and back when a direct try is answered. Without relays nothing is
/// judged; a peer that is itself a relay is always reached directly.
fn paths(
    shared: &DataPlaneShared,
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
        let seen = Seen {
            now,
            since,
            sent: link.sending.swap(false, Ordering::Relaxed),
            direct_rx: link.direct_rx.load(Ordering::Relaxed),
            relayed_rx: link.relayed_rx.load(Ordering::Relaxed),
            endpoint: peer.endpoint(),
            // Only a relayed peer's direct tries read them. An IPv4-only socket cannot send
            // to IPv6 candidates.
            candidates: match relay {
                Some(_) => peer
                    .spec
                    .candidates
                    .iter()
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
                // or a handshake where there is none.
                let mut out = [0u8; HANDSHAKE_INIT_LEN + 64];
                let len = match peer.tunn.lock() {
                    Ok(mut t) => {
                        let made = if session {
                            t.encapsulate(&[], &mut out)
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
