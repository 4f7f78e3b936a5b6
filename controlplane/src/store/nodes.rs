//! Nodes and their heartbeats. Times come from the database's clock (as in
//! the outbox), so control planes with skewed clocks agree on who is silent.

use serde::Serialize;
use sqlx::FromRow;
use std::time::Duration;

use super::states::{container, session};
use super::{Backend, Store, StoreError};

pub mod node_state {
    pub const ALIVE: &str = "alive";
    /// Silent for longer than the heartbeat timeout; back to alive on its
    /// next heartbeat (what failed with it stays failed).
    pub const LOST: &str = "lost";
}

/// What an operator decided about a node, beside whether it answers.
pub mod node_admin {
    /// Takes new containers.
    pub const ACTIVE: &str = "active";
    /// Takes no new containers; what runs there goes on.
    pub const CORDONED: &str = "cordoned";
    /// Cordoned, and what runs there is deleted once idle or at the deadline.
    pub const DRAINING: &str = "draining";
    /// Drained: nothing runs there; it may be removed.
    pub const DRAINED: &str = "drained";
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct NodeRow {
    pub id: String,
    /// alive | lost: whether it answers.
    pub state: String,
    pub last_heartbeat_at: i64,
    pub error: Option<String>,
    pub updated_at: i64,
    /// `unix:<path>` or `<host>:<port>` (mutual TLS).
    pub address: String,
    /// A JSON object of string labels.
    pub labels: String,
    pub version: String,
    pub capacity_slots: i64,
    pub capacity_memory: i64,
    pub capacity_cpus: f64,
    /// Live usage at the last heartbeat, JSON.
    pub usage: String,
    /// See [`node_admin`].
    pub admin: String,
    pub drain_deadline: Option<i64>,
    pub created_at: i64,
    #[serde(skip)]
    pub cert_fingerprint: String,
    #[serde(skip)]
    pub watcher: Option<String>,
    #[serde(skip)]
    pub watcher_until: Option<i64>,
    #[serde(skip)]
    pub journal_id: String,
    #[serde(skip)]
    pub journal_seq: i64,
}

impl NodeRow {
    pub fn labels(&self) -> std::collections::BTreeMap<String, String> {
        serde_json::from_str(&self.labels).unwrap_or_default()
    }
}

/// A node as it registers (joins, or is the one of `agentd up`).
#[derive(Debug, Clone, Default)]
pub struct NodeRegistration {
    pub id: String,
    pub address: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub version: String,
    pub capacity: Capacity,
    pub cert_fingerprint: String,
}

/// What a node offers, as it reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Capacity {
    pub slots: i64,
    pub memory: i64,
    pub cpus: f64,
}

/// Where a node's journal watcher is.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct JournalCursor {
    pub journal_id: String,
    pub journal_seq: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeAdminError {
    #[error("no node {0}")]
    NotFound(String),
    #[error("node {node_id} is {current}: it cannot become {to}")]
    Illegal { node_id: String, current: String, to: String },
    #[error("node {0} still holds containers")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a lost node took with it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Casualties {
    pub containers: u64,
    pub sessions: u64,
    pub runs: u64,
}

impl Store {
    /// Records a node with its address, labels and capacity (a join, or the
    /// local node of `agentd up` at each start), alive as of now. A node id
    /// joining again keeps its history and journal cursor.
    pub async fn register_node(&self, n: &NodeRegistration) -> Result<(), StoreError> {
        let labels = serde_json::to_string(&n.labels).expect("labels serialize");
        let sql = self.sql(
            "INSERT INTO nodes (id, state, last_heartbeat_at, updated_at, created_at, address, labels, version, \
               capacity_slots, capacity_memory, capacity_cpus, cert_fingerprint) \
             VALUES ($1, 'alive', NOW_MS, NOW_MS, NOW_MS, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (id) DO UPDATE SET state = 'alive', last_heartbeat_at = NOW_MS, error = NULL, updated_at = NOW_MS, \
               address = $2, labels = $3, version = $4, capacity_slots = $5, capacity_memory = $6, capacity_cpus = $7, \
               cert_fingerprint = $8",
        );
        with_pool!(self, |pool| sqlx::query(sql)
            .bind(&n.id)
            .bind(&n.address)
            .bind(&labels)
            .bind(&n.version)
            .bind(n.capacity.slots)
            .bind(n.capacity.memory)
            .bind(n.capacity.cpus)
            .bind(&n.cert_fingerprint)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// What a node said of itself at a heartbeat: its version, labels,
    /// capacity and live usage.
    pub async fn node_reported(
        &self,
        node_id: &str,
        version: &str,
        labels: &std::collections::BTreeMap<String, String>,
        capacity: Capacity,
        usage: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let sql = "UPDATE nodes SET version = $2, labels = $3, capacity_slots = $4, capacity_memory = $5, capacity_cpus = $6, usage = $7 WHERE id = $1";
        let labels = serde_json::to_string(labels).expect("labels serialize");
        with_pool!(self, |pool| sqlx::query(sql)
            .bind(node_id)
            .bind(version)
            .bind(&labels)
            .bind(capacity.slots)
            .bind(capacity.memory)
            .bind(capacity.cpus)
            .bind(usage.to_string())
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Every node, by id.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        let sql = "SELECT * FROM nodes ORDER BY id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).fetch_all(pool).await)?)
    }

    /// Takes or renews the watch of `node_id`'s journal for `owner`, for
    /// `lease` (the database's clock); `None` while another control plane
    /// holds it. Returns where recording stands.
    pub async fn claim_node_watch(&self, node_id: &str, owner: &str, lease: Duration) -> Result<Option<JournalCursor>, StoreError> {
        let sql = self.sql(
            "UPDATE nodes SET watcher = $2, watcher_until = NOW_MS + $3 \
             WHERE id = $1 AND (watcher IS NULL OR watcher = $2 OR watcher_until < NOW_MS) \
             RETURNING journal_id, journal_seq",
        );
        let lease = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 4);
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(node_id).bind(owner).bind(lease).fetch_optional(pool).await)?)
    }

