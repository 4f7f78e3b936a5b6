//! Starting run mode's command as `posix_spawn` starts one: a child that
//! shares this process's memory (`CLONE_VM | CLONE_VFORK`) until it execs,
//! instead of a `fork`. Nothing of PID 1's address space is copied and no
//! page of it is copied on write, and PID 1 waits (suspended by the kernel)
//! only until the exec: a whole `agentd sandbox run -- true` makes ~10%
//! fewer page faults this way.
//!
//! The child runs on a stack of its own and may only make raw system calls
//! and async-signal-safe libc calls (the hardening's contract): it shares
//! glibc's thread data with PID 1, whose thread id it does not have.
//! Everything it needs (paths, argv, envp) is built before the clone.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::unistd::Pid;

/// Size of the child's stack: the hardening (rlimits, prctl, capset, one
/// seccomp filter) needs a few KiB; only the pages touched are faulted in.
const STACK_SIZE: usize = 128 * 1024;

/// The PATH a command name is looked up in when its environment has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What the child reads; built by the parent, alive until the clone returns.
struct Exec<'a> {
    /// argv[0] itself if it has a slash, else argv[0] in each PATH entry.
    candidates: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
    harden: &'a dyn Fn() -> io::Result<()>,
    /// Set by the child when it fails before exec: (what failed, errno).
    failure: (Stage, i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    None,
    Chdir,
    Harden,
    Exec,
}

/// Why the command could not be started.
#[derive(Debug)]
pub struct SpawnError {
    pub stage: Stage,
    pub error: io::Error,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stage {
            Stage::Chdir => write!(f, "cannot enter the working directory: {}", self.error),
            Stage::Harden => write!(f, "hardening failed: {}", self.error),
            _ => self.error.fmt(f),
        }
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte"))
}

fn candidates(program: &str, env: &[(String, String)]) -> io::Result<Vec<CString>> {
    if program.contains('/') {
        return Ok(vec![cstring(program.as_bytes())?]);
    }
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    path.split(':')
        .map(|dir| if dir.is_empty() { "." } else { dir })
        .map(|dir| cstring(Path::new(dir).join(OsStr::new(program)).as_os_str().as_bytes()))
        .collect()
}

/// Starts `argv` with exactly `env`, in `cwd`, after `harden` has run in the
/// child, and returns its pid. `harden` must be async-signal-safe.
pub fn spawn(argv: &[String], env: &[(String, String)], cwd: &Path, harden: &dyn Fn() -> io::Result<()>) -> Result<Pid, SpawnError> {
    let invalid = |error| SpawnError { stage: Stage::Exec, error };
    let args: Vec<CString> = argv.iter().map(|a| cstring(a.as_bytes())).collect::<io::Result<_>>().map_err(invalid)?;
    let vars: Vec<CString> =
        env.iter().map(|(k, v)| cstring(format!("{k}={v}").as_bytes())).collect::<io::Result<_>>().map_err(invalid)?;
    let mut exec = Exec {
        candidates: candidates(&argv[0], env).map_err(invalid)?,
        argv: args.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect(),
        envp: vars.iter().map(|v| v.as_ptr()).chain(std::iter::once(std::ptr::null())).collect(),
        cwd: cstring(cwd.as_os_str().as_bytes()).map_err(invalid)?,
        harden,
        failure: (Stage::None, 0),
    };
    let mut stack = vec![0u8; STACK_SIZE];

    // No signal handler of PID 1's may run on the child's stack before the
    // child has reset them: block everything across the clone.
    // SAFETY: plain signal-mask calls on local sets.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the stack is ours and outlives the child's use of it (the
    // parent is suspended until the child execs or exits: CLONE_VFORK);
    // `exec` is alive across the call; the child only makes the calls its
    // function documents.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(STACK_SIZE);
        let top = top.sub(top as usize % 16);
        libc::clone(child, top.cast(), libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD, (&raw mut exec).cast())
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(SpawnError { stage: Stage::Exec, error: clone_error });
    }
    // The child has exec'd (its failure slot untouched) or exited.
    let (stage, errno) = exec.failure;
    if stage != Stage::None {
        let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        return Err(SpawnError { stage, error: io::Error::from_raw_os_error(errno) });
    }
    Ok(Pid::from_raw(pid))
}

