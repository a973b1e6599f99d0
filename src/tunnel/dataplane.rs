//! The packet loops. Outbound: TUN (with GSO segments split by tun-rs) → route lookup →
//! encapsulate → UDP, consecutive same-size packets to one endpoint sent as one GSO batch.
//! Inbound: UDP (GRO trains split by stride) → peer by receiver index or handshake →
//! decapsulate → allowed-IPs check → TUN, coalesced again with tun-rs's GRO table.
//! Buffers are allocated once; per-packet work allocates nothing and never panics.

use super::{Peer, Shared};
use boringtun::noise::{handshake::parse_handshake_anon, Packet, Tunn, TunnResult};
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

/// WireGuard data overhead: 16-byte header, 16-byte tag, plaintext padded to 16.
const OVERHEAD: usize = 32 + 16;
const HANDSHAKE_INIT_LEN: usize = 148;
/// The most one GSO send may carry: an IPv4 UDP payload tops out at 65 507 bytes.
const MAX_GSO_BYTES: usize = 65_000;
/// Room for one UDP datagram (a GRO train or a single packet).
const RX_SLOT: usize = 65536;
const RX_BATCH: usize = 8;
const TIMER_TICK: Duration = Duration::from_millis(250);

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Sends `contents` (one datagram, or equal segments of `segment` bytes) to `to`.
async fn send(shared: &Shared, to: SocketAddr, contents: &[u8], segment: Option<usize>) {
    let destination = match (to, shared.udp_is_v6) {
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
        if shared.udp.writable().await.is_err() {
            return;
        }
        match shared.udp.try_io(Interest::WRITABLE, || {
            shared.udp_state.try_send((&shared.udp).into(), &transmit)
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!("send to {to} failed: {e}");
                return;
            }
            Ok(()) => return,
        }
    }
}

/// A GSO batch being built in the outbound buffer: `[0, end)` holds `count` segments of
/// `segment` bytes (the last may be shorter) for `to`.
struct Batch {
    to: SocketAddr,
    segment: usize,
    end: usize,
    count: usize,
    closed: bool,
}

pub(super) async fn outbound(shared: Arc<Shared>) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; 65535]; IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let max_segments = shared.udp_state.max_gso_segments().clamp(1, 64);
    let mut out = vec![0u8; 65535 + shared.mtu + OVERHEAD];
    let mut batch: Option<Batch> = None;
    loop {
        let n = match shared
            .tun
            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("TUN read: {e}");
                continue;
            }
        };
        for i in 0..n {
            let Some(packet) = bufs[i].get(..sizes[i]) else {
                continue;
            };
            let Some(dst) = Tunn::dst_address(packet) else {
                continue;
            };
            let Some(peer) = shared.routes.lookup(dst).and_then(|p| shared.peers.get(p)) else {
                continue;
            };
            let Some(to) = peer.endpoint() else { continue };
            let start = batch.as_ref().map_or(0, |b| b.end);
            // Without a session, the packet is queued and a handshake initiation comes out.
            let needed = (packet.len() + OVERHEAD).max(HANDSHAKE_INIT_LEN);
            if start + needed > out.len() {
                flush(&shared, &out, &mut batch).await;
            }
            let start = batch.as_ref().map_or(0, |b| b.end);
            let Some(slot) = out.get_mut(start..start + needed) else {
                continue;
            };
            let len = match peer.tunn.lock() {
                Ok(mut t) => match t.encapsulate(packet, slot) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => continue,
                },
                Err(_) => continue,
            };
            peer.tx_packets.fetch_add(1, Ordering::Relaxed);
            let fits = batch.as_ref().is_some_and(|b| {
                b.to == to
                    && !b.closed
                    && len <= b.segment
                    && b.count < max_segments
                    && b.end + len <= MAX_GSO_BYTES
            });
            match (&mut batch, fits) {
                (Some(b), true) => {
                    b.end += len;
                    b.count += 1;
                    b.closed = len < b.segment;
                }
                _ => {
                    if batch.is_some() {
                        // The packet was written after the open batch; move it to the front
                        // once that batch is sent.
                        flush(&shared, &out, &mut batch).await;
                        out.copy_within(start..start + len, 0);
                    }
                    batch = Some(Batch {
                        to,
                        segment: len,
                        end: len,
                        count: 1,
                        closed: false,
                    });
                }
            }
        }
        flush(&shared, &out, &mut batch).await;
    }
}

async fn flush(shared: &Shared, out: &[u8], batch: &mut Option<Batch>) {
    if let Some(b) = batch.take() {
        if let Some(contents) = out.get(..b.end) {
            send(shared, b.to, contents, (b.count > 1).then_some(b.segment)).await;
        }
    }
}

/// Which peer a datagram belongs to.
fn find_peer(shared: &Shared, datagram: &[u8]) -> Option<usize> {
    match Tunn::parse_incoming_packet(datagram).ok()? {
        Packet::HandshakeInit(init) => {
            let half =
                parse_handshake_anon(&shared.static_private, &shared.static_public, &init).ok()?;
            shared
                .peers
                .iter()
                .position(|p| p.public_key_bytes == half.peer_static_public)
        }
        Packet::HandshakeResponse(r) => Some((r.receiver_idx >> 8) as usize),
        Packet::PacketCookieReply(c) => Some((c.receiver_idx >> 8) as usize),
        Packet::PacketData(d) => Some((d.receiver_idx >> 8) as usize),
    }
}

