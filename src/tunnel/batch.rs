//! The outbound packet path after routing, without I/O: a TUN packet encrypted for its peer
//! into the open UDP GSO batch (equal segments to one endpoint), and the batches that must
//! leave. The data plane routes, asks the firewall, and sends what `Batcher` hands back.

use super::peers::Peer;
use boringtun::noise::TunnResult;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

/// WireGuard data overhead: 16-byte header, 16-byte tag, and room to pad the plaintext to 16
/// (boringtun sends it unpadded).
pub const OVERHEAD: usize = 32 + 16;
pub const HANDSHAKE_INIT_LEN: usize = 148;
/// The most one GSO send may carry: an IPv4 UDP payload tops out at 65 507 bytes.
pub const MAX_GSO_BYTES: usize = 65_000;

/// A GSO batch being built in the outbound buffer: `[0, end)` holds `count` segments of
/// `segment` bytes (the last may be shorter) for `to`.
struct Open {
    to: SocketAddr,
    segment: usize,
    end: usize,
    count: usize,
    closed: bool,
}

/// Encrypted packets gathered into GSO batches.
pub struct Batcher {
    out: Vec<u8>,
    open: Option<Open>,
    max_segments: usize,
}

impl Batcher {
    /// A buffer of `capacity` bytes; at most `max_segments` datagrams per send (the socket's
    /// GSO limit).
    pub fn new(capacity: usize, max_segments: usize) -> Batcher {
        Batcher {
            out: vec![0u8; capacity],
            open: None,
            max_segments: max_segments.max(1),
        }
    }

