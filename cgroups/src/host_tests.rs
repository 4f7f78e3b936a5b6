//! The cgroup layer for real, on this host's `/sys/fs/cgroup` (v1 or
//! hybrid; as root). Each test makes its own subtree
//! `agentd-test-<pid>-<name>` under the test process's own cgroups, touches
//! nothing else, and removes all it made even when an assertion fails
//! ([`Guard`]'s `Drop`).
//!
//! On a pure v2 host these tests are skipped: discovery there moves the
//! calling process into a leaf and needs a start cgroup without other
//! processes, which a test runner's cgroup is not.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::layout::{self, V1_CONTROLLERS};
use super::*;

const ROOT: &str = "/sys/fs/cgroup";

/// Owns what a test made: its children and its subtree. Dropping it kills
/// the children, kills and removes every sandbox cgroup of the subtree, then
/// the subtree, then sweeps any directory of that name left in any
/// hierarchy (a discovery that failed halfway).
struct Guard {
    subtree: String,
    self_cgroup: String,
    tree: Option<CgroupTree>,
    children: Vec<Child>,
}

impl Guard {
    /// Sets up a test subtree from this process's `/proc/self/cgroup`
    /// (`edit` may change the text first), or `None` where the test cannot
    /// run here.
    fn new(name: &str, edit: impl Fn(&str) -> String) -> Option<Guard> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: cgroup tests need root");
            return None;
        }
        let text = edit(&std::fs::read_to_string("/proc/self/cgroup").unwrap());
        let lines = layout::parse_self_cgroup(&text).unwrap();
        if layout::detect_mode(Path::new(ROOT), &lines).ok()? == Mode::Unified {
            eprintln!("skipped: pure cgroup v2 host (see the module doc)");
            return None;
        }
        let mut g = Guard {
            subtree: format!("agentd-test-{}-{name}", std::process::id()),
            self_cgroup: text,
            tree: None,
            children: Vec::new(),
        };
        g.tree = Some(CgroupTree::discover(Path::new(ROOT), &g.self_cgroup, &g.subtree).unwrap());
        Some(g)
    }

    fn tree(&self) -> &CgroupTree {
        self.tree.as_ref().unwrap()
    }

    /// Starts `sh -c script` with a pipe on stdin, kept for cleanup.
    fn spawn(&mut self, script: &str) -> usize {
        let child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    fn pid(&self, child: usize) -> u32 {
        self.children[child].id()
    }

    /// Lets a child waiting on `read go` proceed.
    fn go(&mut self, child: usize) {
        let stdin = self.children[child].stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits up to `timeout` for a child to end.
    fn wait(&mut self, child: usize, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.children[child].try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "child {} still running",
                self.pid(child)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every directory of our subtree's name the host could hold, whether
    /// or not discovery got that far.
    fn possible_subtrees(&self) -> Vec<PathBuf> {
        let root = Path::new(ROOT);
        let mut out = Vec::new();
        for line in layout::parse_self_cgroup(&self.self_cgroup).unwrap_or_default() {
            let mount = if line.is_v2() {
                Some(root.join(layout::HYBRID_UNIFIED_DIR))
            } else {
                line.controllers
                    .iter()
                    .find_map(|c| layout::v1_mount(root, &line, c))
            };
            if let Some(start) = mount.and_then(|m| layout::under(&m, &line.path).ok()) {
                out.push(start.join(&self.subtree));
            }
        }
        out
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(tree) = &self.tree {
            for id in tree.sandbox_ids().unwrap_or_default() {
                if let Ok(sb) = tree.open(&id) {
                    let _ = sb.kill();
                    if let Err(e) = sb.remove() {
                        eprintln!("cleanup: {e}");
                    }
                }
            }
            let _ = tree.remove_subtree();
        }
        // rmdir only removes empty cgroups, and the name is ours alone.
        for dir in self.possible_subtrees() {
            if dir.exists() {
                for child in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                    if child.path().is_dir() {
                        let _ = std::fs::remove_dir(child.path());
                    }
                }
                if let Err(e) = std::fs::remove_dir(&dir) {
                    eprintln!("cleanup: cannot remove {}: {e}", dir.display());
                }
            }
        }
    }
}

fn host() -> HostCapacity {
    HostCapacity::detect(Path::new("/proc")).unwrap()
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// Asserts that `pid` sits in the sandbox's cgroup in every hierarchy we
/// use, as `/proc/<pid>/cgroup` shows it.
fn assert_in_sandbox(pid: u32, sb: &SandboxCgroup, subtree: &str) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = Path::new(subtree).join(sb.id());
    let mut checked = 0;
    for line in layout::parse_self_cgroup(&text).unwrap() {
        let ours = if line.is_v2() {
            sb.v2_dir().is_some()
        } else {
            line.controllers
                .iter()
                .any(|c| V1_CONTROLLERS.contains(&c.as_str()))
        };
        if ours {
            assert!(
                line.path.ends_with(&want),
                "pid {pid}: {line:?} not in {want:?}\n{text}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, sb.dirs().len(), "{text}");
}

#[test]
fn host_sandbox_lifecycle() {
    let Some(mut g) = Guard::new("life", str::to_owned) else {
        return;
    };
    let limits = Limits::new(Some(64 << 20), Some(64), Some(0.5), &host()).unwrap();
    let sb = g.tree().create("sb1", &limits).unwrap();
    assert_eq!(g.tree().mode(), Mode::Hybrid, "this host is hybrid");

    // Limits written.
    let mem = sb.dir_of("memory").unwrap();
    assert_eq!(read(mem.join("memory.limit_in_bytes")), "67108864");
    if mem.join("memory.memsw.limit_in_bytes").exists() {
        assert_eq!(read(mem.join("memory.memsw.limit_in_bytes")), "67108864");
    }
    assert_eq!(read(sb.dir_of("pids").unwrap().join("pids.max")), "64");
    let cpu = sb.dir_of("cpu").unwrap();
    assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "50000");

    // Two processes in: one moved by the node, one as sandbox-init joins.
    let a = g.spawn("exec sleep 30");
    let b = g.spawn("exec sleep 30");
    sb.add_process(g.pid(a)).unwrap();
    join(&sb.procs_files(), g.pid(b)).unwrap();
    assert_in_sandbox(g.pid(a), &sb, &g.subtree);
    assert_in_sandbox(g.pid(b), &sb, &g.subtree);
    let mut both = vec![g.pid(a), g.pid(b)];
    both.sort();
    assert_eq!(sb.pids().unwrap(), both);
    assert!(sb.populated().unwrap());

    let stats = sb.stats().unwrap();
    assert_eq!(stats.pids_current, Some(2));
    assert_eq!(stats.pids_max, Some(64));
    assert_eq!(stats.memory_max, Some(64 << 20));
    assert!(stats.memory_current.is_some(), "{stats:?}");
    assert!(stats.cpu_usage_usec.is_some(), "{stats:?}");
    assert_eq!(stats.oom_kills, Some(0));

    // Freeze: hybrid freezes through the v2 tree's cgroup.freeze.
    sb.freeze().unwrap();
    let v2 = sb.v2_dir().unwrap();
    assert!(read(v2.join("cgroup.events")).contains("frozen 1"));
    sb.thaw().unwrap();
    assert!(read(v2.join("cgroup.events")).contains("frozen 0"));

    // Kill: both die by SIGKILL.
    sb.kill().unwrap();
    for c in [a, b] {
        assert_eq!(
            g.wait(c, Duration::from_secs(5)).signal(),
            Some(libc::SIGKILL)
        );
    }
    sb.remove().unwrap();
    for d in sb.dirs() {
        assert!(!d.path.exists(), "{}", d.path.display());
    }
    g.tree().remove_subtree().unwrap();
    for d in g.tree().dirs() {
        assert!(!d.path.exists(), "{}", d.path.display());
    }
}

#[test]
fn host_pids_limit_stops_a_fork_loop() {
    let Some(mut g) = Guard::new("pids", str::to_owned) else {
        return;
    };
    let limits = Limits::new(None, Some(8), None, &host()).unwrap();
    let sb = g.tree().create("forky", &limits).unwrap();
    let c = g.spawn("read go; i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; wait");
    sb.add_process(g.pid(c)).unwrap();
    g.go(c);

    let events = sb.dir_of("pids").unwrap().join("pids.events");
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let n: u64 = read(&events)
            .strip_prefix("max ")
            .and_then(|n| n.parse().ok())
            .unwrap();
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(refused > 0, "no fork was refused");
    let stats = sb.stats().unwrap();
    assert!(stats.pids_current.unwrap() <= 8, "{stats:?}");
    assert_eq!(stats.pids_max, Some(8));

    sb.kill().unwrap();
    g.wait(c, Duration::from_secs(5));
    sb.remove().unwrap();
}

#[test]
fn host_memory_limit_oom_kills() {
    let Some(mut g) = Guard::new("oom", str::to_owned) else {
        return;
    };
    let limits = Limits::new(Some(16 << 20), None, None, &host()).unwrap();
    let sb = g.tree().create("hungry", &limits).unwrap();
    // dd fills a 64 MiB buffer from /dev/zero: 64 MiB of anonymous memory.
    let c = g.spawn("read go; exec dd if=/dev/zero of=/dev/null bs=64M count=1");
    sb.add_process(g.pid(c)).unwrap();
    g.go(c);
    let status = g.wait(c, Duration::from_secs(20));
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(sb.oom_kills().unwrap().unwrap() >= 1);
    assert_eq!(sb.stats().unwrap().memory_max, Some(16 << 20));
    sb.remove().unwrap();
}

#[test]
fn host_clean_leftovers_after_a_crash() {
    let Some(mut g) = Guard::new("crash", str::to_owned) else {
        return;
    };
    let sb = g.tree().create("orphan", &Limits::unlimited()).unwrap();
    let c = g.spawn("exec sleep 30");
    sb.add_process(g.pid(c)).unwrap();
    let dirs = sb.dirs().to_vec();
    drop(sb);

    // A new daemon with the same subtree name, as after a crash.
    let again = CgroupTree::discover(Path::new(ROOT), &g.self_cgroup, &g.subtree).unwrap();
    assert_eq!(again.sandbox_ids().unwrap(), ["orphan"]);
    let report = again.clean_leftovers();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.removed, ["orphan"]);
    assert_eq!(
        g.wait(c, Duration::from_secs(5)).signal(),
        Some(libc::SIGKILL)
    );
    for d in dirs {
        assert!(!d.path.exists(), "{}", d.path.display());
    }
}

#[test]
fn host_v1_only_freezes_with_the_freezer_and_kills_by_signal() {
    // Hide the v2 line: the layer then works as on a legacy host.
    let Some(mut g) = Guard::new("legacy", |t| {
        t.lines()
            .filter(|l| !l.starts_with("0::"))
            .map(|l| format!("{l}\n"))
            .collect()
    }) else {
        return;
    };
    assert_eq!(g.tree().mode(), Mode::Legacy);
    let sb = g.tree().create("old", &Limits::unlimited()).unwrap();
    assert_eq!(sb.v2_dir(), None);
    let c = g.spawn("exec sleep 30");
    sb.add_process(g.pid(c)).unwrap();
    assert_in_sandbox(g.pid(c), &sb, &g.subtree);

    let state = sb.dir_of("freezer").unwrap().join("freezer.state");
    sb.freeze().unwrap();
    assert_eq!(read(&state), "FROZEN");
    sb.thaw().unwrap();
    assert_eq!(read(&state), "THAWED");

    sb.kill().unwrap();
    assert_eq!(
        g.wait(c, Duration::from_secs(5)).signal(),
        Some(libc::SIGKILL)
    );
    assert_eq!(read(&state), "THAWED");
    sb.remove().unwrap();
    for d in sb.dirs() {
        assert!(!d.path.exists(), "{}", d.path.display());
    }
}
