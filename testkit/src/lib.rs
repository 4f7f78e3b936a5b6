//! Test support shared by the crates' tests.
//!
//! - [`postgres`]: a throwaway PostgreSQL server (initdb into a temp dir, a
//!   free port, torn down on drop) for store tests against a real database.
//! - [`procfs`]: reading processes, namespaces and environments from /proc,
//!   to check sandboxes from the host's side.

pub mod postgres;
pub mod procfs;
