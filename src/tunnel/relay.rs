//! The relay's side: which members may send through this node, and how much. A relayed
//! datagram arrives inside a member's own tunnel (so WireGuard has proved who sent it) and
//! leaves inside the target member's tunnel, framed by `mesh::wire::relay_frame`; the relay
//! never holds a key for the datagram itself.

use std::collections::HashMap;

/// Members a relay keeps a rate budget for; the oldest budget is dropped past it (a dropped
/// member starts again with a full burst, which the cap still bounds).
const MAX_MEMBERS: usize = 4096;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Refused {
    /// The sender is not an admitted member (a handshake without a certificate yet).
    NotMember,
    /// The target is not an admitted member of this relay, or has no session.
    UnknownTarget,
    /// The sender is over its rate.
    OverRate,
    /// To itself, or a frame inside a frame.
    Loop,
    /// Not a WireGuard message.
    NotWireGuard,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::NotMember => "not_member",
            Refused::UnknownTarget => "unknown_target",
            Refused::OverRate => "over_rate",
            Refused::Loop => "loop",
            Refused::NotWireGuard => "not_wireguard",
        }
    }
}

struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// Per-member token buckets in bytes: `rate` a second, bursts of one second.
pub struct Relay {
    rate: f64,
    buckets: HashMap<[u8; 32], Bucket>,
}

impl Relay {
    pub fn new(kbit_per_s: u32) -> Relay {
        Relay {
            rate: f64::from(kbit_per_s) * 1000.0 / 8.0,
            buckets: HashMap::new(),
        }
    }

    /// Takes `bytes` from `member`'s budget at `now_ms`; false when it is over its rate.
    pub fn admit(&mut self, member: &[u8; 32], bytes: usize, now_ms: u64) -> bool {
        if !self.buckets.contains_key(member) && self.buckets.len() >= MAX_MEMBERS {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.at_ms)
                .map(|(k, _)| *k)
            {
                self.buckets.remove(&oldest);
            }
        }
        let rate = self.rate;
        let b = self.buckets.entry(*member).or_insert(Bucket {
            tokens: rate,
            at_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * rate).min(rate);
        b.at_ms = now_ms;
        let cost = bytes as f64;
        if b.tokens >= cost {
            b.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_member_gets_its_rate_and_a_one_second_burst() {
        // 800 kbit/s: 100 000 bytes a second.
        let mut r = Relay::new(800);
        let a = [1u8; 32];
        let b = [2u8; 32];
        let mut sent = 0;
        while r.admit(&a, 1_000, 0) {
            sent += 1;
        }
        assert_eq!(sent, 100, "a one-second burst");
        // Another member has its own budget.
        assert!(r.admit(&b, 1_000, 0));
        // Half a second later: half a second of rate.
        let mut later = 0;
        while r.admit(&a, 1_000, 500) {
            later += 1;
        }
        assert_eq!(later, 50);
        // Ten seconds idle refill only one second's burst.
        let mut burst = 0;
        while r.admit(&a, 1_000, 10_500) {
            burst += 1;
        }
        assert_eq!(burst, 100);
    }

    #[test]
    fn budgets_are_bounded() {
        let mut r = Relay::new(800);
        for i in 0..(MAX_MEMBERS + 10) {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_be_bytes());
            assert!(r.admit(&k, 10, i as u64));
        }
        assert_eq!(r.buckets.len(), MAX_MEMBERS);
    }
}
