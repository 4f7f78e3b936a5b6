//! cgroup v2: through libcgroups' v2 manager where it fits, by hand where it
//! does not.
//!
//! libcgroups' `v2::manager::Manager::new(root, path)` takes its root as a
//! parameter, so we hand it our own subtree directory as the "root" and the
//! sandbox id as the path. It then applies limits (`memory.max`, `pids.max`,
//! `cpu.max` from OCI resources), freezes and thaws (`cgroup.freeze`, waiting
//! for `frozen 1` in `cgroup.events`) and attaches pids. On the hybrid layout's controller-less v2 tree the same
//! manager freezes and attaches.
//!
//! By hand, each for a reason:
//! - `memory.swap.max = 0` (`apply`): libcgroups turns OCI's memory+swap
//!   into `swap - limit` and does not write it when that is 0.
//! - enabling controllers (`prepare_subtree`): the manager would write
//!   `cgroup.subtree_control` in every ancestor up to the mount's root, i.e.
//!   in cgroups we did not make; we write only in the start cgroup (delegated
//!   to us) and in our own subtree, and move the daemon to a leaf first.
//! - `cgroup.kill` (`kill`): libcgroups only writes it inside `remove()`,
//!   together with a short rmdir retry; we kill and remove at different
//!   times (removal may wait until after the client has its answer).
//! - stats (`memory`, `cpu_usage_usec`, `oom_kills`): the manager's
//!   `stats()` also reads hugetlb, io, swap and PSI files and fails on hosts
//!   where one of those is missing; we read only the numbers we report.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use libcgroups::common::{CgroupManager, ControllerOpt, FreezerState};
use libcgroups::v2::manager::Manager;

use super::error::CgroupError;
use super::fs::{self, CgroupFs};
use super::layout::{DAEMON_LEAF, V2_CONTROLLERS};
use super::limits::Limits;

/// libcgroups' manager for the v2 cgroup `dir`, rooted at its parent (our
/// subtree), so that nothing it does can reach above our subtree.
fn manager(dir: &Path) -> Result<Manager, CgroupError> {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return Err(CgroupError::InvalidName {
            name: dir.display().to_string(),
            reason: "not a cgroup below our subtree",
        });
    };
    Manager::new(parent.to_owned(), PathBuf::from(name)).map_err(|e| CgroupError::lib(dir, e))
}

/// Applies `limits` to the v2 cgroup `dir` through libcgroups. Swap is
/// limited to nothing where the kernel accounts it (`memory.swap.max`).
pub(crate) fn apply(dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
    // Swap is handled below, not through OCI's memory+swap: libcgroups
    // converts it to `memory.swap.max = swap - limit` but skips writing a
    // value of 0 (its "unset"), so "no swap" would leave swap unlimited.
    let resources = limits.to_oci();
    let opt = ControllerOpt {
        resources: &resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    };
    manager(dir)?
        .apply(&opt)
        .map_err(|e| CgroupError::lib(dir, e))?;
    if limits.memory_bytes().is_some() {
        disable_swap(dir)?;
    }
    Ok(())
}

/// `memory.swap.max = 0`: memory+swap = memory. The file exists only where
/// the kernel accounts swap; without it swap cannot be limited.
fn disable_swap(dir: &Path) -> Result<(), CgroupError> {
    let file = dir.join("memory.swap.max");
    if file.is_file() {
        fs::write(&file, "0")
    } else {
        tracing::warn!(path = %dir.display(), "no memory.swap.max: swap is not limited");
        Ok(())
    }
}

/// Moves `pid` into the v2 cgroup `dir` (which exists).
pub(crate) fn add(dir: &Path, pid: u32) -> Result<(), CgroupError> {
    let pid = i32::try_from(pid).map_err(|_| CgroupError::Parse {
        path: dir.join("cgroup.procs"),
        what: "pid",
        content: pid.to_string(),
    })?;
    manager(dir)?
        .add_task(nix029::unistd::Pid::from_raw(pid))
        .map_err(|e| CgroupError::lib(dir, e))
}

/// Whether `dir` has a v2 freezer (Linux 5.2+; never at a root).
pub(crate) fn can_freeze(dir: &Path) -> bool {
    dir.join("cgroup.freeze").is_file()
}

/// Freezes `dir` and waits until the kernel says `frozen 1`. On failure the
/// cgroup is thawed again.
pub(crate) fn freeze(dir: &Path) -> Result<(), CgroupError> {
    let m = manager(dir)?;
    m.freeze(FreezerState::Frozen).map_err(|e| {
        let _ = m.freeze(FreezerState::Thawed);
        CgroupError::lib(dir, e)
    })
}

