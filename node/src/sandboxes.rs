//! The node's sandbox table.
//!
//! Each sandbox has a directory `state_dir/sandboxes/<id>/` holding the empty
//! mount point of its root, its workspace, its supervisor's socket and log, its
//! sessions' event logs and state, and `sandbox.json` ([`crate::record`]),
//! the record a restarted node takes the sandbox back by (live restore) or
//! finds what it left behind. PID 1 of each sandbox is re-parented to the
//! node (a subreaper) and watched through a pidfd; one taken back after a
//! restart is no longer the node's child (its new parent reaps it), and is
//! watched and signalled through its pidfd alone.
//!
//! A create checks its plan ([`Sandboxes::check`]) before it makes anything
//! (slot, cgroups, directories); a failure after that undoes what was made.
//! A delete asks the supervisor to stop the agents (SIGTERM, the node's
//! grace, SIGKILL of their groups), bounded, before it kills the whole tree;
//! the slot's host ids are given again only once PID 1 has exited and the
//! cgroups are removed.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_proto::error::status;
use agentd_proto::common::SeccompPolicy;
use agentd_proto::node::{Sandbox as SandboxInfo, SandboxPlan, SandboxUsage, mount, sandbox as sandbox_info};
use agentd_proto::supervisor::ShutdownRequest;
use agentd_proto::supervisor::supervisor_client::SupervisorClient;
use agentd_cgroups::limits::{HostCapacity, Limits};
use agentd_cgroups::sandbox::{SandboxCgroup, Version};
use agentd_cgroups::tree::CgroupTree;
use agentd_builder::init::{FAULT_STAGES, PID1_NAME};
use agentd_builder::spec::{self, DEFAULT_SYSTEM_BINDS};
use agentd_builder::zygote::NO_PARKED_WORKER;
use agentd_builder::{BindMount, IdRange, LaunchError, Launcher, Network, Payload, SandboxSpec};
use agentd_proto::unix as uds;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use agentd_proto::trace::Traced;
use tonic::{Code, Status};

use crate::NodeConfig;
use crate::bundles::BundleCache;
use crate::event_log::now_ms;
use crate::record::{self, Found, Leftover, Record};
use crate::secrets_proxy::{Proxies, SandboxProxies};

/// How long a killed sandbox may take to disappear before teardown gives up
/// waiting (the kernel kills the whole pid namespace with its PID 1).
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// What a supervisor gets on top of the agents' grace to stop them and
/// answer, before the node kills the sandbox anyway: its own wait for a
/// killed group (1 s) and for an agent's last words (0.2 s), with room.
const STOP_MARGIN: Duration = Duration::from_secs(2);

/// Node-side stages where `AGENTD_TEST_FAIL_CREATE` can fail a create:
/// `prepare` once the cgroups and the state directory exist, before
/// sandbox-init runs; `connect` once PID 1 runs, before the node connects to
/// its supervisor. The other stages are sandbox-init's ([`FAULT_STAGES`]).
pub const NODE_FAULT_STAGES: &[&str] = &["prepare", "connect"];

/// Fault tests only (the `faults` feature; never in release builds):
/// `AGENTD_TEST_FAIL_CREATE=<stage>,<stage>,...` makes the
/// node's n-th sandbox build (creates answered from an existing sandbox do
/// not count) fail at the n-th stage listed, a node stage
/// ([`NODE_FAULT_STAGES`]) or one of sandbox-init's ([`FAULT_STAGES`], run in
/// the zygote's worker); an empty entry, or a build past the list, is not
/// failed. Tests check that each failure leaves nothing behind.
#[cfg(not(feature = "faults"))]
fn test_failure() -> Result<Option<String>, Status> {
    Ok(None)
}

#[cfg(feature = "faults")]
fn test_failure() -> Result<Option<String>, Status> {
    static BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let Ok(list) = std::env::var("AGENTD_TEST_FAIL_CREATE") else { return Ok(None) };
    let n = BUILDS.fetch_add(1, Ordering::SeqCst);
    let Some(stage) = list.split(',').nth(n).map(str::trim).filter(|s| !s.is_empty()) else { return Ok(None) };
    if !NODE_FAULT_STAGES.contains(&stage) && !FAULT_STAGES.contains(&stage) {
        let known = [NODE_FAULT_STAGES, FAULT_STAGES].concat().join(", ");
        return Err(internal(format!("AGENTD_TEST_FAIL_CREATE names unknown stage {stage:?} (known: {known})")));
    }
    tracing::warn!(stage, "sandbox create to fail for a fault test (AGENTD_TEST_FAIL_CREATE)");
    Ok(Some(stage.to_string()))
}

fn injected(failure: &Option<String>, stage: &str) -> Result<(), Status> {
    match failure {
        Some(s) if s == stage => Err(status(Code::Internal, "sandbox_failed", format!("sandbox setup failed at {stage}: injected failure"))),
        _ => Ok(()),
    }
}

/// A plan checked against this node before anything is created for it: a
/// `Checked` that exists describes a sandbox this host can build (bundles
/// aside, which are fetched afterwards).
pub struct Checked {
    limits: Limits,
    network: Network,
    rootfs: Option<PathBuf>,
    hostname: String,
    workspace_path: PathBuf,
    /// The plan's binds, sources present on this node.
    mounts: Vec<BindMount>,
    /// The agents' seccomp policy, known to compile here.
    seccomp: Option<SeccompPolicy>,
    /// Secrets the node's proxies serve the sandbox, all held by its store.
    secrets: Vec<agentd_plan::SecretRef>,
}

/// The spare cgroups with their parked worker, and whether the node is
/// stopping (no more spares then: a refill after the zygote's end would
/// start another zygote).
#[derive(Default)]
struct Spare {
    cgroup: Option<SandboxCgroup>,
    closed: bool,
}

pub struct Sandbox {
    pub id: String,
    pub pid: i32,
    pub ids: IdRange,
    pub slot: u32,
    pub dir: PathBuf,
    pub created_at_ms: i64,
    pub supervisor: SupervisorClient<Traced>,
    /// Limits, freeze, whole-tree kill, usage and the OOM counter.
    pub cgroup: SandboxCgroup,
    memory_max: Option<u64>,
    /// Given to the supervisor for each agent it starts; `None`: the default filter.
    pub seccomp: Option<SeccompPolicy>,
    /// Its secrets' endpoints on its loopback; their variables go to every agent.
    pub proxies: SandboxProxies,
    /// OOM kills already reported (see `oom.rs`).
    oom_seen: AtomicU64,
    frozen: AtomicBool,
    exited: watch::Receiver<bool>,
    /// An egress sandbox's gateway (resolver, proxy, link, rules), taken
    /// and dropped by the delete, which removes them.
    egress: Mutex<Option<agentd_egress::Serving>>,
    /// PID 1's pidfd: signals reach it, never a process that reused its pid
    /// (one taken back after a restart is not our child, and its parent may
    /// reap it any time).
    pidfd: Arc<OwnedFd>,
    /// Written again, with `frozen`, on freeze and thaw.
    record: Record,
}

