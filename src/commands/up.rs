//! `agentd up`: one node and the control plane in one process. They still talk
//! gRPC over a unix socket, so the same code paths serve one machine and a
//! fleet.

use std::sync::Arc;

use agentd_controlplane::{AppState, plan::PlanDefaults};
use agentd_proto::node::node_client::NodeClient;
use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{init_tracing, node_config, node_socket, prepare_state_dir, runtime, stop_signal};
use crate::cli::UpArgs;
use crate::notify::Notifier;

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    init_tracing(&args.common);
    runtime()?.block_on(async {
        let notify = Arc::new(Notifier::from_env());
        // From the start: systemd counts the watchdog during start-up too.
        let watchdog = notify.start_watchdog();
        let result = up(args, &notify).await;
        if let Err(e) = &result {
            // `systemctl status` shows why, beside the exit code.
            notify.status(&format!("failed: {e:#}"));
        }
        watchdog.stop().await;
        result
    })
}

async fn up(args: UpArgs, notify: &Arc<Notifier>) -> anyhow::Result<()> {
    // A delete waits for the agents' grace (and up to 2 s more) before it
    // answers: a deadline shorter than that would fail every delete and
    // retry it while the first still stops the sandbox.
    anyhow::ensure!(
        u64::from(args.node.stop_grace_ms) + 5_000 <= args.api.node_call_timeout_ms,
        "--stop-grace-ms {} needs --node-call-timeout-ms of at least {} (the grace and 5 s)",
        args.node.stop_grace_ms,
        u64::from(args.node.stop_grace_ms) + 5_000
    );
    let state_dir = &args.common.state_dir;
    prepare_state_dir(state_dir).with_context(|| format!("cannot create state dir {}", state_dir.display()))?;
    let socket = node_socket(state_dir);

    notify.status("starting the node");
    let node = agentd_node::Node::start(node_config(&args.common, &args.node)?).await.context("cannot start node")?;
    // Bound here, before the control plane dials it.
    let node_listener = agentd_node::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    let node_stop = CancellationToken::new();
    let node_task = tokio::spawn({
        let node = Arc::clone(&node);
        let socket = socket.clone();
        let stop = node_stop.clone();
        async move { agentd_node::serve_on(node, node_listener, &socket, stop.cancelled_owned()).await }
    });

    notify.status("opening the store");
    let store = super::open_store(&args.api, state_dir).await?;
    let state = AppState {
        store: store.clone(),
        node: NodeClient::new(agentd_proto::unix::lazy_channel(&socket)),
        node_id: "local".into(),
        defaults: PlanDefaults { initialize_timeout_ms: args.api.initialize_timeout_ms },
        node_call_timeout: std::time::Duration::from_millis(args.api.node_call_timeout_ms.max(1)),
        registry_source: args.api.registry.clone(),
        http: agentd_controlplane::agent_registry::http_client(),
        shutdown: CancellationToken::new(),
        audit: agentd_controlplane::api::audit::AuditLog::start(store.clone()),
        steps: agentd_controlplane::workflow::InlineConfig::of(&super::runner_config(state_dir)),
    };
    notify.status("reconciling the store with the node");
    agentd_controlplane::reconcile(&state).await.context("cannot reconcile store with node")?;
    notify.status("syncing the agent registry");
    agentd_controlplane::sync_registry_at_start(&state).await;
    let runner_stop = CancellationToken::new();
    let runner = agentd_controlplane::start_workflows(&state, super::runner_config(state_dir), super::fleet_config(&args.api), runner_stop.clone())
        .await
        .context("cannot start the workflow runner")?;

    let listener = agentd_controlplane::bind(args.api.listen).await?;
    let bound = listener.local_addr().context("cannot read the API's address")?;
    notify.ready(&format!("listening on {bound} (node socket {})", socket.display()));
    let served = agentd_controlplane::serve_on(state.clone(), listener, stop_signal(notify)).await;
    state.audit.close().await;
    // Steps still running get the drain bound, then the rest is stopped directly.
    notify.status("stopping: finishing workflow steps");
    runner_stop.cancel();
    if let Err(e) = runner.await {
        tracing::error!(error = %e, "workflow runner panicked");
    }
    notify.status("stopping: stopping sandboxes");
    agentd_controlplane::stop_all_containers(&state).await;
    node_stop.cancel();
    match node_task.await {
        Ok(Err(e)) => tracing::error!(error = %e, "node server failed"),
        Err(e) => tracing::error!(error = %e, "node task panicked"),
        Ok(Ok(())) => {}
    }
    store.close().await;
    served?;
    tracing::info!("stopped");
    Ok(())
}
