//! The control plane's side of the fleet.
//!
//! - [`nodes`]: [`Nodes`], a client per node, dialled from the node's stored
//!   address (a unix socket, or TCP with mutual TLS).
//! - [`ca`]: the cluster CA kept in the store, this process's certificate
//!   toward nodes, join tokens.
//! - [`join`]: a node's join: token proof, CSR signed, node recorded.
//! - [`watch`]: each node's journal recorded by the one control plane that
//!   holds its watch lease: the single path of run ends into the store.

pub mod ca;
pub mod join;
pub mod nodes;
pub mod watch;

pub use nodes::{NodeTls, Nodes};
