//! `agentd sandbox-init --zygote`: a single-threaded process the node starts
//! once and keeps, that forks one worker per sandbox instead of the node
//! executing the (large) agentd binary for each. The worker does exactly what
//! a one-shot `sandbox-init` does ([`super::init::create`]), on a copy of a
//! process that has already paid for loading the binary and compiling the
//! agents' seccomp filter.
//!
//! Protocol on stdin/stdout: a request is a `u32` little-endian length and the
//! [`SandboxSpec`] as JSON; the answer is one [`InitReport`] line. Requests
//! are served one at a time. End of file on stdin ends the zygote.
//!
//! The zygote is not a subreaper: a worker is one (the sandbox's PID 1 comes
//! back to it), and when the worker exits PID 1 moves on to the node. A
//! worker dies with the zygote (`PR_SET_DEATHSIG`), which dies with the node's
//! handle on it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::ForkResult;

use super::harden::Hardening;
use super::init::{self, InitReport};
use super::spec::SandboxSpec;

/// Entry point of `agentd sandbox-init --zygote`. Must run before any thread
/// is started.
pub fn main() -> ! {
    let hardening = Hardening::default_for_agents().map_err(|e| e.to_string());
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    loop {
        let mut len = [0u8; 4];
        if stdin.read_exact(&mut len).is_err() {
            std::process::exit(0);
        }
        let mut input = vec![0u8; u32::from_le_bytes(len) as usize];
        if stdin.read_exact(&mut input).is_err() {
            std::process::exit(0);
        }
        let report = serve_one(&input, &hardening);
        let line = serde_json::to_string(&report).expect("report serializes");
        if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
            std::process::exit(0);
        }
    }
}

fn failed(stage: &str, message: impl Into<String>) -> InitReport {
    InitReport::Failed { stage: stage.into(), message: message.into() }
}

/// Forks a worker for one sandbox and relays its report.
fn serve_one(input: &[u8], hardening: &Result<Hardening, String>) -> InitReport {
    let hardening = match hardening {
        Ok(h) => h,
        Err(e) => return failed("hardening", e.clone()),
    };
    let (rx, tx) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return failed("pipe", e.to_string()),
    };
    let zygote = std::process::id() as i32;
    // SAFETY: this process is single-threaded; the worker runs the same code
    // a fresh `sandbox-init` would.
    match unsafe { nix::unistd::fork() } {
        Err(e) => failed("fork", e.to_string()),
        Ok(ForkResult::Child) => {
            drop(rx);
            // SAFETY: prctl and getppid with integer arguments only.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if libc::getppid() != zygote {
                    libc::_exit(1);
                }
            }
            let report = std::panic::catch_unwind(|| worker(input, hardening))
                .unwrap_or_else(|_| failed("sandbox-init", "panic"));
            let line = serde_json::to_string(&report).expect("report serializes");
            let _ = writeln!(File::from(tx), "{line}");
            // SAFETY: skips the zygote's destructors and atexit handlers.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(tx);
            let mut line = String::new();
            let read = BufReader::new(File::from(rx)).read_line(&mut line);
            let status = loop {
                match waitpid(child, None) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            };
            match (read, serde_json::from_str::<InitReport>(line.trim_end())) {
                (Ok(_), Ok(report)) => report,
                _ => failed("sandbox-init", format!("worker gave no report ({})", describe(status))),
            }
        }
    }
}

fn describe(status: nix::Result<WaitStatus>) -> String {
    match status {
        Ok(WaitStatus::Exited(_, code)) => format!("exit {code}"),
        Ok(WaitStatus::Signaled(_, signal, _)) => format!("killed by {signal}"),
        Ok(other) => format!("{other:?}"),
        Err(e) => e.to_string(),
    }
}

fn worker(input: &[u8], hardening: &Hardening) -> InitReport {
    let spec: SandboxSpec = match serde_json::from_slice(input) {
        Ok(spec) => spec,
        Err(e) => return failed("parse spec", e.to_string()),
    };
    if let Err(e) = spec.validate() {
        return failed("validate spec", e.to_string());
    }
    match init::create_with(&spec, hardening.clone()) {
        Ok(pid) => InitReport::Ready { pid: pid.as_raw(), steps: init::steps() },
        Err(e) => failed(e.stage, e.message),
    }
}
