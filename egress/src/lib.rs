//! Enforcement of an egress sandbox's allow-list, outside the sandbox.
//!
//! The sandbox keeps its own network namespace; its only link is a veth
//! whose other end, and the nftables rules on it, live in the node's
//! namespace, out of the sandbox's reach (its root has no capability over
//! the node's namespace). Every TCP connection from the link is redirected
//! to the gateway's proxy, UDP goes only to the gateway's resolver, and
//! nothing is forwarded: all that leaves does so as the node's own
//! connections, made after a decision.
//!
//! - [`link`]: slots (names, addresses, flock), the veth pair, the nftables
//!   table, leftovers.
//! - [`dns`]: the DNS messages the resolver reads and writes.
//! - [`sni`]: the TLS server name of a ClientHello.
//! - [`decide`]: the policy applied to a name or a connection.
//! - [`gateway`]: one sandbox's resolver, proxy, datagram sink, counters
//!   and denial reports.

pub mod decide;
pub mod dns;
pub mod gateway;
pub mod link;
pub mod sni;

pub use gateway::{Counters, Denial, Gateway, Protocol, Serving, Usage, upstream_dns};
