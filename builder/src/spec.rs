//! The validated description of one sandbox, as the node hands it to
//! `agentd sandbox-init`. A `SandboxSpec` that exists is a valid one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use agentd_plan::Network;

/// Host directories bind-mounted read-only at the same path, so agents find a
/// userland. Symlinks (merged-/usr hosts) are recreated as symlinks.
pub const DEFAULT_SYSTEM_BINDS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc"];

/// Root inside the sandbox maps to `host_base`; ids `0..size` map to
/// `host_base..host_base+size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    pub host_base: u32,
    pub size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub read_only: bool,
}

/// What PID 1 of the sandbox is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// The supervisor, serving gRPC on `socket_path` and logging to `log_path`.
    Supervisor {
        /// Bound before the sandbox exists, so the node can connect as soon
        /// as it learns the pid.
        socket_path: PathBuf,
        log_path: PathBuf,
    },
    /// The supervisor in run mode: it runs one command as an agent is run,
    /// with the caller's stdio, and exits with the command's status.
    Command { argv: Vec<String>, env: Vec<(String, String)>, cwd: PathBuf },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The container id; also names the sandbox in logs.
    pub id: String,
    /// Empty host directory that becomes the mount point of the new root.
    pub rootfs_dir: PathBuf,
    /// A root filesystem directory to use (read-only) instead of binding the
    /// host's system directories.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    pub hostname: String,
    pub ids: IdRange,
    pub system_binds: Vec<PathBuf>,
    pub mounts: Vec<BindMount>,
    #[serde(default)]
    pub network: Network,
    /// `cgroup.procs` files of the sandbox's cgroups; the process that makes
    /// the sandbox's namespaces joins them first, so the sandbox's cgroup
    /// namespace is rooted there (the creator itself never joins them).
    #[serde(default)]
    pub cgroup_procs: Vec<PathBuf>,
    pub payload: Payload,
    /// `RUST_LOG` for the supervisor: the only environment it gets.
    pub supervisor_log_filter: String,
    /// A stage at which setup fails on purpose, for tests that check a
    /// failure midway undoes everything (see `init::FAULT_STAGES`).
    #[serde(default)]
    pub inject_failure: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("{field} must be an absolute path, got {path:?}")]
    RelativePath { field: &'static str, path: PathBuf },
    #[error("{field} must not contain '..': {path:?}")]
    DotDot { field: &'static str, path: PathBuf },
    #[error("mount source {0:?} does not exist")]
    MissingSource(PathBuf),
    #[error("id range must map at least root and must not include host root (base {base}, size {size})")]
    BadIdRange { base: u32, size: u32 },
    #[error("invalid hostname {0:?}")]
    BadHostname(String),
    #[error("mount target {0:?} is reserved by the sandbox")]
    ReservedTarget(PathBuf),
    #[error("rootfs {0:?} does not exist on this node or is not a directory")]
    MissingRootfs(PathBuf),
    #[error("rootfs {path:?} (mode {mode:o}) cannot be entered by the sandbox's users: make it world-searchable (0755) or owned by the id range's first uid")]
    RootfsNotSearchable { path: PathBuf, mode: u32 },
    #[error("command is empty")]
    EmptyCommand,
}

/// Targets the sandbox builds itself; a plan may not mount over them.
const RESERVED_TARGETS: &[&str] = &["/", "/proc", "/dev", "/dev/pts", "/dev/shm", "/tmp"];

fn check_abs(field: &'static str, path: &Path) -> Result<(), SpecError> {
    if !path.is_absolute() {
        return Err(SpecError::RelativePath { field, path: path.to_owned() });
    }
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(SpecError::DotDot { field, path: path.to_owned() });
    }
    Ok(())
}

/// A bind mount's target: absolute, without `..`, and not one the sandbox
/// builds itself. For callers that check a plan before a spec exists.
pub fn check_mount_target(target: &Path) -> Result<(), SpecError> {
    check_abs("mount target", target)?;
    if RESERVED_TARGETS.iter().any(|r| Path::new(r) == target) {
        return Err(SpecError::ReservedTarget(target.to_owned()));
    }
    Ok(())
}

/// A hostname the kernel takes and that names nothing else: letters,
/// digits, `-` and `.`, at most 64 bytes.
pub fn check_hostname(hostname: &str) -> Result<(), SpecError> {
    let ok = !hostname.is_empty() && hostname.len() <= 64 && hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok { Ok(()) } else { Err(SpecError::BadHostname(hostname.to_string())) }
}

/// A root filesystem to use: an absolute path, without `..`, of a directory
/// the sandbox's users can enter: world-searchable, or owned by `owner` (the
/// id range's first uid, where it is known).
pub fn check_rootfs(rootfs: &Path, owner: Option<u32>) -> Result<(), SpecError> {
    check_abs("rootfs", rootfs)?;
    let meta = std::fs::metadata(rootfs).ok().filter(|m| m.is_dir()).ok_or_else(|| SpecError::MissingRootfs(rootfs.to_owned()))?;
    // The sandbox sees the directory's own owner and mode at its root (the
    // bind is made as host root, so the parents do not matter); refused
    // here, it would fail later as a bare EACCES in PID 1.
    use std::os::unix::fs::MetadataExt;
    if meta.mode() & 0o001 == 0 && Some(meta.uid()) != owner {
        return Err(SpecError::RootfsNotSearchable { path: rootfs.to_owned(), mode: meta.mode() & 0o7777 });
    }
    Ok(())
}

