//! `agentd sandbox-init`: the single-threaded path that makes a sandbox.
//!
//! It runs as a fresh process (the node re-executes its own binary), reads a
//! [`SandboxSpec`] as JSON on stdin and writes one [`InitReport`] line on stdout.
//!
//! 1. Bind the supervisor's unix socket and open its log on the host, and
//!    compile the agents' hardening (seccomp), before any namespace exists.
//! 2. `unshare(CLONE_NEWNS)` and prepare the new root ([`super::rootfs`]) as
//!    host root (P).
//! 3. One `clone` makes C, PID 1 of a new pid namespace, in a new user
//!    namespace and new mount, uts, ipc and net namespaces owned by it
//!    ([`super::nsfork`]: a fork as glibc's, so glibc's view of C stays
//!    right for threads, signals and the rest). P (host root) moves C into
//!    the sandbox's cgroups and writes its uid and gid maps; C becomes root
//!    and `unshare`s its cgroup namespace (rooted at the cgroups it is in),
//!    while P raises C's loopback from outside.
//!    Where the kernel cannot tell glibc's thread id address, P `fork`s P1
//!    instead, which joins the cgroups, makes the user namespace, then the
//!    others, and `fork`s C (two forks; C comes back to P, a subreaper).
//! 4. C mounts `/proc` and `/dev/pts`, masks `/proc`, `pivot_root`s, waits
//!    for its loopback (the two-fork path raises it here), closes every
//!    descriptor but stdio and the listener, makes
//!    itself non-dumpable and runs the supervisor (or run mode) in place: no
//!    exec, so no second load of the agentd binary.
//!
//! Errors in C (and P1) travel back on a pipe: end of file with no data means
//! C got through setup (it closes its end just before running the payload).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{Gid, Pid, Uid, chdir, pivot_root, setgroups, sethostname, setresgid, setresuid};
use serde::{Deserialize, Serialize};

use agentd_harden::Hardening;
use crate::rootfs;
use crate::spec::{Network, Payload, SandboxSpec};

/// What `sandbox-init` prints: the sandbox's PID 1 as a host pid, or why not.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitReport {
    Ready {
        pid: i32,
        /// How long each step of the creation took ([`steps`]).
        #[serde(default)]
        steps: Vec<Step>,
    },
    Failed { stage: String, message: String },
    /// A zygote's worker waits in the cgroups it was given
    /// ([`super::zygote::Request::Park`]).
    Parked { pid: i32 },
}

/// One step of a creation and its duration in microseconds, for the node's
/// debug log: a slow create shows which step it spent its time in.
pub type Step = (String, u32);

