//! systemd's readiness protocol (`sd_notify(3)`) for the daemons `up`,
//! `server` and `node`, which their units run as `Type=notify`.
//!
//! A daemon says what it is doing (`STATUS=`), that it is ready (`READY=1`:
//! its listener accepts and its start-up reconcile is done), that it stops
//! (`STOPPING=1`), and, when the unit sets `WatchdogSec=`, that it is alive
//! (`WATCHDOG=1` every half period, from a task of its own runtime: a
//! runtime whose workers are all stuck stops the pings and systemd restarts
//! the daemon).
//!
//! Without `NOTIFY_SOCKET` (run by hand, in tests) every call does nothing
//! and logs nothing. The variables stay in the environment: the processes
//! the node starts (the zygote, `sandbox-init`) get a cleared one
//! (`agentd_builder::launch`), and `NotifyAccess=main` would ignore them
//! anyway. Messages go through the `sd-notify` crate; an abstract-namespace
//! socket (`@...`) is not supported by it, and systemd never hands one to a
//! system service (`/run/systemd/notify`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// The service manager's end, read once at start.
pub struct Notifier {
    /// Whether `NOTIFY_SOCKET` was set: without it nothing is sent.
    enabled: bool,
    /// Half the watchdog period the manager asked for (`WATCHDOG_USEC`, for
    /// this process per `WATCHDOG_PID` when that is set), if any.
    ping_every: Option<Duration>,
    /// Whether a failed send was logged already: a manager that went away
    /// would otherwise get a warning per watchdog ping.
    warned: AtomicBool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        // As sd_watchdog_enabled(3): WATCHDOG_USEC alone is enough;
        // WATCHDOG_PID, when set, must be this process.
        let ping_every = if enabled { ping_interval(sd_notify::watchdog_enabled()) } else { None };
        Self { enabled, ping_every, warned: AtomicBool::new(false) }
    }

    /// `STATUS=text`: what the daemon does now (`systemctl status` shows it).
    pub fn status(&self, text: &str) {
        self.send(&[NotifyState::Status(text)]);
    }

    /// `READY=1`, with a last status.
    pub fn ready(&self, text: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(text)]);
    }

    /// `STOPPING=1`: a stop began (systemd then waits for the exit rather
    /// than counting the daemon as failed).
    pub fn stopping(&self, text: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(text)]);
    }

    /// Starts the watchdog pings, if the manager asked for them; stop them
    /// with [`Watchdog::stop`].
    pub fn start_watchdog(self: &std::sync::Arc<Self>) -> Watchdog {
        let stop = CancellationToken::new();
        let task = self.ping_every.map(|every| {
            let this = std::sync::Arc::clone(self);
            let stop = stop.clone();
            tracing::debug!(every = ?every, "systemd watchdog on");
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                // After a stall, one ping now, not a burst of the missed ones.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => this.send(&[NotifyState::Watchdog]),
                    }
                }
            })
        });
        Watchdog { stop, task }
    }

    fn send(&self, states: &[NotifyState]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET); further failures are logged at debug level");
            } else {
                tracing::debug!(error = %e, "cannot notify the service manager");
            }
        }
    }
}

/// The watchdog ping task, if one runs.
pub struct Watchdog {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Watchdog {
    /// Ends the pings and waits for the task.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Some(task) = self.task {
            let _ = task.await;
        }
    }
}

/// How often to ping for a watchdog period: half of it, as sd_notify(3)
/// advises; a zero period means no watchdog (systemd's `WatchdogSec=0`).
fn ping_interval(period: Option<Duration>) -> Option<Duration> {
    period.filter(|p| !p.is_zero()).map(|p| (p / 2).max(Duration::from_millis(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_come_at_half_the_period_and_never_for_zero() {
        assert_eq!(ping_interval(Some(Duration::from_secs(30))), Some(Duration::from_secs(15)));
        assert_eq!(ping_interval(Some(Duration::from_micros(500_000))), Some(Duration::from_millis(250)));
        assert_eq!(ping_interval(Some(Duration::from_micros(1))), Some(Duration::from_millis(1)));
        assert_eq!(ping_interval(Some(Duration::ZERO)), None);
        assert_eq!(ping_interval(None), None);
    }
}
