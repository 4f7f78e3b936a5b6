//! The node's sandbox table.
//!
//! Each sandbox has a directory `state_dir/sandboxes/<id>/` holding the empty
//! mount point of its root, its workspace, its supervisor's socket and log, its
//! sessions' event logs and `sandbox.json`, the record a restarted node uses to
//! find what it left behind. PID 1 of each sandbox is re-parented to the node
//! (a subreaper) and watched through a pidfd.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_proto::error::status;
use agentd_proto::node::{Sandbox as SandboxInfo, SandboxPlan, SandboxUsage};
use agentd_runtime::cgroups::limits::{HostCapacity, Limits};
use agentd_runtime::cgroups::sandbox::SandboxCgroup;
use agentd_runtime::cgroups::tree::CgroupTree;
use agentd_proto::supervisor::supervisor_client::SupervisorClient;
use agentd_runtime::sandbox::init::PID1_NAME;
use agentd_runtime::sandbox::spec::DEFAULT_SYSTEM_BINDS;
use agentd_runtime::sandbox::{BindMount, IdRange, LaunchError, Launcher, Network, Payload, SandboxSpec};
use agentd_runtime::uds;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::NodeConfig;
use crate::bundles::BundleCache;
use crate::event_log::now_ms;

/// How long a killed sandbox may take to disappear before teardown gives up
/// waiting (the kernel kills the whole pid namespace with its PID 1).
const EXIT_WAIT: Duration = Duration::from_secs(10);

/// What `sandbox.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    pid: i32,
    slot: u32,
    ids: IdRange,
    created_at_ms: i64,
}

pub struct Sandbox {
    pub id: String,
    pub pid: i32,
    pub ids: IdRange,
    pub slot: u32,
    pub dir: PathBuf,
    pub created_at_ms: i64,
    pub supervisor: SupervisorClient<Channel>,
    /// Limits, freeze, whole-tree kill, usage and the OOM counter.
    pub cgroup: SandboxCgroup,
    limits: Limits,
    /// OOM kills already reported (see `oom.rs`).
    oom_seen: AtomicU64,
    frozen: AtomicBool,
    exited: watch::Receiver<bool>,
}

impl Sandbox {
    pub fn is_running(&self) -> bool {
        !*self.exited.borrow()
    }

    pub fn info(&self) -> SandboxInfo {
        let usage = self.cgroup.stats().ok().map(|s| SandboxUsage {
            memory_current: s.memory_current,
            memory_max: s.memory_max,
            cpu_usage_usec: s.cpu_usage_usec,
            pids_current: s.pids_current,
            pids_max: s.pids_max,
            oom_kills: s.oom_kills,
        });
        SandboxInfo {
            container_id: self.id.clone(),
            state: if self.is_running() { "running" } else { "exited" }.into(),
            supervisor_pid: self.pid,
            host_uid_base: self.ids.host_base,
            id_range_size: self.ids.size,
            created_at_ms: self.created_at_ms,
            usage,
            frozen: self.frozen.load(Ordering::Relaxed),
        }
    }

    pub fn memory_max(&self) -> Option<u64> {
        self.limits.memory_bytes()
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
        Ok(())
    }

    pub fn thaw(&self) -> Result<(), Status> {
        self.cgroup.thaw().map_err(|e| internal(format!("thaw: {e}")))?;
        self.frozen.store(false, Ordering::Relaxed);
        Ok(())
    }

    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::Relaxed)
    }

    pub fn sessions_dir(&self) -> PathBuf {
        self.dir.join("sessions")
    }
}

