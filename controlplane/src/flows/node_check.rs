//! `node.check`: the periodic workflow that keeps the store true to its
//! nodes. Each control plane enqueues one check per node per interval under
//! a key naming the interval's slot, so however many control planes share
//! the database, one check runs per slot. A check probes the node
//! (`ListSandboxes`, bounded by a timeout):
//! - answered: the heartbeat is recorded, sandboxes the node runs but
//!   the store does not know (or records failed or deleted) are reaped, and
//!   the store's agent instances are refreshed from their supervisors;
//! - silent: once the last heartbeat is older than the timeout the node is
//!   marked lost, and its running runs, live sessions and containers fail
//!   with that reason (by whichever control plane marked it).
//!
//! The heartbeat is the control plane's probe, as the node has no address
//! of a control plane to report to yet (one node per control plane).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use agentd_proto::node::{DeleteSandboxRequest, ListSandboxesRequest, Sandbox};

use super::{CONTAINER, CONTAINER_HIBERNATE, NODE, NODE_CHECK, store_error};
use crate::AppState;
use crate::store::nodes::node_state;
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

/// Enqueues a check of `app`'s node every interval until `shutdown`.
pub async fn schedule(app: AppState, config: FleetConfig, shutdown: CancellationToken) {
    let payload = serde_json::to_value(Payload { node_id: app.node_id.clone() }).expect("payload serializes");
    let periodic = super::Periodic {
        kind: NODE_CHECK,
        entity_kind: NODE,
        entity_id: app.node_id.clone(),
        payload,
        interval: config.check_interval,
        first_after: Duration::ZERO,
    };
    super::schedule_periodic(app, periodic, shutdown).await;
}

pub async fn run(app: AppState, config: FleetConfig, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    let node_id = payload.node_id.as_str();
    let probe = tokio::time::timeout(config.probe_timeout, app.node.clone().list_sandboxes(ListSandboxesRequest {})).await;
    let sandboxes = match probe {
        Ok(Ok(list)) => list.into_inner().sandboxes,
        silent => {
            let why = match silent {
                Ok(Err(status)) => status.message().to_string(),
                _ => format!("no answer within {:?}", config.probe_timeout),
            };
            tracing::debug!(node_id, why, "node did not answer its check");
            if app.store.mark_node_lost_if_silent(node_id, config.heartbeat_timeout).await.map_err(store_error)? {
                let reason = format!("node {node_id} lost: no heartbeat for more than {:?} ({why})", config.heartbeat_timeout);
                let dead = app.store.fail_everything_on_node(node_id, &reason).await.map_err(store_error)?;
                tracing::warn!(node_id, containers = dead.containers, sessions = dead.sessions, runs = dead.runs, "{reason}");
            }
            return Ok(json!({"alive": false, "why": why}));
        }
    };
    if app.store.node_heartbeat(node_id).await.map_err(store_error)?.as_deref() == Some(node_state::LOST) {
        tracing::warn!(node_id, "lost node answers again; what failed with it stays failed, its leftovers are reaped");
    }
    let mut reaped = Vec::new();
    for sandbox in &sandboxes {
        if let Some(reason) = orphan(&app, sandbox, config.orphan_grace).await.map_err(store_error)? {
            reap(&app, &sandbox.container_id, &reason).await?;
            reaped.push(sandbox.container_id.clone());
        }
    }
    let (hibernating, expired) = idle(&app, node_id, &config).await.map_err(store_error)?;
    let agents_changed = super::agents::refresh(&app, node_id, config.probe_timeout).await.map_err(store_error)?;
    Ok(json!({"alive": true, "sandboxes": sandboxes.len(), "reaped": reaped, "hibernating": hibernating, "expired": expired,
        "agents_changed": agents_changed}))
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
async fn reap(app: &AppState, container_id: &str, reason: &str) -> Result<(), StepError> {
    tracing::warn!(container_id, reason, "reaping a sandbox the store does not account for");
    let request = DeleteSandboxRequest { container_id: container_id.to_string(), fence: None };
    if let Err(e) = super::within(super::deadline(app), app.node.clone().delete_sandbox(request)).await {
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
