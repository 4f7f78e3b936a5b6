//! The kernel's version, against the features agentd uses from it. A
//! version says what a kernel should have; `syscalls.rs` tries the calls
//! themselves (a distribution may backport, a container's filter may refuse).

use std::path::Path;

use super::Row;

/// A kernel feature agentd uses, the release that brought it, and what a
/// node on an older kernel loses.
struct Feature {
    name: &'static str,
    since: (u32, u32),
    /// Whether a sandbox cannot be built without it.
    needed: bool,
    without: &'static str,
}

const FEATURES: &[Feature] = &[
    Feature { name: "pidfd_open", since: (5, 3), needed: true, without: "the node cannot watch a sandbox's PID 1, so no sandbox starts" },
    Feature {
        name: "clone3 + CLONE_INTO_CGROUP",
        since: (5, 7),
        needed: false,
        without: "PID 1 is moved into its v2 cgroup after it starts (a slower create)",
    },
    Feature { name: "cgroup.kill", since: (5, 14), needed: false, without: "a sandbox is killed process by process rather than at once" },
];

/// `major.minor` of a release string such as `6.8.0-45-generic`.
pub fn version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The row for the running kernel (`<proc>/sys/kernel/osrelease`, what
/// `uname -r` prints).
pub fn check(proc: &Path) -> Row {
    let path = proc.join("sys/kernel/osrelease");
    match std::fs::read_to_string(&path) {
        Ok(release) => judge(release.trim()),
        Err(e) => Row::warn("kernel", format!("cannot read {}: {e}", path.display()), "check the kernel is Linux 5.14 or newer"),
    }
}

pub fn judge(release: &str) -> Row {
    let Some(have) = version(release) else {
        return Row::warn("kernel", format!("{release}: version not understood"), "check the kernel is Linux 5.14 or newer");
    };
    let missing: Vec<&Feature> = FEATURES.iter().filter(|f| have < f.since).collect();
    if missing.is_empty() {
        let names: Vec<&str> = FEATURES.iter().map(|f| f.name).collect();
        return Row::ok("kernel", format!("{release}: has {}", names.join(", ")));
    }
    let lost: Vec<String> = missing.iter().map(|f| format!("no {} (Linux {}.{}): {}", f.name, f.since.0, f.since.1, f.without)).collect();
    let found = format!("{release}: {}", lost.join("; "));
    let newest = missing.iter().map(|f| f.since).max().unwrap_or_default();
    let remedy = format!("run Linux {}.{} or newer", newest.0, newest.1);
    if missing.iter().any(|f| f.needed) { Row::fail("kernel", found, remedy) } else { Row::warn("kernel", found, remedy) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Status;

    #[test]
    fn reads_versions() {
        assert_eq!(version("6.8.0-45-generic"), Some((6, 8)));
        assert_eq!(version("5.14.21-150500.55.39-default"), Some((5, 14)));
        assert_eq!(version("6.18.44-fc-v1147"), Some((6, 18)));
        assert_eq!(version("weird"), None);
    }

    #[test]
    fn names_what_an_old_kernel_loses() {
        assert_eq!(judge("6.1.0").status, Status::Ok);
        let row = judge("5.10.0-28-amd64");
        assert_eq!(row.status, Status::Warn);
        assert!(row.found.contains("no cgroup.kill (Linux 5.14)") && !row.found.contains("clone3"), "{}", row.found);
        let row = judge("5.4.0");
        assert_eq!(row.status, Status::Warn);
        assert!(row.found.contains("clone3 + CLONE_INTO_CGROUP") && row.found.contains("cgroup.kill"), "{}", row.found);
        let row = judge("4.19.0");
        assert_eq!(row.status, Status::Fail, "pidfd_open is needed");
        assert_eq!(row.remedy.as_deref(), Some("run Linux 5.14 or newer"));
        assert_eq!(judge("x").status, Status::Warn);
    }
}
