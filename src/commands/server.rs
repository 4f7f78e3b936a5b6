//! `agentd server`: the control plane alone. It schedules onto the fleet's
//! joined nodes (over mutual TLS), and onto a node on this host's unix
//! socket if `--node-socket` names one.

use anyhow::Context;

use super::{control_plane_settings, init_tracing, prepare_state_dir, runtime, shutdown_signal};
use crate::cli::ServerArgs;

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    init_tracing(&args.common);
    runtime()?.block_on(async {
        prepare_state_dir(&args.common.state_dir)?;
        let store = super::open_store(&args.api, &args.common.state_dir).await?;
        if let Some(socket) = &args.node_socket {
            let node_id = agentd_controlplane::fleet::nodes::register_unix_node(&store, socket).await.map_err(anyhow::Error::msg)?;
            tracing::info!(node_id, socket = %socket.display(), "node on this host registered");
        }
        let cp = agentd_controlplane::process::ControlPlane::start(control_plane_settings(&args.api, &args.common.state_dir, store.clone()))
            .await
            .context("cannot start the control plane")?;
        let served = cp.serve(args.api.listen, shutdown_signal()).await;
        cp.stop().await;
        store.close().await;
        served?;
        Ok(())
    })
}
