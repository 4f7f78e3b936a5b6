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

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct NodeRow {
    pub id: String,
    pub state: String,
    pub last_heartbeat_at: i64,
    pub error: Option<String>,
    pub updated_at: i64,
}

/// What a lost node took with it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Casualties {
    pub containers: u64,
    pub sessions: u64,
    pub runs: u64,
}

impl Store {
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

    /// Fails everything still live on `node_id` with `reason`: its running
    /// runs, its creating and ready sessions, its provisioning, ready and
    /// hibernated containers. Each row goes through its state machine.
    pub async fn fail_everything_on_node(&self, node_id: &str, reason: &str) -> Result<Casualties, StoreError> {
        let mut dead = Casualties::default();
        let live = [container::PROVISIONING, container::READY, container::HIBERNATED];
        for state in live {
            for c in self.containers_of_node_in_state(node_id, state).await? {
                for s in self.sessions_of_container(&c.id).await? {
                    for r in self.running_runs_of_session(&s.id).await? {
                        match self.run_failed(&r.id, reason).await {
                            Ok(()) => dead.runs += 1,
                            Err(StoreError::Illegal(_)) => {} // it ended meanwhile
                            Err(e) => return Err(e),
                        }
                    }
                    if s.state == session::CREATING || s.state == session::READY {
                        match self.session_failed(&s.id, reason).await {
                            Ok(()) => dead.sessions += 1,
                            Err(StoreError::Illegal(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                self.agents_of_container_failed(&c.id, reason).await?;
                match self.container_failed(&c.id, reason).await {
                    Ok(()) => dead.containers += 1,
                    Err(StoreError::Illegal(_)) => {}
                    Err(e) => return Err(e),
                }
            }
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

        let dead = store.fail_everything_on_node("n1", "node n1 lost").await.unwrap();
        assert_eq!(dead, Casualties { containers: 1, sessions: 1, runs: 1 });
        assert_eq!(store.get_run("run_1").await.unwrap().error.as_deref(), Some("node n1 lost"));
        assert_eq!(store.get_session("ses_1").await.unwrap().state, session::FAILED);
        assert_eq!(store.get_container("ctr_1").await.unwrap().state, container::FAILED);
        assert_eq!(store.get_container("ctr_2").await.unwrap().state, container::PROVISIONING);
        assert_eq!(store.fail_everything_on_node("n1", "again").await.unwrap(), Casualties::default(), "repeating is harmless");

        assert_eq!(store.node_heartbeat("n1").await.unwrap().as_deref(), Some(node_state::LOST));
        assert_eq!(store.get_node("n1").await.unwrap().unwrap().state, node_state::ALIVE);
    }
}
