//! `node.check`: the periodic workflow that keeps the store true to its
//! nodes. Each control plane enqueues one check per registered node per
//! interval under a key naming the node and the interval's slot, so however
//! many control planes share the database, one check runs per node and slot.
//! A check probes the node (`GetNodeInfo`, bounded by a timeout):
//! - answered: the heartbeat is recorded with what the node reports of
//!   itself (version, labels, capacity, usage), sandboxes the node runs but
//!   the store does not know (or records failed or deleted) are reaped, the
//!   store's agent instances are refreshed from their supervisors, and a
//!   draining node's idle containers are deleted (all of them past its
//!   deadline), the node `drained` once none is left;
//! - silent: once the last heartbeat is older than the timeout the node is
//!   marked lost, and its running runs, live sessions and containers fail
//!   with that reason and code `node_lost` (by whichever control plane
//!   marked it).
//!
//! The heartbeat is the control plane's probe: control planes dial nodes,
//! never the other way round.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use agentd_proto::node::{DeleteSandboxRequest, GetNodeInfoRequest, Sandbox};

use super::{CONTAINER, CONTAINER_HIBERNATE, NODE, NODE_CHECK, store_error};
use crate::AppState;
use crate::domain::Code;
use crate::store::nodes::{Capacity, NodeRow, node_admin, node_state};
use crate::store::outbox::NewStep;
use crate::store::states::{Entity, container};
use crate::store::{StoreError, now_ms};
use crate::workflow::{StepContext, StepError, StepResult};

#[derive(Debug, Clone, Copy)]
pub struct FleetConfig {
    /// How often each node is checked.
    pub check_interval: Duration,
    /// Silence after which a node is lost.
    pub heartbeat_timeout: Duration,
    /// How long one probe may take.
    pub probe_timeout: Duration,
    /// A sandbox the store has never heard of is reaped only once it is this
    /// old (another control plane may be recording it right now).
    pub orphan_grace: Duration,
    /// A ready container with no turn for this long is hibernated.
    pub hibernate_after: Option<Duration>,
    /// A container with no turn for this long is stopped and deleted.
    pub ttl: Option<Duration>,
    /// The configured registry is synced again this often
    /// ([`super::registry_sync`]).
    pub registry_sync_interval: Option<Duration>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(30),
            probe_timeout: Duration::from_secs(2),
            orphan_grace: Duration::from_secs(60),
            hibernate_after: None,
            ttl: None,
            registry_sync_interval: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    pub node_id: String,
}

/// Enqueues a check of every registered node every interval until `shutdown`.
pub async fn schedule(app: AppState, config: FleetConfig, shutdown: CancellationToken) {
    let interval_ms = i64::try_from(config.check_interval.as_millis()).unwrap_or(i64::MAX).max(1);
    let mut tick = tokio::time::interval(config.check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let nodes = match app.store.list_nodes().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list nodes to check");
                continue;
            }
        };
        let slot = now_ms() / interval_ms;
        for node in nodes {
            let key = format!("{NODE_CHECK}:{}:{slot}", node.id);
            let payload = serde_json::to_value(Payload { node_id: node.id.clone() }).expect("payload serializes");
            let step = NewStep::new(NODE, &node.id, NODE_CHECK, &key, payload).max_attempts(1);
            if let Err(e) = app.store.enqueue(step).await {
                tracing::debug!(node_id = node.id, error = %e, "cannot schedule a node check");
            }
        }
    }
}

