//! Listings of containers and sessions: filtered by state, node or
//! container and labels, newest first, a page at a time. A page ends with
//! a cursor (the last row's creation time and id) that the next page starts
//! after; labels are matched in the JSON text the store keeps them in
//! (`{"k":"v",...}`, keys sorted, as serde writes a `BTreeMap`).

use std::collections::BTreeMap;

use super::outbox::{Tx, TxConn};
use super::{Backend, ContainerRow, SessionRow, Store, StoreError};

/// Where a page starts: after the row created at `created_at` with `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct After {
    pub created_at: i64,
    pub id: String,
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub state: Option<String>,
    /// Containers: on this node. Sessions: in this container.
    pub owner: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub after: Option<After>,
    pub limit: i64,
}

/// `"k":"v"` as it appears in the stored JSON, as a LIKE pattern.
fn label_pattern(k: &str, v: &str) -> String {
    let pair = format!("{}:{}", serde_json::to_string(k).expect("a string"), serde_json::to_string(v).expect("a string"));
    let escaped = pair.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    format!("%{escaped}%")
}

/// The WHERE clause and its string binds, numbered from `$1`.
fn clause(filter: &Filter, owner_column: &str) -> (String, Vec<String>) {
    let mut parts = Vec::new();
    let mut binds: Vec<String> = Vec::new();
    let mut bind = |v: String| {
        binds.push(v);
        format!("${}", binds.len())
    };
    if let Some(state) = &filter.state {
        parts.push(format!("state = {}", bind(state.clone())));
    }
    if let Some(owner) = &filter.owner {
        parts.push(format!("{owner_column} = {}", bind(owner.clone())));
    }
    for (k, v) in &filter.labels {
        parts.push(format!("labels LIKE {} ESCAPE '\\'", bind(label_pattern(k, v))));
    }
    if let Some(after) = &filter.after {
        let t = bind(after.created_at.to_string());
        let id = bind(after.id.clone());
        // Newest first: the next page is older, or as old with a smaller id.
        parts.push(format!("(created_at < CAST({t} AS BIGINT) OR (created_at = CAST({t} AS BIGINT) AND id < {id}))"));
    }
    let clause = if parts.is_empty() { String::new() } else { format!("WHERE {}", parts.join(" AND ")) };
    (clause, binds)
}

impl Store {
    /// A page of containers, newest first.
    pub async fn list_containers(&self, filter: &Filter) -> Result<Vec<ContainerRow>, StoreError> {
        let (clause, binds) = clause(filter, "node_id");
        // Audited: the clause is built from constant text and numbered binds.
        let sql = sqlx::AssertSqlSafe(format!("SELECT * FROM containers {clause} ORDER BY created_at DESC, id DESC LIMIT {}", filter.limit.max(1)));
        Ok(with_pool!(self, |pool| {
            let mut q = sqlx::query_as(sql);
            for b in &binds {
                q = q.bind(b);
            }
            q.fetch_all(pool).await
        })?)
    }

    /// A page of sessions, newest first.
    pub async fn list_sessions_page(&self, filter: &Filter) -> Result<Vec<SessionRow>, StoreError> {
        let (clause, binds) = clause(filter, "container_id");
        // Audited: as above.
        let sql = sqlx::AssertSqlSafe(format!("SELECT * FROM sessions {clause} ORDER BY created_at DESC, id DESC LIMIT {}", filter.limit.max(1)));
        Ok(with_pool!(self, |pool| {
            let mut q = sqlx::query_as(sql);
            for b in &binds {
                q = q.bind(b);
            }
            q.fetch_all(pool).await
        })?)
    }

