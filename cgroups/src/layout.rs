//! Where things are: parsing `/proc/self/cgroup`, telling v1 / hybrid / v2
//! apart, finding each hierarchy's mount under the cgroup root, and checking
//! the names we give our directories. Pure functions of their inputs, apart
//! from looking at which directories exist under the root.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::CgroupError;

/// How the host mounts its cgroups (the same three cases libcgroups tells
/// apart with `get_cgroup_setup`; we tell them from `/proc/self/cgroup` and
/// the root's contents so that a fake root in a temp dir works too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// v1 hierarchies only.
    Legacy,
    /// v1 hierarchies for the controllers, plus a v2 hierarchy (usually
    /// `<root>/unified`) with no controllers, used for freeze, kill and
    /// populated events.
    Hybrid,
    /// Pure v2: one hierarchy mounted at the root.
    Unified,
}

/// The v1 controllers we use: limits (memory, pids, cpu), usage (cpuacct)
/// and freezing where there is no v2 freezer. We leave cpuset, devices,
/// blkio and the rest alone: no directory of ours appears there.
pub const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "cpuacct", "freezer"];

/// The v2 controllers we enable for our subtree when available.
pub const V2_CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];

/// The name of the v2 leaf the daemon moves itself into (see
/// [`super::tree`]). No sandbox may be called this.
pub const DAEMON_LEAF: &str = "daemon";

/// The cgroup a node makes ahead of its next sandbox, on hierarchies where
/// putting a process into a cgroup is slow (v1): a worker waits there, and
/// the next sandbox's cgroups are this one renamed ([`super::tree::CgroupTree::spare`]).
pub const SPARE_LEAF: &str = "spare";

/// Where the hybrid layout mounts its v2 hierarchy, relative to the root.
pub const HYBRID_UNIFIED_DIR: &str = "unified";

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfCgroup {
    /// 0 for the v2 hierarchy.
    pub hierarchy: u32,
    /// The controllers bound to this v1 hierarchy (`name=systemd` included
    /// as written); empty for v2.
    pub controllers: Vec<String>,
    /// The process's cgroup, relative to the hierarchy's root; absolute.
    pub path: PathBuf,
}

impl SelfCgroup {
    pub fn is_v2(&self) -> bool {
        self.hierarchy == 0 && self.controllers.is_empty()
    }
}

/// Parses the text of `/proc/self/cgroup`.
pub fn parse_self_cgroup(text: &str) -> Result<Vec<SelfCgroup>, CgroupError> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let bad = || CgroupError::SelfCgroupLine {
            line: line.to_owned(),
        };
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad());
        };
        let hierarchy: u32 = id.parse().map_err(|_| bad())?;
        if !path.starts_with('/') {
            return Err(bad());
        }
        let controllers = ctrls
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect();
        out.push(SelfCgroup {
            hierarchy,
            controllers,
            path: PathBuf::from(path),
        });
    }
    Ok(out)
}

/// Tells the mode from the parsed lines and the root's contents.
pub fn detect_mode(root: &Path, lines: &[SelfCgroup]) -> Result<Mode, CgroupError> {
    let has_v1 = lines.iter().any(|l| !l.is_v2());
    let has_v2 = lines.iter().any(SelfCgroup::is_v2);
    let no = |reason: &str| CgroupError::NoHierarchy {
        root: root.to_owned(),
        reason: reason.to_owned(),
    };
    match (has_v1, has_v2) {
        (false, false) => Err(no("/proc/self/cgroup is empty")),
        (false, true) => {
            if root.join("cgroup.procs").is_file() {
                Ok(Mode::Unified)
            } else {
                Err(no("pure cgroup v2 host, but no cgroup.procs at the root"))
            }
        }
        (true, v2) => {
            if v2 && root.join(HYBRID_UNIFIED_DIR).join("cgroup.procs").is_file() {
                Ok(Mode::Hybrid)
            } else {
                Ok(Mode::Legacy)
            }
        }
    }
}

/// The mount directory of a v1 hierarchy: `<root>/<c1,c2>` (as co-mounted),
/// else `<root>/<controller>` (the usual symlinks).
pub fn v1_mount(root: &Path, line: &SelfCgroup, controller: &str) -> Option<PathBuf> {
    [line.controllers.join(","), controller.to_owned()]
        .into_iter()
        .map(|name| root.join(name))
        .find(|p| p.is_dir())
}

/// `<mount>/<cgroup path>`, refusing `..` so a path from `/proc` cannot walk
/// out of the mount.
pub fn under(mount: &Path, cgroup: &Path) -> Result<PathBuf, CgroupError> {
    let mut out = mount.to_owned();
    for c in cgroup.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            _ => {
                return Err(CgroupError::InvalidName {
                    name: cgroup.display().to_string(),
                    reason: "cgroup path walks out of its hierarchy",
                });
            }
        }
    }
    Ok(out)
}