pub(super) async fn inbound(shared: Arc<Shared>) {
    let Ok(mut rx): Result<Box<[[u8; RX_SLOT]; RX_BATCH]>, _> =
        vec![[0u8; RX_SLOT]; RX_BATCH].into_boxed_slice().try_into()
    else {
        tracing::error!("cannot allocate receive buffers");
        return;
    };
    let mut meta = [quinn_udp::RecvMeta::default(); RX_BATCH];
    let off = if shared.offload {
        VIRTIO_NET_HDR_LEN
    } else {
        0
    };
    let mut tun_bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| Vec::with_capacity(off + 65536))
        .collect();
    let mut reply = vec![0u8; 2048];
    let mut gro = GROTable::default();
    loop {
        if shared.udp.readable().await.is_err() {
            continue;
        }
        let received = {
            let mut iovs = rx.each_mut().map(|b| IoSliceMut::new(b));
            shared.udp.try_io(Interest::READABLE, || {
                shared
                    .udp_state
                    .recv((&shared.udp).into(), &mut iovs, &mut meta)
            })
        };
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!("UDP receive: {e}");
                continue;
            }
        };
        let mut ready = 0;
        for (slot, m) in rx.iter().zip(meta.iter()).take(n) {
            let from = canonical(m.addr);
            let stride = if m.stride == 0 { m.len } else { m.stride };
            let Some(data) = slot.get(..m.len) else {
                continue;
            };
            for datagram in data.chunks(stride.max(1)) {
                let Some(idx) = find_peer(&shared, datagram) else {
                    continue;
                };
                let Some(peer) = shared.peers.get(idx) else {
                    continue;
                };
                if ready == tun_bufs.len() {
                    write_tun(&shared, &mut gro, &mut tun_bufs[..ready], off).await;
                    ready = 0;
                }
                let buf = &mut tun_bufs[ready];
                buf.clear();
                buf.resize(off + datagram.len(), 0);
                if decapsulate(&shared, peer, idx, from, datagram, buf, off, &mut reply).await {
                    ready += 1;
                }
            }
        }
        if ready > 0 {
            write_tun(&shared, &mut gro, &mut tun_bufs[..ready], off).await;
        }
    }
}

/// Decapsulates one datagram into `buf[off..]`; true when it holds a packet for the TUN.
#[allow(clippy::too_many_arguments)]
async fn decapsulate(
    shared: &Shared,
    peer: &Peer,
    idx: usize,
    from: SocketAddr,
    datagram: &[u8],
    buf: &mut Vec<u8>,
    off: usize,
    reply: &mut [u8],
) -> bool {
    let Some(dst) = buf.get_mut(off..) else {
        return false;
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
                match reply.get_mut(..len) {
                    Some(r) => {
                        r.copy_from_slice(&dst[..len]);
                        Outcome::Reply(len)
                    }
                    None => Outcome::Rejected,
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
        Outcome::Rejected => false,
        Outcome::Nothing => {
            peer.saw(from);
            false
        }
        Outcome::Reply(len) => {
            peer.saw(from);
            send(shared, from, &reply[..len], None).await;
            // Packets queued while the handshake ran go out now.
            loop {
                let queued = match peer.tunn.lock() {
                    Ok(mut t) => match t.decapsulate(None, &[], reply) {
                        TunnResult::WriteToNetwork(p) => p.len(),
                        _ => break,
                    },
                    Err(_) => break,
                };
                send(shared, from, &reply[..queued], None).await;
            }
            false
        }
        Outcome::Packet(len, src) => {
            peer.saw(from);
            // Cryptokey routing: the inner source must be one of this peer's allowed IPs.
            if shared.routes.lookup(src) != Some(idx) {
                tracing::debug!(peer = %peer.name, "dropped a packet from {src}, outside its allowed IPs");
                return false;
            }
            buf.truncate(off + len);
            peer.rx_packets.fetch_add(1, Ordering::Relaxed);
            true
        }
    }
}

async fn write_tun(shared: &Shared, gro: &mut GROTable, bufs: &mut [Vec<u8>], off: usize) {
    if shared.offload {
        if let Err(e) = shared.tun.send_multiple(gro, bufs, off).await {
            tracing::debug!("TUN write: {e}");
        }
    } else {
        for b in bufs.iter() {
            if let Err(e) = shared.tun.send(b).await {
                tracing::debug!("TUN write: {e}");
            }
        }
    }
}

/// Drives boringtun's timers: handshakes, retries, keepalives, session expiry.
pub(super) async fn timers(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 2048];
    loop {
        tick.tick().await;
        for peer in &shared.peers {
            let len = match peer.tunn.lock() {
                Ok(mut t) => match t.update_timers(&mut buf) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    _ => continue,
                },
                Err(_) => continue,
            };
            if let Some(to) = peer.endpoint() {
                send(&shared, to, &buf[..len], None).await;
            }
        }
    }
}
