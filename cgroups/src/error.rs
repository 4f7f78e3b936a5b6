//! The cgroup layer's error type. Every variant that comes from the kernel
//! carries the path it failed on.

use std::io;
use std::path::PathBuf;

/// A failure of the cgroup layer.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A file operation on a cgroupfs path failed.
    #[error("cgroup {op} {}: {source}", path.display())]
    Io {
        /// What was being done: "read", "write", "mkdir", "rmdir", "list".
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A line of `/proc/self/cgroup` is not `id:controllers:path`.
    #[error("malformed /proc/self/cgroup line {line:?}")]
    SelfCgroupLine { line: String },

    /// `/proc/self/cgroup` names no hierarchy we can use under the given root.
    #[error("no usable cgroup hierarchy under {}: {reason}", root.display())]
    NoHierarchy { root: PathBuf, reason: String },

    /// The cgroup the daemon was started in does not exist under the mount we
    /// found (a v1 hierarchy bind-mounted from a sub-directory, as some
    /// container engines do without a cgroup namespace).
    #[error("start cgroup {} does not exist (is the hierarchy mounted from a sub-directory?)", path.display())]
    StartCgroupMissing { path: PathBuf },

    /// A subtree name or a sandbox id cannot be a cgroup directory name.
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// A sandbox cgroup with that id already exists (a leftover not cleaned).
    #[error("cgroup {} already exists", path.display())]
    AlreadyExists { path: PathBuf },

    /// A limit needs a controller that is not available for our subtree.
    #[error("{limit} limit needs the {controller} controller, which is not available under {}", path.display())]
    ControllerUnavailable {
        limit: &'static str,
        controller: &'static str,
        path: PathBuf,
    },

    /// Neither a v2 `cgroup.freeze` nor a v1 freezer hierarchy is available.
    #[error("no freezer for cgroup {}", path.display())]
    FreezerUnavailable { path: PathBuf },

    /// A v1 freezer did not reach FROZEN in time (it was thawed again).
    #[error("cgroup {} did not freeze within {timeout_ms} ms", path.display())]
    FreezeTimeout { path: PathBuf, timeout_ms: u128 },

    /// Controllers could not be enabled for our subtree on cgroup v2 because
    /// the start cgroup still holds processes other than the daemon ("no
    /// internal processes" rule).
    #[error(
        "cannot enable controllers in {}: it still holds processes {pids:?}; run agentd in a cgroup of its own (a service with Delegate=yes, or `systemd-run --scope -p Delegate=yes agentd ...`)",
        path.display()
    )]
    StartCgroupBusy { path: PathBuf, pids: Vec<u32> },

    /// A cgroup directory stayed busy (processes still in it) past the wait.
    #[error("cgroup {} still busy after {waited_ms} ms", path.display())]
    Busy { path: PathBuf, waited_ms: u128 },

    /// A cgroup file held something we could not parse.
    #[error("cannot parse {} ({what}): {content:?}", path.display())]
    Parse {
        path: PathBuf,
        what: &'static str,
        content: String,
    },

    /// libcgroups failed on the cgroup at `path`.
    #[error("libcgroups on {}: {source}", path.display())]
    Libcgroups {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl CgroupError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        CgroupError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn lib(
        path: impl Into<PathBuf>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        CgroupError::Libcgroups {
            path: path.into(),
            source: Box::new(source),
        }
    }
}
