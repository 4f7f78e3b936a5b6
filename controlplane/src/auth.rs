//! Bearer tokens of the HTTP API: made, checked, and the first admin token
//! of a new store.
//!
//! A token is `agentd_<id>_<secret>`: a 16-hex-digit id (the store's key,
//! safe to log and to name in audit records) and a 256-bit random secret
//! (base64url). Only the SHA-256 of the secret is stored; a request's token
//! is checked by comparing digests in constant time. Scopes are ordered:
//! `read` < `write` (sessions, containers, prompts, permissions) < `admin`
//! (tokens, nodes, the registry, the audit log).

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::store::tokens::TokenRow;
use crate::store::{Store, StoreError};

const PREFIX: &str = "agentd_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Scope, String> {
        match s {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "admin" => Ok(Scope::Admin),
            other => Err(format!("unknown scope {other:?} (known: read, write, admin)")),
        }
    }
}

/// Who a request is, once its token checked out.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub scope: Scope,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send Authorization: Bearer <token>")]
    Missing,
    #[error("the Authorization header is not a bearer token")]
    Malformed,
    #[error("unknown token")]
    Unknown,
    #[error("token {0} was revoked")]
    Revoked(String),
    #[error("token {0} has expired")]
    Expired(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS has randomness");
    bytes
}

/// A new token of `scope`, valid for `ttl_ms` (or for good): its text,
/// shown once, and its row.
pub async fn create(store: &Store, scope: Scope, name: &str, ttl_ms: Option<i64>) -> Result<(String, TokenRow), StoreError> {
    let id = hex::encode(random::<8>());
    let secret = URL_SAFE_NO_PAD.encode(random::<32>());
    let row = store.insert_token(&id, name, scope.name(), &digest(&secret), ttl_ms).await?;
    Ok((format!("{PREFIX}{id}_{secret}"), row))
}

/// Checks the token an `Authorization` header value carries.
pub async fn check(store: &Store, header: Option<&str>) -> Result<Caller, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let token = header.strip_prefix("Bearer ").or_else(|| header.strip_prefix("bearer ")).ok_or(AuthError::Malformed)?.trim();
    let (id, secret) = token.strip_prefix(PREFIX).and_then(|t| t.split_once('_')).ok_or(AuthError::Unknown)?;
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::Unknown);
    }
    let found = store.check_token(id).await?.ok_or(AuthError::Unknown)?;
    // Constant time: the digest of a wrong secret tells nothing of the right one.
    let given = digest(secret);
    if !bool::from(given.as_bytes().ct_eq(found.row.secret_hash.as_bytes())) {
        return Err(AuthError::Unknown);
    }
    if found.row.revoked_at.is_some() {
        return Err(AuthError::Revoked(found.row.id));
    }
    if found.expired {
        return Err(AuthError::Expired(found.row.id));
    }
    let scope = found.row.scope.parse().map_err(|_| AuthError::Unknown)?;
    Ok(Caller { token_id: found.row.id, scope })
}

/// On a store with no usable admin token, makes one and writes it to
/// `file` (mode 0600), so that whoever runs the daemon can start using the
/// API; returns whether it did. The token's value is never logged.
pub async fn bootstrap_admin(store: &Store, file: &Path) -> Result<bool, BootstrapError> {
    if store.has_usable_admin_token().await? {
        return Ok(false);
    }
    let (token, row) = create(store, Scope::Admin, "bootstrap", None).await?;
    agentd_pki::write_private(file, format!("{token}\n").as_bytes()).map_err(|e| BootstrapError::File(e.to_string()))?;
    tracing::warn!(path = %file.display(), token_id = row.id, "no admin token existed: one was made and written to this file (mode 0600)");
    Ok(true)
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write the admin token: {0}")]
    File(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::sqlite;

    #[tokio::test]
    async fn tokens_check_out_by_secret_scope_expiry_and_revocation() {
        let (_dir, store) = sqlite().await;
        let (token, row) = create(&store, Scope::Write, "ci", None).await.unwrap();
        assert!(token.starts_with("agentd_") && token.len() > 16 + 43, "{token}");
        let caller = check(&store, Some(&format!("Bearer {token}"))).await.unwrap();
        assert_eq!((caller.token_id.as_str(), caller.scope), (row.id.as_str(), Scope::Write));

        assert!(matches!(check(&store, None).await, Err(AuthError::Missing)));
        assert!(matches!(check(&store, Some(&format!("Basic {token}"))).await, Err(AuthError::Malformed)));
        let wrong = format!("Bearer {}x", &token[..token.len() - 1]);
        assert!(matches!(check(&store, Some(&wrong)).await, Err(AuthError::Unknown)), "a wrong secret");
        assert!(matches!(check(&store, Some("Bearer agentd_zz_x")).await, Err(AuthError::Unknown)));

        let (short, _) = create(&store, Scope::Read, "", Some(1)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(matches!(check(&store, Some(&format!("Bearer {short}"))).await, Err(AuthError::Expired(_))));

        store.revoke_token(&row.id).await.unwrap();
        assert!(matches!(check(&store, Some(&format!("Bearer {token}"))).await, Err(AuthError::Revoked(_))));
        assert!(Scope::Read < Scope::Write && Scope::Write < Scope::Admin);
    }

    #[tokio::test]
    async fn the_first_admin_token_is_written_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = sqlite().await;
        let file = dir.path().join("admin.token");
        assert!(bootstrap_admin(&store, &file).await.unwrap());
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        let token = std::fs::read_to_string(&file).unwrap();
        assert_eq!(check(&store, Some(&format!("Bearer {}", token.trim()))).await.unwrap().scope, Scope::Admin);
        assert!(!bootstrap_admin(&store, &file).await.unwrap(), "not again while it is usable");
    }
}
