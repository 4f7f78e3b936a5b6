//! The cluster's trust: its CA (made once, by whichever control plane or
//! `agentd join-token create` needs it first) and the join tokens nodes
//! present once to get a certificate. A token's secret is never stored: only
//! its SHA-256 (see `agentd_pki::token`).

use sqlx::FromRow;

use super::{Backend, Store, StoreError};

#[derive(Debug, Clone, FromRow)]
pub struct CaRow {
    pub cert_pem: String,
    pub key_pem: String,
}

#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct JoinTokenRow {
    pub id: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub description: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    pub node_id: Option<String>,
}

/// Why a join token cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenRefusal {
    #[error("unknown join token")]
    Unknown,
    #[error("join token {0} was already used")]
    Used(String),
    #[error("join token {0} has expired")]
    Expired(String),
}

impl Store {
    /// The cluster CA; when there is none yet, `make()`'s is stored and
    /// returned. Two makers racing both get the one stored first.
    pub async fn cluster_ca_or(&self, make: impl FnOnce() -> Result<CaRow, String>) -> Result<CaRow, CaStoreError> {
        if let Some(ca) = self.cluster_ca().await? {
            return Ok(ca);
        }
        let made = make().map_err(CaStoreError::Make)?;
        let sql = self.sql("INSERT INTO cluster_ca (id, cert_pem, key_pem, created_at) VALUES (1, $1, $2, NOW_MS) ON CONFLICT (id) DO NOTHING");
        with_pool!(self, |pool| sqlx::query(sql).bind(&made.cert_pem).bind(&made.key_pem).execute(pool).await.map(|_| ())).map_err(StoreError::from)?;
        Ok(self.cluster_ca().await?.expect("a CA was just stored"))
    }

    pub async fn cluster_ca(&self) -> Result<Option<CaRow>, StoreError> {
        let sql = "SELECT cert_pem, key_pem FROM cluster_ca WHERE id = 1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).fetch_optional(pool).await)?)
    }

    /// Stores a join token (its id and secret hash) valid for `ttl_ms`.
    pub async fn insert_join_token(&self, id: &str, secret_hash: &str, description: &str, ttl_ms: i64) -> Result<JoinTokenRow, StoreError> {
        let sql = self.sql("INSERT INTO join_tokens (id, secret_hash, description, created_at, expires_at) VALUES ($1, $2, $3, NOW_MS, NOW_MS + $4)");
        with_pool!(self, |pool| sqlx::query(sql).bind(id).bind(secret_hash).bind(description).bind(ttl_ms).execute(pool).await.map(|_| ()))?;
        Ok(self.join_token(id).await?.expect("a token was just stored"))
    }

    pub async fn join_token(&self, id: &str) -> Result<Option<JoinTokenRow>, StoreError> {
        let sql = "SELECT * FROM join_tokens WHERE id = $1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?)
    }

    pub async fn list_join_tokens(&self) -> Result<Vec<JoinTokenRow>, StoreError> {
        let sql = "SELECT * FROM join_tokens ORDER BY created_at, id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).fetch_all(pool).await)?)
    }

    /// A token that may be used now (known, unused, unexpired), by the
    /// database's clock.
    pub async fn usable_join_token(&self, id: &str) -> Result<Result<JoinTokenRow, TokenRefusal>, StoreError> {
        let sql = self.sql("SELECT *, CAST(CASE WHEN expires_at <= NOW_MS THEN 1 ELSE 0 END AS BIGINT) AS expired FROM join_tokens WHERE id = $1");
        let row: Option<(JoinTokenRow, i64)> = with_pool!(self, |pool| {
            use sqlx::Row;
            sqlx::query(sql)
                .bind(id)
                .fetch_optional(pool)
                .await
                .and_then(|r| r.map(|r| Ok((JoinTokenRow::from_row(&r)?, r.try_get::<i64, _>("expired")?))).transpose())
        })?;
        Ok(match row {
            None => Err(TokenRefusal::Unknown),
            Some((t, _)) if t.used_at.is_some() => Err(TokenRefusal::Used(t.id)),
            Some((t, 1)) => Err(TokenRefusal::Expired(t.id)),
            Some((t, _)) => Ok(t),
        })
    }

    /// Marks the token used by `node_id`; false when another join used it
    /// first (a token serves one join).
    pub async fn use_join_token(&self, id: &str, node_id: &str) -> Result<bool, StoreError> {
        let sql = self.sql("UPDATE join_tokens SET used_at = NOW_MS, node_id = $2 WHERE id = $1 AND used_at IS NULL AND expires_at > NOW_MS");
        let n = with_pool!(self, |pool| sqlx::query(sql).bind(id).bind(node_id).execute(pool).await.map(|d| d.rows_affected()))?;
        Ok(n == 1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaStoreError {
    #[error("cannot make the cluster CA: {0}")]
    Make(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{postgres, sqlite};

    backend_suite!(the_ca_is_made_once_and_tokens_serve_one_join);

    async fn the_ca_is_made_once_and_tokens_serve_one_join(store: &Store) {
        assert!(store.cluster_ca().await.unwrap().is_none());
        let first = store.cluster_ca_or(|| Ok(CaRow { cert_pem: "cert-1".into(), key_pem: "key-1".into() })).await.unwrap();
        let again = store.cluster_ca_or(|| Ok(CaRow { cert_pem: "cert-2".into(), key_pem: "key-2".into() })).await.unwrap();
        assert_eq!((first.cert_pem.as_str(), again.cert_pem.as_str()), ("cert-1", "cert-1"), "the first CA stays");

        store.insert_join_token("t1", "hash", "for n1", 60_000).await.unwrap();
        assert!(store.usable_join_token("t1").await.unwrap().is_ok());
        assert_eq!(store.usable_join_token("nope").await.unwrap().unwrap_err(), TokenRefusal::Unknown);
        assert!(store.use_join_token("t1", "n1").await.unwrap());
        assert!(!store.use_join_token("t1", "n2").await.unwrap(), "single use");
        assert_eq!(store.usable_join_token("t1").await.unwrap().unwrap_err(), TokenRefusal::Used("t1".into()));

        store.insert_join_token("t2", "hash", "", 1).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(store.usable_join_token("t2").await.unwrap().unwrap_err(), TokenRefusal::Expired("t2".into()));
        assert!(!store.use_join_token("t2", "n2").await.unwrap(), "expired");
        assert_eq!(store.list_join_tokens().await.unwrap().len(), 2);
    }
}
