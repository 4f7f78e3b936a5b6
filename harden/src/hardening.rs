//! Hardening an agent process between `fork` and `exec`: resource limits, a
//! raised OOM score, no capabilities (bounding, ambient, inheritable,
//! permitted, effective), locked securebits, `no_new_privs`, and the seccomp
//! filter of [`crate::seccomp`].
//!
//! Everything that needs allocation or reads a file happens when a
//! [`Hardening`] is built, in the parent; [`Hardening::apply_in_child`] only
//! makes raw syscalls on data prepared beforehand, so it can run in a
//! `pre_exec` hook of a multi-threaded process.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::seccomp::{self, SeccompError, SeccompProgram};

/// The type of libc's `RLIMIT_*` constants on this target.
#[cfg(target_env = "gnu")]
pub type Resource = libc::__rlimit_resource_t;
/// The type of libc's `RLIMIT_*` constants on this target.
#[cfg(not(target_env = "gnu"))]
pub type Resource = libc::c_int;

/// Agents score higher than anything else for the OOM killer, so it picks an
/// agent before the daemon or supervisor. Raising needs no privilege; lowering
/// the daemon instead would need `CAP_SYS_RESOURCE`, which this host's
/// bounding set lacks.
pub const AGENT_OOM_SCORE_ADJ: i32 = 500;

/// Agents do not leave core dumps, which could hold secrets from their memory
/// and fill the workspace.
const AGENT_CORE_LIMIT: libc::rlim_t = 0;

/// Enough descriptors for a language server or a build; a leak stops at a
/// bound instead of at the host's limit.
const AGENT_NOFILE_LIMIT: libc::rlim_t = 4096;

