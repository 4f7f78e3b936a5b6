//! `agentd sandbox-init --zygote`: a single-threaded process the node starts
//! once and keeps, that forks one worker per sandbox instead of the node
//! executing the agentd binary for each. The worker does exactly what a
//! one-shot `sandbox-init` does ([`crate::init::create`]), on a copy of a
//! process that has already paid for loading the binary and compiling the
//! agents' seccomp filter.
//!
//! Protocol on stdin/stdout: a request is a `u32` little-endian length and a
//! [`Request`] as JSON; the answer is one [`InitReport`] line. Requests are
//! served one at a time. End of file on stdin ends the zygote.
//!
//! A worker can also be forked ahead of its sandbox ([`Request::Park`]): it
//! moves itself into the cgroups it is given (the node's spare, on v1
//! hierarchies, where a move may wait ~20 ms for the kernel) and waits there;
//! the node then renames those cgroups into the sandbox's and sends the spec
//! ([`Request::CreateParked`]), and the sandbox's PID 1, forked by a worker
//! already in its cgroups, is born in them. One worker is parked at a time.
//!
//! The zygote is not a subreaper: a worker is one (the sandbox's PID 1 comes
//! back to it), and when the worker exits PID 1 moves on to the node. A
//! worker dies with the zygote (`PR_SET_DEATHSIG`), which ends when the node
//! closes its stdin, or dies (a crash closes it too). Sandbox PID 1s are
//! not tied to either: no parent-death signal (a fork's child does not
//! inherit the worker's), a session of their own (`init::run_payload`), so
//! they outlive the zygote and the node, which re-adopts them at its next
//! start (live restore) or stops them; a node that starts again starts a
//! new zygote on first use.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

use agentd_harden::Hardening;
use crate::init::{self, InitReport, Pid1};
use crate::spec::SandboxSpec;

/// What the node asks of its zygote.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Build this sandbox with a new worker.
    Create(SandboxSpec),
    /// Fork a worker that moves itself into these cgroups (their
    /// `cgroup.procs` files) and waits; answered `Parked` at once. A worker
    /// parked before is ended.
    Park { cgroup_procs: Vec<PathBuf> },
    /// Build this sandbox with the parked worker, whose cgroups are now the
    /// sandbox's: `cgroup_procs` lists only those it must still join.
    /// Answered `Failed` at stage "parked" when no worker is parked or it is
    /// gone, having done nothing.
    CreateParked(SandboxSpec),
}

/// Stage of a `CreateParked` that found no worker to hand the spec to.
pub const NO_PARKED_WORKER: &str = "parked";

/// The worker waiting in its cgroups, and the pipes to it.
struct Parked {
    pid: Pid,
    /// The spec goes here, framed as the zygote's own requests.
    spec_tx: File,
    /// Its report comes back here.
    report_rx: BufReader<File>,
}

impl Parked {
    /// Ends the worker and reaps it.
    fn end(self) {
        drop(self.spec_tx);
        let _ = kill(self.pid, Signal::SIGKILL);
        let _ = waitpid(self.pid, None);
    }
}

/// Entry point of `agentd sandbox-init --zygote`. Must run before any thread
/// is started.
pub fn main(pid1: Pid1) -> ! {
    let hardening = Hardening::default_for_agents().map_err(|e| e.to_string());
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut parked: Option<Parked> = None;
    loop {
        let Some(input) = read_frame(&mut stdin) else { std::process::exit(0) };
        let report = match serde_json::from_slice::<Request>(&input) {
            Ok(Request::Create(spec)) => serve_one(&spec, &hardening, pid1),
            Ok(Request::Park { cgroup_procs }) => {
                if let Some(old) = parked.take() {
                    old.end();
                }
                match park(&cgroup_procs, &hardening, pid1) {
                    Ok(p) => {
                        let pid = p.pid.as_raw();
                        parked = Some(p);
                        InitReport::Parked { pid }
                    }
                    Err(report) => report,
                }
            }
            Ok(Request::CreateParked(spec)) => match parked.take() {
                Some(p) => serve_parked(p, &spec),
                None => failed(NO_PARKED_WORKER, "no worker is parked"),
            },
            Err(e) => failed("parse request", e.to_string()),
        };
        let line = serde_json::to_string(&report).expect("report serializes");
        if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
            std::process::exit(0);
        }
    }
}

/// A `u32` little-endian length and that many bytes; `None` at end of file.
fn read_frame(input: &mut impl Read) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len).ok()?;
    let mut frame = vec![0u8; u32::from_le_bytes(len) as usize];
    input.read_exact(&mut frame).ok()?;
    Some(frame)
}

fn failed(stage: &str, message: impl Into<String>) -> InitReport {
    InitReport::Failed { stage: stage.into(), message: message.into() }
}