/// The steps of the creation under way in this (single-threaded) process.
static STEPS: std::sync::Mutex<Vec<(&'static str, std::time::Instant)>> = std::sync::Mutex::new(Vec::new());

fn step(name: &'static str) {
    if let Ok(mut steps) = STEPS.lock() {
        steps.push((name, std::time::Instant::now()));
    }
}

/// The steps of the last creation of this process, each with the time since
/// the one before (the first since the creation began).
pub fn steps() -> Vec<Step> {
    let Ok(steps) = STEPS.lock() else { return Vec::new() };
    steps.windows(2).map(|w| (w[1].0.to_string(), w[1].1.duration_since(w[0].1).as_micros().min(u32::MAX as u128) as u32)).collect()
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
pub fn main(pid1: Pid1) -> ! {
    let report = match read_spec().and_then(|spec| create(&spec, pid1)) {
        Ok(pid) => InitReport::Ready { pid: pid.as_raw(), steps: steps() },
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

/// Everything the sandbox's PID 1 needs, opened or built by the creating
/// process while it is still host root in the host's namespaces.
struct Handover<'a> {
    /// The supervisor's log and listening socket; absent in run mode, where
    /// the command keeps the caller's stdio.
    service: Option<(File, UnixListener)>,
    /// Agent hardening (the seccomp filter compiled once, here), inherited by
    /// PID 1 through fork.
    hardening: Hardening,
    /// What PID 1 runs once the sandbox is built.
    pid1: Pid1,
    /// Gives an egress sandbox its route out ([`create_attached`]), before
    /// PID 1 runs its payload.
    attach: Option<&'a AttachNetwork<'a>>,
}

/// Connects the network namespace of the sandbox whose PID 1 is `pid` (a
/// host pid) to whatever enforces its egress policy; `Err` fails the create.
pub type AttachNetwork<'a> = dyn Fn(Pid) -> Result<(), String> + 'a;

/// What PID 1 runs once its sandbox is built: the supervisor, or one
/// command. Given by the binary that links them (the `agentd` binary links
/// `agentd-supervisor`), so that this crate, which the node links too,
/// carries neither.
#[derive(Clone, Copy)]
pub struct Pid1 {
    /// Serves the supervisor on the listening socket `listen_fd` until told
    /// to stop, hardening each agent it starts.
    pub supervisor: fn(listen_fd: i32, hardening: Hardening) -> std::io::Result<()>,
    /// Runs one command with stdio attached (`agentd sandbox run`); its exit
    /// code, or 128 + signal.
    pub command: RunCommand,
}

/// Runs `argv` with `env` in `cwd`, hardened; see [`Pid1::command`].
pub type RunCommand = fn(argv: &[String], env: &[(String, String)], cwd: &std::path::Path, hardening: Hardening) -> i32;

/// Builds the sandbox and returns its PID 1 as a host pid, in the creating
/// process. PID 1 itself never returns from this call: it runs the payload
/// (the supervisor, or run mode) and exits.
///
/// The calling process must be single-threaded. It becomes a child subreaper
/// (PID 1 is its grandchild and comes back to it) and is left in a private
/// mount namespace, so it should exit (sandbox-init) or only wait
/// (`agentd sandbox run`) afterwards. It never joins the sandbox's cgroups.
pub fn create(spec: &SandboxSpec, pid1: Pid1) -> Result<Pid, InitError> {
    let hardening = Hardening::default_for_agents().map_err(|e| InitError::new("hardening", e.to_string()))?;
    create_with(spec, hardening, pid1)
}

/// As [`create`], with the agents' hardening already built (by a zygote,
/// once for every sandbox it makes).
pub fn create_with(spec: &SandboxSpec, hardening: Hardening, pid1: Pid1) -> Result<Pid, InitError> {
    create_attached(spec, hardening, pid1, None)
}

/// As [`create_with`]; for an egress sandbox, `attach` runs once PID 1's
/// network namespace exists (its loopback up) and before PID 1 goes on to
/// its payload, which therefore never runs without its route out. The
/// node attaches its sandboxes itself after the create instead (no agent
/// runs before it answers); `agentd sandbox run` runs its command at once,
/// so it attaches here.
pub fn create_attached(spec: &SandboxSpec, hardening: Hardening, pid1: Pid1, attach: Option<&AttachNetwork<'_>>) -> Result<Pid, InitError> {
    if let Ok(mut steps) = STEPS.lock() {
        steps.clear();
        steps.push(("start", std::time::Instant::now()));
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(InitError::new("subreaper", std::io::Error::last_os_error().to_string()));
    }
    let service = match &spec.payload {
        Payload::Supervisor { socket_path, log_path } => {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(log_path)
                .map_err(fail_io("open supervisor log"))?;
            let _ = std::fs::remove_file(socket_path);
            let listener = UnixListener::bind(socket_path).map_err(fail_io("bind supervisor socket"))?;
            Some((log, listener))
        }
        Payload::Command { .. } => None,
    };
    let handover = Handover { service, hardening, pid1, attach };

    let result = build(spec, &handover);
    if result.is_err()
        && let Payload::Supervisor { socket_path, .. } = &spec.payload
    {
        let _ = std::fs::remove_file(socket_path);
    }
    result
}

/// Stages where a test may make setup fail (`SandboxSpec::inject_failure`).
pub const FAULT_STAGES: &[&str] = &["join-cgroup", "mount", "clone", "id-map", "pivot-root"];

/// Fails at `stage` if a test asked for it; only in builds with the
/// `faults` feature (test builds), never in a release.
#[cfg(not(feature = "faults"))]
pub(crate) fn injected(_spec: &SandboxSpec, _stage: &'static str) -> Result<(), InitError> {
    Ok(())
}

#[cfg(feature = "faults")]
pub(crate) fn injected(spec: &SandboxSpec, stage: &'static str) -> Result<(), InitError> {
    match spec.inject_failure.as_deref() {
        Some(s) if s == stage => Err(InitError::new(stage, "injected failure")),
        _ => Ok(()),
    }
}

/// Whether `dir` is on a cgroup v2 file system.
fn is_cgroup2(dir: &std::path::Path) -> bool {
    nix::sys::statfs::statfs(dir).is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Moves `pid` (a process of ours, or ourselves) into the sandbox's cgroups.
fn join_cgroups(spec: &SandboxSpec, pid: Pid) -> Result<(), InitError> {
    join_cgroups_but(spec, pid, None)
}

/// As [`join_cgroups`], but for the `skip`th cgroup, which `pid` is in.
fn join_cgroups_but(spec: &SandboxSpec, pid: Pid, skip: Option<usize>) -> Result<(), InitError> {
    let pid = pid.to_string();
    for (_, procs) in spec.cgroup_procs.iter().enumerate().filter(|(i, _)| Some(*i) != skip) {
        std::fs::write(procs, &pid).map_err(|e| InitError::new("join cgroup", format!("{}: {e}", procs.display())))?;
    }
    Ok(())
}

/// Kills and reaps a child of ours.
fn kill_and_reap(pid: Pid) {
    let _ = kill(pid, Signal::SIGKILL);
    let _ = waitpid(pid, None);
}

/// Reads the error a child wrote on the error pipe (end of file with no data
/// means none).
fn read_error(err_rx: OwnedFd) -> Result<(), InitError> {
    let mut message = String::new();
    File::from(err_rx).read_to_string(&mut message).map_err(|e| InitError::new("read child status", e.to_string()))?;
    if message.is_empty() {
        return Ok(());
    }
    let (stage, msg) = message.split_once('\0').unwrap_or(("child", message.as_str()));
    Err(InitError { stage: leak_stage(stage), message: msg.to_string() })
}

/// The creating process (P): host root, in a private mount namespace where it
/// prepares the root; then makes C, PID 1 of the sandbox, in its namespaces.
fn build(spec: &SandboxSpec, handover: &Handover) -> Result<Pid, InitError> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).map_err(fail("unshare mount namespace"))?;
    // Nothing mounted from here on may propagate back to the host.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(fail("make mounts private"))?;
    step("mount namespace");
    rootfs::prepare(spec)?;
    step("root filesystem");
    // The sandbox resolves paths as an unprivileged host uid and may not
    // traverse the (0700) state directory: it inherits the root's parent as
    // working directory instead and only uses paths relative to it.
    let parent = spec.rootfs_dir.parent().ok_or_else(|| InitError::new("chdir", "rootfs_dir has no parent"))?;
    chdir(parent).map_err(fail("chdir to sandbox dir"))?;

    let addrs = match std::env::var_os(TWO_FORKS_ENV) {
        Some(_) => None,
        None => crate::nsfork::ThreadAddrs::current(),
    };
    match addrs {
        Some(addrs) => clone_pid1(spec, handover, addrs),
        None => fork_twice(spec, handover),
    }
}

/// Set (to anything) in the environment of `sandbox run` or a one-shot
/// `sandbox-init`, takes the two-fork path of hosts whose kernel cannot tell
/// glibc's thread id address, so that tests keep it working.
pub const TWO_FORKS_ENV: &str = "AGENTD_SANDBOX_TWO_FORKS";

/// The namespaces PID 1 lives in, but the cgroup one: that one takes the
/// cgroup of the process that makes it as its root, so PID 1 makes it once
/// it is in the sandbox's cgroups.
fn namespace_flags(spec: &SandboxSpec) -> CloneFlags {
    let mut flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWIPC;
    if spec.network.isolated() {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    flags
}

/// One clone makes C, PID 1, in a new user namespace and the namespaces it
/// owns (as bubblewrap does); P moves it into the sandbox's cgroups and writes
/// its id maps, then releases it. C becomes root, makes its cgroup namespace
/// and goes on in [`enter`]. Meanwhile P raises C's loopback (host root may
/// enter the network namespace of a user namespace it made), which takes a
/// few hundred microseconds that C spends on its mounts, then tells C so.
fn clone_pid1(spec: &SandboxSpec, handover: &Handover, addrs: crate::nsfork::ThreadAddrs) -> Result<Pid, InitError> {
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    // P -> C: one byte once C is in its cgroups and its id maps are written,
    // a second once its network is ready.
    let (go_rx, go_tx) = nix::unistd::pipe2(cloexec).map_err(fail("pipe"))?;
    // C -> P: "stage\0message" on failure; end of file once C is set up.
    let (err_rx, err_tx) = nix::unistd::pipe2(cloexec).map_err(fail("pipe"))?;
    // C starts in the sandbox's cgroup v2 directory if it has one; only
    // the v1 ones (or all, on kernels without clone3) take a move.
    let v2 = spec.cgroup_procs.iter().enumerate().find_map(|(i, procs)| procs.parent().filter(|dir| is_cgroup2(dir)).map(|dir| (i, dir)));
    let v2_dir = v2.map(|(i, _)| i);
    let v2_fd = v2
        .map(|(_, dir)| {
            nix::fcntl::open(dir, nix::fcntl::OFlag::O_DIRECTORY | cloexec, nix::sys::stat::Mode::empty())
                .map_err(|e| InitError::new("join cgroup", format!("{}: {e}", dir.display())))
        })
        .transpose()?;
    injected(spec, "clone")?;
    let flags = CloneFlags::CLONE_NEWUSER | namespace_flags(spec);
    // SAFETY: this process is single-threaded (sandbox-init, a zygote's
    // worker and sandbox run start no threads), and `addrs` is this thread's.
    let (forked, in_v2) = unsafe { crate::nsfork::fork_into(flags, v2_fd.as_ref().map(|fd| fd.as_fd()), addrs) }.map_err(fail_io("clone"))?;
    let pid = match forked {
        nix::unistd::ForkResult::Child => {
            drop(go_tx);
            drop(err_rx);
            // Never unwind into the creator's frames from a forked copy.
            let e = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pid1(spec, handover, go_rx))) {
                Ok(Ok(never)) => match never {},
                Ok(Err(e)) => e,
                Err(_) => InitError::new("sandbox init", "panic"),
            };
            report_and_exit(err_tx, e)
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    step("clone");
    drop(go_rx);
    drop(err_tx);
    drop(v2_fd);
    let skip = if in_v2 { v2_dir } else { None };
    let mut go = File::from(go_tx);
    let released = join_cgroups_but(spec, pid, skip)
        .inspect(|_| step("move to cgroups"))
        .and_then(|()| injected(spec, "join-cgroup"))
        .and_then(|()| write_id_maps(pid, spec))
        .and_then(|()| injected(spec, "id-map"))
        .and_then(|()| go.write_all(b"1").map_err(fail_io("release child")))
        .inspect(|_| step("id maps"))
        .and_then(|()| match spec.network {
            Network::Host => Ok(()),
            Network::None | Network::Egress(_) => loopback_up_in(pid).map_err(fail_io("bring up loopback")),
        })
        .and_then(|()| attach_network(spec, handover, pid))
        .and_then(|()| go.write_all(b"1").map_err(fail_io("release child")));
    step("network");
    // C, waiting on the go pipe after a failure of ours, sees it close and
    // exits. Once released, C may fail on its own (and close its end, or
    // take its network namespace with it): its reason, if it gave one, says
    // more than ours.
    let go = if released.is_ok() {
        Some(go)
    } else {
        drop(go);
        None
    };
    let failed = match (released, read_error(err_rx)) {
        (_, Err(theirs)) => Some(theirs),
        (Err(ours), Ok(())) => Some(ours),
        (Ok(()), Ok(())) => None,
    };
    if let Some(e) = failed {
        drop(go);
        kill_and_reap(pid);
        return Err(e);
    }
    if let (Payload::Command { .. }, Some(go)) = (&spec.payload, go) {
        // Open until this process exits: PID 1's proof, once it has armed
        // its parent-death signal, that its creator was still there.
        std::mem::forget(go);
    }
    step("pid 1 setup");
    Ok(pid)
}

/// C, made by [`clone_pid1`]: waits to be released, becomes root of its user
/// namespace and makes its cgroup namespace, rooted at the sandbox's cgroups.
fn pid1(spec: &SandboxSpec, handover: &Handover, go_rx: OwnedFd) -> Result<std::convert::Infallible, InitError> {
    wait_for_creator(&go_rx);
    if !crate::nsfork::tid_is_right() {
        return Err(InitError::new("clone", "glibc's thread id in PID 1 is not PID 1's"));
    }
    become_root()?;
    if let Payload::Command { .. } = spec.payload {
        // A `sandbox run` sandbox lives no longer than the process that
        // waits for it (and holds its id range): were that killed, PID 1
        // takes the whole sandbox with it. Armed after the change of
        // credentials, which disarms it; [`enter`] then checks the creator
        // was still there. (A supervisor outlives its creator, a zygote's
        // worker, by design.)
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
            return Err(InitError::new("clone", std::io::Error::last_os_error().to_string()));
        }
    }
    nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP).map_err(fail("clone"))?;
    enter(spec, handover, Some(go_rx), None)
}

/// Reads the creator's next go-ahead byte; exits if it failed (it kills us)
/// or died before sending it.
fn wait_for_creator(go_rx: &OwnedFd) {
    let mut go = [0u8; 1];
    if !matches!(nix::unistd::read(go_rx, &mut go), Ok(1)) {
        // SAFETY: _exit skips destructors that belong to the creator.
        unsafe { libc::_exit(1) }
    }
}

/// Exits unless the creator still holds its end of the go pipe (it does
/// until it exits, in run mode): a creator that died before PID 1 armed its
/// parent-death signal would otherwise leave the sandbox running.
fn creator_lives(go_rx: &OwnedFd) {
    let nonblocking = nix::fcntl::OFlag::O_NONBLOCK;
    let mut byte = [0u8; 1];
    let ended = nix::fcntl::fcntl(go_rx, nix::fcntl::FcntlArg::F_SETFL(nonblocking)).is_err()
        || !matches!(nix::unistd::read(go_rx, &mut byte), Err(nix::errno::Errno::EAGAIN));
    if ended {
        // SAFETY: _exit skips destructors that belong to the creator.
        unsafe { libc::_exit(1) }
    }
}

/// Runs the caller's [`AttachNetwork`] for an egress sandbox.
fn attach_network(spec: &SandboxSpec, handover: &Handover, pid: Pid) -> Result<(), InitError> {
    match (&spec.network, handover.attach) {
        (Network::Egress(_), Some(attach)) => {
            let attached = attach(pid).map_err(|e| InitError::new("attach network", e));
            step("attach network");
            attached
        }
        _ => Ok(()),
    }
}

/// Raises the loopback of `pid`'s network namespace from this process (host
/// root, in the host's), coming back to its own.
fn loopback_up_in(pid: Pid) -> std::io::Result<()> {
    let own = File::open("/proc/self/ns/net")?;
    let theirs = File::open(format!("/proc/{pid}/ns/net"))?;
    nix::sched::setns(theirs.as_fd(), CloneFlags::CLONE_NEWNET)?;
    let raised = loopback_up();
    nix::sched::setns(own.as_fd(), CloneFlags::CLONE_NEWNET)?;
    raised
}

/// Root of the user namespace we are in, whose maps are written.
fn become_root() -> Result<(), InitError> {
    // Without these, creating files fails with EOVERFLOW: our ids are unmapped
    // until we switch to the mapped root.
    setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).map_err(fail("setresgid"))?;
    setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).map_err(fail("setresuid"))?;
    setgroups(&[]).map_err(fail("setgroups"))
}