    /// Sets a container's capacity and labels (a container made on its own).
    pub async fn set_container_shape(&self, id: &str, capacity: Option<i64>, labels: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let sql = "UPDATE containers SET capacity = $2, labels = $3 WHERE id = $1";
        let labels = serde_json::to_string(labels).expect("labels serialize");
        with_pool!(self, |pool| sqlx::query(sql).bind(id).bind(capacity).bind(&labels).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn set_session_labels(&self, id: &str, labels: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let sql = "UPDATE sessions SET labels = $2 WHERE id = $1";
        let labels = serde_json::to_string(labels).expect("labels serialize");
        with_pool!(self, |pool| sqlx::query(sql).bind(id).bind(&labels).execute(pool).await.map(|_| ()))?;
        Ok(())
    }
}

impl Tx {
    /// Sets a new container's capacity and labels, with its row.
    pub async fn set_container_shape(&mut self, id: &str, capacity: Option<i64>, labels: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let sql = "UPDATE containers SET capacity = $2, labels = $3 WHERE id = $1";
        let labels = serde_json::to_string(labels).expect("labels serialize");
        with_tx!(self, |conn| sqlx::query(sql).bind(id).bind(capacity).bind(&labels).execute(conn).await.map(|_| ()))?;
        Ok(())
    }

    /// Sets a new session's labels, with its row.
    pub async fn set_session_labels(&mut self, id: &str, labels: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let sql = "UPDATE sessions SET labels = $2 WHERE id = $1";
        let labels = serde_json::to_string(labels).expect("labels serialize");
        with_tx!(self, |conn| sqlx::query(sql).bind(id).bind(&labels).execute(conn).await.map(|_| ()))?;
        Ok(())
    }

    /// A container's capacity and how many of its sessions are open
    /// (creating or ready), as of this transaction (lock the container
    /// first: `Tx::lock_container_state`).
    pub async fn container_load(&mut self, id: &str) -> Result<(Option<i64>, i64), StoreError> {
        let capacity: Option<Option<i64>> = with_tx!(self, |conn| sqlx::query_scalar("SELECT capacity FROM containers WHERE id = $1").bind(id).fetch_optional(conn).await)?;
        let open: i64 = with_tx!(self, |conn| sqlx::query_scalar("SELECT COUNT(*) FROM sessions WHERE container_id = $1 AND state IN ('creating', 'ready')")
            .bind(id)
            .fetch_one(conn)
            .await)?;
        Ok((capacity.flatten(), open))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{postgres, sqlite};

    backend_suite!(listings_filter_by_state_owner_and_labels_and_page_by_cursor);

    async fn listings_filter_by_state_owner_and_labels_and_page_by_cursor(store: &Store) {
        for i in 0..5 {
            let id = format!("ctr_{i}");
            store.insert_container(&id, if i % 2 == 0 { "n1" } else { "n2" }, "{}").await.unwrap();
            let mut labels = BTreeMap::from([("team".to_string(), if i < 3 { "a" } else { "b_%" }.to_string())]);
            if i == 4 {
                labels.insert("x".into(), "1".into());
            }
            store.set_container_shape(&id, Some(4), &labels).await.unwrap();
        }
        store.container_failed("ctr_1", "gone").await.unwrap();
        let page = |f: Filter| async move { store.list_containers(&f).await.unwrap().into_iter().map(|c| c.id).collect::<Vec<_>>() };
        let all = page(Filter { limit: 10, ..Default::default() }).await;
        assert_eq!(all.len(), 5);
        let n1 = page(Filter { owner: Some("n1".into()), limit: 10, ..Default::default() }).await;
        assert_eq!(n1.len(), 3);
        let failed = page(Filter { state: Some("failed".into()), limit: 10, ..Default::default() }).await;
        assert_eq!(failed, ["ctr_1"]);
        let b = page(Filter { labels: BTreeMap::from([("team".into(), "b_%".into())]), limit: 10, ..Default::default() }).await;
        assert_eq!(b.len(), 2, "the value's LIKE wildcards are literal: {b:?}");
        let none = page(Filter { labels: BTreeMap::from([("team".into(), "b_".into())]), limit: 10, ..Default::default() }).await;
        assert!(none.is_empty(), "{none:?}");
        let two = page(Filter { labels: BTreeMap::from([("team".into(), "b_%".into()), ("x".into(), "1".into())]), limit: 10, ..Default::default() }).await;
        assert_eq!(two.len(), 1);

        // Pages of two, by cursor, cover every row once.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let rows = store.list_containers(&Filter { after: after.clone(), limit: 2, ..Default::default() }).await.unwrap();
            if rows.is_empty() {
                break;
            }
            let last = rows.last().unwrap();
            after = Some(After { created_at: last.created_at, id: last.id.clone() });
            seen.extend(rows.into_iter().map(|c| c.id));
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!((seen.len(), sorted.len()), (5, 5), "{seen:?}");
    }
}
