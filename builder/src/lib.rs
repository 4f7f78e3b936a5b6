//! Building one sandbox: user, mount, pid, uts, ipc, net and cgroup namespaces,
//! a `pivot_root` into a fresh root of read-only bind mounts, and PID 1's
//! payload run in place (forked, not exec'd): the supervisor, or one command.
//! The payloads come from the caller ([`init::Pid1`]): this crate links no
//! supervisor, and the node links it without one.
//!
//! The node is a multi-threaded tokio process, where `unshare(CLONE_NEWUSER)`
//! fails and `fork` is hazardous. So it runs its own binary once as
//! `agentd sandbox-init --zygote` ([`zygote`]), a single-threaded process that
//! forks a worker per sandbox to do the kernel work ([`init`]) and reports one
//! line of JSON back ([`launch`]); a one-shot `agentd sandbox-init` is the
//! fallback.

pub mod init;
pub mod launch;
mod nsfork;
mod rootfs;
pub mod spec;
pub mod zygote;

pub use init::Pid1;
pub use launch::{LaunchError, Launched, Launcher, launch};
pub use spec::{BindMount, IdRange, Network, Payload, SandboxSpec, SpecError};