impl Sandbox {
    pub fn is_running(&self) -> bool {
        !*self.exited.borrow()
    }

    /// An egress sandbox's counters; `None` for other modes.
    pub fn egress_usage(&self) -> Option<agentd_proto::node::EgressUsage> {
        let egress = self.egress.lock().unwrap();
        let u = egress.as_ref()?.usage();
        Some(agentd_proto::node::EgressUsage {
            connections_allowed: u.connections_allowed,
            connections_denied: u.connections_denied,
            bytes_out: u.bytes_out,
            bytes_in: u.bytes_in,
            names_allowed: u.names_allowed,
            names_denied: u.names_denied,
            datagrams_denied: u.datagrams_denied,
        })
    }

    pub fn info(&self) -> SandboxInfo {
        let usage = self.cgroup.stats().ok().map(|s| SandboxUsage {
            memory_current: s.memory_current,
            memory_max: s.memory_max,
            cpu_usage_usec: s.cpu_usage_usec,
            pids_current: s.pids_current,
            pids_max: s.pids_max,
            oom_kills: s.oom_kills,
            egress: self.egress_usage(),
        });
        SandboxInfo {
            container_id: self.id.clone(),
            state: if self.is_running() { sandbox_info::State::Running } else { sandbox_info::State::Exited }.into(),
            supervisor_pid: self.pid,
            host_uid_base: self.ids.host_base,
            id_range_size: self.ids.size,
            created_at_ms: self.created_at_ms,
            usage,
            frozen: self.frozen.load(Ordering::Relaxed),
        }
    }

    pub fn memory_max(&self) -> Option<u64> {
        self.memory_max
    }

    /// SIGKILLs PID 1 (its pid namespace goes with it), if it still runs.
    fn kill_pid1(&self) {
        if let Err(e) = pidfd_send_signal(&self.pidfd, libc::SIGKILL)
            && e.raw_os_error() != Some(libc::ESRCH)
        {
            tracing::warn!(id = self.id, error = %e, "cannot signal PID 1");
        }
    }

    /// Writes `sandbox.json` again with the frozen state, so a node that
    /// restarts takes it back hibernated.
    fn persist(&self) {
        let record = Record { frozen: self.is_frozen(), ..self.record.clone() };
        if let Err(e) = record.write(&self.dir) {
            tracing::warn!(id = self.id, error = %e, "cannot write sandbox.json: a restart would take it back as it was");
        }
    }

    /// OOM kills since the last call, if any.
    pub fn note_oom_kills(&self) -> Option<u64> {
        let now = self.cgroup.oom_kills().ok().flatten()?;
        let before = self.oom_seen.swap(now, Ordering::Relaxed);
        (now > before).then_some(now - before)
    }

    /// OOM kills so far, reported or not.
    pub fn oom_kills(&self) -> u64 {
        self.cgroup.oom_kills().ok().flatten().unwrap_or(0)
    }

    pub fn freeze(&self) -> Result<(), Status> {
        self.cgroup.freeze().map_err(|e| internal(format!("freeze: {e}")))?;
        self.frozen.store(true, Ordering::Relaxed);
        self.persist();
        Ok(())
    }

    pub fn thaw(&self) -> Result<(), Status> {
        self.cgroup.thaw().map_err(|e| internal(format!("thaw: {e}")))?;
        self.frozen.store(false, Ordering::Relaxed);
        self.persist();
        Ok(())
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }

    pub fn sessions_dir(&self) -> PathBuf {
        self.dir.join("sessions")
    }
}

/// What [`Sandboxes::build`] made.
struct Built {
    record: Record,
    supervisor: SupervisorClient<Traced>,
    exited: watch::Receiver<bool>,
    pidfd: Arc<OwnedFd>,
    seccomp: Option<SeccompPolicy>,
    egress: Option<agentd_egress::Serving>,
    proxies: SandboxProxies,
}

pub struct Sandboxes {
    config: NodeConfig,
    cgroups: CgroupTree,
    host: HostCapacity,
    /// cgroup removals run after teardown answers; shutdown waits for them.
    removals: tokio::sync::Mutex<tokio::task::JoinSet<()>>,
    table: Mutex<HashMap<String, Arc<Sandbox>>>,
    /// Slots whose host id range no process holds. A deleted sandbox's slot
    /// comes back only once its PID 1 has exited and its cgroups are
    /// removed (so no process of it is left under those ids).
    free_slots: Arc<Mutex<BTreeSet<u32>>>,
    /// Serializes creation per id so that a repeated create is answered with the
    /// first one's sandbox.
    creating: tokio::sync::Mutex<()>,
    /// Runs sandbox-init (a zygote kept for the node's life).
    launcher: Launcher,
    /// On v1 hierarchies: the spare cgroups, with a worker of the zygote
    /// parked in them, that the next sandbox's are renamed from, so that no
    /// process has to be moved into a cgroup while a create waits (a move
    /// may wait ~20 ms for the kernel: the create's p99). Refilled after
    /// each create; `None` meanwhile, on pure v2 hosts, and where parking
    /// failed.
    spare: tokio::sync::Mutex<Spare>,
    /// Agent bundles the plans name, unpacked once and shared read-only.
    bundles: BundleCache,
    /// Egress gateways' denials, by container id; read by `egress::report`.
    denials: tokio::sync::mpsc::UnboundedSender<(String, agentd_egress::Denial)>,
    denials_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<(String, agentd_egress::Denial)>>>,
    /// The secret store and the upstream client of every sandbox's proxies.
    proxies: Proxies,
}

