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
    /// with mutual TLS once it joined a fleet (`--join`); `agentd node ls`
    /// lists the fleet's nodes.
    Node(NodeArgs),
    /// The control plane alone: schedules onto the fleet's nodes.
    Server(ServerArgs),
    /// Single-use tokens for nodes to join the fleet with.
    #[command(subcommand, name = "join-token")]
    JoinToken(JoinTokenCommand),
    /// Bearer tokens of the HTTP API, made and revoked in the store.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Sessions: create, list, show, delete.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Sends a prompt to a session and streams the agent's answer.
    Prompt(PromptArgs),
    /// Containers (sandboxes): list, show, delete, hibernate, resume.
    #[command(subcommand)]
    Container(ContainerCommand),
    /// A session's events, one JSON line each.
    Events(EventsArgs),
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
    /// default the one it joined with, else "node-1" (as the original agentd).
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
    /// The node's secrets, which profiles name by reference: a file of
    /// `NAME=value` lines (mode 0600/0640) or a directory of one file per
    /// secret. Agents get a proxy endpoint and a placeholder, never a value.
    #[arg(long, env = "AGENTD_SECRETS_FILE")]
    pub secrets_file: Option<PathBuf>,
    /// PEM CA certificates the secrets proxy trusts for upstreams, besides
    /// Mozilla's roots (a private gateway, a test's own CA).
    #[arg(long, env = "AGENTD_SECRETS_CA_FILE")]
    pub secrets_ca_file: Option<PathBuf>,
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
    /// Host paths (directories or files) that callers without the admin
    /// scope may name: file:// agent bundles, agent executables, rootfs.
    /// Comma-separated or repeated.
    #[arg(long, env = "AGENTD_ALLOWED_HOST_PATHS", value_delimiter = ',')]
    pub allowed_host_paths: Vec<std::path::PathBuf>,
    /// Registry sources (paths or URLs, as written) that callers without
    /// the admin scope may sync from. Comma-separated or repeated.
    #[arg(long, env = "AGENTD_ALLOWED_REGISTRY_SOURCES", value_delimiter = ',')]
    pub allowed_registry_sources: Vec<String>,
    /// Sync the registry again this often, in milliseconds; 0: only at
    /// start and on `POST /v1/registry:sync`.
    #[arg(long, env = "AGENTD_REGISTRY_SYNC_INTERVAL_MS", default_value_t = 3_600_000)]
    pub registry_sync_interval_ms: u64,
    /// How a new container's node is chosen: `spread` (least loaded) or
    /// `binpack` (most loaded that fits).
    #[arg(long, env = "AGENTD_PLACEMENT", default_value = "spread")]
    pub placement: agentd_controlplane::store::placement::Strategy,
    /// Serve the API without bearer tokens: anyone who reaches the port may
    /// do anything. Refused unless the API listens on a loopback address.
    #[arg(long, env = "AGENTD_NO_AUTH")]
    pub no_auth: bool,
    /// Also serve /metrics (and /healthz, /readyz) on this address, without
    /// a token: for a scraper that holds none. On the API's address
    /// /metrics needs a token of scope read.
    #[arg(long, env = "AGENTD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// The interval of SSE keep-alive comments, in milliseconds.
    #[arg(long, env = "AGENTD_SSE_KEEPALIVE_MS", default_value_t = 15_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub sse_keepalive_ms: u64,
    /// How many events an SSE subscriber may fall behind the session's
    /// live stream before it is cut off (with a `stream.lagged` event; it
    /// resumes with Last-Event-ID).
    #[arg(long, env = "AGENTD_SSE_BUFFER", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub sse_buffer: u32,
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
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct NodeArgs {
    /// A client command instead of the daemon.
    #[command(subcommand)]
    pub command: Option<NodeCommand>,
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
pub enum TokenCommand {
    /// Makes a token and prints it once, as the last line.
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// read, write (sessions, containers, prompts, permissions) or admin.
        #[arg(long)]
        scope: String,
        /// How long it may be used (`30m`, `12h`, `30d`); default: until revoked.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
        /// A note kept with it.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Lists tokens (never their secrets).
    Ls {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revokes a token by id.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        id: String,
    },
}

/// Which store a command works on directly.
#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The fleet's PostgreSQL (postgres://...); without it, the embedded
    /// store in the state directory.
    #[arg(long, env = "AGENTD_DATABASE_URL")]
    pub database_url: Option<String>,
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

/// How a client command reaches the API.
#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// The agentd API (default: http:// and the `listen` address of the
    /// config file or AGENTD_LISTEN, else http://127.0.0.1:8080).
    #[arg(long, env = "AGENTD_URL", value_name = "URL")]
    pub server: Option<String>,
    /// Bearer token sent with every request (default: the state
    /// directory's admin.token, when readable).
    #[arg(long, env = "AGENTD_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<Secret>,
    /// The local agentd's state directory, where its admin.token is.
    #[arg(long, env = "AGENTD_STATE_DIR", default_value = "/var/lib/agentd")]
    pub state_dir: PathBuf,
}

