//! Which way a peer's datagrams go: straight to its endpoint, or through a relay (a lighthouse
//! that forwards them inside its own tunnels, seeing only ciphertext). Sans-IO: the data plane
//! reports what it sent and heard, on a millisecond clock, and `PathState` says when to fall
//! back to a relay, when to try the direct path again, and when a direct path is proven in
//! both directions. `PathLink` is the part the packet path reads without a lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Something was sent on the path in use and nothing came back on it for this long: the path
/// is dead. Peers are probed every 100 ms by default, so a live path answers three times within
/// it; a peer probed less often gets longer (`dead_after`). With the 250 ms timer tick the
/// switch comes 300-550 ms after the silence began: before TCP's second retransmission
/// (200 ms, then 400 ms more), so a stream's next retransmission already takes the relay.
pub const DEAD_AFTER_MS: u64 = 300;

/// How long a path may stay unanswered for a peer probed every `probe_interval_ms`: two probes
/// and an answer must fit, or a one-way stream between two probes would look like a dead path.
pub fn dead_after(probe_interval_ms: u64) -> u64 {
    DEAD_AFTER_MS.max(probe_interval_ms.saturating_mul(2).saturating_add(100))
}
/// A peer with no session yet goes to a relay after this long without an answer, however
/// slowly it is probed: a handshake takes one round trip, and crossing handshakes through two
/// NATs about two.
pub const FIRST_CONTACT_MS: u64 = 1_000;
/// A datagram through a relay moves a peer reached directly onto that relay once nothing came
/// directly for this long (the other side found the direct path dead first).
pub const FOLLOW_AFTER_MS: u64 = 500;
/// While relayed, the direct path is tried again this often...
pub const RETRY_DIRECT_MS: u64 = 5_000;
/// ...doubling up to this when a direct path fails again soon after an upgrade (a path that
/// works one way only would otherwise cost a short outage at every try).
pub const MAX_RETRY_DIRECT_MS: u64 = 300_000;
/// An upgrade that falls back sooner than this counts as failed.
const UPGRADE_HELD_MS: u64 = 10_000;
/// A direct datagram answers a direct probe sent this recently.
pub const PROBE_VALID_MS: u64 = 2_000;
/// Addresses one direct try goes to (the endpoint and the peer's candidates).
const MAX_TRIED: usize = 9;
/// While relayed, direct datagrams from one address are answered with a probe at most this
/// often (each of them would otherwise cost a keepalive).
const PROBE_GAP_MS: u64 = 250;

/// A peer reached directly over IPv4 is offered this node's IPv6 this often: a keepalive to
/// each of its global IPv6 candidates. Where IPv6 works both ways the peer follows the first
/// one that arrives (roaming on an authenticated datagram) and its answers move this side
/// too: IPv6 needs no NAT mapping to keep alive, so it is the better direct path.
pub const IPV6_OFFER_EVERY_MS: u64 = 30_000;
/// Each offer after which the peer is still reached over IPv4 doubles the wait, up to this:
/// IPv6 that does not work (or works one way only, where each offer costs the other side a
/// moment on a path that does not answer) is offered rarely.
pub const MAX_IPV6_OFFER_EVERY_MS: u64 = 960_000;
/// A peer moved from IPv4 to IPv6 does not follow IPv4 datagrams for this long: those the
/// other side sent before it moved too are still arriving (a roam away from IPv6 after this
/// is followed at once).
pub const IPV6_HOLD_MS: u64 = 500;
/// IPv6 candidates one offer goes to.
const MAX_IPV6_OFFERED: usize = 2;

/// An IPv6 offer that is due: where it goes, when the next is due and the wait after that.
#[derive(Debug, PartialEq)]
pub struct Ipv6Offer {
    pub to: Vec<SocketAddr>,
    pub next: u64,
    pub gap: u64,
}

/// The IPv6 candidates to offer a peer reached directly at `endpoint` (nothing when it is
/// reached over IPv6 already, or this node's socket has no IPv6), if an offer is due at `now`
/// (`next`: when it was due, 0: at once; `gap`: the wait after it, 0: the first).
pub fn ipv6_offer(
    endpoint: Option<SocketAddr>,
    candidates: &[SocketAddr],
    socket_has_v6: bool,
    now: u64,
    (next, gap): (u64, u64),
) -> Option<Ipv6Offer> {
    if !socket_has_v6 || !endpoint.is_some_and(|e| e.is_ipv4()) || now < next {
        return None;
    }
    let to: Vec<SocketAddr> = candidates
        .iter()
        .filter(|c| c.is_ipv6())
        .take(MAX_IPV6_OFFERED)
        .copied()
        .collect();
    let gap = if gap == 0 { IPV6_OFFER_EVERY_MS } else { gap };
    (!to.is_empty()).then(|| Ipv6Offer {
        to,
        next: now + gap,
        gap: gap.saturating_mul(2).min(MAX_IPV6_OFFER_EVERY_MS),
    })
}