/// Where the kernel cannot tell glibc's thread id address ([`super::nsfork`]):
/// `fork` P1, which joins the cgroups, makes the user namespace (P writes its
/// maps), then the other namespaces, and `fork`s C.
fn fork_twice(spec: &SandboxSpec, handover: &Handover) -> Result<Pid, InitError> {
    let cloexec = nix::fcntl::OFlag::O_CLOEXEC;
    // P1 -> P: one byte once the user namespace exists, then C's host pid.
    let (up_rx, up_tx) = nix::unistd::pipe2(cloexec).map_err(fail("pipe"))?;
    // P -> P1: one byte once the id maps are written.
    let (go_rx, go_tx) = nix::unistd::pipe2(cloexec).map_err(fail("pipe"))?;
    // P1, C -> P: "stage\0message" on failure; end of file once C is set up.
    let (err_rx, err_tx) = nix::unistd::pipe2(cloexec).map_err(fail("pipe"))?;
    // P -> C: one byte once an egress sandbox's network is attached.
    let attached = match (&spec.network, handover.attach) {
        (Network::Egress(_), Some(_)) => Some(nix::unistd::pipe2(cloexec).map_err(fail("pipe"))?),
        _ => None,
    };
    let (attached_rx, attached_tx) = attached.map_or((None, None), |(rx, tx)| (Some(rx), Some(tx)));

    // SAFETY: this process is single-threaded (sandbox-init and sandbox run
    // start no threads), so the child may run arbitrary code.
    let p1 = match unsafe { nix::unistd::fork() }.map_err(fail("fork"))? {
        nix::unistd::ForkResult::Child => {
            drop(up_rx);
            drop(go_tx);
            drop(err_rx);
            drop(attached_tx);
            // Never unwind into the creator's frames from a forked copy.
            let e = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| namespaces(spec, handover, up_tx, go_rx, &err_tx, attached_rx))) {
                Ok(Ok(never)) => match never {},
                Ok(Err(e)) => e,
                Err(_) => InitError::new("clone", "panic"),
            };
            report_and_exit(err_tx, e)
        }
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(up_tx);
    drop(go_rx);
    drop(err_tx);
    drop(attached_rx);
    let mut up = File::from(up_rx);
    // P1 has failed and is on its way out (it closes its pipe end before
    // writing its error): reap it, then read why.
    let fail_p1 = |err_rx: OwnedFd, fallback: InitError| {
        let _ = waitpid(p1, None);
        read_error(err_rx).err().unwrap_or(fallback)
    };

    let mut byte = [0u8; 1];
    if !matches!(up.read(&mut byte), Ok(1)) {
        return Err(fail_p1(err_rx, InitError::new("clone", "user namespace not created")));
    }
    if let Err(e) = write_id_maps(p1, spec).and_then(|()| injected(spec, "id-map")) {
        kill_and_reap(p1);
        return Err(e);
    }
    if let Err(e) = File::from(go_tx).write_all(b"1") {
        return Err(fail_p1(err_rx, InitError::new("release child", e.to_string())));
    }
    let mut pid = [0u8; 4];
    if up.read_exact(&mut pid).is_err() {
        return Err(fail_p1(err_rx, InitError::new("clone", "sandbox PID 1 not created")));
    }
    let pid = Pid::from_raw(i32::from_ne_bytes(pid));
    // P1 exits right after forking C: once reaped, C is our child.
    let _ = waitpid(p1, None);
    if let Some(tx) = attached_tx {
        // C waits for this byte before its payload; on a failure here it
        // sees the pipe close and exits (and is killed anyway).
        let released = attach_network(spec, handover, pid).and_then(|()| File::from(tx).write_all(b"1").map_err(fail_io("release child")));
        if let Err(e) = released {
            kill_and_reap(pid);
            return Err(e);
        }
    }
    if let Err(e) = read_error(err_rx) {
        kill_and_reap(pid);
        return Err(e);
    }
    Ok(pid)
}

