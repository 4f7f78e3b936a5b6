//! Sandbox cgroups: memory, pids and cpu limits, freeze and thaw, kill of a
//! whole sandbox, usage stats; on cgroup v1, hybrid and v2 hosts.
//!
//! Use from the node:
//!
//! ```no_run
//! # use agentd_cgroups::*;
//! # fn f(limits: Limits) -> Result<(), CgroupError> {
//! let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
//! let cg = CgroupTree::discover("/sys/fs/cgroup".as_ref(), &text, "agentd-node1")?;
//! let _ = cg.clean_leftovers();
//! let sb = cg.create("sb-1", &limits)?;
//! // hand sb.procs_files() to sandbox-init, which calls join(&files, its pid)
//! # Ok(()) }
//! ```
//!
//! On-disk layout: everything lives in one subtree under the cgroup the
//! daemon was started in, in each hierarchy: `<start>/<subtree>/<sandbox>`.
//! Never at a hierarchy's root, never elsewhere; nothing is written into a
//! cgroup we did not make, except the v2 start cgroup's
//! `cgroup.subtree_control` (delegated to us; see `v2.rs`).
//! - v1 (legacy): `<root>/<controller>/<start>/<subtree>/<sandbox>` for the
//!   memory, pids, cpu, cpuacct and freezer hierarchies present (one
//!   directory per hierarchy when co-mounted, as `cpu,cpuacct`).
//! - hybrid: the same, plus `<root>/unified/<start>/<subtree>/<sandbox>` in
//!   the controller-less v2 tree, used for `cgroup.kill`, `cgroup.freeze`
//!   and `cgroup.events`.
//! - v2: `<root>/<start>/<subtree>/<sandbox>`, with the daemon moved to
//!   `<root>/<start>/<subtree>/daemon` so that controllers can be enabled.
//!
//! Modules:
//! - [`tree`]: [`CgroupTree`], our subtree: discovery, creation of sandbox
//!   cgroups, cleanup of a crashed daemon's leftovers.
//! - [`sandbox`]: [`SandboxCgroup`], one sandbox's directories (serializable)
//!   and the operations on them.
//! - [`limits`]: [`Limits`], validated when built.
//! - [`layout`]: parsing `/proc/self/cgroup`, telling the modes apart, names.
//! - `v1`, `v2` (private): per-version controller code; `v2` goes through
//!   youki's libcgroups, `v1` writes files itself (each says why).
//! - [`fs`]: the kernel side effects ([`CgroupFs`]) and file helpers;
//!   [`join`] for the single-threaded sandbox-init.
//! - [`error`]: the error type, [`CgroupError`].

pub mod error;
pub mod fs;
pub mod layout;
pub mod limits;
pub mod sandbox;
pub mod tree;
mod v1;
mod v2;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod host_tests;
#[cfg(test)]
mod tests;

pub use error::CgroupError;
pub use fs::{CgroupFs, RealCgroupFs, join};
pub use layout::Mode;
pub use limits::{HostCapacity, Limits, LimitsError};
pub use sandbox::{CgroupDir, SandboxCgroup, Stats, Version};
pub use tree::{CgroupTree, LeftoverReport};
