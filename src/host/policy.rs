//! When to restart a failed plugin and when to give up. Sans-IO: failure times in, decisions
//! out. The backoff doubles with each failure inside the window, so a plugin that has run well
//! for a whole window starts again from the initial backoff.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    RestartAfter(Duration),
    /// Too many failures in the window: stay `failed` until re-enabled.
    GiveUp,
}

#[derive(Clone, Debug)]
pub struct RestartPolicy {
    initial: Duration,
    max: Duration,
    threshold: u32,
    window: Duration,
    failures: VecDeque<Instant>,
}

impl RestartPolicy {
    pub fn new(initial: Duration, max: Duration, threshold: u32, window: Duration) -> Self {
        Self {
            initial,
            max,
            threshold: threshold.max(1),
            window,
            failures: VecDeque::new(),
        }
    }

    /// Records a failure at `now` and decides what follows.
    pub fn on_failure(&mut self, now: Instant) -> Decision {
        while let Some(first) = self.failures.front() {
            if now.saturating_duration_since(*first) > self.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        self.failures.push_back(now);
        let count = self.failures.len() as u32;
        if count >= self.threshold {
            return Decision::GiveUp;
        }
        let factor = 1u32.checked_shl(count - 1).unwrap_or(u32::MAX);
        Decision::RestartAfter(self.initial.saturating_mul(factor).min(self.max))
    }

    /// Forget past failures (manual restart or re-enable).
    pub fn reset(&mut self) {
        self.failures.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            5,
            Duration::from_secs(300),
        )
    }

    #[test]
    fn backoff_doubles_then_gives_up_at_threshold() {
        let mut p = policy();
        let t = Instant::now();
        let got: Vec<Decision> = (0..5)
            .map(|i| p.on_failure(t + Duration::from_secs(i)))
            .collect();
        let s = Duration::from_secs;
        assert_eq!(
            got,
            vec![
                Decision::RestartAfter(s(1)),
                Decision::RestartAfter(s(2)),
                Decision::RestartAfter(s(4)),
                Decision::RestartAfter(s(8)),
                Decision::GiveUp
            ]
        );
    }

    #[test]
    fn backoff_is_capped() {
        let mut p = RestartPolicy::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            100,
            Duration::from_secs(3600),
        );
        let t = Instant::now();
        let last = (0..40)
            .map(|i| p.on_failure(t + Duration::from_secs(i)))
            .last();
        assert_eq!(last, Some(Decision::RestartAfter(Duration::from_secs(60))));
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let mut p = policy();
        let t = Instant::now();
        for i in 0..4 {
            p.on_failure(t + Duration::from_secs(i));
        }
        let later = t + Duration::from_secs(10_000);
        assert_eq!(
            p.on_failure(later),
            Decision::RestartAfter(Duration::from_secs(1))
        );
    }

    #[test]
    fn reset_starts_over() {
        let mut p = policy();
        let t = Instant::now();
        for _ in 0..4 {
            p.on_failure(t);
        }
        p.reset();
        assert_eq!(
            p.on_failure(t),
            Decision::RestartAfter(Duration::from_secs(1))
        );
    }
}
