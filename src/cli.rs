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
    /// Sandboxes for operators and tests.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Builds one sandbox from a spec on stdin (internal).
    #[command(hide = true)]
    SandboxInit {
        /// Serve specs from stdin, one worker per sandbox, until end of file.
        #[arg(long)]
        zygote: bool,
    },
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

/// Node settings shared by `up` and `node`.
#[derive(Debug, Args, Clone)]
pub struct NodeFlags {
    /// Name of the node's cgroup subtree under the cgroup agentd started in;
    /// two nodes started in one cgroup need different names.
    #[arg(long, env = "AGENTD_CGROUP_SUBTREE", default_value = "agentd")]
    pub cgroup_subtree: String,
    /// First host uid/gid given to sandboxes; sandbox n gets
    /// id_base + n * id_range_size onwards.
    #[arg(long, env = "AGENTD_ID_BASE", default_value_t = 1_000_000)]
    pub id_base: u32,
    #[arg(long, env = "AGENTD_ID_RANGE_SIZE", default_value_t = 65_536)]
    pub id_range_size: u32,
    #[arg(long, env = "AGENTD_MAX_SANDBOXES", default_value_t = 1_000)]
    pub max_sandboxes: u32,
}

#[derive(Debug, Args, Clone)]
pub struct ApiArgs {
    /// Address of the HTTP API.
    #[arg(long, env = "AGENTD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// PostgreSQL URL (postgres://...) of the store; without it, the embedded
    /// SQLite file <state-dir>/agentd.db.
    #[arg(long, env = "AGENTD_DATABASE_URL")]
    pub database_url: Option<String>,
    /// How often the control plane checks its node (heartbeat, orphan
    /// sandboxes), in milliseconds.
    #[arg(long, env = "AGENTD_NODE_CHECK_INTERVAL_MS", default_value_t = 5_000)]
    pub node_check_interval_ms: u64,
    /// Silence after which the node is lost and what ran on it fails, in
    /// milliseconds.
    #[arg(long, env = "AGENTD_NODE_HEARTBEAT_TIMEOUT_MS", default_value_t = 30_000)]
    pub node_heartbeat_timeout_ms: u64,
    /// Hibernate (freeze) a container after this many milliseconds without
    /// a turn; 0: never.
    #[arg(long, env = "AGENTD_HIBERNATE_AFTER_MS", default_value_t = 0)]
    pub hibernate_after_ms: u64,
    /// Stop and delete a container after this many milliseconds without a
    /// turn; 0: never.
    #[arg(long, env = "AGENTD_CONTAINER_TTL_MS", default_value_t = 0)]
    pub container_ttl_ms: u64,
    /// How long an agent may take to answer `initialize`, in milliseconds.
    #[arg(long, env = "AGENTD_INITIALIZE_TIMEOUT_MS", default_value_t = 30_000)]
    pub initialize_timeout_ms: u32,
    /// Agent registry to sync at start (a file path, file://, http:// or https:// URL);
    /// `POST /v1/registry:sync` syncs it again.
    #[arg(long, env = "AGENTD_REGISTRY")]
    pub registry: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub node: NodeFlags,
    #[command(flatten)]
    pub api: ApiArgs,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub node: NodeFlags,
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


#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Runs one command in a sandbox built exactly as agent sandboxes are,
    /// stdio attached; exits with its code (or 128 + signal).
    Run(SandboxRunArgs),
}

#[derive(Debug, Args)]
pub struct SandboxRunArgs {
    /// Memory limit (bytes, or with a K/M/G suffix); no swap beyond it.
    #[arg(long)]
    pub memory: Option<String>,
    /// Maximum number of processes and threads.
    #[arg(long)]
    pub pids: Option<u64>,
    /// CPU limit in CPUs, e.g. 0.5.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// none (own network namespace, loopback only) or host.
    #[arg(long, default_value = "none")]
    pub network: String,
    /// A root filesystem directory to use instead of the host's system dirs.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Host directory mounted read-write at /workspace (default: a fresh
    /// temporary directory, removed afterwards).
    #[arg(long)]
    pub workspace: Option<PathBuf>,
    /// Extra read-only bind mount, HOST:SANDBOX (repeatable).
    #[arg(long = "ro-bind", value_name = "HOST:SANDBOX")]
    pub ro_binds: Vec<String>,
    /// NAME=VALUE for the command's environment (repeatable). The command gets
    /// only PATH, HOME, LANG, TMPDIR and these.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// First host uid/gid of the sandbox's id range (default: derived from
    /// this process's pid, so concurrent runs never share ids).
    #[arg(long)]
    pub uid_base: Option<u32>,
    #[arg(long, default_value_t = 65536)]
    pub uid_count: u32,
    #[arg(long, env = "AGENTD_LOG", default_value = "warn")]
    pub log: String,
    /// Fail setup at this stage on purpose (tests of the undo path).
    #[arg(long, hide = true)]
    pub inject_failure: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}
