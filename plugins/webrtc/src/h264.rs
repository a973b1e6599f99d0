//! H.264 over RTP (RFC 6184), only as far as fan-out needs it: where a keyframe starts, and a
//! cache from the latest keyframe so a new viewer can start decoding at once.

use std::collections::VecDeque;
use std::sync::Arc;

/// NAL unit types that begin a decodable picture sequence: SPS (7), PPS (8) and IDR (5).
fn starts_keyframe_nal(nal_type: u8) -> bool {
    matches!(nal_type, 5 | 7)
}

/// Whether this RTP payload begins a keyframe: a single SPS/IDR NAL, a STAP-A holding one, or
/// the first fragment of an FU-A IDR.
pub fn starts_keyframe(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    match first & 0x1f {
        t @ 1..=23 => starts_keyframe_nal(t),
        24 => {
            // STAP-A: [16-bit size][NAL]...
            let mut rest = &payload[1..];
            while rest.len() >= 3 {
                let size = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                if size == 0 || rest.len() < 2 + size {
                    return false;
                }
                if starts_keyframe_nal(rest[2] & 0x1f) {
                    return true;
                }
                rest = &rest[2 + size..];
            }
            false
        }
        28 => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && starts_keyframe_nal(fu & 0x1f)),
        _ => false,
    }
}

/// One ingested RTP packet, parsed once, numbered in arrival order.
#[derive(Clone, Debug)]
pub struct Ingested {
    pub index: u64,
    pub keyframe_start: bool,
    /// Its size on the wire.
    pub len: usize,
    pub packet: rtc::rtp::Packet,
}

impl Ingested {
    pub fn new(index: u64, packet: rtc::rtp::Packet, len: usize) -> Self {
        Self {
            index,
            keyframe_start: starts_keyframe(&packet.payload),
            len,
            packet,
        }
    }
}

/// The packets since the latest keyframe (bounded), for viewers that join mid-stream.
#[derive(Debug)]
pub struct GopCache {
    packets: VecDeque<Arc<Ingested>>,
    max_packets: usize,
    /// The keyframe's RTP timestamp; packets of the same picture (SPS, PPS, IDR) share it.
    keyframe_ts: Option<u32>,
}

impl GopCache {
    pub fn new(max_packets: usize) -> Self {
        Self {
            packets: VecDeque::new(),
            max_packets,
            keyframe_ts: None,
        }
    }

    pub fn push(&mut self, p: Arc<Ingested>) {
        let ts = p.packet.header.timestamp;
        if p.keyframe_start && self.keyframe_ts != Some(ts) {
            self.packets.clear();
            self.keyframe_ts = Some(ts);
        }
        if self.keyframe_ts.is_none() {
            // Nothing decodable yet.
            return;
        }
        if self.packets.len() == self.max_packets {
            // A GOP longer than the cache: drop it all and wait for the next keyframe rather
            // than hand a viewer a picture with its start cut off.
            self.packets.clear();
            self.keyframe_ts = None;
            return;
        }
        self.packets.push_back(p);
    }

    /// The cached packets, oldest first.
    pub fn snapshot(&self) -> Vec<Arc<Ingested>> {
        self.packets.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(index: u64, ts: u32, payload: &[u8]) -> Arc<Ingested> {
        let mut packet = rtc::rtp::Packet {
            payload: bytes::Bytes::copy_from_slice(payload),
            ..Default::default()
        };
        packet.header.timestamp = ts;
        Arc::new(Ingested::new(index, packet, 12 + payload.len()))
    }

    #[test]
    fn keyframes_are_found_in_every_packetization() {
        assert!(starts_keyframe(&[0x67, 0x42])); // SPS
        assert!(starts_keyframe(&[0x65, 0x88])); // IDR
        assert!(!starts_keyframe(&[0x41, 0x9a])); // non-IDR slice
        assert!(!starts_keyframe(&[0x68, 0xce])); // PPS alone: part of the keyframe, not its start
                                                  // STAP-A with SPS + PPS.
        assert!(starts_keyframe(&[0x78, 0, 2, 0x67, 0x42, 0, 2, 0x68, 0xce]));
        assert!(!starts_keyframe(&[0x78, 0, 2, 0x41, 0x9a]));
        assert!(!starts_keyframe(&[0x78, 0, 9, 0x67])); // truncated
                                                        // FU-A: start of an IDR, middle of an IDR, start of a non-IDR.
        assert!(starts_keyframe(&[0x7c, 0x85, 0]));
        assert!(!starts_keyframe(&[0x7c, 0x05, 0]));
        assert!(!starts_keyframe(&[0x7c, 0x81, 0]));
        assert!(!starts_keyframe(&[]));
    }

    #[test]
    fn the_cache_holds_the_latest_gop_only() {
        let mut c = GopCache::new(100);
        c.push(pkt(0, 1, &[0x41])); // before any keyframe: not decodable
        assert!(c.snapshot().is_empty());
        c.push(pkt(1, 2, &[0x67]));
        c.push(pkt(2, 2, &[0x68]));
        c.push(pkt(3, 2, &[0x65])); // same picture as the SPS: stays
        c.push(pkt(4, 3, &[0x41]));
        assert_eq!(
            c.snapshot().iter().map(|p| p.index).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        c.push(pkt(5, 4, &[0x67]));
        assert_eq!(
            c.snapshot().iter().map(|p| p.index).collect::<Vec<_>>(),
            [5]
        );
    }

    #[test]
    fn an_overlong_gop_is_dropped_not_truncated() {
        let mut c = GopCache::new(3);
        c.push(pkt(1, 1, &[0x65]));
        c.push(pkt(2, 2, &[0x41]));
        c.push(pkt(3, 3, &[0x41]));
        c.push(pkt(4, 4, &[0x41]));
        assert!(c.snapshot().is_empty());
        c.push(pkt(5, 5, &[0x41]));
        assert!(c.snapshot().is_empty());
        c.push(pkt(6, 6, &[0x65]));
        assert_eq!(c.snapshot().len(), 1);
    }
}
