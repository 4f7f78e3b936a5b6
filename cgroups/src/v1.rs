//! cgroup v1 controllers, written by hand.
//!
//! Why not libcgroups here: its v1 support is one public `v1::Manager` whose
//! constructor reads the real `/proc/self/mountinfo` and `/proc/self/cgroup`
//! (so it cannot run against a fake root), puts the *same* relative path in
//! every hierarchy (ours differ: on this kind of host the memory hierarchy
//! starts at `/process_api/<id>`, the others at `/`), and makes directories in
//! every mounted controller (cpuset, devices, blkio...). Its per-controller
//! code is private. So the few files we need are written here, one function
//! per controller, each `apply(limits, dir)` in youki's manner.

use std::path::Path;
use std::time::{Duration, Instant};

use super::error::CgroupError;
use super::fs;
use super::limits::{CPU_PERIOD_US, Limits};

/// v1 reports "no memory limit" as a huge page-rounded number
/// (`PAGE_COUNTER_MAX * PAGE_SIZE`); anything from 2^62 up means unlimited.
const V1_MEMORY_UNLIMITED: u64 = 1 << 62;

/// How long a v1 freezer may take to reach FROZEN.
pub(crate) const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Applies `limits` to the v1 cgroup `dir` of a hierarchy bound to
/// `controllers`.
pub(crate) fn apply(
    controllers: &[String],
    dir: &Path,
    limits: &Limits,
) -> Result<(), CgroupError> {
    for c in controllers {
        match c.as_str() {
            "memory" => apply_memory(dir, limits)?,
            "pids" => apply_pids(dir, limits)?,
            "cpu" => apply_cpu(dir, limits)?,
            _ => {}
        }
    }
    Ok(())
}

/// `memory.limit_in_bytes`, then `memory.memsw.limit_in_bytes` to the same
/// value (memory+swap = memory: no swap). The memsw file exists only with
/// swap accounting; without it swap cannot be limited through v1.
fn apply_memory(dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
    let Some(bytes) = limits.memory_bytes() else {
        return Ok(());
    };
    let value = bytes.to_string();
    // A new cgroup's memsw limit is unlimited, so the memory limit can go
    // first (the kernel wants memsw >= memory at every step).
    fs::write(&dir.join("memory.limit_in_bytes"), &value)?;
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    if memsw.exists() {
        fs::write(&memsw, &value)?;
    } else {
        tracing::warn!(path = %dir.display(), "no swap accounting: swap is not limited");
    }
    Ok(())
}

fn apply_pids(dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
    if let Some(max) = limits.pids_max() {
        fs::write(&dir.join("pids.max"), &max.to_string())?;
    }
    Ok(())
}

/// Period first, then quota: the kernel checks the quota against the
/// period already in place.
fn apply_cpu(dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
    if let Some(quota) = limits.cpu_quota_us() {
        fs::write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        fs::write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
    }
    Ok(())
}