pub async fn run(app: AppState, config: FleetConfig, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    let node_id = payload.node_id.as_str();
    let Some(node) = app.store.get_node(node_id).await.map_err(store_error)? else {
        return Ok(json!({"alive": false, "why": "the node was removed"}));
    };
    let client = app.nodes.refresh(&node).map_err(|e| StepError::permanent(e.message().to_string()))?;
    let probe = tokio::time::timeout(config.probe_timeout, client.clone().get_node_info(GetNodeInfoRequest {})).await;
    let answer = match probe {
        Ok(Ok(info)) if info.get_ref().node_id == node_id => Ok(info.into_inner()),
        Ok(Ok(info)) => Err(format!("the node at {} says it is {:?}", node.address, info.get_ref().node_id)),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err(format!("no answer within {:?}", config.probe_timeout)),
    };
    let info = match answer {
        Ok(info) => info,
        Err(why) => {
            tracing::debug!(node_id, why, "node did not answer its check");
            // Failing what ran there is repeated at every check of a lost
            // node (it is idempotent): a control plane that died between
            // marking the node lost and failing its work leaves nothing live.
            let marked = app.store.mark_node_lost_if_silent(node_id, config.heartbeat_timeout).await.map_err(store_error)?;
            if marked || node.state == node_state::LOST {
                let reason = format!("node {node_id} lost: no heartbeat for more than {:?} ({why})", config.heartbeat_timeout);
                let dead = app.store.fail_everything_on_node(node_id, &reason, Code::NodeLost.as_str()).await.map_err(store_error)?;
                if marked || dead != Default::default() {
                    tracing::warn!(node_id, containers = dead.containers, sessions = dead.sessions, runs = dead.runs, "{reason}");
                }
            }
            return Ok(json!({"alive": false, "why": why}));
        }
    };
    if app.store.node_heartbeat(node_id).await.map_err(store_error)?.as_deref() == Some(node_state::LOST) {
        tracing::warn!(node_id, "lost node answers again; what failed with it stays failed, its leftovers are reaped");
    }
    let capacity = info.capacity.unwrap_or_default();
    let capacity = Capacity { slots: i64::from(capacity.slots), memory: i64::try_from(capacity.memory_bytes).unwrap_or(i64::MAX), cpus: capacity.cpus };
    let sandboxes = info.sandboxes;
    let memory_current: u64 = sandboxes.iter().filter_map(|s| s.usage.as_ref()?.memory_current).sum();
    let usage = json!({"sandboxes": sandboxes.len(), "memory_current": memory_current});
    let labels = info.labels.into_iter().collect();
    app.store.node_reported(node_id, &info.version, &labels, capacity, &usage).await.map_err(store_error)?;
    let mut reaped = Vec::new();
    for sandbox in &sandboxes {
        if let Some(reason) = orphan(&app, sandbox, config.orphan_grace).await.map_err(store_error)? {
            reap(&app, node_id, &sandbox.container_id, &reason).await?;
            reaped.push(sandbox.container_id.clone());
        }
    }
    let (hibernating, expired) = idle(&app, node_id, &config).await.map_err(store_error)?;
    let agents_changed = super::agents::refresh(&app, node_id, config.probe_timeout).await.map_err(store_error)?;
    let drained = drain(&app, &node).await.map_err(store_error)?;
    Ok(json!({"alive": true, "sandboxes": sandboxes.len(), "reaped": reaped, "hibernating": hibernating, "expired": expired,
        "agents_changed": agents_changed, "draining": drained}))
}

/// A draining node: deletes its containers whose sessions are idle, and all
/// of them once the deadline passed; the node is `drained` when none holds
/// it any more. Returns the containers whose delete began.
async fn drain(app: &AppState, node: &NodeRow) -> Result<Vec<String>, StoreError> {
    if node.admin != node_admin::DRAINING {
        return Ok(Vec::new());
    }
    let past_deadline = node.drain_deadline.is_some_and(|d| now_ms() >= d);
    let mut deleting = Vec::new();
    let mut left = 0;
    for state in [container::PROVISIONING, container::READY, container::HIBERNATED, container::STOPPING] {
        for c in app.store.containers_of_node_in_state(&node.id, state).await? {
            left += 1;
            if state == container::STOPPING || state == container::PROVISIONING {
                continue;
            }
            let busy = app.store.container_has_active_runs(&c.id).await?;
            if busy && !past_deadline {
                continue;
            }
            let reason = if busy { "its node's drain deadline passed" } else { "its node is draining" };
            match super::delete::begin(app, &c.id, reason).await {
                Ok(_) => deleting.push(c.id),
                Err(p) => tracing::debug!(container_id = c.id, detail = p.detail, "drain delete not started"),
            }
        }
    }
    if left == 0 {
        app.store.node_drained(&node.id).await?;
        tracing::info!(node_id = node.id, "node drained");
    }
    Ok(deleting)
}

