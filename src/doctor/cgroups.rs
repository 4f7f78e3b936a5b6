//! cgroups: the mode (agentd-cgroups' own detection), and which controllers
//! a node started where doctor runs could use, found as the node finds them
//! (`CgroupTree::discover`) but without making its subtree: the only cgroup
//! written is a throwaway child of each start cgroup ([`Probe`]), made to
//! see whether the node could make its own there and which files the kernel
//! gives a new cgroup, and removed at once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use agentd_cgroups::layout::{self, HYBRID_UNIFIED_DIR, Mode, SelfCgroup, V2_CONTROLLERS};

use super::Row;

/// The controllers whose rows doctor prints, in order.
const CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "freezer"];

const DELEGATE: &str = "start agentd in a cgroup of its own that it may write: its systemd unit with Delegate=yes, or `systemd-run --scope -p Delegate=yes agentd up`";

/// A child cgroup made to look at, removed when dropped.
struct Probe {
    dir: PathBuf,
}

impl Probe {
    fn make(parent: &Path) -> std::io::Result<Probe> {
        let dir = parent.join(format!("agentd-doctor-{}", std::process::id()));
        match std::fs::create_dir(&dir) {
            // An earlier doctor of the same pid that was killed mid-check:
            // the name is ours.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                std::fs::remove_dir(&dir)?;
                std::fs::create_dir(&dir)?;
            }
            other => other?,
        }
        Ok(Probe { dir })
    }

    fn has(&self, file: &str) -> bool {
        self.dir.join(file).is_file()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // Empty (nothing was put in it): the kernel removes it at once.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The rows for the host whose cgroups are mounted at `root`, for a process
/// whose `/proc/self/cgroup` reads `self_cgroup`.
pub fn check(root: &Path, self_cgroup: &str, self_pid: u32) -> Vec<Row> {
    let found = layout::parse_self_cgroup(self_cgroup).and_then(|lines| Ok((layout::detect_mode(root, &lines)?, lines)));
    let (mode, lines) = match found {
        Ok(found) => found,
        Err(e) => return vec![Row::fail("cgroup.mode", e.to_string(), "mount cgroups at /sys/fs/cgroup (v2, or v1 with the memory, pids and cpu controllers)")],
    };
    match mode {
        Mode::Legacy | Mode::Hybrid => v1_rows(root, mode, &lines),
        Mode::Unified => v2_rows(root, &lines, self_pid),
    }
}

/// What a v2 start cgroup's throwaway child has.
struct V2Files {
    kill: bool,
    freeze: bool,
}

fn v1_rows(root: &Path, mode: Mode, lines: &[SelfCgroup]) -> Vec<Row> {
    let mut rows = Vec::new();
    // Hybrid: the controller-less v2 tree, where the node makes each
    // sandbox's cgroup for kill and freeze.
    let v2 = match (mode, lines.iter().find(|l| l.is_v2())) {
        (Mode::Hybrid, Some(line)) => {
            rows.push(Row::ok("cgroup.mode", format!("hybrid: v1 controllers, a controller-less v2 tree at {}", root.join(HYBRID_UNIFIED_DIR).display())));
            match probe_v2(&root.join(HYBRID_UNIFIED_DIR), &line.path) {
                Ok((_, files)) => Some(files),
                Err(row) => {
                    rows.push(row);
                    None
                }
            }
        }
        _ => {
            rows.push(Row::ok("cgroup.mode", "v1 (legacy): controllers on v1 hierarchies only"));
            None
        }
    };
    for &controller in CONTROLLERS {
        let name = format!("cgroup.{controller}");
        if controller == "freezer" && v2.as_ref().is_some_and(|f| f.freeze) {
            rows.push(Row::ok(name, "v2 cgroup.freeze in the hybrid layout's v2 tree"));
            continue;
        }
        let Some(line) = lines.iter().find(|l| !l.is_v2() && l.controllers.iter().any(|c| c == controller)) else {
            rows.push(Row::warn(name, "no v1 hierarchy for it", format!("mount the {controller} controller; until then {}", lost(controller))));
            continue;
        };
        let Some(mount) = layout::v1_mount(root, line, controller) else {
            rows.push(Row::warn(name, format!("in /proc/self/cgroup but not mounted under {}", root.display()), format!("mount it under {}; until then {}", root.display(), lost(controller))));
            continue;
        };
        rows.push(match start_dir(&mount, &line.path).and_then(|start| probe_v1(&start).map(|()| start)) {
            Ok(start) => Row::ok(name, format!("v1 at {}: a child cgroup was made and removed", start.display())),
            Err(why) => Row::fail(name, why, DELEGATE),
        });
    }
    rows.push(match (mode, &v2) {
        (_, Some(files)) if files.kill => Row::ok("cgroup.kill", "cgroup.kill in the hybrid layout's v2 tree: a sandbox dies at once"),
        (Mode::Hybrid, _) => Row::warn("cgroup.kill", "no cgroup.kill in the v2 tree: a sandbox is frozen and killed process by process", "run Linux 5.14 or newer"),
        _ => Row::warn("cgroup.kill", "no v2 tree: a sandbox is frozen and killed process by process", "mount the v2 hierarchy too (hybrid or unified cgroups) on Linux 5.14 or newer"),
    });
    rows
}

fn v2_rows(root: &Path, lines: &[SelfCgroup], self_pid: u32) -> Vec<Row> {
    let Some(line) = lines.iter().find(|l| l.is_v2()) else {
        return vec![Row::fail("cgroup.mode", "v2, but no v2 line in /proc/self/cgroup", DELEGATE)];
    };
    let mut rows = vec![Row::ok("cgroup.mode", format!("v2 (unified), started in {}", line.path.display()))];
    let (start, files) = match probe_v2(root, &line.path) {
        Ok(found) => found,
        Err(row) => {
            rows.push(Row { check: "cgroup.delegation".into(), ..row });
            return rows;
        }
    };
    let read = |file: &str| std::fs::read_to_string(start.join(file)).unwrap_or_default();
    let available: BTreeSet<String> = read("cgroup.controllers").split_whitespace().map(str::to_owned).collect();
    let enabled: BTreeSet<String> = read("cgroup.subtree_control").split_whitespace().map(str::to_owned).collect();
    let at_root = start == root;
    let missing: Vec<&str> = V2_CONTROLLERS.iter().copied().filter(|c| available.contains(*c) && !enabled.contains(*c)).collect();
    let others: Vec<u32> = read("cgroup.procs").split_whitespace().filter_map(|p| p.parse().ok()).filter(|&p| p != self_pid).collect();
    let shown = start.display();
    rows.push(if at_root {
        Row::ok("cgroup.delegation", format!("started at the hierarchy's root: children get what it enables ({})", join(&enabled)))
    } else if missing.is_empty() {
        Row::ok("cgroup.delegation", format!("{shown} is writable and hands its children {}", join(&enabled)))
    } else if !others.is_empty() {
        // The node moves itself into a leaf, then enables the controllers in
        // the start cgroup: the kernel refuses that while other processes
        // stay there ("no internal processes").
        let pids: Vec<String> = others.iter().take(5).map(u32::to_string).collect();
        Row::fail(
            "cgroup.delegation",
            format!("{shown} holds {} other process(es) (pid {}): agentd could not enable {} there", others.len(), pids.join(", "), missing.join(", ")),
            DELEGATE,
        )
    } else if nix::unistd::access(&start.join("cgroup.subtree_control"), nix::unistd::AccessFlags::W_OK).is_err() {
        Row::fail("cgroup.delegation", format!("{shown}/cgroup.subtree_control is not writable: agentd could not enable {}", missing.join(", ")), DELEGATE)
    } else {
        Row::ok("cgroup.delegation", format!("{shown} is writable; agentd will move into a leaf and enable {}", missing.join(", ")))
    });
    for &controller in CONTROLLERS {
        let name = format!("cgroup.{controller}");
        rows.push(match controller {
            "freezer" if files.freeze => Row::ok(name, "v2 cgroup.freeze"),
            "freezer" => Row::warn(name, "no cgroup.freeze in a new cgroup", format!("run Linux 5.2 or newer; until then {}", lost(controller))),
            _ if at_root && !enabled.contains(controller) => {
                Row::warn(name, "not enabled in the root's cgroup.subtree_control", format!("echo +{controller} > {}/cgroup.subtree_control; until then {}", root.display(), lost(controller)))
            }
            _ if available.contains(controller) => Row::ok(name, format!("v2, available in {shown}")),
            _ => Row::warn(name, format!("not delegated to {shown}"), format!("{DELEGATE}; until then {}", lost(controller))),
        });
    }
    rows.push(if files.kill {
        Row::ok("cgroup.kill", "cgroup.kill: a sandbox dies at once")
    } else {
        Row::warn("cgroup.kill", "no cgroup.kill in a new cgroup: a sandbox is frozen and killed process by process", "run Linux 5.14 or newer")
    });
    rows
}

/// Makes and removes a throwaway child of a v1 start cgroup.
fn probe_v1(start: &Path) -> Result<(), String> {
    Probe::make(start).map(drop).map_err(|e| can_not_make(start, e))
}

/// Makes and removes a throwaway child of the v2 start cgroup `path` under
/// `mount`: the start cgroup's directory and what a new cgroup has, or a
/// failed row.
fn probe_v2(mount: &Path, path: &Path) -> Result<(PathBuf, V2Files), Row> {
    let start = start_dir(mount, path).map_err(|why| Row::fail("cgroup.v2", why, DELEGATE))?;
    let probe = Probe::make(&start).map_err(|e| Row::fail("cgroup.v2", can_not_make(&start, e), DELEGATE))?;
    let files = V2Files { kill: probe.has("cgroup.kill"), freeze: probe.has("cgroup.freeze") };
    Ok((start, files))
}

/// The start cgroup's directory under `mount`, which must exist.
fn start_dir(mount: &Path, path: &Path) -> Result<PathBuf, String> {
    let dir = layout::under(mount, path).map_err(|e| e.to_string())?;
    if dir.is_dir() { Ok(dir) } else { Err(format!("the start cgroup {} does not exist", dir.display())) }
}

fn can_not_make(start: &Path, e: std::io::Error) -> String {
    format!("cannot make a cgroup in {}: {e}", start.display())
}

/// What a node without `controller` loses.
fn lost(controller: &str) -> &'static str {
    match controller {
        "memory" => "memory limits are refused",
        "pids" => "process-count limits are refused",
        "cpu" => "cpu limits are refused",
        _ => "sandboxes cannot be hibernated",
    }
}

