//! Probes: every interval each peer gets a small ping inside the tunnel (to a fixed UDP port on
//! its overlay address) and answers with a pong. The round trips give RTT, jitter and loss.
//! Authentication comes from the tunnel: the probe socket is bound to the TUN device, so only
//! packets that WireGuard decapsulated (and whose source is one of the peer's allowed IPs)
//! reach it. A pong also has to echo this prober's random session nonce, so a forged pong must
//! have seen the ping it answers.
//!
//! Wire format, 24 bytes: `b"MYP2"`, kind (1 = ping, 2 = pong), 3 zero bytes, sequence (u64 BE),
//! the pinging node's session nonce (u64 BE; a pong echoes it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub const PROBE_LEN: usize = 24;
const MAGIC: &[u8; 4] = b"MYP2";
const PING: u8 = 1;
const PONG: u8 = 2;
/// Probes remembered per peer for loss.
const WINDOW: usize = 100;
/// A peer that may idle and carried nothing but probes for this long is probed only every
/// `IDLE_PROBE_INTERVAL`: in a fleet of fifty, each robot probing every other robot once a
/// second cost it more than everything else it did while idle.
pub const IDLE_AFTER: Duration = Duration::from_secs(10);
pub const IDLE_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// What the probes say about one peer.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProbeStats {
    /// The latest round trip.
    pub rtt: Option<Duration>,
    /// Smoothed variation between consecutive round trips (RFC 3550 style).
    pub jitter: Option<Duration>,
    /// Share of decided probes in the window that were lost; `None` until a first answer.
    pub loss: Option<f64>,
    /// Since the latest answer.
    pub last_seen: Option<Duration>,
    /// Answers received in all.
    pub answered: u64,
}

#[derive(Debug)]
struct Sent {
    seq: u64,
    at: Instant,
    rtt: Option<Duration>,
}

#[derive(Debug)]
struct PeerProbe {
    next_seq: u64,
    due: Instant,
    window: VecDeque<Sent>,
    last_rtt: Option<Duration>,
    jitter: Option<f64>,
    last_seen: Option<Instant>,
    answered: u64,
    /// Whether the slot holds a peer; an empty slot is never probed.
    active: bool,
    /// This peer's own cadence, when slower than the prober's.
    interval: Option<Duration>,
    /// Whether it is probed only while it carries traffic (else every `IDLE_PROBE_INTERVAL`).
    idles: bool,
    /// Probe datagrams exchanged with it (pings and pongs, both ways): what its packet
    /// counters hold besides its traffic.
    exchanged: u64,
    /// The most its packets less `exchanged` have been; `None` until first told.
    traffic: Option<u64>,
    /// Whether they were below that when last told.
    dipped: bool,
    /// When it last carried traffic (or began to be probed).
    active_at: Instant,
}

impl PeerProbe {
    fn fresh(now: Instant) -> Self {
        Self {
            next_seq: 1,
            due: now,
            window: VecDeque::with_capacity(WINDOW),
            last_rtt: None,
            jitter: None,
            last_seen: None,
            answered: 0,
            active: true,
            interval: None,
            idles: false,
            exchanged: 0,
            traffic: None,
            dipped: false,
            active_at: now,
        }
    }

    /// Whether it idles now: it may, and carried nothing but probes for `IDLE_AFTER`.
    fn quiet(&self, now: Instant) -> bool {
        self.idles && now.saturating_duration_since(self.active_at) >= IDLE_AFTER
    }
}

/// Probe state for all peers.
#[derive(Debug)]
pub struct Prober {
    /// Random per prober: what a pong must echo to count.
    session: u64,
    interval: Duration,
    lost_after: Duration,
    peers: Vec<PeerProbe>,
}

fn encode(kind: u8, seq: u64, nonce: u64) -> [u8; PROBE_LEN] {
    let mut out = [0u8; PROBE_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4] = kind;
    out[8..16].copy_from_slice(&seq.to_be_bytes());
    out[16..].copy_from_slice(&nonce.to_be_bytes());
    out
}

/// A probe datagram: kind, sequence and nonce; `None` for anything else.
pub fn decode(bytes: &[u8]) -> Option<(u8, u64, u64)> {
    if bytes.len() != PROBE_LEN || bytes.get(..4)? != MAGIC {
        return None;
    }
    let seq = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
    let nonce = u64::from_be_bytes(bytes.get(16..24)?.try_into().ok()?);
    let kind = *bytes.get(4)?;
    matches!(kind, PING | PONG).then_some((kind, seq, nonce))
}

