//! Agent instances as the control plane last observed them: recorded when
//! the agent starts (session create and open) and refreshed at each node
//! check from what its supervisor reports; every state change goes through
//! the agent instance state machine and lands in the transition history.

use serde::Serialize;
use sqlx::FromRow;

use super::states::{Entity, agent_instance};
use super::{Backend, Store, StoreError, now_ms};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct AgentInstanceRow {
    pub id: String,
    pub container_id: String,
    pub agent_id: String,
    pub agent_version: String,
    pub state: String,
    pub restarts: i64,
    pub pid: Option<i64>,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What a supervisor reported of one agent instance.
#[derive(Debug, Clone, Copy)]
pub struct AgentObservation<'a> {
    pub id: &'a str,
    pub container_id: &'a str,
    pub agent_id: &'a str,
    pub agent_version: &'a str,
    pub state: &'a str,
    pub restarts: i64,
    /// `None` once the process is gone.
    pub pid: Option<i64>,
    pub error: Option<&'a str>,
}

impl Store {
    /// Records `o`: inserts the instance the first time it is seen, else
    /// moves it to the reported state (an illegal move is an error and
    /// changes nothing) and updates its restart count and pid. Returns
    /// whether anything changed.
    pub async fn observe_agent(&self, o: &AgentObservation<'_>) -> Result<bool, StoreError> {
        if !agent_instance::ALL.contains(&o.state) {
            return Err(super::states::IllegalTransition {
                entity: Entity::AgentInstance,
                id: o.id.to_string(),
                current: "unknown".into(),
                to: o.state.to_string(),
            }
            .into());
        }
        let now = now_ms();
        let insert = "INSERT INTO agent_instances \
                      (id, container_id, agent_id, agent_version, state, restarts, pid, error, created_at, updated_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) ON CONFLICT (id) DO NOTHING";
        let inserted = with_pool!(self, |pool| sqlx::query(insert)
            .bind(o.id)
            .bind(o.container_id)
            .bind(o.agent_id)
            .bind(o.agent_version)
            .bind(o.state)
            .bind(o.restarts)
            .bind(o.pid)
            .bind(o.error)
            .bind(now)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        if inserted == 1 {
            return Ok(true);
        }
        let reason = o.error.unwrap_or("observed");
        let moved = self
            .transaction(async |tx| tx.transition(Entity::AgentInstance, o.id, o.state, o.error, reason).await)
            .await?
            .is_some();
        let counters = "UPDATE agent_instances SET restarts = $1, pid = $2, updated_at = $3 \
                        WHERE id = $4 AND (restarts <> $1 OR pid IS DISTINCT FROM $2)";
        let counted = with_pool!(self, |pool| sqlx::query(counters)
            .bind(o.restarts)
            .bind(o.pid)
            .bind(now)
            .bind(o.id)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(moved || counted > 0)
    }

    pub async fn get_agent_instance(&self, id: &str) -> Result<Option<AgentInstanceRow>, StoreError> {
        let sql = "SELECT * FROM agent_instances WHERE id = $1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?)
    }

    /// A container's agent instances, oldest first.
    pub async fn agent_instances_of_container(&self, container_id: &str) -> Result<Vec<AgentInstanceRow>, StoreError> {
        let sql = "SELECT * FROM agent_instances WHERE container_id = $1 ORDER BY created_at, id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(container_id).fetch_all(pool).await)?)
    }

    /// Records `id` stopped (its last session closed, or its container
    /// gone), unless it already ended; its pid goes.
    pub async fn agent_stopped(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        let Some(row) = self.get_agent_instance(id).await? else { return Ok(()) };
        if row.state == agent_instance::FAILED || row.state == agent_instance::STOPPED {
            return Ok(());
        }
        match self.transaction(async |tx| tx.transition(Entity::AgentInstance, id, agent_instance::STOPPED, None, reason).await).await {
            // Failed meanwhile: that stays.
            Ok(_) | Err(StoreError::Illegal(_)) => {}
            Err(e) => return Err(e),
        }
        let sql = "UPDATE agent_instances SET pid = NULL WHERE id = $1";
        with_pool!(self, |pool| sqlx::query(sql).bind(id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Records every live agent of `container_id` failed with `reason` (its
    /// node lost). Returns how many.
    pub async fn agents_of_container_failed(&self, container_id: &str, reason: &str) -> Result<usize, StoreError> {
        let mut failed = 0;
        for instance in self.agent_instances_of_container(container_id).await? {
            if instance.state == agent_instance::FAILED || instance.state == agent_instance::STOPPED {
                continue;
            }
            let moved = self.transaction(async |tx| tx.transition(Entity::AgentInstance, &instance.id, agent_instance::FAILED, Some(reason), reason).await);
            match moved.await {
                Ok(_) => failed += 1,
                Err(StoreError::Illegal(_)) => {} // ended meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(failed)
    }
}
