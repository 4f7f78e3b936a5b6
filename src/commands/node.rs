//! `agentd node`: the node daemon alone.

use std::sync::Arc;

use anyhow::Context;

use super::{init_tracing, node_config, node_socket, prepare_state_dir, runtime, stop_signal};
use crate::cli::NodeArgs;
use crate::notify::Notifier;

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    init_tracing(&args.common);
    runtime()?.block_on(async {
        let notify = Arc::new(Notifier::from_env());
        // From the start: systemd counts the watchdog during start-up too.
        let watchdog = notify.start_watchdog();
        let result = node(args, &notify).await;
        if let Err(e) = &result {
            // `systemctl status` shows why, beside the exit code.
            notify.status(&format!("failed: {e:#}"));
        }
        watchdog.stop().await;
        result
    })
}

async fn node(args: NodeArgs, notify: &Arc<Notifier>) -> anyhow::Result<()> {
    prepare_state_dir(&args.common.state_dir)?;
    let socket = args.socket.clone().unwrap_or_else(|| node_socket(&args.common.state_dir));
    // Its start-up reconcile: what an earlier run left behind is removed.
    notify.status("starting the node");
    let node = agentd_node::Node::start(node_config(&args.common, &args.node)?).await.context("cannot start node")?;
    let listener = agentd_node::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "node listening");
    notify.ready(&format!("listening on {}", socket.display()));
    agentd_node::serve_on(node, listener, &socket, stop_signal(notify)).await?;
    Ok(())
}