impl SandboxSpec {
    /// Checks everything that can be checked before any kernel object exists.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_abs("rootfs_dir", &self.rootfs_dir)?;
        match &self.payload {
            Payload::Supervisor { socket_path, log_path } => {
                check_abs("socket_path", socket_path)?;
                check_abs("log_path", log_path)?;
            }
            Payload::Command { argv, cwd, .. } => {
                if argv.is_empty() || argv[0].is_empty() {
                    return Err(SpecError::EmptyCommand);
                }
                check_abs("cwd", cwd)?;
            }
        }
        if let Some(rootfs) = &self.rootfs {
            check_rootfs(rootfs, Some(self.ids.host_base))?;
        }
        for p in &self.cgroup_procs {
            check_abs("cgroup_procs", p)?;
        }
        if self.ids.host_base == 0 || self.ids.size == 0 || self.ids.host_base.checked_add(self.ids.size).is_none() {
            return Err(SpecError::BadIdRange { base: self.ids.host_base, size: self.ids.size });
        }
        check_hostname(&self.hostname)?;
        for p in &self.system_binds {
            check_abs("system_binds", p)?;
        }
        for m in &self.mounts {
            check_abs("mount source", &m.source)?;
            check_mount_target(&m.target)?;
            if std::fs::symlink_metadata(&m.source).is_err() {
                return Err(SpecError::MissingSource(m.source.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            id: "ctr_test".into(),
            rootfs_dir: "/tmp/x/rootfs".into(),
            rootfs: None,
            payload: Payload::Supervisor { socket_path: "/tmp/x/sup.sock".into(), log_path: "/tmp/x/sup.log".into() },
            network: Network::None,
            cgroup_procs: Vec::new(),
            inject_failure: None,
            hostname: "sandbox".into(),
            ids: IdRange { host_base: 1_000_000, size: 65536 },
            system_binds: vec!["/usr".into()],
            mounts: vec![BindMount { source: "/usr/bin".into(), target: "/opt/bin".into(), read_only: true }],
            supervisor_log_filter: "info".into(),
        }
    }

    #[test]
    fn accepts_a_sane_spec() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn refuses_relative_and_dotdot_paths() {
        let mut s = spec();
        s.mounts[0].target = "opt/bin".into();
        assert!(matches!(s.validate(), Err(SpecError::RelativePath { .. })));
        let mut s = spec();
        s.mounts[0].target = "/opt/../etc".into();
        assert!(matches!(s.validate(), Err(SpecError::DotDot { .. })));
    }

    #[test]
    fn refuses_host_root_in_id_range_and_overflow() {
        let mut s = spec();
        s.ids.host_base = 0;
        assert!(matches!(s.validate(), Err(SpecError::BadIdRange { .. })));
        s.ids = IdRange { host_base: u32::MAX - 1, size: 10 };
        assert!(matches!(s.validate(), Err(SpecError::BadIdRange { .. })));
    }

    #[test]
    fn refuses_missing_source_and_reserved_target() {
        let mut s = spec();
        s.mounts[0].source = "/definitely/not/here".into();
        assert_eq!(s.validate(), Err(SpecError::MissingSource("/definitely/not/here".into())));
        let mut s = spec();
        s.mounts[0].target = "/proc".into();
        assert_eq!(s.validate(), Err(SpecError::ReservedTarget("/proc".into())));
    }

    #[test]
    fn refuses_missing_rootfs_empty_command_and_unknown_network() {
        let mut s = spec();
        s.rootfs = Some("/definitely/not/a/rootfs".into());
        assert_eq!(s.validate(), Err(SpecError::MissingRootfs("/definitely/not/a/rootfs".into())));
        let mut s = spec();
        s.payload = Payload::Command { argv: vec![], env: vec![], cwd: "/".into() };
        assert_eq!(s.validate(), Err(SpecError::EmptyCommand));
        assert_eq!("host".parse::<Network>(), Ok(Network::Host));
        assert!("bridge".parse::<Network>().unwrap_err().to_string().contains("unknown network mode"));
    }

    #[test]
    fn refuses_a_rootfs_the_sandbox_cannot_enter() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut s = spec();
        s.rootfs = Some(dir.path().to_owned());
        assert_eq!(s.validate(), Err(SpecError::RootfsNotSearchable { path: dir.path().to_owned(), mode: 0o700 }));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn refuses_bad_hostname() {
        let mut s = spec();
        s.hostname = "a b".into();
        assert!(matches!(s.validate(), Err(SpecError::BadHostname(_))));
    }
}
