//! `agentd node`: the node daemon alone.

use anyhow::Context;

use super::{init_tracing, node_config, node_socket, prepare_state_dir, runtime, shutdown_signal};
use crate::cli::NodeArgs;

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    init_tracing(&args.common);
    runtime()?.block_on(async {
        prepare_state_dir(&args.common.state_dir)?;
        let socket = args.socket.clone().unwrap_or_else(|| node_socket(&args.common.state_dir));
        let node = agentd_node::Node::start(node_config(&args.common, &args.node)?).await.context("cannot start node")?;
        tracing::info!(socket = %socket.display(), "node listening");
        agentd_node::serve(node, &socket, shutdown_signal()).await?;
        Ok(())
    })
}
