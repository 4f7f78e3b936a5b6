//! Join tokens: how a new node proves it was invited, and how it knows it joined the
//! right cluster.
//!
//! Text form: `agentd-join.<token_id>.<secret>.<ca_fingerprint>`, with a 16-hex-digit
//! id (the store's lookup key), a 256-bit secret (base64url, no padding) and the
//! lowercase hex SHA-256 of the cluster CA certificate's DER.
//!
//! The exchange, with `K = SHA-256(secret)`:
//!
//! 1. The control plane stores only `(token_id, hex(K))`.
//! 2. The node sends `token_id`, its CSR and
//!    `proof = HMAC-SHA256(K, "agentd-join-v1" || csr)`. The secret itself never
//!    crosses the wire.
//! 3. The control plane looks `K` up by id, recomputes the proof (constant-time
//!    compare), signs the CSR and answers the CA certificate, the node certificate and
//!    `answer_mac = HMAC-SHA256(K, "agentd-join-answer-v1" || len(ca) || ca || len(cert) || cert)`
//!    (lengths as 8-byte big-endian, so no bytes can move from one field to the other).
//! 4. The node checks the answer MAC and that the CA certificate's fingerprint is the
//!    one in its token, then keeps CA and certificate.
//!
//! Threat model:
//! - Someone who reads the join traffic (even over plain HTTP) learns neither the
//!   secret nor `K`. A proof they saw is bound to that CSR, whose private key stays on
//!   the node: replaying it gets a certificate for a key they do not hold, useless to
//!   them (it can burn a single-use token, a denial of service only).
//! - Someone in the middle cannot hand the node a CA or certificate of their own: the
//!   answer MAC needs `K`, and the CA must match the token's fingerprint anyway.
//! - Someone who reads the control plane's database learns `K` and can forge proofs,
//!   i.e. join a node. That reader also holds the CA key, which is worth more; storing
//!   `K` rather than the secret keeps the token text itself out of backups and logs.
//! - The token text is the credential: whoever has it can join one node. Keep it
//!   short-lived and single-use on the control plane's side.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::random::{self, RandomError};

type HmacSha256 = Hmac<Sha256>;

/// What every join token's text starts with.
pub const TOKEN_PREFIX: &str = "agentd-join";
/// Domain-separates the node's proof from every other MAC under the same key.
const PROOF_TAG: &[u8] = b"agentd-join-v1";
/// Domain-separates the control plane's answer MAC.
const ANSWER_TAG: &[u8] = b"agentd-join-answer-v1";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed join token: {0}")]
    Malformed(&'static str),
    #[error("the CA fingerprint {0:?} is not 64 lowercase hex digits")]
    BadFingerprint(String),
    #[error("stored join token hash is not 64 hex digits")]
    BadStoredHash,
    #[error(
        "the join answer's MAC does not match: the control plane does not hold this token, or the answer was altered"
    )]
    AnswerMac,
    #[error("the CA handed over has fingerprint {got}, the join token expects {expected}")]
    FingerprintMismatch { expected: String, got: String },
    #[error("the CA certificate handed over is unreadable: {0}")]
    CaPem(crate::pem::PemError),
    #[error(transparent)]
    Random(#[from] RandomError),
}

/// A join token as the node holds it (parsed from its text form).
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// 16 lowercase hex digits: the store's key.
    id: String,
    /// The 256-bit secret.
    secret: [u8; 32],
    /// Lowercase hex SHA-256 of the CA certificate's DER.
    ca_fingerprint: String,
}

/// What the control plane stores for a token: never the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredJoinToken {
    /// The token id, as in the token text.
    pub id: String,
    /// Lowercase hex SHA-256 of the 32 secret bytes: the key of the join MACs.
    pub secret_hash: String,
}

impl std::fmt::Debug for JoinToken {
    // The secret stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

/// The text form, secret included: print it only to whoever is to join a node.
impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.id,
            URL_SAFE_NO_PAD.encode(self.secret),
            self.ca_fingerprint
        )
    }
}

impl std::str::FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, TokenError> {
        Self::parse(s)
    }
}