/// `NOROOT`, `NO_SETUID_FIXUP`, `NO_CAP_AMBIENT_RAISE` and every lock,
/// `KEEP_CAPS` off and locked: libcap's "pure 1E" mode. Uid 0 gains nothing on
/// `execve`, and none of this can be undone.
const SECUREBITS: libc::c_ulong = (libc::SECBIT_NOROOT
    | libc::SECBIT_NOROOT_LOCKED
    | libc::SECBIT_NO_SETUID_FIXUP
    | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
    | libc::SECBIT_KEEP_CAPS_LOCKED
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED) as libc::c_ulong;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two u32 halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `CAP_SETPCAP`, the capability securebits and the bounding set answer to.
const CAP_SETPCAP: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    #[error("reading {path}")]
    CapLastCap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds {value:?}, not a capability number below 64")]
    BadCapLastCap { path: PathBuf, value: String },
    #[error("proc path {0} contains a NUL byte")]
    ProcPath(PathBuf),
    #[error("oom_score_adj {0} is outside -1000..=1000")]
    OomScoreAdj(i32),
    #[error("getrlimit({resource})")]
    GetRlimit {
        resource: Resource,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// What an agent process gets between `fork` and `exec`, prepared ahead of
/// time. Build it once (it compiles the seccomp filter), keep it, and call
/// [`apply_in_child`](Self::apply_in_child) from a `pre_exec` hook.
#[derive(Clone, Debug)]
pub struct Hardening {
    /// `(resource, soft, hard)`, already clamped to this process's hard
    /// limits: raising a hard limit needs `CAP_SYS_RESOURCE`, which the
    /// bounding set here lacks, and setrlimit would fail the whole spawn.
    rlimits: Vec<(Resource, libc::rlim_t, libc::rlim_t)>,
    /// The score written to `oom_score_adj`; `None` keeps the inherited one.
    oom_score_adj: Option<i32>,
    /// `oom_score_adj` in ASCII, formatted here because the child must not.
    oom_bytes: Vec<u8>,
    /// `<proc>/self/oom_score_adj` as a C string, for the same reason.
    oom_path: CString,
    /// The highest capability the running kernel knows: the child drops
    /// `0..=cap_last_cap` from its bounding set, a range only the kernel knows.
    cap_last_cap: u32,
    /// Installed last, once nothing else needs a syscall the filter refuses.
    seccomp: Option<SeccompProgram>,
}

impl Hardening {
    /// The agents' defaults, with `/proc` as the proc mount: no core dumps,
    /// 4096 descriptors, oom_score_adj 500, the default seccomp filter.
    pub fn default_for_agents() -> Result<Self, HardenError> {
        Self::default_for_agents_at(Path::new("/proc"))
    }

    /// As [`default_for_agents`](Self::default_for_agents), reading
    /// `cap_last_cap` under and writing `oom_score_adj` through `proc_root`.
    pub fn default_for_agents_at(proc_root: &Path) -> Result<Self, HardenError> {
        let oom_path = proc_root.join("self/oom_score_adj");
        let oom_path = CString::new(oom_path.as_os_str().as_bytes())
            .map_err(|_| HardenError::ProcPath(proc_root.to_owned()))?;
        let hardening = Self {
            rlimits: Vec::new(),
            oom_score_adj: None,
            oom_bytes: Vec::new(),
            oom_path,
            cap_last_cap: read_cap_last_cap(proc_root)?,
            seccomp: Some(seccomp::default_program()?),
        };
        hardening
            .with_rlimit(libc::RLIMIT_CORE, AGENT_CORE_LIMIT, AGENT_CORE_LIMIT)?
            .with_rlimit(libc::RLIMIT_NOFILE, AGENT_NOFILE_LIMIT, AGENT_NOFILE_LIMIT)?
            .with_oom_score_adj(Some(AGENT_OOM_SCORE_ADJ))
    }

    /// Sets (or replaces) a limit. The hard limit is clamped to this
    /// process's current one and the soft limit to the hard one, so call it in
    /// the process that will fork.
    pub fn with_rlimit(
        mut self,
        resource: Resource,
        soft: libc::rlim_t,
        hard: libc::rlim_t,
    ) -> Result<Self, HardenError> {
        let mut current = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `current` is a valid out pointer for the call.
        if unsafe { libc::getrlimit(resource, &mut current) } != 0 {
            let source = io::Error::last_os_error();
            return Err(HardenError::GetRlimit { resource, source });
        }
        let hard = hard.min(current.rlim_max);
        let soft = soft.min(hard);
        self.rlimits.retain(|&(r, _, _)| r != resource);
        self.rlimits.push((resource, soft, hard));
        Ok(self)
    }

    /// Leaves `resource` as the child inherits it.
    pub fn without_rlimit(mut self, resource: Resource) -> Self {
        self.rlimits.retain(|&(r, _, _)| r != resource);
        self
    }

    /// The score to write to `oom_score_adj`, or `None` to keep the inherited
    /// one. Going below the parent's value needs `CAP_SYS_RESOURCE`, so a
    /// negative value fails in the child on hosts like this one.
    pub fn with_oom_score_adj(mut self, value: Option<i32>) -> Result<Self, HardenError> {
        if let Some(v) = value
            && !(-1000..=1000).contains(&v)
        {
            return Err(HardenError::OomScoreAdj(v));
        }
        self.oom_score_adj = value;
        self.oom_bytes = value
            .map(|v| v.to_string().into_bytes())
            .unwrap_or_default();
        Ok(self)
    }

    /// The filter to install last, or `None` for none.
    pub fn with_seccomp(mut self, program: Option<SeccompProgram>) -> Self {
        self.seccomp = program;
        self
    }

    pub fn rlimits(&self) -> &[(Resource, libc::rlim_t, libc::rlim_t)] {
        &self.rlimits
    }

    pub fn oom_score_adj(&self) -> Option<i32> {
        self.oom_score_adj
    }

    pub fn seccomp(&self) -> Option<&SeccompProgram> {
        self.seccomp.as_ref()
    }

    pub fn cap_last_cap(&self) -> u32 {
        self.cap_last_cap
    }

    /// Hardens the calling process, in this order: resource limits,
    /// `oom_score_adj`, bounding set, ambient set, securebits,
    /// `no_new_privs`, the remaining capability sets, the seccomp filter.
    /// Capabilities go late because the steps before them (securebits, the
    /// bounding set) need `CAP_SETPCAP`; the filter goes last so it constrains
    /// nothing here.
    ///
    /// Async-signal-safe: raw syscalls on prepared data, no allocation, no
    /// lock. The process needs `CAP_SETPCAP` unless its bounding set is
    /// already empty (the supervisor, root in the sandbox's user namespace,
    /// has it). Through `Command::pre_exec` only the errno of a failure
    /// reaches the parent, not the step.
    pub fn apply_in_child(&self) -> io::Result<()> {
        for &(resource, soft, hard) in &self.rlimits {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: `limit` is a valid rlimit for the call.
            check(unsafe { libc::setrlimit(resource, &limit) })?;
        }
        if self.oom_score_adj.is_some() {
            // A non-dumpable process's /proc files belong to the root of the
            // user namespace its memory was created in: for the sandbox's
            // PID 1 (forked, not exec'd, from host root) that is host root,
            // whom the sandbox's root cannot write for. Dumpable for this one
            // write (we still hold every capability, so no agent can attach);
            // exec makes the agent dumpable anyway.
            // SAFETY: integer arguments only.
            let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
            if dumpable == 0 {
                // SAFETY: integer arguments only.
                check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) })?;
            }
            let written = write_all(&self.oom_path, &self.oom_bytes);
            if dumpable == 0 {
                // SAFETY: integer arguments only.
                check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) })?;
            }
            written?;
        }
        drop_bounding_set(self.cap_last_cap)?;
        // SAFETY: integer arguments only.
        check(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        })?;
        set_securebits()?;
        // SAFETY: integer arguments only.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
        capset(&[CapData::default(); 2])?;
        if let Some(program) = &self.seccomp {
            seccomp::install(program)?;
        }
        Ok(())
    }
}

