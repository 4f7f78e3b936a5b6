//! The cluster's certificates, join tokens and TLS configs.
//!
//! One CA per cluster. It signs a certificate per node (serverAuth only, named
//! `<node_id>.node.agentd`) and one per control-plane process (clientAuth only,
//! `control-plane.agentd`); the extended key usage is what keeps the two roles apart,
//! because rustls's webpki verifiers demand serverAuth of servers and clientAuth of
//! clients. A node joins with a token whose secret never crosses the wire, and pins
//! the CA by the fingerprint in that token.
//!
//! # Layout
//!
//! - `ca.rs`: [`ClusterCa`]: generate or load the CA, sign node CSRs, issue
//!   control-plane identities, the CA fingerprint.
//! - `csr.rs`: the node's side: [`NodeKey`], its CSR, and [`check_issued`] for the
//!   certificate that comes back.
//! - `token.rs`: join tokens ([`JoinToken`], [`StoredJoinToken`]): text form, the
//!   node's proof, the control plane's answer MAC, and the threat model.
//! - `tls.rs`: tonic configs: [`node_server_tls`], [`control_plane_client_tls`],
//!   [`ControlPlaneIdentity`], ring as rustls's process provider.
//! - `names.rs`: node ids ([`valid_node_id`], [`InvalidNodeId`]) and the DNS names
//!   certificates carry.
//! - `private_file.rs`: [`write_private`]: atomic, mode-0600 key and certificate files.
//! - `pem.rs`, `random.rs`: PEM-to-DER and OS randomness, shared by the others.

mod ca;
mod csr;
mod names;
mod pem;
mod private_file;
mod random;
mod tls;
mod token;

pub use ca::{CA_COMMON_NAME, CA_VALIDITY, CaError, ClusterCa, ca_fingerprint};
pub use csr::{CsrError, NodeKey, check_issued};
pub use names::{
    CONTROL_PLANE_DNS_NAME, InvalidNodeId, NODE_DNS_SUFFIX, check_node_id, node_dns_name,
    valid_node_id,
};
pub use pem::PemError;
pub use private_file::{FileError, read_private, write_private};
pub use random::RandomError;
pub use tls::{
    ControlPlaneIdentity, HANDSHAKE_TIMEOUT, TlsError, control_plane_client_tls,
    install_ring_provider, node_server_tls,
};
pub use token::{
    JoinToken, StoredJoinToken, TOKEN_PREFIX, TokenError, join_answer_mac, verify_join_proof,
};

/// Any of this crate's errors, for callers that do not care which step failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    File(#[from] FileError),
}
