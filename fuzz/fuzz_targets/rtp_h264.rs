//! RTP from the camera pipeline as plugins/webrtc ingests it: unmarshal (webrtc-rs's `rtp`, as
//! the plugin calls it), keyframe detection and the GOP cache from the plugin's own h264.rs.
#![no_main]

#[allow(dead_code)]
#[path = "../../plugins/webrtc/src/h264.rs"]
mod h264;

use libfuzzer_sys::fuzz_target;
use rtc::shared::marshal::Unmarshal;
use std::sync::Arc;

/// The plugin's receive buffer: longer datagrams arrive truncated to it.
const DATAGRAM: usize = 2048;

fn ingest(cache: &mut h264::GopCache, index: u64, datagram: &[u8]) {
    let datagram = &datagram[..datagram.len().min(DATAGRAM)];
    let mut raw = bytes::Bytes::copy_from_slice(datagram);
    let Ok(packet) = rtc::rtp::Packet::unmarshal(&mut raw) else {
        return;
    };
    let p = Arc::new(h264::Ingested::new(index, packet, datagram.len()));
    cache.push(p);
    assert!(cache.snapshot().len() <= 4);
}

fuzz_target!(|data: &[u8]| {
    let _ = h264::starts_keyframe(data);
    let mut cache = h264::GopCache::new(4);
    ingest(&mut cache, 0, data);
    // Then the input as a sequence of datagrams, each after a 2-byte length.
    let mut rest = data;
    let mut index = 1;
    while let [hi, lo, tail @ ..] = rest {
        let n = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (datagram, tail) = tail.split_at(n);
        rest = tail;
        ingest(&mut cache, index, datagram);
        index += 1;
    }
});
