//! agentd's sandbox runtime.
//!
//! Layout:
//! - [`sandbox`]: building one sandbox. [`sandbox::spec`] is the validated
//!   description the node hands over; [`sandbox::init`] is the single-threaded
//!   path (run by the `agentd sandbox-init --zygote` process's forked workers)
//!   that makes the namespaces, the root filesystem and the id maps, then runs
//!   the supervisor in place as PID 1; [`sandbox::launch`] is the node's async
//!   side of that hand-over.
//! - [`cgroups`]: sandbox cgroups (limits, freeze, kill, stats), v1/hybrid/v2.
//! - [`supervisor`]: PID 1 inside a sandbox. Reaps orphans, runs agent processes
//!   and serves the `Supervisor` gRPC service on the sandbox's unix socket.
//! - [`acp`]: the ACP (JSON-RPC 2.0 over stdio) client the supervisor speaks to
//!   each agent.
//! - [`uds`]: tonic channels over unix sockets, shared by the node and the
//!   control plane.

pub mod acp;
pub mod cgroups;
pub mod sandbox;
pub mod supervisor;
pub mod uds;