/// First-contact copies go out once per this long at most per peer.
pub const FIRST_CONTACT_AGAIN_MS: u64 = 300_000;
/// A relayed peer without a session gets another handshake initiation through the relay
/// this long after the last (then 2 and 4 s), while something waits to go to it (boringtun
/// waits 5 s; a
/// handshake lost when both sides moved to the relay, or answered toward a NAT mapping that
/// was just dropped, would stall the path that long).
pub const RELAY_HANDSHAKE_AGAIN_MS: u64 = 1_000;
/// After answering a peer's handshake, this side starts none of its own (and sends nothing
/// that would make boringtun start one) for this long, or until the initiator's first
/// datagram confirms the session: two sides that initiated at once otherwise replace each
/// other's handshakes for as long as both keep sending. WireGuard's REKEY_TIMEOUT, the wait
/// the kernel's WireGuard keeps between initiations.
pub const CONFIRM_WAIT_MS: u64 = 5_000;
/// A handshake initiation to a member already reached (a rekey, every 2 min) races the same
/// way over the candidates of its endpoint's address family, once per this long at most: the
/// lowest-latency working path wins again, so a faster path that appeared since (a LAN the
/// robot joined) is taken, and IPv6 reached by an offer is not given up for IPv4.
pub const REKEY_RACE_AGAIN_MS: u64 = 100_000;
/// Candidates a first handshake initiation also goes to, besides the endpoint.
const MAX_FIRST_CONTACT: usize = 4;

/// Where a handshake initiation to a member never heard from yet goes besides `endpoint`:
/// each of its other candidates (its LAN and global IPv6 addresses) that this node's socket
/// can reach. The same initiation travels every path at once; the peer answers the copy that
/// arrives first (a later copy is a replay it rejects), and this node follows the answer's
/// source, so the first path to complete a handshake wins.
pub fn first_contact(
    endpoint: SocketAddr,
    candidates: &[SocketAddr],
    socket_has_v6: bool,
) -> impl Iterator<Item = SocketAddr> + '_ {
    candidates
        .iter()
        .filter(move |c| {
            // A member's candidates are its own word: only the kinds a member has besides its
            // public address (a LAN address, global IPv6), never another public IPv4 host.
            let own_kind = match c.ip() {
                std::net::IpAddr::V4(v4) => {
                    v4.is_private() || (v4.octets()[0] == 100 && v4.octets()[1] & 0xc0 == 64)
                }
                std::net::IpAddr::V6(_) => socket_has_v6,
            };
            **c != endpoint && own_kind
        })
        .take(MAX_FIRST_CONTACT)
        .copied()
}

/// What the packet path reads and writes per datagram, without a lock; shared by every
/// version of a peer with the same key, like its session.
#[derive(Debug, Default)]
pub struct PathLink {
    /// Datagrams go through `state`'s relay (read per packet).
    pub relayed: AtomicBool,
    /// Milliseconds (data-plane clock) of the last authenticated datagram that came directly,
    /// and through a relay; 0: none yet.
    pub direct_rx: AtomicU64,
    pub relayed_rx: AtomicU64,
    /// Something went to this peer since the last timer tick.
    pub sending: AtomicBool,
    /// When the next IPv6 offer is due (`ipv6_offer`; 0: with the first session), and the
    /// wait after it (0: the first; back to 0 once the peer is reached over IPv6).
    pub next_ipv6_offer: AtomicU64,
    pub ipv6_offer_gap: AtomicU64,
    /// When the peer last moved from IPv4 to IPv6 (`Peer::saw`); 0: never.
    pub ipv6_since: AtomicU64,
    /// When a handshake initiation last went to every candidate (`first_contact`); 0: never.
    pub first_contact_at: AtomicU64,
    /// When a handshake initiation last went through the relay (`RELAY_HANDSHAKE_AGAIN_MS`);
    /// 0: never.
    pub relay_handshake_at: AtomicU64,
    /// Initiations sent again through the relay in this attempt (reset once a session exists).
    pub relay_handshake_tries: std::sync::atomic::AtomicU8,
    /// When this side last answered the peer's handshake initiation; 0: never.
    pub responded_at: AtomicU64,
    pub state: Mutex<PathState>,
}

