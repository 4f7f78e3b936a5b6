//! Audit records: one row per state-changing API call, written in batches by
//! [`crate::api::audit`], read back by `GET /v1/audit`, pruned by age.

use std::time::Duration;

use serde::Serialize;
use sqlx::{AssertSqlSafe, FromRow};

use super::{Backend, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct AuditRecord {
    pub id: i64,
    #[serde(flatten)]
    #[sqlx(flatten)]
    pub record: NewAuditRecord,
}

/// What one call did (the store assigns the record's id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct NewAuditRecord {
    /// When the call arrived, ms since the Unix epoch.
    pub at: i64,
    /// Who the caller said it was (`X-Agentd-Actor`); a claim.
    pub actor: Option<String>,
    /// The id of the token the call was made with: the identity.
    pub token_id: Option<String>,
    /// The caller's address, when the server knows it.
    pub peer: Option<String>,
    pub method: String,
    pub path: String,
    /// The entity the path names (`session`, `container`, ...), if any.
    pub entity_kind: Option<String>,
    pub entity_id: Option<String>,
    pub status: i64,
    /// The problem's `code` when the call failed.
    pub code: Option<String>,
    pub duration_us: i64,
}

/// Which records to read: newest first, or those after a cursor.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only records with a greater id (a cursor from an earlier page).
    pub after: Option<i64>,
    /// Only records about this entity.
    pub entity: Option<(String, String)>,
    pub limit: i64,
}

const COLUMNS: usize = 11;
/// Rows per INSERT: SQLite builds before 3.32 bind at most 999 parameters.
const ROWS_PER_INSERT: usize = 999 / COLUMNS;

impl Store {
    /// Writes `records`, a multi-row INSERT per chunk (one round trip each).
    pub async fn insert_audit_records(&self, records: &[NewAuditRecord]) -> Result<(), StoreError> {
        for chunk in records.chunks(ROWS_PER_INSERT) {
            let sql = insert_statement(chunk.len());
            with_pool!(self, |pool| {
                let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
                for r in chunk {
                    q = q
                        .bind(r.at)
                        .bind(&r.actor)
                        .bind(&r.peer)
                        .bind(&r.method)
                        .bind(&r.path)
                        .bind(&r.entity_kind)
                        .bind(&r.entity_id)
                        .bind(r.status)
                        .bind(&r.code)
                        .bind(r.duration_us)
                        .bind(&r.token_id);
                }
                q.execute(pool).await.map(|_| ())
            })?;
        }
        Ok(())
    }

    /// Records matching `query`, oldest first after a cursor, else the
    /// newest `limit` (still oldest first).
    pub async fn audit_records(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>, StoreError> {
        let (kind, id) = query.entity.clone().unzip();
        let filter = "($1 IS NULL OR entity_kind = $1) AND ($2 IS NULL OR entity_id = $2)";
        let rows: Vec<AuditRecord> = match query.after {
            Some(after) => {
                let sql = format!("SELECT * FROM audit_records WHERE {filter} AND id > $4 ORDER BY id LIMIT $3");
                with_pool!(self, |pool| sqlx::query_as(AssertSqlSafe(sql.clone()))
                    .bind(&kind)
                    .bind(&id)
                    .bind(query.limit)
                    .bind(after)
                    .fetch_all(pool)
                    .await)?
            }
            None => {
                let sql = format!("SELECT * FROM (SELECT * FROM audit_records WHERE {filter} ORDER BY id DESC LIMIT $3) newest ORDER BY id");
                with_pool!(self, |pool| sqlx::query_as(AssertSqlSafe(sql.clone())).bind(&kind).bind(&id).bind(query.limit).fetch_all(pool).await)?
            }
        };
        Ok(rows)
    }

    /// Deletes records older than `retention`; returns how many.
    pub async fn prune_audit(&self, retention: Duration) -> Result<u64, StoreError> {
        let cutoff = super::now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
        let sql = "DELETE FROM audit_records WHERE at < $1";
        Ok(with_pool!(self, |pool| sqlx::query(sql).bind(cutoff).execute(pool).await.map(|done| done.rows_affected()))?)
    }
}

/// `INSERT ... VALUES ($1, ..., $10), ($11, ...), ...` for `rows` rows.
fn insert_statement(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO audit_records (at, actor, peer, method, path, entity_kind, entity_id, status, code, duration_us, token_id) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        let first = row * COLUMNS + 1;
        let placeholders: Vec<String> = (first..first + COLUMNS).map(|n| format!("${n}")).collect();
        sql.push('(');
        sql.push_str(&placeholders.join(", "));
        sql.push(')');
    }
    sql
}
