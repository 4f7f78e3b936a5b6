//! The seccomp filter agents run under: Docker's default profile turned around
//! (allow everything, refuse a reviewed list), compiled with `seccompiler`.
//!
//! # Policy
//!
//! The default policy is data, one file per architecture beside this one
//! (`seccomp_policy.x86_64.json`, `seccomp_policy.aarch64.json`), the way
//! firecracker keeps its own: every refused syscall carries a `comment` saying
//! why, and the tests below fail on an entry without one. The files are in
//! seccompiler's JSON format (not Docker's or OCI's): a map from a filter name to
//! `{mismatch_action, filter_action, filter: [{syscall, args?, comment}]}`.
//! `build.rs` compiles the file of the target architecture to BPF at build
//! time (with [`super::seccomp_link`], the code custom policies use at run
//! time), so [`default_program`] is a copy of constant instructions; a test
//! checks them against a run-time compile of the same JSON.
//! The default policy has two filters, both falling through to allow:
//!
//! - `eperm` (`EPERM`): mounts, namespaces (`unshare`/`clone` with a
//!   `CLONE_NEW*` flag, `setns`), hostnames, keyrings, bpf, perf, fanotify,
//!   NUMA policy, modules and kexec, clocks, the ptrace family, file handles,
//!   odd personas, `TIOCSTI`/`TIOCLINUX`, `AF_VSOCK` sockets: what Docker's
//!   default profile refuses a container without capabilities (and ptrace,
//!   `name_to_handle_at` and io_uring, which it allows).
//! - `enosys` (`ENOSYS`): `clone3`, whose flags a filter cannot read, so libc
//!   falls back to `clone`; and io_uring, which a kernel without it also answers
//!   with ENOSYS.
//!
//! `chroot` stays allowed: without `CAP_SYS_CHROOT`, which agents do not keep
//! (see [`super::harden`]), it fails anyway, and allowing it keeps the list to
//! calls that matter.
//!
//! # Linking several filters into one program
//!
//! seccompiler gives one action per filter, so each filter compiles on its own
//! and `link` joins them: in every filter but the last, each `RET ALLOW`
//! becomes a jump to the start of the next filter. A syscall is thus allowed
//! only if every filter allows it, and otherwise the first filter (in name
//! order) that refuses it decides. The kernel would do much the same with
//! stacked filters, but one program means one `seccomp(2)` call in the child.
//!
//! # A search on the syscall number
//!
//! The linked program is then rewritten (`seccomp_dispatch.rs`) into a
//! binary search on the syscall number that answers exactly as the linked
//! chain does (checked on every number around every constant, with many
//! argument values): half the instructions, and a few comparisons to any
//! syscall's rules. Installing the default x86_64 filter takes the kernel
//! ~213 µs as the 475-instruction chain and ~49 µs as the 238-instruction
//! search (fork, install, median of 300, on this project's 2-vCPU test VM),
//! paid at every agent's and terminal command's start.
//!
//! # Architectures
//!
//! Every program starts with a guard this module writes by hand, before any
//! seccompiler output:
//!
//! 1. The audit arch must be the native one (`AUDIT_ARCH_X86_64` or
//!    `AUDIT_ARCH_AARCH64`), or the process is killed (`SECCOMP_RET_KILL_PROCESS`,
//!    seen as SIGSYS). That catches i386 compat syscalls (`int 0x80` from a
//!    64-bit process reports `AUDIT_ARCH_I386`) and AArch32 ones. seccompiler's
//!    own output starts with the same check (it also kills on a mismatch), so
//!    this one is redundant today; it is kept so the guard below never reads a
//!    syscall number of the wrong table.
//! 2. On x86_64 only: x32 syscalls share `AUDIT_ARCH_X86_64` and differ only by
//!    `__X32_SYSCALL_BIT` (0x4000_0000) in the number, so a rule for `mount`
//!    (165) would not match x32's `mount` (0x4000_00a5). Any number at or above
//!    the bit kills the process, except -1 (0xffff_ffff), which is no syscall:
//!    the kernel answers it with ENOSYS, and tracers use it to skip calls.
//!
//! # Installing
//!
//! [`install`] is two raw syscalls (`prctl(PR_SET_NO_NEW_PRIVS)` and
//! `seccomp(SECCOMP_SET_MODE_FILTER)`), safe to call between `fork` and `exec`.
//! seccompiler's `apply_filter` does the same today; it is not used so that the
//! no-allocation promise does not rest on another crate's internals.

use std::io;

use seccompiler::{BpfProgram, TargetArch, sock_filter};

#[cfg(test)]
use crate::seccomp_link::*;
use crate::seccomp_link::{self, LinkError, MAX_INSNS};

#[cfg(all(test, target_arch = "x86_64"))]
const DEFAULT_POLICY: Option<&str> = Some(include_str!("seccomp_policy.x86_64.json"));
#[cfg(all(test, target_arch = "aarch64"))]
const DEFAULT_POLICY: Option<&str> = Some(include_str!("seccomp_policy.aarch64.json"));
#[cfg(all(test, not(any(target_arch = "x86_64", target_arch = "aarch64"))))]
const DEFAULT_POLICY: Option<&str> = None;

