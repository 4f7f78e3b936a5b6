//! `agentd sandbox-init`: the single-threaded path that makes a sandbox.
//!
//! It runs as a fresh process (the node re-executes its own binary), reads a
//! [`SandboxSpec`] as JSON on stdin and writes one [`InitReport`] line on stdout.
//!
//! 1. Bind the supervisor's unix socket on the host and open the agentd binary,
//!    both before any namespace exists.
//! 2. `unshare(CLONE_NEWNS)` and prepare the new root ([`super::rootfs`]).
//! 3. `clone` a child into new user, mount, pid, uts, ipc, net and cgroup
//!    namespaces. The child is PID 1 of its pid namespace.
//! 4. As host root, write the child's uid and gid maps, then let it go on.
//! 5. The child mounts `/proc` and `/dev/pts`, `pivot_root`s, raises loopback and
//!    `fexecve`s `agentd supervisor` with only the listening socket open.
//!
//! Errors in the child travel back on a close-on-exec pipe: end of file with no
//! data means the exec succeeded.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{Gid, Pid, Uid, chdir, pivot_root, setgroups, sethostname, setresgid, setresuid};
use serde::{Deserialize, Serialize};

use super::rootfs;
use super::spec::{Network, Payload, SandboxSpec};

/// What `sandbox-init` prints: the sandbox's PID 1 as a host pid, or why not.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitReport {
    Ready { pid: i32 },
    Failed { stage: String, message: String },
}

#[derive(Debug)]
pub struct InitError {
    pub stage: &'static str,
    pub message: String,
}

impl InitError {
    pub fn new(stage: &'static str, message: impl Into<String>) -> Self {
        Self { stage, message: message.into() }
    }
}

impl std::fmt::Display for InitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.stage, self.message)
    }
}

fn fail(stage: &'static str) -> impl FnOnce(nix::Error) -> InitError {
    move |e| InitError::new(stage, e.to_string())
}

fn fail_io(stage: &'static str) -> impl FnOnce(std::io::Error) -> InitError {
    move |e| InitError::new(stage, e.to_string())
}

/// Entry point of `agentd sandbox-init`. Must run before any thread is started.
pub fn main() -> ! {
    let report = match read_spec().and_then(|spec| create(&spec)) {
        Ok(pid) => InitReport::Ready { pid: pid.as_raw() },
        Err(e) => InitReport::Failed { stage: e.stage.to_string(), message: e.message },
    };
    let ok = matches!(report, InitReport::Ready { .. });
    let line = serde_json::to_string(&report).expect("report serializes");
    println!("{line}");
    std::process::exit(if ok { 0 } else { 1 })
}

fn read_spec() -> Result<SandboxSpec, InitError> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input).map_err(fail_io("read spec"))?;
    let spec: SandboxSpec = serde_json::from_str(&input).map_err(|e| InitError::new("parse spec", e.to_string()))?;
    spec.validate().map_err(|e| InitError::new("validate spec", e.to_string()))?;
    Ok(spec)
}

/// Everything the child needs, opened by the parent while it is still host root
/// in the host's namespaces.
struct Handover {
    exe: File,
    /// The supervisor's log and listening socket; absent in run mode, where
    /// the command keeps the caller's stdio.
    service: Option<(File, UnixListener)>,
}

/// Builds the sandbox and returns its PID 1 as a host pid. The calling process
/// must be single-threaded; it joins the sandbox's cgroups and leaves its own
/// mount namespace private, so it should exit (sandbox-init) or only wait
/// (`agentd sandbox run`) afterwards.
pub fn create(spec: &SandboxSpec) -> Result<Pid, InitError> {
    let exe = File::open("/proc/self/exe").map_err(fail_io("open agentd binary"))?;
    let service = match &spec.payload {
        Payload::Supervisor { socket_path, log_path } => {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(log_path)
                .map_err(fail_io("open supervisor log"))?;
            let _ = std::fs::remove_file(socket_path);
            let listener = UnixListener::bind(socket_path).map_err(fail_io("bind supervisor socket"))?;
            Some((log, listener))
        }
        Payload::Command { .. } => None,
    };
    let handover = Handover { exe, service };

    let result = build(spec, &handover);
    if result.is_err() {
        // Whatever joined the sandbox's cgroups must not stay there: their
        // owner kills and removes them next.
        let _ = leave_cgroups(spec);
        if let Payload::Supervisor { socket_path, .. } = &spec.payload {
            let _ = std::fs::remove_file(socket_path);
        }
    }
    result
}

fn leave_cgroups(spec: &SandboxSpec) -> Result<(), InitError> {
    let me = std::process::id().to_string();
    for procs in &spec.cgroup_return {
        std::fs::write(procs, &me).map_err(|e| InitError::new("leave cgroup", format!("{}: {e}", procs.display())))?;
    }
    Ok(())
}

/// Stages where a test may make setup fail (`SandboxSpec::inject_failure`).
pub const FAULT_STAGES: &[&str] = &["join-cgroup", "mount", "clone", "id-map", "pivot-root"];

