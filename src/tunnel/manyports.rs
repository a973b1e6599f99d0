//! Many-port ("birthday") probing, sans-IO: a direct path between a member behind an
//! endpoint-dependent ("hard") NAT and one behind an endpoint-independent ("easy") NAT or none,
//! which crossing handshakes cannot find (the easy side's NAT drops whatever comes from a port
//! it never sent to, and the hard side's NAT gives every destination a new port). While such a
//! pair is relayed, the hard side opens `OPEN_SOCKETS` sockets and sends one keepalive from each
//! to the easy side's public address, so its NAT opens as many mappings toward it; the easy side
//! sends keepalives to `SPRAY_PORTS` distinct random ports of the hard side's public address,
//! each opening its own NAT's filter for that port. One that hits an open mapping gets through
//! both NATs, and the answer comes back the same way. With 256 mappings among 64 512 ports a
//! spray of 2 048 finds one with probability 1 - (1 - 256/64512)^2048 ≈ 99.97 %; the NAT lab
//! measured 20 of 20 (docs/benchmarks.md). Which side does what follows from this node's own
//! NAT ([`Role`]); no signalling is needed, the relay's timing aligns the two sides.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Sockets the hard side opens per try.
pub const OPEN_SOCKETS: usize = 256;
/// They listen for the easy side's spray this long.
pub const OPEN_FOR_MS: u64 = 10_000;
/// Distinct ports the easy side sprays per try...
pub const SPRAY_PORTS: u32 = 2_048;
/// ...this many per timer tick (250 ms), so a spray lasts two seconds.
pub const SPRAY_PER_TICK: u32 = 256;
/// The easy side starts this long after its try is due, so the hard side's mappings (due at
/// the same moment on its side) are open when the spray arrives.
pub const SPRAY_AFTER_MS: u64 = 1_000;
/// Tries are this far apart while the pair stays relayed...
pub const TRY_EVERY_MS: u64 = 60_000;
/// ...doubling up to this (a pair whose NATs defeat the technique costs little).
pub const MAX_TRY_EVERY_MS: u64 = 960_000;
/// Tries toward one address of the peer; after these fail, none until the lighthouses see
/// the peer somewhere else (its NAT defeats the technique, and a spray is 2 048 datagrams).
pub const MAX_TRIES_PER_ADDRESS: u32 = 5;
/// The easy side takes a datagram from the sprayed address as an answer this long after its
/// last spray went out.
pub const ANSWER_WITHIN_MS: u64 = 2_000;
const LOWEST_PORT: u32 = 1024;
const PORT_RANGE: u32 = 65_536 - LOWEST_PORT;

/// What this node does in a try, from its own NAT's mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// Unknown NAT, or many-port probing switched off (`[mesh] many_ports = false`).
    #[default]
    Off,
    /// Behind an endpoint-dependent NAT: open many ports toward the peer.
    Open,
    /// Behind an endpoint-independent NAT, or none: spray the peer's address.
    Spray,
}

impl Role {
    pub fn as_u8(self) -> u8 {
        match self {
            Role::Off => 0,
            Role::Open => 1,
            Role::Spray => 2,
        }
    }

    pub fn from_u8(v: u8) -> Role {
        match v {
            1 => Role::Open,
            2 => Role::Spray,
            _ => Role::Off,
        }
    }
}

/// What one timer tick asks of the data plane.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Open `OPEN_SOCKETS` sockets and send a keepalive from each to `to`; they listen until
    /// `until` (milliseconds, the data plane's clock).
    Open {
        to: SocketAddr,
        until: u64,
    },
    /// Send a keepalive to each of `ports` at `ip`.
    Spray {
        ip: Ipv4Addr,
        ports: Ports,
    },
}

/// Distinct ports of one spray: an affine permutation of 1024-65535 (`a` coprime to the range's
/// size), so a spray needs no memory and never repeats a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ports {
    a: u32,
    b: u32,
    next: u32,
    end: u32,
}

impl Iterator for Ports {
    type Item = u16;

    fn next(&mut self) -> Option<u16> {
        if self.next >= self.end {
            return None;
        }
        let offset =
            (u64::from(self.a) * u64::from(self.next) + u64::from(self.b)) % u64::from(PORT_RANGE);
        self.next += 1;
        u16::try_from(u64::from(LOWEST_PORT) + offset).ok()
    }
}

#[derive(Debug)]
struct Spray {
    ip: Ipv4Addr,
    a: u32,
    b: u32,
    sent: u32,
    at: u64,
}

/// One peer's tries.
#[derive(Debug, Default)]
pub struct ManyPorts {
    /// Since when the pair is relayed; 0: it is not.
    relayed_at: u64,
    /// When the last try was due, and the wait after it (0: no try made yet).
    last_try: u64,
    gap: u64,
    /// The hard side's open ports: where they sent, and until when they listen.
    open: Option<(SocketAddr, u64)>,
    spray: Option<Spray>,
    tries: u64,
    /// The address the last try went to, and how many tries went to it.
    target: Option<SocketAddr>,
    tries_to_target: u32,
}