// `DEFAULT_BPF: Option<&[sock_filter]>`: the default policy of the target
// architecture, compiled and linked by build.rs with `seccomp_link` (a policy
// that does not compile fails the build).
include!(concat!(env!("OUT_DIR"), "/seccomp_default.rs"));

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// Bad JSON, an unknown syscall name for the architecture, or a filter
    /// seccompiler refuses (say, identical match and mismatch actions).
    #[error("seccomp policy does not compile")]
    Compile(#[from] seccompiler::Error),
    #[error("seccomp policy has no filter")]
    NoFilter,
    #[error("seccomp program has {0} instructions; the kernel takes at most {MAX_INSNS}")]
    TooLarge(usize),
    #[error("no seccomp policy for this architecture ({0})")]
    UnsupportedArch(&'static str),
}

/// A compiled, linked and checked BPF program. Only this module builds one, so
/// a value of this type is always a program the kernel will accept in length
/// and that starts with the architecture guard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeccompProgram {
    /// Never empty, at most [`MAX_INSNS`] long: checked in [`link`].
    insns: BpfProgram,
}

impl SeccompProgram {
    pub fn instructions(&self) -> &[sock_filter] {
        &self.insns
    }
}

/// The built-in policy for the architecture this binary targets, compiled at
/// build time: no JSON parse at run time, only a copy of the instructions.
pub fn default_program() -> Result<SeccompProgram, SeccompError> {
    let insns = DEFAULT_BPF.ok_or(SeccompError::UnsupportedArch(std::env::consts::ARCH))?;
    Ok(SeccompProgram { insns: insns.to_vec() })
}

/// Compiles a profile's own policy, given in seccompiler's JSON format (a map
/// of named filters, each `{mismatch_action, filter_action, filter}`): not
/// Docker's or OCI's format. Filters are linked in name order as described in
/// the module docs, and the architecture guard is added in front as for the
/// default policy.
pub fn compile_custom(json: &str) -> Result<SeccompProgram, SeccompError> {
    compile(json, native_arch()?)
}

/// Sets `no_new_privs` (which the kernel demands of a process without
/// `CAP_SYS_ADMIN` before it takes a filter) and installs `prog` on the
/// calling thread.
///
/// Async-signal-safe: two raw syscalls, no allocation, no lock; meant for a
/// `pre_exec` hook after `fork` in a multi-threaded parent. The filter is
/// inherited across `fork`, `clone` and `execve`, and cannot be removed.
pub fn install(prog: &SeccompProgram) -> io::Result<()> {
    // Mirrors `struct sock_fprog`; seccompiler's `sock_filter` is `repr(C)`
    // and laid out as the kernel's.
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const sock_filter,
    }

    // SAFETY: prctl with plain integer arguments touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let fprog = SockFprog {
        // Cannot truncate: link() caps the length at MAX_INSNS.
        len: prog.insns.len() as libc::c_ushort,
        filter: prog.insns.as_ptr(),
    };
    // SAFETY: `fprog` points at `prog.insns`, which outlives the call; the
    // kernel copies the program in and keeps no pointer to our memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            &fprog as *const SockFprog,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn native_arch() -> Result<TargetArch, SeccompError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| SeccompError::UnsupportedArch(std::env::consts::ARCH))
}

fn compile(json: &str, arch: TargetArch) -> Result<SeccompProgram, SeccompError> {
    match seccomp_link::compile(json, arch) {
        Ok(insns) => Ok(SeccompProgram { insns }),
        Err(LinkError::Compile(e)) => Err(SeccompError::Compile(e)),
        Err(LinkError::NoFilter) => Err(SeccompError::NoFilter),
        Err(LinkError::TooLarge(n)) => Err(SeccompError::TooLarge(n)),
    }
}

/// Running a closure in a forked child, for the enforcement tests here and in
/// [`super::harden`]: a filter, once installed, cannot be taken off the test
/// process.
#[cfg(test)]
pub(crate) mod child {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    /// Exit code of a child whose closure panicked.
    pub const PANICKED: i32 = 250;

    #[derive(Debug, PartialEq, Eq)]
    pub enum End {
        Exited(i32),
        Signaled(i32),
    }