impl PathLink {
    /// The relay in use, if any.
    pub fn relay(&self) -> Option<[u8; 32]> {
        if !self.relayed.load(Ordering::Relaxed) {
            return None;
        }
        self.state.lock().ok().and_then(|s| s.relay)
    }

    /// How many times the path changed (direct to relay and back, or between relays).
    pub fn changes(&self) -> u64 {
        self.state.lock().map(|s| s.changes).unwrap_or(0)
    }
}

#[derive(Debug, Default)]
pub struct PathState {
    relay: Option<[u8; 32]>,
    /// Since when something sent on the path in use is unanswered; 0: nothing is.
    unanswered_since: u64,
    /// A direct keepalive sent while relayed: where, and when.
    probe: Option<(SocketAddr, u64)>,
    /// The direct try's other addresses (the peer's candidates), sent with `probe`'s time.
    tried: Vec<SocketAddr>,
    next_direct_try: u64,
    /// The current wait between direct tries (0: `RETRY_DIRECT_MS`).
    retry: u64,
    /// When the peer last moved (any way), and last moved back to direct.
    switched_at: u64,
    upgraded_at: u64,
    changes: u64,
    /// Many-port tries while relayed (`manyports`).
    many: super::manyports::ManyPorts,
}

/// What a directly received, authenticated datagram means for a relayed peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Direct {
    /// Not relayed: the endpoint follows the datagram, as WireGuard's roaming does.
    Follow,
    /// It answers this side's probe: the direct path works both ways; leave the relay and
    /// move the endpoint to it.
    Upgrade,
    /// It answers this side's many-port try: as `Upgrade`, found by probing many ports.
    ManyPorts,
    /// Answer with a direct probe (a keepalive) to this address: the other side confirms
    /// the path when it arrives.
    Probe(SocketAddr),
    /// Nothing to do (a probe went out a moment ago).
    Ignore,
}

/// What a timer tick asks of the data plane for one peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    Stay,
    /// Send through this relay from now on (and tell the peer at once: a keepalive, or a
    /// handshake where there is no session).
    Relay([u8; 32]),
    /// Send a keepalive directly to each of these addresses (the endpoint first, then the
    /// peer's candidates); an answer from any of them ends the relaying, there.
    TryDirect(Vec<SocketAddr>),
}

/// What the data plane saw of one peer between two timer ticks.
#[derive(Debug)]
pub struct Seen {
    pub now: u64,
    /// The previous tick's time.
    pub since: u64,
    pub sent: bool,
    pub direct_rx: u64,
    pub relayed_rx: u64,
    /// The address to try directly (its last known endpoint).
    pub endpoint: Option<SocketAddr>,
    /// Its other addresses (its candidates: LAN, global IPv6), tried with the endpoint.
    pub candidates: Vec<SocketAddr>,
    /// A session exists (a keepalive can be sent without a handshake).
    pub session: bool,
    /// How long the path may stay unanswered (`dead_after`).
    pub dead_after: u64,
    /// The relay in use answers its own probes (it is up; the peer behind it may not be).
    pub relay_alive: bool,
}

impl PathState {
    pub fn relay(&self) -> Option<[u8; 32]> {
        self.relay
    }

    fn switch(&mut self, to: Option<[u8; 32]>, now: u64) {
        if self.relay == to {
            return;
        }
        match (self.relay, to) {
            (Some(_), None) => {
                self.upgraded_at = now;
                self.many.direct();
            }
            (None, Some(_)) => {
                self.many.relayed(now);
                self.retry = if self.upgraded_at != 0
                    && now.saturating_sub(self.upgraded_at) < UPGRADE_HELD_MS
                {
                    (self.retry.max(RETRY_DIRECT_MS) * 2).min(MAX_RETRY_DIRECT_MS)
                } else {
                    RETRY_DIRECT_MS
                };
            }
            _ => {}
        }
        self.relay = to;
        self.changes += 1;
        self.switched_at = now;
        self.unanswered_since = 0;
        self.probe = None;
        self.tried.clear();
        self.next_direct_try = now + self.retry.max(RETRY_DIRECT_MS);
    }

    /// The next step of a many-port try for a relayed peer with a session (`endpoint`: its
    /// public address); nothing for a direct one.
    pub fn many_ports(
        &mut self,
        role: super::manyports::Role,
        (endpoint, session): (Option<SocketAddr>, bool),
        (now, seed): (u64, u64),
        may: bool,
    ) -> super::manyports::Step {
        if self.relay.is_none() || !session {
            return super::manyports::Step::Nothing;
        }
        self.many.tick(role, endpoint, (now, seed), may)
    }