pub(crate) fn thaw(dir: &Path) -> Result<(), CgroupError> {
    manager(dir)?
        .freeze(FreezerState::Thawed)
        .map_err(|e| CgroupError::lib(dir, e))
}

/// Kills every process in `dir` and below at once through `cgroup.kill`
/// (Linux 5.14+). Returns false, having done nothing, if there is none.
pub(crate) fn kill(dir: &Path) -> Result<bool, CgroupError> {
    let file = dir.join("cgroup.kill");
    if !file.is_file() {
        return Ok(false);
    }
    fs::write(&file, "1")?;
    Ok(true)
}

/// Whether any process is in `dir` or below (`populated` of `cgroup.events`).
pub(crate) fn populated(dir: &Path) -> Result<Option<bool>, CgroupError> {
    Ok(fs::read_keyed(&dir.join("cgroup.events"), "populated", "populated")?.map(|v| v != 0))
}

/// Memory usage and limit, bytes.
pub(crate) fn memory(dir: &Path) -> Result<(u64, Option<u64>), CgroupError> {
    let current = fs::read_u64_or_max(&dir.join("memory.current"), "memory usage")?.unwrap_or(0);
    let max = fs::read_u64_or_max(&dir.join("memory.max"), "memory limit")?;
    Ok((current, max))
}

/// OOM kills in this cgroup and below (`oom_kill` in `memory.events`).
pub(crate) fn oom_kills(dir: &Path) -> Result<Option<u64>, CgroupError> {
    fs::read_keyed(&dir.join("memory.events"), "oom_kill", "oom kill count")
}

/// CPU time used, microseconds (`usage_usec` of `cpu.stat`, present in
/// every v2 cgroup, with or without the cpu controller).
pub(crate) fn cpu_usage_usec(dir: &Path) -> Result<Option<u64>, CgroupError> {
    fs::read_keyed(&dir.join("cpu.stat"), "usage_usec", "cpu usage")
}

/// `+cpu +memory`: one write enables them all, or none.
fn plus(controllers: &[&str]) -> String {
    controllers
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn controller_set(text: &str) -> BTreeSet<String> {
    text.split_whitespace()
        .map(|c| c.trim_start_matches('+').to_owned())
        .collect()
}

/// Prepares our subtree `<start>/<subtree>` on a pure v2 host so that its
/// children (the sandboxes) get the cpu, memory and pids controllers, and
/// returns the subtree's path with the controllers they will have.
///
/// The "no internal processes" rule: a cgroup that holds processes cannot
/// hand controllers to its children (the root excepted). The daemon starts
/// in `<start>` (with systemd `Delegate=yes`, its unit's cgroup), so before
/// enabling controllers there it moves itself into the leaf
/// `<start>/<subtree>/daemon`. Then `<start>` gets `+cpu +memory +pids` in
/// its `cgroup.subtree_control`, and so does `<start>/<subtree>`, which now
/// holds no process itself. The resulting tree:
///
/// ```text
/// <start>/                  subtree_control: cpu memory pids   (no process)
///   <subtree>/              subtree_control: cpu memory pids   (no process)
///     daemon/               the daemon (and its non-sandbox children)
///     <sandbox-id>/         one per sandbox, limits applied here
/// ```
///
/// At a hierarchy's root (`start` is `/`) we write nothing there: whatever
/// the root already enables is what we get, and the daemon stays put.
/// Writing the start cgroup's `cgroup.subtree_control` is the one write into
/// a cgroup we did not make: the delegated cgroup is ours to manage, and
/// [`leave`] puts it back as it was. A failure after the move (the start
/// cgroup holds other processes) moves the daemon back and removes what was
/// made, so a refused `agentd sandbox run --memory ...` from a shell leaves
/// the shell's cgroup as it found it.
pub(crate) fn prepare_subtree(
    cfs: &dyn CgroupFs,
    start_dir: &Path,
    start_is_root: bool,
    subtree: &str,
    self_pid: u32,
) -> Result<Prepared, CgroupError> {
    let available = controller_set(&fs::read(&start_dir.join("cgroup.controllers"))?);
    let wanted: Vec<&str> = V2_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| available.contains(*c))
        .collect();
    let start_control = start_dir.join("cgroup.subtree_control");
    let enabled = controller_set(&fs::read(&start_control)?);
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|c| !enabled.contains(*c))
        .collect();

    let tree = start_dir.join(subtree);
    fs::mkdir_existing_ok(cfs, &tree)?;

    let mut moved = None;
    let usable: Vec<&str> = if missing.is_empty() {
        wanted
    } else if start_is_root {
        tracing::warn!(
            root = %start_dir.display(),
            ?missing,
            "controllers not enabled at the hierarchy's root; limits needing them will be refused"
        );
        wanted
            .into_iter()
            .filter(|c| enabled.contains(*c))
            .collect()
    } else {
        let leaf = tree.join(DAEMON_LEAF);
        fs::mkdir_existing_ok(cfs, &leaf)?;
        let procs = leaf.join("cgroup.procs");
        cfs.attach(&procs, self_pid).map_err(|e| CgroupError::io("move the daemon into", procs, e))?;
        let out = MovedOut { start_dir: start_dir.to_owned(), enabled: missing.iter().map(|c| (*c).to_owned()).collect() };
        if let Err(e) = fs::write(&start_control, &plus(&missing)) {
            let e = match &e {
                CgroupError::Io { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => CgroupError::StartCgroupBusy {
                    path: start_dir.to_owned(),
                    pids: fs::procs(start_dir).unwrap_or_default(),
                },
                _ => e,
            };
            // Nothing was enabled: only the move and the directories to undo.
            abandon(cfs, &MovedOut { enabled: Vec::new(), ..out }, &tree, self_pid);
            return Err(e);
        }
        moved = Some(out);
        wanted
    };

    let hand_on = || {
        let tree_control = tree.join("cgroup.subtree_control");
        let tree_enabled = controller_set(&fs::read(&tree_control)?);
        let tree_missing: Vec<&str> = usable.iter().copied().filter(|c| !tree_enabled.contains(*c)).collect();
        if !tree_missing.is_empty() {
            fs::write(&tree_control, &plus(&tree_missing))?;
        }
        Ok(())
    };
    if let Err(e) = hand_on() {
        if let Some(out) = &moved {
            abandon(cfs, out, &tree, self_pid);
        }
        return Err(e);
    }
    Ok(Prepared { tree, controllers: usable.into_iter().map(str::to_owned).collect(), moved })
}

