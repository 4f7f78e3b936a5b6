//! The cgroupfs side effects, behind one narrow interface.
//!
//! Reading and writing control files is plain file I/O, so it goes through
//! `std::fs` on whatever root we were given (a fake root in a temp dir is a
//! directory of ordinary files). What a regular directory cannot imitate sits
//! behind [`CgroupFs`]: `mkdir` (the kernel fills the new cgroup with control
//! files), `rmdir` (refused with EBUSY while processes remain) and signals.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::CgroupError;

/// The kernel operations of the cgroup layer that a plain directory tree
/// cannot stand in for. [`RealCgroupFs`] is the real one.
pub trait CgroupFs: fmt::Debug + Send + Sync {
    /// Makes one cgroup directory (its parent exists).
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    /// Removes one cgroup directory that has no child cgroup.
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    /// Sends SIGKILL to one process.
    fn kill(&self, pid: u32) -> io::Result<()>;
    /// Moves process `pid` into the cgroup whose `cgroup.procs` is `procs`
    /// (out of the one it was in: a move, which a plain file cannot show).
    fn attach(&self, procs: &Path, pid: u32) -> io::Result<()>;
    /// Renames a cgroup within its parent (v1 hierarchies allow it), with
    /// the processes in it.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
}

/// The kernel.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealCgroupFs;

impl CgroupFs for RealCgroupFs {
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn rmdir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn kill(&self, pid: u32) -> io::Result<()> {
        let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(io::Error::from)
    }

    fn attach(&self, procs: &Path, pid: u32) -> io::Result<()> {
        write_io(procs, pid.to_string().as_bytes())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
}

pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| CgroupError::io("read", path, e))
}

/// Writes `value` to an existing control file in one `write(2)`, as the
/// kernel wants (never creates the file).
pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    write_io(path, value.as_bytes()).map_err(|e| CgroupError::io("write", path, e))
}

fn write_io(path: &Path, value: &[u8]) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value)
}

/// Reads one number; `max` (v2's "no limit") reads as `None`.
pub(crate) fn read_u64_or_max(path: &Path, what: &'static str) -> Result<Option<u64>, CgroupError> {
    let text = read(path)?;
    let t = text.trim();
    if t == "max" {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| CgroupError::Parse {
        path: path.to_owned(),
        what,
        content: text.clone(),
    })
}

/// The value of `key` in a flat-keyed file (`key value` lines), such as
/// v2's `memory.events` or v1's `memory.oom_control`.
pub(crate) fn read_keyed(
    path: &Path,
    key: &str,
    what: &'static str,
) -> Result<Option<u64>, CgroupError> {
    let text = read(path)?;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if it.next() == Some(key) {
            let v = it.next().and_then(|v| v.parse().ok());
            return v.map(Some).ok_or_else(|| CgroupError::Parse {
                path: path.to_owned(),
                what,
                content: line.to_owned(),
            });
        }
    }
    Ok(None)
}

/// The pids in `<dir>/cgroup.procs`.
pub(crate) fn procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let path = dir.join("cgroup.procs");
    let text = read(&path)?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse().map_err(|_| CgroupError::Parse {
                path: path.clone(),
                what: "pid",
                content: l.to_owned(),
            })
        })
        .collect()
}

/// The pids in `dir` and every cgroup below it (a sandbox may have made
/// sub-cgroups). A directory that vanished meanwhile counts as empty.
pub(crate) fn procs_recursive(dir: &Path, out: &mut Vec<u32>) -> Result<(), CgroupError> {
    match procs(dir) {
        Ok(p) => out.extend(p),
        Err(CgroupError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(());
        }
        Err(e) => return Err(e),
    }
    for child in subdirs(dir)? {
        procs_recursive(&child, out)?;
    }
    Ok(())
}

/// The child directories of `dir` (child cgroups); none if `dir` is gone.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(CgroupError::io("list", dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CgroupError::io("list", dir, e))?;
        let ft = entry
            .file_type()
            .map_err(|e| CgroupError::io("list", entry.path(), e))?;
        if ft.is_dir() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Makes `path` unless it is already there (our subtree and the daemon leaf
/// survive restarts).
pub(crate) fn mkdir_existing_ok(cfs: &dyn CgroupFs, path: &Path) -> Result<(), CgroupError> {
    match cfs.mkdir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(CgroupError::io("mkdir", path, e)),
    }
}

/// Removes the cgroup `dir` and the cgroups below it, deepest first. A busy
/// cgroup (EBUSY: its processes are still exiting after a kill) is retried
/// with backoff until `deadline`. A missing one is already removed.
pub(crate) fn remove_tree(
    cfs: &dyn CgroupFs,
    dir: &Path,
    started: Instant,
    deadline: Instant,
) -> Result<(), CgroupError> {
    for child in subdirs(dir)? {
        remove_tree(cfs, &child, started, deadline)?;
    }
    let mut pause = Duration::from_millis(1);
    loop {
        match cfs.rmdir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(CgroupError::Busy {
                        path: dir.to_owned(),
                        waited_ms: now.duration_since(started).as_millis(),
                    });
                }
                std::thread::sleep(pause.min(deadline - now));
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(CgroupError::io("rmdir", dir, e)),
        }
    }
}

/// Moves process `pid` into every cgroup of a sandbox, given their
/// `cgroup.procs` files (from [`super::SandboxCgroup::procs_files`]).
///
/// Meant for `agentd sandbox-init`, a single-threaded process, to put
/// itself in its sandbox's cgroups before it clones the sandbox, so that the
/// new cgroup namespace is rooted there. It only opens and writes files.
pub fn join(procs_files: &[PathBuf], pid: u32) -> io::Result<()> {
    let value = pid.to_string();
    for path in procs_files {
        write_io(path, value.as_bytes())
            .map_err(|e| io::Error::new(e.kind(), format!("join {}: {e}", path.display())))?;
    }
    Ok(())
}