    /// Many-port tries made for this peer.
    pub fn many_port_tries(&self) -> u64 {
        self.many.tries()
    }

    /// An authenticated datagram came directly from `from`.
    pub fn heard_direct(&mut self, from: SocketAddr, now: u64) -> Direct {
        if self.relay.is_none() {
            return Direct::Follow;
        }
        // The answer to a many-port try comes from a port nobody probed on purpose.
        if self.many.answers(from, now) {
            self.switch(None, now);
            return Direct::ManyPorts;
        }
        // While relayed, direct datagrams are only probes and their answers (data goes
        // through the relay until a side upgrades), so one from the address just probed
        // answers the probe.
        match self.probe {
            Some((to, at))
                if (to == from || self.tried.contains(&from))
                    && now.saturating_sub(at) <= PROBE_VALID_MS =>
            {
                self.switch(None, now);
                Direct::Upgrade
            }
            // A probe of this side's went out a moment ago: the other side may have tried at
            // the same moment from a port this side has not probed (its NAT maps per
            // destination). Answer it too, and take an answer from it as proof, without
            // forgetting this side's own try; bounded, so a burst is answered a few times.
            Some((_, at)) if now.saturating_sub(at) < PROBE_GAP_MS => {
                if self.tried.len() < MAX_TRIED {
                    self.tried.push(from);
                    Direct::Probe(from)
                } else {
                    Direct::Ignore
                }
            }
            _ => {
                self.probe = Some((from, now));
                self.tried.clear();
                Direct::Probe(from)
            }
        }
    }

    /// An authenticated datagram came through relay `via`; true when this moved the peer
    /// onto it. A peer reached directly stays direct while it was heard directly within
    /// `FOLLOW_AFTER_MS`: datagrams still in flight through the relay must not undo an upgrade.
    /// Between two relays only the side that `yields` (one side of each pair, by key) follows
    /// the other's choice, and not within `FOLLOW_AFTER_MS` of its last move: two sides that
    /// chose different relays settle on one instead of trading places.
    pub fn heard_relayed(&mut self, via: [u8; 32], direct_rx: u64, now: u64, yields: bool) -> bool {
        match self.relay {
            Some(r) if r == via => false,
            Some(_) if yields && now.saturating_sub(self.switched_at) > FOLLOW_AFTER_MS => {
                self.switch(Some(via), now);
                true
            }
            Some(_) => false,
            None if direct_rx == 0 || now.saturating_sub(direct_rx) > FOLLOW_AFTER_MS => {
                self.switch(Some(via), now);
                true
            }
            None => false,
        }
    }

