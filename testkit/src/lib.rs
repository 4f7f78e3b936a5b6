//! Test support shared by the crates' tests.
//!
//! - [`postgres`]: a throwaway PostgreSQL server (initdb into a temp dir, a
//!   free port, torn down on drop) for store tests against a real database.
//! - [`netns`]: network namespaces as test hosts: a private network (a
//!   bridge in a namespace of its own), hosts on it, commands, connections
//!   and forwarded ports into them, partitions, for multi-host fleet tests.
//! - [`procfs`]: reading processes, namespaces and environments from /proc,
//!   to check sandboxes from the host's side.

pub mod netns;
pub mod postgres;
pub mod procfs;
