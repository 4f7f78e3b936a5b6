//! `agentd server`: the control plane alone, scheduling onto one node's socket.

use std::sync::Arc;

use agentd_controlplane::{AppState, plan::PlanDefaults};
use agentd_proto::node::node_client::NodeClient;
use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{init_tracing, prepare_state_dir, runtime, stop_signal};
use crate::cli::ServerArgs;
use crate::notify::Notifier;

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    init_tracing(&args.common);
    runtime()?.block_on(async {
        let notify = Arc::new(Notifier::from_env());
        // From the start: systemd counts the watchdog during start-up too.
        let watchdog = notify.start_watchdog();
        let result = server(args, &notify).await;
        if let Err(e) = &result {
            // `systemctl status` shows why, beside the exit code.
            notify.status(&format!("failed: {e:#}"));
        }
        watchdog.stop().await;
        result
    })
}

async fn server(args: ServerArgs, notify: &Arc<Notifier>) -> anyhow::Result<()> {
    prepare_state_dir(&args.common.state_dir)?;
    notify.status("opening the store");
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
    notify.status("reconciling the store with the node");
    agentd_controlplane::reconcile(&state).await.context("cannot reconcile store with node")?;
    notify.status("syncing the agent registry");
    agentd_controlplane::sync_registry_at_start(&state).await;
    let runner_stop = CancellationToken::new();
    let runner = agentd_controlplane::start_workflows(&state, super::runner_config(&args.common.state_dir), super::fleet_config(&args.api), runner_stop.clone())
        .await
        .context("cannot start the workflow runner")?;
    let listener = agentd_controlplane::bind(args.api.listen).await?;
    let bound = listener.local_addr().context("cannot read the API's address")?;
    notify.ready(&format!("listening on {bound}"));
    let served = agentd_controlplane::serve_on(state.clone(), listener, stop_signal(notify)).await;
    state.audit.close().await;
    notify.status("stopping: finishing workflow steps");
    runner_stop.cancel();
    if let Err(e) = runner.await {
        tracing::error!(error = %e, "workflow runner panicked");
    }
    store.close().await;
    served?;
    Ok(())
}
