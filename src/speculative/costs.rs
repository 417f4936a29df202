//! What a model step costs by the number of tokens in it, as measured on this machine: the
//! price a draft pays for its place in a step.

use std::sync::Mutex;
use std::time::Duration;

/// Steps of up to this many tokens (the default `--batch-size`) are timed one size at a time;
/// larger ones are not kept.
pub const TIMED_SIZES: usize = 512;

/// The weight of a new timing in its size's running mean: steps of one size vary with the
/// context length and with what else the machine runs.
const NEW_WEIGHT: f64 = 0.2;

/// Seconds per step by tokens in the step, a running mean per size (0: never timed).
pub struct StepCosts {
    seconds: Mutex<Vec<f64>>,
}

impl Default for StepCosts {
    fn default() -> Self {
        StepCosts {
            seconds: Mutex::new(vec![0.0; TIMED_SIZES + 1]),
        }
    }
}

impl StepCosts {
    /// Records one step of `tokens` tokens that took `time`.
    pub fn record(&self, tokens: usize, time: Duration) {
        if tokens == 0 || tokens > TIMED_SIZES {
            return;
        }
        let mut s = self.seconds.lock().unwrap_or_else(|e| e.into_inner());
        let t = time.as_secs_f64();
        let mean = &mut s[tokens];
        *mean = if *mean == 0.0 {
            t
        } else {
            *mean + NEW_WEIGHT * (t - *mean)
        };
    }

    /// A copy to plan a step with, without holding the lock while planning.
    pub fn snapshot(&self, into: &mut CostTable) {
        let s = self.seconds.lock().unwrap_or_else(|e| e.into_inner());
        into.seconds.clear();
        into.seconds.extend_from_slice(&s);
    }
}

/// [`StepCosts`] at one moment.
#[derive(Default)]
pub struct CostTable {
    seconds: Vec<f64>,
}

impl CostTable {
    /// The time of a step of `tokens` tokens: measured, or on the line through the two nearest
    /// measured sizes below it; None when fewer than two smaller sizes were timed. Larger
    /// sizes (prompt chunks) are not drawn on: their cost per token is another regime, and the
    /// first steps of a process, slowed by its cold start, would weigh on every estimate.
    pub fn seconds(&self, tokens: usize) -> Option<f64> {
        let s = &self.seconds;
        if tokens == 0 || tokens >= s.len() {
            return None;
        }
        if s[tokens] > 0.0 {
            return Some(s[tokens]);
        }
        let timed = |i: &usize| s[*i] > 0.0;
        let b = (1..tokens).rev().find(timed)?;
        let a = (1..b).rev().find(timed)?;
        let slope = ((s[b] - s[a]) / (b - a) as f64).max(0.0);
        Some(s[b] + slope * (tokens - b) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(points: &[(usize, f64)]) -> CostTable {
        let costs = StepCosts::default();
        for &(n, s) in points {
            costs.record(n, Duration::from_secs_f64(s));
        }
        let mut t = CostTable::default();
        costs.snapshot(&mut t);
        t
    }

    #[test]
    fn measured_sizes_and_the_line_between_them() {
        let t = table(&[(1, 0.010), (2, 0.011), (9, 0.030), (600, 5.0)]);
        assert_eq!(t.seconds(1), Some(0.010));
        // Between 2 and 9: the line through 1 and 2, not through 9.
        assert!((t.seconds(5).unwrap() - 0.014).abs() < 1e-12);
        // Past 9 (600 is not kept): the line through 2 and 9.
        assert!((t.seconds(16).unwrap() - 0.049).abs() < 1e-12);
        assert_eq!(t.seconds(0), None);
        assert_eq!(t.seconds(TIMED_SIZES + 1), None);
        // Fewer than two smaller sizes timed: unknown.
        assert_eq!(table(&[(1, 0.01), (64, 0.2)]).seconds(2), None);
        assert_eq!(table(&[(4, 0.01), (8, 0.02)]).seconds(2), None);
    }

    #[test]
    fn a_size_keeps_a_running_mean() {
        let t = table(&[(2, 1.0), (2, 2.0)]);
        assert!((t.seconds(2).unwrap() - 1.2).abs() < 1e-12);
    }
}
