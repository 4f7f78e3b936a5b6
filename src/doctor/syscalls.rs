//! Kernel interfaces tried for real, harmlessly: seccomp, `pidfd_open`,
//! `clone3`; and overlayfs, looked up in `/proc/filesystems`.

use std::io;
use std::path::Path;

use super::Row;

/// overlayfs. Today's sandbox roots are read-only bind mounts, so its
/// absence is a warning, not a failure.
pub fn overlayfs(proc: &Path) -> Row {
    let path = proc.join("filesystems");
    match std::fs::read_to_string(&path) {
        Ok(text) if text.lines().any(|l| l.split_whitespace().last() == Some("overlay")) => Row::ok("overlayfs", "overlay is in /proc/filesystems"),
        Ok(_) => Row::warn("overlayfs", "overlay is not in /proc/filesystems (module not loaded?)", "modprobe overlay (a kernel with CONFIG_OVERLAY_FS)"),
        Err(e) => Row::warn("overlayfs", format!("cannot read {}: {e}", path.display()), "mount /proc"),
    }
}

/// The filter actions agentd's seccomp programs return.
const ACTIONS: &[(&str, u32)] =
    &[("allow", libc::SECCOMP_RET_ALLOW), ("errno", libc::SECCOMP_RET_ERRNO), ("kill_process", libc::SECCOMP_RET_KILL_PROCESS)];

/// seccomp: the kernel has it (the `Seccomp` field of `<proc>/self/status`)
/// and knows every action agentd's filters return (`SECCOMP_GET_ACTION_AVAIL`,
/// which installs nothing).
pub fn seccomp(proc: &Path) -> Row {
    let remedy = "run a kernel with CONFIG_SECCOMP_FILTER (Linux 4.14 or newer)";
    let status = std::fs::read_to_string(proc.join("self/status")).unwrap_or_default();
    let Some(mode) = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(str::trim) else {
        return Row::fail("seccomp", "no Seccomp field in /proc/self/status: the kernel has no seccomp", remedy);
    };
    let mut missing = Vec::new();
    for &(name, action) in ACTIONS {
        // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 and changes nothing.
        let rc = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_ACTION_AVAIL, 0, &action as *const u32) };
        if rc != 0 {
            missing.push(format!("{name} ({})", io::Error::last_os_error()));
        }
    }
    let own = match mode {
        "0" => "doctor itself runs unfiltered",
        "2" => "doctor itself runs under a filter (a container's?), which sandboxes' filters stack on",
        _ => "doctor itself runs in strict mode",
    };
    if missing.is_empty() {
        Row::ok("seccomp", format!("filters with allow, errno and kill_process actions available; {own}"))
    } else {
        Row::fail("seccomp", format!("actions not available: {}", missing.join(", ")), remedy)
    }
}

/// `pidfd_open` on this process, closed again.
pub fn pidfd_open() -> Row {
    // SAFETY: pidfd_open returns a new descriptor, closed below, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Row::fail("pidfd_open", format!("pidfd_open failed: {e}"), "run Linux 5.3 or newer, without a seccomp filter refusing pidfd_open");
    }
    // SAFETY: the descriptor was just opened, and is ours alone.
    unsafe { libc::close(fd as i32) };
    Row::ok("pidfd_open", "works")
}

/// `struct clone_args` up to `cgroup` (its second version, Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `clone3` with `CLONE_INTO_CGROUP` and a descriptor that is not open, a
/// call that can only fail: EBADF once the kernel got to the descriptor
/// (it has both), E2BIG where it does not know the `cgroup` field (5.3 to
/// 5.6), ENOSYS where there is no clone3 (or a filter says so).
pub fn clone3() -> Row {
    let args = CloneArgs { flags: CLONE_INTO_CGROUP, cgroup: i32::MAX as u64, ..Default::default() };
    // SAFETY: see above: no process can be made from these arguments; the
    // arms below still handle one that was.
    let rc = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    let e = io::Error::last_os_error();
    match rc {
        // SAFETY: in a child that must not exist: leave at once.
        0 => unsafe { libc::_exit(0) },
        pid if pid > 0 => {
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            Row::ok("clone3", "clone3 with CLONE_INTO_CGROUP")
        }
        _ => match e.raw_os_error() {
            Some(libc::EBADF) => Row::ok("clone3", "clone3 with CLONE_INTO_CGROUP: a sandbox starts in its v2 cgroup"),
            Some(libc::E2BIG) => Row::warn("clone3", "clone3 without CLONE_INTO_CGROUP (Linux 5.3 to 5.6)", "run Linux 5.7 or newer"),
            Some(libc::ENOSYS) => Row::warn(
                "clone3",
                "no clone3 (or a seccomp filter around doctor refuses it): sandboxes are moved into their cgroups after they start",
                "run Linux 5.7 or newer, without a filter refusing clone3",
            ),
            _ => Row::warn("clone3", format!("clone3 probe failed: {e}"), "run Linux 5.7 or newer"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    #[test]
    fn reads_overlay_from_a_proc_root() {
        let proc = tempfile::tempdir().unwrap();
        std::fs::write(proc.path().join("filesystems"), "nodev\tsysfs\n\text4\nnodev\toverlay\n").unwrap();
        assert_eq!(overlayfs(proc.path()).status, Status::Ok);
        std::fs::write(proc.path().join("filesystems"), "nodev\tsysfs\n\text4\n").unwrap();
        assert_eq!(overlayfs(proc.path()).status, Status::Warn);
    }

    #[test]
    fn seccomp_without_its_status_field_fails() {
        let proc = tempfile::tempdir().unwrap();
        std::fs::create_dir(proc.path().join("self")).unwrap();
        std::fs::write(proc.path().join("self/status"), "Name:\tx\n").unwrap();
        assert_eq!(seccomp(proc.path()).status, Status::Fail);
    }

    #[test]
    fn this_host_has_what_the_probes_try() {
        assert_eq!(seccomp(Path::new("/proc")).status, Status::Ok);
        assert_eq!(pidfd_open().status, Status::Ok);
        let row = clone3();
        assert_ne!(row.status, Status::Fail, "{row:?}");
    }
}