impl JoinToken {
    /// A new token for the CA with this fingerprint (as [`crate::ClusterCa::fingerprint`]
    /// gives it), and what the control plane stores for it.
    pub fn generate(ca_fingerprint: &str) -> Result<(JoinToken, StoredJoinToken), TokenError> {
        if !is_lower_hex(ca_fingerprint, 64) {
            return Err(TokenError::BadFingerprint(ca_fingerprint.to_owned()));
        }
        let token = JoinToken {
            id: hex::encode(random::bytes::<8>()?),
            secret: random::bytes::<32>()?,
            ca_fingerprint: ca_fingerprint.to_owned(),
        };
        let stored = StoredJoinToken {
            id: token.id.clone(),
            secret_hash: hex::encode(token.key()),
        };
        Ok((token, stored))
    }

    /// Parses the text form. Surrounding whitespace (a pasted newline) is ignored;
    /// anything else out of shape is refused with a `malformed join token: ...` error.
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let mut parts = text.trim().split('.');
        let (Some(prefix), Some(id), Some(secret), Some(fingerprint), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed(
                "expected agentd-join.<id>.<secret>.<ca fingerprint>",
            ));
        };
        if prefix != TOKEN_PREFIX {
            return Err(TokenError::Malformed(
                "it does not start with 'agentd-join.'",
            ));
        }
        if !is_lower_hex(id, 16) {
            return Err(TokenError::Malformed(
                "the id is not 16 lowercase hex digits",
            ));
        }
        let secret: [u8; 32] = URL_SAFE_NO_PAD
            .decode(secret)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(TokenError::Malformed(
                "the secret is not 32 bytes of unpadded base64url",
            ))?;
        if !is_lower_hex(fingerprint, 64) {
            return Err(TokenError::Malformed(
                "the CA fingerprint is not 64 lowercase hex digits",
            ));
        }
        Ok(JoinToken {
            id: id.to_owned(),
            secret,
            ca_fingerprint: fingerprint.to_owned(),
        })
    }

    /// The id the node sends along with its proof.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The CA fingerprint this token pins.
    pub fn ca_fingerprint(&self) -> &str {
        &self.ca_fingerprint
    }

    /// The node's proof that it holds this token, bound to the CSR it sends
    /// (lowercase hex).
    pub fn proof(&self, csr: &[u8]) -> String {
        hex::encode(proof_mac(&self.key(), csr).finalize().into_bytes())
    }

    /// Checks the control plane's answer: its MAC (so the answer comes from a holder of
    /// this token and was not altered), then the CA's fingerprint against the token.
    pub fn check_answer(
        &self,
        ca_pem: &str,
        cert_pem: &str,
        answer_mac_hex: &str,
    ) -> Result<(), TokenError> {
        let expected = answer_mac(&self.key(), ca_pem, cert_pem);
        let given = hex::decode(answer_mac_hex.trim()).map_err(|_| TokenError::AnswerMac)?;
        expected
            .verify_slice(&given)
            .map_err(|_| TokenError::AnswerMac)?;
        let got = crate::ca::ca_fingerprint(ca_pem).map_err(TokenError::CaPem)?;
        if got != self.ca_fingerprint {
            return Err(TokenError::FingerprintMismatch {
                expected: self.ca_fingerprint.clone(),
                got,
            });
        }
        Ok(())
    }

    /// `K = SHA-256(secret)`: the MAC key both sides share.
    fn key(&self) -> [u8; 32] {
        Sha256::digest(self.secret).into()
    }
}

impl StoredJoinToken {
    /// See [`verify_join_proof`].
    pub fn verify_proof(&self, csr: &[u8], proof_hex: &str) -> bool {
        verify_join_proof(&self.secret_hash, csr, proof_hex)
    }

    /// See [`join_answer_mac`].
    pub fn answer_mac(&self, ca_pem: &str, cert_pem: &str) -> Result<String, TokenError> {
        join_answer_mac(&self.secret_hash, ca_pem, cert_pem)
    }
}

