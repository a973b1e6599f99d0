//! The interlock state machine, sans-IO: probe results of the watched peers and `now` in,
//! state changes out. Nothing here reads a clock or touches the network.
//!
//! States: `Armed` (motion permitted) → `Tripped` (link bad: stop) → `Clearing` (link good,
//! waiting `clear_after`) → `Latched` (good long enough, stop held until re-armed; only with
//! `latch`) → `Armed`. A bad link in `Clearing` or `Latched` goes back to `Tripped`.
//!
//! Every start begins stopped (`Tripped`, reason `Startup`): motion is permitted only once the
//! link has been good for `clear_after`, and only after a re-arm when the stop that was in
//! force before the restart needed one (no automatic restart after a stop).
//!
//! A probe is *bad* when its round trip exceeds `max_rtt`, or when it has been unanswered for
//! longer than `max_rtt` (it is known to be late before its answer arrives, or if none ever
//! does). `trip_after` consecutive bad probes trip. So does no answer at all for
//! `heartbeat_timeout`. A probe is *good* for clearing when its round trip is below
//! `clear_below`; clearing needs `clear_after` of nothing but good probes.

use myelin_sdk::ProbeSample;
use serde::Serialize;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub max_rtt: Duration,
    pub trip_after: u32,
    pub heartbeat_timeout: Duration,
    pub clear_below: Duration,
    pub clear_after: Duration,
    pub latch: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Armed,
    Tripped,
    Clearing,
    Latched,
}

impl State {
    /// Whether motion must be stopped in this state.
    pub fn stopped(self) -> bool {
        self != State::Armed
    }

    /// The value of `myelin_safety_state`.
    pub fn code(self) -> f64 {
        match self {
            State::Armed => 0.0,
            State::Tripped => 1.0,
            State::Clearing => 2.0,
            State::Latched => 3.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The interlock (plugin, process or node) has just started.
    Startup,
    /// `trip_after` consecutive probes over `max_rtt`.
    Latency,
    /// No probe answer for `heartbeat_timeout`.
    Heartbeat,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::Latency => "latency",
            Reason::Heartbeat => "heartbeat",
        }
    }
}

/// What the machine reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Motion is stopped: a trip while armed, or the stop every start begins with
    /// (`Startup`, no peer).
    Stopped {
        reason: Reason,
        peer: Option<String>,
        rtt_ms: Option<f64>,
    },
    /// The stop ended: motion is permitted again (by clearing without latch, or by re-arm).
    Cleared { rearmed: bool },
    /// Any state change, including the two above.
    State(State),
}

/// Why a re-arm was refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("the link to {peer} is still bad ({detail}); re-arm once it has been good for the clearing time")]
    LinkBad { peer: String, detail: String },
    #[error(
        "the link has been good for {good_for:.1} s of the {needed:.1} s needed; try again shortly"
    )]
    StillClearing { good_for: f64, needed: f64 },
}

/// One watched peer's link, as the probes tell it.
#[derive(Clone, Debug)]
struct Link {
    name: String,
    /// The newest probe already judged.
    judged: u64,
    /// Unanswered probes younger than `max_rtt`: (seq, sent at), oldest first.
    pending: VecDeque<(u64, Instant)>,
    consecutive_bad: u32,
    /// The newest answer's arrival (or, before any answer, when watching began).
    last_answer: Instant,
    answered_once: bool,
    /// Since when every probe was good for clearing; `None` after any that was not.
    good_since: Option<Instant>,
    last_rtt_ms: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LinkStatus {
    pub peer: String,
    pub rtt_ms: Option<f64>,
    pub consecutive_bad: u32,
    pub since_answer_ms: f64,
    pub good_for_s: Option<f64>,
}

#[derive(Debug)]
pub struct Interlock {
    settings: Settings,
    state: State,
    links: Vec<Link>,
    /// The trip that caused the current stop.
    trip: Option<Trip>,
    /// Whether the current stop ends only with a re-arm (`latch` and a real trip, or a restored
    /// stop that needed one).
    rearm_required: bool,
    events: VecDeque<Event>,
    /// The latest `now` handled: deadlines at or before it are done.
    handled_until: Instant,
}

/// What caused the current stop: reason, peer (none for `Startup`), RTT of the deciding probe.
pub type Trip = (Reason, Option<String>, Option<f64>);

enum Verdict {
    Bad(f64),
    Fine(f64),
}

/// A probe's milliseconds as a duration; anything that is not a finite, non-negative number
/// (the view is data from another process) counts as zero.
fn millis(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::ZERO)
}

