//! `agentd node`: the node daemon alone. On its unix socket always; over
//! TCP with mutual TLS once it has joined a fleet (`--join` once, then its
//! certificate from the state directory at every start).

use std::net::SocketAddr;
use std::sync::Arc;

use agentd_cgroups::limits::HostCapacity;
use anyhow::{Context, anyhow, bail};

use super::{init_tracing, node_config, node_socket, prepare_state_dir, stop_signal};
use crate::cli::NodeArgs;
use crate::join::{self, Joined, Offer};
use crate::notify::Notifier;

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    init_tracing(&args.common);
    super::run_daemon(|notify| async move { node(args, &notify).await })
}

async fn node(args: NodeArgs, notify: &Arc<Notifier>) -> anyhow::Result<()> {
    prepare_state_dir(&args.common.state_dir)?;
    let socket = args.socket.clone().unwrap_or_else(|| node_socket(&args.common.state_dir));
    let mut config = node_config(&args.common, &args.node)?;
    notify.status("joining the fleet");
    let joined = membership(&args, &config).await?;
    let tcp = match &joined {
        Some(j) => {
            config.node_id = j.identity.node_id.clone();
            Some(tcp_listen(&args, j).await?)
        }
        None if args.grpc_listen.is_some() => bail!("--grpc-listen needs a certificate: join a fleet first (--join URL --join-token T --advertise HOST:PORT)"),
        None => None,
    };
    // Its start-up reconcile: what an earlier run left behind is removed.
    notify.status("starting the node");
    let node = agentd_node::Node::start(config).await.context("cannot start node")?;
    let listener = agentd_node::bind(&socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "node listening");
    let mut listening = format!("listening on {}", socket.display());
    if let Some(tcp) = &tcp {
        let addr = tcp.listener.local_addr()?;
        tracing::info!(listen = %addr, "node listening over mutual TLS");
        listening.push_str(&format!(" and {addr} (mutual TLS)"));
    }
    notify.ready(&listening);
    agentd_node::serve_on(node, listener, &socket, tcp, stop_signal(notify)).await?;
    Ok(())
}

/// The fleet this node belongs to: what an earlier join left, or a join now.
async fn membership(args: &NodeArgs, config: &agentd_node::NodeConfig) -> anyhow::Result<Option<Joined>> {
    let node_state = &config.state_dir;
    let earlier = join::load(node_state)?;
    let Some(url) = &args.join else { return Ok(earlier) };
    if let Some(j) = earlier {
        if args.node.node_id.as_ref().is_some_and(|id| *id != j.identity.node_id) {
            bail!("this node joined as {:?} already; its state directory cannot serve as another node", j.identity.node_id);
        }
        tracing::info!(node_id = j.identity.node_id, control_plane = j.identity.control_plane, "already joined; --join ignored");
        return Ok(Some(j));
    }
    let token = args.join_token.as_deref().ok_or_else(|| anyhow!("--join needs --join-token"))?;
    let advertise = args.advertise.clone().ok_or_else(|| anyhow!("--join needs --advertise HOST:PORT (where control planes reach this node)"))?;
    let node_id = match &args.node.node_id {
        Some(id) => id.clone(),
        None => default_node_id(),
    };
    let host = HostCapacity::detect(&config.proc_root).map_err(|e| anyhow!("cannot measure this host: {e}"))?;
    let offer = Offer {
        node_id,
        advertise,
        labels: config.labels.clone(),
        slots: config.max_sandboxes,
        memory: config.capacity_memory.unwrap_or(host.memory_bytes),
        cpus: config.capacity_cpus.unwrap_or(host.cpus),
    };
    let joined = join::join(node_state, url, token, &offer).await?;
    tracing::info!(node_id = joined.identity.node_id, control_plane = url, "joined the fleet");
    Ok(Some(joined))
}

/// The listener and TLS settings of a joined node.
async fn tcp_listen(args: &NodeArgs, j: &Joined) -> anyhow::Result<agentd_node::TcpListen> {
    let addr: SocketAddr = match args.grpc_listen {
        Some(addr) => addr,
        None => {
            // The advertised port on every address of the host.
            let port = j.identity.advertise.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(7443);
            SocketAddr::from(([0, 0, 0, 0], port))
        }
    };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr}"))?;
    let tls = agentd_pki::node_server_tls(&j.cert_pem, &j.key_pem, &j.ca_pem).map_err(|e| anyhow!("the node's certificate: {e}"))?;
    Ok(agentd_node::TcpListen { listener, tls })
}

/// The host's name as a node id (a DNS label), or "node".
fn default_node_id() -> String {
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().to_lowercase()).unwrap_or_default();
    let label: String = host.split('.').next().unwrap_or("").chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(63).collect();
    let label = label.trim_matches('-').to_string();
    if agentd_plan::ids::valid_node_id(&label) { label } else { "node".into() }
}