    /// Forks, runs `body` in the child and `_exit`s with what it returns.
    /// `body` should stick to raw syscalls: the test harness may have other
    /// threads, whose locks the child inherits held.
    pub fn run(body: impl FnOnce() -> i32) -> End {
        // SAFETY: the child runs only `body` and then `_exit`s, never
        // returning into the harness nor running its atexit handlers.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = catch_unwind(AssertUnwindSafe(body)).unwrap_or(PANICKED);
            // SAFETY: _exit is async-signal-safe and ends only this child.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; `status` is a valid out pointer.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            if rc == pid {
                break;
            }
            let err = std::io::Error::last_os_error();
            assert_eq!(
                err.kind(),
                std::io::ErrorKind::Interrupted,
                "waitpid: {err}"
            );
        }
        if libc::WIFEXITED(status) {
            End::Exited(libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            End::Signaled(libc::WTERMSIG(status))
        } else {
            panic!("unexpected wait status {status:#x}")
        }
    }

    /// The calling thread's errno, without allocating.
    pub fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// Core dumps off: this host's `core_pattern` is `core`, and the SIGSYS
    /// kills below would otherwise leave core files in the working directory.
    pub fn no_core_dumps() {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads a valid rlimit; failure only means cores.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::*;

    const X86_64_POLICY: &str = include_str!("seccomp_policy.x86_64.json");
    const AARCH64_POLICY: &str = include_str!("seccomp_policy.aarch64.json");

    /// The syscalls the review asked to refuse with EPERM.
    const EPERM: &[&str] = &[
        "mount",
        "umount2",
        "pivot_root",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsconfig",
        "fsmount",
        "fspick",
        "mount_setattr",
        "unshare",
        "clone",
        "setns",
        "sethostname",
        "setdomainname",
        "keyctl",
        "add_key",
        "request_key",
        "bpf",
        "perf_event_open",
        "fanotify_init",
        "get_mempolicy",
        "set_mempolicy",
        "set_mempolicy_home_node",
        "mbind",
        "move_pages",
        "migrate_pages",
        "kexec_load",
        "kexec_file_load",
        "init_module",
        "finit_module",
        "delete_module",
        "reboot",
        "swapon",
        "swapoff",
        "open_by_handle_at",
        "name_to_handle_at",
        "userfaultfd",
        "personality",
        "clock_settime",
        "clock_adjtime",
        "settimeofday",
        "adjtimex",
        "acct",
        "quotactl",
        "quotactl_fd",
        "lookup_dcookie",
        "vhangup",
        "syslog",
        "ptrace",
        "process_vm_readv",
        "process_vm_writev",
        "kcmp",
        "pidfd_getfd",
        "process_madvise",
        "nfsservctl",
        "iopl",
        "ioperm",
        "create_module",
        "get_kernel_syms",
        "query_module",
        "sysfs",
        "ustat",
        "_sysctl",
        "ioctl",
        "socket",
    ];
    const ENOSYS: &[&str] = &[
        "clone3",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
    ];

    /// Syscalls aarch64 does not have, the only allowed difference between the
    /// two policy files.
    const X86_64_ONLY: &[&str] = &[
        "iopl",
        "ioperm",
        "create_module",
        "get_kernel_syms",
        "query_module",
        "uselib",
        "sysfs",
        "ustat",
        "_sysctl",
    ];

    /// filter name -> (errno of its action, syscall names).
    fn policy_table(json: &str) -> BTreeMap<String, (u64, BTreeSet<String>)> {
        let doc: Value = serde_json::from_str(json).unwrap();
        let mut table = BTreeMap::new();
        for (name, filter) in doc.as_object().unwrap() {
            assert_eq!(filter["mismatch_action"], "allow", "{name}");
            let errno = filter["filter_action"]["errno"].as_u64().unwrap();
            let syscalls = filter["filter"]
                .as_array()
                .unwrap()
                .iter()
                .map(|rule| rule["syscall"].as_str().unwrap().to_owned())
                .collect();
            table.insert(name.clone(), (errno, syscalls));
        }
        table
    }

    #[test]
    fn default_program_compiles_behind_the_guard() {
        let prog = default_program().unwrap();
        let insns = prog.instructions();
        assert!(!insns.is_empty() && insns.len() <= MAX_INSNS);
        let guard = arch_guard(native_arch().unwrap());
        assert_eq!(&insns[..guard.len()], &guard[..]);
        // Then the search on the syscall number (`seccomp_dispatch`).
        assert_eq!(insns[guard.len()], stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR));
    }

    #[test]
    fn build_time_program_is_the_reviewed_policy_compiled() {
        let at_run_time = compile(DEFAULT_POLICY.unwrap(), native_arch().unwrap()).unwrap();
        assert_eq!(default_program().unwrap(), at_run_time);
    }

    #[test]
    fn return_values_match_libc() {
        assert_eq!(SECCOMP_RET_ALLOW, libc::SECCOMP_RET_ALLOW);
        assert_eq!(SECCOMP_RET_KILL_PROCESS, libc::SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn x86_64_guard_is_exact() {
        let guard: Vec<_> = arch_guard(TargetArch::x86_64)
            .iter()
            .map(|i| (i.code, i.jt, i.jf, i.k))
            .collect();
        #[rustfmt::skip]
        assert_eq!(guard, [
            (0x20, 0, 0, 4),            // ld arch
            (0x15, 1, 0, 0xc000_003e),  // jeq AUDIT_ARCH_X86_64, +1
            (0x06, 0, 0, 0x8000_0000),  // ret KILL_PROCESS
            (0x20, 0, 0, 0),            // ld nr
            (0x35, 0, 2, 0x4000_0000),  // jge X32_SYSCALL_BIT, +0, +2
            (0x15, 1, 0, 0xffff_ffff),  // jeq -1, +1
            (0x06, 0, 0, 0x8000_0000),  // ret KILL_PROCESS
        ]);
    }

    #[test]
    fn policy_refuses_every_reviewed_syscall() {
        let table = policy_table(X86_64_POLICY);
        assert_eq!(table["eperm"].0, libc::EPERM as u64);
        assert_eq!(table["enosys"].0, libc::ENOSYS as u64);
        for name in EPERM {
            assert!(
                table["eperm"].1.contains(*name),
                "{name} missing from eperm"
            );
        }
        for name in ENOSYS {
            assert!(
                table["enosys"].1.contains(*name),
                "{name} missing from enosys"
            );
        }
    }

    #[test]
    fn every_rule_says_why() {
        for json in [X86_64_POLICY, AARCH64_POLICY] {
            let doc: Value = serde_json::from_str(json).unwrap();
            for filter in doc.as_object().unwrap().values() {
                for rule in filter["filter"].as_array().unwrap() {
                    let why = rule["comment"].as_str().unwrap_or_default();
                    assert!(why.len() > 10, "no reason given for {rule}");
                }
            }
        }
    }

    /// seccompiler drops an unconditional entry for a syscall that also has
    /// conditional ones (an empty chain means "always"; a non-empty one only
    /// its rules), so the policy must never mix the two.
    #[test]
    fn no_syscall_is_both_conditional_and_unconditional() {
        for json in [X86_64_POLICY, AARCH64_POLICY] {
            let doc: Value = serde_json::from_str(json).unwrap();
            for filter in doc.as_object().unwrap().values() {
                let mut with_args = BTreeSet::new();
                let mut bare = BTreeSet::new();
                for rule in filter["filter"].as_array().unwrap() {
                    let name = rule["syscall"].as_str().unwrap();
                    if rule.get("args").is_some() {
                        with_args.insert(name);
                    } else {
                        assert!(bare.insert(name), "{name} listed twice");
                    }
                }
                assert!(
                    with_args.is_disjoint(&bare),
                    "{:?}",
                    with_args.intersection(&bare)
                );
            }
        }
    }

    #[test]
    fn aarch64_policy_matches_x86_64_and_compiles() {
        let x86 = policy_table(X86_64_POLICY);
        let arm = policy_table(AARCH64_POLICY);
        assert_eq!(
            x86.keys().collect::<Vec<_>>(),
            arm.keys().collect::<Vec<_>>()
        );
        for (name, (errno, syscalls)) in &x86 {
            let expected: BTreeSet<String> = syscalls
                .iter()
                .filter(|s| !X86_64_ONLY.contains(&s.as_str()))
                .cloned()
                .collect();
            assert_eq!(arm[name].0, *errno, "{name}");
            assert_eq!(arm[name].1, expected, "{name}");
        }
        let prog = compile(AARCH64_POLICY, TargetArch::aarch64).unwrap();
        assert_eq!(
            &prog.instructions()[..3],
            &arch_guard(TargetArch::aarch64)[..]
        );
    }

    #[test]
    fn linking_leaves_allow_only_in_the_last_filter() {
        let json = r#"{
            "a": {"mismatch_action": "allow", "filter_action": {"errno": 1},
                  "filter": [{"syscall": "mount"}]},
            "b": {"mismatch_action": "allow", "filter_action": {"errno": 38},
                  "filter": [{"syscall": "clone3"}]}
        }"#;
        let filters = seccompiler::compile_from_json(json.as_bytes(), TargetArch::x86_64).unwrap();
        let a = &filters["a"];
        // Linked as they are, before the search on the number replaces them.
        let insns = link(TargetArch::x86_64, vec![a.clone(), filters["b"].clone()]).unwrap();
        let guard = arch_guard(TargetArch::x86_64).len();
        let allow = stmt(BPF_RET_K, SECCOMP_RET_ALLOW);
        let first = &insns[guard..guard + a.len()];
        assert!(!first.contains(&allow));
        // Each RET ALLOW of "a" became a jump to the start of "b"; the rest of
        // "a" is untouched.
        let mut rewritten = 0;
        for (at, (linked, original)) in first.iter().zip(a).enumerate() {
            if *original == allow {
                assert_eq!(linked.code, BPF_JMP_JA);
                assert_eq!(at + 1 + linked.k as usize, a.len());
                rewritten += 1;
            } else {
                assert_eq!(linked, original);
            }
        }
        assert!(rewritten > 0);
        assert!(insns[guard + a.len()..].contains(&allow));
    }

    #[test]
    fn custom_policies_are_checked() {
        let unknown = r#"{"f": {"mismatch_action": "allow", "filter_action": {"errno": 1},
                               "filter": [{"syscall": "no_such_call"}]}}"#;
        assert!(matches!(
            compile_custom(unknown),
            Err(SeccompError::Compile(_))
        ));
        let same_actions = r#"{"f": {"mismatch_action": "allow", "filter_action": "allow",
                                    "filter": [{"syscall": "mount"}]}}"#;
        assert!(matches!(
            compile_custom(same_actions),
            Err(SeccompError::Compile(_))
        ));
        assert!(matches!(compile_custom("{}"), Err(SeccompError::NoFilter)));
        assert!(matches!(
            compile_custom("not json"),
            Err(SeccompError::Compile(_))
        ));
        let ok = r#"{"f": {"mismatch_action": "allow", "filter_action": {"errno": 1},
                          "filter": [{"syscall": "mount", "comment": "no mounts"}]}}"#;
        assert!(!compile_custom(ok).unwrap().instructions().is_empty());
    }

    mod enforcement {
        use super::super::child::{self, End, errno};
        use super::super::*;

        /// What a syscall made under the filter came to.
        #[derive(Debug, PartialEq, Eq)]
        enum Outcome {
            Allowed,
            Errno(i32),
            Killed(i32),
        }

        /// Exit code for "the filter would not install".
        const INSTALL_FAILED: i32 = 251;

        /// Runs `call` in a child, under the default filter if `filtered`.
        /// `call` returns the raw result: negative means "failed, see errno".
        fn outcome_of(filtered: bool, call: fn() -> i64) -> Outcome {
            let prog = default_program().unwrap();
            let end = child::run(|| {
                child::no_core_dumps();
                if filtered && install(&prog).is_err() {
                    return INSTALL_FAILED;
                }
                // errno values fit in an exit code; 0 means success.
                if call() < 0 { errno() } else { 0 }
            });
            match end {
                End::Exited(0) => Outcome::Allowed,
                End::Exited(INSTALL_FAILED) => panic!("seccomp filter did not install"),
                End::Exited(child::PANICKED) => panic!("child panicked"),
                End::Exited(code) => Outcome::Errno(code),
                End::Signaled(sig) => Outcome::Killed(sig),
            }
        }

        fn under_filter(call: fn() -> i64) -> Outcome {
            outcome_of(true, call)
        }

        fn without_filter(call: fn() -> i64) -> Outcome {
            outcome_of(false, call)
        }

        // Each syscall below is made with arguments that fail differently (or
        // succeed harmlessly) without the filter, so EPERM can only come from it.

        fn mount_tmpfs() -> i64 {
            // SAFETY: valid C strings; the target does not exist, so without
            // the filter the kernel answers ENOENT and mounts nothing.
            unsafe {
                libc::mount(
                    c"none".as_ptr(),
                    c"/nonexistent/agentd-seccomp-test".as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            }
            .into()
        }

        fn unshare_user() -> i64 {
            // SAFETY: changes only this (single-threaded) forked child.
            unsafe { libc::unshare(libc::CLONE_NEWUSER) }.into()
        }

        fn unshare_files() -> i64 {
            // SAFETY: gives this child a private fd table; nothing else.
            unsafe { libc::unshare(libc::CLONE_FILES) }.into()
        }

        fn clone_newuser() -> i64 {
            // SAFETY: with a null stack, clone behaves like fork; should the
            // filter let it through, the new process exits at once.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
                    0,
                    0,
                    0,
                    0,
                )
            };
            if pid == 0 {
                // SAFETY: _exit in the new process.
                unsafe { libc::_exit(0) };
            }
            pid
        }

        fn clone3_null() -> i64 {
            // SAFETY: a null, zero-sized argument: EINVAL without the filter.
            unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) }
        }

        fn io_uring_setup() -> i64 {
            // SAFETY: null params: EFAULT without the filter.
            unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, std::ptr::null::<u8>()) }
        }

        fn dev_null() -> libc::c_int {
            // SAFETY: valid C string.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) }
        }

        fn tiocsti() -> i64 {
            let c = b'x';
            // SAFETY: /dev/null is no tty: ENOTTY without the filter.
            unsafe { libc::ioctl(dev_null(), libc::TIOCSTI, &c) }.into()
        }

        fn tiocsti_high_bits() -> i64 {
            let c = b'x';
            // The kernel reads the request as an unsigned int, so junk in the
            // upper half must not slip past the filter.
            #[allow(
                clippy::unnecessary_cast,
                reason = "an Ioctl is u64 on glibc, i32 on musl"
            )]
            let request = (1u64 << 32) | libc::TIOCSTI as u64;
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_ioctl, dev_null(), request, &c) }
        }

        fn tioclinux() -> i64 {
            let sub = 2u8;
            // SAFETY: /dev/null is no tty: ENOTTY without the filter.
            unsafe { libc::ioctl(dev_null(), libc::TIOCLINUX, &sub) }.into()
        }

        fn fioclex() -> i64 {
            // SAFETY: sets close-on-exec on our own fd.
            unsafe { libc::ioctl(dev_null(), libc::FIOCLEX) }.into()
        }

        fn keyctl_session() -> i64 {
            const KEYCTL_GET_KEYRING_ID: libc::c_long = 0;
            const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
            // SAFETY: integer arguments only.
            unsafe {
                libc::syscall(
                    libc::SYS_keyctl,
                    KEYCTL_GET_KEYRING_ID,
                    KEY_SPEC_SESSION_KEYRING,
                    0,
                )
            }
        }

        fn bpf_null() -> i64 {
            // SAFETY: a null attribute pointer, refused before use.
            unsafe { libc::syscall(libc::SYS_bpf, 0, std::ptr::null::<u8>(), 0u32) }
        }

        fn personality_query() -> i64 {
            // SAFETY: 0xffffffff only reads the persona.
            unsafe { libc::personality(0xffff_ffff) }.into()
        }

        /// linux/personality.h; libc does not export it.
        const PER_LINUX32: libc::c_ulong = 0x0008;

        fn personality_linux32() -> i64 {
            // SAFETY: changes this child's persona only.
            unsafe { libc::personality(PER_LINUX32) }.into()
        }

        fn personality_no_aslr() -> i64 {
            // SAFETY: changes this child's persona only.
            unsafe { libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong) }.into()
        }

        fn ptrace_traceme() -> i64 {
            // SAFETY: integer arguments only.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) }
        }

        fn setns_bad_fd() -> i64 {
            // SAFETY: integer arguments only: EBADF without the filter.
            unsafe { libc::setns(-1, 0) }.into()
        }

        fn getpid() -> i64 {
            // SAFETY: no arguments.
            unsafe { libc::getpid() }.into()
        }

        fn fork_and_reap() -> i64 {
            // SAFETY: the new process only `_exit`s.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: as above.
                unsafe { libc::_exit(7) };
            }
            if pid < 0 {
                return -1;
            }
            let mut status = 0;
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7 {
                0
            } else {
                -1
            }
        }

        extern "C" fn thread_body(_: *mut libc::c_void) -> *mut libc::c_void {
            std::ptr::null_mut()
        }

        fn spawn_thread() -> i64 {
            // pthread_create rather than std::thread: glibc resets its own
            // locks in a forked child, std's would need the harness's threads
            // to be idle. glibc tries clone3 first and falls back to clone on
            // the ENOSYS the filter gives it.
            let mut thread: libc::pthread_t = 0;
            // SAFETY: default attributes; `thread_body` ignores its argument.
            let rc = unsafe {
                libc::pthread_create(
                    &mut thread,
                    std::ptr::null(),
                    thread_body,
                    std::ptr::null_mut(),
                )
            };
            if rc != 0 {
                return -1;
            }
            // SAFETY: joins the thread just made.
            if unsafe { libc::pthread_join(thread, std::ptr::null_mut()) } != 0 {
                -1
            } else {
                0
            }
        }

        #[cfg(target_arch = "x86_64")]
        fn x32_getpid() -> i64 {
            // SAFETY: no arguments; without the filter (and with x32 off, as
            // on this kernel) the answer is ENOSYS.
            unsafe { libc::syscall(X32_SYSCALL_BIT as libc::c_long | libc::SYS_getpid) }
        }

        fn no_syscall() -> i64 {
            // SAFETY: -1 is no syscall; the kernel answers ENOSYS.
            unsafe { libc::syscall(-1) }
        }

        #[cfg(target_arch = "x86_64")]
        fn i386_getpid() -> i64 {
            let ret: i32;
            // SAFETY: `int 0x80` enters the i386 compat table; eax = 20 is its
            // getpid, which takes no argument and touches no memory. r8-r11
            // are marked clobbered because old kernels zeroed them on this path.
            unsafe {
                core::arch::asm!(
                    "int 0x80",
                    inlateout("eax") 20i32 => ret,
                    lateout("r8") _, lateout("r9") _, lateout("r10") _, lateout("r11") _,
                    options(nostack),
                );
            }
            ret.into()
        }

        #[test]
        fn mount_is_refused() {
            assert_eq!(without_filter(mount_tmpfs), Outcome::Errno(libc::ENOENT));
            assert_eq!(under_filter(mount_tmpfs), Outcome::Errno(libc::EPERM));
        }

        #[test]
        fn user_namespaces_are_refused() {
            assert_eq!(without_filter(unshare_user), Outcome::Allowed);
            assert_eq!(under_filter(unshare_user), Outcome::Errno(libc::EPERM));
            assert_eq!(under_filter(clone_newuser), Outcome::Errno(libc::EPERM));
            assert_eq!(under_filter(setns_bad_fd), Outcome::Errno(libc::EPERM));
        }

        #[test]
        fn unshare_without_namespaces_is_allowed() {
            assert_eq!(under_filter(unshare_files), Outcome::Allowed);
        }

        #[test]
        fn clone3_looks_absent() {
            assert_eq!(without_filter(clone3_null), Outcome::Errno(libc::EINVAL));
            assert_eq!(under_filter(clone3_null), Outcome::Errno(libc::ENOSYS));
        }

        #[test]
        fn io_uring_looks_absent() {
            assert_eq!(without_filter(io_uring_setup), Outcome::Errno(libc::EFAULT));
            assert_eq!(under_filter(io_uring_setup), Outcome::Errno(libc::ENOSYS));
        }

        #[test]
        fn terminal_injection_is_refused() {
            assert_eq!(without_filter(tiocsti), Outcome::Errno(libc::ENOTTY));
            assert_eq!(under_filter(tiocsti), Outcome::Errno(libc::EPERM));
            assert_eq!(under_filter(tiocsti_high_bits), Outcome::Errno(libc::EPERM));
            assert_eq!(under_filter(tioclinux), Outcome::Errno(libc::EPERM));
            assert_eq!(under_filter(fioclex), Outcome::Allowed);
        }

        #[test]
        fn keyrings_and_bpf_are_refused() {
            assert_eq!(without_filter(keyctl_session), Outcome::Allowed);
            assert_eq!(under_filter(keyctl_session), Outcome::Errno(libc::EPERM));
            assert_ne!(without_filter(bpf_null), Outcome::Errno(libc::EPERM));
            assert_eq!(under_filter(bpf_null), Outcome::Errno(libc::EPERM));
        }

        #[test]
        fn ptrace_is_refused() {
            assert_eq!(without_filter(ptrace_traceme), Outcome::Allowed);
            assert_eq!(under_filter(ptrace_traceme), Outcome::Errno(libc::EPERM));
        }

        #[test]
        fn only_docker_personas_are_allowed() {
            assert_eq!(under_filter(personality_query), Outcome::Allowed);
            assert_eq!(under_filter(personality_linux32), Outcome::Allowed);
            assert_eq!(without_filter(personality_no_aslr), Outcome::Allowed);
            assert_eq!(
                under_filter(personality_no_aslr),
                Outcome::Errno(libc::EPERM)
            );
        }

        #[test]
        fn ordinary_process_life_goes_on() {
            assert_eq!(under_filter(getpid), Outcome::Allowed);
            assert_eq!(under_filter(fork_and_reap), Outcome::Allowed);
            assert_eq!(under_filter(spawn_thread), Outcome::Allowed);
            assert_eq!(under_filter(no_syscall), Outcome::Errno(libc::ENOSYS));
        }

        #[cfg(target_arch = "x86_64")]
        #[test]
        fn x32_syscalls_kill() {
            assert_eq!(without_filter(x32_getpid), Outcome::Errno(libc::ENOSYS));
            assert_eq!(under_filter(x32_getpid), Outcome::Killed(libc::SIGSYS));
        }

        #[cfg(target_arch = "x86_64")]
        #[test]
        fn i386_syscalls_kill() {
            assert_eq!(without_filter(i386_getpid), Outcome::Allowed);
            assert_eq!(under_filter(i386_getpid), Outcome::Killed(libc::SIGSYS));
        }

        /// Every rule of the default policy, checked in the kernel, as
        /// firecracker checks its own: the policy is compiled with each
        /// filter's errno replaced by a sentinel, and each rule's syscall is
        /// made under it with arguments that meet the rule's conditions. Many
        /// of these calls fail with EPERM anyway for want of a capability, so
        /// only the sentinel shows that the filter, and which filter, refused
        /// them.
        mod every_rule {
            use std::collections::BTreeMap;

            use serde_json::{Value, json};

            use super::super::super::*;
            use super::{INSTALL_FAILED, Outcome};
            use crate::seccomp::child::{self, End, errno};

            /// Filter `i` of the policy (in name order) answers `SENTINEL + i`:
            /// no kernel path returns such an errno (the largest, EHWPOISON,
            /// is 133), and it still fits an exit code.
            const SENTINEL: i32 = 200;

            /// Exit code for "could not make the user namespace".
            const USERNS_FAILED: i32 = 252;

            /// `SECCOMP_RET_ERRNO` (linux/seccomp.h) and the mask of the action.
            const RET_ERRNO: u32 = 0x0005_0000;
            const RET_ACTION: u32 = 0xffff_0000;

            /// The policy's syscall names on this architecture, with libc's
            /// numbers (seccompiler keeps its table private). A rule naming a
            /// syscall missing here fails the test, naming it.
            fn number(name: &str) -> Option<libc::c_long> {
                let common = [
                    ("mount", libc::SYS_mount),
                    ("umount2", libc::SYS_umount2),
                    ("pivot_root", libc::SYS_pivot_root),
                    ("move_mount", libc::SYS_move_mount),
                    ("open_tree", libc::SYS_open_tree),
                    ("fsopen", libc::SYS_fsopen),
                    ("fsconfig", libc::SYS_fsconfig),
                    ("fsmount", libc::SYS_fsmount),
                    ("fspick", libc::SYS_fspick),
                    ("mount_setattr", libc::SYS_mount_setattr),
                    ("unshare", libc::SYS_unshare),
                    ("clone", libc::SYS_clone),
                    ("clone3", libc::SYS_clone3),
                    ("setns", libc::SYS_setns),
                    ("sethostname", libc::SYS_sethostname),
                    ("setdomainname", libc::SYS_setdomainname),
                    ("keyctl", libc::SYS_keyctl),
                    ("add_key", libc::SYS_add_key),
                    ("request_key", libc::SYS_request_key),
                    ("bpf", libc::SYS_bpf),
                    ("perf_event_open", libc::SYS_perf_event_open),
                    ("fanotify_init", libc::SYS_fanotify_init),
                    ("userfaultfd", libc::SYS_userfaultfd),
                    ("get_mempolicy", libc::SYS_get_mempolicy),
                    ("set_mempolicy", libc::SYS_set_mempolicy),
                    ("set_mempolicy_home_node", libc::SYS_set_mempolicy_home_node),
                    ("mbind", libc::SYS_mbind),
                    ("move_pages", libc::SYS_move_pages),
                    ("migrate_pages", libc::SYS_migrate_pages),
                    ("kexec_load", libc::SYS_kexec_load),
                    ("kexec_file_load", libc::SYS_kexec_file_load),
                    ("init_module", libc::SYS_init_module),
                    ("finit_module", libc::SYS_finit_module),
                    ("delete_module", libc::SYS_delete_module),
                    ("reboot", libc::SYS_reboot),
                    ("swapon", libc::SYS_swapon),
                    ("swapoff", libc::SYS_swapoff),
                    ("acct", libc::SYS_acct),
                    ("quotactl", libc::SYS_quotactl),
                    ("quotactl_fd", libc::SYS_quotactl_fd),
                    ("lookup_dcookie", libc::SYS_lookup_dcookie),
                    ("vhangup", libc::SYS_vhangup),
                    ("syslog", libc::SYS_syslog),
                    ("nfsservctl", libc::SYS_nfsservctl),
                    ("clock_settime", libc::SYS_clock_settime),
                    ("clock_adjtime", libc::SYS_clock_adjtime),
                    ("settimeofday", libc::SYS_settimeofday),
                    ("adjtimex", libc::SYS_adjtimex),
                    ("ptrace", libc::SYS_ptrace),
                    ("process_vm_readv", libc::SYS_process_vm_readv),
                    ("process_vm_writev", libc::SYS_process_vm_writev),
                    ("process_madvise", libc::SYS_process_madvise),
                    ("kcmp", libc::SYS_kcmp),
                    ("pidfd_getfd", libc::SYS_pidfd_getfd),
                    ("open_by_handle_at", libc::SYS_open_by_handle_at),
                    ("name_to_handle_at", libc::SYS_name_to_handle_at),
                    ("personality", libc::SYS_personality),
                    ("ioctl", libc::SYS_ioctl),
                    ("socket", libc::SYS_socket),
                    ("io_uring_setup", libc::SYS_io_uring_setup),
                    ("io_uring_enter", libc::SYS_io_uring_enter),
                    ("io_uring_register", libc::SYS_io_uring_register),
                ];
                #[cfg(target_arch = "x86_64")]
                let arch = [
                    ("iopl", libc::SYS_iopl),
                    ("ioperm", libc::SYS_ioperm),
                    ("uselib", libc::SYS_uselib),
                    ("sysfs", libc::SYS_sysfs),
                    ("ustat", libc::SYS_ustat),
                    ("_sysctl", libc::SYS__sysctl),
                    // Gone from libc with the syscalls (Linux 2.6); the
                    // numbers stay reserved in arch/x86/entry/syscalls.
                    ("create_module", 174),
                    ("get_kernel_syms", 177),
                    ("query_module", 178),
                ];
                #[cfg(not(target_arch = "x86_64"))]
                let arch: [(&str, libc::c_long); 0] = [];
                common.into_iter().chain(arch).find(|(n, _)| *n == name).map(|(_, nr)| nr)
            }

            /// The default policy with each filter's errno replaced by its
            /// sentinel, and the sentinel of each filter.
            fn sentinel_policy() -> (Value, BTreeMap<String, i32>) {
                let mut doc: Value = serde_json::from_str(DEFAULT_POLICY.unwrap()).unwrap();
                let mut names: Vec<String> = doc.as_object().unwrap().keys().cloned().collect();
                names.sort();
                let mut sentinels = BTreeMap::new();
                for (i, name) in names.iter().enumerate() {
                    let sentinel = SENTINEL + i as i32;
                    doc[name]["filter_action"] = json!({ "errno": sentinel });
                    sentinels.insert(name.clone(), sentinel);
                }
                (doc, sentinels)
            }

            fn sentinel_program() -> SeccompProgram {
                let (doc, _) = sentinel_policy();
                compile(&doc.to_string(), native_arch().unwrap()).unwrap()
            }

            /// Arguments that meet every condition of `rule`. The rest are all
            /// ones (-1: a bad pointer, descriptor, command or size), so that a
            /// call the filter let through would fail at once.
            fn arguments_for(rule: &Value) -> [u64; 6] {
                let mut args = [u64::MAX; 6];
                let mut avoid: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
                for cond in rule.get("args").and_then(Value::as_array).into_iter().flatten() {
                    let index = cond["index"].as_u64().unwrap() as usize;
                    let val = cond["val"].as_u64().unwrap();
                    let dword = cond["type"] == "dword";
                    let low = |v: u64| if dword { v & 0xffff_ffff } else { v };
                    match &cond["op"] {
                        Value::String(op) if op == "eq" => args[index] = val,
                        Value::String(op) if op == "ne" => avoid.entry(index).or_default().push(low(val)),
                        Value::Object(op) if op.contains_key("masked_eq") => {
                            let mask = op["masked_eq"].as_u64().unwrap();
                            assert_eq!(val & !mask, 0, "{rule}: a value outside its mask never matches");
                            args[index] = val;
                        }
                        op => panic!("{rule}: teach this test the operator {op}"),
                    }
                }
                for (index, values) in avoid {
                    // Small values: a persona nobody uses, harmless if set.
                    args[index] = (1..).find(|v| !values.contains(v)).unwrap();
                }
                args
            }

            /// Makes syscall `nr` with `args` in a child under `prog`.
            fn outcome(prog: &SeccompProgram, nr: libc::c_long, args: [u64; 6]) -> Outcome {
                let end = child::run(|| {
                    child::no_core_dumps();
                    // Should the filter fail to match, the call runs: in a user
                    // namespace of its own the child holds no capability over
                    // the host (no clock, reboot, swap or module change).
                    // SAFETY: affects only this single-threaded child.
                    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
                        return USERNS_FAILED;
                    }
                    if install(prog).is_err() {
                        return INSTALL_FAILED;
                    }
                    let a = args.map(|a| a as libc::c_long);
                    // SAFETY: every argument is either what the rule names or
                    // -1, which the kernel refuses before touching memory.
                    let rc = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
                    if rc < 0 { errno() } else { 0 }
                });
                match end {
                    End::Exited(0) => Outcome::Allowed,
                    End::Exited(USERNS_FAILED) => panic!("cannot make a user namespace"),
                    End::Exited(INSTALL_FAILED) => panic!("seccomp filter did not install"),
                    End::Exited(child::PANICKED) => panic!("child panicked"),
                    End::Exited(code) => Outcome::Errno(code),
                    End::Signaled(sig) => Outcome::Killed(sig),
                }
            }

            /// What runs under test is what ships: the sentinel program is
            /// the built-in one instruction for instruction, but for the
            /// errno its refusals carry.
            #[test]
            fn the_sentinel_program_differs_from_the_default_in_errnos_only() {
                let default = default_program().unwrap();
                let sentinel = sentinel_program();
                let (default, sentinel) = (default.instructions(), sentinel.instructions());
                assert_eq!(default.len(), sentinel.len());
                let mut swapped = 0;
                for (d, s) in default.iter().zip(sentinel) {
                    if d != s {
                        assert_eq!((d.code, s.code), (BPF_RET_K, BPF_RET_K), "{d:?} vs {s:?}");
                        assert_eq!((d.k & RET_ACTION, s.k & RET_ACTION), (RET_ERRNO, RET_ERRNO));
                        assert!((SENTINEL as u32..SENTINEL as u32 + 8).contains(&(s.k & !RET_ACTION)));
                        swapped += 1;
                    }
                }
                assert!(swapped >= 2, "each filter refuses somewhere");
            }

            #[test]
            fn every_rule_refuses_its_call_with_its_filters_errno() {
                let (doc, sentinels) = sentinel_policy();
                let prog = sentinel_program();
                let mut wrong = Vec::new();
                let mut checked = 0;
                for (filter, sentinel) in &sentinels {
                    for rule in doc[filter]["filter"].as_array().unwrap() {
                        let name = rule["syscall"].as_str().unwrap();
                        let nr = number(name).unwrap_or_else(|| panic!("add {name} to the number table"));
                        let args = arguments_for(rule);
                        let got = outcome(&prog, nr, args);
                        if got != Outcome::Errno(*sentinel) {
                            wrong.push(format!("{name}{args:x?}: {got:?}, want Errno({sentinel})"));
                        }
                        checked += 1;
                    }
                }
                assert!(wrong.is_empty(), "rules that did not refuse their call:\n{}", wrong.join("\n"));
                assert!(checked > 70, "only {checked} rules");
            }

            /// Calls next to the refused ones, which the filter lets through.
            #[test]
            fn near_misses_are_allowed() {
                let prog = sentinel_program();
                let none = [0u64; 6];
                let allowed = |nr, args| assert_eq!(outcome(&prog, nr, args), Outcome::Allowed, "{nr} {args:x?}");
                allowed(libc::SYS_getpid, none);
                // unshare without a namespace flag.
                allowed(libc::SYS_unshare, [libc::CLONE_FILES as u64, 0, 0, 0, 0, 0]);
                // The persona query, and the default persona.
                allowed(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0]);
                allowed(libc::SYS_personality, none);
                // A unix socket; only AF_VSOCK is refused.
                allowed(libc::SYS_socket, [libc::AF_UNIX as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0]);
                // An ioctl other than TIOCSTI and TIOCLINUX.
                // SAFETY: valid C string.
                let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
                assert!(fd >= 0);
                #[allow(clippy::unnecessary_cast, reason = "an Ioctl is u64 on glibc, i32 on musl")]
                let fioclex = libc::FIOCLEX as u64;
                allowed(libc::SYS_ioctl, [fd as u64, fioclex, 0, 0, 0, 0]);
                // SAFETY: our own descriptor.
                unsafe { libc::close(fd) };
            }
        }
    }
}