/// Undoes a [`prepare_subtree`] that failed after moving the daemon: puts
/// the start cgroup back and removes what was made, as far as it can.
fn abandon(cfs: &dyn CgroupFs, out: &MovedOut, tree: &Path, self_pid: u32) {
    // A controller handed on to the subtree's children can only have been
    // written in part; disabling all is harmless where none is enabled.
    let handed_on: Vec<String> = V2_CONTROLLERS.iter().map(|c| (*c).to_owned()).collect();
    if let Err(e) = out.restore(cfs, tree, &handed_on, self_pid).or_else(|_| out.restore(cfs, tree, &[], self_pid)) {
        tracing::warn!(error = %e, "cannot move back to the start cgroup");
        return;
    }
    let now = std::time::Instant::now();
    let _ = fs::remove_tree(cfs, tree, now, now);
}

/// What [`prepare_subtree`] made ready.
#[derive(Debug)]
pub(crate) struct Prepared {
    /// `<start>/<subtree>`.
    pub tree: PathBuf,
    /// The controllers the subtree's children get.
    pub controllers: Vec<String>,
    /// Set when the daemon moved itself out of the start cgroup.
    pub moved: Option<MovedOut>,
}

/// How to put the start cgroup back as the daemon found it.
#[derive(Debug, Clone)]
pub(crate) struct MovedOut {
    /// The cgroup the daemon started in.
    pub start_dir: PathBuf,
    /// The controllers the daemon enabled in its `cgroup.subtree_control`
    /// (those it found enabled stay).
    pub enabled: Vec<String>,
}

impl MovedOut {
    /// Undoes [`prepare_subtree`]'s writes, but for removing the subtree:
    /// the controllers handed to the subtree's children (`tree_enabled`) and
    /// those enabled at the start cgroup are disabled, deepest first (the
    /// kernel refuses to take a controller from a cgroup whose child still
    /// hands it on), then `pid` moves back into the start cgroup (which may
    /// hold processes again once it hands on no controller). Fails with the
    /// start cgroup untouched when another subtree there still uses one.
    pub fn restore(&self, cfs: &dyn CgroupFs, tree: &Path, tree_enabled: &[String], pid: u32) -> Result<(), CgroupError> {
        let minus = |controllers: &[String]| controllers.iter().map(|c| format!("-{c}")).collect::<Vec<_>>().join(" ");
        if !tree_enabled.is_empty() {
            fs::write(&tree.join("cgroup.subtree_control"), &minus(tree_enabled))?;
        }
        if !self.enabled.is_empty() {
            fs::write(&self.start_dir.join("cgroup.subtree_control"), &minus(&self.enabled))?;
        }
        let procs = self.start_dir.join("cgroup.procs");
        cfs.attach(&procs, pid).map_err(|e| CgroupError::io("move the daemon back into", procs, e))
    }
}
