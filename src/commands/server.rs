//! `agentd server`: the control plane alone, scheduling onto one node's socket.

use agentd_controlplane::{AppState, plan::PlanDefaults};
use agentd_proto::node::node_client::NodeClient;
use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{init_tracing, prepare_state_dir, runtime, shutdown_signal};
use crate::cli::ServerArgs;

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    init_tracing(&args.common);
    runtime()?.block_on(async {
        prepare_state_dir(&args.common.state_dir)?;
        let store = super::open_store(&args.api, &args.common.state_dir).await?;
        let state = AppState {
            store: store.clone(),
            node: NodeClient::new(agentd_proto::unix::lazy_channel(&args.node_socket)),
            node_id: "local".into(),
            defaults: PlanDefaults { initialize_timeout_ms: args.api.initialize_timeout_ms },
            node_call_timeout: std::time::Duration::from_millis(args.api.node_call_timeout_ms.max(1)),
            registry_source: args.api.registry.clone(),
            http: agentd_controlplane::agent_registry::http_client(),
            shutdown: CancellationToken::new(),
            audit: agentd_controlplane::api::audit::AuditLog::start(store.clone()),
            steps: agentd_controlplane::workflow::InlineConfig::of(&super::runner_config(&args.common.state_dir)),
        };
        agentd_controlplane::reconcile(&state).await.context("cannot reconcile store with node")?;
        agentd_controlplane::sync_registry_at_start(&state).await;
        let runner_stop = CancellationToken::new();
        let runner = agentd_controlplane::start_workflows(&state, super::runner_config(&args.common.state_dir), super::fleet_config(&args.api), runner_stop.clone())
            .await
            .context("cannot start the workflow runner")?;
        let served = agentd_controlplane::serve(state.clone(), args.api.listen, shutdown_signal()).await;
        state.audit.close().await;
        runner_stop.cancel();
        if let Err(e) = runner.await {
            tracing::error!(error = %e, "workflow runner panicked");
        }
        store.close().await;
        served?;
        Ok(())
    })
}
