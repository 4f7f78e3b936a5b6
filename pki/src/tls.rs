//! tonic TLS configs for the one connection the cluster has: a control plane dialing
//! a node's gRPC server, both sides authenticated by the cluster CA.
//!
//! The node serves with its node certificate and demands a client certificate that
//! chains to the CA and carries clientAuth (a control-plane certificate; a node
//! certificate is serverAuth only and is refused). The control plane trusts only the
//! CA and expects the name `<node_id>.node.agentd`, whatever address it dials, so
//! reaching the wrong machine (a reused IP, a stale address in the database) fails the
//! handshake instead of talking to another node.
//!
//! Crypto provider: tonic builds its client config on ring explicitly, but its server
//! config (and client-certificate verifier) take rustls's process-wide default, which
//! rustls only picks by itself when exactly one provider feature is compiled in. Both
//! constructors here therefore install ring as the process default first (a no-op if
//! a default is already set), so a stray aws-lc feature somewhere in a future
//! dependency tree cannot turn into a panic at the first handshake.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::names::{InvalidNodeId, check_node_id, node_dns_name};
use crate::pem::{self, PemError};

/// A TLS handshake that has not finished by then is dropped: a client that connects
/// and stalls must not hold a node's connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    InvalidNodeId(#[from] InvalidNodeId),
    #[error("{what}: {source}")]
    Pem {
        /// Which input: "node certificate", "CA certificate", ...
        what: &'static str,
        source: PemError,
    },
}

/// One control-plane process's TLS identity, as [`crate::ClusterCa::issue_control_plane`]
/// makes it: a clientAuth-only certificate for `control-plane.agentd` and its key.
#[derive(Clone)]
pub struct ControlPlaneIdentity {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for ControlPlaneIdentity {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneIdentity")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Installs rustls's ring provider as the process default, unless some provider is
/// installed already. Called by the constructors below; callable early in `main` too.
pub fn install_ring_provider() {
    // Err means a default exists already; whichever it is, the process has chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The node's gRPC server config: serves `node_cert_pem`/`node_key_pem`, requires a
/// client certificate issued by the cluster CA (`ca_pem`) with clientAuth.
pub fn node_server_tls(
    node_cert_pem: &str,
    node_key_pem: &str,
    ca_pem: &str,
) -> Result<ServerTlsConfig, TlsError> {
    // Parse now: tonic would only find a bad PEM when the server starts or, worse,
    // at the first handshake.
    check_cert("node certificate", node_cert_pem)?;
    check_key("node private key", node_key_pem)?;
    check_cert("CA certificate", ca_pem)?;
    install_ring_provider();
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(node_cert_pem, node_key_pem))
        .client_ca_root(Certificate::from_pem(ca_pem))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// The control plane's config for dialing node `node_id`: trusts only the cluster CA,
/// presents `identity`, and expects the server to be `<node_id>.node.agentd`.
pub fn control_plane_client_tls(
    ca_pem: &str,
    identity: &ControlPlaneIdentity,
    node_id: &str,
) -> Result<ClientTlsConfig, TlsError> {
    check_node_id(node_id)?;
    check_cert("CA certificate", ca_pem)?;
    check_cert("control-plane certificate", &identity.cert_pem)?;
    check_key("control-plane private key", &identity.key_pem)?;
    install_ring_provider();
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem))
        .domain_name(node_dns_name(node_id))
        .timeout(HANDSHAKE_TIMEOUT))
}

fn check_cert(what: &'static str, text: &str) -> Result<(), TlsError> {
    pem::cert_der(text)
        .map(drop)
        .map_err(|source| TlsError::Pem { what, source })
}

fn check_key(what: &'static str, text: &str) -> Result<(), TlsError> {
    pem::key_der(text)
        .map(drop)
        .map_err(|source| TlsError::Pem { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::ClusterCa;

    #[test]
    fn bad_inputs_are_named() {
        let ca = ClusterCa::generate().unwrap();
        let cp = ca.issue_control_plane(Duration::from_secs(3600)).unwrap();
        let err = node_server_tls("nope", &cp.key_pem, ca.cert_pem()).unwrap_err();
        assert!(err.to_string().starts_with("node certificate: "), "{err}");
        let err = node_server_tls(&cp.cert_pem, &cp.cert_pem, ca.cert_pem()).unwrap_err();
        assert!(err.to_string().starts_with("node private key: "), "{err}");
        let err = control_plane_client_tls(ca.cert_pem(), &cp, "n1.evil").unwrap_err();
        assert!(matches!(err, TlsError::InvalidNodeId(_)));
        let broken = ControlPlaneIdentity {
            cert_pem: cp.cert_pem.clone(),
            key_pem: String::new(),
        };
        let err = control_plane_client_tls(ca.cert_pem(), &broken, "n1").unwrap_err();
        assert!(
            err.to_string().starts_with("control-plane private key: "),
            "{err}"
        );
        control_plane_client_tls(ca.cert_pem(), &cp, "n1").unwrap();
    }
}
