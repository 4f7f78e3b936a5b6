//! The HTTP API's bearer tokens: a scope, an optional expiry, a revocation,
//! and the SHA-256 of the secret (never the secret: see `crate::auth`).

use serde::Serialize;
use sqlx::FromRow;

use super::{Backend, Store, StoreError};

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct TokenRow {
    pub id: String,
    pub name: String,
    pub scope: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// A token as a request presents it, judged by the database's clock.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    pub row: TokenRow,
    /// Past its expiry now.
    pub expired: bool,
}

impl Store {
    /// Stores a token; `ttl_ms` from now, or no expiry.
    pub async fn insert_token(&self, id: &str, name: &str, scope: &str, secret_hash: &str, ttl_ms: Option<i64>) -> Result<TokenRow, StoreError> {
        let sql = self.sql(
            "INSERT INTO api_tokens (id, name, scope, secret_hash, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, NOW_MS, CASE WHEN $5 IS NULL THEN NULL ELSE NOW_MS + $5 END)",
        );
        with_pool!(self, |pool| sqlx::query(sql).bind(id).bind(name).bind(scope).bind(secret_hash).bind(ttl_ms).execute(pool).await.map(|_| ()))?;
        Ok(self.token(id).await?.expect("a token was just stored"))
    }

    pub async fn token(&self, id: &str) -> Result<Option<TokenRow>, StoreError> {
        let sql = "SELECT * FROM api_tokens WHERE id = $1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?)
    }

    /// The token `id` with whether it has expired, for a request's check.
    pub async fn check_token(&self, id: &str) -> Result<Option<TokenCheck>, StoreError> {
        let sql = self.sql("SELECT *, CAST(CASE WHEN expires_at IS NOT NULL AND expires_at <= NOW_MS THEN 1 ELSE 0 END AS BIGINT) AS expired FROM api_tokens WHERE id = $1");
        let found: Option<(TokenRow, i64)> = with_pool!(self, |pool| {
            use sqlx::Row;
            sqlx::query(sql)
                .bind(id)
                .fetch_optional(pool)
                .await
                .and_then(|r| r.map(|r| Ok((TokenRow::from_row(&r)?, r.try_get::<i64, _>("expired")?))).transpose())
        })?;
        Ok(found.map(|(row, expired)| TokenCheck { row, expired: expired == 1 }))
    }

    /// Every token, newest first.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let sql = "SELECT * FROM api_tokens ORDER BY created_at DESC, id DESC";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).fetch_all(pool).await)?)
    }

    /// Revokes a token; false if there is none (revoking twice is fine).
    pub async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let sql = self.sql("UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, NOW_MS) WHERE id = $1");
        let n = with_pool!(self, |pool| sqlx::query(sql).bind(id).execute(pool).await.map(|d| d.rows_affected()))?;
        Ok(n == 1)
    }

    /// Whether an admin token that may still be used exists.
    pub async fn has_usable_admin_token(&self) -> Result<bool, StoreError> {
        let sql = self.sql("SELECT COUNT(*) FROM api_tokens WHERE scope = 'admin' AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > NOW_MS)");
        let n: i64 = with_pool!(self, |pool| sqlx::query_scalar(sql).fetch_one(pool).await)?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{postgres, sqlite};

    backend_suite!(tokens_expire_and_are_revoked);

    async fn tokens_expire_and_are_revoked(store: &Store) {
        assert!(!store.has_usable_admin_token().await.unwrap());
        store.insert_token("t1", "ops", "admin", "h1", None).await.unwrap();
        assert!(store.has_usable_admin_token().await.unwrap());
        let check = store.check_token("t1").await.unwrap().unwrap();
        assert_eq!((check.row.scope.as_str(), check.expired, check.row.revoked_at), ("admin", false, None));

        store.insert_token("t2", "", "read", "h2", Some(1)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(store.check_token("t2").await.unwrap().unwrap().expired);
        assert!(store.check_token("nope").await.unwrap().is_none());

        assert!(store.revoke_token("t1").await.unwrap());
        assert!(store.revoke_token("t1").await.unwrap(), "twice is fine");
        assert!(!store.revoke_token("nope").await.unwrap());
        assert!(store.check_token("t1").await.unwrap().unwrap().row.revoked_at.is_some());
        assert!(!store.has_usable_admin_token().await.unwrap());
        assert_eq!(store.list_tokens().await.unwrap().len(), 2);
    }
}
