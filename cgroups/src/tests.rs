//! The cgroup layer against fake cgroupfs roots laid out as v1, hybrid and
//! v2 hosts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::fake::{FakeCgroupFs, FakeHost};
use super::*;

const SUBTREE: &str = "agentd-t";

fn limits() -> Limits {
    let host = HostCapacity {
        cpus: 2.0,
        memory_bytes: 1 << 33,
    };
    Limits::new(Some(64 << 20), Some(32), Some(0.5), &host).unwrap()
}

fn discover(host: &FakeHost, pid: u32) -> (CgroupTree, Arc<FakeCgroupFs>) {
    let cfs = host.cfs();
    let tree = CgroupTree::discover_with(cfs.clone(), host.root(), &host.self_cgroup, SUBTREE, pid)
        .unwrap();
    (tree, cfs)
}

fn get(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap()
}

fn put(path: impl AsRef<Path>, content: &str) {
    std::fs::write(path, content).unwrap()
}

fn paths(dirs: &[CgroupDir]) -> Vec<(Version, Vec<&str>, PathBuf)> {
    dirs.iter()
        .map(|d| {
            (
                d.version,
                d.controllers.iter().map(String::as_str).collect(),
                d.path.clone(),
            )
        })
        .collect()
}

#[test]
fn hybrid_discovery_puts_the_subtree_under_each_start_cgroup() {
    let host = FakeHost::hybrid();
    let r = host.root();
    let (tree, _) = discover(&host, 7);
    assert_eq!(tree.mode(), Mode::Hybrid);
    assert_eq!(
        paths(tree.dirs()),
        [
            (
                Version::V1,
                vec!["memory"],
                r.join("memory/process_api/abc/agentd-t")
            ),
            (Version::V1, vec!["pids"], r.join("pids/agentd-t")),
            (Version::V1, vec!["cpu"], r.join("cpu/agentd-t")),
            (Version::V1, vec!["cpuacct"], r.join("cpuacct/agentd-t")),
            (Version::V1, vec!["freezer"], r.join("freezer/agentd-t")),
            (Version::V2, vec![], r.join("unified/agentd-t")),
        ]
    );
    for d in tree.dirs() {
        assert!(d.path.is_dir(), "{}", d.path.display());
    }
    // Hierarchies we do not use get nothing; start cgroups are not written.
    assert!(!r.join("cpuset/agentd-t").exists());
    assert!(!r.join("systemd/agentd-t").exists());
    assert_eq!(get(r.join("memory/process_api/abc/cgroup.procs")), "1\n");
    // Discovery is idempotent (a restarted daemon finds its subtree).
    let (again, _) = discover(&host, 7);
    assert_eq!(paths(again.dirs()), paths(tree.dirs()));
}

#[test]
fn hybrid_create_writes_v1_limits_and_lists_every_procs_file() {
    let host = FakeHost::hybrid();
    let r = host.root();
    let (tree, _) = discover(&host, 7);
    let sb = tree.create("sb1", &limits()).unwrap();
    let mem = r.join("memory/process_api/abc/agentd-t/sb1");
    assert_eq!(get(mem.join("memory.limit_in_bytes")), "67108864");
    assert_eq!(get(mem.join("memory.memsw.limit_in_bytes")), "67108864");
    assert_eq!(get(r.join("pids/agentd-t/sb1/pids.max")), "32");
    assert_eq!(get(r.join("cpu/agentd-t/sb1/cpu.cfs_period_us")), "100000");
    assert_eq!(get(r.join("cpu/agentd-t/sb1/cpu.cfs_quota_us")), "50000");
    assert_eq!(get(r.join("freezer/agentd-t/sb1/freezer.state")), "");
    assert_eq!(
        sb.procs_files(),
        [
            mem.join("cgroup.procs"),
            r.join("pids/agentd-t/sb1/cgroup.procs"),
            r.join("cpu/agentd-t/sb1/cgroup.procs"),
            r.join("cpuacct/agentd-t/sb1/cgroup.procs"),
            r.join("freezer/agentd-t/sb1/cgroup.procs"),
            r.join("unified/agentd-t/sb1/cgroup.procs"),
        ]
    );

    sb.add_process(4242).unwrap();
    for f in sb.procs_files() {
        assert_eq!(get(&f), "4242", "{}", f.display());
    }
    join(&sb.procs_files(), 4343).unwrap();
    assert_eq!(get(mem.join("cgroup.procs")), "4343");
    assert_eq!(sb.pids().unwrap(), [4343]);

    assert!(matches!(
        tree.create("sb1", &limits()),
        Err(CgroupError::AlreadyExists { .. })
    ));
}