/// Enqueues a hibernation of containers idle past `hibernate_after`, and a
/// delete of those idle past their TTL. Returns their ids.
async fn idle(app: &AppState, node_id: &str, config: &FleetConfig) -> Result<(Vec<String>, Vec<String>), StoreError> {
    let since = |d: Duration| now_ms().saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut expired = Vec::new();
    if let Some(ttl) = config.ttl {
        for state in [container::READY, container::HIBERNATED] {
            for c in app.store.idle_containers(node_id, state, since(ttl)).await? {
                let reason = format!("idle for longer than its TTL ({ttl:?})");
                match super::delete::begin(app, &c.id, &reason).await {
                    Ok(_) => {
                        tracing::info!(container_id = c.id, "{reason}: stopping it");
                        expired.push(c.id);
                    }
                    Err(p) => tracing::debug!(container_id = c.id, detail = p.detail, "TTL stop not started"),
                }
            }
        }
    }
    let mut hibernating = Vec::new();
    if let Some(after) = config.hibernate_after {
        for c in app.store.idle_containers(node_id, container::READY, since(after)).await? {
            if expired.contains(&c.id) {
                continue;
            }
            // One hibernation per stretch of idleness: a resume moves updated_at.
            let key = format!("{CONTAINER_HIBERNATE}:{}:{}", c.id, c.updated_at);
            let step = NewStep::new(CONTAINER, &c.id, CONTAINER_HIBERNATE, &key, json!({}));
            app.store
                .transaction(async |tx| {
                    tx.lock(Entity::Container, &c.id).await?;
                    tx.enqueue(step).await
                })
                .await?;
            hibernating.push(c.id);
        }
    }
    Ok((hibernating, expired))
}

/// Why the store says `sandbox` should not exist, if it does.
async fn orphan(app: &AppState, sandbox: &Sandbox, grace: Duration) -> Result<Option<String>, StoreError> {
    match app.store.get_container(&sandbox.container_id).await {
        Ok(c) if c.state == container::FAILED || c.state == container::DELETED => Ok(Some(format!("its container is {}", c.state))),
        Ok(_) => Ok(None),
        Err(StoreError::NotFound { .. }) => {
            let age = now_ms().saturating_sub(sandbox.created_at_ms);
            Ok((age > i64::try_from(grace.as_millis()).unwrap_or(i64::MAX)).then(|| "the store has no such container".to_string()))
        }
        Err(e) => Err(e),
    }
}

/// Deletes an orphan sandbox. Unfenced: deleting is idempotent on the node,
/// and this step does not order with the container's own steps.
async fn reap(app: &AppState, node_id: &str, container_id: &str, reason: &str) -> Result<(), StepError> {
    tracing::warn!(container_id, reason, "reaping a sandbox the store does not account for");
    let request = DeleteSandboxRequest { container_id: container_id.to_string(), fence: None };
    let client = app.nodes.client(node_id).await.map_err(|e| StepError::retryable(e.message().to_string()))?;
    if let Err(e) = super::within(super::deadline(app), client.clone().delete_sandbox(request)).await {
        return Err(StepError::retryable(format!("reap {container_id}: {}", e.message())));
    }
    match app.store.get_container(container_id).await {
        Ok(c) if c.state == container::FAILED => {
            crate::teardown::record_gone(app, container_id, reason).await.map_err(store_error)?;
        }
        _ => {}
    }
    Ok(())
}
