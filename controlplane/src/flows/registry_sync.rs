//! `registry.sync`: the periodic workflow that keeps the stored agent
//! registry current with its source (the file or URL configured with
//! `--registry`). Scheduled like node checks, one per interval's slot
//! however many control planes share the database; a sync that fails (the
//! source unreachable or invalid) keeps the registry stored before, fails
//! its step with the reason, and the next slot tries again.

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{Periodic, REGISTRY, REGISTRY_SYNC};
use crate::AppState;
use crate::agent_registry::{self, RegistryError};
use crate::workflow::{StepContext, StepError, StepResult};

#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    pub source: String,
}

/// Enqueues a sync of `app`'s registry every `interval` (the first one
/// interval after start, which syncs on its own) until `shutdown`. Nothing
/// when no registry is configured.
pub async fn schedule(app: AppState, interval: std::time::Duration, shutdown: CancellationToken) {
    let Some(source) = app.registry_source.clone() else { return };
    let payload = serde_json::to_value(Payload { source }).expect("payload serializes");
    let periodic = Periodic { kind: REGISTRY_SYNC, entity_kind: REGISTRY, entity_id: REGISTRY.into(), payload, interval, first_after: interval };
    super::schedule_periodic(app, periodic, shutdown).await;
}

pub async fn run(app: AppState, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    match agent_registry::sync(&app.store, &app.http, &payload.source).await {
        Ok(report) => Ok(json!({"source": report.source, "agents": report.agents})),
        Err(e @ RegistryError::Store(_)) => Err(StepError::retryable(e.to_string())),
        Err(e) => {
            tracing::warn!(error = %e, "periodic registry sync failed; keeping the registry stored before");
            Err(StepError::permanent(e.to_string()))
        }
    }
}