/// Control plane: whether `proof_hex` is the proof for `csr` (the exact bytes the node
/// sent) under the token whose stored hash is `secret_hash_hex`. Compares in constant
/// time (`hmac`'s `verify_slice`). A malformed hash or proof is simply not a match.
pub fn verify_join_proof(secret_hash_hex: &str, csr: &[u8], proof_hex: &str) -> bool {
    let (Some(key), Ok(proof)) = (decode_key(secret_hash_hex), hex::decode(proof_hex.trim()))
    else {
        return false;
    };
    proof_mac(&key, csr).verify_slice(&proof).is_ok()
}

/// Control plane: the MAC that lets the node trust the answer (lowercase hex).
pub fn join_answer_mac(
    secret_hash_hex: &str,
    ca_pem: &str,
    cert_pem: &str,
) -> Result<String, TokenError> {
    let key = decode_key(secret_hash_hex).ok_or(TokenError::BadStoredHash)?;
    Ok(hex::encode(
        answer_mac(&key, ca_pem, cert_pem).finalize().into_bytes(),
    ))
}

fn proof_mac(key: &[u8; 32], csr: &[u8]) -> HmacSha256 {
    let mut mac = new_mac(key);
    mac.update(PROOF_TAG);
    mac.update(csr);
    mac
}

fn answer_mac(key: &[u8; 32], ca_pem: &str, cert_pem: &str) -> HmacSha256 {
    let mut mac = new_mac(key);
    mac.update(ANSWER_TAG);
    for field in [ca_pem.as_bytes(), cert_pem.as_bytes()] {
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field);
    }
    mac
}

fn new_mac(key: &[u8; 32]) -> HmacSha256 {
    // HMAC takes keys of any length; this cannot fail.
    HmacSha256::new_from_slice(key).expect("HMAC accepts any key length")
}