/// Makes the node the parent of every orphan below it, so that sandbox PID 1s
/// (grandchildren through sandbox-init) can be waited for and never linger.
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Container ids name directories: only a safe alphabet is allowed.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor is new and ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_send_signal(pidfd: &OwnedFd, signal: i32) -> std::io::Result<()> {
    // SAFETY: a valid pidfd, no siginfo, no flags.
    if unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Watches `pid` through a new pidfd: resolves when it has exited, and reaps
/// it if it is our child. Returns the pidfd too, for signals.
fn watch_exit(pid: i32) -> std::io::Result<(Arc<OwnedFd>, watch::Receiver<bool>)> {
    let pidfd = Arc::new(pidfd_open(pid)?);
    // SAFETY: the Arc keeps the descriptor open, with its number, for as
    // long as the AsyncFd holds its clone.
    let fd = unsafe { AsyncFd::register_with_interest(Arc::clone(&pidfd), tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let _ = fd.readable().await;
        // ECHILD when we are not its parent: a sandbox taken back after a
        // restart (or a node started without being a subreaper); whoever
        // is its parent reaps it.
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        drop(fd);
        let _ = tx.send(true);
    });
    Ok((pidfd, rx))
}

fn internal(e: impl std::fmt::Display) -> Status {
    status(Code::Internal, "internal", e.to_string())
}

/// What [`Sandboxes::open`] found of an earlier node process's sandboxes.
#[derive(Debug, Default)]
pub struct Opened {
    /// Taken back, running on (live restore).
    pub adopted: Vec<String>,
    /// Gone now, each with why: stopped by this start, or found dead.
    pub lost: Vec<(String, String)>,
}

/// A sandbox of an earlier node that is not taken back: its directory, its
/// id (the directory's name), what its record says if it could be read, and
/// why it goes.
struct Stale {
    dir: PathBuf,
    id: String,
    leftover: Option<Leftover>,
    why: String,
    /// Journaled lost: the control plane may think it alive. Not so for
    /// a create that never finished (its step builds it again).
    report: bool,
}

/// Why a sandbox of a node started without live restore goes.
const STOPPED_AT_START: &str = "the node restarted and its sandbox was stopped";

impl Sandboxes {
    /// Opens the table. With live restore, the sandboxes an earlier node
    /// process left running are taken back ([`Self::adopt`]); the others
    /// (all of them without it) are stopped and cleaned up.
    pub async fn open(config: NodeConfig) -> std::io::Result<(Arc<Self>, Opened)> {
        let root = config.state_dir.join("sandboxes");
        std::fs::create_dir_all(&root)?;
        let free_slots = (0..config.max_sandboxes).collect();
        let self_cgroup = std::fs::read_to_string(config.proc_root.join("self/cgroup"))?;
        let cgroups = CgroupTree::discover(&config.cgroup_root, &self_cgroup, &config.cgroup_subtree).map_err(std::io::Error::other)?;
        let host = HostCapacity::detect(&config.proc_root).map_err(std::io::Error::other)?;
        let launcher = Launcher::new(config.exe.clone());
        let bundles = BundleCache::open(config.state_dir.join("bundles"))?;
        let (denials, denials_rx) = tokio::sync::mpsc::unbounded_channel();
        let proxies = Proxies::new(config.secrets_file.clone(), config.secrets_ca_file.as_deref(), config.proc_root.clone()).map_err(std::io::Error::other)?;
        let this = Arc::new(Self {
            config,
            cgroups,
            host,
            removals: Default::default(),
            table: Mutex::default(),
            free_slots: Arc::new(Mutex::new(free_slots)),
            creating: Default::default(),
            launcher,
            spare: Default::default(),
            bundles,
            denials,
            denials_rx: Mutex::new(Some(denials_rx)),
            proxies,
        });
        // Links and rules of egress slots whose owner died (this node's
        // earlier run among them: its egress sandboxes are not taken back,
        // see `adopt`).
        let egress = tokio::task::spawn_blocking(agentd_egress::link::clean_leftovers).await.unwrap_or(0);
        if egress > 0 {
            tracing::warn!(slots = egress, "removed egress links and rules an earlier process left");
        }
        let mut opened = Opened::default();
        let mut stale = Vec::new();
        for entry in std::fs::read_dir(&root)?.flatten() {
            let dir = entry.path();
            let id = entry.file_name().to_string_lossy().into_owned();
            let found = record::read(&dir);
            if !this.config.live_restore {
                // As before live restore: reported when a record names it.
                let leftover = match found {
                    Found::Record(r) => Some(r.leftover()),
                    Found::Leftover(l, _) => Some(l),
                    Found::Unreadable(_) | Found::Missing => None,
                };
                let report = leftover.is_some();
                stale.push(Stale { dir, id, leftover, why: STOPPED_AT_START.into(), report });
                continue;
            }
            match found {
                Found::Record(r) if r.id == id => match this.adopt(&r, &dir) {
                    Ok(sandbox) => {
                        tracing::info!(id, pid = sandbox.pid, frozen = sandbox.is_frozen(), "sandbox taken back after the node restarted");
                        this.table.lock().unwrap().insert(id.clone(), sandbox);
                        opened.adopted.push(id);
                    }
                    Err(why) => stale.push(Stale { dir, id, leftover: Some(r.leftover()), why, report: true }),
                },
                Found::Record(r) => {
                    let why = format!("its sandbox.json names another sandbox ({:?}): it was stopped", r.id);
                    stale.push(Stale { dir, id, leftover: None, why, report: true });
                }
                Found::Leftover(l, why) => stale.push(Stale { dir, id, leftover: Some(l), why: format!("{why}: it was stopped"), report: true }),
                Found::Unreadable(why) => {
                    tracing::error!(id, why, "a sandbox's state cannot be read after the restart: stopping it");
                    let why = format!("its state could not be read after the node restarted ({why}): it was stopped");
                    stale.push(Stale { dir, id, leftover: None, why, report: true });
                }
                Found::Missing => {
                    let why = "its create had not finished when the node stopped: undone".to_string();
                    stale.push(Stale { dir, id, leftover: None, why, report: false });
                }
            }
        }
        let cleaned = this.clean_leftovers(&stale).await;
        let report = this.cgroups.clean_leftovers_except(&opened.adopted);
        if !report.removed.is_empty() || !report.failed.is_empty() {
            tracing::warn!(removed = ?report.removed, failed = ?report.failed, "cleaned cgroups an earlier node left");
        }
        // Slots taken back or possibly still used are not given out.
        {
            let cfg = &this.config;
            let mut free = this.free_slots.lock().unwrap();
            for sandbox in this.table.lock().unwrap().values() {
                for slot in slots_overlapping(cfg.id_base, cfg.id_range_size, cfg.max_sandboxes, sandbox.ids) {
                    free.remove(&slot);
                }
            }
            for (s, gone) in stale.into_iter().zip(cleaned) {
                // Reported by the id its directory has.
                if s.report && valid_id(&s.id) {
                    tracing::warn!(id = s.id, why = s.why, "sandbox of the earlier node process lost");
                    opened.lost.push((s.id.clone(), s.why));
                }
                // A range some leftover process may still run under is not given
                // to a new sandbox.
                let Some(leftover) = s.leftover else { continue };
                if gone && !report.failed.iter().any(|(id, _)| *id == leftover.id) {
                    continue;
                }
                let held = slots_overlapping(cfg.id_base, cfg.id_range_size, cfg.max_sandboxes, leftover.ids);
                tracing::error!(id = leftover.id, pid = leftover.pid, ?held, "a leftover sandbox may still run: its id range stays reserved");
                for slot in held {
                    free.remove(&slot);
                }
            }
        }
        this.refill_spare().await;
        Ok((this, opened))
    }

    /// Takes back a sandbox an earlier node process left running: its PID 1
    /// (the same process: pid, start time and boot checked), watched by a
    /// new pidfd; its cgroups as recorded; its supervisor over a lazy
    /// channel (a hibernated one cannot answer until thawed). Err: why not,
    /// PID 1 having been killed if it ran.
    fn adopt(&self, r: &Record, dir: &Path) -> Result<Arc<Sandbox>, String> {
        let proc_root = &self.config.proc_root;
        if r.boot_id != record::boot_id(proc_root) {
            return Err("the host restarted since the sandbox was made: it is gone".into());
        }
        let same = || is_sandbox_init(r.pid) && record::start_time(proc_root, r.pid) == Some(r.pid_start);
        if !same() {
            return Err("its PID 1 exited while the node was away".into());
        }
        // Its gateway (resolver, proxy, what it resolved) died with the
        // node process and its slot's rules are removed at start: not
        // taken back half-connected, it is stopped (fail closed).
        if dir.join("resolv.conf").exists() {
            return Err("an egress sandbox's gateway cannot be taken back after a restart: it was stopped".into());
        }
        let (pidfd, exited) = watch_exit(r.pid).map_err(|e| format!("its PID 1 exited while the node was away ({e})"))?;
        // The pidfd names the process checked above unless the pid was
        // reused in between.
        if !same() {
            return Err("its PID 1 exited while the node was away".into());
        }
        let give_up = |why: String| {
            let _ = pidfd_send_signal(&pidfd, libc::SIGKILL);
            why
        };
        if let Some(missing) = r.cgroup.dirs().iter().find(|d| !d.path.is_dir()) {
            return Err(give_up(format!("its cgroup {} is gone: it was stopped", missing.path.display())));
        }
        let seccomp = r.seccomp_policy().map_err(|e| give_up(format!("its sandbox.json is damaged ({e}): it was stopped")))?;
        // Its agents were told these ports: served again on the same ones.
        let (secrets, ports) = record::RecordedSecret::refs(&r.secrets).map_err(|e| give_up(format!("its sandbox.json is damaged ({e}): it was stopped")))?;
        let proxies = self
            .proxies
            .start(r.pid, &secrets, Some(&ports), exited.clone())
            .map_err(|e| give_up(format!("its secrets cannot be served again ({e}): it was stopped")))?;
        let supervisor = SupervisorClient::new(agentd_proto::trace::traced(uds::lazy_channel(&dir.join("supervisor.sock"))));
        // Kills before the restart were reported before it (or not at all):
        // only new ones are.
        let oom_seen = r.cgroup.oom_kills().ok().flatten().unwrap_or(0);
        Ok(Arc::new(Sandbox {
            id: r.id.clone(),
            pid: r.pid,
            ids: r.ids,
            slot: r.slot,
            dir: dir.to_owned(),
            created_at_ms: r.created_at_ms,
            supervisor,
            cgroup: r.cgroup.clone(),
            memory_max: r.memory_max,
            seccomp,
            proxies,
            oom_seen: AtomicU64::new(oom_seen),
            frozen: AtomicBool::new(r.frozen),
            exited,
            pidfd,
            record: r.clone(),
            egress: Mutex::new(None),
        }))
    }

    /// Makes the spare cgroups and parks a worker in them, unless there is
    /// a spare already. Best effort: without one, creates move PID 1 into
    /// its cgroups as before.
    async fn refill_spare(&self) {
        let mut slot = self.spare.lock().await;
        if slot.cgroup.is_some() || slot.closed {
            return;
        }
        let spare = match self.cgroups.spare() {
            Ok(Some(spare)) => spare,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "no spare cgroups");
                return;
            }
        };
        match self.launcher.park(spare.procs_files()).await {
            Ok(pid) => {
                tracing::debug!(pid, "a worker waits in the spare cgroups");
                slot.cgroup = Some(spare);
            }
            Err(e) => {
                tracing::debug!(error = %e, "no worker parked in the spare cgroups");
                let _ = spare.kill();
                let _ = spare.remove();
            }
        }
    }

    /// Kills the sandboxes an earlier node process left that are not taken
    /// back, and removes their directories; returns, for each, whether its
    /// PID 1 is known gone. Their cgroups go afterwards (everything under
    /// the subtree but the sandboxes taken back).
    async fn clean_leftovers(&self, stale: &[Stale]) -> Vec<bool> {
        let mut gone = Vec::new();
        for s in stale {
            let mut dead = true;
            match &s.leftover {
                Some(l) if is_sandbox_init(l.pid) && (l.pid_start == 0 || record::start_time(&self.config.proc_root, l.pid) == Some(l.pid_start)) => {
                    tracing::warn!(id = l.id, pid = l.pid, why = s.why, "killing sandbox left by an earlier node");
                    let _ = kill(Pid::from_raw(l.pid), Signal::SIGKILL);
                    dead = match watch_exit(l.pid) {
                        Ok((_, mut exited)) => tokio::time::timeout(EXIT_WAIT, exited.wait_for(|e| *e)).await.is_ok(),
                        Err(_) => !is_sandbox_init(l.pid),
                    };
                }
                Some(_) => {}
                // No pid to go by: its cgroups hold whatever is left of it.
                None => match self.cgroups.open(&s.id) {
                    Ok(cgroup) if cgroup.dirs().iter().any(|d| d.path.is_dir()) => {
                        tracing::warn!(id = s.id, why = s.why, "killing what is left of a sandbox by its cgroups");
                        if let Err(e) = cgroup.kill() {
                            tracing::warn!(id = s.id, error = %e, "cannot kill a leftover sandbox's cgroups");
                        }
                    }
                    _ => {}
                },
            }
            gone.push(dead);
            if let Err(e) = std::fs::remove_dir_all(&s.dir) {
                tracing::warn!(dir = %s.dir.display(), error = %e, "cannot remove leftover sandbox directory");
            }
        }
        gone
    }

    /// What this node offers sandboxes: the flags' figures, else the host's.
    pub fn capacity(&self) -> agentd_proto::node::NodeCapacity {
        agentd_proto::node::NodeCapacity {
            slots: self.config.max_sandboxes,
            memory_bytes: self.config.capacity_memory.unwrap_or(self.host.memory_bytes),
            cpus: self.config.capacity_cpus.unwrap_or(self.host.cpus),
        }
    }

    /// The content-addressed cache of agent bundles.
    pub fn bundles(&self) -> &BundleCache {
        &self.bundles
    }

    /// The egress gateways' denials; the first caller gets them.
    pub fn take_denials(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<(String, agentd_egress::Denial)>> {
        self.denials_rx.lock().unwrap().take()
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn get(&self, id: &str) -> Result<Arc<Sandbox>, Status> {
        self.table
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NotFound, "container_not_found", format!("no sandbox {id} on this node")))
    }

    pub fn ids(&self) -> Vec<String> {
        self.table.lock().unwrap().keys().cloned().collect()
    }

    pub fn list(&self) -> Vec<Arc<Sandbox>> {
        self.table.lock().unwrap().values().cloned().collect()
    }

    /// Checks everything about `plan` that can be checked without creating
    /// anything: limits against this host, the network mode, the rootfs, the
    /// paths and the mount sources.
    pub fn check(&self, plan: &SandboxPlan) -> Result<Checked, Status> {
        let id = &plan.container_id;
        if !valid_id(id) {
            return Err(status(Code::InvalidArgument, "invalid_request", format!("invalid container id {id:?}")));
        }
        let invalid_profile = |e: String| status(Code::InvalidArgument, "invalid_profile", e);
        let resources = plan.resources.unwrap_or_default();
        let nonzero = |v: u64| (v > 0).then_some(v);
        let limits = Limits::new(
            nonzero(resources.memory_bytes),
            nonzero(resources.pids_max),
            (resources.cpus != 0.0).then_some(resources.cpus),
            &self.host,
        )
        .map_err(|e| invalid_profile(e.to_string()))?;
        let network = agentd_proto::convert::network(plan.network(), plan.egress.as_ref())
            .map_err(|e| status(Code::InvalidArgument, "invalid_network_policy", e))?;
        let seccomp = plan.seccomp.clone();
        if let Some(policy) = &seccomp {
            let policy = agentd_proto::convert::seccomp(policy).map_err(|e| invalid_profile(format!("seccomp policy: {e}")))?;
            agentd_harden::compile_custom(&policy.to_json()).map_err(|e| invalid_profile(format!("seccomp policy: {e}")))?;
        }
        let rootfs = (!plan.rootfs.is_empty()).then(|| PathBuf::from(&plan.rootfs));
        if let Some(rootfs) = &rootfs {
            spec::check_rootfs(rootfs, None).map_err(|e| invalid_profile(e.to_string()))?;
        }
        let hostname = if plan.hostname.is_empty() { "sandbox".to_string() } else { plan.hostname.clone() };
        spec::check_hostname(&hostname).map_err(|e| status(Code::InvalidArgument, "invalid_request", e.to_string()))?;
        let workspace_path = PathBuf::from(if plan.workspace_path.is_empty() { "/workspace" } else { plan.workspace_path.as_str() });
        spec::check_mount_target(&workspace_path).map_err(|e| status(Code::InvalidArgument, "invalid_request", format!("workspace: {e}")))?;
        let mut mounts = Vec::new();
        for m in &plan.mounts {
            spec::check_mount_target(Path::new(&m.target)).map_err(|e| status(Code::InvalidArgument, "invalid_request", e.to_string()))?;
            if !Path::new(&m.source).is_absolute() || std::fs::symlink_metadata(&m.source).is_err() {
                let (code, what) = match m.role() {
                    mount::Role::Agent => ("agent_executable_not_found", "agent executable"),
                    mount::Role::Data => ("mount_source_not_found", "mount source"),
                };
                return Err(status(Code::FailedPrecondition, code, format!("{what} {} does not exist on node", m.source)));
            }
            mounts.push(BindMount { source: m.source.clone().into(), target: m.target.clone().into(), read_only: m.read_only });
        }
        for b in &plan.bundles {
            spec::check_mount_target(Path::new(&b.target))
                .map_err(|e| status(Code::InvalidArgument, "invalid_request", format!("bundle target {:?}: {e}", b.target)))?;
        }
        let secrets = agentd_proto::convert::secrets(&plan.secrets).map_err(|e| invalid_profile(e.to_string()))?;
        if !secrets.is_empty() && network == Network::Host {
            return Err(invalid_profile("secrets need the sandbox's own network namespace, not the host's".into()));
        }
        self.proxies.check(&secrets).map_err(|e| e.status())?;
        Ok(Checked { limits, network, rootfs, hostname, workspace_path, mounts, seccomp, secrets })
    }

    /// Builds the sandbox a plan describes. Creating an id that exists answers
    /// with the existing sandbox. The plan is checked before anything is
    /// made; a failure after that undoes everything made so far.
    pub async fn create(self: &Arc<Self>, plan: SandboxPlan) -> Result<Arc<Sandbox>, Status> {
        let created = self.create_locked(plan).await;
        // Off the path of this answer and of the next create's, as far as
        // creates leave room: the worker's move into the spare is what may
        // wait on the kernel.
        let this = Arc::clone(self);
        tokio::spawn(async move { this.refill_spare().await });
        created
    }

    async fn create_locked(&self, plan: SandboxPlan) -> Result<Arc<Sandbox>, Status> {
        let id = plan.container_id.clone();
        let checked = self.check(&plan)?;
        // Before the creation lock: a slow download must not hold up other sandboxes.
        let bundle_mounts = self.bundle_mounts(&plan).await?;
        let _guard = self.creating.lock().await;
        if let Ok(existing) = self.get(&id) {
            return Ok(existing);
        }
        let failure = test_failure()?;
        let slot = self.free_slots.lock().unwrap().pop_first().ok_or_else(|| {
            status(Code::ResourceExhausted, "node_full", format!("node holds its maximum of {} sandboxes", self.config.max_sandboxes))
        })?;
        let dir = self.config.state_dir.join("sandboxes").join(&id);
        let limits = checked.limits;
        // Held until the spare is renamed: a refill meanwhile would find the
        // spare's directories still there and take them for an old spare.
        let mut spare_slot = self.spare.lock().await;
        let adopted = spare_slot.cgroup.take().and_then(|spare| match self.cgroups.create_from(&spare, &id, &limits) {
            Ok(cg) => Some(cg),
            Err(e) => {
                tracing::warn!(id, error = %e, "cannot rename the spare cgroups; making the sandbox's");
                let _ = spare.kill();
                let _ = spare.remove();
                None
            }
        });
        drop(spare_slot);
        let parked = adopted.is_some();
        let cgroup = match adopted.map_or_else(|| self.cgroups.create(&id, &limits), Ok) {
            Ok(cg) => cg,
            Err(e) => {
                // Nothing was made (a partial create removes its own directories).
                self.free_slots.lock().unwrap().insert(slot);
                return Err(status(Code::Internal, "sandbox_failed", format!("cgroup: {e}")));
            }
        };
        match self.build(&plan, checked, bundle_mounts, slot, &dir, &cgroup, parked, &failure).await {
            Ok(Built { record, supervisor, exited, pidfd, seccomp, egress, proxies }) => {
                let sandbox = Arc::new(Sandbox {
                    id: id.clone(),
                    pid: record.pid,
                    ids: record.ids,
                    slot,
                    dir,
                    created_at_ms: record.created_at_ms,
                    supervisor,
                    cgroup,
                    memory_max: record.memory_max,
                    seccomp,
                    proxies,
                    oom_seen: AtomicU64::new(0),
                    frozen: AtomicBool::new(false),
                    exited,
                    egress: Mutex::new(egress),
                    pidfd,
                    record,
                });
                // Fault tests count these lines: one per sandbox built.
                tracing::info!(id, pid = sandbox.pid, "sandbox created");
                self.table.lock().unwrap().insert(id, Arc::clone(&sandbox));
                Ok(sandbox)
            }
            Err(e) => {
                tracing::warn!(id, error = e.message(), "sandbox create failed; undoing it");
                let _ = cgroup.kill();
                if let Err(e) = std::fs::remove_dir_all(&dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(id, error = %e, "cannot remove the directory of a failed sandbox");
                }
                // PID 1, if there was one, is dead and reaped (sandbox-init or
                // `build` saw to it): once the cgroups are gone too, no
                // process holds the slot's ids.
                match cgroup.remove() {
                    Ok(()) => {
                        self.free_slots.lock().unwrap().insert(slot);
                    }
                    Err(e) => tracing::error!(id, slot, error = %e, "cannot remove the cgroups of a failed sandbox; its id range stays reserved"),
                }
                Err(e)
            }
        }
    }

    /// The plan's bundles, fetched and unpacked if the cache lacks them, as
    /// read-only binds (their targets were checked with the plan).
    async fn bundle_mounts(&self, plan: &SandboxPlan) -> Result<Vec<BindMount>, Status> {
        let mut mounts = Vec::new();
        for b in &plan.bundles {
            let digest = (!b.sha256.is_empty()).then_some(b.sha256.as_str());
            let source = self.bundles.ensure(&b.archive_url, digest).await.map_err(|e| e.status())?;
            mounts.push(BindMount { source, target: PathBuf::from(&b.target), read_only: true });
        }
        Ok(mounts)
    }

    #[allow(clippy::too_many_arguments)]
    async fn build(
        &self,
        plan: &SandboxPlan,
        checked: Checked,
        bundle_mounts: Vec<BindMount>,
        slot: u32,
        dir: &Path,
        cgroup: &SandboxCgroup,
        parked: bool,
        failure: &Option<String>,
    ) -> Result<Built, Status> {
        let cfg = &self.config;
        let (memory_max, seccomp) = (checked.limits.memory_bytes(), checked.seccomp.clone());
        let ids = IdRange { host_base: cfg.id_base + slot * cfg.id_range_size, size: cfg.id_range_size };
        let workspace = dir.join("workspace");
        for d in [dir.join("rootfs"), workspace.clone(), dir.join("sessions")] {
            std::fs::create_dir_all(&d).map_err(|e| internal(format!("create {}: {e}", d.display())))?;
        }
        // Root inside the sandbox owns its workspace.
        std::os::unix::fs::chown(&workspace, Some(ids.host_base), Some(ids.host_base)).map_err(internal)?;
        injected(failure, "prepare")?;

        let secrets = checked.secrets;
        let mut mounts = vec![BindMount { source: workspace, target: checked.workspace_path, read_only: false }];
        mounts.extend(checked.mounts);
        mounts.extend(bundle_mounts);
        // An egress sandbox's gateway: reserved now, its resolver in the
        // sandbox's /etc/resolv.conf; attached once PID 1 exists, before
        // the supervisor answers (no agent runs before that).
        let gateway = match &checked.network {
            Network::Egress(policy) => {
                let upstream = agentd_egress::upstream_dns().map_err(|e| status(Code::FailedPrecondition, "egress_unavailable", e))?;
                let policy = policy.clone();
                let gateway = tokio::task::spawn_blocking(move || agentd_egress::Gateway::reserve(policy, upstream))
                    .await
                    .map_err(internal)?
                    .map_err(|e| status(Code::Internal, "sandbox_failed", e))?;
                let resolv = dir.join("resolv.conf");
                std::fs::write(&resolv, gateway.resolv_conf()).map_err(|e| internal(format!("write resolv.conf: {e}")))?;
                mounts.push(BindMount { source: resolv, target: "/etc/resolv.conf".into(), read_only: true });
                Some(gateway)
            }
            _ => None,
        };
        let socket_path = dir.join("supervisor.sock");
        let spec = SandboxSpec {
            id: plan.container_id.clone(),
            rootfs_dir: dir.join("rootfs"),
            rootfs: checked.rootfs,
            network: checked.network,
            cgroup_procs: cgroup.procs_files(),
            inject_failure: failure.clone().filter(|s| FAULT_STAGES.contains(&s.as_str())),
            payload: Payload::Supervisor { socket_path: socket_path.clone(), log_path: dir.join("supervisor.log") },
            hostname: checked.hostname,
            ids,
            system_binds: DEFAULT_SYSTEM_BINDS.iter().map(PathBuf::from).collect(),
            mounts,
            supervisor_log_filter: cfg.supervisor_log_filter.clone(),
        };
        let started = std::time::Instant::now();
        let launched = if parked {
            // The parked worker is in the v1 cgroups (renamed from the
            // spare): PID 1, forked by it, is born there; only the v2
            // directory is left to join (at the clone).
            let v1 = cgroup.dirs().iter().filter(|d| d.version == Version::V1).map(|d| d.path.join("cgroup.procs")).collect::<Vec<_>>();
            let parked_spec = SandboxSpec { cgroup_procs: spec.cgroup_procs.iter().filter(|p| !v1.contains(p)).cloned().collect(), ..spec.clone() };
            match self.launcher.launch_parked(&parked_spec).await {
                Err(LaunchError::Failed { stage, message }) if stage == NO_PARKED_WORKER => {
                    tracing::warn!(id = plan.container_id, message, "no parked worker; moving PID 1 into its cgroups");
                    self.launcher.launch(&spec).await
                }
                other => other,
            }
        } else {
            self.launcher.launch(&spec).await
        };
        let launched = launched.map_err(|e| match e {
            LaunchError::Spec(e) => status(Code::InvalidArgument, "invalid_profile", e.to_string()),
            e => status(Code::Internal, "sandbox_failed", e.to_string()),
        })?;
        // Where a slow create spent its time (microseconds): the kernel work
        // of sandbox-init step by step, within the whole launch.
        tracing::debug!(
            id = plan.container_id,
            launch_us = started.elapsed().as_micros() as u64,
            steps = ?launched.steps,
            "sandbox create steps"
        );
        let pid = launched.pid;
        // PID 1 is our child by now (sandbox-init, or the zygote's worker,
        // exited before its report reached us): killed and reaped here, it
        // leaves no zombie.
        let kill_on_error = |e: Status| {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
            e
        };
        let egress = match gateway {
            Some(mut gateway) => {
                let attached = tokio::task::spawn_blocking(move || gateway.attach(pid).map(|()| gateway)).await.map_err(internal).map_err(kill_on_error)?;
                let gateway = attached.map_err(|e| kill_on_error(status(Code::Internal, "sandbox_failed", format!("egress: {e}"))))?;
                let (denials, id) = (self.denials.clone(), plan.container_id.clone());
                let serving = gateway
                    .serve(move |d| {
                        let _ = denials.send((id.clone(), d));
                    })
                    .map_err(|e| kill_on_error(status(Code::Internal, "sandbox_failed", format!("egress: {e}"))))?;
                Some(serving)
            }
            None => None,
        };
        injected(failure, "connect").map_err(kill_on_error)?;
        let (pidfd, exited) = watch_exit(pid).map_err(|e| kill_on_error(internal(format!("pidfd_open: {e}"))))?;
        // Before any agent can start: their variables name the ports.
        let proxies = self.proxies.start(pid, &secrets, None, exited.clone()).map_err(|e| kill_on_error(e.status()))?;
        let channel = uds::connect(&socket_path)
            .await
            .map_err(|e| kill_on_error(status(Code::Internal, "sandbox_failed", format!("supervisor unreachable: {e}"))))?;
        let pid_start = record::start_time(&cfg.proc_root, pid).ok_or_else(|| kill_on_error(internal(format!("PID 1 ({pid}) has no start time"))))?;
        let record = Record {
            version: record::VERSION,
            id: plan.container_id.clone(),
            pid,
            pid_start,
            boot_id: record::boot_id(&cfg.proc_root),
            slot,
            ids,
            created_at_ms: now_ms(),
            cgroup: cgroup.clone(),
            memory_max,
            seccomp: Record::encode_seccomp(seccomp.as_ref()),
            frozen: false,
            secrets: record::RecordedSecret::of(&secrets, &proxies.ports()),
        };
        // Before the answer: a node that restarts right after takes back
        // every sandbox it ever answered for.
        record.write(dir).map_err(|e| kill_on_error(internal(format!("write sandbox.json: {e}"))))?;
        Ok(Built { record, supervisor: SupervisorClient::new(agentd_proto::trace::traced(channel)), exited, pidfd, seccomp, egress, proxies })
    }

    /// Stops the sandbox: its agents first, given the grace period (see
    /// [`Self::stop_agents`]), then its whole tree at once (its pid namespace
    /// dies with PID 1); waits for PID 1 and removes the directory. Its
    /// cgroups are removed, and its slot freed, after the answer. Returns
    /// whether it existed.
    pub async fn delete(&self, id: &str) -> bool {
        let Some(sandbox) = self.table.lock().unwrap().remove(id) else { return false };
        self.stop_agents(&sandbox).await;
        // The whole tree at once (cgroup.kill where there is one), thawed
        // first so a hibernated sandbox can die.
        if let Err(e) = sandbox.cgroup.kill() {
            tracing::warn!(id, error = %e, "cgroup kill failed; killing PID 1");
        }
        if sandbox.is_running() {
            sandbox.kill_pid1();
        }
        let mut exited = sandbox.exited.clone();
        if tokio::time::timeout(EXIT_WAIT, exited.wait_for(|e| *e)).await.is_err() {
            tracing::error!(id, pid = sandbox.pid, "sandbox did not exit after SIGKILL");
        }
        // Its gateway's tasks stop, its link and rules go (`ip`, `nft`).
        let egress = sandbox.egress.lock().unwrap().take();
        if let Some(egress) = egress {
            let _ = tokio::task::spawn_blocking(move || drop(egress)).await;
        }
        // Their sockets hold the sandbox's network namespace.
        sandbox.proxies.stop().await;
        if let Err(e) = std::fs::remove_dir_all(&sandbox.dir) {
            tracing::warn!(id, error = %e, "cannot remove sandbox directory");
        }
        // rmdir of a cgroup can wait on the kernel for milliseconds: after the answer.
        let cgroup = sandbox.cgroup.clone();
        let (slot, pid) = (sandbox.slot, sandbox.pid);
        let free_slots = Arc::clone(&self.free_slots);
        let id = id.to_string();
        let mut removals = self.removals.lock().await;
        while removals.try_join_next().is_some() {}
        removals.spawn(async move {
            let removed = tokio::task::spawn_blocking(move || cgroup.remove()).await;
            let removed = match removed {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    tracing::warn!(id, error = %e, "cannot remove sandbox cgroup");
                    false
                }
                Err(e) => {
                    tracing::warn!(id, error = %e, "cgroup removal panicked");
                    false
                }
            };
            // A process of the sandbox that outlived the kill would share
            // its host ids with the next sandbox given the slot.
            if removed && *exited.borrow() {
                free_slots.lock().unwrap().insert(slot);
            } else {
                tracing::error!(id, slot, pid, "sandbox processes may be left: its id range stays reserved until the node restarts");
            }
        });
        true
    }

    /// Asks the supervisor to stop the agents (SIGTERM to each process group,
    /// the grace period, SIGKILL to the groups left) and logs how each ended.
    /// Bounded by the grace plus [`STOP_MARGIN`]: a supervisor that does not
    /// answer (stuck, or frozen and not thawed) is killed with the rest
    /// afterwards. A hibernated sandbox is thawed first, so its agents get
    /// their grace too.
    async fn stop_agents(&self, sandbox: &Sandbox) {
        let (id, grace) = (sandbox.id.as_str(), self.config.stop_grace);
        if grace.is_zero() || !sandbox.is_running() {
            return;
        }
        if sandbox.is_frozen()
            && let Err(e) = sandbox.thaw()
        {
            tracing::warn!(id, error = e.message(), "cannot thaw the hibernated sandbox: its agents get no grace period");
            return;
        }
        let request = ShutdownRequest { grace_ms: grace.as_millis().min(u32::MAX as u128) as u32 };
        let mut supervisor = sandbox.supervisor.clone();
        match tokio::time::timeout(grace + STOP_MARGIN, supervisor.shutdown(request)).await {
            Ok(Ok(answer)) => {
                for a in answer.into_inner().agents {
                    tracing::info!(
                        id,
                        agent = a.agent_instance_id,
                        pid = a.pid,
                        exit = a.exit,
                        after_ms = a.after_ms,
                        killed = a.killed,
                        stderr = a.stderr_tail,
                        "agent stopped"
                    );
                }
            }
            Ok(Err(e)) => tracing::warn!(id, error = %e, "the supervisor could not stop its agents; killing the sandbox"),
            Err(_) => tracing::warn!(
                id,
                waited_ms = (grace + STOP_MARGIN).as_millis() as u64,
                "the supervisor did not stop its agents in time; killing the sandbox"
            ),
        }
    }

    /// For a stop that leaves the sandboxes running (live restore): waits
    /// for pending cgroup removals, ends the zygote (and the worker parked in
    /// the spare) and removes the spare; this node's subtree stays, with the
    /// sandboxes in it, for the next start to take back.
    pub async fn release(&self) {
        let mut removals = self.removals.lock().await;
        while removals.join_next().await.is_some() {}
        drop(removals);
        self.close_spare().await;
        // With no sandbox left, nothing is to be taken back: the host is left
        // as a stop without live restore leaves it.
        if self.table.lock().unwrap().is_empty()
            && let Err(e) = self.cgroups.remove_subtree()
        {
            tracing::warn!(error = %e, "cannot remove the node's cgroup subtree");
        }
    }

    /// Ends the zygote and the spare (with the worker parked in it); no
    /// spare is made after this.
    async fn close_spare(&self) {
        let spare = {
            let mut slot = self.spare.lock().await;
            slot.closed = true;
            slot.cgroup.take()
        };
        self.launcher.stop().await;
        if let Some(spare) = spare {
            let _ = spare.kill();
            if let Err(e) = spare.remove() {
                tracing::warn!(error = %e, "cannot remove the spare cgroups");
            }
        }
    }

    /// Waits for pending cgroup removals, ends the zygote (and the worker
    /// parked in the spare) and removes the spare and this node's subtree.
    pub async fn finish_removals(&self) {
        let mut removals = self.removals.lock().await;
        while removals.join_next().await.is_some() {}
        drop(removals);
        self.close_spare().await;
        if let Err(e) = self.cgroups.remove_subtree() {
            tracing::warn!(error = %e, "cannot remove the node's cgroup subtree");
        }
    }
}