/// A credential: its Debug form hides it, so no log or panic message of
/// the parsed command line shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A listing: a table, or the API's JSON.
#[derive(Debug, Args, Clone)]
pub struct ListArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also the closed sessions / deleted containers.
    #[arg(long, short)]
    pub all: bool,
}

/// One thing shown by id.
#[derive(Debug, Args, Clone)]
pub struct GetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub id: String,
    /// Print the API's JSON instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Things acted on by id.
#[derive(Debug, Args, Clone)]
pub struct IdsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Creates a session (a new sandbox, or one more session in a ready
    /// container) and prints its id.
    Create(SessionCreateArgs),
    /// Lists sessions, newest first (closed ones with --all).
    #[command(alias = "list")]
    Ls(ListArgs),
    /// Shows a session, its agent and its runs.
    Get(GetArgs),
    /// Closes sessions; a container's last session takes its sandbox with it.
    #[command(alias = "delete")]
    Rm(IdsArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("agent_source").required(true).args(["agent", "agent_file"]))]
pub struct SessionCreateArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// An agent of the synced registry, by id.
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// An agent definition (the API's `manual_agent`: the registry's shape
    /// or agentd's) in a JSON file; `-` reads it from stdin.
    #[arg(long, value_name = "FILE")]
    pub agent_file: Option<PathBuf>,
    /// Open the session in this ready container instead of a new one.
    #[arg(long, value_name = "ID", conflicts_with_all = ["profile_file", "label"])]
    pub container: Option<String>,
    /// The new container's profile (limits, network, rootfs, ...) in a JSON file.
    #[arg(long, value_name = "FILE")]
    pub profile_file: Option<PathBuf>,
    /// A label the new container's node must carry (the profile's
    /// `node_selector`); repeat for more.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_label)]
    pub label: Vec<(String, String)>,
    /// Print the session's JSON instead of its id.
    #[arg(long)]
    pub json: bool,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (k, v) = text.split_once('=').ok_or_else(|| format!("label {text:?} is not key=value"))?;
    if !agentd_plan::ids::valid_label(k, v) {
        return Err(format!("label {text:?}: keys of letters, digits, '.', '-', '_', '/' (at most 63), values of at most 63 printable characters"));
    }
    Ok((k.to_string(), v.to_string()))
}

#[derive(Debug, Args)]
pub struct PromptArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub session: String,
    /// The prompt; `-` reads it from stdin.
    pub text: String,
}

#[derive(Debug, Subcommand)]
pub enum ContainerCommand {
    /// Lists containers, newest first (deleted ones with --all).
    #[command(alias = "list")]
    Ls(ListArgs),
    /// Shows a container: live usage, sessions, agents.
    Get(GetArgs),
    /// Deletes containers: their sandboxes and every session in them.
    #[command(alias = "delete")]
    Rm(IdsArgs),
    /// Freezes every process of the containers, memory intact.
    Hibernate(IdsArgs),
    /// Thaws hibernated containers.
    Resume(IdsArgs),
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Lists the fleet's nodes.
    #[command(alias = "list")]
    Ls(NodeListArgs),
}

#[derive(Debug, Args)]
pub struct NodeListArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    pub session: String,
    /// Start after this event id (default: from the first event).
    #[arg(long, value_name = "ID", default_value_t = 0)]
    pub after: u64,
    /// Keep following new events (reconnecting when the stream drops)
    /// instead of stopping at the latest one.
    #[arg(long, short)]
    pub follow: bool,
}
