//! The validated description of one sandbox, as the node hands it to
//! `agentd sandbox-init`. A `SandboxSpec` that exists is a valid one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// The container id; also names the sandbox in logs.
    pub id: String,
    /// Empty host directory that becomes the mount point of the new root.
    pub rootfs_dir: PathBuf,
    /// Host path where the supervisor listens; bound before the sandbox exists so
    /// the node can connect as soon as it learns the pid.
    pub socket_path: PathBuf,
    /// Host file that receives the supervisor's (and the agents') stderr.
    pub log_path: PathBuf,
    pub hostname: String,
    pub ids: IdRange,
    pub system_binds: Vec<PathBuf>,
    pub mounts: Vec<BindMount>,
    /// `RUST_LOG` for the supervisor: the only environment it gets.
    pub supervisor_log_filter: String,
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

impl SandboxSpec {
    /// Checks everything that can be checked before any kernel object exists.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_abs("rootfs_dir", &self.rootfs_dir)?;
        check_abs("socket_path", &self.socket_path)?;
        check_abs("log_path", &self.log_path)?;
        if self.ids.host_base == 0 || self.ids.size == 0 || self.ids.host_base.checked_add(self.ids.size).is_none() {
            return Err(SpecError::BadIdRange { base: self.ids.host_base, size: self.ids.size });
        }
        let hostname_ok = !self.hostname.is_empty()
            && self.hostname.len() <= 64
            && self.hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !hostname_ok {
            return Err(SpecError::BadHostname(self.hostname.clone()));
        }
        for p in &self.system_binds {
            check_abs("system_binds", p)?;
        }
        for m in &self.mounts {
            check_abs("mount source", &m.source)?;
            check_abs("mount target", &m.target)?;
            if RESERVED_TARGETS.iter().any(|r| Path::new(r) == m.target) {
                return Err(SpecError::ReservedTarget(m.target.clone()));
            }
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
            socket_path: "/tmp/x/sup.sock".into(),
            log_path: "/tmp/x/sup.log".into(),
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
    fn refuses_bad_hostname() {
        let mut s = spec();
        s.hostname = "a b".into();
        assert!(matches!(s.validate(), Err(SpecError::BadHostname(_))));
    }
}
