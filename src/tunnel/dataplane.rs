//! The packet loop, the I/O shell of the packet engine (`engine.rs`): one thread per node
//! that sleeps in a level-triggered epoll on the TUN device, the WireGuard socket and the
//! many-port sockets, and does the packet I/O itself. There is no async runtime between the
//! kernel's wake-up and the packet; one thread serves both directions, so an answer the
//! kernel queues while a packet is written to the TUN (an ICMP reply, a TCP ACK) goes out
//! without waking another thread; and a wake-up that brings one packet makes one read, not a
//! second one that finds nothing (docs/benchmarks.md has the layouts measured).
//! Outbound: TUN (GSO segments split by tun-rs) → urgent packets (`lanes::urgent`) at once,
//! the rest through a bounded bulk queue → the engine → UDP, consecutive same-size packets to
//! one endpoint sent as one GSO batch. Inbound: UDP (GRO trains split by stride, drained into
//! batches; datagrams small enough to be urgent first, the bulk `BULK_PER_TURN` at a time) →
//! the engine → TUN, coalesced again with tun-rs's GRO table. The thread sets the engine's
//! clock once per wake-up and runs its timers every tick. Buffers are allocated once;
//! per-packet work allocates nothing and never panics.

use super::batch::Batcher;
use super::batch::{HANDSHAKE_INIT_LEN, OVERHEAD};
use super::engine::{self, Io, OpenPorts, TunWriter};
use super::lanes::{self, BulkQueue};
use super::{manyports, DataPlaneShared};
use rustix::buffer::spare_capacity;
use rustix::event::{epoll, PollFd, PollFlags, Timespec};
use std::io::{ErrorKind, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tun_rs::{IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

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

impl Io for DataPlaneShared {
    fn send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) {
        send(self, to, contents, segment);
    }

    fn write_tun(&self, out: &mut TunWriter) {
        write_tun(self, out);
    }
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
                    engine::encapsulate(shared, packet, &mut self.batcher);
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
                engine::encapsulate(shared, packet, &mut self.batcher);
            }
            self.bulk.recycle(buf);
        }
        self.batcher
            .flush(&mut |to, contents, segment| send(shared, to, contents, segment));
    }
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
        let Some(datagram) = engine::keepalive(peer, &mut out) else {
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
                    engine::receive_datagram(shared, writer, from, datagram);
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
                engine::receive_datagram(shared, writer, from, datagram);
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
            engine::probe_direct(shared, peer, to);
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
        writer: TunWriter::new(IDEAL_BATCH_SIZE, off),
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
            for open in engine::timers(&*shared, &mut timer_buf, last_tick, aux.may_open()) {
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
                    engine::receive_datagram(shared, &mut io.writer, from, datagram);
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
                engine::receive_datagram(shared, &mut io.writer, canonical(m.addr), datagram);
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