/// Forks a worker that first runs `before` (in the worker), then builds the
/// sandbox `next` gives it, writing its report on a pipe; returns the
/// worker's pid and that pipe. The worker dies with the zygote.
fn fork_worker(
    hardening: &Hardening,
    pid1: Pid1,
    before: impl FnOnce() -> Result<(), InitReport>,
    next: impl FnOnce() -> Option<SandboxSpec>,
) -> Result<(Pid, OwnedFd), InitReport> {
    let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| failed("pipe", e.to_string()))?;
    let zygote = std::process::id() as i32;
    // SAFETY: this process is single-threaded; the worker runs the same code
    // a fresh `sandbox-init` would.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(failed("fork", e.to_string())),
        Ok(ForkResult::Child) => {
            drop(rx);
            // SAFETY: prctl and getppid with integer arguments only.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if libc::getppid() != zygote {
                    libc::_exit(1);
                }
            }
            let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match before() {
                Err(report) => Some(report),
                Ok(()) => next().map(|spec| worker(&spec, hardening, pid1)),
            }))
            .unwrap_or_else(|_| Some(failed("sandbox-init", "panic")));
            if let Some(report) = report {
                let line = serde_json::to_string(&report).expect("report serializes");
                let _ = writeln!(File::from(tx), "{line}");
            }
            // SAFETY: skips the zygote's destructors and atexit handlers.
            unsafe { libc::_exit(0) }
        }
        Ok(ForkResult::Parent { child }) => Ok((child, rx)),
    }
}

/// Forks a worker for one sandbox and relays its report.
fn serve_one(spec: &SandboxSpec, hardening: &Result<Hardening, String>, pid1: Pid1) -> InitReport {
    let hardening = match hardening {
        Ok(h) => h,
        Err(e) => return failed("hardening", e.clone()),
    };
    match fork_worker(hardening, pid1, || Ok(()), || Some(spec.clone())) {
        Ok((pid, rx)) => relay(pid, &mut BufReader::new(File::from(rx))),
        Err(report) => report,
    }
}

/// Forks a worker that moves itself into `cgroup_procs` and waits for its
/// spec on a pipe.
fn park(cgroup_procs: &[PathBuf], hardening: &Result<Hardening, String>, pid1: Pid1) -> Result<Parked, InitReport> {
    let hardening = hardening.as_ref().map_err(|e| failed("hardening", e.clone()))?;
    let (spec_rx, spec_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| failed("pipe", e.to_string()))?;
    // Opened here, before the answer: the node may rename the cgroups while
    // the worker is still on its way in, and an open file follows the
    // cgroup, where its path would not.
    let procs = cgroup_procs
        .iter()
        .map(|p| std::fs::OpenOptions::new().write(true).open(p).map_err(|e| failed("join cgroup", format!("{}: {e}", p.display()))))
        .collect::<Result<Vec<File>, _>>()?;
    let join = move || {
        let pid = std::process::id().to_string();
        for mut file in procs {
            // A worker that could not get in is no worker to use: the node
            // then makes the sandbox with a new one.
            file.write_all(pid.as_bytes()).map_err(|e| failed(NO_PARKED_WORKER, format!("the parked worker could not join its cgroup: {e}")))?;
        }
        Ok(())
    };
    // The spec, or nothing: the zygote ended the worker.
    let next = move || {
        let spec = read_frame(&mut File::from(spec_rx))?;
        serde_json::from_slice(&spec).ok()
    };
    let (pid, report_rx) = fork_worker(hardening, pid1, join, next)?;
    Ok(Parked { pid, spec_tx: File::from(spec_tx), report_rx: BufReader::new(File::from(report_rx)) })
}

/// Hands `spec` to the parked worker and relays its report.
fn serve_parked(mut parked: Parked, spec: &SandboxSpec) -> InitReport {
    let input = serde_json::to_vec(spec).expect("spec serializes");
    let mut frame = (input.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&input);
    if let Err(e) = parked.spec_tx.write_all(&frame) {
        let pid = parked.pid;
        parked.end();
        return failed(NO_PARKED_WORKER, format!("the parked worker {pid} is gone: {e}"));
    }
    relay(parked.pid, &mut parked.report_rx)
}

/// Reads a worker's report line and reaps it.
fn relay(pid: Pid, report: &mut impl BufRead) -> InitReport {
    let mut line = String::new();
    let read = report.read_line(&mut line);
    let status = loop {
        match waitpid(pid, None) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other,
        }
    };
    match (read, serde_json::from_str::<InitReport>(line.trim_end())) {
        (Ok(_), Ok(report)) => report,
        _ => failed("sandbox-init", format!("worker gave no report ({})", describe(status))),
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

fn worker(spec: &SandboxSpec, hardening: &Hardening, pid1: Pid1) -> InitReport {
    if let Err(e) = spec.validate() {
        return failed("validate spec", e.to_string());
    }
    match init::create_with(spec, hardening.clone(), pid1) {
        Ok(pid) => InitReport::Ready { pid: pid.as_raw(), steps: init::steps() },
        Err(e) => failed(e.stage, e.message),
    }
}