/// Fails at `stage` if a test asked for it.
pub(crate) fn injected(spec: &SandboxSpec, stage: &'static str) -> Result<(), InitError> {
    match spec.inject_failure.as_deref() {
        Some(s) if s == stage => Err(InitError::new(stage, "injected failure")),
        _ => Ok(()),
    }
}

fn join_cgroups(spec: &SandboxSpec) -> Result<(), InitError> {
    let me = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, &me).map_err(|e| InitError::new("join cgroup", format!("{}: {e}", procs.display())))?;
    }
    Ok(())
}

fn build(spec: &SandboxSpec, handover: &Handover) -> Result<Pid, InitError> {
    join_cgroups(spec)?;
    injected(spec, "join-cgroup")?;
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(fail("unshare mount namespace"))?;
    // Nothing mounted from here on may propagate back to the host.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(fail("make mounts private"))?;
    rootfs::prepare(spec)?;
    // The child resolves paths as an unprivileged host uid and may not traverse
    // the (0700) state directory: it inherits the root's parent as working
    // directory instead and only uses paths relative to it.
    let parent = spec.rootfs_dir.parent().ok_or_else(|| InitError::new("chdir", "rootfs_dir has no parent"))?;
    chdir(parent).map_err(fail("chdir to sandbox dir"))?;

    let (go_rx, go_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(fail("pipe"))?;
    let (err_rx, err_tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(fail("pipe"))?;

    let mut flags = CloneFlags::CLONE_NEWUSER
        | CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWCGROUP;
    if spec.network == Network::None {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    // SAFETY: this process is single-threaded (sandbox-init starts no threads),
    // so the child may run arbitrary code, as after fork(2). A null stack makes
    // clone behave like fork: the child continues on a copy of this stack.
    injected(spec, "clone")?;
    let ret = unsafe {
        libc::syscall(libc::SYS_clone, (flags.bits() as libc::c_ulong) | libc::SIGCHLD as libc::c_ulong, 0usize, 0usize, 0usize, 0usize)
    };
    if ret < 0 {
        return Err(InitError::new("clone", std::io::Error::last_os_error().to_string()));
    }
    if ret == 0 {
        drop(go_tx);
        drop(err_rx);
        child(spec, handover, go_rx, err_tx)
    }
    let pid = Pid::from_raw(ret as i32);
    drop(go_rx);
    drop(err_tx);
    let abort = |e: InitError| {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        e
    };
    write_id_maps(pid, spec).and_then(|()| injected(spec, "id-map")).map_err(abort)?;
    // The sandbox is cloned into its cgroups; the creator leaves them if it
    // is to live on, so that it neither counts against their limits nor
    // keeps them busy at removal.
    leave_cgroups(spec).map_err(abort)?;
    File::from(go_tx).write_all(b"1").map_err(|e| abort(InitError::new("release child", e.to_string())))?;

    let mut message = String::new();
    File::from(err_rx).read_to_string(&mut message).map_err(|e| abort(InitError::new("read child status", e.to_string())))?;
    if !message.is_empty() {
        let _ = waitpid(pid, None);
        let (stage, msg) = message.split_once('\0').unwrap_or(("child", message.as_str()));
        return Err(InitError { stage: leak_stage(stage), message: msg.to_string() });
    }
    Ok(pid)
}

/// Stage names come back from the child as text; they are few and this process
/// exits right after, so leaking one is harmless.
fn leak_stage(stage: &str) -> &'static str {
    Box::leak(stage.to_string().into_boxed_str())
}

fn write_id_maps(pid: Pid, spec: &SandboxSpec) -> Result<(), InitError> {
    let map = format!("0 {} {}\n", spec.ids.host_base, spec.ids.size);
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, &map).map_err(|e| InitError::new("write id map", format!("{path}: {e}")))?;
    }
    Ok(())
}

/// The sandbox's future PID 1. Never returns: it execs the supervisor or exits.
fn child(spec: &SandboxSpec, handover: &Handover, go_rx: OwnedFd, err_tx: OwnedFd) -> ! {
    let mut go = [0u8; 1];
    match File::from(go_rx).read(&mut go) {
        Ok(1) => {}
        // The parent died or failed before releasing us.
        _ => unsafe { libc::_exit(1) },
    }
    let e = match enter(spec, handover) {
        Ok(never) => match never {},
        Err(e) => e,
    };
    let mut pipe = File::from(err_tx);
    let _ = write!(pipe, "{}\0{}", e.stage, e.message);
    // SAFETY: _exit skips destructors and atexit handlers that belong to the parent.
    unsafe { libc::_exit(1) }
}

