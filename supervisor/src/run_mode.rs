//! The supervisor's run mode, behind `agentd sandbox run`: PID 1 runs one
//! command exactly as it would run an agent, with the caller's stdio, forwards
//! termination signals to it, reaps every orphan, and exits with the command's
//! status (its code, or 128 + the signal that killed it).
//!
//! No async runtime: one blocking `waitpid(-1)` loop is all PID 1 needs here,
//! and the command starts as `posix_spawn` starts one ([`super::spawn`]).

use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// The command's pid, for the signal handler.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// What PID 1 forwards to its command, and `agentd sandbox run` to PID 1.
pub const FORWARDED: &[libc::c_int] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2];

extern "C" fn forward(signal: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, signal) };
    }
}

/// Forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 received by
/// this process to `pid`, and unblocks them: `agentd sandbox run` blocks
/// them until the sandbox's PID 1 exists, so one sent meanwhile is forwarded
/// now rather than lost.
pub fn forward_signals_to(pid: i32) -> std::io::Result<()> {
    CHILD.store(pid, Ordering::Relaxed);
    install_forwarding()?;
    unblock_forwarded()
}

/// A no-op unless the process was made with these signals blocked (the
/// sandbox of `agentd sandbox run` inherits its creator's mask).
fn unblock_forwarded() -> std::io::Result<()> {
    // SAFETY: plain signal-set calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in FORWARDED {
            libc::sigaddset(&mut set, signal);
        }
        // It returns the error number rather than setting errno.
        let rc = libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

fn install_forwarding() -> std::io::Result<()> {
    for &signal in FORWARDED {
        // SAFETY: a zeroed sigaction with a plain handler and SA_RESTART; the
        // handler only calls kill.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = forward as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Runs `argv` and returns the exit code PID 1 should exit with. `harden`
/// runs in the child between fork and exec and must be async-signal-safe.
pub fn run(
    argv: &[String],
    env: &[(String, String)],
    cwd: &Path,
    harden: impl Fn() -> std::io::Result<()> + Send + Sync + 'static,
) -> i32 {
    if let Err(e) = install_forwarding() {
        eprintln!("agentd sandbox: cannot forward signals: {e}");
        return 125;
    }
    let child = match super::spawn::spawn(argv, env, cwd, &harden) {
        Ok(child) => child,
        Err(e) => {
            eprintln!("agentd sandbox: cannot run {}: {e}", argv[0]);
            // The shell's codes: 127 not found, 126 found but not runnable.
            return if e.error.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
        }
    };
    let child_pid = child.as_raw();
    CHILD.store(child_pid, Ordering::Relaxed);
    // Signals held since `agentd sandbox run` began reach the command now.
    if let Err(e) = unblock_forwarded() {
        eprintln!("agentd sandbox: cannot unblock signals: {e}");
    }
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == child_pid => return code,
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() == child_pid => return 128 + signal as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("agentd sandbox: waitpid failed: {e}");
                return 125;
            }
        }
    }
}
