//! The agent bundles each node was given (see migrations 0009_bundles).

use serde::Serialize;
use sqlx::FromRow;

use super::{Backend, Store, StoreError, now_ms};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct BundleRow {
    pub node_id: String,
    pub archive_url: String,
    /// Empty when the registry gave no digest.
    pub sha256: String,
    /// Sandboxes built with it.
    pub uses: i64,
    pub first_used_at: i64,
    pub last_used_at: i64,
}

impl Store {
    /// Counts one more sandbox on `node_id` built with the bundle.
    pub async fn bundle_used(&self, node_id: &str, archive_url: &str, sha256: &str) -> Result<(), StoreError> {
        let sql = "INSERT INTO bundles (node_id, archive_url, sha256, uses, first_used_at, last_used_at) VALUES ($1, $2, $3, 1, $4, $4) \
                   ON CONFLICT (node_id, archive_url, sha256) DO UPDATE SET uses = bundles.uses + 1, last_used_at = excluded.last_used_at";
        with_pool!(self, |pool| sqlx::query(sql).bind(node_id).bind(archive_url).bind(sha256).bind(now_ms()).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Every bundle, most recently used first.
    pub async fn bundles(&self) -> Result<Vec<BundleRow>, StoreError> {
        let sql = "SELECT * FROM bundles ORDER BY last_used_at DESC, archive_url";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).fetch_all(pool).await)?)
    }
}
