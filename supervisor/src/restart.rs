//! When an agent that ended is started again, and how long to wait first.

use std::time::Duration;

use super::reaper::Exit;

/// How long an agent must have run for its next failure to count as a first
/// one again (the backoff and the restart budget start over).
pub const STABLE_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    Never,
    /// After a non-zero exit or a signal; an agent that exits 0 meant to.
    OnFailure,
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    pub restart: Restart,
    /// Restarts in a row (without a stable run between) before giving up.
    pub max_restarts: u32,
    /// The first delay; doubled for each restart in a row, up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self { restart: Restart::OnFailure, max_restarts: 5, backoff: Duration::from_millis(200), backoff_max: Duration::from_secs(30) }
    }
}

impl RestartPolicy {
    /// From the plan's fields; unspecified or zero means the default.
    pub fn new(restart: agentd_proto::common::RestartPolicy, max_restarts: u32, backoff_ms: u32) -> Self {
        use agentd_proto::common::RestartPolicy as Wire;
        let d = Self::default();
        let restart = match restart {
            Wire::Unspecified | Wire::OnFailure => Restart::OnFailure,
            Wire::Never => Restart::Never,
            Wire::Always => Restart::Always,
        };
        Self {
            restart,
            max_restarts: if max_restarts == 0 { d.max_restarts } else { max_restarts },
            backoff: if backoff_ms == 0 { d.backoff } else { Duration::from_millis(backoff_ms.into()) },
            backoff_max: d.backoff_max,
        }
    }

    pub fn wants_restart(&self, exit: Exit) -> bool {
        match self.restart {
            Restart::Never => false,
            Restart::OnFailure => exit != Exit::Code(0),
            Restart::Always => true,
        }
    }

    /// The wait before restart number `attempt` (1-based) of a row.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::common::RestartPolicy as Wire;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let p = RestartPolicy::default();
        let delays: Vec<u128> = (1..=10).map(|n| p.delay(n).as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000]);
        assert_eq!(p.delay(200), p.backoff_max);
    }

    #[test]
    fn policies_decide_by_exit() {
        let on_failure = RestartPolicy::default();
        assert!(on_failure.wants_restart(Exit::Signal(9)));
        assert!(on_failure.wants_restart(Exit::Code(1)));
        assert!(!on_failure.wants_restart(Exit::Code(0)));
        assert!(RestartPolicy::new(Wire::Always, 0, 0).wants_restart(Exit::Code(0)));
        assert!(!RestartPolicy::new(Wire::Never, 0, 0).wants_restart(Exit::Signal(9)));
        assert_eq!(RestartPolicy::new(Wire::Unspecified, 0, 0), RestartPolicy::new(Wire::OnFailure, 0, 0));
        let custom = RestartPolicy::new(Wire::OnFailure, 2, 50);
        assert_eq!((custom.max_restarts, custom.backoff), (2, Duration::from_millis(50)));
    }
}
