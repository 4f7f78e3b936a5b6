//! The node daemon: owns the sandboxes of one machine.
//!
//! Layout:
//! - [`sandboxes`]: the sandbox table: plans checked before anything is made,
//!   id ranges, state directories, launching through `agentd sandbox-init`,
//!   watching each PID 1 through a pidfd, teardown (the agents stopped with a
//!   grace period first), and, at start, taking back the sandboxes an
//!   earlier node process left running (live restore) or cleaning them up.
//! - [`record`]: `sandbox.json`, what taking a sandbox back needs.
//! - [`restore`]: taking back the sessions of those sandboxes and the turns
//!   that were running on them.
//! - [`state_file`]: state files written atomically.
//! - [`bundles`]: the content-addressed cache of agent bundles (archives
//!   fetched, checked and unpacked once, bound read-only into sandboxes).
//! - [`event_log`]: each session's append-only event log (a ring in memory,
//!   a JSONL file written by one thread off the executor), from which
//!   clients resume by sequence number.
//! - [`sessions`]: ACP sessions on this node, their state files, and the
//!   turn running on each; [`retention`]: closed sessions' files removed.
//! - [`journal`]: what the control plane must record from this node, in
//!   order: each turn's end, each sandbox lost; the one path run ends take.
//! - [`fence`]: epoch fencing and idempotency keys of workflow steps' calls,
//!   kept across restarts.
//! - `oom`: turns OOM kills in a sandbox's cgroup into `sandbox.oom` events.
//! - [`secrets_proxy`]: keys that never enter the sandbox: the node's secret
//!   store, and per sandbox a plain-HTTP endpoint on its own loopback that
//!   forwards to the secret's upstream over TLS with the key added.
//! - [`service`]: the `Node` gRPC service.
//!
//! [`serve`] runs the service on a unix socket until shutdown ([`bind`] then
//! [`serve_on`] for a caller that acts between the two).

pub mod bundles;
mod delivery;
pub mod event_log;
pub mod fence;
pub mod journal;
mod egress;
mod oom;
pub mod record;
pub mod restore;
pub mod retention;
pub mod sandboxes;
pub mod secrets_proxy;
pub mod service;
pub mod sessions;
pub mod setup;
pub mod state_file;

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use agentd_proto::node::SandboxLost;
use agentd_proto::node::journal_entry::Fact;
use agentd_proto::node::node_server::NodeServer;
use tokio_stream::wrappers::UnixListenerStream;

/// Node settings. Paths are parameters so tests run in temp directories.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Root of this node's state: sandboxes/<id>/ (rootfs mount point,
    /// workspace, supervisor socket and log, session event logs) and
    /// bundles/<sha256>/ (unpacked agent bundles).
    pub state_dir: PathBuf,
    /// The small `agentd` binary, run once as the `sandbox-init --zygote`
    /// that forks every sandbox (and one-shot as `sandbox-init`).
    pub exe: PathBuf,
    /// First host uid/gid handed to sandboxes; sandbox `n` gets
    /// `id_base + n * id_range_size ..`.
    pub id_base: u32,
    pub id_range_size: u32,
    pub max_sandboxes: u32,
    /// `RUST_LOG` given to supervisors.
    pub supervisor_log_filter: String,
    /// The cgroup filesystem and /proc: parameters so tests can use fakes.
    pub cgroup_root: PathBuf,
    pub proc_root: PathBuf,
    /// Name of this node's cgroup subtree under the cgroup it started in.
    /// Two nodes started in one cgroup need different names.
    pub cgroup_subtree: String,
    /// How long agents get between SIGTERM and SIGKILL when their sandbox is
    /// deleted or the node stops; zero kills them at once.
    pub stop_grace: std::time::Duration,
    /// This node's id in the fleet (a DNS label).
    pub node_id: String,
    /// Labels placement selects nodes by.
    pub labels: std::collections::BTreeMap<String, String>,
    /// What the node offers sandboxes; unset parts are measured from the
    /// host at start (memory, CPUs) or are `max_sandboxes` (slots).
    pub capacity_memory: Option<u64>,
    pub capacity_cpus: Option<f64>,
    /// The secret store profiles' secrets come from (a file of `NAME=value`
    /// lines or a directory of files; see `secrets_proxy::store`); `None`:
    /// the node holds no secrets.
    pub secrets_file: Option<PathBuf>,
    /// CAs the secrets proxy trusts for upstreams besides Mozilla's roots.
    pub secrets_ca_file: Option<PathBuf>,
    /// Sandboxes outlive the node process: a stop leaves them running (and
    /// their turns), and a start takes back what an earlier process left.
    /// Off: a stop removes every sandbox, a start removes what is left.
    pub live_restore: bool,
    /// How long a closed session's files stay on the node (`retention.rs`).
    pub closed_session_retention: std::time::Duration,
}

