//! Building one sandbox: user, mount, pid, uts, ipc, net and cgroup namespaces,
//! a `pivot_root` into a fresh root of read-only bind mounts, and the supervisor
//! exec'd as PID 1.
//!
//! The node is a multi-threaded tokio process, where `unshare(CLONE_NEWUSER)`
//! fails and `fork` is hazardous. So it re-executes its own binary as
//! `agentd sandbox-init` ([`init`]), a fresh single-threaded process that does
//! the kernel work and reports one line of JSON back ([`launch`]).

pub mod harden;
pub mod init;
pub mod launch;
pub mod profile;
mod rootfs;
pub mod seccomp;
pub mod spec;

pub use launch::{LaunchError, Launched, launch};
pub use spec::{BindMount, IdRange, Network, Payload, SandboxSpec, SpecError};
