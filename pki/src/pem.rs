//! PEM in, DER out: the few conversions every module needs, with one error type so
//! each caller can say which input was bad.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

/// The PEM text held no usable section of the expected kind.
#[derive(Debug, thiserror::Error)]
#[error("no {kind} found in the PEM text ({reason})")]
pub struct PemError {
    /// "certificate" or "private key": what the caller asked for.
    pub kind: &'static str,
    /// The PEM parser's own word, for the rare case it is not simply missing.
    pub reason: String,
}

/// The first certificate in `pem`.
pub fn cert_der(pem: &str) -> Result<CertificateDer<'static>, PemError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PemError {
        kind: "certificate",
        reason: e.to_string(),
    })
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub fn key_der(pem: &str) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PemError {
        kind: "private key",
        reason: e.to_string(),
    })
}

/// Lowercase hex SHA-256 of a certificate's DER: what join tokens pin the CA by.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}
