//! Hardening of every process agentd runs inside a sandbox: the supervisor
//! applies it to each agent and terminal command between `fork` and `exec`,
//! `agentd sandbox run` to its one command.
//!
//! - [`hardening`]: [`Hardening`], prepared in the parent (rlimits, OOM
//!   score, capabilities, securebits, `no_new_privs`) and applied in the
//!   child with raw syscalls only.
//! - [`seccomp`]: the default filter (compiled from the reviewed policy
//!   `seccomp_policy.<arch>.json` at build time by `build.rs`), custom
//!   policies in seccompiler's JSON, and the install;
//!   `seccomp_link` links named filters into one program and
//!   `seccomp_dispatch` rewrites it into a search on the syscall number.
//!
//! No namespace, mount or cgroup code lives here: the supervisor links this
//! crate without the sandbox builder.

pub mod hardening;
pub mod seccomp;
mod seccomp_link;

pub use hardening::{HardenError, Hardening};
pub use seccomp::{SeccompError, SeccompProgram, compile_custom};