impl Prober {
    /// `session` is the nonce pongs must echo: random, fresh for every run of the node.
    pub fn new(peers: usize, interval: Duration, now: Instant, session: u64) -> Self {
        let interval = interval.max(Duration::from_millis(1));
        Self {
            session,
            interval,
            // Long enough for any sane path; a late answer still counts for RTT.
            lost_after: (interval * 5).max(Duration::from_secs(1)),
            peers: (0..peers).map(|_| PeerProbe::fresh(now)).collect(),
        }
    }

    /// Starts probing `peer` afresh (a peer was added to, or replaced in, that slot), every
    /// `interval` if given, else at the prober's cadence; a peer that `idles` is probed so only
    /// while it carries traffic (see `traffic`).
    pub fn track(&mut self, peer: usize, now: Instant, interval: Option<Duration>, idles: bool) {
        if self.peers.len() <= peer {
            self.peers.resize_with(peer + 1, || PeerProbe {
                active: false,
                ..PeerProbe::fresh(now)
            });
        }
        if let Some(p) = self.peers.get_mut(peer) {
            *p = PeerProbe {
                interval: interval.map(|i| i.max(self.interval)),
                idles,
                ..PeerProbe::fresh(now)
            };
        }
    }

    /// Stops probing `peer` (its slot was emptied); its figures are dropped.
    pub fn untrack(&mut self, peer: usize) {
        if let Some(p) = self.peers.get_mut(peer) {
            *p = PeerProbe {
                active: false,
                ..PeerProbe::fresh(p.due)
            };
        }
    }