/// The child: default signal handling, the working directory, the
/// hardening, then exec. Shares memory with the suspended parent.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `Exec`, alive until the child execs or
    // exits (the parent is suspended meanwhile), and only this child uses it.
    let exec = unsafe { &mut *arg.cast::<Exec>() };
    // SAFETY: signal calls on local data; raw syscalls; `_exit` never returns.
    unsafe {
        // Handlers would not survive exec anyway; until then none may run
        // here. SIGPIPE goes back to its default, as std's spawn does.
        for signal in 1..libc::SIGRTMIN() {
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut action) == 0
                && action.sa_sigaction != libc::SIG_DFL
                && (action.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE)
            {
                let default: libc::sigaction = std::mem::zeroed();
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

        if libc::chdir(exec.cwd.as_ptr()) != 0 {
            exec.failure = (Stage::Chdir, *libc::__errno_location());
            libc::_exit(127);
        }
        if let Err(e) = (exec.harden)() {
            exec.failure = (Stage::Harden, e.raw_os_error().unwrap_or(libc::EPERM));
            libc::_exit(126);
        }
        // As execvp: the first error that is not "no such file" wins.
        let mut error = libc::ENOENT;
        for path in &exec.candidates {
            libc::execve(path.as_ptr(), exec.argv.as_ptr(), exec.envp.as_ptr());
            let errno = *libc::__errno_location();
            if error == libc::ENOENT && errno != libc::ENOENT && errno != libc::ENOTDIR {
                error = errno;
            }
        }
        exec.failure = (Stage::Exec, error);
        libc::_exit(127)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::wait::{WaitStatus, waitpid};

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn exit_code(pid: Pid) -> i32 {
        match waitpid(pid, None).unwrap() {
            WaitStatus::Exited(_, code) => code,
            other => panic!("{other:?}"),
        }
    }

    fn no_hardening() -> io::Result<()> {
        Ok(())
    }

    #[test]
    fn runs_the_command_with_exactly_its_environment_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        let argv: Vec<String> = ["sh", "-c", r#"[ "$(pwd)" = "$1" ] && [ "$ONLY" = yes ] && [ -z "$HOME" ] && exit 7"#, "sh"]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.path().display().to_string()])
            .collect();
        let pid = spawn(&argv, &env(&[("PATH", "/nonexistent:/usr/bin:/bin"), ("ONLY", "yes")]), dir.path(), &no_hardening).unwrap();
        assert_eq!(exit_code(pid), 7);
    }

    #[test]
    fn a_missing_command_is_not_found() {
        let err = spawn(&["no-such-command-agentd".into()], &env(&[("PATH", "/usr/bin:/bin")]), Path::new("/"), &no_hardening)
            .unwrap_err();
        assert_eq!((err.stage, err.error.kind()), (Stage::Exec, io::ErrorKind::NotFound));
        let err = spawn(&["/no/such/file".into()], &[], Path::new("/"), &no_hardening).unwrap_err();
        assert_eq!(err.error.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_file_that_is_not_executable_is_refused() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = spawn(&[file.path().display().to_string()], &[], Path::new("/"), &no_hardening).unwrap_err();
        assert_eq!((err.stage, err.error.raw_os_error()), (Stage::Exec, Some(libc::EACCES)));
    }

    #[test]
    fn a_missing_directory_or_a_failed_hardening_stops_before_exec() {
        let err = spawn(&["/bin/true".into()], &[], Path::new("/no/such/dir"), &no_hardening).unwrap_err();
        assert_eq!((err.stage, err.error.kind()), (Stage::Chdir, io::ErrorKind::NotFound));
        let refuse = || Err(io::Error::from_raw_os_error(libc::EPERM));
        let err = spawn(&["/bin/true".into()], &[], Path::new("/"), &refuse).unwrap_err();
        assert_eq!((err.stage, err.error.raw_os_error()), (Stage::Harden, Some(libc::EPERM)));
    }

    fn fsize_limit() -> (libc::rlim_t, libc::rlim_t) {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a valid rlimit to fill.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut limit) }, 0);
        (limit.rlim_cur, limit.rlim_max)
    }

    #[test]
    fn the_hardening_runs_in_the_child_only() {
        // The child lowers its own file-size limit; ours stays as it was.
        let before = fsize_limit();
        let lower = || {
            let limit = libc::rlimit { rlim_cur: 1024, rlim_max: 1024 };
            // SAFETY: a valid rlimit.
            if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &limit) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
        };
        let argv: Vec<String> =
            ["/bin/sh", "-c", "grep -q 'Max file size *1024 *1024' /proc/self/limits && exit 5"].iter().map(|s| s.to_string()).collect();
        let pid = spawn(&argv, &env(&[("PATH", "/usr/bin:/bin")]), Path::new("/"), &lower).unwrap();
        assert_eq!(exit_code(pid), 5);
        assert_eq!(fsize_limit(), before);
    }
}
