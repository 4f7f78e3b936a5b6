//! Keeping the store's agent instances ([`crate::store::agents`]) true to
//! what their supervisors report: when a session's agent starts, at each
//! node check, and when its container goes.

use std::collections::HashMap;
use std::time::Duration;

use agentd_proto::convert::agent_state_name;
use agentd_proto::node::{AgentInstance, GetSessionRequest};

use crate::AppState;
use crate::store::agents::AgentObservation;
use crate::store::states::{agent_instance, container, session};
use crate::store::{SessionRow, StoreError};

/// Records the agent a session was just opened on, as `StartAgent` answered.
pub async fn observe_started(app: &AppState, s: &SessionRow, instance_id: &str, started: &AgentInstance) -> Result<(), StoreError> {
    let o = AgentObservation {
        id: instance_id,
        container_id: &s.container_id,
        agent_id: &s.agent_id,
        agent_version: &s.agent_version,
        state: agent_state_name(started.state()),
        restarts: 0,
        pid: (started.pid > 0).then_some(i64::from(started.pid)),
        error: None,
    };
    match app.store.observe_agent(&o).await {
        // A reused agent seen running a turn, say: the next check settles it.
        Ok(_) | Err(StoreError::Illegal(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Asks the node about the agent of every open session on `node_id`'s ready
/// containers (one call per agent, each bounded by `timeout`) and records
/// what changed; an agent left with no open session is stopped. Returns how
/// many instances changed.
pub async fn refresh(app: &AppState, node_id: &str, timeout: Duration) -> Result<usize, StoreError> {
    let mut changed = 0;
    let Ok(node) = app.nodes.client(node_id).await else { return Ok(0) };
    for c in app.store.containers_in_state(container::READY).await? {
        if c.node_id != node_id {
            continue;
        }
        let sessions = app.store.sessions_of_container(&c.id).await?;
        let mut open: HashMap<&str, &SessionRow> = HashMap::new();
        for s in sessions.iter().filter(|s| s.state == session::READY) {
            open.entry(s.agent_instance_id.as_str()).or_insert(s);
        }
        for (instance_id, s) in &open {
            let request = GetSessionRequest { session_id: s.id.clone(), with_agent: true };
            let Ok(Ok(answer)) = tokio::time::timeout(timeout, node.clone().get_session(request)).await else { continue };
            let Some(agent) = answer.into_inner().agent else { continue };
            let o = AgentObservation {
                id: instance_id,
                container_id: &c.id,
                agent_id: &s.agent_id,
                agent_version: &s.agent_version,
                state: agent_state_name(agent.state()),
                restarts: i64::from(agent.restarts),
                pid: (agent.pid > 0).then_some(i64::from(agent.pid)),
                error: (!agent.last_error.is_empty()).then_some(agent.last_error.as_str()),
            };
            match app.store.observe_agent(&o).await {
                Ok(true) => changed += 1,
                Ok(false) => {}
                Err(StoreError::Illegal(e)) => tracing::warn!(error = %e, "agent reported in a state it cannot reach"),
                Err(e) => return Err(e),
            }
        }
        for instance in app.store.agent_instances_of_container(&c.id).await? {
            let ended = instance.state == agent_instance::FAILED || instance.state == agent_instance::STOPPED;
            if !ended && !open.contains_key(instance.id.as_str()) {
                app.store.agent_stopped(&instance.id, "no open session left").await?;
            }
        }
    }
    Ok(changed)
}

/// Records every agent of a container that is gone as stopped.
pub async fn container_gone(app: &AppState, container_id: &str, reason: &str) -> Result<(), StoreError> {
    for instance in app.store.agent_instances_of_container(container_id).await? {
        app.store.agent_stopped(&instance.id, reason).await?;
    }
    Ok(())
}
