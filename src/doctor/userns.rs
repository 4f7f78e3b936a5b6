//! User namespaces: whether root can make one and map a sandbox's id range
//! into it (tried for real, in a child), and the sysctls that limit them.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::sched::CloneFlags;
use nix::sys::wait::{WaitStatus, waitpid};

use super::Row;

const NAME: &str = "userns";
const UNPRIVILEGED: &str = "userns.unprivileged";

/// As root: clones a child into a new user namespace, maps its root to the
/// host ids `base..base+count` (as the node maps a sandbox's), and has the
/// child become root there (`setresuid(0, 0, 0)`, as the sandbox's PID 1). Anyone else: a warning, since
/// only root can map a range it does not own.
pub fn privileged(base: u32, count: u32) -> Row {
    if !nix::unistd::geteuid().is_root() {
        return Row::warn(NAME, "not root: cannot try to map an id range", "run `agentd doctor` as root, as agentd up and agentd node run");
    }
    match try_map(base, count) {
        Ok(()) => Row::ok(NAME, format!("made a user namespace in a child and mapped its root to host ids {base}..{} ({count} ids)", u64::from(base) + u64::from(count))),
        Err(why) => Row::fail(
            NAME,
            why,
            "allow user namespaces: user.max_user_namespaces above 0, and no seccomp or LSM policy refusing CLONE_NEWUSER (in a container, run agentd on the host)",
        ),
    }
}

/// What the child exits with.
const CHILD_ROOT: i32 = 0;
const CHILD_NOT_ROOT: i32 = 2;
const CHILD_ABANDONED: i32 = 3;

fn try_map(base: u32, count: u32) -> Result<(), String> {
    let (go_read, go_write) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let (r, w) = (go_read.as_raw_fd(), go_write.as_raw_fd());
    let mut stack = vec![0u8; 64 * 1024];
    let child = Box::new(move || {
        // Only async-signal-safe calls from here: this process may have
        // threads (clone copies just the calling one). Close our copy of
        // the write end so that the parent's close reads as EOF.
        // SAFETY: plain syscalls on descriptors and ids this child owns.
        unsafe {
            libc::close(w);
            let mut go = 0u8;
            if libc::read(r, (&raw mut go).cast(), 1) != 1 {
                return CHILD_ABANDONED as isize;
            }
            // Mapped, the child still holds host root's ids, which the map
            // does not name; it becomes the namespace's root as a sandbox's
            // PID 1 does. Raw syscalls: glibc's setresuid would signal
            // threads this child does not have.
            let became_root = libc::syscall(libc::SYS_setresgid, 0, 0, 0) == 0 && libc::syscall(libc::SYS_setresuid, 0, 0, 0) == 0;
            if became_root && libc::getuid() == 0 && libc::getgid() == 0 { CHILD_ROOT as isize } else { CHILD_NOT_ROOT as isize }
        }
    });
    // SAFETY: the child runs only the closure above, on its own stack, and
    // exits when it returns.
    let pid = unsafe { nix::sched::clone(child, &mut stack, CloneFlags::CLONE_NEWUSER, Some(libc::SIGCHLD)) }
        .map_err(|e| format!("clone(CLONE_NEWUSER) failed: {e}"))?;
    drop(go_read);
    let mapped = write_maps(pid.as_raw(), base, count);
    // The child waits for one byte; it gets it (or EOF) either way, so the
    // wait below ends.
    let mut go_write = std::fs::File::from(go_write);
    let _ = go_write.write_all(if mapped.is_ok() { b"1" } else { b"" });
    drop(go_write);
    let status = waitpid(pid, None).map_err(|e| format!("waitpid: {e}"))?;
    mapped?;
    match status {
        WaitStatus::Exited(_, CHILD_ROOT) => Ok(()),
        WaitStatus::Exited(_, CHILD_NOT_ROOT) => Err(format!("mapped host ids {base}.. but the child could not become root in its namespace")),
        other => Err(format!("the child ended unexpectedly: {other:?}")),
    }
}

fn write_maps(pid: i32, base: u32, count: u32) -> Result<(), String> {
    let map = format!("0 {base} {count}\n");
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, &map).map_err(|e| format!("made a user namespace, but writing {map:?} to {file} failed: {e}"))?;
    }
    Ok(())
}

/// The sysctls that limit user namespaces, read under `proc`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Knobs {
    /// `kernel.unprivileged_userns_clone` (Debian and Ubuntu kernels only).
    pub unprivileged_clone: Option<u64>,
    /// `user.max_user_namespaces`: per user, root included.
    pub max_user_namespaces: Option<u64>,
    /// `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 23.10+).
    pub apparmor_restrict: Option<u64>,
}

