//! The ACP client side, as the supervisor speaks it to each agent.
//!
//! - [`rpc`]: JSON-RPC 2.0 framing over the agent's stdio: our requests and
//!   theirs live in separate id spaces; notifications are delivered in order.
//! - [`client`]: the ACP methods agentd calls (`initialize`, `session/new`,
//!   `session/prompt`, `session/cancel`). Updates are relayed as raw JSON:
//!   typed round trips would drop fields agentd does not know.

pub mod client;
pub mod rpc;

pub use client::{AcpClient, AcpError, Initialized};
pub use rpc::{ErrorObject, InboundHandler, RpcConnection, RpcError};

/// ACP's `auth_required` error code.
pub const AUTH_REQUIRED: i64 = -32000;

/// The ACP protocol version agentd speaks.
pub const PROTOCOL_VERSION: u64 = 1;
