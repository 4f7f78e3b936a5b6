//! gRPC contracts of agentd.
//!
//! - [`node`]: the control plane's view of a node (sandboxes, agents, sessions,
//!   runs and each session's event log).
//! - [`supervisor`]: the node's view of one sandbox's PID 1 (agent processes and
//!   their ACP sessions), served on a unix socket per sandbox.
//! - [`common`]: what both share (agent policies and states, seccomp
//!   policies, the events agentd adds to a turn).
//!
//! All three are generated at build time from `proto/*.proto` by `protox` and
//! tonic. Around them:
//! - [`events`]: the session events' names and the JSON clients see, defined
//!   once for the node's log, the SSE stream and the archives.
//! - [`convert`]: the plan vocabulary (agentd-plan) to and from its messages.
//! - [`unix`]: tonic channels over unix sockets (node -> supervisor, and the
//!   control plane -> its node in `agentd up`).
//! - [`error`]: stable error codes across gRPC.
//! - [`trace`]: the W3C trace context across the three processes.

pub mod convert;
pub mod events;
pub mod trace;
pub mod unix;

/// The generated code, nested as the proto packages are, so that one
/// package's references to another resolve.
pub mod generated {
    pub mod agentd {
        pub mod common {
            pub mod v1 {
                tonic::include_proto!("agentd.common.v1");
            }
        }
        pub mod node {
            pub mod v1 {
                tonic::include_proto!("agentd.node.v1");
            }
        }
        pub mod supervisor {
            pub mod v1 {
                tonic::include_proto!("agentd.supervisor.v1");
            }
        }
    }
}

pub use generated::agentd::common::v1 as common;
pub use generated::agentd::node::v1 as node;
pub use generated::agentd::supervisor::v1 as supervisor;

/// Stable error codes carried across gRPC, so that the HTTP API can answer with
/// the same `code` whichever process found the problem.
pub mod error {
    /// Metadata key holding the stable code.
    pub const CODE_KEY: &str = "agentd-code";

    /// A status whose `code` survives the trip to the control plane.
    pub fn status(grpc: tonic::Code, code: &'static str, message: impl Into<String>) -> tonic::Status {
        let mut status = tonic::Status::new(grpc, message);
        status.metadata_mut().insert(CODE_KEY, tonic::metadata::MetadataValue::from_static(code));
        status
    }

    /// The stable code of a status, if the peer set one.
    pub fn code_of(status: &tonic::Status) -> Option<&str> {
        status.metadata().get(CODE_KEY).and_then(|v| v.to_str().ok())
    }
}

#[cfg(test)]
mod naming;
