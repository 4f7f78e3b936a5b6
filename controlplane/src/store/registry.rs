//! The agent registry's rows: what the last sync stored, replaced whole by
//! the next one (see [`crate::agent_registry`]).

use serde::Serialize;
use sqlx::FromRow;

use super::{Backend, Store, StoreError, now_ms};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct RegistryAgentRow {
    pub id: String,
    pub name: String,
    pub version: String,
    pub description: String,
    /// The entry as the registry gave it.
    #[serde(skip)]
    pub entry_json: String,
    pub source: String,
    pub synced_at: i64,
}

/// One agent of a registry about to be stored.
pub struct NewRegistryAgent<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub version: &'a str,
    pub description: &'a str,
    pub entry_json: &'a str,
}

/// Runs the same statements in a transaction on either backend.
macro_rules! in_tx {
    ($store:expr, |$conn:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let $conn = &mut *tx;
                let value = $body;
                tx.commit().await?;
                value
            }
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let $conn = &mut *tx;
                let value = $body;
                tx.commit().await?;
                value
            }
        }
    };
}

impl Store {
    /// Makes `agents` the whole registry, atomically: readers see the old
    /// registry or the new one, never a mix, and a failure (a duplicate id,
    /// say) leaves the old one in place.
    pub async fn replace_registry(&self, source: &str, agents: &[NewRegistryAgent<'_>]) -> Result<(), StoreError> {
        let now = now_ms();
        let insert = "INSERT INTO registry_agents (id, name, version, description, entry_json, source, synced_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7)";
        in_tx!(self, |conn| {
            sqlx::query("DELETE FROM registry_agents").execute(&mut *conn).await?;
            for a in agents {
                sqlx::query(insert)
                    .bind(a.id)
                    .bind(a.name)
                    .bind(a.version)
                    .bind(a.description)
                    .bind(a.entry_json)
                    .bind(source)
                    .bind(now)
                    .execute(&mut *conn)
                    .await?;
            }
        });
        Ok(())
    }

    /// The registry's agents, by id.
    pub async fn registry_agents(&self) -> Result<Vec<RegistryAgentRow>, StoreError> {
        let sql = "SELECT * FROM registry_agents ORDER BY id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).fetch_all(pool).await)?)
    }

    pub async fn registry_agent(&self, id: &str) -> Result<Option<RegistryAgentRow>, StoreError> {
        let sql = "SELECT * FROM registry_agents WHERE id = $1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?)
    }
}