impl ManyPorts {
    /// The pair moved onto a relay at `now`: a try is due at once, or when the last one's gap
    /// ends (a path found this way that keeps dying is not tried again at every fall).
    pub fn relayed(&mut self, now: u64) {
        if self.relayed_at == 0 {
            self.relayed_at = now.max(1);
        }
    }

    /// The pair is direct again: no more tries until it is relayed again.
    pub fn direct(&mut self) {
        self.relayed_at = 0;
        self.open = None;
        self.spray = None;
    }

    /// Tries made so far.
    pub fn tries(&self) -> u64 {
        self.tries
    }

    /// One timer tick of a relayed peer with a session, at `now`. `endpoint` is the peer's
    /// public address (as the lighthouses see it; none when it is not behind a NAT); `seed`
    /// varies per call (it picks the ports). `may` is false when the node's budget for this
    /// tick is spent (one spray, one set of open ports at a time): nothing happens, and
    /// nothing is counted, until a tick where it may.
    pub fn tick(
        &mut self,
        role: Role,
        endpoint: Option<SocketAddr>,
        (now, seed): (u64, u64),
        may: bool,
    ) -> Step {
        if role == Role::Off || self.relayed_at == 0 || !may {
            return Step::Nothing;
        }
        if let Some(s) = &mut self.spray {
            if s.sent < SPRAY_PORTS {
                let end = (s.sent + SPRAY_PER_TICK).min(SPRAY_PORTS);
                let ports = Ports {
                    a: s.a,
                    b: s.b,
                    next: s.sent,
                    end,
                };
                s.sent = end;
                s.at = now;
                return Step::Spray { ip: s.ip, ports };
            }
        }
        // The easy side starts a little later, so the hard side's mappings are open.
        let delay = if role == Role::Spray {
            SPRAY_AFTER_MS
        } else {
            0
        };
        let due = match self.gap {
            0 => self.relayed_at,
            gap => self.relayed_at.max(self.last_try + gap),
        };
        let Some(SocketAddr::V4(to)) = endpoint else {
            return Step::Nothing;
        };
        if self.target != endpoint {
            // Somewhere new: the tries start over.
            self.target = endpoint;
            self.tries_to_target = 0;
            self.gap = 0;
        }
        if now < due + delay || self.tries_to_target >= MAX_TRIES_PER_ADDRESS {
            return Step::Nothing;
        }
        self.tries_to_target += 1;
        self.gap = match self.gap {
            0 => TRY_EVERY_MS,
            g => g.saturating_mul(2).min(MAX_TRY_EVERY_MS),
        };
        self.last_try = now.saturating_sub(delay).max(due);
        self.tries += 1;
        match role {
            Role::Off => Step::Nothing,
            Role::Open => {
                let until = now + OPEN_FOR_MS;
                self.open = Some((SocketAddr::V4(to), until));
                Step::Open {
                    to: SocketAddr::V4(to),
                    until,
                }
            }
            Role::Spray => {
                let end = SPRAY_PER_TICK.min(SPRAY_PORTS);
                let (a, b) = permutation(seed);
                self.spray = Some(Spray {
                    ip: *to.ip(),
                    a,
                    b,
                    sent: end,
                    at: now,
                });
                Step::Spray {
                    ip: *to.ip(),
                    ports: Ports { a, b, next: 0, end },
                }
            }
        }
    }

    /// Whether an authenticated datagram that came directly from `from` at `now` answers this
    /// side's try: from the address the open ports sent to while they listen, or from the
    /// sprayed address soon after the spray. Either way the path works both ways.
    pub fn answers(&self, from: SocketAddr, now: u64) -> bool {
        self.open
            .is_some_and(|(to, until)| to == from && now <= until)
            || self.spray.as_ref().is_some_and(|s| {
                from.ip() == IpAddr::V4(s.ip) && now.saturating_sub(s.at) <= ANSWER_WITHIN_MS
            })
    }
}