pub struct Sandboxes {
    config: NodeConfig,
    cgroups: CgroupTree,
    host: HostCapacity,
    /// cgroup removals run after teardown answers; shutdown waits for them.
    removals: tokio::sync::Mutex<tokio::task::JoinSet<()>>,
    table: Mutex<HashMap<String, Arc<Sandbox>>>,
    free_slots: Mutex<BTreeSet<u32>>,
    /// Serializes creation per id so that a repeated create is answered with the
    /// first one's sandbox.
    creating: tokio::sync::Mutex<()>,
    /// Runs sandbox-init (a zygote kept for the node's life).
    launcher: Launcher,
    /// Agent bundles the plans name, unpacked once and shared read-only.
    bundles: BundleCache,
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

/// Resolves when `pid` has exited, and reaps it if it is our child.
fn watch_exit(pid: i32) -> std::io::Result<watch::Receiver<bool>> {
    // SAFETY: an OwnedFd stays open and keeps its number until dropped.
    let fd = unsafe { AsyncFd::register_with_interest(pidfd_open(pid)?, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let _ = fd.readable().await;
        // ECHILD when we are not its parent (a node started without being a
        // subreaper); then whoever is reaps it.
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        drop(fd);
        let _ = tx.send(true);
    });
    Ok(rx)
}

fn internal(e: impl std::fmt::Display) -> Status {
    status(Code::Internal, "internal", e.to_string())
}

impl Sandboxes {
    pub async fn open(config: NodeConfig) -> std::io::Result<Arc<Self>> {
        let root = config.state_dir.join("sandboxes");
        std::fs::create_dir_all(&root)?;
        let free_slots = (0..config.max_sandboxes).collect();
        let self_cgroup = std::fs::read_to_string(config.proc_root.join("self/cgroup"))?;
        let cgroups = CgroupTree::discover(&config.cgroup_root, &self_cgroup, &config.cgroup_subtree).map_err(std::io::Error::other)?;
        let host = HostCapacity::detect(&config.proc_root).map_err(std::io::Error::other)?;
        let launcher = Launcher::new(config.exe.clone());
        let bundles = BundleCache::open(config.state_dir.join("bundles"))?;
        let this = Arc::new(Self {
            config,
            cgroups,
            host,
            removals: Default::default(),
            table: Mutex::default(),
            free_slots: Mutex::new(free_slots),
            creating: Default::default(),
            launcher,
            bundles,
        });
        this.clean_leftovers(&root).await;
        let report = this.cgroups.clean_leftovers();
        if !report.removed.is_empty() || !report.failed.is_empty() {
            tracing::warn!(removed = ?report.removed, failed = ?report.failed, "cleaned cgroups an earlier node left");
        }
        Ok(this)
    }

    /// Kills sandboxes an earlier node process left running and removes their
    /// directories. (Re-adopting them instead is planned; see HACKING.md.)
    async fn clean_leftovers(&self, root: &Path) {
        let Ok(entries) = std::fs::read_dir(root) else { return };
        for entry in entries.flatten() {
            let dir = entry.path();
            let record = std::fs::read(dir.join("sandbox.json")).ok().and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            if let Some(record) = record {
                if is_sandbox_init(record.pid) {
                    tracing::warn!(id = record.id, pid = record.pid, "killing sandbox left by an earlier node");
                    let _ = kill(Pid::from_raw(record.pid), Signal::SIGKILL);
                    if let Ok(mut exited) = watch_exit(record.pid) {
                        let _ = tokio::time::timeout(EXIT_WAIT, exited.wait_for(|e| *e)).await;
                    }
                }
            }
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove leftover sandbox directory");
            }
        }
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

