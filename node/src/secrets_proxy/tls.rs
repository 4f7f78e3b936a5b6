//! How the proxy trusts upstreams: Mozilla's roots (webpki-roots, built in,
//! so no host CA store is read), plus an operator's CA bundle
//! (`--secrets-ca-file`: a private API gateway, a test's own CA).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("secrets CA bundle {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("secrets CA bundle {}: {problem}", path.display())]
    Bundle { path: PathBuf, problem: String },
    #[error("TLS client config: {0}")]
    Config(#[from] rustls::Error),
}

/// The TLS client configuration for upstreams: TLS 1.2 and 1.3 on ring, no
/// client certificate, ALPN left empty (HTTP/1.1 only: see `forward.rs`).
pub fn client_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = extra_ca {
        let bundle = |problem: String| TlsError::Bundle { path: path.to_path_buf(), problem };
        let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| bundle(format!("not PEM certificates: {e}")))?;
            roots.add(cert).map_err(|e| bundle(format!("a certificate is not a usable CA: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(bundle("holds no PEM certificate".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?.with_root_certificates(roots).with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_must_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        assert!(client_config(Some(&path)).unwrap_err().to_string().contains("holds no PEM certificate"));
        assert!(matches!(client_config(Some(&dir.path().join("missing"))), Err(TlsError::Read { .. })));
        client_config(None).unwrap();
    }
}
