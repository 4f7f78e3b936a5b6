//! `agentd up`: one node and the control plane in one process. They still talk
//! gRPC over a unix socket, so the same code paths serve one machine and a
//! fleet (nodes on other machines may join it too).

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{control_plane_settings, init_tracing, node_config, node_socket, prepare_state_dir, stop_signal};
use crate::cli::UpArgs;
use crate::notify::Notifier;

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    init_tracing(&args.common);
    super::run_daemon(|notify| async move { up(args, &notify).await })
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
    super::check_auth_setting(&args.api)?;
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
        async move { agentd_node::serve_on(node, node_listener, &socket, None, stop.cancelled_owned()).await }
    });

    // However the control plane ends (a store that cannot be opened, a port
    // in use), the node is stopped: its zygote and cgroups go with it.
    let result = control_plane(&args, &socket, notify).await;
    node_stop.cancel();
    match node_task.await {
        Ok(Err(e)) => tracing::error!(error = %e, "node server failed"),
        Err(e) => tracing::error!(error = %e, "node task panicked"),
        Ok(Ok(())) => {}
    }
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// The control plane of `agentd up`, from opening the store until it stopped
/// and, without live restore, stopped its sandboxes.
async fn control_plane(args: &UpArgs, socket: &std::path::Path, notify: &Arc<Notifier>) -> anyhow::Result<()> {
    let state_dir = &args.common.state_dir;
    notify.status("opening the store");
    let store = super::open_store(&args.api, state_dir).await?;
    agentd_controlplane::fleet::nodes::register_unix_node(&store, socket).await.map_err(anyhow::Error::msg)?;
    notify.status("reconciling the store with the node, syncing the agent registry");
    let cp = agentd_controlplane::process::ControlPlane::start(control_plane_settings(&args.api, state_dir, store.clone()))
        .await
        .context("cannot start the control plane")?;

    let listener = agentd_controlplane::bind(args.api.listen).await?;
    let bound = listener.local_addr().context("cannot read the API's address")?;
    let metrics = match args.api.metrics_listen {
        Some(addr) => Some(cp.serve_metrics_on(super::bind_metrics(addr).await?)),
        None => None,
    };
    notify.ready(&format!("listening on {bound} (node socket {})", socket.display()));
    let served = cp.serve_on(listener, stop_signal(notify)).await;
    if let Some(task) = metrics {
        let _ = task.await;
    }
    let state = cp.state.clone();
    // Steps still running get the drain bound, then the rest is stopped directly.
    notify.status("stopping: finishing workflow steps");
    cp.stop().await;
    if args.node.live_restore {
        // The sandboxes run on; the next start takes them back, and the
        // store keeps calling them ready.
        tracing::info!("stopping with live restore: sandboxes, agents and turns run on");
    } else {
        notify.status("stopping: stopping sandboxes");
        agentd_controlplane::stop_all_containers(&state).await;
    }
    store.close().await;
    served?;
    Ok(())
}
