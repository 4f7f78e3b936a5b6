//! The hostile-workload suite: each case runs `agentd-probe` inside a sandbox
//! built by `agentd sandbox run` (the same code as agent sandboxes), asserts
//! the denial it gets (errno, signal or limit), then checks the host.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{agentd_bin, procfs};

const EPERM: i32 = 1;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EACCES: i32 = 13;
const EROFS: i32 = 30;
const ENOSYS: i32 = 38;
const EAGAIN: i32 = 11;
const ECONNREFUSED: i32 = 111;
const KILLED_BY_SIGSYS: i32 = 128 + 31;
const KILLED_BY_SIGKILL: i32 = 128 + 9;

fn probe_bin() -> PathBuf {
    let path = agentd_bin().with_file_name("agentd-probe");
    assert!(path.is_file(), "{} is missing: build the workspace's binaries first", path.display());
    path
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `agentd-probe CASE [ARG]` in a sandbox with extra `sandbox run` flags.
fn probe_with(flags: &[&str], case: &str, arg: Option<&str>) -> Run {
    let probe = format!("{}:/probe", probe_bin().display());
    let mut cmd = Command::new(agentd_bin());
    cmd.args(["sandbox", "run", "--ro-bind", &probe]).args(flags).args(["--", "/probe", case]);
    if let Some(arg) = arg {
        cmd.arg(arg);
    }
    let Output { status, stdout, stderr } = cmd.output().expect("run agentd sandbox");
    let code = status.code().expect("agentd sandbox exits normally");
    let run = Run { code, stdout: String::from_utf8_lossy(&stdout).into(), stderr: String::from_utf8_lossy(&stderr).into() };
    assert!(!run.stderr.contains("sandbox setup failed"), "{}", run.stderr);
    run
}

fn probe(case: &str) -> Run {
    probe_with(&[], case, None)
}

fn mount_count() -> usize {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().count()
}

#[track_caller]
fn assert_denied(case: &str, allowed: &[i32]) {
    let run = probe(case);
    assert!(allowed.contains(&run.code), "{case}: exit {} (want one of {allowed:?}); {}{}", run.code, run.stdout, run.stderr);
}

#[test]
fn mount_family_and_namespaces_are_denied_and_the_host_mount_table_is_untouched() {
    let before = mount_count();
    for case in ["mount", "umount", "pivot-root", "unshare-user", "unshare-mount", "clone-newuser", "setns"] {
        assert_denied(case, &[EPERM]);
    }
    assert_eq!(mount_count(), before, "host mount table changed");
}

#[test]
fn kernel_interfaces_are_denied() {
    for case in [
        "keyctl",
        "add-key",
        "bpf",
        "perf-event-open",
        "init-module",
        "finit-module",
        "reboot",
        "swapoff",
        "settimeofday",
        "userfaultfd",
        "ptrace",
    ] {
        assert_denied(case, &[EPERM]);
    }
    assert_denied("io-uring", &[EPERM, ENOSYS]);
    assert_denied("clone3", &[ENOSYS]);
    assert_denied("tiocsti", &[EPERM]);
    assert_denied("tioclinux", &[EPERM]);
}

#[test]
fn foreign_syscall_abis_kill_the_process() {
    assert_denied("syscall32", &[KILLED_BY_SIGSYS]);
    assert_denied("x32", &[KILLED_BY_SIGSYS]);
}

#[test]
fn proc_and_sys_leak_nothing_and_cannot_be_written() {
    assert_denied("read-kcore", &[0, ENOENT, EACCES, EPERM]);
    assert_denied("write-proc-sys", &[EACCES, EROFS, EPERM]);
    assert_denied("write-sysrq", &[EACCES, EROFS, EPERM, ENOENT]);
    assert_denied("write-cgroupfs", &[ENOENT, EROFS, EACCES]);
}

#[test]
fn only_the_minimal_dev_exists_and_devices_cannot_be_made() {
    let run = probe("list-dev");
    assert!(
        run.stdout.trim_end().ends_with("dev=fd,full,null,ptmx,pts,random,shm,stderr,stdin,stdout,tty,urandom,zero"),
        "{}",
        run.stdout
    );
    for dev in ["/dev/mem", "/dev/sda", "/dev/kmsg", "/dev/vda"] {
        let run = probe_with(&[], "open-dev", Some(dev));
        assert_eq!(run.code, ENOENT, "{dev}: {}", run.stdout);
    }
    assert_denied("mknod", &[EPERM]);
}

#[test]
fn writes_outside_the_workspace_fail_and_reach_nothing_on_the_host() {
    for path in ["/usr/probe-was-here", "/etc/probe-was-here", "/probe-was-here", "/bin/probe-was-here"] {
        let run = probe_with(&[], "write-outside", Some(path));
        assert_eq!(run.code, EROFS, "{path}: {}", run.stdout);
        assert!(!Path::new(path).exists(), "{path} appeared on the host");
    }
    // A given workspace is used as it is: it must belong to the sandbox's ids.
    let workspace = tempfile::tempdir().unwrap();
    let uid_base: u32 = 1_500_000_000;
    std::os::unix::fs::chown(workspace.path(), Some(uid_base), Some(uid_base)).unwrap();
    let flags = [format!("--workspace={}", workspace.path().display()), format!("--uid-base={uid_base}")];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    assert_eq!(probe_with(&flags, "write-workspace", None).code, 0, "the workspace is writable");
    assert!(workspace.path().join("probe-was-here").exists());
}

#[test]
fn host_files_bound_in_cannot_be_chowned_or_chmodded() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("host-file");
    std::fs::write(&file, "host").unwrap();
    let before = std::fs::metadata(&file).unwrap();
    let bind = format!("--ro-bind={}:/host-file", file.display());
    for case in ["chown", "chmod"] {
        let run = probe_with(&[&bind], case, Some("/host-file"));
        assert!([EPERM, EROFS].contains(&run.code), "{case}: {}", run.stdout);
    }
    use std::os::unix::fs::MetadataExt;
    let after = std::fs::metadata(&file).unwrap();
    assert_eq!((after.uid(), after.gid(), after.mode()), (before.uid(), before.gid(), before.mode()));
}

