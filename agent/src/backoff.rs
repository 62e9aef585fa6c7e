//! Exponential back-off with jitter for reconnecting.
//!
//! The delay doubles from `initial` up to `max`; each wait is drawn uniformly from the upper
//! half of the current delay ("equal jitter"), so a fleet of agents that lost the same
//! scheduler does not reconnect in lockstep, yet no agent ever retries faster than half the
//! current delay (no spinning). Pure: the randomness is a seeded xorshift generator.

use std::time::Duration;

/// Back-off state.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    rng: u64,
}

impl Backoff {
    /// A back-off from `initial` to `max`, with its jitter seeded by `seed`.
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Self {
        // xorshift's state must not be 0.
        Self {
            initial,
            max: max.max(initial),
            current: initial,
            rng: seed | 1,
        }
    }

    /// A seed that differs between agents and between runs.
    pub fn random_seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    }

    /// The next delay to wait.
    pub fn next_delay(&mut self) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = base / 2;
        // A uniform fraction in [0, 1) from the top 53 bits.
        let fraction = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        half + half.mul_f64(fraction)
    }

    /// Back to `initial`, after a session that worked.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Every delay lies in the upper half of a doubling schedule capped at `max`, and
        /// `reset` starts it over.
        #[test]
        fn bounds(seed: u64, initial_ms in 1u64..1000, factor in 1u64..100) {
            let initial = Duration::from_millis(initial_ms);
            let max = initial * factor as u32;
            let mut b = Backoff::new(initial, max, seed);
            let mut expected = initial;
            for _ in 0..20 {
                let d = b.next_delay();
                proptest::prop_assert!(d >= expected / 2 && d <= expected, "{d:?} vs {expected:?}");
                expected = (expected * 2).min(max);
            }
            b.reset();
            let d = b.next_delay();
            proptest::prop_assert!(d >= initial / 2 && d <= initial);
        }
    }

    /// Two seeds give different delays (jitter actually varies).
    #[test]
    fn jitter_varies() {
        let s = Duration::from_secs(10);
        let a: Vec<_> = {
            let mut b = Backoff::new(s, s, 1);
            (0..5).map(|_| b.next_delay()).collect()
        };
        let c: Vec<_> = {
            let mut b = Backoff::new(s, s, 2);
            (0..5).map(|_| b.next_delay()).collect()
        };
        assert_ne!(a, c);
    }
}