/// A multiplier coprime to the port range (64 512 = 2^10 · 3^2 · 7) and an offset, from `seed`.
fn permutation(seed: u64) -> (u32, u32) {
    // SplitMix64's finaliser spreads a seed that changes little (a clock) over all bits.
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let mut a = ((z as u32) % PORT_RANGE) | 1;
    while a % 3 == 0 || a % 7 == 0 {
        a = (a + 2) % PORT_RANGE;
    }
    let b = ((z >> 32) as u32) % PORT_RANGE;
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_spray_covers_distinct_ports_above_1023_two_seconds_long() {
        let hard = addr("203.0.113.22:40000");
        let mut m = ManyPorts::default();
        m.relayed(1_000);
        // Not before the hard side has had a second to open its ports.
        assert_eq!(
            m.tick(Role::Spray, Some(hard), (1_500, 7), true),
            Step::Nothing
        );
        let mut ports = HashSet::new();
        let mut ticks = 0;
        let mut now = 2_000;
        loop {
            match m.tick(Role::Spray, Some(hard), (now, 7), true) {
                Step::Spray { ip, ports: p } => {
                    assert_eq!(IpAddr::V4(ip), hard.ip());
                    ports.extend(p);
                    ticks += 1;
                }
                Step::Nothing => break,
                other => panic!("{other:?}"),
            }
            now += 250;
        }
        assert_eq!(ticks, SPRAY_PORTS / SPRAY_PER_TICK);
        assert_eq!(ports.len(), SPRAY_PORTS as usize, "no port twice");
        assert!(ports.iter().all(|p| *p >= 1024));
        // An answer from any port of the sprayed address counts, for a while.
        assert!(m.answers(addr("203.0.113.22:61234"), now));
        assert!(!m.answers(addr("203.0.113.99:61234"), now));
        assert!(!m.answers(addr("203.0.113.22:61234"), now + ANSWER_WITHIN_MS + 250));
    }

    #[test]
    fn every_seed_gives_a_full_permutation() {
        for seed in [0, 1, 2, 3, 21, 63, 1 << 40, u64::MAX] {
            let (a, b) = permutation(seed);
            let all: HashSet<u16> = Ports {
                a,
                b,
                next: 0,
                end: PORT_RANGE,
            }
            .collect();
            assert_eq!(all.len(), PORT_RANGE as usize, "seed {seed}");
        }
    }

    #[test]
    fn the_hard_side_opens_ports_at_once_and_takes_only_the_easy_sides_answer_while_they_listen() {
        let easy = addr("203.0.113.21:51820");
        let mut m = ManyPorts::default();
        assert_eq!(
            m.tick(Role::Open, Some(easy), (5, 1), true),
            Step::Nothing,
            "not relayed"
        );
        m.relayed(1_000);
        assert_eq!(
            m.tick(Role::Open, Some(easy), (1_000, 1), true),
            Step::Open {
                to: easy,
                until: 1_000 + OPEN_FOR_MS
            }
        );
        assert!(m.answers(easy, 2_000));
        assert!(!m.answers(addr("203.0.113.21:51821"), 2_000));
        assert!(!m.answers(easy, 1_000 + OPEN_FOR_MS + 1));
        // The next try after the gap, then the gap doubles.
        assert_eq!(
            m.tick(Role::Open, Some(easy), (2_000, 1), true),
            Step::Nothing
        );
        let mut now = 1_000;
        let mut gaps = Vec::new();
        for _ in 1..MAX_TRIES_PER_ADDRESS {
            let mut t = now + 1_000;
            while !matches!(
                m.tick(Role::Open, Some(easy), (t, 1), true),
                Step::Open { .. }
            ) {
                t += 1_000;
            }
            gaps.push(t - now);
            now = t;
        }
        assert_eq!(gaps, vec![60_000, 120_000, 240_000, 480_000]);
        assert_eq!(m.tries(), u64::from(MAX_TRIES_PER_ADDRESS));
        // That address defeats the technique: no more tries toward it, however long...
        let much_later = now + 10 * MAX_TRY_EVERY_MS;
        assert_eq!(
            m.tick(Role::Open, Some(easy), (much_later, 1), true),
            Step::Nothing
        );
        // ...until the lighthouses see the peer somewhere else: at once, the gaps afresh.
        let moved = addr("198.51.100.4:51820");
        assert!(matches!(
            m.tick(Role::Open, Some(moved), (much_later + 1, 1), true),
            Step::Open { to, .. } if to == moved
        ));
        // A tick without the node's budget does nothing and counts nothing.
        let next = much_later + 1 + TRY_EVERY_MS;
        assert_eq!(
            m.tick(Role::Open, Some(moved), (next, 1), false),
            Step::Nothing
        );
        assert!(matches!(
            m.tick(Role::Open, Some(moved), (next, 1), true),
            Step::Open { .. }
        ));
        // Direct again: no tries. Relayed again at once: the next try waits out the gap;
        // relayed again long after: at once.
        let now = next;
        m.direct();
        assert_eq!(
            m.tick(Role::Open, Some(moved), (now + 10, 1), true),
            Step::Nothing
        );
        m.relayed(now + 10);
        assert_eq!(
            m.tick(Role::Open, Some(moved), (now + 20, 1), true),
            Step::Nothing
        );
        let later = now + MAX_TRY_EVERY_MS;
        assert!(matches!(
            m.tick(Role::Open, Some(moved), (later, 1), true),
            Step::Open { .. }
        ));
    }

    #[test]
    fn nothing_without_a_role_or_an_ipv4_address() {
        let mut m = ManyPorts::default();
        m.relayed(1);
        let v4 = addr("203.0.113.21:51820");
        assert_eq!(
            m.tick(Role::Off, Some(v4), (10_000, 1), true),
            Step::Nothing
        );
        assert_eq!(
            m.tick(
                Role::Open,
                Some(addr("[2001:db8::1]:51820")),
                (10_000, 1),
                true
            ),
            Step::Nothing
        );
        assert_eq!(m.tick(Role::Spray, None, (10_000, 1), true), Step::Nothing);
    }
}
