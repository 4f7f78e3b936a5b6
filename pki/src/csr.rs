//! The node's side of issuance: its own key, the request it sends, and the check of
//! the certificate that comes back.
//!
//! The node's private key never leaves the node. The control plane sees only the CSR
//! (public key plus a signature proving the node holds the key) and answers with a
//! certificate, which the node checks before it stores it: a certificate that would
//! not pass the control plane's own TLS check, or that carries someone else's key,
//! would leave the node unreachable, and is better refused at join time.

use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData, SanType};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::{ServerName, UnixTime};

use crate::names::{InvalidNodeId, check_node_id, node_dns_name};
use crate::pem::{self, PemError};

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error(transparent)]
    InvalidNodeId(#[from] InvalidNodeId),
    #[error("generating the node key: {0}")]
    KeyGeneration(rcgen::Error),
    #[error("the node key could not be loaded: {0}")]
    KeyPem(rcgen::Error),
    #[error("building the certificate signing request: {0}")]
    Request(rcgen::Error),
    #[error("issued certificate: {0}")]
    CertPem(PemError),
    #[error("issued certificate could not be parsed: {0}")]
    CertParse(String),
    #[error("CA certificate: {0}")]
    CaPem(PemError),
    #[error("CA certificate is unusable as a trust root: {0}")]
    CaUnusable(rustls::Error),
    #[error("the issued certificate is not valid for {name} under the cluster CA: {reason}")]
    NotValid { name: String, reason: rustls::Error },
    #[error("the issued certificate carries another public key than this node's")]
    WrongKey,
}

/// A node's key pair (ECDSA P-256). Its PEM goes to the node's state dir, mode 0600.
pub struct NodeKey {
    key: KeyPair,
}

impl std::fmt::Debug for NodeKey {
    // The private key stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey").finish_non_exhaustive()
    }
}

impl NodeKey {
    pub fn generate() -> Result<Self, CsrError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(CsrError::KeyGeneration)?;
        Ok(Self { key })
    }

    /// Loads a key saved with [`key_pem`](Self::key_pem).
    pub fn from_pem(key_pem: &str) -> Result<Self, CsrError> {
        let key = KeyPair::from_pem(key_pem).map_err(CsrError::KeyPem)?;
        Ok(Self { key })
    }

    /// The private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate signing request for `node_id`. Its subject and SAN are a courtesy
    /// to whoever reads it: the CA ignores them and names the certificate itself.
    pub fn csr_pem(&self, node_id: &str) -> Result<String, CsrError> {
        check_node_id(node_id)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        params.distinguished_name = dn;
        let san = node_dns_name(node_id)
            .try_into()
            .map_err(CsrError::Request)?;
        params.subject_alt_names = vec![SanType::DnsName(san)];
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(CsrError::Request)
    }

    #[cfg(test)]
    pub(crate) fn key_pair(&self) -> &KeyPair {
        &self.key
    }
}

/// Checks the certificate a control plane issued to this node: it chains to the CA
/// (`ca_pem`, which the caller has already matched against the join token's
/// fingerprint), is valid now, is a server certificate for `<node_id>.node.agentd`,
/// and carries `key`'s public key.
///
/// The chain, time, EKU and name checks are rustls's own server-certificate
/// verifier, the one the control plane runs when it dials this node: a certificate
/// that passes here passes there.
pub fn check_issued(
    cert_pem: &str,
    ca_pem: &str,
    node_id: &str,
    key: &NodeKey,
) -> Result<(), CsrError> {
    check_node_id(node_id)?;
    let cert = pem::cert_der(cert_pem).map_err(CsrError::CertPem)?;
    let ca = pem::cert_der(ca_pem).map_err(CsrError::CaPem)?;

    let mut roots = RootCertStore::empty();
    roots.add(ca).map_err(CsrError::CaUnusable)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| CsrError::CaUnusable(rustls::Error::General(e.to_string())))?;
    let name = node_dns_name(node_id);
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| InvalidNodeId(node_id.to_owned()))?;
    verifier
        .verify_server_cert(&cert, &[], &server_name, &[], UnixTime::now())
        .map_err(|reason| CsrError::NotValid { name, reason })?;

    let (_, x509) = x509_parser::parse_x509_certificate(&cert)
        .map_err(|e| CsrError::CertParse(e.to_string()))?;
    if x509.public_key().raw != key.key.subject_public_key_info().as_slice() {
        return Err(CsrError::WrongKey);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::ClusterCa;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn key_round_trips_through_pem() {
        let key = NodeKey::generate().unwrap();
        let again = NodeKey::from_pem(&key.key_pem()).unwrap();
        assert_eq!(
            key.key.subject_public_key_info(),
            again.key.subject_public_key_info()
        );
        assert!(matches!(
            NodeKey::from_pem("nope"),
            Err(CsrError::KeyPem(_))
        ));
        assert!(!format!("{key:?}").contains("PRIVATE"));
    }

    #[test]
    fn issued_certificate_passes() {
        let ca = ClusterCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let cert = ca
            .sign_node_csr(&key.csr_pem("n1").unwrap(), "n1", DAY)
            .unwrap();
        check_issued(&cert, ca.cert_pem(), "n1", &key).unwrap();
    }

    #[test]
    fn certificate_for_another_key_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let mine = NodeKey::generate().unwrap();
        let theirs = NodeKey::generate().unwrap();
        let cert = ca
            .sign_node_csr(&theirs.csr_pem("n1").unwrap(), "n1", DAY)
            .unwrap();
        let err = check_issued(&cert, ca.cert_pem(), "n1", &mine).unwrap_err();
        assert!(matches!(err, CsrError::WrongKey), "{err}");
    }

    #[test]
    fn certificate_for_another_node_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let cert = ca
            .sign_node_csr(&key.csr_pem("n1").unwrap(), "n2", DAY)
            .unwrap();
        let err = check_issued(&cert, ca.cert_pem(), "n1", &key).unwrap_err();
        assert!(
            matches!(&err, CsrError::NotValid {
                name,
                reason: rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. }
                ),
            } if name == "n1.node.agentd"),
            "{err}"
        );
    }

    #[test]
    fn certificate_from_another_ca_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let other = ClusterCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let cert = other
            .sign_node_csr(&key.csr_pem("n1").unwrap(), "n1", DAY)
            .unwrap();
        let err = check_issued(&cert, ca.cert_pem(), "n1", &key).unwrap_err();
        // UnknownIssuer rather than BadSignature: each CA's subject is its own.
        assert!(
            matches!(
                &err,
                CsrError::NotValid {
                    reason: rustls::Error::InvalidCertificate(
                        rustls::CertificateError::UnknownIssuer
                    ),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn control_plane_certificate_is_not_a_node_certificate() {
        // Even if a control plane handed back its own certificate, the node would
        // notice: clientAuth only, and the wrong name.
        let ca = ClusterCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        let cp = ca.issue_control_plane(DAY).unwrap();
        assert!(check_issued(&cp.cert_pem, ca.cert_pem(), "n1", &key).is_err());
    }

    #[test]
    fn garbage_is_refused() {
        let ca = ClusterCa::generate().unwrap();
        let key = NodeKey::generate().unwrap();
        assert!(matches!(
            check_issued("x", ca.cert_pem(), "n1", &key),
            Err(CsrError::CertPem(_))
        ));
        assert!(matches!(
            key.csr_pem("Bad"),
            Err(CsrError::InvalidNodeId(_))
        ));
    }
}