#[test]
fn host_processes_are_invisible_and_unreachable() {
    let run = probe("count-procs");
    assert!(run.stdout.contains("procs=2 1,2"), "only PID 1 and the probe: {}", run.stdout);
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let run = probe_with(&[], "kill", Some(&pid));
    assert_eq!(run.code, ESRCH, "{}", run.stdout);
    let run = probe_with(&[], "ptrace", Some(&pid));
    assert!([EPERM, ESRCH].contains(&run.code), "{}", run.stdout);
    assert!(procfs::is_alive(sleeper.id()), "the host process survived");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

#[test]
fn network_none_has_only_loopback_and_cannot_reach_the_hosts() {
    let run = probe("net-ifaces");
    assert!(run.stdout.contains("ifaces=1 [\"lo\"]"), "{}", run.stdout);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let run = probe_with(&[], "connect-loopback", Some(&port));
    assert_eq!(run.code, ECONNREFUSED, "the host's loopback is not the sandbox's: {}", run.stdout);
}

#[test]
fn no_daemon_descriptor_or_binary_is_reachable() {
    let run = probe("list-fds");
    // 0-2 are stdio; 3 is the directory the probe is listing.
    assert!(run.stdout.trim_end().ends_with("fds=0,1,2,3"), "{}", run.stdout);
    // PID 1 is a fork of the agentd that `agentd sandbox run` is.
    let mtime = || std::fs::metadata(agentd_bin()).unwrap().modified().unwrap();
    let before = mtime();
    for target in ["/proc/1/exe", "/proc/self/exe"] {
        let run = probe_with(&[], "write-exe", Some(target));
        assert_ne!(run.code, 0, "{target} opened for writing: {}", run.stdout);
    }
    assert_eq!(mtime(), before);
}

#[test]
fn capabilities_are_gone_and_no_new_privileges_is_set() {
    let run = probe("caps");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(run.stdout.contains(&format!("{set}:\t0000000000000000")), "{set}: {}", run.stdout);
    }
    assert!(run.stdout.contains("NoNewPrivs:\t1"), "{}", run.stdout);
    assert!(run.stdout.contains("Seccomp:\t2"), "{}", run.stdout);
}

#[test]
fn a_fork_bomb_hits_the_pids_limit_and_the_host_stays_responsive() {
    let run = probe_with(&["--pids", "32"], "fork-bomb", None);
    assert_eq!(run.code, EAGAIN, "{}{}", run.stdout, run.stderr);
    let forked: u32 = run.stdout.split("forked=").nth(1).unwrap().trim().parse().unwrap();
    assert!(forked < 32, "forked {forked} under a limit of 32");
    assert!(Command::new("true").status().unwrap().success(), "the host can still fork");
}

#[test]
fn a_memory_bomb_is_killed_inside_and_reported() {
    let run = probe_with(&["--memory", "64M"], "memory-bomb", Some("1024"));
    assert_eq!(run.code, KILLED_BY_SIGKILL, "{}{}", run.stdout, run.stderr);
    assert!(run.stderr.contains("out of memory"), "the OOM kill is reported: {}", run.stderr);
}