    /// Encrypts `packet` for `peer` (at `to`) into the open batch, or a new one. `send` gets
    /// `(to, contents, segment size when more than one)` for each batch that must leave first.
    /// Without a session, boringtun queues the packet and a handshake initiation comes out.
    pub fn push(
        &mut self,
        peer: &Peer,
        to: SocketAddr,
        packet: &[u8],
        send: &mut impl FnMut(SocketAddr, &[u8], Option<usize>),
    ) {
        let needed = (packet.len() + OVERHEAD).max(HANDSHAKE_INIT_LEN);
        if self.open.as_ref().map_or(0, |b| b.end) + needed > self.out.len() {
            self.flush(send);
        }
        let start = self.open.as_ref().map_or(0, |b| b.end);
        let Some(slot) = self.out.get_mut(start..start + needed) else {
            return;
        };
        let len = match peer.tunn.lock() {
            Ok(mut t) => match t.encapsulate(packet, slot) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => return,
            },
            Err(_) => return,
        };
        peer.tx_packets.fetch_add(1, Ordering::Relaxed);
        let max_segments = self.max_segments;
        let fits = self.open.as_ref().is_some_and(|b| {
            b.to == to
                && !b.closed
                && len <= b.segment
                && b.count < max_segments
                && b.end + len <= MAX_GSO_BYTES
        });
        match (self.open.as_mut(), fits) {
            (Some(b), true) => {
                b.end += len;
                b.count += 1;
                b.closed = len < b.segment;
            }
            _ => {
                if self.open.is_some() {
                    // The packet was written after the open batch; move it to the front once
                    // that batch is sent.
                    self.flush(send);
                    self.out.copy_within(start..start + len, 0);
                }
                self.open = Some(Open {
                    to,
                    segment: len,
                    end: len,
                    count: 1,
                    closed: false,
                });
            }
        }
    }

    /// Hands the open batch to `send`, if there is one.
    pub fn flush(&mut self, send: &mut impl FnMut(SocketAddr, &[u8], Option<usize>)) {
        if let Some(b) = self.open.take() {
            if let Some(contents) = self.out.get(..b.end) {
                send(b.to, contents, (b.count > 1).then_some(b.segment));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::peers::PeerSpec;
    use boringtun::noise::Tunn;
    use boringtun::x25519::{PublicKey, StaticSecret};

    /// A peer of ours (key 1) with a session to a remote `Tunn` (key `seed`).
    fn connected(seed: u8) -> (Peer, Tunn) {
        let ours = StaticSecret::from([1; 32]);
        let theirs = StaticSecret::from([seed; 32]);
        let spec = PeerSpec {
            name: format!("p{seed}"),
            public_key: PublicKey::from(&theirs).to_bytes(),
            allowed_ips: vec![],
            endpoint: None,
            persistent_keepalive: None,
            probe_interval: None,
            idles: false,
            groups: vec![],
            multicast: Vec::new(),
            certified: false,
            behind_nat: false,
            candidates: Vec::new(),
        };
        let peer = Peer::new(&ours, spec, seed as usize);
        let mut remote = Tunn::new(theirs, PublicKey::from(&ours), None, None, 99, None);
        let (mut a, mut b) = (vec![0u8; 2048], vec![0u8; 2048]);
        let init = match peer
            .tunn
            .lock()
            .unwrap()
            .format_handshake_initiation(&mut a, false)
        {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no initiation"),
        };
        let resp = match remote.decapsulate(None, &init, &mut b) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            _ => panic!("no response"),
        };
        if let TunnResult::WriteToNetwork(k) =
            peer.tunn.lock().unwrap().decapsulate(None, &resp, &mut a)
        {
            let k = k.to_vec();
            let _ = remote.decapsulate(None, &k, &mut b);
        }
        (peer, remote)
    }

    fn packet(len: usize) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p
    }

    #[test]
    fn equal_packets_to_one_peer_share_a_batch_and_others_start_new_ones() {
        let (a, _) = connected(2);
        let (b, _) = connected(3);
        let (ea, eb): (SocketAddr, SocketAddr) = (
            "192.0.2.2:51820".parse().unwrap(),
            "192.0.2.3:51820".parse().unwrap(),
        );
        let mut sent: Vec<(SocketAddr, usize, Option<usize>)> = Vec::new();
        let mut send = |to, c: &[u8], seg| sent.push((to, c.len(), seg));
        let mut batcher = Batcher::new(65535 + 1420 + OVERHEAD, 4);
        for _ in 0..5 {
            batcher.push(&a, ea, &packet(1400), &mut send);
        }
        // A shorter one closes the batch (GSO's last segment may be shorter), then b's.
        batcher.push(&b, eb, &packet(100), &mut send);
        batcher.flush(&mut send);
        let wire = |n: usize| n + 32; // boringtun does not pad
        let segment = wire(1400);
        assert_eq!(
            sent,
            vec![
                (ea, 4 * segment, Some(segment)),
                (ea, segment, None),
                (eb, wire(100), None),
            ],
            "four segments at most per send, then a new batch per endpoint"
        );
        assert_eq!(a.tx_packets.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn what_comes_out_decrypts_at_the_peer() {
        let (a, mut remote) = connected(2);
        let to: SocketAddr = "192.0.2.2:51820".parse().unwrap();
        let mut datagrams: Vec<Vec<u8>> = Vec::new();
        let mut batcher = Batcher::new(65535 + 1420 + OVERHEAD, 64);
        let p = packet(600);
        for _ in 0..3 {
            batcher.push(&a, to, &p, &mut |_, c, seg| {
                let seg = seg.unwrap_or(c.len());
                datagrams.extend(c.chunks(seg).map(<[u8]>::to_vec));
            });
        }
        batcher.flush(&mut |_, c, seg| {
            let seg = seg.unwrap_or(c.len());
            datagrams.extend(c.chunks(seg).map(<[u8]>::to_vec));
        });
        assert_eq!(datagrams.len(), 3);
        let mut plain = vec![0u8; 2048];
        for d in datagrams {
            match remote.decapsulate(None, &d, &mut plain) {
                TunnResult::WriteToTunnelV4(got, _) => assert_eq!(got, &p[..]),
                other => panic!("not a packet: {:?}", std::mem::discriminant(&other)),
            }
        }
    }
}
