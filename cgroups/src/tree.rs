//! agentd's subtree: `<start cgroup>/<subtree name>` in every hierarchy we
//! use, under which each sandbox gets `<sandbox id>/`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::error::CgroupError;
use super::fs::{self, CgroupFs, RealCgroupFs};
use super::layout::{self, DAEMON_LEAF, HYBRID_UNIFIED_DIR, Mode, SPARE_LEAF, SelfCgroup, V1_CONTROLLERS};
use super::limits::Limits;
use super::sandbox::{CgroupDir, SandboxCgroup, Version};
use super::v2;

/// agentd's cgroup subtree on this host. Made by [`CgroupTree::discover`];
/// makes, reopens and cleans up sandbox cgroups.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    mode: Mode,
    /// The name of our directory under each start cgroup (`agentd-<instance>`).
    subtree: String,
    /// `<start>/<subtree>` in each hierarchy we use: v1 ones first, then the
    /// v2 one if any.
    dirs: Vec<CgroupDir>,
    /// The kernel, or a fake in tests.
    cfs: Arc<dyn CgroupFs>,
    /// On pure v2, where the daemon moved itself into its leaf: how to move
    /// it back when the subtree goes ([`Self::remove_subtree`]).
    moved: Option<v2::MovedOut>,
    /// The daemon's pid, which [`Self::remove_subtree`] moves back.
    self_pid: u32,
}

/// What [`CgroupTree::clean_leftovers`] did.
#[derive(Debug, Default)]
#[must_use]
pub struct LeftoverReport {
    /// Sandbox cgroups killed and removed.
    pub removed: Vec<String>,
    /// Sandbox cgroups that could not be, and why.
    pub failed: Vec<(String, CgroupError)>,
}

impl CgroupTree {
    /// Finds the cgroups the daemon was started in (`self_cgroup` is the text
    /// of `/proc/self/cgroup`, `root` the cgroup mount root, normally
    /// `/sys/fs/cgroup`) and makes our subtree `<start>/<subtree>` in each
    /// hierarchy we use: on v1 and hybrid hosts the memory, pids, cpu,
    /// cpuacct and freezer hierarchies (and the hybrid v2 tree); on pure v2
    /// the one hierarchy, after moving this process into the leaf
    /// `<start>/<subtree>/daemon` and enabling cpu, memory and pids (see
    /// `v2::prepare_subtree`).
    ///
    /// `subtree` names our directory; two daemons sharing a start cgroup need
    /// different names (`agentd-<instance id>`). Idempotent.
    pub fn discover(
        root: &Path,
        self_cgroup: &str,
        subtree: &str,
    ) -> Result<CgroupTree, CgroupError> {
        Self::discover_with(
            Arc::new(RealCgroupFs),
            root,
            self_cgroup,
            subtree,
            std::process::id(),
        )
    }

