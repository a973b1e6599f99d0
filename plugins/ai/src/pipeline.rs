//! The gateway pipeline's decisions, sans-IO: which frame runs next (at most `max_rate_hz`, only
//! the newest, never a stale one, never a queue), and whether a result sends the frame across
//! the VPN (`forward_when`). The zenoh shell in `gateway.rs` feeds it frames and `now`.

use crate::config::{ForwardWhen, Reduce};
use crate::tensor::Tensor;
use std::time::{Duration, Instant};

/// What the pipeline should do now.
#[derive(Debug, PartialEq)]
pub enum Next<F> {
    /// Run this frame; call [`Pacer::finished`] when done.
    Run(F),
    /// Nothing may run before this instant.
    WaitUntil(Instant),
    /// Nothing to do until a frame arrives or the running one finishes.
    Idle,
}

/// Holds at most one waiting frame: a newer frame replaces it (counted as dropped).
#[derive(Debug)]
pub struct Pacer<F> {
    min_interval: Duration,
    max_age: Duration,
    waiting: Option<(Instant, F)>,
    last_start: Option<Instant>,
    running: bool,
    pub dropped_replaced: u64,
    pub dropped_stale: u64,
}

impl<F> Pacer<F> {
    pub fn new(max_rate_hz: f64, max_age: Duration) -> Pacer<F> {
        Pacer {
            min_interval: Duration::from_secs_f64(1.0 / max_rate_hz),
            max_age,
            waiting: None,
            last_start: None,
            running: false,
            dropped_replaced: 0,
            dropped_stale: 0,
        }
    }

    pub fn offer(&mut self, frame: F, now: Instant) {
        if self.waiting.replace((now, frame)).is_some() {
            self.dropped_replaced += 1;
        }
    }

    pub fn next(&mut self, now: Instant) -> Next<F> {
        if self.running {
            return Next::Idle;
        }
        let Some((arrived, _)) = &self.waiting else {
            return Next::Idle;
        };
        if now.saturating_duration_since(*arrived) > self.max_age {
            self.waiting = None;
            self.dropped_stale += 1;
            return Next::Idle;
        }
        if let Some(last) = self.last_start {
            let allowed = last + self.min_interval;
            if now < allowed {
                // A frame that would be stale by then is not worth waiting for.
                return Next::WaitUntil(
                    allowed.min(*arrived + self.max_age + Duration::from_nanos(1)),
                );
            }
        }
        match self.waiting.take() {
            Some((_, frame)) => {
                self.running = true;
                self.last_start = Some(now);
                Next::Run(frame)
            }
            None => Next::Idle,
        }
    }

    pub fn finished(&mut self) {
        self.running = false;
    }
}

/// The value `rule` compares, from the model's outputs.
pub fn forward_value(rule: &ForwardWhen, outputs: &[(String, Tensor)]) -> Result<f64, String> {
    let (name, tensor) =
        match &rule.output {
            Some(want) => outputs.iter().find(|(n, _)| n == want).ok_or_else(|| {
                format!(
                "forward_when.output \"{want}\" is not an output of the model; its outputs are {}",
                outputs.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            )
            })?,
            None => outputs.first().ok_or("the model returned no outputs")?,
        };
    let values = tensor.values();
    if let Some(i) = rule.index {
        return values.get(i).copied().ok_or_else(|| {
            format!(
                "forward_when.index {i} is outside output \"{name}\" ({} elements)",
                values.len()
            )
        });
    }
    if values.is_empty() {
        return Err(format!("output \"{name}\" is empty"));
    }
    Ok(match rule.reduce {
        Reduce::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Reduce::Min => values.iter().copied().fold(f64::INFINITY, f64::min),
        Reduce::Mean => values.iter().sum::<f64>() / values.len() as f64,
    })
}

pub fn crosses(rule: &ForwardWhen, value: f64) -> bool {
    match (rule.above, rule.below) {
        (Some(a), _) => value > a,
        (None, Some(b)) => value < b,
        (None, None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn runs_at_most_at_the_rate_and_only_the_newest_frame() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10.0, Duration::from_secs(1));
        p.offer(1, t0);
        assert_eq!(p.next(t0), Next::Run(1));
        // While it runs, frames 2..=4 arrive: only 4 survives.
        for (i, f) in [2, 3, 4].into_iter().enumerate() {
            p.offer(f, t0 + MS * (10 * i as u32 + 10));
        }
        assert_eq!(p.next(t0 + 40 * MS), Next::Idle);
        p.finished();
        assert_eq!(p.next(t0 + 50 * MS), Next::WaitUntil(t0 + 100 * MS));
        assert_eq!(p.next(t0 + 100 * MS), Next::Run(4));
        assert_eq!(p.dropped_replaced, 2);
        p.finished();
        assert_eq!(p.next(t0 + 150 * MS), Next::Idle);
    }

    #[test]
    fn stale_frames_are_dropped_not_run() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1.0, Duration::from_millis(200));
        p.offer("a", t0);
        assert_eq!(p.next(t0), Next::Run("a"));
        p.finished();
        p.offer("b", t0 + 100 * MS);
        // The next slot (t0 + 1 s) is after "b" goes stale: wake when it does, then drop it.
        let Next::WaitUntil(at) = p.next(t0 + 100 * MS) else {
            panic!()
        };
        assert!(at <= t0 + 301 * MS);
        assert_eq!(p.next(at), Next::Idle);
        assert_eq!(p.dropped_stale, 1);
    }

    #[test]
    fn bounded_under_any_arrival_pattern() {
        let t0 = Instant::now();
        let mut p = Pacer::new(5.0, Duration::from_millis(500));
        let (mut ran, mut offered) = (0u64, 0u64);
        for ms in 0..10_000u32 {
            let now = t0 + MS * ms;
            if ms % 7 == 0 {
                p.offer(ms, now);
                offered += 1;
            }
            if let Next::Run(_) = p.next(now) {
                ran += 1;
                p.finished();
            }
        }
        assert!(ran <= 51, "ran {ran} in 10 s at 5 Hz");
        assert!(ran >= 49);
        assert!(offered - ran - p.dropped_replaced - p.dropped_stale <= 1);
    }

    fn outputs() -> Vec<(String, Tensor)> {
        vec![(
            "probs".into(),
            Tensor::new(vec![1, 4], Data::F32(vec![0.1, 0.7, 0.15, 0.05])).unwrap(),
        )]
    }

    #[test]
    fn forward_rules() {
        let rule = |index, reduce, above, below| ForwardWhen {
            output: None,
            index,
            reduce,
            above,
            below,
        };
        let max = rule(None, Reduce::Max, Some(0.5), None);
        let v = forward_value(&max, &outputs()).unwrap();
        assert!((v - 0.7).abs() < 1e-6 && crosses(&max, v));
        let idx = rule(Some(2), Reduce::Max, Some(0.5), None);
        let v = forward_value(&idx, &outputs()).unwrap();
        assert!((v - 0.15).abs() < 1e-6 && !crosses(&idx, v));
        let mean_below = rule(None, Reduce::Mean, None, Some(0.3));
        assert!(crosses(
            &mean_below,
            forward_value(&mean_below, &outputs()).unwrap()
        ));
        assert!(forward_value(&rule(Some(9), Reduce::Max, Some(0.5), None), &outputs()).is_err());
        let named = ForwardWhen {
            output: Some("nope".into()),
            ..rule(None, Reduce::Max, Some(0.5), None)
        };
        assert!(forward_value(&named, &outputs())
            .unwrap_err()
            .contains("probs"));
    }
}