impl NodeConfig {
    pub fn new(state_dir: PathBuf, exe: PathBuf) -> Self {
        Self {
            state_dir,
            exe,
            id_base: 1_000_000,
            id_range_size: 65_536,
            max_sandboxes: 1_000,
            supervisor_log_filter: "info".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            proc_root: "/proc".into(),
            cgroup_subtree: "agentd".into(),
            stop_grace: std::time::Duration::from_secs(2),
            node_id: "node-1".into(),
            labels: Default::default(),
            capacity_memory: None,
            capacity_cpus: None,
            secrets_file: None,
            secrets_ca_file: None,
            live_restore: false,
            closed_session_retention: std::time::Duration::from_secs(3600),
        }
    }
}

/// The running node: the state its gRPC service works on.
pub struct Node {
    pub sandboxes: Arc<sandboxes::Sandboxes>,
    pub sessions: Arc<sessions::Sessions>,
    /// Exactly-once effects of the control plane's workflow steps.
    pub fences: fence::Fences,
    /// Containers being created or starting an agent: what they are doing.
    pub setups: setup::Setups,
    /// Turn ends and lost sandboxes, for the control plane to record.
    pub journal: Arc<journal::Journal>,
    /// Writes every session's event log file, off the executor.
    pub log_writer: event_log::LogWriter,
    /// Set when the node stops leaving its sandboxes running (live
    /// restore): turns are then left to the next start, not ended.
    detached: AtomicBool,
}

impl Node {
    /// Prepares the state directory and becomes the subreaper for sandbox
    /// PID 1s; then, with live restore, takes back the sandboxes an earlier
    /// node process left running, their sessions and running turns, and
    /// cleans up the rest (all of them without live restore). Each sandbox
    /// not taken back is journaled lost, with why; one taken back is not.
    pub async fn start(config: NodeConfig) -> std::io::Result<Arc<Self>> {
        sandboxes::become_subreaper()?;
        let started = std::time::Instant::now();
        let live_restore = config.live_restore;
        let retention = config.closed_session_retention;
        let journal = Arc::new(journal::Journal::open(&config.state_dir)?);
        let fences = fence::Fences::open(&config.state_dir, live_restore)?;
        let log_writer = event_log::LogWriter::start()?;
        let (sandboxes, opened) = sandboxes::Sandboxes::open(config).await?;
        for (container_id, reason) in &opened.lost {
            journal.append(Fact::SandboxLost(SandboxLost { container_id: container_id.clone(), reason: reason.clone() }));
        }
        // Answers about sandboxes that did not come back must not be given
        // to a retry: it has to build them again.
        fences.forget_answers_except(&opened.adopted.iter().cloned().collect::<HashSet<_>>());
        let sessions = Arc::new(sessions::Sessions::default());
        let node = Arc::new(Self {
            sandboxes,
            sessions,
            fences,
            setups: setup::Setups::default(),
            journal,
            log_writer,
            detached: AtomicBool::new(false),
        });
        if live_restore {
            let (sessions, turns) = restore::sessions(&node);
            tracing::info!(
                sandboxes = opened.adopted.len(),
                sessions,
                turns,
                lost = opened.lost.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "live restore: took back what the node left running"
            );
        }
        oom::watch(Arc::downgrade(&node));
        retention::watch(Arc::downgrade(&node), retention);
        if let Some(denials) = node.sandboxes.take_denials() {
            egress::report(Arc::downgrade(&node), denials);
        }
        Ok(node)
    }