impl Knobs {
    pub fn read(proc: &Path) -> Knobs {
        let read = |name: &str| std::fs::read_to_string(proc.join("sys").join(name)).ok().and_then(|s| s.trim().parse().ok());
        Knobs {
            unprivileged_clone: read("kernel/unprivileged_userns_clone"),
            max_user_namespaces: read("user/max_user_namespaces"),
            apparmor_restrict: read("kernel/apparmor_restrict_unprivileged_userns"),
        }
    }
}

/// Judges the sysctls. Every sandbox is a user namespace of root's, so
/// `max_user_namespaces` bounds the sandboxes a node can run; the knobs
/// that restrict unprivileged users do not touch agentd (it runs as
/// root), so they only warn when doctor runs as someone else.
pub fn unprivileged(knobs: &Knobs, max_sandboxes: u32, is_root: bool) -> Row {
    let show = |v: Option<u64>| v.map_or("absent".to_string(), |v| v.to_string());
    let found = format!(
        "kernel.unprivileged_userns_clone={}, user.max_user_namespaces={}, kernel.apparmor_restrict_unprivileged_userns={}",
        show(knobs.unprivileged_clone),
        show(knobs.max_user_namespaces),
        show(knobs.apparmor_restrict)
    );
    match knobs.max_user_namespaces {
        Some(0) => return Row::fail(UNPRIVILEGED, format!("{found}: no one may make a user namespace"), "sysctl -w user.max_user_namespaces=65536"),
        Some(max) if max < u64::from(max_sandboxes) => {
            return Row::warn(
                UNPRIVILEGED,
                format!("{found}: fewer than --max-sandboxes ({max_sandboxes})"),
                format!("sysctl -w user.max_user_namespaces={}", u64::from(max_sandboxes) * 2),
            );
        }
        _ => {}
    }
    let mut restricted = Vec::new();
    if knobs.unprivileged_clone == Some(0) {
        restricted.push("sysctl -w kernel.unprivileged_userns_clone=1");
    }
    if knobs.apparmor_restrict == Some(1) {
        restricted.push("sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (or an AppArmor profile allowing userns)");
    }
    match (restricted.is_empty(), is_root) {
        (true, _) => Row::ok(UNPRIVILEGED, format!("{found}: unprivileged users may make user namespaces")),
        (false, true) => Row::ok(UNPRIVILEGED, format!("{found}: only root may make user namespaces (agentd runs as root)")),
        (false, false) => Row::warn(UNPRIVILEGED, format!("{found}: only root may make user namespaces"), restricted.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    #[test]
    fn reads_the_knobs_under_a_proc_root() {
        let proc = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(proc.path().join("sys/kernel")).unwrap();
        std::fs::create_dir_all(proc.path().join("sys/user")).unwrap();
        std::fs::write(proc.path().join("sys/user/max_user_namespaces"), "15000\n").unwrap();
        std::fs::write(proc.path().join("sys/kernel/apparmor_restrict_unprivileged_userns"), "1\n").unwrap();
        let knobs = Knobs::read(proc.path());
        assert_eq!(knobs, Knobs { unprivileged_clone: None, max_user_namespaces: Some(15000), apparmor_restrict: Some(1) });
    }

    #[test]
    fn judges_the_knobs() {
        let open = Knobs { unprivileged_clone: None, max_user_namespaces: Some(96362), apparmor_restrict: None };
        assert_eq!(unprivileged(&open, 1000, false).status, Status::Ok);
        let none = Knobs { max_user_namespaces: Some(0), ..open.clone() };
        assert_eq!(unprivileged(&none, 1000, true).status, Status::Fail);
        let few = unprivileged(&Knobs { max_user_namespaces: Some(100), ..open.clone() }, 1000, true);
        assert_eq!(few.status, Status::Warn);
        assert_eq!(few.remedy.as_deref(), Some("sysctl -w user.max_user_namespaces=2000"));
        let debian = Knobs { unprivileged_clone: Some(0), ..open.clone() };
        assert_eq!(unprivileged(&debian, 1000, true).status, Status::Ok, "root is not restricted");
        let row = unprivileged(&debian, 1000, false);
        assert_eq!(row.status, Status::Warn);
        assert!(row.remedy.unwrap().contains("kernel.unprivileged_userns_clone=1"));
    }

    #[test]
    fn root_maps_a_range_in_a_child() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: not root");
            return;
        }
        let row = privileged(1_000_000, 65536);
        assert_eq!(row.status, Status::Ok, "{row:?}");
    }
}