fn read_cap_last_cap(proc_root: &Path) -> Result<u32, HardenError> {
    let path = proc_root.join("sys/kernel/cap_last_cap");
    let text = std::fs::read_to_string(&path).map_err(|source| HardenError::CapLastCap {
        path: path.clone(),
        source,
    })?;
    match text.trim().parse::<u32>() {
        // capset's version 3 carries 64 bits; a larger number is a kernel this
        // code does not know how to strip.
        Ok(last) if last < 64 => Ok(last),
        _ => Err(HardenError::BadCapLastCap { path, value: text }),
    }
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `open`, `write`, `close` on a prepared path: procfs takes a value in one
/// write or not at all.
fn write_all(path: &CString, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let written = loop {
        // SAFETY: `bytes` is valid for `bytes.len()` bytes; `fd` is ours.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n >= 0 {
            break Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            break Err(err);
        }
    };
    // SAFETY: closes the fd opened above, once.
    unsafe { libc::close(fd) };
    match written? {
        n if n == bytes.len() => Ok(()),
        _ => Err(io::ErrorKind::WriteZero.into()),
    }
}

/// Drops `0..=last` from the bounding set, skipping capabilities already
/// gone: `PR_CAPBSET_DROP` asks for `CAP_SETPCAP` even for those, and this
/// way a process whose bounding set is already empty needs no privilege.
fn drop_bounding_set(last: u32) -> io::Result<()> {
    for cap in 0..=last {
        // SAFETY: integer arguments only.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        check(present)?;
        if present == 1 {
            // SAFETY: integer arguments only.
            check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) })?;
        }
    }
    Ok(())
}

/// Sets [`SECUREBITS`]. EPERM is let pass in one case only: the process lacks
/// `CAP_SETPCAP`, so it could not set them whatever it did, and they would add
/// nothing: with an empty bounding set, zero inheritable and ambient sets and
/// `no_new_privs`, `execve` grants no capability to anyone, uid 0 included
/// (the bits are defence in depth on top of that). With `CAP_SETPCAP`, EPERM
/// means bits locked to other values, and that fails the spawn.
fn set_securebits() -> io::Result<()> {
    // SAFETY: integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) && !has_effective(CAP_SETPCAP)? {
        return Ok(());
    }
    Err(err)
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one 32-bit half of each set.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn has_effective(cap: u32) -> io::Result<bool> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 writes two `CapData` halves, which `data` holds.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(data[(cap / 32) as usize].effective & (1 << (cap % 32)) != 0)
}