fn report_and_exit(err_tx: OwnedFd, e: InitError) -> ! {
    let mut pipe = File::from(err_tx);
    let _ = write!(pipe, "{}\0{}", e.stage, e.message);
    // SAFETY: _exit skips destructors and atexit handlers that belong to the parent.
    unsafe { libc::_exit(1) }
}

/// Stage names come back from the child as text; they are few and this process
/// exits or only waits afterwards, so leaking one is harmless.
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

/// P1: joins the sandbox's cgroups (so the cgroup namespace is rooted there),
/// makes the user namespace, waits for its id maps, becomes its root, makes
/// the other namespaces (owned by the new user namespace) and forks C.
fn namespaces(
    spec: &SandboxSpec,
    handover: &Handover,
    up_tx: OwnedFd,
    go_rx: OwnedFd,
    err_tx: &OwnedFd,
    attached_rx: Option<OwnedFd>,
) -> Result<std::convert::Infallible, InitError> {
    join_cgroups(spec, nix::unistd::getpid())?;
    injected(spec, "join-cgroup")?;
    injected(spec, "clone")?;
    nix::sched::unshare(CloneFlags::CLONE_NEWUSER).map_err(fail("clone"))?;
    let mut up = File::from(up_tx);
    up.write_all(b"1").map_err(fail_io("signal parent"))?;
    let mut go = [0u8; 1];
    if !matches!(File::from(go_rx).read(&mut go), Ok(1)) {
        // The parent died or failed before releasing us.
        unsafe { libc::_exit(1) }
    }
    become_root()?;
    nix::sched::unshare(namespace_flags(spec) | CloneFlags::CLONE_NEWCGROUP).map_err(fail("clone"))?;
    // SAFETY: single-threaded (a fork child of a single-threaded process).
    match unsafe { nix::unistd::fork() }.map_err(fail("clone"))? {
        nix::unistd::ForkResult::Child => {
            drop(up);
            let e = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| enter(spec, handover, None, attached_rx))) {
                Ok(Ok(never)) => match never {},
                Ok(Err(e)) => e,
                // After setup the error pipe is closed and nobody reads this.
                Err(_) => InitError::new("sandbox init", "panic"),
            };
            // SAFETY: the descriptor is ours; this process exits right after.
            let err_tx = unsafe { OwnedFd::from_raw_fd(err_tx.as_raw_fd()) };
            report_and_exit(err_tx, e)
        }
        nix::unistd::ForkResult::Parent { child } => {
            let _ = up.write_all(&child.as_raw().to_ne_bytes());
            // SAFETY: nothing of the parent's needs to run here.
            unsafe { libc::_exit(0) }
        }
    }
}

