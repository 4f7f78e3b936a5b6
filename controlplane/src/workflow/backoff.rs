//! Time between attempts: exponential, capped, with jitter.

use std::time::Duration;

/// Attempt `n` (1-based) that failed waits `min(cap, base * 2^(n-1))`, of
/// which the upper half is random ("equal jitter"): retries of steps that
/// failed together spread out, and none comes back sooner than half the
/// exponential delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_millis(500), cap: Duration::from_secs(60) }
    }
}

impl Backoff {
    /// The exponential delay after failed attempt `attempt`, before jitter.
    pub fn ceiling(&self, attempt: i64) -> Duration {
        let doublings = u32::try_from(attempt.saturating_sub(1).clamp(0, 32)).unwrap_or(32);
        self.base.saturating_mul(1u32 << doublings.min(31)).min(self.cap)
    }

    /// The delay to wait after failed attempt `attempt`, jitter included.
    pub fn delay(&self, attempt: i64) -> Duration {
        self.delay_with(attempt, unit_random())
    }

    /// [`Self::delay`] with the random draw `unit` in [0, 1) given.
    pub fn delay_with(&self, attempt: i64, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        ceiling / 2 + (ceiling / 2).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// A uniform draw in [0, 1) from the OS's random source (through a v4 UUID,
/// which the crate already uses for ids).
fn unit_random() -> f64 {
    let bits = uuid::Uuid::new_v4().as_u128() as u64 >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(1) };
        let ceilings: Vec<u128> = (1..=6).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay_with(3, 0.0), Duration::from_millis(200));
        assert_eq!(b.delay_with(3, 1.0), Duration::from_millis(400));
        for _ in 0..1000 {
            let d = b.delay(2);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200), "{d:?}");
        }
        // Absurd attempt counts neither overflow nor exceed the cap.
        assert_eq!(b.ceiling(i64::MAX), b.cap);
        assert_eq!(b.ceiling(0), b.base);
    }
}