#[test]
fn hybrid_sandbox_cgroups_can_be_the_spare_renamed_with_its_process() {
    let host = FakeHost::hybrid();
    let r = host.root();
    let (tree, _) = discover(&host, 7);
    let spare = tree.spare().unwrap().expect("v1 hierarchies have a spare");
    // Only v1: a v2 directory is made for the sandbox itself.
    assert_eq!(spare.dirs().len(), 5);
    assert!(spare.dirs().iter().all(|d| d.version == Version::V1));
    // (The fake's `attach` knows one hierarchy: the files are written as
    // each hierarchy's move would leave them.)
    for f in spare.procs_files() {
        put(&f, "4242\n");
    }
    assert!(tree.sandbox_ids().unwrap().is_empty(), "the spare is no sandbox");

    let sb = tree.create_from(&spare, "sb1", &limits()).unwrap();
    let mem = r.join("memory/process_api/abc/agentd-t");
    assert!(!mem.join("spare").exists());
    assert_eq!(get(mem.join("sb1/memory.limit_in_bytes")), "67108864");
    assert_eq!(get(r.join("pids/agentd-t/sb1/pids.max")), "32");
    // The waiting process came along in every v1 hierarchy.
    for d in sb.dirs().iter().filter(|d| d.version == Version::V1) {
        assert_eq!(get(d.path.join("cgroup.procs")), "4242\n", "{}", d.path.display());
    }
    assert!(r.join("unified/agentd-t/sb1").is_dir());
    assert_eq!(tree.sandbox_ids().unwrap(), ["sb1"]);

    // A failure renames back and removes what it made: the spare is whole.
    let spare = tree.spare().unwrap().unwrap();
    assert!(matches!(tree.create_from(&spare, "sb1", &limits()), Err(CgroupError::AlreadyExists { .. })));
    for d in spare.dirs() {
        assert!(d.path.is_dir(), "{}", d.path.display());
    }
    assert!(r.join("unified/agentd-t/sb1").is_dir(), "the other sandbox's own directory stays");
}

#[test]
fn unified_hosts_need_no_spare() {
    let host = FakeHost::unified("/system.slice/agentd.service", 777);
    let (tree, _) = discover(&host, 777);
    assert!(tree.spare().unwrap().is_none());
}

#[test]
fn hybrid_freezes_and_kills_through_the_v2_tree() {
    let host = FakeHost::hybrid();
    let r = host.root();
    let (tree, cfs) = discover(&host, 7);
    let sb = tree.create("sb1", &Limits::unlimited()).unwrap();
    let v2 = r.join("unified/agentd-t/sb1");
    assert_eq!(sb.v2_dir(), Some(v2.as_path()));
    // The kernel would flip `frozen` itself; the fake has it ready.
    put(v2.join("cgroup.events"), "populated 1\nfrozen 1\n");
    sb.freeze().unwrap();
    assert_eq!(get(v2.join("cgroup.freeze")), "1");
    assert_eq!(
        get(r.join("freezer/agentd-t/sb1/freezer.state")),
        "",
        "v1 freezer untouched"
    );
    assert!(sb.populated().unwrap());
    sb.thaw().unwrap();
    assert_eq!(get(v2.join("cgroup.freeze")), "0");

    sb.kill().unwrap();
    assert_eq!(get(v2.join("cgroup.kill")), "1");
    assert!(
        cfs.killed.lock().unwrap().is_empty(),
        "no signal sent by hand"
    );
}

