//! `agentd server`: the control plane alone. It schedules onto the fleet's
//! joined nodes (over mutual TLS), and onto a node on this host's unix
//! socket if `--node-socket` names one.

use std::sync::Arc;

use anyhow::Context;

use super::{control_plane_settings, init_tracing, prepare_state_dir, stop_signal};
use crate::cli::ServerArgs;
use crate::notify::Notifier;

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    init_tracing(&args.common);
    super::run_daemon(|notify| async move { server(args, &notify).await })
}

async fn server(args: ServerArgs, notify: &Arc<Notifier>) -> anyhow::Result<()> {
    prepare_state_dir(&args.common.state_dir)?;
    super::check_auth_setting(&args.api)?;
    notify.status("opening the store");
    let store = super::open_store(&args.api, &args.common.state_dir).await?;
    if let Some(socket) = &args.node_socket {
        notify.status("registering the node on this host");
        let node_id = agentd_controlplane::fleet::nodes::register_unix_node(&store, socket).await.map_err(anyhow::Error::msg)?;
        tracing::info!(node_id, socket = %socket.display(), "node on this host registered");
    }
    notify.status("reconciling the store with the nodes, syncing the agent registry");
    let cp = agentd_controlplane::process::ControlPlane::start(control_plane_settings(&args.api, &args.common.state_dir, store.clone()))
        .await
        .context("cannot start the control plane")?;
    let listener = agentd_controlplane::bind(args.api.listen).await?;
    let bound = listener.local_addr().context("cannot read the API's address")?;
    let metrics = match args.api.metrics_listen {
        Some(addr) => Some(cp.serve_metrics_on(super::bind_metrics(addr).await?)),
        None => None,
    };
    notify.ready(&format!("listening on {bound}"));
    let served = cp.serve_on(listener, stop_signal(notify)).await;
    if let Some(task) = metrics {
        let _ = task.await;
    }
    notify.status("stopping: finishing workflow steps");
    cp.stop().await;
    store.close().await;
    served?;
    Ok(())
}