#[test]
fn invalid_profiles_are_refused_before_anything_exists() {
    for flags in [
        &["--network", "bridge"][..],
        &["--rootfs", "/definitely/not/here"],
        &["--rootfs", "relative/dir"],
        &["--memory", "-5M"],
        &["--memory", "lots"],
        &["--pids", "0"],
        &["--cpus", "0"],
        &["--cpus", "-1"],
        &["--memory", "1K"],
        &["--ro-bind", "/nonexistent:/x"],
    ] {
        let out = Command::new(agentd_bin()).args(["sandbox", "run"]).args(flags).args(["--", "true"]).output().unwrap();
        // 125: agentd refused the profile; 2: the argument parser did.
        assert!(matches!(out.status.code(), Some(125 | 2)), "{flags:?} accepted: {:?}", out.status);
        assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty(), "{flags:?}: no error message");
    }
}

/// What the `sandbox run` with process id `pid` left on the host: mounts,
/// scratch directories and cgroups all carry `agentd-run-<pid>`.
fn run_leftovers(pid: u32) -> Vec<String> {
    let tag = format!("agentd-run-{pid}");
    let mut left: Vec<String> =
        std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().filter(|l| l.contains(&tag)).map(str::to_string).collect();
    // Scratch directories go to /dev/shm when it is a tmpfs, else to /tmp.
    for dir in [std::env::temp_dir(), PathBuf::from("/dev/shm")] {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        left.extend(entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&tag)));
    }
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                if e.file_name().to_string_lossy() == tag {
                    left.push(e.path().display().to_string());
                }
                stack.push(e.path());
            }
        }
    }
    left
}

/// `sandbox run`, on the one-clone path, or (`two_forks`) on the path of
/// hosts where it is not available.
fn sandbox_run(two_forks: bool) -> Command {
    let mut cmd = Command::new(agentd_bin());
    cmd.args(["sandbox", "run"]);
    if two_forks {
        cmd.env("AGENTD_SANDBOX_TWO_FORKS", "1");
    }
    cmd
}

#[test]
fn a_failure_midway_undoes_everything_created_so_far() {
    for (stage, two_forks) in ["cgroup", "join-cgroup", "mount", "clone", "id-map", "pivot-root"].iter().flat_map(|s| [(*s, false), (*s, true)]) {
        let child = sandbox_run(two_forks)
            .args(["--memory", "64M", "--pids", "32", "--inject-failure", stage, "--", "true"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{stage} (two forks: {two_forks}): {stderr}");
        assert!(stderr.contains(stage) && stderr.contains("injected failure"), "{stage} (two forks: {two_forks}): {stderr}");
        assert_eq!(run_leftovers(pid), Vec::<String>::new(), "{stage} (two forks: {two_forks}) left things behind");
    }
}

#[test]
fn a_successful_run_leaves_nothing_either() {
    for two_forks in [false, true] {
        let child = sandbox_run(two_forks).args(["--memory", "64M", "--pids", "32", "--cpus", "0.5", "--", "true"]).spawn().unwrap();
        let pid = child.id();
        assert!(child.wait_with_output().unwrap().status.success(), "two forks: {two_forks}");
        assert_eq!(run_leftovers(pid), Vec::<String>::new(), "two forks: {two_forks}");
    }
}

/// Both ways of making PID 1 give the same sandbox: PID 1 of its pid
/// namespace, root of its user namespace, in its own cgroup namespace
/// rooted at its cgroups (PID 1 itself checks that glibc holds its thread id).
#[test]
fn pid1_is_made_alike_with_one_clone_or_two_forks() {
    let script = "echo $$ $PPID; id -u; cat /proc/self/cgroup | grep -c ':/$'; wc -l < /proc/self/cgroup";
    let outputs: Vec<String> = [false, true]
        .into_iter()
        .map(|two_forks| {
            let out = sandbox_run(two_forks).args(["--memory", "64M", "--", "sh", "-c", script]).output().unwrap();
            assert!(out.status.success(), "two forks: {two_forks}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect();
    let lines: Vec<&str> = outputs[0].lines().collect();
    assert_eq!(lines[0], "2 1", "the command is PID 2, a child of PID 1");
    assert_eq!(lines[1], "0");
    assert_eq!(lines[2], lines[3], "every cgroup line is the namespace's root");
    assert_eq!(outputs[0], outputs[1]);
}
