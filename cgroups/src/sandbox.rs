//! One sandbox's cgroups: a directory per hierarchy, and what can be done to
//! them all at once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::CgroupError;
use super::fs::{self, CgroupFs, RealCgroupFs};
use super::layout::Mode;
use super::limits::Limits;
use super::{v1, v2};

/// Which cgroup version a directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// One cgroup directory in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupDir {
    pub version: Version,
    /// v1: the controllers bound to the hierarchy. v2: the controllers
    /// enabled for this cgroup (none on the hybrid layout's v2 tree).
    pub controllers: Vec<String>,
    pub path: PathBuf,
}

impl CgroupDir {
    pub(crate) fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// What a sandbox's cgroups have used, and their limits. `None`: not
/// available on this host (no such controller), or, for a `*_max`, no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Memory in use, bytes (page cache included).
    pub memory_current: Option<u64>,
    pub memory_max: Option<u64>,
    /// CPU time used since creation, microseconds.
    pub cpu_usage_usec: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_max: Option<u64>,
    /// Processes the kernel's OOM killer killed here.
    pub oom_kills: Option<u64>,
}

fn real_fs() -> Arc<dyn CgroupFs> {
    Arc::new(RealCgroupFs)
}

/// The cgroups of one sandbox: `<start>/<subtree>/<id>` in every hierarchy
/// we use. Serializable, so that the node can record it and reopen it after
/// a restart (a deserialized one acts on the real cgroupfs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxCgroup {
    /// The sandbox id, also the directories' name.
    id: String,
    mode: Mode,
    /// One per hierarchy: v1 ones first, then the v2 one if any.
    dirs: Vec<CgroupDir>,
    /// The kernel, or a fake in tests.
    #[serde(skip, default = "real_fs")]
    cfs: Arc<dyn CgroupFs>,
}

impl PartialEq for SandboxCgroup {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.mode == other.mode && self.dirs == other.dirs
    }
}

