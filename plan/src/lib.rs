//! The plan vocabulary that crosses planes: what a client may ask of a
//! sandbox, parsed and checked without touching any host. The control plane
//! compiles requests with it; the node and `agentd sandbox run` read the same
//! words. Nothing here makes a syscall: the control plane links this crate
//! and none of the kernel code (see `tests/architecture.rs`).
//!
//! - [`profile`]: the container profile as clients write it ([`Profile`]).
//! - [`network`]: [`Network`], a sandbox's network mode, and the egress
//!   allow-list's rules ([`EgressPolicy`]), parsed and checked.
//! - [`limits`]: the bounds of memory, pids and cpus every host shares.
//! - [`seccomp`]: a custom seccomp policy's shape ([`SeccompPolicy`]).
//! - [`secrets`]: secrets a profile names by reference ([`SecretRef`]).
//! - [`ids`]: entity ids.

pub mod ids;
pub mod limits;
pub mod network;
pub mod profile;
pub mod seccomp;
pub mod secrets;

pub use ids::new_id;
pub use limits::LimitsError;
pub use network::{EgressPolicy, EgressRule, Network, NetworkError};
pub use profile::{Profile, ProfileError, parse_size};
pub use seccomp::SeccompPolicy;
pub use secrets::{SecretError, SecretRef};