fn join(set: &BTreeSet<String>) -> String {
    if set.is_empty() { "no controller".into() } else { set.iter().cloned().collect::<Vec<_>>().join(" ") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    fn status<'a>(rows: &'a [Row], check: &str) -> (&'a Status, &'a str) {
        let row = rows.iter().find(|r| r.check == check).unwrap_or_else(|| panic!("no {check} row: {rows:?}"));
        (&row.status, &row.found)
    }

    /// A fake pure-v2 root whose start cgroup `/svc` has `controllers`,
    /// enables `enabled` and holds `procs`.
    fn v2_root(controllers: &str, enabled: &str, procs: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.procs"), "").unwrap();
        let start = root.path().join("svc");
        std::fs::create_dir(&start).unwrap();
        std::fs::write(start.join("cgroup.controllers"), controllers).unwrap();
        std::fs::write(start.join("cgroup.subtree_control"), enabled).unwrap();
        std::fs::write(start.join("cgroup.procs"), procs).unwrap();
        root
    }

    fn left_probes(root: &Path) -> Vec<PathBuf> {
        let mut left = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            // Other processes' cgroups come and go while we walk.
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for e in entries.flatten() {
                if e.path().is_dir() {
                    if e.file_name().to_string_lossy().starts_with("agentd-doctor-") {
                        left.push(e.path());
                    }
                    stack.push(e.path());
                }
            }
        }
        left
    }

    #[test]
    fn v2_with_other_processes_in_the_start_cgroup_cannot_enable_controllers() {
        let root = v2_root("cpu memory pids io", "", "41\n42\n7\n");
        let rows = check(root.path(), "0::/svc\n", 7);
        let (st, found) = status(&rows, "cgroup.delegation");
        assert_eq!(*st, Status::Fail, "{found}");
        assert!(found.contains("2 other process(es) (pid 41, 42)") && found.contains("cpu, memory, pids"), "{found}");
        assert!(left_probes(root.path()).is_empty(), "the probe is removed");
    }

    #[test]
    fn v2_delegated_subtree_lists_its_controllers() {
        let root = v2_root("memory pids", "memory pids", "");
        let rows = check(root.path(), "0::/svc\n", 7);
        assert_eq!(*status(&rows, "cgroup.delegation").0, Status::Ok);
        assert_eq!(*status(&rows, "cgroup.memory").0, Status::Ok);
        assert_eq!(*status(&rows, "cgroup.pids").0, Status::Ok);
        let (st, found) = status(&rows, "cgroup.cpu");
        assert_eq!((st, found), (&Status::Warn, format!("not delegated to {}", root.path().join("svc").display()).as_str()));
        // A plain directory has no cgroup.kill: what an old kernel shows.
        assert_eq!(*status(&rows, "cgroup.kill").0, Status::Warn);
        assert!(left_probes(root.path()).is_empty());
    }

    #[test]
    fn v2_alone_in_its_start_cgroup_may_enable_controllers() {
        let root = v2_root("cpu memory pids", "", "7\n");
        let rows = check(root.path(), "0::/svc\n", 7);
        let (st, found) = status(&rows, "cgroup.delegation");
        assert_eq!(*st, Status::Ok, "{found}");
        assert!(found.contains("will move into a leaf and enable cpu, memory, pids"), "{found}");
    }

    #[test]
    fn a_missing_start_cgroup_or_mode_fails() {
        let root = v2_root("", "", "");
        let rows = check(root.path(), "0::/gone\n", 7);
        assert_eq!(*status(&rows, "cgroup.delegation").0, Status::Fail);
        let rows = check(root.path(), "", 7);
        assert_eq!(*status(&rows, "cgroup.mode").0, Status::Fail);
    }

    #[test]
    fn hybrid_probes_every_v1_hierarchy_and_the_v2_tree() {
        let root = tempfile::tempdir().unwrap();
        for dir in ["memory/job", "pids", "cpu,cpuacct", "unified"] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        std::fs::write(root.path().join("unified/cgroup.procs"), "").unwrap();
        let text = "5:pids:/\n4:memory:/job\n2:cpu,cpuacct:/\n0::/\n";
        let rows = check(root.path(), text, 7);
        assert!(status(&rows, "cgroup.mode").1.starts_with("hybrid"));
        for ok in ["cgroup.memory", "cgroup.pids", "cgroup.cpu"] {
            assert_eq!(*status(&rows, ok).0, Status::Ok, "{rows:?}");
        }
        assert!(status(&rows, "cgroup.memory").1.contains("memory/job"));
        assert_eq!(*status(&rows, "cgroup.freezer").0, Status::Warn, "no freezer hierarchy, no cgroup.freeze");
        assert!(left_probes(root.path()).is_empty());
    }

    #[test]
    fn this_host_leaves_no_probe_behind() {
        let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else { return };
        let rows = check(Path::new("/sys/fs/cgroup"), &text, std::process::id());
        assert!(rows.iter().any(|r| r.check == "cgroup.mode"), "{rows:?}");
        assert!(left_probes(Path::new("/sys/fs/cgroup")).iter().all(|p| !p.ends_with(format!("agentd-doctor-{}", std::process::id()))));
    }
}