/// Freezes the v1 freezer cgroup `dir`: writes FROZEN and waits until
/// `freezer.state` reads FROZEN (it reads FREEZING meanwhile; the write is
/// repeated, as runc does, in case new tasks arrived). On timeout the cgroup
/// is thawed again and the error returned.
pub(crate) fn freeze(dir: &Path, timeout: Duration) -> Result<(), CgroupError> {
    let state = dir.join("freezer.state");
    let started = Instant::now();
    loop {
        fs::write(&state, "FROZEN")?;
        if fs::read(&state)?.trim() == "FROZEN" {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            let _ = fs::write(&state, "THAWED");
            return Err(CgroupError::FreezeTimeout {
                path: state,
                timeout_ms: timeout.as_millis(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub(crate) fn thaw(dir: &Path) -> Result<(), CgroupError> {
    fs::write(&dir.join("freezer.state"), "THAWED")
}

/// Memory usage and limit, bytes.
pub(crate) fn memory(dir: &Path) -> Result<(u64, Option<u64>), CgroupError> {
    let current = fs::read_u64_or_max(&dir.join("memory.usage_in_bytes"), "memory usage")?
        .unwrap_or(u64::MAX);
    let max = fs::read_u64_or_max(&dir.join("memory.limit_in_bytes"), "memory limit")?
        .filter(|&m| m < V1_MEMORY_UNLIMITED);
    Ok((current, max))
}

/// OOM kills in this cgroup: the `oom_kill` field of `memory.oom_control`
/// (Linux 4.13+; absent before, reported as `None`).
pub(crate) fn oom_kills(dir: &Path) -> Result<Option<u64>, CgroupError> {
    fs::read_keyed(
        &dir.join("memory.oom_control"),
        "oom_kill",
        "oom kill count",
    )
}

/// CPU time used, microseconds (`cpuacct.usage` is in nanoseconds).
pub(crate) fn cpu_usage_usec(dir: &Path) -> Result<u64, CgroupError> {
    let ns = fs::read_u64_or_max(&dir.join("cpuacct.usage"), "cpu usage")?.unwrap_or(0);
    Ok(ns / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::HostCapacity;

    fn limits() -> Limits {
        let host = HostCapacity {
            cpus: 4.0,
            memory_bytes: 1 << 34,
        };
        Limits::new(Some(64 << 20), Some(32), Some(1.5), &host).unwrap()
    }

    fn file(dir: &Path, name: &str, content: &str) {
        std::fs::write(dir.join(name), content).unwrap();
    }

    fn get(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn writes_each_controllers_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        for f in [
            "memory.limit_in_bytes",
            "memory.memsw.limit_in_bytes",
            "pids.max",
            "cpu.cfs_period_us",
            "cpu.cfs_quota_us",
        ] {
            file(d, f, "");
        }
        let all: Vec<String> = ["memory", "pids", "cpu"].map(String::from).to_vec();
        apply(&all, d, &limits()).unwrap();
        assert_eq!(get(d, "memory.limit_in_bytes"), (64u64 << 20).to_string());
        assert_eq!(
            get(d, "memory.memsw.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(get(d, "pids.max"), "32");
        assert_eq!(get(d, "cpu.cfs_period_us"), "100000");
        assert_eq!(get(d, "cpu.cfs_quota_us"), "150000");
    }

    #[test]
    fn only_touches_its_hierarchys_controllers_and_needs_no_memsw() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        file(d, "memory.limit_in_bytes", "");
        apply(&["memory".to_owned()], d, &limits()).unwrap();
        assert_eq!(get(d, "memory.limit_in_bytes"), (64u64 << 20).to_string());
        assert!(!d.join("pids.max").exists());
        // A missing control file is an error naming it, never created.
        let err = apply(&["pids".to_owned()], d, &limits()).unwrap_err();
        assert!(err.to_string().contains("pids.max"), "{err}");
        assert!(!d.join("pids.max").exists());
    }

    #[test]
    fn reads_usage() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        file(d, "memory.usage_in_bytes", "4096\n");
        file(d, "memory.limit_in_bytes", "9223372036854771712\n");
        file(
            d,
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        );
        file(d, "cpuacct.usage", "2500000\n");
        assert_eq!(memory(d).unwrap(), (4096, None));
        file(d, "memory.limit_in_bytes", "16777216\n");
        assert_eq!(memory(d).unwrap(), (4096, Some(16 << 20)));
        assert_eq!(oom_kills(d).unwrap(), Some(3));
        assert_eq!(cpu_usage_usec(d).unwrap(), 2500);
        file(d, "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\n");
        assert_eq!(oom_kills(d).unwrap(), None);
    }

    #[test]
    fn freezes_and_thaws() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        file(d, "freezer.state", "");
        freeze(d, FREEZE_TIMEOUT).unwrap();
        assert_eq!(get(d, "freezer.state"), "FROZEN");
        thaw(d).unwrap();
        assert_eq!(get(d, "freezer.state"), "THAWED");
    }
}