/// Checks that `name` can be one cgroup directory of ours: 1 to 128 of
/// `[A-Za-z0-9_-]`. No dots, so it can never collide with a control file
/// (`memory.max`) or be `.`/`..`; no slash, so it is one level.
pub fn check_name(name: &str) -> Result<(), CgroupError> {
    let bad = |reason| CgroupError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 128 {
        return Err(bad("must be 1 to 128 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(bad("only ASCII letters, digits, '_' and '-' are allowed"));
    }
    Ok(())
}

/// Like [`check_name`], and not the daemon's leaf or the spare.
pub fn check_sandbox_id(id: &str) -> Result<(), CgroupError> {
    check_name(id)?;
    if id == DAEMON_LEAF || id == SPARE_LEAF {
        return Err(CgroupError::InvalidName {
            name: id.to_owned(),
            reason: "reserved for the daemon's own cgroups",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n6:freezer:/\n4:memory:/process_api/abc\n\
                          2:cpuacct:/\n1:cpu:/\n0::/\n";

    #[test]
    fn parses_hybrid_text() {
        let lines = parse_self_cgroup(HYBRID).unwrap();
        assert_eq!(lines.len(), 7);
        assert_eq!(lines[0].controllers, ["name=systemd"]);
        assert_eq!(lines[3].controllers, ["memory"]);
        assert_eq!(lines[3].path, Path::new("/process_api/abc"));
        assert!(lines[6].is_v2());
        assert_eq!(lines[6].path, Path::new("/"));
        let co = parse_self_cgroup("3:cpu,cpuacct:/a:b\n").unwrap();
        assert_eq!(co[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(co[0].path, Path::new("/a:b"), "path may hold a colon");
    }

    #[test]
    fn refuses_malformed_lines() {
        for bad in ["x::/", "0:/", "1:memory:relative", "garbage"] {
            assert!(
                matches!(
                    parse_self_cgroup(bad),
                    Err(CgroupError::SelfCgroupLine { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn detects_modes_from_text_and_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let hybrid = parse_self_cgroup(HYBRID).unwrap();
        assert_eq!(
            detect_mode(root, &hybrid).unwrap(),
            Mode::Legacy,
            "no unified mount yet"
        );
        std::fs::create_dir(root.join("unified")).unwrap();
        std::fs::write(root.join("unified/cgroup.procs"), "").unwrap();
        assert_eq!(detect_mode(root, &hybrid).unwrap(), Mode::Hybrid);
        let legacy = parse_self_cgroup("4:memory:/\n1:cpu:/\n").unwrap();
        assert_eq!(detect_mode(root, &legacy).unwrap(), Mode::Legacy);

        let v2 = parse_self_cgroup("0::/system.slice/agentd.service\n").unwrap();
        assert!(matches!(
            detect_mode(root, &v2),
            Err(CgroupError::NoHierarchy { .. })
        ));
        std::fs::write(root.join("cgroup.procs"), "").unwrap();
        assert_eq!(detect_mode(root, &v2).unwrap(), Mode::Unified);
        assert!(detect_mode(root, &[]).is_err());
    }

    #[test]
    fn finds_co_mounted_and_single_v1_mounts() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir(root.join("cpu,cpuacct")).unwrap();
        std::fs::create_dir(root.join("memory")).unwrap();
        let lines = parse_self_cgroup("3:cpu,cpuacct:/\n4:memory:/\n5:pids:/\n").unwrap();
        assert_eq!(
            v1_mount(root, &lines[0], "cpu"),
            Some(root.join("cpu,cpuacct"))
        );
        assert_eq!(
            v1_mount(root, &lines[1], "memory"),
            Some(root.join("memory"))
        );
        assert_eq!(v1_mount(root, &lines[2], "pids"), None);
    }

    #[test]
    fn joins_cgroup_paths_safely() {
        let m = Path::new("/sys/fs/cgroup/memory");
        assert_eq!(under(m, Path::new("/")).unwrap(), m);
        assert_eq!(under(m, Path::new("/a/b")).unwrap(), m.join("a/b"));
        assert!(under(m, Path::new("/a/../../etc")).is_err());
    }

    #[test]
    fn checks_names() {
        for ok in ["agentd", "agentd-1234", "sb_01H", "A-z_9"] {
            check_sandbox_id(ok).unwrap();
        }
        let long = "x".repeat(129);
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "memory.max",
            "a b",
            "é",
            long.as_str(),
        ] {
            assert!(
                matches!(check_name(bad), Err(CgroupError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(check_name("daemon").is_ok());
        assert!(check_sandbox_id("daemon").is_err());
    }
}