/// C, the sandbox's PID 1: finishes the root, pivots into it, drops what the
/// creator held and runs the payload. Returns only on a setup failure.
/// `network_from_creator`: the pipe on which the creator says it raised our
/// loopback (and attached an egress network); without it (the two-fork
/// path) we raise it ourselves, and wait on `attached` for an egress
/// network the creator attaches.
fn enter(
    spec: &SandboxSpec,
    handover: &Handover,
    network_from_creator: Option<OwnedFd>,
    attached: Option<OwnedFd>,
) -> Result<std::convert::Infallible, InitError> {
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

    match network_from_creator {
        Some(go_rx) => {
            wait_for_creator(&go_rx);
            if let Payload::Command { .. } = spec.payload {
                creator_lives(&go_rx);
            }
        }
        None if spec.network.isolated() => loopback_up().map_err(fail_io("bring up loopback"))?,
        None => {}
    }
    if let Some(attached) = attached {
        wait_for_creator(&attached);
    }
    if let Some((log, _)) = &handover.service {
        redirect_stdio(log).map_err(fail_io("redirect stdio"))?;
    }
    run_payload(spec, handover)
}

/// /proc paths that leak host information or expose kernel knobs, hidden as
/// runc hides them: files under /dev/null, directories under an empty
/// read-only tmpfs. `interrupts` as Docker 28 masks it: its per-CPU thermal
/// event counts are a side channel on what other tenants compute
/// (GHSA-6fw5-f8r9-fgfm), and no agent needs the host's interrupt table.
/// Each with whether it is a directory, as it is on the kernels we know (a
/// mount that finds the other kind is tried again as that kind), which saves
/// a stat per path; a path this kernel does not have is skipped.
const MASKED_PROC: &[(&str, bool)] = &[
    ("proc/asound", true),
    ("proc/acpi", true),
    ("proc/interrupts", false),
    ("proc/kcore", false),
    ("proc/keys", false),
    ("proc/latency_stats", false),
    ("proc/timer_list", false),
    ("proc/timer_stats", false),
    ("proc/sched_debug", false),
    ("proc/scsi", true),
];