fn capset(data: &[CapData; 2]) -> io::Result<()> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: version 3 reads two `CapData` halves, which `data` holds.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use super::super::seccomp::child::{self, End, errno};
    use super::*;

    fn current_limit(resource: Resource) -> libc::rlimit {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: valid out pointer.
        assert_eq!(unsafe { libc::getrlimit(resource, &mut limit) }, 0);
        limit
    }

    /// `name:\t<value>\n` in a /proc status file, without allocating.
    fn field<'a>(status: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
        status.split(|&b| b == b'\n').find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(b":")?;
            Some(rest.trim_ascii())
        })
    }

    /// Reads a small /proc file into `buf` with raw syscalls.
    fn read_proc<'a>(path: &std::ffi::CStr, buf: &'a mut [u8]) -> Option<&'a [u8]> {
        // SAFETY: valid C string.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return None;
        }
        let mut len = 0;
        loop {
            // SAFETY: writes at most the rest of `buf`.
            let n = unsafe { libc::read(fd, buf[len..].as_mut_ptr().cast(), buf.len() - len) };
            if n <= 0 {
                break;
            }
            len += n as usize;
        }
        // SAFETY: our fd, closed once.
        unsafe { libc::close(fd) };
        Some(&buf[..len])
    }

    /// Exit codes of the forked check: which expectation failed.
    const APPLY_FAILED: i32 = 100; // + errno
    const CHECKS: &[(&[u8], &[u8])] = &[
        (b"CapInh", b"0000000000000000"),
        (b"CapPrm", b"0000000000000000"),
        (b"CapEff", b"0000000000000000"),
        (b"CapBnd", b"0000000000000000"),
        (b"CapAmb", b"0000000000000000"),
        (b"NoNewPrivs", b"1"),
        (b"Seccomp", b"2"),
    ];
    const BAD_STATUS: i32 = 1; // + index into CHECKS
    const BAD_CORE_LIMIT: i32 = 20;
    const BAD_NOFILE_LIMIT: i32 = 21;
    const BAD_OOM_SCORE_ADJ: i32 = 22;
    const BAD_SECUREBITS: i32 = 23;
    const UNREADABLE: i32 = 24;

    #[test]
    fn harden_in_forked_child() {
        let hardening = Hardening::default_for_agents().unwrap();
        let end = child::run(|| {
            if hardening.apply_in_child().is_err() {
                return APPLY_FAILED + errno();
            }
            let mut buf = [0u8; 8192];
            let Some(status) = read_proc(c"/proc/self/status", &mut buf) else {
                return UNREADABLE;
            };
            for (i, (name, want)) in CHECKS.iter().enumerate() {
                if field(status, name) != Some(*want) {
                    return BAD_STATUS + i as i32;
                }
            }
            let mut limit = libc::rlimit {
                rlim_cur: 1,
                rlim_max: 1,
            };
            // SAFETY: valid out pointer.
            unsafe { libc::getrlimit(libc::RLIMIT_CORE, &mut limit) };
            if (limit.rlim_cur, limit.rlim_max) != (0, 0) {
                return BAD_CORE_LIMIT;
            }
            // SAFETY: valid out pointer.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
            if limit.rlim_cur > AGENT_NOFILE_LIMIT || limit.rlim_max > AGENT_NOFILE_LIMIT {
                return BAD_NOFILE_LIMIT;
            }
            let mut buf = [0u8; 64];
            if read_proc(c"/proc/self/oom_score_adj", &mut buf).map(<[u8]>::trim_ascii)
                != Some(b"500")
            {
                return BAD_OOM_SCORE_ADJ;
            }
            // SAFETY: integer arguments only.
            let bits = unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) };
            if bits as libc::c_ulong != SECUREBITS {
                return BAD_SECUREBITS;
            }
            0
        });
        assert_eq!(
            end,
            End::Exited(0),
            "see the exit codes above harden_in_forked_child"
        );
    }

    /// The way the spawn path will use it: `Command::pre_exec`, then exec.
    /// Checks what survives `execve` as root: the exec'd program must hold no
    /// capability, keep the filter and `no_new_privs`, and be able to run.
    #[test]
    fn harden_survives_exec() {
        let hardening = Hardening::default_for_agents().unwrap();
        let mut cmd = Command::new("/bin/cat");
        cmd.args([
            "/proc/self/status",
            "/proc/self/oom_score_adj",
            "/proc/self/limits",
        ]);
        // SAFETY: apply_in_child is async-signal-safe (see its docs).
        unsafe { cmd.pre_exec(move || hardening.apply_in_child()) };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        for (name, want) in CHECKS {
            let name = std::str::from_utf8(name).unwrap();
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name}:")))
                .unwrap();
            assert_eq!(
                line.split_whitespace().nth(1).unwrap().as_bytes(),
                *want,
                "{line}"
            );
        }
        assert!(text.lines().any(|l| l == "500"), "{text}");
        let core = text
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        assert_eq!(
            &core.split_whitespace().collect::<Vec<_>>()[4..6],
            ["0", "0"],
            "{core}"
        );
        let nofile = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        assert_eq!(
            &nofile.split_whitespace().collect::<Vec<_>>()[3..5],
            ["4096", "4096"]
        );
    }

    #[test]
    fn hard_limits_are_clamped_to_the_current_ones() {
        let current = current_limit(libc::RLIMIT_NOFILE);
        let hardening = Hardening::default_for_agents()
            .unwrap()
            .with_rlimit(
                libc::RLIMIT_NOFILE,
                libc::RLIM_INFINITY,
                libc::RLIM_INFINITY,
            )
            .unwrap();
        let nofile: Vec<_> = hardening
            .rlimits()
            .iter()
            .filter(|l| l.0 == libc::RLIMIT_NOFILE)
            .collect();
        assert_eq!(
            nofile,
            [&(libc::RLIMIT_NOFILE, current.rlim_max, current.rlim_max)]
        );
        // And the child takes it, where the unclamped value would be EPERM.
        let end = child::run(|| match hardening.apply_in_child() {
            Ok(()) => 0,
            Err(_) => APPLY_FAILED + errno(),
        });
        assert_eq!(end, End::Exited(0));
    }

    #[test]
    fn soft_limit_never_exceeds_hard() {
        let hardening = Hardening::default_for_agents()
            .unwrap()
            .with_rlimit(libc::RLIMIT_NOFILE, 8192, 1024)
            .unwrap();
        assert!(
            hardening
                .rlimits()
                .contains(&(libc::RLIMIT_NOFILE, 1024, 1024))
        );
    }

    #[test]
    fn oom_score_adj_is_range_checked() {
        let hardening = Hardening::default_for_agents().unwrap();
        assert!(matches!(
            hardening.clone().with_oom_score_adj(Some(1001)),
            Err(HardenError::OomScoreAdj(1001))
        ));
        let none = hardening.with_oom_score_adj(None).unwrap();
        assert_eq!(none.oom_score_adj(), None);
    }

    #[test]
    fn cap_last_cap_is_the_kernels() {
        let last = Hardening::default_for_agents().unwrap().cap_last_cap();
        // SAFETY: integer arguments only.
        let read =
            |cap: u32| unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
        assert!(read(last) >= 0);
        assert_eq!(
            read(last + 1),
            -1,
            "cap {} exists past cap_last_cap",
            last + 1
        );
    }

    #[test]
    fn missing_proc_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = Hardening::default_for_agents_at(dir.path()).unwrap_err();
        match err {
            HardenError::CapLastCap { path, .. } => {
                assert!(path.ends_with("sys/kernel/cap_last_cap"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn seccomp_is_optional() {
        let hardening = Hardening::default_for_agents().unwrap().with_seccomp(None);
        let end = child::run(|| {
            if hardening.apply_in_child().is_err() {
                return APPLY_FAILED + errno();
            }
            let mut buf = [0u8; 8192];
            let Some(status) = read_proc(c"/proc/self/status", &mut buf) else {
                return UNREADABLE;
            };
            if field(status, b"Seccomp") != Some(b"0") {
                BAD_STATUS
            } else {
                0
            }
        });
        assert_eq!(end, End::Exited(0));
    }
}
