//! Exponential backoff with jitter: the one used by the consumer (outages
//! and handler retries) and the relay (failed batches).
//!
//! The first delay is `initial`; each one after doubles, up to `max`. Every
//! delay handed out is jittered: a uniform pick in [d/2, d], so members
//! that failed together do not retry together.

use std::time::Duration;

/// Exponential backoff's jitter: a uniform pick in [d/2, d].
pub fn jitter(delay: Duration) -> Duration {
    let half = delay / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Delays between attempts: `initial`, doubling up to `max`, jittered.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// The delay (before jitter) the next attempt waits.
    current: Duration,
}

impl Backoff {
    /// Delays starting at `initial` and doubling up to `max` (a `max`
    /// below `initial` caps every delay after the first).
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The delay (before jitter) the next call to [`Backoff::next_delay`]
    /// is drawn from.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The pause before the next attempt: the current delay jittered into
    /// [d/2, d]. The delay after it doubles, up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let pause = jitter(self.current);
        self.current = self.current.saturating_mul(2).min(self.max);
        pause
    }

    /// Starts over from `initial` (an attempt worked).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut backoff = Backoff::new(20 * MS, 200 * MS);
        let mut bases = Vec::new();
        for _ in 0..7 {
            bases.push(backoff.current());
            backoff.next_delay();
        }
        assert_eq!(
            bases,
            [20, 40, 80, 160, 200, 200, 200].map(|ms| ms * MS).to_vec()
        );
    }

    #[test]
    fn every_delay_is_jittered_into_its_lower_half() {
        let mut backoff = Backoff::new(20 * MS, 160 * MS);
        for _ in 0..200 {
            let base = backoff.current();
            let pause = backoff.next_delay();
            assert!(
                (base / 2..=base).contains(&pause),
                "{pause:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
        // Jitter spreads the pauses: 200 draws from [80, 160] ms are not all one value.
        let pauses: std::collections::BTreeSet<Duration> =
            (0..200).map(|_| jitter(160 * MS)).collect();
        assert!(pauses.len() > 1, "jitter drew one value 200 times");
    }

    #[test]
    fn reset_starts_over_from_the_initial_delay() {
        let mut backoff = Backoff::new(50 * MS, 5000 * MS);
        for _ in 0..4 {
            backoff.next_delay();
        }
        assert_eq!(backoff.current(), 800 * MS);
        backoff.reset();
        assert_eq!(backoff.current(), 50 * MS);
        let pause = backoff.next_delay();
        assert!((25 * MS..=50 * MS).contains(&pause), "{pause:?}");
        assert_eq!(backoff.current(), 100 * MS);
    }

    #[test]
    fn an_initial_delay_above_the_cap_is_used_once() {
        // As before the module existed: the first pause is drawn from
        // `initial`, the doubling is capped.
        let mut backoff = Backoff::new(300 * MS, 100 * MS);
        let pause = backoff.next_delay();
        assert!((150 * MS..=300 * MS).contains(&pause), "{pause:?}");
        assert_eq!(backoff.current(), 100 * MS);
    }

    #[test]
    fn a_huge_delay_saturates_instead_of_overflowing() {
        let mut backoff = Backoff::new(Duration::MAX / 2 + Duration::from_secs(1), Duration::MAX);
        backoff.next_delay();
        assert_eq!(backoff.current(), Duration::MAX);
    }
}
