//! Command-line interface. Every option can also be set through an `AGENTD_*`
//! environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "agentd", version, about = "Runs ACP agents in Linux sandboxes and serves their sessions over HTTP/SSE")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Control plane and one node in one process, on the embedded store.
    Up(UpArgs),
    /// The node daemon alone, serving the node API on a unix socket.
    Node(NodeArgs),
    /// The control plane alone, against a node's socket.
    Server(ServerArgs),
    /// PID 1 of a sandbox (internal).
    #[command(hide = true)]
    Supervisor(SupervisorArgs),
    /// Builds one sandbox from a spec on stdin (internal).
    #[command(hide = true)]
    SandboxInit,
}

#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// Where agentd keeps its state: the store, sandboxes, event logs.
    #[arg(long, env = "AGENTD_STATE_DIR", default_value = "/var/lib/agentd")]
    pub state_dir: PathBuf,
    /// Log filter, in `RUST_LOG` syntax.
    #[arg(long, env = "AGENTD_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "AGENTD_LOG_JSON")]
    pub log_json: bool,
}

#[derive(Debug, Args, Clone)]
pub struct ApiArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "AGENTD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// How long an agent may take to answer `initialize`, in milliseconds.
    #[arg(long, env = "AGENTD_INITIALIZE_TIMEOUT_MS", default_value_t = 30_000)]
    pub initialize_timeout_ms: u32,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Unix socket of the node API (default: <state-dir>/run/node.sock).
    #[arg(long, env = "AGENTD_NODE_SOCKET")]
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Unix socket of the node to schedule onto.
    #[arg(long, env = "AGENTD_NODE_SOCKET")]
    pub node_socket: PathBuf,
}

#[derive(Debug, Args)]
pub struct SupervisorArgs {
    /// Inherited descriptor of the listening unix socket.
    #[arg(long)]
    pub listen_fd: i32,
}