impl Interlock {
    /// A started interlock: stopped (reason `Startup`) until the link has been good for
    /// `clear_after`, then armed, or latched when `rearm_required` (honoured only with `latch`).
    pub fn new(settings: Settings, watch: &[String], now: Instant, rearm_required: bool) -> Self {
        let rearm_required = rearm_required && settings.latch;
        let mut il = Self {
            settings,
            state: State::Tripped,
            links: watch
                .iter()
                .map(|name| Link {
                    name: name.clone(),
                    judged: 0,
                    pending: VecDeque::new(),
                    consecutive_bad: 0,
                    last_answer: now,
                    answered_once: false,
                    good_since: None,
                    last_rtt_ms: None,
                })
                .collect(),
            trip: Some((Reason::Startup, None, None)),
            rearm_required,
            events: VecDeque::new(),
            handled_until: now,
        };
        il.events.push_back(Event::State(State::Tripped));
        il.events.push_back(Event::Stopped {
            reason: Reason::Startup,
            peer: None,
            rtt_ms: None,
        });
        il
    }

    /// Whether the current stop ends only with a re-arm.
    pub fn rearm_required(&self) -> bool {
        self.rearm_required
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The trip behind the current stop: reason, peer, RTT.
    pub fn trip(&self) -> Option<&Trip> {
        self.trip.as_ref()
    }

    pub fn links(&self, now: Instant) -> Vec<LinkStatus> {
        self.links
            .iter()
            .map(|l| LinkStatus {
                peer: l.name.clone(),
                rtt_ms: l.last_rtt_ms,
                consecutive_bad: l.consecutive_bad,
                since_answer_ms: now.saturating_duration_since(l.last_answer).as_secs_f64()
                    * 1000.0,
                good_for_s: l
                    .good_since
                    .map(|g| now.saturating_duration_since(g).as_secs_f64()),
            })
            .collect()
    }

    /// The latest probes to `peer` as a mesh view published at `now` lists them (oldest
    /// first, ages relative to `now`).
    pub fn handle_probes(&mut self, peer: &str, probes: &[ProbeSample], now: Instant) {
        let Some(i) = self.links.iter().position(|l| l.name == peer) else {
            return;
        };
        let max_rtt_ms = self.settings.max_rtt.as_secs_f64() * 1000.0;
        let sent_at = |p: &ProbeSample| now.checked_sub(millis(p.age_ms)).unwrap_or(now);
        let mut verdicts = Vec::new();
        {
            let link = &mut self.links[i];
            let mut sorted: Vec<&ProbeSample> = probes.iter().collect();
            sorted.sort_by_key(|p| p.seq);
            // Heartbeat: the newest answer, whichever probe it was.
            for p in &sorted {
                if let Some(rtt) = p.rtt_ms {
                    let arrived = sent_at(p).checked_add(millis(rtt)).unwrap_or(now).min(now);
                    if !link.answered_once || arrived > link.last_answer {
                        link.last_answer = arrived;
                    }
                    link.answered_once = true;
                    link.last_rtt_ms = Some(rtt);
                }
            }
            // Verdicts, strictly in probe order: an open probe holds back the ones after it.
            link.pending.clear();
            let judged_before = link.judged;
            for p in sorted.into_iter().filter(|p| p.seq > judged_before) {
                match p.rtt_ms {
                    Some(_) if !link.pending.is_empty() => break,
                    Some(rtt) => {
                        link.judged = p.seq;
                        verdicts.push(if rtt > max_rtt_ms {
                            Verdict::Bad(rtt)
                        } else {
                            Verdict::Fine(rtt)
                        });
                    }
                    None if p.age_ms > max_rtt_ms && link.pending.is_empty() => {
                        link.judged = p.seq;
                        verdicts.push(Verdict::Bad(p.age_ms));
                    }
                    None => link.pending.push_back((p.seq, sent_at(p))),
                }
            }
        }
        for v in verdicts {
            self.judge(i, v, now);
        }
        self.evaluate(now);
        self.handled_until = self.handled_until.max(now);
    }

    /// When `handle_timeout` must run next: an open probe reaching `max_rtt`, a heartbeat
    /// deadline, or the end of the clearing time. Only deadlines after the latest `now` already
    /// handled count: one that has passed was dealt with then, and returning it again would make
    /// the caller wake at once, forever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let s = &self.settings;
        let handled = self.handled_until;
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| {
            if t > handled {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        };
        for l in &self.links {
            if let Some((_, sent)) = l.pending.front() {
                at(*sent + s.max_rtt);
            }
            at(l.last_answer + s.heartbeat_timeout);
            if let Some(g) = l.good_since {
                at(g + s.clear_after);
            }
        }
        next
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let max_rtt = self.settings.max_rtt;
        for i in 0..self.links.len() {
            let overdue: Vec<(u64, Instant)> = {
                let link = &mut self.links[i];
                let mut out = Vec::new();
                while let Some(&(seq, sent)) = link.pending.front() {
                    if now.saturating_duration_since(sent) < max_rtt {
                        break;
                    }
                    link.pending.pop_front();
                    link.judged = seq;
                    out.push((seq, sent));
                }
                out
            };
            for (_, sent) in overdue {
                let age = now.saturating_duration_since(sent).as_secs_f64() * 1000.0;
                self.judge(i, Verdict::Bad(age), now);
            }
        }
        self.evaluate(now);
        self.handled_until = self.handled_until.max(now);
    }

    /// A person asks to permit motion again. Allowed only once the link has been good for the
    /// clearing time (state `Latched`); never commands motion itself.
    pub fn rearm(&mut self, now: Instant) -> Result<(), Refused> {
        match self.state {
            State::Armed => Ok(()),
            State::Latched => {
                self.set_state(State::Armed);
                self.trip = None;
                self.rearm_required = false;
                self.events.push_back(Event::Cleared { rearmed: true });
                Ok(())
            }
            State::Clearing => {
                let good_for = self
                    .links
                    .iter()
                    .filter_map(|l| l.good_since)
                    .map(|g| now.saturating_duration_since(g).as_secs_f64())
                    .fold(f64::INFINITY, f64::min);
                Err(Refused::StillClearing {
                    good_for: if good_for.is_finite() { good_for } else { 0.0 },
                    needed: self.settings.clear_after.as_secs_f64(),
                })
            }
            State::Tripped => {
                let (peer, detail) = self
                    .links
                    .iter()
                    .find(|l| l.good_since.is_none())
                    .map(|l| {
                        let since = now.saturating_duration_since(l.last_answer).as_millis();
                        let detail = match l.last_rtt_ms {
                            Some(rtt) => {
                                format!("last RTT {rtt:.0} ms, last answer {since} ms ago")
                            }
                            None => format!("no answer for {since} ms"),
                        };
                        (l.name.clone(), detail)
                    })
                    .unwrap_or_else(|| ("the watched peers".into(), "not yet judged".into()));
                Err(Refused::LinkBad { peer, detail })
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn judge(&mut self, i: usize, verdict: Verdict, now: Instant) {
        let s = &self.settings;
        let clear_below_ms = s.clear_below.as_secs_f64() * 1000.0;
        let link = &mut self.links[i];
        match verdict {
            Verdict::Bad(ms) => {
                link.consecutive_bad = link.consecutive_bad.saturating_add(1);
                link.good_since = None;
                if link.consecutive_bad >= s.trip_after {
                    let peer = link.name.clone();
                    self.trip_on(Reason::Latency, peer, Some(ms));
                }
            }
            Verdict::Fine(ms) => {
                link.consecutive_bad = 0;
                if ms < clear_below_ms {
                    if link.good_since.is_none() {
                        link.good_since = Some(now);
                    }
                } else {
                    link.good_since = None;
                }
            }
        }
    }

    /// Applies heartbeats and the clearing rules until the state settles (tripped → clearing →
    /// armed can all be due at once, e.g. with `clear_after` 0).
    fn evaluate(&mut self, now: Instant) {
        for _ in 0..4 {
            let before = self.state;
            self.evaluate_once(now);
            if self.state == before {
                return;
            }
        }
    }

    fn evaluate_once(&mut self, now: Instant) {
        let s = self.settings.clone();
        // Heartbeats.
        for i in 0..self.links.len() {
            let silent = now.saturating_duration_since(self.links[i].last_answer);
            if silent >= s.heartbeat_timeout {
                self.links[i].good_since = None;
                let peer = self.links[i].name.clone();
                self.trip_on(Reason::Heartbeat, peer, None);
            }
        }
        let all_good = self.links.iter().all(|l| l.good_since.is_some());
        let cleared = self.links.iter().all(|l| {
            l.good_since
                .is_some_and(|g| now.saturating_duration_since(g) >= s.clear_after)
        });
        match self.state {
            State::Tripped if all_good => self.set_state(State::Clearing),
            State::Clearing if !all_good => self.set_state(State::Tripped),
            State::Clearing if cleared => {
                if self.rearm_required {
                    self.set_state(State::Latched);
                } else {
                    self.set_state(State::Armed);
                    self.trip = None;
                    self.events.push_back(Event::Cleared { rearmed: false });
                }
            }
            _ => {}
        }
    }

    /// The link to `peer` is bad: stop when armed; when clearing or latched, go back to
    /// tripped, and with `latch` the stop now ends only with a re-arm. The start-up stop stays
    /// what it is: motion was never permitted since the start, so a link that is still settling
    /// only restarts the clearing time.
    fn trip_on(&mut self, reason: Reason, peer: String, rtt_ms: Option<f64>) {
        let startup = matches!(self.trip, Some((Reason::Startup, _, _)));
        match self.state {
            State::Armed => {
                self.rearm_required = self.settings.latch;
                self.trip = Some((reason, Some(peer.clone()), rtt_ms));
                self.set_state(State::Tripped);
                self.events.push_back(Event::Stopped {
                    reason,
                    peer: Some(peer),
                    rtt_ms,
                });
            }
            State::Clearing | State::Latched if startup => self.set_state(State::Tripped),
            State::Clearing | State::Latched => {
                self.rearm_required |= self.settings.latch;
                self.trip = Some((reason, Some(peer), rtt_ms));
                self.set_state(State::Tripped);
            }
            State::Tripped => {}
        }
    }

    fn set_state(&mut self, state: State) {
        if self.state != state {
            self.state = state;
            self.events.push_back(Event::State(state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    fn settings(latch: bool) -> Settings {
        Settings {
            max_rtt: 200 * MS,
            trip_after: 3,
            heartbeat_timeout: 500 * MS,
            clear_below: 150 * MS,
            clear_after: Duration::from_secs(5),
            latch,
        }
    }

    /// Probes every 100 ms with given round trips (`None`: lost); views published every
    /// 100 ms (50 ms after each probe) and on every answer; the interlock's timeouts honoured
    /// at 5 ms resolution.
    struct Sim {
        t0: Instant,
        rtts: Vec<Option<Duration>>,
        il: Interlock,
        events: Vec<(Instant, Event)>,
        /// (time, state) after every step.
        states: Vec<(Instant, State)>,
    }

    const INTERVAL: Duration = Duration::from_millis(100);
    const STEP: Duration = Duration::from_millis(5);

    impl Sim {
        /// An interlock that is already armed at `t0`, as after a start-up cleared long ago.
        fn new(settings: Settings, rtts: Vec<Option<Duration>>) -> Sim {
            let mut sim = Sim::starting(settings, rtts, false);
            sim.il.state = State::Armed;
            sim.il.trip = None;
            sim.il.events.clear();
            sim
        }

        /// An interlock that starts at `t0`, as the plugin starts it.
        fn starting(settings: Settings, rtts: Vec<Option<Duration>>, rearm_required: bool) -> Sim {
            let t0 = Instant::now();
            Sim {
                t0,
                rtts,
                il: Interlock::new(settings, &["operator".to_string()], t0, rearm_required),
                events: Vec::new(),
                states: Vec::new(),
            }
        }

        fn sent(&self, i: usize) -> Instant {
            self.t0 + INTERVAL * i as u32
        }

        fn view(&self, now: Instant) -> Vec<ProbeSample> {
            let sent: Vec<usize> = (0..self.rtts.len())
                .filter(|&i| self.sent(i) <= now)
                .collect();
            sent[sent.len().saturating_sub(10)..]
                .iter()
                .map(|&i| {
                    let age = now - self.sent(i);
                    ProbeSample {
                        seq: i as u64 + 1,
                        age_ms: age.as_secs_f64() * 1000.0,
                        rtt_ms: self.rtts[i]
                            .filter(|r| *r <= age)
                            .map(|r| r.as_secs_f64() * 1000.0),
                    }
                })
                .collect()
        }

        fn run_until(&mut self, end: Duration) {
            let mut t = self.t0;
            let mut next_view = self.t0 + 50 * MS;
            while t <= self.t0 + end {
                // Views on a tick and whenever an answer arrives, as the tunnel publishes them.
                let answered = (0..self.rtts.len()).any(|i| {
                    self.rtts[i].is_some_and(|r| {
                        let at = self.sent(i) + r;
                        at <= t && at + STEP > t
                    })
                });
                if t >= next_view || answered {
                    let v = self.view(t);
                    self.il.handle_probes("operator", &v, t);
                    if t >= next_view {
                        next_view += INTERVAL;
                    }
                }
                if self.il.poll_timeout().is_some_and(|d| d <= t) {
                    self.il.handle_timeout(t);
                }
                // Nothing handled is asked for again: a deadline at or before `t` would make
                // the plugin's loop wake at once, forever.
                if let Some(d) = self.il.poll_timeout() {
                    assert!(
                        d > t,
                        "poll_timeout {:?} is not after the handled {:?}",
                        d - self.t0,
                        t - self.t0
                    );
                }
                while let Some(e) = self.il.poll_event() {
                    self.events.push((t, e));
                }
                self.states.push((t, self.il.state()));
                t += STEP;
            }
        }

        fn trips(&self) -> Vec<(Instant, Reason)> {
            self.events
                .iter()
                .filter_map(|(t, e)| match e {
                    Event::Stopped { reason, .. } if *reason != Reason::Startup => {
                        Some((*t, *reason))
                    }
                    _ => None,
                })
                .collect()
        }
    }

    fn ok(ms: u64) -> Option<Duration> {
        Some(Duration::from_millis(ms))
    }

    #[test]
    fn three_slow_probes_trip_two_do_not() {
        let mut rtts = vec![ok(10); 20];
        rtts.extend([ok(300), ok(300), ok(10)]);
        rtts.extend(vec![ok(10); 20]);
        let mut sim = Sim::new(settings(true), rtts.clone());
        sim.run_until(Duration::from_secs(4));
        assert!(sim.trips().is_empty(), "{:?}", sim.events);

        rtts[22] = ok(300);
        let mut sim = Sim::new(settings(true), rtts);
        sim.run_until(Duration::from_secs(4));
        let trips = sim.trips();
        assert_eq!(trips.len(), 1, "{:?}", sim.events);
        assert_eq!(trips[0].1, Reason::Latency);
        // The third slow probe (sent at 2.2 s) is known bad at 2.4 s, before its answer.
        let at = trips[0].0 - sim.t0;
        assert!(at >= 2400 * MS && at <= 2410 * MS, "tripped at {at:?}");
    }

    #[test]
    fn silence_trips_on_the_heartbeat() {
        let mut rtts = vec![ok(10); 10];
        rtts.extend(vec![None; 30]);
        let mut sim = Sim::new(settings(true), rtts);
        sim.run_until(Duration::from_secs(4));
        let trips = sim.trips();
        // The last answer arrives at 0.91 s; lost probes trip on latency first (3 × late).
        assert_eq!(trips.len(), 1, "{:?}", sim.events);
        let at = trips[0].0 - sim.t0;
        assert!(at <= 910 * MS + 500 * MS + STEP, "tripped at {at:?}");
    }

    #[test]
    fn heartbeat_alone_trips_when_probes_are_too_sparse_to_count() {
        let s = Settings {
            trip_after: 100,
            ..settings(true)
        };
        let mut rtts = vec![ok(10); 10];
        rtts.extend(vec![None; 30]);
        let mut sim = Sim::new(s, rtts);
        sim.run_until(Duration::from_secs(4));
        let trips = sim.trips();
        assert_eq!(trips.len(), 1);
        assert_eq!(trips[0].1, Reason::Heartbeat);
        let at = trips[0].0 - sim.t0;
        assert!(
            at >= 1410 * MS && at <= 1410 * MS + STEP,
            "tripped at {at:?}"
        );
    }

    #[test]
    fn clears_after_the_clearing_time_and_latches_until_rearmed() {
        let mut rtts = vec![ok(10); 10];
        rtts.extend(vec![ok(300); 5]);
        rtts.extend(vec![ok(10); 100]);
        let mut sim = Sim::new(settings(true), rtts.clone());
        sim.run_until(Duration::from_secs(3));
        assert_eq!(sim.il.state(), State::Clearing);
        assert!(matches!(
            sim.il.rearm(sim.t0 + Duration::from_secs(3)),
            Err(Refused::StillClearing { .. })
        ));
        sim.run_until(Duration::from_secs(8));
        assert_eq!(sim.il.state(), State::Latched);
        sim.il.rearm(sim.t0 + Duration::from_secs(8)).unwrap();
        assert_eq!(sim.il.state(), State::Armed);
        assert!(sim.il.trip().is_none());

        let mut sim = Sim::new(settings(false), rtts);
        sim.run_until(Duration::from_secs(9));
        assert_eq!(sim.il.state(), State::Armed);
        assert!(sim
            .events
            .iter()
            .any(|(_, e)| *e == Event::Cleared { rearmed: false }));
    }

    #[test]
    fn rearm_is_refused_while_the_link_is_bad() {
        let mut rtts = vec![ok(10); 10];
        rtts.extend(vec![ok(300); 40]);
        let mut sim = Sim::new(settings(true), rtts);
        sim.run_until(Duration::from_secs(3));
        assert_eq!(sim.il.state(), State::Tripped);
        let err = sim.il.rearm(sim.t0 + Duration::from_secs(3)).unwrap_err();
        assert!(err.to_string().contains("operator"), "{err}");
        assert_eq!(sim.il.state(), State::Tripped);
    }

    #[test]
    fn a_good_link_leaves_nothing_to_wake_for() {
        // The fault seen in the lab: once the link had been good for `clear_after`, the end of
        // the clearing time stayed the next deadline although it had passed.
        let mut sim = Sim::new(settings(true), vec![ok(10); 100]);
        sim.run_until(Duration::from_secs(8));
        assert_eq!(sim.il.state(), State::Armed);
        let t = sim.t0 + Duration::from_secs(8);
        let next = sim.il.poll_timeout().expect("the heartbeat deadline");
        assert!(next > t, "deadline {:?} already passed", next - sim.t0);
        assert!(next <= t + settings(true).heartbeat_timeout);
        // A silent link after the trip: the passed heartbeat deadline is not asked for again.
        let mut sim = Sim::new(settings(true), vec![None; 60]);
        sim.run_until(Duration::from_secs(5));
        assert_eq!(sim.il.state(), State::Tripped);
        let t = sim.t0 + Duration::from_secs(5);
        sim.il.handle_timeout(t);
        assert!(sim.il.poll_timeout().is_none_or(|d| d > t));
    }

    #[test]
    fn every_start_is_stopped_until_the_link_was_good_for_the_clearing_time() {
        let mut sim = Sim::starting(settings(true), vec![ok(10); 100], false);
        assert_eq!(sim.il.state(), State::Tripped);
        assert_eq!(sim.il.trip().map(|t| t.0), Some(Reason::Startup));
        sim.run_until(Duration::from_secs(8));
        let first = &sim.events[..2];
        assert_eq!(first[0].1, Event::State(State::Tripped));
        assert!(matches!(
            first[1].1,
            Event::Stopped {
                reason: Reason::Startup,
                peer: None,
                ..
            }
        ));
        // A start-up stop needs no re-arm, even with latch: nothing tripped.
        let armed_at = sim
            .states
            .iter()
            .find(|(_, s)| *s == State::Armed)
            .map(|(t, _)| *t - sim.t0)
            .expect("armed after the clearing time");
        // The first answer arrives at 10 ms; clearing takes 5 s of good probes from then.
        assert!(
            armed_at >= Duration::from_secs(5) && armed_at < Duration::from_millis(5200),
            "armed at {armed_at:?}"
        );
        assert!(sim
            .events
            .iter()
            .any(|(_, e)| *e == Event::Cleared { rearmed: false }));
    }

    #[test]
    fn a_restored_stop_that_needed_a_rearm_still_needs_one() {
        let mut sim = Sim::starting(settings(true), vec![ok(10); 100], true);
        assert!(sim.il.rearm_required());
        sim.run_until(Duration::from_secs(8));
        assert_eq!(sim.il.state(), State::Latched);
        assert!(sim.states.iter().all(|(_, s)| *s != State::Armed));
        sim.il.rearm(sim.t0 + Duration::from_secs(8)).unwrap();
        assert_eq!(sim.il.state(), State::Armed);
        assert!(!sim.il.rearm_required());
        // Without latch in the configuration the restored requirement is dropped.
        let mut sim = Sim::starting(settings(false), vec![ok(10); 100], true);
        assert!(!sim.il.rearm_required());
        sim.run_until(Duration::from_secs(8));
        assert_eq!(sim.il.state(), State::Armed);
    }

    #[test]
    fn a_bad_link_while_clearing_from_start_up_restarts_the_clearing() {
        let mut rtts = vec![ok(10); 20];
        rtts.extend(vec![ok(300); 5]);
        rtts.extend(vec![ok(10); 100]);
        for latch in [true, false] {
            let mut sim = Sim::starting(settings(latch), rtts.clone(), false);
            sim.run_until(Duration::from_secs(10));
            assert_eq!(sim.il.state(), State::Armed, "latch {latch}");
            assert!(!sim.il.rearm_required());
            // The last slow probe (sent at 2.4 s) is known at 2.6 s; then 5 s of good ones.
            let armed_at = sim
                .states
                .iter()
                .find(|(_, s)| *s == State::Armed)
                .map(|(t, _)| *t - sim.t0)
                .unwrap();
            assert!(
                armed_at >= Duration::from_millis(7500),
                "armed at {armed_at:?}"
            );
            assert!(sim.trips().is_empty(), "{:?}", sim.events);
        }
    }

    fn segment() -> impl Strategy<Value = (u8, usize)> {
        (0u8..4, 1usize..40)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn interlock_properties(segments in proptest::collection::vec(segment(), 1..8), latch in any::<bool>(), seed in 0u64..1000, startup in any::<bool>(), restored in any::<bool>()) {
            // Regimes: good, slow, lost, mixed; values vary with the position.
            let mut rtts = Vec::new();
            let mut x = seed;
            for (regime, len) in segments {
                for _ in 0..len {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let r = (x >> 33) % 1000;
                    rtts.push(match regime {
                        0 => ok(1 + r % 140),
                        1 => ok(150 + r % 300),
                        2 => None,
                        _ => if r < 100 { None } else { ok(r % 400) },
                    });
                }
            }
            let s = settings(latch);
            let mut sim = if startup {
                Sim::starting(s.clone(), rtts.clone(), restored)
            } else {
                Sim::new(s.clone(), rtts.clone())
            };
            let end = INTERVAL * rtts.len() as u32 + Duration::from_secs(1);
            sim.run_until(end);
            let sent = |i: usize| sim.t0 + INTERVAL * i as u32;
            let bad = |i: usize| rtts[i].is_none_or(|r| r > s.max_rtt);
            // When probe i is known: at its answer if in time, else when it turns late.
            let known = |i: usize| match rtts[i] {
                Some(r) if r <= s.max_rtt => sent(i) + r,
                _ => sent(i) + s.max_rtt,
            };

            // 1. A latency trip needs trip_after consecutive bad probes, the last known by then.
            for (t, reason) in sim.trips() {
                if reason == Reason::Latency {
                    let k = s.trip_after as usize;
                    let found = (k - 1..rtts.len()).any(|j| known(j) <= t && (j + 1 - k..=j).all(bad));
                    prop_assert!(found, "latency trip at {:?} without {k} bad probes", t - sim.t0);
                }
            }
            // 2. Silence while armed always trips within the heartbeat timeout (+ one step).
            let arrivals: Vec<Instant> = (0..rtts.len()).filter_map(|i| rtts[i].map(|r| sent(i) + r)).collect();
            for &(t, state) in &sim.states {
                if state == State::Armed {
                    let last = arrivals.iter().filter(|a| **a <= t).max().copied().unwrap_or(sim.t0);
                    prop_assert!(t - last < s.heartbeat_timeout + STEP * 2,
                        "armed at {:?} with no answer since {:?}", t - sim.t0, last - sim.t0);
                }
            }
            // 3. Never clears (to armed or latched) before clear_after of good probes: no probe
            //    that was not good became known inside the clearing window (allowing one view of
            //    lag; one known exactly at the window's start is before it).
            for (i, (t, e)) in sim.events.iter().enumerate() {
                let clears = matches!(e, Event::Cleared { rearmed: false } | Event::State(State::Latched));
                if clears {
                    let window_start = *t - s.clear_after;
                    for j in 0..rtts.len() {
                        let not_good = rtts[j].is_none_or(|r| r >= s.clear_below);
                        let k = known(j);
                        prop_assert!(!(not_good && k > window_start && k + INTERVAL + STEP <= *t),
                            "event {i} {e:?} at {:?}, but probe {j} known not good at {:?}", *t - sim.t0, k - sim.t0);
                    }
                }
            }
            // 4. A start never permits motion before clear_after, and a restored stop that
            //    needed a re-arm (with latch) never permits it without one.
            if startup {
                for &(t, state) in &sim.states {
                    if state == State::Armed {
                        prop_assert!(t - sim.t0 >= s.clear_after, "armed {:?} after start", t - sim.t0);
                        prop_assert!(!(restored && latch), "armed without a re-arm");
                    }
                }
            }
        }
    }
}