fn enter(spec: &SandboxSpec, handover: &Handover) -> Result<std::convert::Infallible, InitError> {
    // Without these, creating files fails with EOVERFLOW: our ids are unmapped
    // until we switch to the mapped root.
    setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).map_err(fail("setresgid"))?;
    setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).map_err(fail("setresuid"))?;
    setgroups(&[]).map_err(fail("setgroups"))?;
    sethostname(&spec.hostname).map_err(fail("sethostname"))?;

    // Mounts copied into a less privileged namespace are locked, and
    // pivot_root refuses a locked new root: bind the tree onto itself to get an
    // unlocked top mount (its children stay locked, so agents cannot unmount
    // them to peek underneath).
    let name = spec.rootfs_dir.file_name().ok_or_else(|| InitError::new("bind root", "rootfs_dir has no name"))?;
    mount(Some(name), name, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(fail("bind new root"))?;
    chdir(name).map_err(fail("chdir new root"))?;
    let noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "proc", Some("proc"), noexec, None::<&str>).map_err(fail("mount /proc"))?;
    mount(
        Some("devpts"),
        "dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(fail("mount /dev/pts"))?;

    mask_proc().map_err(|e| InitError::new("mask /proc", e))?;
    injected(spec, "pivot-root")?;

    // pivot_root(".", ".") stacks the old root under the new one; detaching it
    // leaves only the new root, with no directory needed for the old one.
    pivot_root(".", ".").map_err(fail("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(fail("detach old root"))?;
    chdir("/").map_err(fail("chdir /"))?;

    if spec.network == Network::None {
        loopback_up().map_err(fail_io("bring up loopback"))?;
    }
    if let Some((log, _)) = &handover.service {
        redirect_stdio(log).map_err(fail_io("redirect stdio"))?;
    }
    exec_supervisor(spec, handover)
}

/// /proc paths that leak host information or expose kernel knobs, hidden as
/// runc hides them: files under /dev/null, directories under an empty
/// read-only tmpfs.
const MASKED_PROC: &[&str] = &[
    "proc/asound",
    "proc/acpi",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
];

/// /proc paths left visible but read-only, as runc leaves them.
const READONLY_PROC: &[&str] = &["proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger"];

/// Runs inside the new namespaces, relative to the new root (our cwd).
fn mask_proc() -> Result<(), String> {
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for path in MASKED_PROC {
        let Ok(meta) = std::fs::symlink_metadata(path) else { continue };
        let done = if meta.is_dir() {
            mount(Some("tmpfs"), *path, Some("tmpfs"), locked | MsFlags::MS_RDONLY, Some("size=0,mode=0555"))
        } else {
            mount(Some("dev/null"), *path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        };
        done.map_err(|e| format!("{path}: {e}"))?;
    }
    for path in READONLY_PROC {
        if std::fs::symlink_metadata(path).is_err() {
            continue;
        }
        mount(Some(*path), *path, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .map_err(|e| format!("{path}: {e}"))?;
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | locked;
        mount(None::<&str>, *path, None::<&str>, flags, None::<&str>).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket and ioctl calls on a zeroed ifreq that names "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(sock);
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn redirect_stdio(log: &File) -> std::io::Result<()> {
    let null = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    nix::unistd::dup2_stdout(log)?;
    nix::unistd::dup2_stderr(log)?;
    Ok(())
}

fn cstring(s: impl Into<Vec<u8>>) -> Result<CString, InitError> {
    CString::new(s).map_err(|e| InitError::new("exec supervisor", format!("argument contains NUL: {e}")))
}

fn exec_supervisor(spec: &SandboxSpec, handover: &Handover) -> Result<std::convert::Infallible, InitError> {
    // Every descriptor but stdio (and the listener) is close-on-exec from here
    // on: no daemon descriptor may leak into the sandbox.
    // SAFETY: close_range only changes descriptor flags.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    if rc < 0 {
        return Err(InitError::new("prepare descriptors", std::io::Error::last_os_error().to_string()));
    }
    let mut argv = vec![cstring("agentd")?, cstring("supervisor")?];
    match (&spec.payload, &handover.service) {
        (Payload::Supervisor { .. }, Some((_, listener))) => {
            let listen_fd = listener.as_raw_fd();
            // SAFETY: fcntl only changes the descriptor's flags.
            if unsafe { libc::fcntl(listen_fd, libc::F_SETFD, 0) } < 0 {
                return Err(InitError::new("prepare descriptors", std::io::Error::last_os_error().to_string()));
            }
            argv.extend([cstring("--listen-fd")?, cstring(listen_fd.to_string())?]);
        }
        (Payload::Command { argv: command, env, cwd }, _) => {
            argv.extend([cstring("--run")?, cstring("--cwd")?, cstring(cwd.as_os_str().as_bytes())?]);
            for (k, v) in env {
                argv.extend([cstring("--env")?, cstring(format!("{k}={v}"))?]);
            }
            argv.push(cstring("--")?);
            for a in command {
                argv.push(cstring(a.as_str())?);
            }
        }
        (Payload::Supervisor { .. }, None) => unreachable!("a supervisor payload always has its socket"),
    }
    let env = [cstring(format!("RUST_LOG={}", spec.supervisor_log_filter))?, cstring("PATH=/usr/local/bin:/usr/bin:/bin")?];
    let Err(e) = nix::unistd::fexecve(&handover.exe, &argv, &env);
    Err(InitError::new("exec supervisor", e.to_string()))
}