fn decode_key(hex_text: &str) -> Option<[u8; 32]> {
    hex::decode(hex_text.trim()).ok()?.try_into().ok()
}

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::ClusterCa;
    use crate::csr::NodeKey;

    const DAY: Duration = Duration::from_secs(24 * 3600);
    const FP: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    #[test]
    fn text_round_trip() {
        let (token, stored) = JoinToken::generate(FP).unwrap();
        let text = token.to_string();
        let parts: Vec<&str> = text.split('.').collect();
        assert_eq!(parts.len(), 4, "{text}");
        assert_eq!(parts[0], "agentd-join");
        assert_eq!(parts[1].len(), 16);
        assert_eq!(parts[2].len(), 43, "32 bytes, base64 without padding");
        assert_eq!(parts[3], FP);
        let parsed = JoinToken::parse(&format!("  {text}\n")).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(text.parse::<JoinToken>().unwrap(), token);
        assert_eq!(stored.id, token.id());
        assert_eq!(
            stored.secret_hash,
            hex::encode(Sha256::digest(token.secret))
        );
        // The secret is not in the stored form, nor in Debug output.
        assert!(!format!("{stored:?}{token:?}").contains(parts[2]));
        // Two tokens differ.
        let (again, _) = JoinToken::generate(FP).unwrap();
        assert_ne!(again.id(), token.id());
        assert_ne!(again.secret, token.secret);
    }

    #[test]
    fn malformed_tokens() {
        let (token, _) = JoinToken::generate(FP).unwrap();
        let good = token.to_string();
        let parts: Vec<&str> = good.split('.').collect();
        let with = |i: usize, v: &str| {
            let mut p = parts.clone();
            p[i] = v;
            p.join(".")
        };
        let cases = [
            String::new(),
            "agentd-join".to_owned(),
            parts[..3].join("."),
            format!("{good}.extra"),
            with(0, "k3s-join"),
            with(1, "0123"),
            with(1, "0123456789ABCDEF"),
            with(1, "0123456789abcdeg"),
            with(2, "short"),
            with(2, &format!("{}=", parts[2])),
            with(
                2,
                &parts[2].replace(|c: char| c.is_ascii_alphanumeric(), "+"),
            ),
            with(3, &FP[..63]),
            with(3, &FP.to_uppercase()),
        ];
        for case in cases {
            let err = JoinToken::parse(&case).unwrap_err();
            assert!(matches!(err, TokenError::Malformed(_)), "{case:?}: {err}");
            assert!(
                err.to_string().starts_with("malformed join token: "),
                "{err}"
            );
        }
        assert!(matches!(
            JoinToken::generate("not a fingerprint"),
            Err(TokenError::BadFingerprint(_))
        ));
    }

    #[test]
    fn proof_verifies_only_for_its_secret_and_csr() {
        let (token, stored) = JoinToken::generate(FP).unwrap();
        let (other, _) = JoinToken::generate(FP).unwrap();
        let csr = b"-----BEGIN CERTIFICATE REQUEST-----\nabc\n";
        let proof = token.proof(csr);
        assert_eq!(proof.len(), 64);
        assert!(stored.verify_proof(csr, &proof));
        assert!(verify_join_proof(&stored.secret_hash, csr, &proof));
        // Another token's proof, another CSR, a damaged or truncated proof: no.
        assert!(!stored.verify_proof(csr, &other.proof(csr)));
        assert!(!stored.verify_proof(b"another csr", &proof));
        let mut flipped = proof.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        assert!(!stored.verify_proof(csr, std::str::from_utf8(&flipped).unwrap()));
        assert!(!stored.verify_proof(csr, &proof[..62]));
        assert!(!stored.verify_proof(csr, ""));
        assert!(!stored.verify_proof(csr, "zz"));
        assert!(!verify_join_proof("not hex", csr, &proof));
        // The proof does not reveal the key: it is not SHA-256(secret) itself.
        assert_ne!(proof, stored.secret_hash);
    }

    #[test]
    fn answer_mac_and_fingerprint() {
        let ca = ClusterCa::generate().unwrap();
        let (token, stored) = JoinToken::generate(&ca.fingerprint()).unwrap();
        let key = NodeKey::generate().unwrap();
        let csr = key.csr_pem("n1").unwrap();
        assert!(stored.verify_proof(csr.as_bytes(), &token.proof(csr.as_bytes())));
        let cert = ca.sign_node_csr(&csr, "n1", DAY).unwrap();
        let mac = stored.answer_mac(ca.cert_pem(), &cert).unwrap();
        token.check_answer(ca.cert_pem(), &cert, &mac).unwrap();

        // Altered certificate, or bytes moved between the two fields: refused.
        let other_cert = ca.sign_node_csr(&csr, "n1", DAY).unwrap();
        assert!(matches!(
            token.check_answer(ca.cert_pem(), &other_cert, &mac),
            Err(TokenError::AnswerMac)
        ));
        let joined = format!("{}{cert}", ca.cert_pem());
        let moved = join_answer_mac(&stored.secret_hash, &joined, "").unwrap();
        assert!(matches!(
            token.check_answer(&joined, "", &mac),
            Err(TokenError::AnswerMac)
        ));
        assert_ne!(moved, mac);
        // A MAC under another token's key: refused.
        let (_, other_stored) = JoinToken::generate(&ca.fingerprint()).unwrap();
        let wrong = other_stored.answer_mac(ca.cert_pem(), &cert).unwrap();
        assert!(matches!(
            token.check_answer(ca.cert_pem(), &cert, &wrong),
            Err(TokenError::AnswerMac)
        ));
        assert!(matches!(
            token.check_answer(ca.cert_pem(), &cert, "xyz"),
            Err(TokenError::AnswerMac)
        ));

        // A control plane that holds the token but presents another CA (a different
        // cluster sharing a leaked token, say): the fingerprint gives it away.
        let other_ca = ClusterCa::generate().unwrap();
        let mac = stored.answer_mac(other_ca.cert_pem(), &cert).unwrap();
        let err = token
            .check_answer(other_ca.cert_pem(), &cert, &mac)
            .unwrap_err();
        assert!(
            matches!(&err, TokenError::FingerprintMismatch { expected, got }
                if *expected == ca.fingerprint() && *got == other_ca.fingerprint()),
            "{err}"
        );
        assert!(matches!(
            join_answer_mac("nope", ca.cert_pem(), &cert),
            Err(TokenError::BadStoredHash)
        ));
    }
}
