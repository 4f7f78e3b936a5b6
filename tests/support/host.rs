//! What a test checks on the host once agentd is done with something:
//! cgroups (every hierarchy under /sys/fs/cgroup), processes by host uid,
//! zombies. Read from the cgroup file system and /proc, never from agentd.

use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use super::procfs;

/// Orphans come to this process (a subreaper) rather than to the host's
/// init, which may not reap: a sandbox's PID 1 once its node is killed, the
/// old zygote.
pub fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
}

/// Reaps the zombies among this process's children but agentd's own
/// processes (their `Child` handles reap them).
pub fn reap_orphans() {
    for zombie in zombie_children(std::process::id()) {
        if procfs::status_field(zombie, "Name").is_some_and(|n| n != "agentd-daemon") {
            let _ = waitpid(Pid::from_raw(zombie as i32), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// cgroup directories whose path contains `needle`, in every hierarchy.
pub fn cgroup_dirs(needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let path = e.path();
                if path.to_string_lossy().contains(needle) {
                    found.push(path.clone());
                }
                stack.push(path);
            }
        }
    }
    found
}

/// Sandbox cgroups a node made: the directories below its subtree (named
/// `subtree`) in any hierarchy, but the daemon's own leaf on pure v2 hosts
/// and the spare the next sandbox's are made from on v1 ones.
pub fn sandbox_cgroups(subtree: &str) -> Vec<PathBuf> {
    cgroup_dirs(subtree)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != subtree && n != "daemon" && n != "spare"))
        .collect()
}

/// Waits until no cgroup directory's path contains `needle` (the node removes
/// a deleted sandbox's cgroups after it answers).
pub async fn wait_no_cgroups(needle: &str) {
    wait_empty(|| cgroup_dirs(needle)).await
}

/// Waits until the node's subtree `subtree` holds no sandbox cgroup.
pub async fn wait_no_sandbox_cgroups(subtree: &str) {
    wait_empty(|| sandbox_cgroups(subtree)).await
}

async fn wait_empty(list: impl Fn() -> Vec<PathBuf>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = list();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "cgroups left: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real, effective, saved and file-system uids of `pid`, as the host sees them.
pub fn uids(pid: u32) -> Vec<u32> {
    procfs::status_field(pid, "Uid").map(|u| u.split_whitespace().filter_map(|v| v.parse().ok()).collect()).unwrap_or_default()
}

/// Live processes (zombies included) whose real uid falls in `range`.
pub fn processes_with_uid(range: &Range<u32>) -> Vec<(u32, u32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| Some((pid, *uids(pid).first()?)))
        .filter(|(_, uid)| range.contains(uid))
        .collect()
}

/// Children of `pid` that are zombies (exited, not reaped).
pub fn zombie_children(pid: u32) -> Vec<u32> {
    procfs::children(pid).into_iter().filter(|c| procfs::status_field(*c, "State").is_some_and(|s| s.starts_with('Z'))).collect()
}

/// A host uid base no other test's sandboxes use: above the node's default
/// ranges (from 1000000), below the hostile suite's (from 900000000) and
/// `sandbox run`'s (from 1000000000); picked by this test process's pid, so
/// checks by uid see only this test's few sandboxes.
pub fn unique_id_base() -> u32 {
    100_000_000 + (std::process::id() % 750) * 1_000_000
}

/// The text of a cgroup control file of `pid`'s cgroup in the hierarchy
/// whose `/proc/<pid>/cgroup` line lists `controller` (v1), or in the v2
/// tree when no v1 hierarchy has it.
pub fn cgroup_file(pid: u32, controller: &str, file: &str) -> Option<String> {
    let lines = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut v2 = None;
    for line in lines.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == controller) {
            let mount = controllers.split(',').filter(|c| !c.starts_with("name=")).collect::<Vec<_>>().join(",");
            let dir = PathBuf::from("/sys/fs/cgroup").join(mount).join(path.trim_start_matches('/'));
            // cpu and cpuacct may be mounted under either name.
            let dir = if dir.exists() { dir } else { PathBuf::from("/sys/fs/cgroup").join(controller).join(path.trim_start_matches('/')) };
            return std::fs::read_to_string(dir.join(file)).ok();
        }
    }
    let path = v2?;
    std::fs::read_to_string(PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/')).join(file)).ok()
}

/// Stops whatever a failed test left of a node: the processes in its cgroup
/// subtree (`subtree`, in every hierarchy) and the PID 1s its records under
/// `sandboxes` name, killed and, where they come back to this process,
/// reaped; then its cgroup directories, deepest first. With live restore a
/// node's stop leaves its sandboxes running by design, so a test that fails
/// before deleting them must not leave them behind. Harmless when nothing
/// is left.
pub fn kill_leftovers(sandboxes: &std::path::Path, subtree: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let in_cgroups = || -> Vec<i32> {
        cgroup_dirs(subtree)
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<i32>>())
            .collect()
    };
    let recorded: Vec<i32> = std::fs::read_dir(sandboxes)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|d| std::fs::read(d.path().join("sandbox.json")).ok())
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r).ok()?["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: Vec<i32> = in_cgroups();
        for pid in left.iter().chain(&recorded) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        for zombie in zombie_children(std::process::id()) {
            if procfs::status_field(zombie, "Name").is_some_and(|n| n != "agentd-daemon") {
                let _ = nix::sys::wait::waitpid(Pid::from_raw(zombie as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            }
        }
        if left.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut dirs = cgroup_dirs(subtree);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}
