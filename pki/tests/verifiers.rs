//! The verifiers tonic uses, called directly: the refusals the handshake tests can
//! only see as a TLS alert, with webpki's own reason.

use std::sync::Arc;
use std::time::Duration;

use agentd_pki::{ClusterCa, NodeKey};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn roots(ca: &ClusterCa) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    roots.add(der(ca.cert_pem())).unwrap();
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[test]
fn node_verifier_takes_control_planes_only() {
    let ca = ClusterCa::generate().unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca), provider())
        .build()
        .unwrap();
    let cp = ca.issue_control_plane(DAY).unwrap();
    verifier
        .verify_client_cert(&der(&cp.cert_pem), &[], UnixTime::now())
        .unwrap();
    let key = NodeKey::generate().unwrap();
    let node = ca
        .sign_node_csr(&key.csr_pem("n2").unwrap(), "n2", DAY)
        .unwrap();
    let err = verifier
        .verify_client_cert(&der(&node), &[], UnixTime::now())
        .unwrap_err();
    assert!(format!("{err:?}").contains("InvalidPurpose"), "{err:?}");
}

#[test]
fn control_plane_verifier_takes_the_named_node_only() {
    let ca = ClusterCa::generate().unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(roots(&ca), provider())
        .build()
        .unwrap();
    let n1 = ServerName::try_from("n1.node.agentd").unwrap();
    let key = NodeKey::generate().unwrap();
    let node = ca
        .sign_node_csr(&key.csr_pem("n1").unwrap(), "n1", DAY)
        .unwrap();
    verifier
        .verify_server_cert(&der(&node), &[], &n1, &[], UnixTime::now())
        .unwrap();
    let cp = ca.issue_control_plane(DAY).unwrap();
    let cp_name = ServerName::try_from("control-plane.agentd").unwrap();
    let err = verifier
        .verify_server_cert(&der(&cp.cert_pem), &[], &cp_name, &[], UnixTime::now())
        .unwrap_err();
    assert!(format!("{err:?}").contains("InvalidPurpose"), "{err:?}");
}
