//! A `fork` whose child starts in new namespaces, user and pid included, as
//! one `clone` does it: the sandbox's PID 1 comes straight from the creating
//! process, with no intermediate process that makes the user namespace and
//! forks again (see [`super::init`]).
//!
//! A raw `clone` leaves glibc's copy of the thread id (in the thread's
//! descriptor) holding the parent's id, which is wrong in the child, all the
//! more in a new pid namespace. glibc's own `fork` avoids that by passing the
//! address of that field to `clone` with `CLONE_CHILD_SETTID`, so that the
//! kernel writes the child's id there, and re-registers the robust mutex list
//! in the child (`_Fork`). This does the same: the address is the one glibc
//! registered with `set_tid_address` (read back with `PR_GET_TID_ADDRESS`,
//! and checked to hold our thread id), the robust list the one
//! `get_robust_list` returns. What plain `fork` adds on top (atfork handlers,
//! resetting locks other threads might hold) is moot in a single-threaded
//! process with no atfork handlers of ours.
//!
//! Given a cgroup v2 directory, the child starts in it (`clone3` with
//! `CLONE_INTO_CGROUP`) instead of being moved there afterwards: a move
//! takes the kernel's global cgroup threadgroup lock for writing, which
//! waits for an RCU grace period whenever no move happened for a while
//! (milliseconds, sometimes tens: the p99 of a create; see HACKING.md).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::sched::CloneFlags;
use nix::unistd::{ForkResult, Pid};

/// Where glibc keeps this thread's id and its robust mutex list.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ThreadAddrs {
    tid: *mut libc::pid_t,
    robust_head: *mut libc::c_void,
    robust_len: libc::size_t,
}

impl ThreadAddrs {
    /// Reads them back from the kernel. `None` when the kernel cannot tell
    /// (no `CONFIG_CHECKPOINT_RESTORE`) or the registered address does not
    /// hold our thread id: then only `fork` can make a child.
    pub(crate) fn current() -> Option<Self> {
        let mut tid: *mut libc::pid_t = std::ptr::null_mut();
        // SAFETY: PR_GET_TID_ADDRESS stores one pointer at the address given.
        if unsafe { libc::prctl(libc::PR_GET_TID_ADDRESS, &mut tid as *mut *mut libc::pid_t) } != 0 || tid.is_null() {
            return None;
        }
        // SAFETY: gettid has no arguments; the address is glibc's thread
        // descriptor field, readable for as long as the thread lives.
        if unsafe { libc::gettid() != std::ptr::read_volatile(tid) } {
            return None;
        }
        let mut robust_head: *mut libc::c_void = std::ptr::null_mut();
        let mut robust_len: libc::size_t = 0;
        // SAFETY: get_robust_list(0, ...) stores our own list's head and size.
        let rc = unsafe {
            libc::syscall(libc::SYS_get_robust_list, 0, &mut robust_head as *mut *mut libc::c_void, &mut robust_len as *mut libc::size_t)
        };
        (rc == 0).then_some(Self { tid, robust_head, robust_len })
    }
}

/// Whether glibc's copy of our thread id is the kernel's: after
/// [`fork_into`], in the child, that the kernel wrote it.
pub(crate) fn tid_is_right() -> bool {
    ThreadAddrs::current().is_some()
}

/// `struct clone_args` of `clone3(2)`, up to `cgroup` (its second version).
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
/// The same number on x86_64 and aarch64.
const SYS_CLONE3: libc::c_long = 435;

/// `fork`, with the child in the new namespaces `flags` asks for (and, with
/// `CLONE_NEWPID`, PID 1 of the new pid namespace), and in the cgroup v2
/// directory `cgroup` refers to if given. Returns whether the child started
/// in that cgroup: not where the kernel lacks `clone3` (before 5.7).
///
/// # Safety
/// As `fork`: the calling process must be single-threaded (the child may then
/// run any code), and `addrs` must come from [`ThreadAddrs::current`] in this
/// thread.
pub(crate) unsafe fn fork_into(flags: CloneFlags, cgroup: Option<BorrowedFd<'_>>, addrs: ThreadAddrs) -> io::Result<(ForkResult, bool)> {
    let flags = (flags.bits() | libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64;
    if let Some(cgroup) = cgroup {
        let args = CloneArgs {
            flags: flags | CLONE_INTO_CGROUP,
            child_tid: addrs.tid as u64,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: cgroup.as_raw_fd() as u64,
            ..Default::default()
        };
        // A null stack (and size): the child goes on with a copy of ours, as
        // after fork.
        // SAFETY: the caller's contract; the child's id lands in glibc's field.
        let rc = unsafe { libc::syscall(SYS_CLONE3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
        match rc {
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) => {}
            rc => return forked(rc, addrs).map(|r| (r, true)),
        }
    }
    let flags = (flags | libc::SIGCHLD as u64) as libc::c_ulong;
    // SAFETY: as above.
    #[cfg(target_arch = "x86_64")]
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, addrs.tid, 0usize) };
    #[cfg(target_arch = "aarch64")]
    let rc = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, addrs.tid) };
    forked(rc, addrs).map(|r| (r, false))
}

/// The end of a fork-like clone on either side.
fn forked(rc: libc::c_long, addrs: ThreadAddrs) -> io::Result<ForkResult> {
    match rc {
        0 => {
            // SAFETY: the head is glibc's, in our copy of its memory; the
            // kernel dropped the registration on clone, as on fork.
            unsafe { libc::syscall(libc::SYS_set_robust_list, addrs.robust_head, addrs.robust_len) };
            Ok(ForkResult::Child)
        }
        pid if pid > 0 => Ok(ForkResult::Parent { child: Pid::from_raw(pid as i32) }),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_registered_our_thread_id_and_robust_list() {
        // Run in a thread of its own: the test harness's threads are ours too,
        // but only the current one's registration is read.
        let head_is_null = std::thread::spawn(|| ThreadAddrs::current().map(|a| a.robust_head.is_null())).join().unwrap();
        assert_eq!(head_is_null, Some(false), "PR_GET_TID_ADDRESS and get_robust_list on this host");
    }
}
