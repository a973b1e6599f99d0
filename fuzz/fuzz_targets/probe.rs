//! Probe datagrams: they arrive on the probe port from any peer that got through the tunnel.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::mesh::probe::{decode, Prober, PROBE_LEN};
use std::time::{Duration, Instant};

/// The nonce this prober's pongs must echo; comparison tracing lets the fuzzer find it.
const SESSION: u64 = 0x5eed_0fc0_ffee;
/// Enough to wrap the 100-probe window twice; longer inputs only repeat it, slowly.
const MAX_STEPS: usize = 256;

fuzz_target!(|data: &[u8]| {
    let _ = decode(data);
    let Some((&head, mut rest)) = data.split_first() else {
        return;
    };
    let peers = usize::from(head & 3) + 1;
    let interval = Duration::from_millis(u64::from(head >> 2));
    let t0 = Instant::now();
    let mut prober = Prober::new(peers, interval, t0, SESSION);
    let mut now = t0;
    // Each step: clock advance (ms), peer index (one past the last is an unknown peer), datagram
    // length, datagram.
    for _ in 0..MAX_STEPS {
        let [step, peer, len, tail @ ..] = rest else {
            break;
        };
        let n = usize::from(*len).min(PROBE_LEN + 8).min(tail.len());
        let (datagram, tail) = tail.split_at(n);
        rest = tail;
        now += Duration::from_millis(u64::from(*step));
        let peer = usize::from(*peer) % (peers + 1);
        while let Some((to, ping)) = prober.poll_transmit(now) {
            assert!(to < peers);
            assert!(decode(&ping).is_some());
        }
        if let Some(pong) = prober.handle_input(peer, datagram, now) {
            assert!(decode(&pong).is_some());
        }
        let _ = prober.answered(peer);
    }
    for peer in 0..=peers {
        if let Some(loss) = prober.stats(peer, now).loss {
            assert!((0.0..=1.0).contains(&loss));
        }
        let _ = prober.recent(peer, now, 10);
    }
    let _ = prober.poll_timeout();
});
