//! Multicast packets a member sends through the tunnel (and the local host writes to the TUN):
//! the replicator reads their headers to find the group, its scope and whether it is a
//! membership report. Any bytes at all must give a verdict, never a panic, and never pass
//! more than the caps.
#![no_main]

use libfuzzer_sys::fuzz_target;
use myelin::tunnel::multicast::{Policy, Replicator};
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut r = Replicator::new(
        Policy {
            groups: vec!["239.255.0.1".parse().unwrap(), "ff05::1:3".parse().unwrap()],
            to: vec!["robots".into()],
            max_packets_per_s: 5,
            max_bytes_per_s: 1_000_000,
        },
        t0,
    );
    let mut passed = 0;
    for (i, chunk) in data.chunks(64).enumerate() {
        let now = t0 + Duration::from_millis(i as u64);
        passed += usize::from(r.outbound(chunk, now).is_ok());
        let _ = r.inbound(chunk, now);
    }
    // Two groups, a burst of five each, and under a second of refill at 5 a second.
    assert!(passed <= 2 * (5 + 5));
});