    /// Builds the sandbox a plan describes. Creating an id that exists answers
    /// with the existing sandbox; a failure leaves nothing behind.
    pub async fn create(&self, plan: SandboxPlan) -> Result<Arc<Sandbox>, Status> {
        let id = plan.container_id.clone();
        if !valid_id(&id) {
            return Err(status(Code::InvalidArgument, "invalid_request", format!("invalid container id {id:?}")));
        }
        // Before the creation lock: a slow download must not hold up other sandboxes.
        let bundle_mounts = self.bundle_mounts(&plan).await?;
        let _guard = self.creating.lock().await;
        if let Ok(existing) = self.get(&id) {
            return Ok(existing);
        }
        let slot = self.free_slots.lock().unwrap().pop_first().ok_or_else(|| {
            status(Code::ResourceExhausted, "node_full", format!("node holds its maximum of {} sandboxes", self.config.max_sandboxes))
        })?;
        let dir = self.config.state_dir.join("sandboxes").join(&id);
        let resources = plan.resources.unwrap_or_default();
        let nonzero = |v: u64| (v > 0).then_some(v);
        let limits = Limits::new(
            nonzero(resources.memory_bytes),
            nonzero(resources.pids_max),
            (resources.cpus != 0.0).then_some(resources.cpus),
            &self.host,
        )
        .map_err(|e| status(Code::InvalidArgument, "invalid_profile", e.to_string()));
        let cgroup = match limits.and_then(|l| {
            let cg = self.cgroups.create(&id, &l).map_err(|e| status(Code::Internal, "sandbox_failed", format!("cgroup: {e}")))?;
            Ok((cg, l))
        }) {
            Ok(cg) => cg,
            Err(e) => {
                self.free_slots.lock().unwrap().insert(slot);
                return Err(e);
            }
        };
        match self.build(&plan, bundle_mounts, slot, &dir, &cgroup.0).await {
            Ok((pid, ids, created_at_ms, supervisor, exited)) => {
                let (cgroup, limits) = cgroup;
                let sandbox = Arc::new(Sandbox {
                    id: id.clone(),
                    pid,
                    ids,
                    slot,
                    dir,
                    created_at_ms,
                    supervisor,
                    cgroup,
                    limits,
                    oom_seen: AtomicU64::new(0),
                    frozen: AtomicBool::new(false),
                    exited,
                });
                // Fault tests count these lines: one per sandbox built.
                tracing::info!(id, pid, "sandbox created");
                self.table.lock().unwrap().insert(id, Arc::clone(&sandbox));
                Ok(sandbox)
            }
            Err(e) => {
                let _ = cgroup.0.kill();
                let _ = std::fs::remove_dir_all(&dir);
                if let Err(e) = cgroup.0.remove() {
                    tracing::warn!(error = %e, "cannot remove cgroup of a failed sandbox");
                }
                self.free_slots.lock().unwrap().insert(slot);
                Err(e)
            }
        }
    }

    /// The plan's bundles, fetched and unpacked if the cache lacks them, as
    /// read-only binds.
    async fn bundle_mounts(&self, plan: &SandboxPlan) -> Result<Vec<BindMount>, Status> {
        let mut mounts = Vec::new();
        for b in &plan.bundles {
            let target = Path::new(&b.target);
            if !target.is_absolute() || target.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(status(Code::InvalidArgument, "invalid_request", format!("bundle target {:?} must be an absolute path", b.target)));
            }
            let digest = (!b.sha256.is_empty()).then_some(b.sha256.as_str());
            let source = self.bundles.ensure(&b.archive_url, digest).await.map_err(|e| e.status())?;
            mounts.push(BindMount { source, target: target.to_owned(), read_only: true });
        }
        Ok(mounts)
    }