#[test]
fn hybrid_falls_back_to_the_v1_freezer_without_cgroup_freeze() {
    let host = FakeHost::hybrid();
    let r = host.root();
    let (tree, _) = discover(&host, 7);
    let sb = tree.create("sb1", &Limits::unlimited()).unwrap();
    std::fs::remove_file(r.join("unified/agentd-t/sb1/cgroup.freeze")).unwrap();
    sb.freeze().unwrap();
    assert_eq!(get(r.join("freezer/agentd-t/sb1/freezer.state")), "FROZEN");
    sb.thaw().unwrap();
    assert_eq!(get(r.join("freezer/agentd-t/sb1/freezer.state")), "THAWED");
}

#[test]
fn hybrid_stats_read_v1_files() {
    let host = FakeHost::hybrid();
    let r = host.root();
    let (tree, _) = discover(&host, 7);
    let sb = tree.create("sb1", &limits()).unwrap();
    let mem = r.join("memory/process_api/abc/agentd-t/sb1");
    put(mem.join("memory.usage_in_bytes"), "1048576\n");
    put(mem.join("memory.limit_in_bytes"), "67108864\n");
    put(
        mem.join("memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    );
    put(r.join("pids/agentd-t/sb1/pids.current"), "3\n");
    put(r.join("pids/agentd-t/sb1/pids.max"), "32\n");
    put(r.join("cpuacct/agentd-t/sb1/cpuacct.usage"), "7000000\n");
    assert_eq!(
        sb.stats().unwrap(),
        Stats {
            memory_current: Some(1 << 20),
            memory_max: Some(64 << 20),
            cpu_usage_usec: Some(7000),
            pids_current: Some(3),
            pids_max: Some(32),
            oom_kills: Some(2),
        }
    );
    assert_eq!(sb.oom_kills().unwrap(), Some(2));
    put(r.join("pids/agentd-t/sb1/pids.events"), "max 5\n");
    assert_eq!(sb.pids_limit_hits().unwrap(), Some(5));
    put(r.join("pids/agentd-t/sb1/pids.max"), "max\n");
    assert_eq!(sb.stats().unwrap().pids_max, None);
}

#[test]
fn legacy_co_mounted_cpu_cpuacct_is_one_directory() {
    let host = FakeHost::legacy();
    let r = host.root();
    let (tree, _) = discover(&host, 7);
    assert_eq!(tree.mode(), Mode::Legacy);
    assert_eq!(
        paths(tree.dirs()),
        [
            (
                Version::V1,
                vec!["memory"],
                r.join("memory/user.slice/agentd-t")
            ),
            (
                Version::V1,
                vec!["pids"],
                r.join("pids/user.slice/agentd-t")
            ),
            (
                Version::V1,
                vec!["cpu", "cpuacct"],
                r.join("cpu,cpuacct/user.slice/agentd-t")
            ),
            (
                Version::V1,
                vec!["freezer"],
                r.join("freezer/user.slice/agentd-t")
            ),
        ]
    );
    let sb = tree.create("sb1", &limits()).unwrap();
    assert_eq!(sb.v2_dir(), None);
    assert_eq!(
        get(r.join("cpu,cpuacct/user.slice/agentd-t/sb1/cpu.cfs_quota_us")),
        "50000"
    );
    assert_eq!(sb.stats().unwrap().cpu_usage_usec, Some(0));
}

#[test]
fn legacy_kill_freezes_signals_each_pid_and_thaws() {
    let host = FakeHost::legacy();
    let r = host.root();
    let (tree, cfs) = discover(&host, 7);
    let sb = tree.create("sb1", &Limits::unlimited()).unwrap();
    put(
        r.join("memory/user.slice/agentd-t/sb1/cgroup.procs"),
        "111\n222\n",
    );
    put(
        r.join("pids/user.slice/agentd-t/sb1/cgroup.procs"),
        "222\n111\n",
    );
    // A sub-cgroup the sandbox made: its processes die too.
    let sub = r.join("pids/user.slice/agentd-t/sb1/inner");
    std::fs::create_dir(&sub).unwrap();
    put(sub.join("cgroup.procs"), "333\n");
    assert_eq!(sb.pids().unwrap(), [111, 222, 333]);

    sb.kill().unwrap();
    assert_eq!(*cfs.killed.lock().unwrap(), [111, 222, 333]);
    assert_eq!(
        get(r.join("freezer/user.slice/agentd-t/sb1/freezer.state")),
        "THAWED"
    );
    assert!(!sb.populated().unwrap());

    sb.remove().unwrap();
    for d in sb.dirs() {
        assert!(!d.path.exists(), "{}", d.path.display());
    }
    sb.remove().unwrap(); // idempotent
}

#[test]
fn remove_waits_for_busy_cgroups_then_says_which() {
    let host = FakeHost::legacy();
    let r = host.root();
    let (tree, _) = discover(&host, 7);
    let sb = tree.create("sb1", &Limits::unlimited()).unwrap();
    let busy = r.join("pids/user.slice/agentd-t/sb1");
    put(busy.join("cgroup.procs"), "999\n");
    let err = sb.remove_within(Duration::from_millis(30)).unwrap_err();
    match err {
        CgroupError::Busy { path, waited_ms } => {
            assert_eq!(path, busy);
            assert!(waited_ms >= 30, "{waited_ms}");
        }
        other => panic!("{other}"),
    }
    // The others are gone all the same.
    assert!(!r.join("memory/user.slice/agentd-t/sb1").exists());
}

#[test]
fn clean_leftovers_kills_and_removes_every_sandbox_of_our_subtree_only() {
    let host = FakeHost::legacy();
    let r = host.root();
    let (tree, _) = discover(&host, 7);
    tree.create("old1", &limits()).unwrap();
    tree.create("old2", &Limits::unlimited()).unwrap();
    put(
        r.join("memory/user.slice/agentd-t/old1/cgroup.procs"),
        "555\n",
    );
    // Another instance's subtree next to ours.
    let (other, _) = {
        let cfs = host.cfs();
        let t =
            CgroupTree::discover_with(cfs.clone(), r, &host.self_cgroup, "agentd-u", 8).unwrap();
        (t, cfs)
    };
    other.create("theirs", &Limits::unlimited()).unwrap();

    let (restarted, cfs) = discover(&host, 9);
    assert_eq!(restarted.sandbox_ids().unwrap(), ["old1", "old2"]);
    let report = restarted.clean_leftovers();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.removed, ["old1", "old2"]);
    assert_eq!(*cfs.killed.lock().unwrap(), [555]);
    assert!(restarted.sandbox_ids().unwrap().is_empty());
    assert!(r.join("memory/user.slice/agentd-u/theirs").is_dir());

    restarted.remove_subtree().unwrap();
    assert!(!r.join("memory/user.slice/agentd-t").exists());
    assert!(r.join("memory/user.slice/agentd-u").exists());
}

#[test]
fn a_restarted_node_keeps_the_cgroups_of_the_sandboxes_it_took_back() {
    let host = FakeHost::legacy();
    let r = host.root();
    let (tree, _) = discover(&host, 7);
    tree.create("adopted", &limits()).unwrap();
    tree.create("dead", &Limits::unlimited()).unwrap();
    put(r.join("memory/user.slice/agentd-t/adopted/cgroup.procs"), "555\n");

    let (restarted, cfs) = discover(&host, 9);
    let report = restarted.clean_leftovers_except(&["adopted".to_string()]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.removed, ["dead"]);
    assert!(cfs.killed.lock().unwrap().is_empty(), "nothing of the adopted one is killed");
    assert_eq!(restarted.sandbox_ids().unwrap(), ["adopted"]);
    assert!(r.join("memory/user.slice/agentd-t/adopted").is_dir());
}

#[test]
fn unified_moves_the_daemon_to_a_leaf_and_enables_controllers() {
    let start = "/system.slice/agentd.service";
    let host = FakeHost::unified(start, 777);
    let r = host.root();
    let s = r.join("system.slice/agentd.service");
    let (tree, _) = discover(&host, 777);
    assert_eq!(tree.mode(), Mode::Unified);
    assert_eq!(
        paths(tree.dirs()),
        [(
            Version::V2,
            vec!["cpu", "memory", "pids"],
            s.join("agentd-t")
        )]
    );
    assert_eq!(get(s.join("agentd-t/daemon/cgroup.procs")), "777\n");
    assert_eq!(get(s.join("cgroup.procs")), "", "moved, not copied");
    assert_eq!(get(s.join("cgroup.subtree_control")), "+cpu +memory +pids");
    assert_eq!(
        get(s.join("agentd-t/cgroup.subtree_control")),
        "+cpu +memory +pids"
    );
    // The root is never written.
    assert_eq!(
        get(r.join("cgroup.subtree_control")),
        "cpu io memory pids\n"
    );

    let sb = tree.create("sb1", &limits()).unwrap();
    let d = s.join("agentd-t/sb1");
    assert_eq!(get(d.join("memory.max")), "67108864");
    assert_eq!(get(d.join("memory.swap.max")), "0", "memory+swap = memory");
    assert_eq!(get(d.join("pids.max")), "32");
    assert_eq!(get(d.join("cpu.max")), "50000 100000");
    assert_eq!(sb.procs_files(), [d.join("cgroup.procs")]);

    sb.add_process(4242).unwrap();
    assert_eq!(get(d.join("cgroup.procs")), "4242");
    put(
        d.join("memory.events"),
        "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
    );
    put(d.join("memory.current"), "12345\n");
    put(d.join("memory.max"), "67108864\n");
    put(d.join("pids.current"), "1\n");
    put(d.join("pids.max"), "32\n");
    put(
        d.join("cpu.stat"),
        "usage_usec 99\nuser_usec 90\nsystem_usec 9\n",
    );
    assert_eq!(
        sb.stats().unwrap(),
        Stats {
            memory_current: Some(12345),
            memory_max: Some(64 << 20),
            cpu_usage_usec: Some(99),
            pids_current: Some(1),
            pids_max: Some(32),
            oom_kills: Some(1),
        }
    );
    assert_eq!(sb.oom_kills().unwrap(), Some(1));
    put(d.join("pids.events"), "max 0\n");
    assert_eq!(sb.pids_limit_hits().unwrap(), Some(0));

    // The daemon's leaf is not a sandbox, and the id is reserved.
    assert_eq!(tree.sandbox_ids().unwrap(), ["sb1"]);
    assert!(matches!(
        tree.create("daemon", &Limits::unlimited()),
        Err(CgroupError::InvalidName { .. })
    ));

    // Discovering again from inside the leaf finds the same subtree.
    let text = format!("0::{start}/agentd-t/daemon\n");
    let again = CgroupTree::discover_with(host.cfs(), r, &text, SUBTREE, 777).unwrap();
    assert_eq!(paths(again.dirs()), paths(tree.dirs()));
    assert!(!s.join("agentd-t/daemon/agentd-t").exists());
}

#[test]
fn unified_removal_puts_the_start_cgroup_back_as_it_was() {
    let start = "/user.slice/session-1.scope";
    let host = FakeHost::unified(start, 777);
    let s = host.root().join(start.trim_start_matches('/'));
    let (tree, _) = discover(&host, 777);
    assert_eq!(get(s.join("cgroup.subtree_control")), "+cpu +memory +pids");
    let sb = tree.create("sandbox", &limits()).unwrap();
    // A sandbox left in the subtree keeps its limits: nothing is undone.
    assert!(matches!(tree.remove_subtree(), Err(CgroupError::Busy { .. })));
    assert_eq!(get(s.join("agentd-t/cgroup.subtree_control")), "+cpu +memory +pids");
    assert_eq!(get(s.join("agentd-t/daemon/cgroup.procs")), "777\n");
    sb.remove().unwrap();

    tree.remove_subtree().unwrap();
    // The subtree and the start cgroup hand nothing on any more, and the
    // daemon is home. (The fake's writes do not truncate: each file reads
    // back the last write.)
    assert_eq!(get(s.join("cgroup.subtree_control")), "-cpu -memory -pids");
    assert_eq!(get(s.join("cgroup.procs")), "777\n");
    assert!(!s.join("agentd-t").exists());
}

#[test]
fn unified_refusal_moves_the_daemon_back_and_leaves_nothing() {
    let start = "/user.slice/session-1.scope";
    let host = FakeHost::unified(start, 777);
    let s = host.root().join(start.trim_start_matches('/'));
    // A start cgroup the kernel refuses to hand controllers from (a shell's
    // scope, with the shell in it): a file that reads but refuses writes,
    // even root's, fails the write as surely.
    std::fs::remove_file(s.join("cgroup.subtree_control")).unwrap();
    std::os::unix::fs::symlink("/proc/version", s.join("cgroup.subtree_control")).unwrap();
    let cfs = host.cfs();
    let err = CgroupTree::discover_with(cfs, host.root(), &host.self_cgroup, SUBTREE, 777);
    assert!(err.is_err());
    assert_eq!(get(s.join("cgroup.procs")), "777\n", "the daemon is back where it started");
    assert!(!s.join("agentd-t").exists(), "the subtree and the leaf are gone");
}

#[test]
fn unified_failure_after_enabling_moves_the_daemon_back_and_leaves_nothing() {
    let start = "/user.slice/session-1.scope";
    let host = FakeHost::unified(start, 777);
    let s = host.root().join(start.trim_start_matches('/'));
    // The start cgroup takes the controllers, our subtree refuses to hand
    // them on (a file that reads but refuses writes).
    let tree = s.join("agentd-t");
    host.cfs().mkdir(&tree).unwrap();
    std::fs::remove_file(tree.join("cgroup.subtree_control")).unwrap();
    std::os::unix::fs::symlink("/proc/version", tree.join("cgroup.subtree_control")).unwrap();
    let err = CgroupTree::discover_with(host.cfs(), host.root(), &host.self_cgroup, SUBTREE, 777);
    assert!(err.is_err());
    assert_eq!(get(s.join("cgroup.subtree_control")), "-cpu -memory -pids", "what was enabled is disabled again");
    assert_eq!(get(s.join("cgroup.procs")), "777\n", "the daemon is back where it started");
    assert!(!tree.join("daemon").exists(), "the leaf is gone");
}

#[test]
fn unified_without_swap_accounting_limits_memory_only() {
    let host = FakeHost::unified("/a", 1);
    let (tree, _) = discover(&host, 1);
    let sb_dir = host.root().join("a/agentd-t/sb1");
    // Make the sandbox by hand minus memory.swap.max, as such a kernel would.
    let sb = tree.open("sb1").unwrap();
    host.cfs().mkdir(&sb_dir).unwrap();
    std::fs::remove_file(sb_dir.join("memory.swap.max")).unwrap();
    v2::apply(&sb_dir, &limits()).unwrap();
    assert_eq!(get(sb_dir.join("memory.max")), "67108864");
    assert_eq!(sb.procs_files(), [sb_dir.join("cgroup.procs")]);
}

#[test]
fn unified_at_the_root_writes_nothing_there_and_refuses_missing_controllers() {
    let host = FakeHost::unified("/", 777);
    let r = host.root();
    put(r.join("cgroup.subtree_control"), "cpu memory\n");
    let (tree, _) = discover(&host, 777);
    assert_eq!(
        paths(tree.dirs()),
        [(Version::V2, vec!["cpu", "memory"], r.join("agentd-t"))]
    );
    assert!(
        !r.join("agentd-t/daemon").exists(),
        "the daemon stays at the root"
    );
    assert_eq!(get(r.join("cgroup.subtree_control")), "cpu memory\n");
    assert_eq!(get(r.join("cgroup.procs")), "1\n");
    let err = tree.create("sb1", &limits()).unwrap_err();
    assert!(
        matches!(
            err,
            CgroupError::ControllerUnavailable {
                controller: "pids",
                ..
            }
        ),
        "{err}"
    );
    assert!(!r.join("agentd-t/sb1").exists(), "nothing made on refusal");
}

#[test]
fn a_failed_create_leaves_nothing_behind() {
    let host = FakeHost::hybrid();
    let broken = Arc::new(BrokenPidsFs(host.cfs()));
    let tree =
        CgroupTree::discover_with(broken, host.root(), &host.self_cgroup, SUBTREE, 7).unwrap();
    let err = tree.create("sb1", &limits()).unwrap_err();
    assert!(err.to_string().contains("pids.max"), "{err}");
    assert!(
        tree.sandbox_ids().unwrap().is_empty(),
        "{:?}",
        tree.sandbox_ids()
    );
}

/// A cgroupfs whose pids cgroups come without `pids.max`.
#[derive(Debug)]
struct BrokenPidsFs(Arc<FakeCgroupFs>);

impl CgroupFs for BrokenPidsFs {
    fn mkdir(&self, path: &Path) -> std::io::Result<()> {
        self.0.mkdir(path)?;
        if path.to_string_lossy().contains("/pids/") {
            std::fs::remove_file(path.join("pids.max"))?;
        }
        Ok(())
    }
    fn rmdir(&self, path: &Path) -> std::io::Result<()> {
        self.0.rmdir(path)
    }
    fn kill(&self, pid: u32) -> std::io::Result<()> {
        self.0.kill(pid)
    }
    fn attach(&self, procs: &Path, pid: u32) -> std::io::Result<()> {
        self.0.attach(procs, pid)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.0.rename(from, to)
    }
}

#[test]
fn refuses_bad_names_and_bad_hosts_clearly() {
    let host = FakeHost::hybrid();
    let r = host.root();
    let cfs = host.cfs();
    for bad in ["", "../x", "a/b", "x.y"] {
        let err = CgroupTree::discover_with(cfs.clone(), r, &host.self_cgroup, bad, 1).unwrap_err();
        assert!(
            matches!(err, CgroupError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
    }
    let (tree, _) = discover(&host, 7);
    for bad in ["../../etc", "daemon", "a b", ""] {
        assert!(
            matches!(
                tree.create(bad, &limits()),
                Err(CgroupError::InvalidName { .. })
            ),
            "{bad:?}"
        );
    }
    let err = CgroupTree::discover_with(cfs.clone(), r, "nonsense", SUBTREE, 1).unwrap_err();
    assert!(matches!(err, CgroupError::SelfCgroupLine { .. }), "{err}");

    let text = host.self_cgroup.replace("/process_api/abc", "/elsewhere");
    let err = CgroupTree::discover_with(cfs.clone(), r, &text, SUBTREE, 1).unwrap_err();
    match err {
        CgroupError::StartCgroupMissing { path } => {
            assert_eq!(path, r.join("memory/elsewhere"))
        }
        other => panic!("{other}"),
    }
    let text = host.self_cgroup.replace("/process_api/abc", "/../..");
    assert!(CgroupTree::discover_with(cfs, r, &text, SUBTREE, 1).is_err());
}

#[test]
fn a_recorded_sandbox_cgroup_reopens_after_a_restart() {
    let host = FakeHost::hybrid();
    let (tree, _) = discover(&host, 7);
    let sb = tree.create("sb1", &limits()).unwrap();
    let json = serde_json::to_string(&sb).unwrap();
    let back: SandboxCgroup = serde_json::from_str(&json).unwrap();
    assert_eq!(back, sb);
    assert_eq!(back.procs_files(), sb.procs_files());
    assert_eq!(tree.open("sb1").unwrap(), sb);
}