/// /proc paths left visible but read-only, as runc leaves them.
const READONLY_PROC: &[&str] = &["proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger"];

/// Runs inside the new namespaces, relative to the new root (our cwd).
fn mask_proc() -> Result<(), String> {
    let locked = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let mask = |path: &str, dir: bool| {
        if dir {
            mount(Some("tmpfs"), path, Some("tmpfs"), locked | MsFlags::MS_RDONLY, Some("size=0,mode=0555"))
        } else {
            mount(Some("dev/null"), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        }
    };
    for &(path, dir) in MASKED_PROC {
        match mask(path, dir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            Err(nix::errno::Errno::ENOTDIR) => mask(path, !dir).map_err(|e| format!("{path}: {e}"))?,
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    for path in READONLY_PROC {
        match mount(Some(*path), *path, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>) {
            Ok(()) => {}
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => return Err(format!("{path}: {e}")),
        }
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

/// The sandbox PID 1's name (`/proc/<pid>/comm`), by which a restarted node
/// recognises it among live processes.
pub const PID1_NAME: &std::ffi::CStr = c"agentd-sandbox";

/// What exec used to clean, done by hand: no descriptor of the creator's but
/// stdio (and the supervisor's listener) stays open, PID 1 is not dumpable
/// (the sandbox may not read its memory, environment or descriptors), and the
/// environment holds only `PATH`.
fn scrub(keep: Option<i32>) -> Result<(), InitError> {
    let close = |from: u32, to: u32| {
        if from > to {
            return Ok(());
        }
        // SAFETY: closes descriptors this process never uses again: PID 1
        // never returns to the frames that own them, it exits.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, from, to, 0u32) };
        if rc < 0 { Err(InitError::new("prepare descriptors", std::io::Error::last_os_error().to_string())) } else { Ok(()) }
    };
    match keep {
        Some(fd) => {
            close(3, (fd as u32).saturating_sub(1))?;
            close(fd as u32 + 1, u32::MAX)?;
        }
        None => close(3, u32::MAX)?,
    }
    // SAFETY: prctl with integer arguments only; the name is NUL-terminated.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0
        || unsafe { libc::prctl(libc::PR_SET_NAME, PID1_NAME.as_ptr(), 0, 0, 0) } != 0
    {
        return Err(InitError::new("prepare process", std::io::Error::last_os_error().to_string()));
    }
    // One call rather than a removal per variable (which took ~70 µs of a
    // `sandbox run` for a shell's 40 variables, copying pages on write).
    // SAFETY: single-threaded (no thread has been started in this process),
    // and nothing holds a pointer into the old environment.
    if unsafe { libc::clearenv() } != 0 {
        return Err(InitError::new("prepare process", "clearenv failed"));
    }
    // SAFETY: as above.
    unsafe { std::env::set_var("PATH", "/usr/local/bin:/usr/bin:/bin") };
    Ok(())
}

fn run_payload(spec: &SandboxSpec, handover: &Handover) -> Result<std::convert::Infallible, InitError> {
    let listen_fd = handover.service.as_ref().map(|(_, l)| l.as_raw_fd());
    if let Payload::Supervisor { .. } = spec.payload {
        // A session of its own: PID 1 keeps the creator's session and
        // process group otherwise (the daemon's), so a terminal's Ctrl-C or
        // hang-up meant for the daemon would stop every sandbox with it.
        // Sandboxes outlive the daemon (live restore); only the node stops
        // them. (Run mode keeps its caller's terminal and job control.)
        nix::unistd::setsid().map_err(fail("setsid"))?;
    }
    // The last fallible step: closing the error pipe (with the rest) tells
    // the creator that setup succeeded.
    scrub(listen_fd)?;
    // Run mode reports on the caller's stderr itself; only the supervisor
    // logs (to its log file).
    if let Payload::Supervisor { .. } = spec.payload {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(&spec.supervisor_log_filter))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    }
    let hardening = handover.hardening.clone();
    let pid1 = handover.pid1;
    // Past this point a panic must end PID 1, never unwind into the
    // creator's frames (the error pipe is gone).
    let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || match (&spec.payload, listen_fd) {
        (Payload::Supervisor { .. }, Some(fd)) => match (pid1.supervisor)(fd, hardening) {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "supervisor failed");
                1
            }
        },
        (Payload::Command { argv, env, cwd }, _) => (pid1.command)(argv, env, cwd, hardening),
        (Payload::Supervisor { .. }, None) => unreachable!("a supervisor payload always has its socket"),
    })).unwrap_or(101);
    std::process::exit(code)
}