    /// Whether the node is stopping with its sandboxes left running.
    pub fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Relaxed)
    }

    /// Stops the node the way its config says: every sandbox removed, or,
    /// with live restore, all left running for the next start.
    pub async fn stop(&self) {
        if self.sandboxes.config().live_restore {
            self.detach().await;
        } else {
            self.stop_all().await;
        }
        // Every event queued is on disk before the process goes.
        self.log_writer.sync().await;
    }

    /// Stops every sandbox and removes this node's cgroup subtree; used on
    /// shutdown. All at once: each may spend its agents' grace period.
    pub async fn stop_all(&self) {
        let ids = self.sandboxes.ids();
        futures::future::join_all(ids.iter().map(|id| self.delete_sandbox(id))).await;
        self.sandboxes.finish_removals().await;
    }

    /// A stop that leaves the sandboxes, their agents and running turns as
    /// they are (live restore): session logs are closed (their readers end;
    /// the next start reopens them), the zygote and the spare go, state
    /// stays on disk.
    pub async fn detach(&self) {
        self.detached.store(true, Ordering::Relaxed);
        for session in self.sessions.all() {
            session.log.close();
        }
        self.sandboxes.release().await;
        tracing::info!(sandboxes = self.sandboxes.ids().len(), "node stopped; its sandboxes run on (live restore)");
    }

    /// Kills a sandbox and forgets its sessions. Returns whether it existed.
    pub async fn delete_sandbox(&self, id: &str) -> bool {
        let existed = self.sandboxes.delete(id).await;
        self.sessions.close_container(id).await;
        existed
    }
}

/// Where the node serves besides its unix socket: TCP with mutual TLS, for
/// control planes on other machines.
pub struct TcpListen {
    pub listener: tokio::net::TcpListener,
    /// The node's certificate and key, and the cluster CA whose
    /// control-plane certificates alone it accepts.
    pub tls: tonic::transport::ServerTlsConfig,
}

/// Serves the node on the unix socket `socket`, and on `tcp` if given,
/// until `shutdown` resolves.
///
/// The node is stopped ([`Node::stop`]: sandboxes removed, or left running
/// with live restore) before the servers drain: that closes every session
/// log and the journal, which ends the streams a graceful shutdown would
/// otherwise wait for forever.
pub async fn serve(node: Arc<Node>, socket: &Path, tcp: Option<TcpListen>, shutdown: impl Future<Output = ()> + Send) -> std::io::Result<()> {
    let listener = bind(socket)?;
    serve_on(node, listener, socket, tcp, shutdown).await
}

/// Binds the node's unix socket `socket`, replacing a stale one. Split from
/// [`serve_on`] so that a daemon says it is ready (systemd's READY=1), and a
/// control plane in the same process dials, only once it accepts.
pub fn bind(socket: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(socket);
    tokio::net::UnixListener::bind(socket)
}

/// [`serve`] on a listener from [`bind`]; `socket` is its path, removed at
/// the end.
pub async fn serve_on(
    node: Arc<Node>,
    listener: tokio::net::UnixListener,
    socket: &Path,
    tcp: Option<TcpListen>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let stopped = tokio_util::sync::CancellationToken::new();
    let stop = {
        let node = Arc::clone(&node);
        let stopped = stopped.clone();
        async move {
            shutdown.await;
            node.stop().await;
            node.journal.close();
            stopped.cancel();
        }
    };
    let local = tonic::transport::Server::builder()
        .layer(agentd_proto::trace::ServerLayer)
        .add_service(NodeServer::new(service::NodeService::new(Arc::clone(&node))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop);
    let remote = async {
        let Some(tcp) = tcp else { return Ok(()) };
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(tcp.listener);
        tonic::transport::Server::builder()
            .tls_config(tcp.tls)
            .map_err(std::io::Error::other)?
            // A control plane that vanished mid-stream is noticed.
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
            .layer(agentd_proto::trace::ServerLayer)
            .add_service(NodeServer::new(service::NodeService::new(Arc::clone(&node))))
            .serve_with_incoming_shutdown(incoming, stopped.cancelled_owned())
            .await
            .map_err(std::io::Error::other)
    };
    let (served, remote) = tokio::join!(local, remote);
    let _ = std::fs::remove_file(socket);
    served.map_err(std::io::Error::other)?;
    remote
}