/// The slots (of `max` ranges of `size` ids from `base`) that share an id
/// with `ids`: a record of an earlier node, whose base and size may have
/// been other than ours.
fn slots_overlapping(base: u32, size: u32, max: u32, ids: IdRange) -> Vec<u32> {
    let (base, size) = (u64::from(base), u64::from(size));
    let (start, end) = (u64::from(ids.host_base), u64::from(ids.host_base) + u64::from(ids.size));
    (0..max)
        .filter(|slot| {
            let from = base + u64::from(*slot) * size;
            from < end && start < from + size
        })
        .collect()
}

/// Whether `pid` still runs agentd as a sandbox's PID 1 (forked, not exec'd,
/// from `agentd sandbox-init`, whose command line it keeps, and named
/// [`PID1_NAME`]), so that a stale record never makes us kill an unrelated
/// process that reused the pid.
fn is_sandbox_init(pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).nth(1) == Some(b"sandbox-init".as_slice()))
        .unwrap_or(false);
    let comm = std::fs::read(format!("/proc/{pid}/comm"))
        .map(|c| c.strip_suffix(b"\n").unwrap_or(&c) == PID1_NAME.to_bytes())
        .unwrap_or(false);
    cmdline && comm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_could_escape_the_state_dir_are_refused() {
        assert!(valid_id("ctr_0193b3c4-aa"));
        for bad in ["", "../x", "a/b", ".", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_leftover_holds_the_slots_its_ids_overlap() {
        let ids = |host_base, size| IdRange { host_base, size };
        assert_eq!(slots_overlapping(1000, 100, 10, ids(1100, 100)), [1]);
        // Recorded under another base or size: every slot it touches.
        assert_eq!(slots_overlapping(1000, 100, 10, ids(1150, 100)), [1, 2]);
        assert_eq!(slots_overlapping(1000, 100, 10, ids(1000, 1000)), (0..10).collect::<Vec<_>>());
        assert!(slots_overlapping(1000, 100, 10, ids(500, 500)).is_empty());
        assert!(slots_overlapping(1000, 100, 10, ids(2000, 100)).is_empty());
    }

    #[test]
    fn a_live_non_agentd_process_is_not_taken_for_a_sandbox() {
        assert!(!is_sandbox_init(std::process::id() as i32));
        assert!(!is_sandbox_init(i32::MAX));
    }
}