    async fn build(
        &self,
        plan: &SandboxPlan,
        bundle_mounts: Vec<BindMount>,
        slot: u32,
        dir: &Path,
        cgroup: &SandboxCgroup,
    ) -> Result<(i32, IdRange, i64, SupervisorClient<Channel>, watch::Receiver<bool>), Status> {
        let cfg = &self.config;
        let ids = IdRange { host_base: cfg.id_base + slot * cfg.id_range_size, size: cfg.id_range_size };
        let workspace = dir.join("workspace");
        for d in [dir.join("rootfs"), workspace.clone(), dir.join("sessions")] {
            std::fs::create_dir_all(&d).map_err(|e| internal(format!("create {}: {e}", d.display())))?;
        }
        // Root inside the sandbox owns its workspace.
        std::os::unix::fs::chown(&workspace, Some(ids.host_base), Some(ids.host_base)).map_err(internal)?;

        for m in &plan.mounts {
            if std::fs::symlink_metadata(&m.source).is_err() {
                let (code, what) = match m.role.as_str() {
                    "agent" => ("agent_executable_not_found", "agent executable"),
                    _ => ("mount_source_not_found", "mount source"),
                };
                return Err(status(Code::FailedPrecondition, code, format!("{what} {} does not exist on node", m.source)));
            }
        }
        let workspace_path = if plan.workspace_path.is_empty() { "/workspace" } else { plan.workspace_path.as_str() };
        let mut mounts = vec![BindMount { source: workspace, target: workspace_path.into(), read_only: false }];
        mounts.extend(plan.mounts.iter().map(|m| BindMount {
            source: m.source.clone().into(),
            target: m.target.clone().into(),
            read_only: m.read_only,
        }));
        mounts.extend(bundle_mounts);
        let network: Network = match plan.network.as_str() {
            "" => Network::None,
            other => other.parse().map_err(|e: String| status(Code::InvalidArgument, "invalid_profile", e))?,
        };
        let rootfs = (!plan.rootfs.is_empty()).then(|| PathBuf::from(&plan.rootfs));
        let socket_path = dir.join("supervisor.sock");
        let spec = SandboxSpec {
            id: plan.container_id.clone(),
            rootfs_dir: dir.join("rootfs"),
            rootfs,
            network,
            cgroup_procs: cgroup.procs_files(),
            inject_failure: None,
            payload: Payload::Supervisor { socket_path: socket_path.clone(), log_path: dir.join("supervisor.log") },
            hostname: if plan.hostname.is_empty() { "sandbox".into() } else { plan.hostname.clone() },
            ids,
            system_binds: DEFAULT_SYSTEM_BINDS.iter().map(PathBuf::from).collect(),
            mounts,
            supervisor_log_filter: cfg.supervisor_log_filter.clone(),
        };
        let started = std::time::Instant::now();
        let launched = self.launcher.launch(&spec).await.map_err(|e| match e {
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
        let kill_on_error = |e: Status| {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
            e
        };
        let exited = watch_exit(pid).map_err(|e| kill_on_error(internal(format!("pidfd_open: {e}"))))?;
        let channel = uds::connect(&socket_path)
            .await
            .map_err(|e| kill_on_error(status(Code::Internal, "sandbox_failed", format!("supervisor unreachable: {e}"))))?;
        let record = Record { id: plan.container_id.clone(), pid, slot, ids, created_at_ms: now_ms() };
        std::fs::write(dir.join("sandbox.json"), serde_json::to_vec_pretty(&record).expect("record serializes"))
            .map_err(|e| kill_on_error(internal(format!("write sandbox.json: {e}"))))?;
        Ok((pid, ids, record.created_at_ms, SupervisorClient::new(channel), exited))
    }

    /// Kills the sandbox's whole tree (its pid namespace dies with PID 1),
    /// waits for it, and removes its directory. Returns whether it existed.
    pub async fn delete(&self, id: &str) -> bool {
        let Some(sandbox) = self.table.lock().unwrap().remove(id) else { return false };
        // The whole tree at once (cgroup.kill where there is one), thawed
        // first so a hibernated sandbox can die.
        if let Err(e) = sandbox.cgroup.kill() {
            tracing::warn!(id, error = %e, "cgroup kill failed; killing PID 1");
        }
        if sandbox.is_running() {
            // The pid cannot have been reused: it is our unreaped child.
            let _ = kill(Pid::from_raw(sandbox.pid), Signal::SIGKILL);
        }
        let mut exited = sandbox.exited.clone();
        if tokio::time::timeout(EXIT_WAIT, exited.wait_for(|e| *e)).await.is_err() {
            tracing::error!(id, pid = sandbox.pid, "sandbox did not exit after SIGKILL");
        }
        if let Err(e) = std::fs::remove_dir_all(&sandbox.dir) {
            tracing::warn!(id, error = %e, "cannot remove sandbox directory");
        }
        self.free_slots.lock().unwrap().insert(sandbox.slot);
        // rmdir of a cgroup can wait on the kernel for milliseconds: after the answer.
        let cgroup = sandbox.cgroup.clone();
        let id = id.to_string();
        self.removals.lock().await.spawn_blocking(move || {
            if let Err(e) = cgroup.remove() {
                tracing::warn!(id, error = %e, "cannot remove sandbox cgroup");
            }
        });
        true
    }

    /// Waits for pending cgroup removals, ends the zygote and removes this
    /// node's subtree.
    pub async fn finish_removals(&self) {
        let mut removals = self.removals.lock().await;
        while removals.join_next().await.is_some() {}
        self.launcher.stop().await;
        if let Err(e) = self.cgroups.remove_subtree() {
            tracing::warn!(error = %e, "cannot remove the node's cgroup subtree");
        }
    }
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
    fn a_live_non_agentd_process_is_not_taken_for_a_sandbox() {
        assert!(!is_sandbox_init(std::process::id() as i32));
        assert!(!is_sandbox_init(i32::MAX));
    }
}

