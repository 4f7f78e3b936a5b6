//! Child reaping for PID 1.
//!
//! Agents are spawned with std's `Command` and never waited on directly: one
//! loop calls `waitpid(-1)` on every SIGCHLD, which also reaps orphans that the
//! kernel re-parents to PID 1, and passes statuses to registered waiters.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// How a process ended, as a shell reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

pub struct Reaper {
    watchers: Mutex<HashMap<i32, watch::Sender<Option<Exit>>>>,
}

impl Reaper {
    pub fn start() -> std::io::Result<Arc<Self>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Self { watchers: Mutex::default() });
        let weak = Arc::downgrade(&reaper);
        tokio::spawn(async move {
            loop {
                let Some(reaper) = weak.upgrade() else { return };
                reaper.reap_all();
                drop(reaper);
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Registers interest in `pid`'s exit. Call it right after spawning, with
    /// no await in between, so the exit cannot be reaped unseen.
    pub fn watch(&self, pid: i32) -> watch::Receiver<Option<Exit>> {
        let (tx, rx) = watch::channel(None);
        self.watchers.lock().unwrap().insert(pid, tx);
        rx
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.report(pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.report(pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    fn report(&self, pid: Pid, exit: Exit) {
        if let Some(tx) = self.watchers.lock().unwrap().remove(&pid.as_raw()) {
            tracing::info!(pid = pid.as_raw(), %exit, "agent process ended");
            let _ = tx.send(Some(exit));
        } else {
            tracing::debug!(pid = pid.as_raw(), %exit, "reaped orphan");
        }
    }
}