    /// Gives the watch of `node_id` up, if `owner` holds it.
    pub async fn release_node_watch(&self, node_id: &str, owner: &str) -> Result<(), StoreError> {
        let sql = "UPDATE nodes SET watcher = NULL, watcher_until = NULL WHERE id = $1 AND watcher = $2";
        with_pool!(self, |pool| sqlx::query(sql).bind(node_id).bind(owner).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Moves `node_id`'s journal cursor, if `owner` still holds its watch;
    /// returns whether it did (a watcher that lost its lease stops).
    pub async fn advance_journal(&self, node_id: &str, owner: &str, cursor: &JournalCursor) -> Result<bool, StoreError> {
        let sql = "UPDATE nodes SET journal_id = $3, journal_seq = $4 WHERE id = $1 AND watcher = $2";
        let n = with_pool!(self, |pool| sqlx::query(sql)
            .bind(node_id)
            .bind(owner)
            .bind(&cursor.journal_id)
            .bind(cursor.journal_seq)
            .execute(pool)
            .await
            .map(|d| d.rows_affected()))?;
        Ok(n == 1)
    }

    /// Whether any session of the container has a turn queued or running.
    pub async fn container_has_active_runs(&self, container_id: &str) -> Result<bool, StoreError> {
        let sql = "SELECT COUNT(*) FROM runs r JOIN sessions s ON r.session_id = s.id \
                   WHERE s.container_id = $1 AND r.state IN ('queued', 'dispatching', 'streaming')";
        let n: i64 = with_pool!(self, |pool| sqlx::query_scalar(sql).bind(container_id).fetch_one(pool).await)?;
        Ok(n > 0)
    }

    /// Moves a node's administrative state from one of `from` to `to`
    /// (cordon, uncordon, drain), with the drain's deadline. Returns the
    /// state it was in; an illegal move names it.
    pub async fn set_node_admin(&self, node_id: &str, from: &[&str], to: &str, drain_deadline: Option<i64>) -> Result<String, NodeAdminError> {
        let node = self.get_node(node_id).await?.ok_or_else(|| NodeAdminError::NotFound(node_id.to_string()))?;
        if !from.contains(&node.admin.as_str()) {
            return Err(NodeAdminError::Illegal { node_id: node_id.to_string(), current: node.admin, to: to.to_string() });
        }
        let sql = self.sql("UPDATE nodes SET admin = $2, drain_deadline = $3, updated_at = NOW_MS WHERE id = $1 AND admin = $4");
        let n = with_pool!(self, |pool| sqlx::query(sql)
            .bind(node_id)
            .bind(to)
            .bind(drain_deadline)
            .bind(&node.admin)
            .execute(pool)
            .await
            .map(|d| d.rows_affected()))
        .map_err(StoreError::from)?;
        if n == 0 {
            let now = self.get_node(node_id).await?.map(|n| n.admin).unwrap_or_default();
            return Err(NodeAdminError::Illegal { node_id: node_id.to_string(), current: now, to: to.to_string() });
        }
        Ok(node.admin)
    }

    /// A draining node with nothing left on it.
    pub async fn node_drained(&self, node_id: &str) -> Result<(), StoreError> {
        let sql = self.sql("UPDATE nodes SET admin = 'drained', updated_at = NOW_MS WHERE id = $1 AND admin = 'draining'");
        with_pool!(self, |pool| sqlx::query(sql).bind(node_id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Removes a node that is lost or drained and holds no live container.
    pub async fn remove_node(&self, node_id: &str) -> Result<(), NodeAdminError> {
        let node = self.get_node(node_id).await?.ok_or_else(|| NodeAdminError::NotFound(node_id.to_string()))?;
        if node.state != node_state::LOST && node.admin != node_admin::DRAINED {
            // The state clients see (`GET /v1/nodes`): `alive` for an
            // active node, else what the operator made of it.
            let current = if node.admin == node_admin::ACTIVE { node.state } else { node.admin };
            return Err(NodeAdminError::Illegal { node_id: node_id.to_string(), current, to: "removed".into() });
        }
        let sql = "DELETE FROM nodes WHERE id = $1 AND (state = 'lost' OR admin = 'drained') \
                   AND NOT EXISTS (SELECT 1 FROM containers WHERE node_id = $1 AND state IN ('provisioning', 'ready', 'hibernated', 'stopping'))";
        let n = with_pool!(self, |pool| sqlx::query(sql).bind(node_id).execute(pool).await.map(|d| d.rows_affected())).map_err(StoreError::from)?;
        if n == 0 {
            return Err(NodeAdminError::Busy(node_id.to_string()));
        }
        Ok(())
    }

    /// Records that `node_id` answered now; returns the state it had before
    /// (`None` for a node never seen).
    pub async fn node_heartbeat(&self, node_id: &str) -> Result<Option<String>, StoreError> {
        let before = self.get_node(node_id).await?.map(|n| n.state);
        let sql = self.sql(
            "INSERT INTO nodes (id, state, last_heartbeat_at, updated_at) VALUES ($1, 'alive', NOW_MS, NOW_MS) \
             ON CONFLICT (id) DO UPDATE SET state = 'alive', last_heartbeat_at = NOW_MS, error = NULL, \
             updated_at = CASE WHEN nodes.state = 'alive' THEN nodes.updated_at ELSE NOW_MS END",
        );
        with_pool!(self, |pool| sqlx::query(sql).bind(node_id).execute(pool).await.map(|done| done.rows_affected()))?;
        Ok(before)
    }

    pub async fn get_node(&self, node_id: &str) -> Result<Option<NodeRow>, StoreError> {
        let sql = "SELECT * FROM nodes WHERE id = $1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(node_id).fetch_optional(pool).await)?)
    }

    /// Marks `node_id` lost if it is alive and has been silent for longer
    /// than `timeout`; returns whether this call did (so exactly one of
    /// several racing control planes fails what ran there).
    pub async fn mark_node_lost_if_silent(&self, node_id: &str, timeout: Duration) -> Result<bool, StoreError> {
        let sql = self.sql(
            "UPDATE nodes SET state = 'lost', updated_at = NOW_MS, \
             error = 'no heartbeat for ' || CAST((NOW_MS - last_heartbeat_at) AS TEXT) || ' ms' \
             WHERE id = $1 AND state = 'alive' AND last_heartbeat_at < NOW_MS - $2",
        );
        let timeout = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 4);
        let n = with_pool!(self, |pool| sqlx::query(sql).bind(node_id).bind(timeout).execute(pool).await.map(|d| d.rows_affected()))?;
        Ok(n == 1)
    }

    /// Fails everything still live on `node_id` with `reason` and `code`:
    /// its running runs, its creating and ready sessions, its provisioning,
    /// ready and hibernated containers. Each row goes through its state
    /// machine.
    pub async fn fail_everything_on_node(&self, node_id: &str, reason: &str, code: &str) -> Result<Casualties, StoreError> {
        let mut dead = Casualties::default();
        let live = [container::PROVISIONING, container::READY, container::HIBERNATED];
        for state in live {
            for c in self.containers_of_node_in_state(node_id, state).await? {
                let lost = self.fail_container_work(&c.id, reason, code).await?;
                dead.containers += lost.containers;
                dead.sessions += lost.sessions;
                dead.runs += lost.runs;
            }
        }
        Ok(dead)
    }

    /// Fails one container with `reason` and `code`, its live sessions and
    /// running runs with it. Repeating it is harmless; a container already
    /// deleted or failed only has its leftovers failed.
    pub async fn fail_container_work(&self, container_id: &str, reason: &str, code: &str) -> Result<Casualties, StoreError> {
        let mut dead = Casualties::default();
        for s in self.sessions_of_container(container_id).await? {
            for r in self.running_runs_of_session(&s.id).await? {
                match self.run_failed_with(&r.id, reason, Some(code)).await {
                    Ok(()) => dead.runs += 1,
                    Err(StoreError::Illegal(_)) => {} // it ended meanwhile
                    Err(e) => return Err(e),
                }
            }
            if s.state == session::CREATING || s.state == session::READY {
                match self.session_failed_with(&s.id, reason, code).await {
                    Ok(()) => dead.sessions += 1,
                    Err(StoreError::Illegal(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        self.agents_of_container_failed(container_id, reason).await?;
        match self.container_failed_with(container_id, reason, code).await {
            Ok(()) => dead.containers += 1,
            Err(StoreError::Illegal(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(dead)
    }

    /// A node's containers in `state` that have been idle since before
    /// `idle_since` (ms since the epoch, this process's clock as the rows'):
    /// no running run, and no run started or ended since then.
    pub async fn idle_containers(&self, node_id: &str, state: &str, idle_since: i64) -> Result<Vec<super::ContainerRow>, StoreError> {
        let sql = "SELECT c.* FROM containers c WHERE c.node_id = $1 AND c.state = $2 AND c.updated_at < $3 \
                   AND NOT EXISTS (SELECT 1 FROM runs r JOIN sessions s ON r.session_id = s.id \
                       WHERE s.container_id = c.id AND (r.state IN ('queued', 'dispatching', 'streaming') OR r.created_at >= $3 OR r.completed_at >= $3)) \
                   ORDER BY c.updated_at, c.id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(node_id).bind(state).bind(idle_since).fetch_all(pool).await)?)
    }

    /// A node's containers in `state`, oldest first.
    pub async fn containers_of_node_in_state(&self, node_id: &str, state: &str) -> Result<Vec<super::ContainerRow>, StoreError> {
        let sql = "SELECT * FROM containers WHERE node_id = $1 AND state = $2 ORDER BY created_at, id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(node_id).bind(state).fetch_all(pool).await)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewSession;
    use crate::store::conformance::{postgres, sqlite};

    backend_suite!(heartbeats_and_lost_nodes);

    async fn heartbeats_and_lost_nodes(store: &Store) {
        assert_eq!(store.node_heartbeat("n1").await.unwrap(), None);
        assert_eq!(store.node_heartbeat("n1").await.unwrap().as_deref(), Some(node_state::ALIVE));
        assert!(!store.mark_node_lost_if_silent("n1", Duration::from_secs(60)).await.unwrap(), "heard from just now");

        store.insert_container("ctr_1", "n1", "{}").await.unwrap();
        store.container_ready("ctr_1", 42).await.unwrap();
        let session = |id, c| NewSession { id, container_id: c, agent_id: "a", agent_version: "1", agent_instance_id: "agi", working_dir: "/" };
        store.insert_session(session("ses_1", "ctr_1")).await.unwrap();
        store.session_ready("ses_1", "acp").await.unwrap();
        store.insert_run("run_1", "ses_1").await.unwrap();
        // Another node's container is not touched.
        store.insert_container("ctr_2", "n2", "{}").await.unwrap();

        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(store.mark_node_lost_if_silent("n1", Duration::from_millis(10)).await.unwrap());
        assert!(!store.mark_node_lost_if_silent("n1", Duration::from_millis(10)).await.unwrap(), "only once");
        let n = store.get_node("n1").await.unwrap().unwrap();
        assert_eq!(n.state, node_state::LOST);
        assert!(n.error.as_deref().unwrap().starts_with("no heartbeat for "), "{n:?}");

        let dead = store.fail_everything_on_node("n1", "node n1 lost", "node_lost").await.unwrap();
        assert_eq!(dead, Casualties { containers: 1, sessions: 1, runs: 1 });
        assert_eq!(store.get_run("run_1").await.unwrap().error.as_deref(), Some("node n1 lost"));
        assert_eq!(store.get_session("ses_1").await.unwrap().state, session::FAILED);
        assert_eq!(store.get_container("ctr_1").await.unwrap().state, container::FAILED);
        assert_eq!(store.get_container("ctr_2").await.unwrap().state, container::PROVISIONING);
        assert_eq!(store.get_run("run_1").await.unwrap().error_code.as_deref(), Some("node_lost"));
        assert_eq!(store.get_container("ctr_1").await.unwrap().error_code.as_deref(), Some("node_lost"));
        assert_eq!(store.fail_everything_on_node("n1", "again", "node_lost").await.unwrap(), Casualties::default(), "repeating is harmless");

        assert_eq!(store.node_heartbeat("n1").await.unwrap().as_deref(), Some(node_state::LOST));
        assert_eq!(store.get_node("n1").await.unwrap().unwrap().state, node_state::ALIVE);
    }
}
