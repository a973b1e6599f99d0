//! The two lanes of the outbound path, without I/O: which packets are urgent (they go out
//! the moment they are read) and the bounded queue that holds the bulk until it is
//! encrypted. The data plane drains the TUN into these lanes instead of encrypting as it
//! reads, so a ping, an ACK or a control command never waits behind the kernel's TUN queue of
//! 64 KB TSO segments from a bulk upload; what the queue cannot hold is dropped (a loss signal
//! for the bulk sender) where the kernel would have dropped it at the end of its own queue.

use std::collections::VecDeque;

/// Packets up to this size are urgent whatever they carry (control commands, small sensor
/// messages, DNS).
pub const URGENT_MAX_LEN: usize = 200;
/// The largest WireGuard datagram that can carry an urgent-sized packet (16-byte header,
/// 16-byte tag, padding to 16): the inbound path decrypts these first, before it can see
/// what they carry.
pub const URGENT_MAX_DATAGRAM: usize = URGENT_MAX_LEN + 32 + 16;
/// DSCP code points for latency-sensitive traffic: CS5, EF, CS6 (network control), CS7.
const URGENT_DSCP: [u8; 4] = [40, 46, 48, 56];
const TCP: u8 = 6;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Whether `packet` (an IPv4 or IPv6 packet read from the TUN) skips the bulk queue: ICMP and
/// ICMPv6, TCP segments without payload (ACKs, SYN, FIN, RST), DSCP EF and CS5–CS7, and any
/// packet of at most `URGENT_MAX_LEN` bytes. Anything unparsable is bulk.
pub fn urgent(packet: &[u8]) -> bool {
    if packet.len() <= URGENT_MAX_LEN {
        return true;
    }
    let Some(&first) = packet.first() else {
        return false;
    };
    let (traffic_class, proto, l4_at, ip_len) = match first >> 4 {
        4 => {
            let (Some(&tos), Some(&proto), Some(frag)) =
                (packet.get(1), packet.get(9), be16(packet, 6))
            else {
                return false;
            };
            let total = be16(packet, 2).map_or(0, usize::from);
            // Only a first fragment carries the transport header.
            let proto = if frag & 0x1fff == 0 { proto } else { 0 };
            (tos, proto, usize::from(first & 0x0f) * 4, total)
        }
        6 => {
            let (Some(&b1), Some(&next)) = (packet.get(1), packet.get(6)) else {
                return false;
            };
            let payload = be16(packet, 4).map_or(0, usize::from);
            (((first & 0x0f) << 4) | (b1 >> 4), next, 40, 40 + payload)
        }
        _ => return false,
    };
    if URGENT_DSCP.contains(&(traffic_class >> 2)) {
        return true;
    }
    match proto {
        ICMP | ICMPV6 => true,
        TCP => packet.get(l4_at + 12).is_some_and(|&offset| {
            l4_at + usize::from(offset >> 4) * 4 >= ip_len.min(packet.len())
        }),
        _ => false,
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Spare buffers kept when the queue empties: one TSO read's worth, twice.
const KEPT_SPARE: usize = 128;

/// Bulk packets waiting for encryption, in arrival order, at most `limit` bytes of them. The
/// buffers move in and out by swapping with the reader's (no copy), and are kept for reuse,
/// so the steady state allocates nothing.
pub struct BulkQueue {
    queued: VecDeque<(Vec<u8>, usize)>,
    spare: Vec<Vec<u8>>,
    bytes: usize,
    limit: usize,
    dropped: u64,
}

impl BulkQueue {
    pub fn new(limit: usize) -> BulkQueue {
        BulkQueue {
            queued: VecDeque::new(),
            spare: Vec::new(),
            bytes: 0,
            limit,
            dropped: 0,
        }
    }

    /// Queues the first `len` bytes of `buf`, leaving an empty buffer of the same size in its
    /// place; false when the queue is full (the packet is dropped and counted; `buf` keeps
    /// it, to be overwritten).
    pub fn push(&mut self, buf: &mut Vec<u8>, len: usize) -> bool {
        if self.bytes + len > self.limit {
            self.dropped += 1;
            return false;
        }
        let mut fresh = self.spare.pop().unwrap_or_default();
        fresh.resize(buf.len(), 0);
        std::mem::swap(&mut fresh, buf);
        self.bytes += len;
        self.queued.push_back((fresh, len));
        true
    }

    /// The oldest packet (its buffer and length); hand the buffer back with `recycle`.
    pub fn pop(&mut self) -> Option<(Vec<u8>, usize)> {
        let (buf, len) = self.queued.pop_front()?;
        self.bytes -= len;
        Some((buf, len))
    }

    /// Keeps a popped buffer for the next `push`.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        self.spare.push(buf);
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Frees the buffers a burst left behind, past `KEPT_SPARE`, once nothing is queued (a
    /// node back at idle keeps only a little of its peak).
    pub fn shrink_when_empty(&mut self) {
        if self.queued.is_empty() && self.spare.len() > KEPT_SPARE {
            self.spare.truncate(KEPT_SPARE);
            self.spare.shrink_to_fit();
            self.queued.shrink_to(KEPT_SPARE);
        }
    }

    /// Packets dropped because the queue was full, since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ipv4(proto: u8, tos: u8, l4: &[u8], payload: usize) -> Vec<u8> {
        let total = 20 + l4.len() + payload;
        let mut p = vec![0x45, tos];
        p.extend_from_slice(&(total as u16).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0, 10, 77, 0, 1, 10, 77, 0, 2]);
        p.extend_from_slice(l4);
        p.resize(total, 0xaa);
        p
    }

    fn ipv6(next: u8, class: u8, l4: &[u8], payload: usize) -> Vec<u8> {
        let len = l4.len() + payload;
        let mut p = vec![0x60 | (class >> 4), class << 4, 0, 0];
        p.extend_from_slice(&(len as u16).to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&[0; 32]);
        p.extend_from_slice(l4);
        p.resize(40 + len, 0xaa);
        p
    }

    /// A TCP header of 20 bytes, or 32 with options (data offset 8).
    fn tcp(options: bool) -> Vec<u8> {
        let mut h = vec![0u8; if options { 32 } else { 20 }];
        h[12] = if options { 0x80 } else { 0x50 };
        h[13] = 0x10;
        h
    }

    #[test]
    fn control_traffic_is_urgent_and_bulk_is_not() {
        // A full-size TCP data segment, v4 and v6: bulk.
        assert!(!urgent(&ipv4(TCP, 0, &tcp(true), 1368)));
        assert!(!urgent(&ipv6(TCP, 0, &tcp(true), 1348)));
        // ACKs padded past the size rule still count by their (empty) payload.
        let mut ack = ipv4(TCP, 0, &tcp(true), 0);
        assert!(urgent(&ack));
        ack.resize(300, 0); // Ethernet-style trailing padding beyond the IP length
        assert!(urgent(&ack));
        assert!(urgent(&ipv6(TCP, 0, &tcp(false), 0)));
        // ICMP echo of any size, v4 and v6.
        assert!(urgent(&ipv4(ICMP, 0, &[8, 0, 0, 0, 0, 1, 0, 1], 1000)));
        assert!(urgent(&ipv6(ICMPV6, 0, &[128, 0, 0, 0, 0, 1, 0, 1], 1000)));
        // Small packets of any protocol.
        assert!(urgent(&ipv4(17, 0, &[0; 8], 100)));
        assert!(!urgent(&ipv4(17, 0, &[0; 8], 1000)));
        // DSCP EF (46 << 2) and CS6, v4 and v6; AF41 is not urgent.
        assert!(urgent(&ipv4(17, 46 << 2, &[0; 8], 1000)));
        assert!(urgent(&ipv6(17, 48 << 2, &[0; 8], 1000)));
        assert!(!urgent(&ipv4(17, 34 << 2, &[0; 8], 1000)));
        // A later fragment of a TCP datagram has no TCP header to read.
        let mut frag = ipv4(TCP, 0, &tcp(false), 1000);
        frag[6] = 0x00;
        frag[7] = 0xb9;
        assert!(!urgent(&frag));
    }

    proptest! {
        #[test]
        fn classification_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = urgent(&bytes);
        }

        #[test]
        fn the_queue_keeps_order_and_its_byte_limit(lens in proptest::collection::vec(1usize..1500, 1..200), limit in 1usize..20_000) {
            let mut q = BulkQueue::new(limit);
            let mut expected = VecDeque::new();
            let mut dropped = 0;
            for (i, len) in lens.iter().enumerate() {
                let mut buf = vec![i as u8; 1500];
                if q.push(&mut buf, *len) {
                    expected.push_back((i as u8, *len));
                    prop_assert_eq!(buf.len(), 1500);
                } else {
                    dropped += 1;
                }
                prop_assert!(q.bytes <= limit);
                // Serve one packet in three, as the encryptor lags the reader.
                if i % 3 == 0 {
                    if let Some((b, l)) = q.pop() {
                        prop_assert_eq!(Some((b[0], l)), expected.pop_front());
                        q.recycle(b);
                    }
                }
            }
            while let Some((b, l)) = q.pop() {
                prop_assert_eq!(Some((b[0], l)), expected.pop_front());
            }
            prop_assert!(expected.is_empty());
            prop_assert!(q.is_empty());
            prop_assert_eq!(q.take_dropped(), dropped);
            prop_assert_eq!(q.take_dropped(), 0);
            q.shrink_when_empty();
            prop_assert!(q.spare.len() <= KEPT_SPARE);
        }
    }
}