impl SandboxCgroup {
    pub(crate) fn new(
        id: String,
        mode: Mode,
        dirs: Vec<CgroupDir>,
        cfs: Arc<dyn CgroupFs>,
    ) -> Self {
        SandboxCgroup {
            id,
            mode,
            dirs,
            cfs,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn dirs(&self) -> &[CgroupDir] {
        &self.dirs
    }

    /// The directory of the hierarchy that carries `controller` (v1), or of
    /// the v2 one if the controller is enabled there.
    pub fn dir_of(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| d.has(controller))
            .map(|d| d.path.as_path())
    }

    /// The v2 directory (pure v2, or the hybrid layout's controller-less one).
    pub fn v2_dir(&self) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| d.version == Version::V2)
            .map(|d| d.path.as_path())
    }

    /// The `cgroup.procs` file of every directory, for [`super::join`].
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.path.join("cgroup.procs"))
            .collect()
    }

    /// Makes the directories and applies `limits`. On failure whatever was
    /// made is removed again.
    pub(crate) fn make(&self, limits: &Limits) -> Result<(), CgroupError> {
        self.make_from(None, limits)
    }

    /// Makes the directories, taking each that `spare` has in the same
    /// hierarchy by renaming it (with the processes in it) instead of making
    /// it, and applies `limits`. A failure puts back what it renamed and
    /// removes what it made.
    pub(crate) fn make_from(&self, spare: Option<&SandboxCgroup>, limits: &Limits) -> Result<(), CgroupError> {
        let mut made = Vec::new();
        let mut renamed: Vec<(&Path, &Path)> = Vec::new();
        let result = (|| {
            for d in &self.dirs {
                let from = spare.and_then(|s| s.dirs.iter().find(|o| o.path.parent() == d.path.parent()));
                let done = match from {
                    Some(from) => self.cfs.rename(&from.path, &d.path).map(|()| renamed.push((&from.path, &d.path))),
                    None => self.cfs.mkdir(&d.path).map(|()| made.push(d.path.clone())),
                };
                match done {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return Err(CgroupError::AlreadyExists {
                            path: d.path.clone(),
                        });
                    }
                    Err(e) => return Err(CgroupError::io(if from.is_some() { "rename" } else { "mkdir" }, &d.path, e)),
                }
            }
            for d in &self.dirs {
                match d.version {
                    Version::V1 => v1::apply(&d.controllers, &d.path, limits)?,
                    // The hybrid layout's v2 tree has no controller to limit.
                    Version::V2 if d.controllers.is_empty() => {}
                    Version::V2 => v2::apply(&d.path, limits)?,
                }
            }
            Ok(())
        })();
        if result.is_err() {
            let now = Instant::now();
            for p in made.iter().rev() {
                let _ = fs::remove_tree(&*self.cfs, p, now, now);
            }
            for (from, to) in renamed {
                let _ = self.cfs.rename(to, from);
            }
        }
        result
    }

    /// Moves process `pid` into every one of the sandbox's cgroups.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        for d in &self.dirs {
            match d.version {
                Version::V1 => fs::write(&d.path.join("cgroup.procs"), &pid.to_string())?,
                Version::V2 => v2::add(&d.path, pid)?,
            }
        }
        Ok(())
    }

    /// Every process in the sandbox's cgroups (and any cgroup below them).
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        let mut all = Vec::new();
        for d in &self.dirs {
            fs::procs_recursive(&d.path, &mut all)?;
        }
        let set: BTreeSet<u32> = all.into_iter().collect();
        Ok(set.into_iter().collect())
    }

    /// Whether any process is left. From `cgroup.events` where there is a v2
    /// directory, else from the v1 `cgroup.procs` files.
    pub fn populated(&self) -> Result<bool, CgroupError> {
        if let Some(dir) = self.v2_dir()
            && let Some(p) = v2::populated(dir)?
        {
            return Ok(p);
        }
        Ok(!self.pids()?.is_empty())
    }

    /// Stops every process of the sandbox. v2 `cgroup.freeze` where there is
    /// one (pure v2, or the hybrid layout's v2 tree), else the v1 freezer.
    /// Returns once the kernel reports the cgroup frozen.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        if let Some(dir) = self.v2_dir().filter(|d| v2::can_freeze(d)) {
            return v2::freeze(dir);
        }
        if let Some(dir) = self.dir_of("freezer") {
            return v1::freeze(dir, v1::FREEZE_TIMEOUT);
        }
        Err(self.no_freezer())
    }

    /// Lets the processes run again.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        if let Some(dir) = self.v2_dir().filter(|d| v2::can_freeze(d)) {
            return v2::thaw(dir);
        }
        if let Some(dir) = self.dir_of("freezer") {
            return v1::thaw(dir);
        }
        Err(self.no_freezer())
    }

    fn no_freezer(&self) -> CgroupError {
        CgroupError::FreezerUnavailable {
            path: self
                .dirs
                .first()
                .map(|d| d.path.clone())
                .unwrap_or_default(),
        }
    }

    /// SIGKILLs every process of the sandbox, sub-cgroups included. Through
    /// `cgroup.kill` in the v2 directory where the kernel has it (one atomic
    /// step, forks cannot escape). Else: freeze (so nothing forks or exits
    /// and pids cannot be reused meanwhile), SIGKILL each pid listed, thaw
    /// (the kills land as the processes wake). Without any freezer, kill in
    /// rounds until no pid is left. Returns without waiting for the
    /// processes to be gone: [`Self::remove`] waits.
    pub fn kill(&self) -> Result<(), CgroupError> {
        if let Some(dir) = self.v2_dir()
            && v2::kill(dir)?
        {
            // On hybrid hosts a process may be in the v1 cgroups only: a
            // node's worker parked in the spare these were renamed from,
            // when the create failed before using it.
            if self.dirs.iter().any(|d| d.version == Version::V1) {
                for pid in self.pids()? {
                    if let Err(e) = self.cfs.kill(pid)
                        && e.raw_os_error() != Some(libc::ESRCH)
                    {
                        return Err(CgroupError::io("kill", format!("/proc/{pid}"), e));
                    }
                }
            }
            return Ok(());
        }
        let frozen = match self.freeze() {
            Ok(()) => true,
            Err(CgroupError::FreezerUnavailable { .. }) => false,
            Err(e) => {
                // Half frozen (a task in an uninterruptible wait, say) is the
                // worst of both: a v1 freezer keeps a frozen task from dying
                // of SIGKILL. Thawed, the rounds of kills reach everyone.
                tracing::warn!(id = %self.id, error = %e, "freeze before kill failed; killing in rounds");
                let _ = self.thaw();
                false
            }
        };
        let rounds = if frozen { 1 } else { 20 };
        let mut result = Ok(());
        for _ in 0..rounds {
            // Thawed below whatever happens here: frozen, nothing dies.
            let pids = match self.pids() {
                Ok(pids) => pids,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                if let Err(e) = self.cfs.kill(pid)
                    && e.raw_os_error() != Some(libc::ESRCH)
                {
                    result = Err(CgroupError::io("kill", format!("/proc/{pid}"), e));
                }
            }
            if !frozen {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if frozen {
            self.thaw()?;
        }
        result
    }

    /// Usage and limits.
    pub fn stats(&self) -> Result<Stats, CgroupError> {
        let mut s = Stats::default();
        for d in &self.dirs {
            let p = &d.path;
            match d.version {
                Version::V1 => {
                    if d.has("memory") {
                        let (cur, max) = v1::memory(p)?;
                        (s.memory_current, s.memory_max) = (Some(cur), max);
                        s.oom_kills = v1::oom_kills(p)?;
                    }
                    if d.has("cpuacct") {
                        s.cpu_usage_usec = Some(v1::cpu_usage_usec(p)?);
                    }
                }
                Version::V2 => {
                    if d.has("memory") {
                        let (cur, max) = v2::memory(p)?;
                        (s.memory_current, s.memory_max) = (Some(cur), max);
                        s.oom_kills = v2::oom_kills(p)?;
                    }
                    if s.cpu_usage_usec.is_none() {
                        s.cpu_usage_usec = v2::cpu_usage_usec(p)?;
                    }
                }
            }
            if d.has("pids") {
                let ps = libcgroups::stats::pid_stats(p).map_err(|e| CgroupError::lib(p, e))?;
                s.pids_current = Some(ps.current);
                // libcgroups reports "max" (no limit) as 0.
                s.pids_max = Some(ps.limit).filter(|&l| l != 0);
            }
        }
        Ok(s)
    }

    /// How many processes the OOM killer killed in the sandbox (`None`
    /// without memory accounting). v2: `oom_kill` of `memory.events`; v1:
    /// `oom_kill` of `memory.oom_control`.
    pub fn oom_kills(&self) -> Result<Option<u64>, CgroupError> {
        match self.dirs.iter().find(|d| d.has("memory")) {
            Some(d) if d.version == Version::V1 => v1::oom_kills(&d.path),
            Some(d) => v2::oom_kills(&d.path),
            None => Ok(None),
        }
    }

    /// How many forks and clones in the sandbox failed at its pids limit
    /// (`max` of `pids.events`, alike in v1 and v2): the proof a fork bomb
    /// met the limit rather than something else. `None` without the pids
    /// controller.
    pub fn pids_limit_hits(&self) -> Result<Option<u64>, CgroupError> {
        match self.dir_of("pids") {
            Some(dir) => fs::read_keyed(&dir.join("pids.events"), "max", "pids limit events"),
            None => Ok(None),
        }
    }

    /// How long [`Self::remove`] waits for the processes of a killed
    /// sandbox to be gone.
    pub const REMOVE_WAIT: Duration = Duration::from_secs(2);

    /// Removes the sandbox's directories in every hierarchy (and any
    /// sub-cgroup), retrying while they are busy for up to
    /// [`Self::REMOVE_WAIT`]. Call after [`Self::kill`]; it may run after the
    /// client has its answer. Already-removed directories are fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        self.remove_within(Self::REMOVE_WAIT)
    }

    /// [`Self::remove`] with its own bound on the wait.
    pub fn remove_within(&self, wait: Duration) -> Result<(), CgroupError> {
        let started = Instant::now();
        let deadline = started + wait;
        let mut first_err = None;
        for d in &self.dirs {
            if let Err(e) = fs::remove_tree(&*self.cfs, &d.path, started, deadline) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