    /// `packets`: all packets to and from `peer` so far (its tunnel's counters, probes
    /// included). Traffic besides probes keeps an idling peer probed at its cadence; a peer
    /// that wakes from idling is probed at once, so a path judged by its probes is measured
    /// from the first packet on.
    pub fn traffic(&mut self, peer: usize, packets: u64, now: Instant) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        if !p.active || !p.idles {
            return;
        }
        // Against the most seen: the counters and `exchanged` move at slightly different
        // moments (a ping is counted here before the data plane reads it from the TUN), and a
        // dip that recovers is no traffic. A dip seen twice in a row is no such moment but
        // probes that never reached the tunnel (no session yet, a failed send): the mark
        // follows it, or they would hide as much traffic later.
        let traffic = packets.wrapping_sub(p.exchanged);
        let (grew, dipped) = match p.traffic {
            Some(most) => {
                let d = traffic.wrapping_sub(most) as i64;
                (d > 0, d < 0)
            }
            None => (false, false),
        };
        if grew || p.traffic.is_none() || (dipped && p.dipped) {
            p.traffic = Some(traffic);
        }
        p.dipped = dipped;
        if grew {
            if p.quiet(now) {
                p.due = now;
            }
            p.active_at = now;
        }
    }

    /// The next ping that is due at `now`, with the peer it goes to.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(usize, [u8; PROBE_LEN])> {
        let default = self.interval;
        let (idx, p) = self
            .peers
            .iter_mut()
            .enumerate()
            .find(|(_, p)| p.active && p.due <= now)?;
        let interval = if p.quiet(now) {
            IDLE_PROBE_INTERVAL
        } else {
            p.interval.unwrap_or(default)
        };
        let seq = p.next_seq;
        p.next_seq += 1;
        p.exchanged += 1;
        // Keep a steady cadence, but never try to catch up on missed intervals.
        p.due = if p.due + interval > now {
            p.due + interval
        } else {
            now + interval
        };
        if p.window.len() == WINDOW {
            p.window.pop_front();
        }
        p.window.push_back(Sent {
            seq,
            at: now,
            rtt: None,
        });
        Some((idx, encode(PING, seq, self.session)))
    }

    /// When `poll_transmit` next has something.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers.iter().filter(|p| p.active).map(|p| p.due).min()
    }

    /// A datagram from `peer` arrived on the probe port. Returns the pong to send back for a
    /// ping; records the round trip for a pong. Anything else is ignored.
    pub fn handle_input(
        &mut self,
        peer: usize,
        bytes: &[u8],
        now: Instant,
    ) -> Option<[u8; PROBE_LEN]> {
        let (kind, seq, nonce) = decode(bytes)?;
        if let Some(p) = self.peers.get_mut(peer) {
            // A ping in and its pong out, or a pong in.
            p.exchanged += if kind == PING { 2 } else { 1 };
        }
        if kind == PING {
            return Some(encode(PONG, seq, nonce));
        }
        if nonce != self.session {
            return None;
        }
        let p = self.peers.get_mut(peer)?;
        let sent = p
            .window
            .iter_mut()
            .find(|s| s.seq == seq && s.rtt.is_none())?;
        let rtt = now.saturating_duration_since(sent.at);
        sent.rtt = Some(rtt);
        if let Some(prev) = p.last_rtt {
            let d = (rtt.as_secs_f64() - prev.as_secs_f64()).abs();
            let j = p.jitter.unwrap_or(d);
            p.jitter = Some(j + (d - j) / 16.0);
        }
        p.last_rtt = Some(rtt);
        p.last_seen = Some(now);
        p.answered += 1;
        None
    }

    /// The latest `n` probes to `peer`, oldest first.
    pub fn recent(&self, peer: usize, now: Instant, n: usize) -> Vec<myelin_sdk::ProbeSample> {
        let Some(p) = self.peers.get(peer) else {
            return Vec::new();
        };
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        p.window
            .iter()
            .skip(p.window.len().saturating_sub(n))
            .map(|s| myelin_sdk::ProbeSample {
                seq: s.seq,
                age_ms: ms(now.saturating_duration_since(s.at)),
                rtt_ms: s.rtt.map(ms),
            })
            .collect()
    }

    /// How many probes to `peer` were answered, and the latest round trip: what the caller
    /// needs per datagram, without the work of `stats`.
    pub fn answered(&self, peer: usize) -> (u64, Option<Duration>) {
        self.peers
            .get(peer)
            .map_or((0, None), |p| (p.answered, p.last_rtt))
    }

    pub fn stats(&self, peer: usize, now: Instant) -> ProbeStats {
        let Some(p) = self.peers.get(peer) else {
            return ProbeStats::default();
        };
        // Counted in one pass, without a list: this runs for every peer in every view.
        let (decided, lost) = p.window.iter().fold((0usize, 0usize), |(d, l), s| {
            if s.rtt.is_some() {
                (d + 1, l)
            } else if now.saturating_duration_since(s.at) >= self.lost_after {
                (d + 1, l + 1)
            } else {
                (d, l)
            }
        });
        let loss = (p.answered > 0 && decided > 0).then(|| lost as f64 / decided as f64);
        ProbeStats {
            rtt: p.last_rtt,
            jitter: p.jitter.map(Duration::from_secs_f64),
            loss,
            last_seen: p.last_seen.map(|t| now.saturating_duration_since(t)),
            answered: p.answered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn peers_added_and_removed_are_probed_and_forgotten() {
        let t0 = Instant::now();
        let mut a = Prober::new(0, 100 * MS, t0, 7);
        assert_eq!(a.poll_timeout(), None, "nobody to probe: no wake-up");
        a.track(2, t0, None, false);
        assert_eq!(a.poll_timeout(), Some(t0));
        let (idx, _) = a.poll_transmit(t0).unwrap();
        assert_eq!(idx, 2, "empty slots 0 and 1 are never probed");
        assert!(a.poll_transmit(t0).is_none());
        a.untrack(2);
        assert_eq!(a.poll_timeout(), None);
        assert!(a.poll_transmit(t0 + 1000 * MS).is_none());
        a.track(2, t0 + 1000 * MS, None, false);
        assert_eq!(
            a.answered(2),
            (0, None),
            "a new peer in the slot starts afresh"
        );
    }

    /// Pings from `a` to its peer 0 over `secs` seconds, each answered by `b` and counted in
    /// the tunnel's packets as the data plane would (ping out, pong in), plus `extra` packets
    /// of traffic a second; the times of the pings.
    fn run_pings(
        a: &mut Prober,
        b: &mut Prober,
        packets: &mut u64,
        from: Instant,
        secs: u32,
        extra: u64,
    ) -> Vec<Duration> {
        let mut sent = Vec::new();
        for ms in (0..secs * 1000).step_by(100) {
            let now = from + MS * ms;
            if ms % 1000 == 0 {
                *packets += extra;
            }
            a.traffic(0, *packets, now);
            while let Some((_, ping)) = a.poll_transmit(now) {
                sent.push(now - from);
                *packets += 1;
                let pong = b.handle_input(0, &ping, now).unwrap();
                *packets += 1;
                a.handle_input(0, &pong, now);
            }
        }
        sent
    }

    #[test]
    fn a_peer_that_idles_is_probed_rarely_until_it_carries_traffic() {
        let t0 = Instant::now();
        let mut a = Prober::new(0, 100 * MS, t0, 7);
        let mut b = Prober::new(1, 100 * MS, t0, 7);
        a.track(0, t0, Some(1000 * MS), true);
        let mut packets = 1_000;
        // Probes alone are no traffic: once a second for IDLE_AFTER, then every 10 s.
        let sent = run_pings(&mut a, &mut b, &mut packets, t0, 40, 0);
        let secs: Vec<u64> = sent.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30], "{sent:?}");
        // A ping counted before the data plane read it (a dip that recovers) is no traffic.
        let t = t0 + 39_950 * MS;
        a.traffic(0, packets - 1, t);
        a.traffic(0, packets, t);
        assert_eq!(a.poll_timeout(), Some(t0 + 40_000 * MS), "still idling");
        // Probes that never reached the tunnel (no session) leave a lasting dip; the mark
        // follows it, so the next packet of traffic still counts.
        a.traffic(0, packets - 5, t);
        a.traffic(0, packets - 5, t);
        a.traffic(0, packets - 4, t);
        assert_eq!(
            a.poll_timeout(),
            Some(t),
            "woken by one packet after the dip"
        );
        a.traffic(0, packets - 4, t);
        // Traffic wakes it: a probe at once, then its own cadence while traffic goes on.
        let t1 = t0 + 40_000 * MS;
        let sent = run_pings(&mut a, &mut b, &mut packets, t1, 5, 3);
        let secs: Vec<u64> = sent.iter().map(|d| d.as_millis() as u64).collect();
        assert_eq!(secs, [0, 1000, 2000, 3000, 4000], "{sent:?}");
        assert_eq!(a.stats(0, t1 + 5000 * MS).loss, Some(0.0));
    }

    #[test]
    fn a_peer_that_may_not_idle_keeps_its_cadence() {
        let t0 = Instant::now();
        let mut a = Prober::new(0, 100 * MS, t0, 7);
        let mut b = Prober::new(1, 100 * MS, t0, 7);
        a.track(0, t0, Some(1000 * MS), false);
        let mut packets = 0;
        let sent = run_pings(&mut a, &mut b, &mut packets, t0, 30, 0);
        assert_eq!(sent.len(), 30, "{sent:?}");
    }

    #[test]
    fn recent_probes_are_listed_oldest_first_with_their_ages() {
        let t0 = Instant::now();
        let mut a = Prober::new(1, 100 * MS, t0, 7);
        let (_, p1) = a.poll_transmit(t0).unwrap();
        let (_, _p2) = a.poll_transmit(t0 + 100 * MS).unwrap();
        let mut b = Prober::new(1, 100 * MS, t0, 7);
        let pong = b.handle_input(0, &p1, t0).unwrap();
        a.handle_input(0, &pong, t0 + 30 * MS);
        let r = a.recent(0, t0 + 150 * MS, 10);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].seq, r[0].age_ms, r[0].rtt_ms), (1, 150.0, Some(30.0)));
        assert_eq!((r[1].seq, r[1].age_ms, r[1].rtt_ms), (2, 50.0, None));
        assert_eq!(a.recent(0, t0, 1).len(), 1);
    }

    #[test]
    fn ping_pong_gives_rtt_jitter_and_no_loss() {
        let t0 = Instant::now();
        let mut a = Prober::new(1, 100 * MS, t0, 7);
        let mut b = Prober::new(1, 100 * MS, t0, 7);
        for (i, delay) in [10u64, 14, 10].iter().enumerate() {
            let now = t0 + 100 * MS * i as u32;
            let (peer, ping) = a.poll_transmit(now).unwrap();
            assert_eq!(peer, 0);
            assert!(a.poll_transmit(now).is_none(), "one ping per interval");
            let pong = b.handle_input(0, &ping, now).unwrap();
            assert!(a.handle_input(0, &pong, now + MS * *delay as u32).is_none());
        }
        let s = a.stats(0, t0 + 300 * MS);
        assert_eq!(s.rtt, Some(10 * MS));
        assert_eq!(s.loss, Some(0.0));
        assert!(s.jitter.unwrap() > Duration::ZERO);
        assert_eq!(s.answered, 3);
        assert_eq!(a.poll_timeout(), Some(t0 + 300 * MS));
    }

    #[test]
    fn unanswered_probes_count_as_loss_only_once_decided() {
        let t0 = Instant::now();
        let mut a = Prober::new(1, 100 * MS, t0, 7);
        let (_, ping) = a.poll_transmit(t0).unwrap();
        let pong = encode(PONG, decode(&ping).unwrap().1, 7);
        a.handle_input(0, &pong, t0 + 5 * MS);
        for i in 1..4 {
            a.poll_transmit(t0 + 100 * MS * i).unwrap();
        }
        assert_eq!(a.stats(0, t0 + 400 * MS).loss, Some(0.0), "not yet decided");
        assert_eq!(a.stats(0, t0 + 2000 * MS).loss, Some(0.75));
    }

    #[test]
    fn a_peer_that_never_answers_has_no_rtt_and_no_loss_figure() {
        let t0 = Instant::now();
        let mut a = Prober::new(2, 100 * MS, t0, 7);
        for i in 0..20 {
            while a.poll_transmit(t0 + 100 * MS * i).is_some() {}
        }
        let s = a.stats(1, t0 + 10_000 * MS);
        assert_eq!((s.rtt, s.loss, s.last_seen), (None, None, None));
    }

    #[test]
    fn garbage_duplicates_and_unknown_sequences_are_ignored() {
        let t0 = Instant::now();
        let mut a = Prober::new(1, 100 * MS, t0, 7);
        let (_, ping) = a.poll_transmit(t0).unwrap();
        assert!(a.handle_input(0, b"short", t0).is_none());
        assert!(a.handle_input(0, &[0u8; PROBE_LEN], t0).is_none());
        assert!(a.handle_input(0, &encode(PONG, 999, 7), t0).is_none());
        assert!(
            a.handle_input(7, &encode(PONG, 1, 7), t0).is_none(),
            "unknown peer"
        );
        let pong = encode(PONG, decode(&ping).unwrap().1, 7);
        a.handle_input(0, &pong, t0 + 3 * MS);
        a.handle_input(0, &pong, t0 + 50 * MS);
        assert_eq!(
            a.stats(0, t0 + 60 * MS).rtt,
            Some(3 * MS),
            "a duplicate pong changes nothing"
        );
    }

    #[test]
    fn a_pong_without_this_sessions_nonce_does_not_count() {
        let t0 = Instant::now();
        let mut a = Prober::new(1, 100 * MS, t0, 0x5eed);
        for i in 0..5 {
            a.poll_transmit(t0 + 100 * MS * i).unwrap();
        }
        // A forger who guesses every sequence number but not the nonce.
        for seq in 0..10 {
            for nonce in [0, 1, 7, u64::MAX] {
                a.handle_input(0, &encode(PONG, seq, nonce), t0 + 450 * MS);
            }
        }
        assert_eq!(a.answered(0), (0, None));
        a.handle_input(0, &encode(PONG, 3, 0x5eed), t0 + 450 * MS);
        assert_eq!(a.answered(0).0, 1);
    }

    #[test]
    fn a_ping_is_answered_with_its_own_nonce() {
        let t0 = Instant::now();
        let mut b = Prober::new(1, 100 * MS, t0, 1);
        let pong = b.handle_input(0, &encode(PING, 9, 42), t0).unwrap();
        assert_eq!(decode(&pong), Some((PONG, 9, 42)));
    }

    #[test]
    fn cadence_does_not_burst_after_a_stall() {
        let t0 = Instant::now();
        let mut a = Prober::new(1, 100 * MS, t0, 7);
        a.poll_transmit(t0).unwrap();
        let late = t0 + 5000 * MS;
        assert!(a.poll_transmit(late).is_some());
        assert!(a.poll_transmit(late).is_none());
    }
}