    /// One timer tick; `relays` are the relays this node may use, in order of preference.
    pub fn tick(&mut self, seen: &Seen, relays: &[[u8; 32]]) -> Tick {
        let heard = if self.relay.is_some() {
            seen.relayed_rx
        } else {
            seen.direct_rx
        };
        // Silence counts from the last datagram heard on the path (or from the first sending
        // after a quiet spell), and only while something is being sent.
        // A tick that sent nothing, with the last send answered (heard at or after it), ends
        // the count: a quiet spell must not count as silence when sending starts again, 10 s
        // later (members of one group are probed that rarely while idle).
        if self.unanswered_since != 0
            && (heard > self.unanswered_since || (!seen.sent && heard >= self.unanswered_since))
        {
            self.unanswered_since = 0;
        }
        if seen.sent && self.unanswered_since == 0 {
            self.unanswered_since = heard.max(seen.since).max(1);
        }
        let limit = if seen.session {
            seen.dead_after
        } else {
            seen.dead_after.min(FIRST_CONTACT_MS)
        };
        let dead = seen.sent
            && self.unanswered_since != 0
            && seen.now.saturating_sub(self.unanswered_since) >= limit;
        match self.relay {
            None => match relays.first() {
                Some(first) if dead => {
                    self.switch(Some(*first), seen.now);
                    Tick::Relay(*first)
                }
                _ => Tick::Stay,
            },
            Some(via) => {
                let at = relays.iter().position(|r| *r == via);
                // The relay went away (or stopped relaying), or is itself silent while another
                // exists: the next one; with none left, the direct path is all there is. A
                // peer that is simply offline behind a live relay stays where it is.
                let next = match at {
                    None => Some(relays.first().copied()),
                    Some(i) if dead && !seen.relay_alive && relays.len() > 1 => {
                        relays.get((i + 1) % relays.len()).copied().map(Some)
                    }
                    _ => None,
                };
                if let Some(next) = next {
                    self.switch(next, seen.now);
                    return match next {
                        Some(r) => Tick::Relay(r),
                        None => Tick::Stay,
                    };
                }
                let mut targets: Vec<SocketAddr> = seen.endpoint.into_iter().collect();
                for c in &seen.candidates {
                    if !targets.contains(c) && targets.len() < MAX_TRIED {
                        targets.push(*c);
                    }
                }
                match targets.split_first() {
                    Some((first, rest)) if seen.session && seen.now >= self.next_direct_try => {
                        self.next_direct_try = seen.now + self.retry.max(RETRY_DIRECT_MS);
                        self.probe = Some((*first, seen.now));
                        self.tried = rest.to_vec();
                        Tick::TryDirect(targets)
                    }
                    _ => Tick::Stay,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L1: [u8; 32] = [1; 32];

    #[test]
    fn a_many_port_answer_ends_the_relaying_on_either_side() {
        use super::super::manyports::{Role, Step};
        let easy = addr("203.0.113.21:51820");
        let hard = addr("203.0.113.22:40000");
        for (role, peer, answer) in [
            (Role::Open, easy, easy),
            (Role::Spray, hard, addr("203.0.113.22:51234")),
        ] {
            let mut s = PathState::default();
            assert_eq!(
                s.many_ports(role, (Some(peer), true), (1_000, 9), true),
                Step::Nothing,
                "nothing while direct"
            );
            assert!(s.heard_relayed(L1, 0, 1_000, false));
            let mut now = 1_000;
            while s.many_ports(role, (Some(peer), true), (now, 9), true) == Step::Nothing {
                now += 250;
                assert!(now < 5_000, "{role:?}: no try");
            }
            assert_eq!(s.many_port_tries(), 1);
            // Too late to be an answer: a datagram from there is probed like any other.
            let mut late = PathState::default();
            assert!(late.heard_relayed(L1, 0, 1_000, false));
            let mut t = 1_000;
            while late.many_ports(role, (Some(peer), true), (t, 9), true) == Step::Nothing {
                t += 250;
            }
            let after = t + super::super::manyports::OPEN_FOR_MS + 2_500;
            assert_eq!(
                late.heard_direct(answer, after),
                Direct::Probe(answer),
                "{role:?}"
            );
            assert_eq!(
                s.heard_direct(answer, now + 100),
                Direct::ManyPorts,
                "{role:?}"
            );
            assert_eq!(s.relay(), None);
            assert_eq!(
                s.many_ports(role, (Some(peer), true), (now + 200, 9), true),
                Step::Nothing,
                "{role:?}: no tries once direct"
            );
        }
    }

    #[test]
    fn a_first_handshake_goes_to_every_candidate_the_socket_can_reach() {
        let endpoint = addr("198.51.100.7:51820");
        let lan = addr("10.1.0.2:51820");
        let v6 = addr("[2001:db8::2]:51820");
        let candidates = [endpoint, lan, v6];
        let both: Vec<SocketAddr> = first_contact(endpoint, &candidates, true).collect();
        assert_eq!(both, vec![lan, v6], "never the endpoint twice");
        let v4: Vec<SocketAddr> = first_contact(endpoint, &candidates, false).collect();
        assert_eq!(v4, vec![lan], "an IPv4-only socket cannot reach IPv6");
        let public = addr("192.0.2.80:80");
        let only_own: Vec<SocketAddr> =
            first_contact(endpoint, &[public, lan, addr("100.72.0.9:51820")], true).collect();
        assert_eq!(
            only_own,
            vec![lan, addr("100.72.0.9:51820")],
            "never another public IPv4 host"
        );
        let many: Vec<SocketAddr> = (1..=9)
            .map(|n| addr(&format!("10.1.0.{n}:51820")))
            .collect();
        assert_eq!(
            first_contact(endpoint, &many, true).count(),
            MAX_FIRST_CONTACT
        );
    }

    #[test]
    fn a_peer_direct_over_ipv4_is_offered_ipv6_now_and_then() {
        let v4: SocketAddr = "203.0.113.21:51820".parse().unwrap();
        let v6: SocketAddr = "[2001:db8:99::3]:51820".parse().unwrap();
        let lan: SocketAddr = "192.168.1.3:51820".parse().unwrap();
        let candidates = [lan, v6];
        // At once, to the IPv6 candidates only; then not before the interval.
        let first = ipv6_offer(Some(v4), &candidates, true, 1_000, (0, 0)).unwrap();
        let next = 1_000 + IPV6_OFFER_EVERY_MS;
        assert_eq!(
            first,
            Ipv6Offer {
                to: vec![v6],
                next,
                gap: 2 * IPV6_OFFER_EVERY_MS
            }
        );
        let due = (first.next, first.gap);
        assert!(ipv6_offer(Some(v4), &candidates, true, next - 1, due).is_none());
        // Still on IPv4 at each offer: the waits double, up to the most.
        let mut due = due;
        let mut waits = Vec::new();
        let mut now = next;
        for _ in 0..8 {
            let o = ipv6_offer(Some(v4), &candidates, true, now, due).unwrap();
            waits.push((o.next - now) / 1_000);
            now = o.next;
            due = (o.next, o.gap);
        }
        assert_eq!(waits, [60, 120, 240, 480, 960, 960, 960, 960]);
        // Reached over IPv6 already, an IPv4-only socket, no IPv6 candidate, no endpoint.
        assert!(ipv6_offer(Some(v6), &candidates, true, 1_000, (0, 0)).is_none());
        assert!(ipv6_offer(Some(v4), &candidates, false, 1_000, (0, 0)).is_none());
        assert!(ipv6_offer(Some(v4), &[lan], true, 1_000, (0, 0)).is_none());
        assert!(ipv6_offer(None, &candidates, true, 1_000, (0, 0)).is_none());
    }
    const L2: [u8; 32] = [2; 32];

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn seen(now: u64, sent: bool, direct_rx: u64, relayed_rx: u64) -> Seen {
        Seen {
            now,
            since: now.saturating_sub(250),
            sent,
            direct_rx,
            relayed_rx,
            endpoint: Some(addr("198.51.100.7:51820")),
            candidates: Vec::new(),
            session: true,
            dead_after: dead_after(100),
            relay_alive: true,
        }
    }

    #[test]
    fn a_quiet_spell_is_not_silence_when_sending_starts_again() {
        // A probe at 10 ms answered at 10.3 ms, the tick at 250 ms; then nothing for 10 s (an
        // idle member of one's own group); then a send whose answer comes after the next tick.
        let mut p = PathState::default();
        let mut s = seen(250, true, 10, 0);
        s.dead_after = dead_after(1_000);
        assert_eq!(p.tick(&s, &[L1]), Tick::Stay);
        for t in (500..10_250).step_by(250) {
            let mut s = seen(t, false, 10, 0);
            s.dead_after = dead_after(1_000);
            assert_eq!(p.tick(&s, &[L1]), Tick::Stay, "at {t} ms");
        }
        let mut s = seen(10_250, true, 10, 0);
        s.dead_after = dead_after(1_000);
        assert_eq!(
            p.tick(&s, &[L1]),
            Tick::Stay,
            "the first send after the spell"
        );
        let mut s = seen(10_500, false, 10_260, 0);
        s.dead_after = dead_after(1_000);
        assert_eq!(p.tick(&s, &[L1]), Tick::Stay);
        // A path that then really dies is still judged within its limit.
        let mut moved = None;
        for t in (10_750..14_000).step_by(250) {
            let mut s = seen(t, true, 10_260, 0);
            s.dead_after = dead_after(1_000);
            if p.tick(&s, &[L1]) == Tick::Relay(L1) {
                moved = Some(t);
                break;
            }
        }
        let moved = moved.expect("relayed");
        assert!(moved - 10_750 <= dead_after(1_000) + 250, "at {moved} ms");
    }

    #[test]
    fn a_peer_probed_once_a_second_is_not_judged_between_its_probes() {
        // A one-way stream to the peer every tick; its probe answers come once a second.
        let mut p = PathState::default();
        for t in (250..20_000).step_by(250) {
            let pong = t - t % 1_000 + 20;
            let pong = if pong > t { pong - 1_000 } else { pong };
            let mut s = seen(t, true, pong, 0);
            s.dead_after = dead_after(1_000);
            assert_eq!(p.tick(&s, &[L1]), Tick::Stay, "at {t} ms");
        }
    }

    #[test]
    fn a_path_that_answers_stays_direct_and_one_that_goes_silent_moves_to_the_relay() {
        let mut p = PathState::default();
        // Probes every tick, answered within the tick: never dead.
        for t in (250..5_000).step_by(250) {
            assert_eq!(p.tick(&seen(t, true, t - 20, 0), &[L1]), Tick::Stay);
        }
        // Silence from 5 000 ms on while sending: relayed within DEAD_AFTER plus a tick.
        let mut moved = None;
        for t in (5_000..8_000).step_by(250) {
            if let Tick::Relay(r) = p.tick(&seen(t, true, 4_980, 0), &[L1]) {
                moved = Some((t, r));
                break;
            }
        }
        let (at, via) = moved.expect("moved to the relay");
        assert_eq!(via, L1);
        assert!(
            at - 4_980 <= DEAD_AFTER_MS + 250,
            "relayed after {} ms",
            at - 4_980
        );
        assert_eq!(p.relay(), Some(L1));
        // Nothing sent, nothing heard: an idle peer is never judged.
        let mut idle = PathState::default();
        for t in (250..10_000).step_by(250) {
            assert_eq!(idle.tick(&seen(t, false, 0, 0), &[L1]), Tick::Stay);
        }
        // A peer probed once a second that never answered waits FIRST_CONTACT_MS, not 2.2 s.
        let mut first = PathState::default();
        let mut relayed_at = None;
        for t in (250..5_000).step_by(250) {
            let mut s = seen(t, true, 0, 0);
            s.session = false;
            s.dead_after = dead_after(1_000);
            if first.tick(&s, &[L1]) == Tick::Relay(L1) {
                relayed_at = Some(t);
                break;
            }
        }
        assert!(
            relayed_at.is_some_and(|t| t <= 250 + FIRST_CONTACT_MS),
            "{relayed_at:?}"
        );
        // Without a relay a dead path has nowhere to go.
        let mut alone = PathState::default();
        for t in (250..5_000).step_by(250) {
            assert_eq!(alone.tick(&seen(t, true, 0, 0), &[]), Tick::Stay);
        }
    }

    #[test]
    fn while_relayed_the_direct_path_is_tried_and_taken_only_once_proven_both_ways() {
        let mut a = PathState::default();
        let mut b = PathState::default();
        let a_at = addr("203.0.113.1:40000");
        let b_at = addr("198.51.100.7:51820");
        a.switch(Some(L1), 1_000);
        assert!(
            b.heard_relayed(L1, 0, 1_010, false),
            "a peer never reached directly follows at once"
        );
        // A tries directly after RETRY_DIRECT_MS.
        let mut tried = None;
        for t in (1_250..8_000).step_by(250) {
            if let Tick::TryDirect(to) = a.tick(&seen(t, true, 0, t - 10), &[L1]) {
                tried = Some((t, to));
                break;
            }
        }
        let (t, to) = tried.expect("a direct try");
        assert_eq!(to, vec![b_at]);
        assert!(t >= 1_000 + RETRY_DIRECT_MS);
        // B hears it directly: it answers with its own probe and stays relayed.
        assert_eq!(b.heard_direct(a_at, t + 5), Direct::Probe(a_at));
        assert_eq!(b.relay(), Some(L1));
        // Another address a moment later (a NAT that maps anew) is probed too, a few at
        // most, and an answer from any of them would prove the path.
        let anew = addr("203.0.113.1:40001");
        assert_eq!(b.heard_direct(anew, t + 6), Direct::Probe(anew));
        assert_eq!(b.heard_direct(anew, t + 7), Direct::Upgrade);
        b.switch(Some(L1), t + 7);
        assert_eq!(b.heard_direct(a_at, t + 8), Direct::Probe(a_at));
        for port in 0..MAX_TRIED as u16 {
            let at = SocketAddr::new(a_at.ip(), 50_000 + port);
            assert_eq!(b.heard_direct(at, t + 9), Direct::Probe(at));
        }
        assert_eq!(
            b.heard_direct(addr("203.0.113.1:40002"), t + 9),
            Direct::Ignore
        );
        // A hears B's probe: proven both ways.
        assert_eq!(a.heard_direct(b_at, t + 10), Direct::Upgrade);
        assert_eq!(a.relay(), None);
        // A's data now arrive at B directly: B had probed A's address, so it upgrades too.
        assert_eq!(b.heard_direct(a_at, t + 15), Direct::Upgrade);
        assert_eq!(b.relay(), None);
        // Relayed datagrams still in flight do not undo it.
        assert!(!b.heard_relayed(L1, t + 15, t + 20, true));
        assert_eq!(b.relay(), None);
        assert_eq!(a.heard_direct(b_at, t + 30), Direct::Follow);
    }

    #[test]
    fn a_direct_try_goes_to_every_candidate_and_any_answer_proves_its_own_address() {
        let mut a = PathState::default();
        a.switch(Some(L1), 0);
        let v6 = addr("[2001:db8:99::6]:51820");
        let lan = addr("10.4.0.2:51820");
        let mut s = seen(RETRY_DIRECT_MS, true, 0, RETRY_DIRECT_MS - 10);
        s.candidates = vec![lan, v6, addr("198.51.100.7:51820")];
        assert_eq!(
            a.tick(&s, &[L1]),
            Tick::TryDirect(vec![addr("198.51.100.7:51820"), lan, v6])
        );
        // The IPv6 candidate answers: the upgrade goes there.
        assert_eq!(a.heard_direct(v6, RETRY_DIRECT_MS + 3), Direct::Upgrade);
        assert_eq!(a.relay(), None);
    }

    #[test]
    fn a_direct_datagram_from_elsewhere_is_no_proof() {
        let mut a = PathState::default();
        a.switch(Some(L1), 0);
        a.probe = Some((addr("198.51.100.7:51820"), 100));
        // From another address (the probe went elsewhere): probe it, no upgrade.
        let other = addr("198.51.100.7:6000");
        assert_eq!(a.heard_direct(other, 400), Direct::Probe(other));
        assert_eq!(a.relay(), Some(L1));
        // An answer long after the probe proves nothing either.
        assert_eq!(
            a.heard_direct(other, 400 + PROBE_VALID_MS + 1),
            Direct::Probe(other)
        );
        assert_eq!(a.relay(), Some(L1));
    }

    #[test]
    fn a_dead_relay_gives_way_to_the_next_and_a_vanished_one_to_the_first() {
        // A peer offline behind a live relay: no rotation.
        let mut offline = PathState::default();
        offline.switch(Some(L1), 0);
        for t in (250..5_000).step_by(250) {
            assert_eq!(
                offline.tick(&seen(t, true, 0, 0), &[L1, L2]),
                Tick::Stay,
                "at {t}"
            );
        }
        let mut p = PathState::default();
        p.switch(Some(L1), 0);
        let mut moved = None;
        for t in (250..5_000).step_by(250) {
            let mut s = seen(t, true, 0, 0);
            s.relay_alive = false;
            if let Tick::Relay(r) = p.tick(&s, &[L1, L2]) {
                moved = Some(r);
                break;
            }
        }
        assert_eq!(moved, Some(L2));
        // L2 stops relaying: back to L1 at once.
        assert_eq!(p.tick(&seen(6_000, false, 0, 0), &[L1]), Tick::Relay(L1));
        // No relay left: direct.
        assert_eq!(p.tick(&seen(6_250, false, 0, 0), &[]), Tick::Stay);
        assert_eq!(p.relay(), None);
        assert!(p.changes >= 4);
    }

    #[test]
    fn a_relayed_datagram_moves_a_direct_peer_only_once_direct_went_quiet() {
        let mut p = PathState::default();
        assert!(!p.heard_relayed(L1, 1_000, 1_000 + FOLLOW_AFTER_MS, true));
        assert_eq!(p.relay(), None);
        assert!(p.heard_relayed(L1, 1_000, 1_001 + FOLLOW_AFTER_MS, true));
        assert_eq!(p.relay(), Some(L1));
        // Through another relay: the side that yields follows it, not at once after a move.
        assert!(!p.heard_relayed(L2, 0, 1_600, true));
        assert!(!p.heard_relayed(L2, 0, 2_600, false));
        assert_eq!(p.relay(), Some(L1));
        assert!(p.heard_relayed(L2, 0, 2_600, true));
        assert_eq!(p.relay(), Some(L2));
    }

    #[test]
    fn two_sides_on_different_relays_settle_on_one() {
        let (mut a, mut b) = (PathState::default(), PathState::default());
        a.switch(Some(L1), 0);
        b.switch(Some(L2), 0);
        // Each hears the other through the other's relay, over and over; A yields.
        for t in (600..5_000).step_by(50) {
            a.heard_relayed(b.relay().unwrap(), 0, t, true);
            b.heard_relayed(a.relay().unwrap(), 0, t, false);
        }
        assert_eq!(a.relay(), Some(L2));
        assert_eq!(b.relay(), Some(L2));
        assert_eq!(a.changes, 2);
        assert_eq!(b.changes, 1);
    }

    #[test]
    fn a_direct_path_that_fails_right_after_an_upgrade_is_tried_less_often() {
        let mut p = PathState::default();
        let mut now = 0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            p.switch(Some(L1), now);
            waits.push(p.next_direct_try - now);
            // Upgraded at the try, and dead again 2 s later.
            now = p.next_direct_try;
            p.switch(None, now);
            now += 2_000;
        }
        assert_eq!(waits[0], RETRY_DIRECT_MS);
        assert_eq!(waits[1], 2 * RETRY_DIRECT_MS);
        assert_eq!(*waits.last().unwrap(), MAX_RETRY_DIRECT_MS);
        // A direct path that held for a while starts again from 5 s.
        p.switch(Some(L1), now + UPGRADE_HELD_MS + 1);
        assert_eq!(
            p.next_direct_try - (now + UPGRADE_HELD_MS + 1),
            RETRY_DIRECT_MS
        );
    }
}
