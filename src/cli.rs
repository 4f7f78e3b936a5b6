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
    /// The node daemon alone: the node API on a unix socket, and over TCP
    /// with mutual TLS once it joined a fleet (`--join`).
    Node(NodeArgs),
    /// The control plane alone: schedules onto the fleet's nodes.
    Server(ServerArgs),
    /// Single-use tokens for nodes to join the fleet with.
    #[command(subcommand, name = "join-token")]
    JoinToken(JoinTokenCommand),
    /// Checks this host for what agentd needs, with the settings `up` would use.
    Doctor(DoctorArgs),
    /// The configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Sandboxes for operators and tests (`agentd sandbox run --help`).
    #[command(disable_help_flag = true)]
    Sandbox {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Builds one sandbox from a spec on stdin (internal).
    #[command(hide = true, disable_help_flag = true)]
    SandboxInit {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
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
    /// How long agents get between SIGTERM and SIGKILL when their sandbox is
    /// deleted or the node stops, in milliseconds; 0 kills them at once.
    #[arg(long, env = "AGENTD_STOP_GRACE_MS", default_value_t = 2_000)]
    pub stop_grace_ms: u32,
    /// The small `agentd` binary, run as the node's sandbox-init zygote
    /// (default: agentd beside agentd-daemon).
    #[arg(long, env = "AGENTD_SANDBOX_BIN")]
    pub sandbox_bin: Option<PathBuf>,
    /// This node's id in the fleet (lower-case letters, digits, '-'); by
    /// default the one it joined with, else "local".
    #[arg(long, env = "AGENTD_NODE_ID")]
    pub node_id: Option<String>,
    /// Labels placement selects nodes by: `zone=a,disk=ssd`.
    #[arg(long, env = "AGENTD_LABELS", value_parser = parse_labels, default_value = "")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Memory sandboxes may reserve, in bytes (default: the host's).
    #[arg(long, env = "AGENTD_CAPACITY_MEMORY")]
    pub capacity_memory: Option<u64>,
    /// CPUs sandboxes may reserve (default: the host's).
    #[arg(long, env = "AGENTD_CAPACITY_CPUS")]
    pub capacity_cpus: Option<f64>,
    /// Sandboxes outlive agentd: a stop (or a crash) leaves them, their
    /// agents and running turns, and the next start takes them back. Off: a
    /// stop removes every sandbox. The packaged config turns it on for the
    /// service; `agentd up` run in a terminal ignores the file's setting
    /// (Ctrl-C stops everything) unless the flag or variable is given.
    #[arg(long, env = "AGENTD_LIVE_RESTORE", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set)]
    pub live_restore: bool,
    /// How long a closed session's event log stays on the node, in
    /// milliseconds (its archive in the store outlives it).
    #[arg(long, env = "AGENTD_CLOSED_SESSION_RETENTION_MS", default_value_t = 3_600_000)]
    pub closed_session_retention_ms: u64,
}

/// `k=v,k2=v2` into labels; empty gives none.
pub fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut labels = std::collections::BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| format!("label {pair:?} is not key=value"))?;
        if !agentd_plan::ids::valid_label(k, v) {
            return Err(format!("label {pair:?}: keys of letters, digits, '.', '-', '_', '/' (at most 63), values of at most 63 printable characters"));
        }
        if labels.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("label {k:?} is given twice"));
        }
    }
    Ok(labels)
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
    /// Deadline of each node call a workflow step makes, in milliseconds
    /// (calls that wait for the agent get the initialize timeout on top);
    /// a call past it is retried with backoff under the same idempotency key.
    #[arg(long, env = "AGENTD_NODE_CALL_TIMEOUT_MS", default_value_t = 30_000)]
    pub node_call_timeout_ms: u64,
    /// Agent registry to sync at start (a file path, file://, http:// or https:// URL);
    /// `POST /v1/registry:sync` syncs it again.
    #[arg(long, env = "AGENTD_REGISTRY")]
    pub registry: Option<String>,
    /// Sync the registry again this often, in milliseconds; 0: only at
    /// start and on `POST /v1/registry:sync`.
    #[arg(long, env = "AGENTD_REGISTRY_SYNC_INTERVAL_MS", default_value_t = 3_600_000)]
    pub registry_sync_interval_ms: u64,
    /// How a new container's node is chosen: `spread` (least loaded) or
    /// `binpack` (most loaded that fits).
    #[arg(long, env = "AGENTD_PLACEMENT", default_value = "spread")]
    pub placement: agentd_controlplane::store::placement::Strategy,
}

impl ApiArgs {
    /// The PostgreSQL URL, if one is given: an empty one (`database_url = ""`
    /// in the config file) means the embedded store, as no URL does.
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref().filter(|url| !url.is_empty())
    }
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
    /// Join the fleet of the control plane at this URL (http:// or https://),
    /// once: the certificate it issues is kept in the state directory and used
    /// at every later start.
    #[arg(long, env = "AGENTD_JOIN", requires = "join_token")]
    pub join: Option<String>,
    /// The join token `agentd join-token create` printed.
    #[arg(long, env = "AGENTD_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// Where control planes reach this node's gRPC service: `host:port`.
    #[arg(long, env = "AGENTD_ADVERTISE")]
    pub advertise: Option<String>,
    /// Where the node serves gRPC over mutual TLS (with a certificate from
    /// joining).
    #[arg(long, env = "AGENTD_GRPC_LISTEN")]
    pub grpc_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Unix socket of a node on this host to register and schedule onto,
    /// besides the fleet's joined nodes.
    #[arg(long, env = "AGENTD_NODE_SOCKET")]
    pub node_socket: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// Makes a single-use join token and prints it as the last line.
    Create(JoinTokenArgs),
}

#[derive(Debug, Args)]
pub struct JoinTokenArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The fleet's PostgreSQL (postgres://...); without it, the embedded
    /// store in the state directory.
    #[arg(long, env = "AGENTD_DATABASE_URL")]
    pub database_url: Option<String>,
    /// How long the token may be used: `30m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: std::time::Duration,
    /// A note kept with the token (which node it is for).
    #[arg(long, default_value = "")]
    pub description: String,
}

/// `90s`, `30m`, `1h`, `7d`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{text:?} is not a duration such as 30m, 1h or 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?} is not a duration such as 30m, 1h or 7d")),
    };
    if secs == 0 {
        return Err("a duration must be positive".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The settings `agentd up` takes (state dir, id ranges, database, ...),
    /// from the same flags, environment and config file.
    #[command(flatten)]
    pub up: UpArgs,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Checks a config file: unknown keys and bad values, with their line
    /// and column.
    Check {
        /// The file (default: $AGENTD_CONFIG, else /etc/agentd/agentd.toml).
        file: Option<PathBuf>,
    },
}