    /// [`Self::discover`] with the kernel operations and this process's pid
    /// given (for tests, a fake root).
    pub fn discover_with(
        cfs: Arc<dyn CgroupFs>,
        root: &Path,
        self_cgroup: &str,
        subtree: &str,
        self_pid: u32,
    ) -> Result<CgroupTree, CgroupError> {
        layout::check_name(subtree)?;
        let lines = layout::parse_self_cgroup(self_cgroup)?;
        let mode = layout::detect_mode(root, &lines)?;
        let mut dirs = Vec::new();
        let mut moved = None;
        if mode != Mode::Unified {
            dirs.extend(v1_subtrees(&*cfs, root, &lines, subtree)?);
        }
        if let Some(line) = lines.iter().find(|l| l.is_v2()) {
            match mode {
                Mode::Legacy => {}
                Mode::Hybrid => {
                    let start_dir = start_dir(&root.join(HYBRID_UNIFIED_DIR), &line.path)?;
                    let tree = start_dir.join(subtree);
                    fs::mkdir_existing_ok(&*cfs, &tree)?;
                    dirs.push(CgroupDir {
                        version: Version::V2,
                        controllers: Vec::new(),
                        path: tree,
                    });
                }
                Mode::Unified => {
                    let start = v2_start(&line.path, subtree);
                    let start_dir = start_dir(root, &start)?;
                    let at_root = start_dir == root;
                    let prepared =
                        v2::prepare_subtree(&*cfs, &start_dir, at_root, subtree, self_pid)?;
                    moved = prepared.moved;
                    dirs.push(CgroupDir {
                        version: Version::V2,
                        controllers: prepared.controllers,
                        path: prepared.tree,
                    });
                }
            }
        }
        if dirs.is_empty() {
            return Err(CgroupError::NoHierarchy {
                root: root.to_owned(),
                reason: "none of memory, pids, cpu, cpuacct, freezer or a v2 tree is mounted"
                    .into(),
            });
        }
        tracing::info!(?mode, subtree, dirs = ?dirs.iter().map(|d| &d.path).collect::<Vec<_>>(), "cgroup subtree ready");
        Ok(CgroupTree {
            mode,
            subtree: subtree.to_owned(),
            dirs,
            cfs,
            moved,
            self_pid,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn subtree_name(&self) -> &str {
        &self.subtree
    }

    /// Our subtree's directory in each hierarchy.
    pub fn dirs(&self) -> &[CgroupDir] {
        &self.dirs
    }

    /// Makes the cgroups of sandbox `id` in every hierarchy and applies
    /// `limits`. Refuses a limit whose controller this host does not give
    /// us, and an id that already has cgroups.
    pub fn create(&self, id: &str, limits: &Limits) -> Result<SandboxCgroup, CgroupError> {
        self.check_controllers(limits)?;
        let sb = self.open(id)?;
        sb.make(limits)?;
        tracing::debug!(id, "sandbox cgroup created");
        Ok(sb)
    }

    /// Refuses a limit whose controller this host does not give us.
    fn check_controllers(&self, limits: &Limits) -> Result<(), CgroupError> {
        let needs = [
            ("memory", "memory", limits.memory_bytes().is_some()),
            ("pids", "pids", limits.pids_max().is_some()),
            ("cpu", "cpu", limits.cpus().is_some()),
        ];
        for (limit, controller, wanted) in needs {
            if wanted && !self.dirs.iter().any(|d| d.has(controller)) {
                return Err(CgroupError::ControllerUnavailable {
                    limit,
                    controller,
                    path: self.dirs[0].path.clone(),
                });
            }
        }
        Ok(())
    }

    /// Makes the spare ([`SPARE_LEAF`]) in every v1 hierarchy, for a worker
    /// to wait in until [`Self::create_from`] renames it into the next
    /// sandbox's: putting a process into a v1 cgroup takes the kernel's
    /// cgroup lock for writing, which waits for an RCU grace period (up to
    /// ~20 ms on a busy VM) when no move happened for a while; a process
    /// born in a cgroup (or renamed with it) waits for nothing. `None` where
    /// there is no v1 hierarchy: on v2 a sandbox's PID 1 starts in its
    /// cgroup (`CLONE_INTO_CGROUP`). An old spare is replaced.
    pub fn spare(&self) -> Result<Option<SandboxCgroup>, CgroupError> {
        let dirs: Vec<CgroupDir> = self
            .dirs
            .iter()
            .filter(|d| d.version == Version::V1)
            .map(|d| CgroupDir { version: d.version, controllers: d.controllers.clone(), path: d.path.join(SPARE_LEAF) })
            .collect();
        if dirs.is_empty() {
            return Ok(None);
        }
        let spare = SandboxCgroup::new(SPARE_LEAF.to_owned(), self.mode, dirs, self.cfs.clone());
        // An old one (a crashed daemon's, or one whose worker went away):
        // nothing of it is needed.
        let _ = spare.kill();
        spare.remove()?;
        spare.make(&Limits::unlimited())?;
        Ok(Some(spare))
    }

    /// As [`Self::create`], with the v1 directories taken from `spare`
    /// (renamed, with the worker waiting in them) rather than made.
    pub fn create_from(&self, spare: &SandboxCgroup, id: &str, limits: &Limits) -> Result<SandboxCgroup, CgroupError> {
        self.check_controllers(limits)?;
        let sb = self.open(id)?;
        sb.make_from(Some(spare), limits)?;
        tracing::debug!(id, "sandbox cgroup created from the spare");
        Ok(sb)
    }

    /// The cgroups of sandbox `id`, made earlier (by this daemon or one
    /// before it). Nothing is checked on disk.
    pub fn open(&self, id: &str) -> Result<SandboxCgroup, CgroupError> {
        layout::check_sandbox_id(id)?;
        let dirs = self
            .dirs
            .iter()
            .map(|d| CgroupDir {
                version: d.version,
                controllers: d.controllers.clone(),
                path: d.path.join(id),
            })
            .collect();
        Ok(SandboxCgroup::new(
            id.to_owned(),
            self.mode,
            dirs,
            self.cfs.clone(),
        ))
    }

    /// The ids that have a cgroup directory under our subtree, in any
    /// hierarchy (the daemon's own leaf and the spare excluded).
    pub fn sandbox_ids(&self) -> Result<Vec<String>, CgroupError> {
        let mut ids = BTreeSet::new();
        for d in &self.dirs {
            for child in fs::subdirs(&d.path)? {
                if let Some(name) = child.file_name().and_then(|n| n.to_str())
                    && name != DAEMON_LEAF
                    && name != SPARE_LEAF
                {
                    ids.insert(name.to_owned());
                }
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// Kills and removes every sandbox cgroup under our subtree, as a
    /// crashed daemon leaves them. Call at start, before creating any.
    pub fn clean_leftovers(&self) -> LeftoverReport {
        self.clean_leftovers_except(&[])
    }

    /// As [`Self::clean_leftovers`], but for the sandboxes in `keep`: those a
    /// restarted node took back (live restore), whose processes run on.
    pub fn clean_leftovers_except(&self, keep: &[String]) -> LeftoverReport {
        let mut report = LeftoverReport::default();
        let ids = match self.sandbox_ids() {
            Ok(ids) => ids,
            Err(e) => {
                report.failed.push((String::new(), e));
                return report;
            }
        };
        for id in ids.into_iter().filter(|id| !keep.contains(id)) {
            let result = self.open(&id).and_then(|sb| {
                sb.kill()?;
                sb.remove()
            });
            match result {
                Ok(()) => {
                    tracing::info!(id, "removed leftover sandbox cgroup");
                    report.removed.push(id);
                }
                Err(e) => {
                    tracing::warn!(id, error = %e, "cannot remove leftover sandbox cgroup");
                    report.failed.push((id, e));
                }
            }
        }
        report
    }

    /// Removes our subtree, whose sandboxes must be gone, from every
    /// hierarchy: at the daemon's clean stop and at the end of a `sandbox
    /// run`. On pure v2, where the daemon moved itself into its leaf, it
    /// first puts the start cgroup back as it found it and moves the daemon
    /// back there ([`v2::MovedOut::restore`]); when another subtree in the
    /// start cgroup still needs its controllers, the daemon stays in its
    /// leaf, which stays too. Fails with `Busy` while another process is
    /// inside, or (on v2, untouched) while a sandbox cgroup is left.
    pub fn remove_subtree(&self) -> Result<(), CgroupError> {
        if let Some(moved) = &self.moved
            && let Some(v2) = self.dirs.iter().find(|d| d.version == Version::V2)
        {
            // A sandbox cgroup left (its removal failed) would lose its
            // limits with the controllers: leave everything as it is.
            if let Some(left) = self.sandbox_ids()?.first() {
                return Err(CgroupError::Busy { path: v2.path.join(left), waited_ms: 0 });
            }
            moved.restore(&*self.cfs, &v2.path, &v2.controllers, self.self_pid)?;
        }
        let now = Instant::now();
        for d in &self.dirs {
            fs::remove_tree(&*self.cfs, &d.path, now, now)?;
        }
        Ok(())
    }
}

/// `<start>/<subtree>` in each v1 hierarchy we use, made if missing.
fn v1_subtrees(
    cfs: &dyn CgroupFs,
    root: &Path,
    lines: &[SelfCgroup],
    subtree: &str,
) -> Result<Vec<CgroupDir>, CgroupError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for &controller in V1_CONTROLLERS {
        let Some(line) = lines
            .iter()
            .find(|l| !l.is_v2() && l.controllers.iter().any(|c| c == controller))
        else {
            tracing::debug!(controller, "no v1 hierarchy for controller");
            continue;
        };
        if !seen.insert(line.hierarchy) {
            continue; // co-mounted with one already done (cpu,cpuacct)
        }
        let Some(mount) = layout::v1_mount(root, line, controller) else {
            tracing::warn!(controller, root = %root.display(), "v1 hierarchy not mounted under the root");
            continue;
        };
        let tree = start_dir(&mount, &line.path)?.join(subtree);
        fs::mkdir_existing_ok(cfs, &tree)?;
        out.push(CgroupDir {
            version: Version::V1,
            controllers: line
                .controllers
                .iter()
                .filter(|c| !c.starts_with("name="))
                .cloned()
                .collect(),
            path: tree,
        });
    }
    Ok(out)
}

/// The start cgroup's directory under `mount`, which must exist.
fn start_dir(mount: &Path, start: &Path) -> Result<PathBuf, CgroupError> {
    let dir = layout::under(mount, start)?;
    if !dir.is_dir() {
        return Err(CgroupError::StartCgroupMissing { path: dir });
    }
    Ok(dir)
}

/// The v2 start cgroup: where `/proc/self/cgroup` says, unless that is
/// already our own daemon leaf `<start>/<subtree>/daemon` (a second
/// discovery in the same process, or a re-exec), whose grandparent it is.
fn v2_start(path: &Path, subtree: &str) -> PathBuf {
    let mut it = path.iter().rev();
    if it.next().is_some_and(|n| n == DAEMON_LEAF)
        && it.next().is_some_and(|n| n == subtree)
        && let Some(start) = path.parent().and_then(Path::parent)
    {
        return start.to_owned();
    }
    path.to_owned()
}
