//! A fleet on one machine: hosts on a private network (`testkit::netns`), a
//! throwaway PostgreSQL reached over its unix socket (not bound to any
//! network namespace), `agentd server`s and `agentd node`s each in a host of
//! its own. Nodes join over the fabric with tokens; the test reaches each
//! control plane's API through a relay from the root namespace
//! (`Host::forward`), and each node's gRPC port the same way.
//!
//! Every node has its own state dir, cgroup subtree, id range (a slice of
//! this test process's [`unique_id_base`] window) and namespace.
//! [`Fleet::finish`] stops every process, checks that no cgroup of the
//! nodes is left, drops hosts and fabric and checks that no namespace or
//! link is left.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use agentd_testkit::netns::{Fabric, Forward, Host, leftovers};
use agentd_testkit::postgres::TempPostgres;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::daemon::Daemon;
use super::host::{cgroup_dirs, processes_with_uid, unique_id_base, wait_no_cgroups};
use super::{Sse, agentd_bin, procfs};

/// The port every node serves gRPC (mutual TLS) on, in its own namespace.
pub const GRPC_PORT: u16 = 7443;
/// Sandboxes per node (`--max-sandboxes`): its capacity in slots.
pub const SLOTS: u32 = 3;
/// Host ids per node: its slots' ranges (`--id-range-size` 65536 at
/// [`SLOTS`]; a node with more slots gets smaller ranges). Five nodes fit in
/// the 1000000 ids of [`unique_id_base`]'s window.
const IDS_PER_NODE: u32 = SLOTS * 65_536;
/// How often servers check nodes, and the silence after which a node is lost.
pub const CHECK_INTERVAL_MS: u64 = 500;
pub const HEARTBEAT_TIMEOUT_MS: u64 = 3_000;

/// A control plane's HTTP API as the test reaches it.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = tokio::time::timeout(Duration::from_secs(60), req.send()).await.expect("an answer within 60 s").expect("request");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.delete(self.url(path))).await
    }

    pub async fn prompt(&self, session: &str, text: &str) -> (StatusCode, Value) {
        self.post(&format!("/v1/sessions/{session}:prompt"), &json!({"prompt": text})).await
    }

    /// Opens a session's event stream.
    pub async fn events(&self, session: &str) -> Sse {
        let resp = self.http.get(self.url(&format!("/v1/sessions/{session}/events"))).send().await.expect("events request");
        assert_eq!(resp.status(), StatusCode::OK, "events of {session}");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Sse { stream: Box::pin(resp.bytes_stream()), buf: String::new() }
    }

    /// Polls `GET path` until `check` accepts the body, for at most `within`.
    pub async fn wait_for(&self, path: &str, what: &str, within: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (_, body) = self.get(path).await;
            if check(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "timed out ({within:?}) waiting for {what}; last GET {path}: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET /v1/nodes/{id}`.
    pub async fn node(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/nodes/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Waits until node `id` is in `state` (`alive`, `lost`, `drained`...).
    pub async fn wait_node(&self, id: &str, state: &str, within: Duration) -> Value {
        self.wait_for(&format!("/v1/nodes/{id}"), &format!("node {id} {state}"), within, |n| n["state"] == state).await
    }
}

/// `agentd server` in a host of its own, on the fleet's PostgreSQL.
pub struct ControlPlane {
    pub daemon: Daemon,
    /// The relay the test reaches the API through: dropped before the host.
    forward: Option<Forward>,
    pub api: Api,
    /// Where nodes reach the API: `http://<host address>:<port>`.
    pub url: String,
    /// Its namespace, deleted on drop: after the process and the relay.
    host: Host,
}

/// `agentd node` in a host of its own; started, killed and restarted on the
/// same state directory.
pub struct FleetNode {
    pub daemon: Option<Daemon>,
    pub host: Host,
    pub id: String,
    pub state: PathBuf,
    pub subtree: String,
    /// The first host id of its sandboxes (`--id-base`).
    pub id_base: u32,
    /// Its per-host flags (state dir, subtree, ids, labels, capacity); the
    /// gRPC address is added by [`Self::command`].
    flags: Vec<String>,
}

impl FleetNode {
    /// Where control planes reach its gRPC service.
    pub fn grpc_addr(&self) -> SocketAddr {
        SocketAddr::from((self.host.addr(), GRPC_PORT))
    }

    /// Starts the node, joining with `join` (control plane URL, token) if
    /// given, and waits until it serves over mutual TLS.
    pub async fn start(&mut self, join: Option<(&str, &str)>) {
        assert!(self.daemon.is_none(), "node {} runs already", self.id);
        let daemon = Daemon::spawn_command(self.command(join));
        daemon.wait_for_line("node listening over mutual TLS").await;
        self.daemon = Some(daemon);
    }

    /// The node's command line (in its host), joining with `join` if given.
    pub fn command(&self, join: Option<(&str, &str)>) -> Command {
        let mut cmd = self.host.command(agentd_bin());
        cmd.arg("node").args(&self.flags).args(["--grpc-listen", &self.grpc_addr().to_string()]);
        if let Some((url, token)) = join {
            cmd.args(["--join", url, "--join-token", token, "--advertise", &self.grpc_addr().to_string()]);
        }
        cmd
    }

    /// Starts the node without joining: it serves on its unix socket only
    /// ([`Self::socket`]), for a control plane beside it (`agentd server
    /// --node-socket`), and waits until it listens.
    #[allow(dead_code)] // benches/fleet.rs's local node
    pub async fn start_local(&mut self) {
        assert!(self.daemon.is_none(), "node {} runs already", self.id);
        let mut cmd = self.host.command(agentd_bin());
        cmd.arg("node").args(&self.flags);
        let daemon = Daemon::spawn_command(cmd);
        daemon.wait_for_line("node listening").await;
        self.daemon = Some(daemon);
    }

    /// The node's unix socket (the default, `<state>/run/node.sock`).
    #[allow(dead_code)] // benches/fleet.rs's local node
    pub fn socket(&self) -> PathBuf {
        self.state.join("run").join("node.sock")
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap_or_else(|| panic!("node {} is not running", self.id))
    }

    pub fn pid(&self) -> u32 {
        self.daemon().pid().expect("the node runs")
    }

    /// SIGKILL: a crash; its sandboxes stay behind.
    pub fn kill9(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill9();
        }
    }

    /// SIGINT: a clean stop (its sandboxes are stopped).
    pub fn interrupt(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.interrupt();
        }
    }

    /// `<state>/node/tls`: its key, certificate, CA and identity.
    pub fn tls_dir(&self) -> PathBuf {
        self.state.join("node").join("tls")
    }

    /// Containers whose sandbox directory the node holds.
    pub fn sandbox_dirs(&self) -> Vec<String> {
        let mut dirs: Vec<String> = std::fs::read_dir(self.state.join("node").join("sandboxes"))
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        dirs.sort();
        dirs
    }

    /// Every line of the event log of `session` in `container`'s sandbox on
    /// this node (JSONL: seq, kind, run_id, ...).
    pub fn session_log(&self, container: &str, session: &str) -> Vec<Value> {
        let path = self.state.join("node").join("sandboxes").join(container).join("sessions").join(format!("{session}.jsonl"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.lines().map(|l| serde_json::from_str(l).expect("an event log line is JSON")).collect()
    }

    pub fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }
}

impl Drop for FleetNode {
    /// The process first (while its host still exists), then whatever a
    /// node killed mid-test left: its sandboxes and its cgroup subtree. A
    /// failed test must not leave them to the next.
    fn drop(&mut self) {
        drop(self.daemon.take());
        let kill = |pid: i32| {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        };
        for dir in self.sandbox_dirs() {
            let record = std::fs::read(self.state.join("node").join("sandboxes").join(&dir).join("sandbox.json")).ok();
            let pid = record.and_then(|r| serde_json::from_slice::<Value>(&r).ok()).and_then(|v| v["pid"].as_i64());
            // Only a sandbox's PID 1 (its comm), not whoever reuses the pid.
            if let Some(pid) = pid
                && procfs::status_field(pid as u32, "Name").as_deref() == Some("agentd-sandbox")
            {
                kill(pid as i32);
            }
        }
        // Deepest first; whatever is still in them is this node's.
        let mut dirs = cgroup_dirs(&self.subtree);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                procs.lines().filter_map(|p| p.trim().parse().ok()).for_each(kill);
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Labels and capacity a node joins with.
pub struct NodeSpec<'a> {
    pub id: &'a str,
    pub labels: &'a str,
    pub memory: &'a str,
    pub cpus: &'a str,
    /// Sandbox slots (`--max-sandboxes`): [`SLOTS`] unless a test or bench
    /// needs more, which share the node's ids in smaller ranges.
    pub slots: u32,
}

impl<'a> NodeSpec<'a> {
    pub fn new(id: &'a str) -> Self {
        Self { id, labels: "", memory: "2147483648", cpus: "2", slots: SLOTS }
    }
}

pub struct Fleet {
    pub servers: Vec<ControlPlane>,
    pub nodes: Vec<FleetNode>,
    pub http: reqwest::Client,
    pub pg: TempPostgres,
    /// State directories of servers and nodes.
    dir: tempfile::TempDir,
    /// Hosts made so far for nodes (each gets its own id range).
    node_hosts: u32,
    fabric: Fabric,
}

impl Fleet {
    /// A fabric and a PostgreSQL; no process yet.
    pub async fn new() -> Self {
        let fabric = Fabric::new().expect("make the fabric (root, iproute2)");
        let pg = tokio::task::spawn_blocking(|| TempPostgres::start().expect("start postgres")).await.unwrap();
        let dir = tempfile::Builder::new().prefix("agentd-fleet-").tempdir().unwrap();
        Self { servers: Vec::new(), nodes: Vec::new(), http: reqwest::Client::new(), pg, dir, node_hosts: 0, fabric }
    }

    pub fn fabric(&self) -> &Fabric {
        &self.fabric
    }

    /// The database URL every process uses: the unix socket, which reaches
    /// the server from inside any network namespace.
    pub fn database_url(&self) -> String {
        self.pg.socket_url()
    }

    /// Starts `agentd server` in a new host, listening on the host's fabric
    /// address, with short node checks ([`CHECK_INTERVAL_MS`],
    /// [`HEARTBEAT_TIMEOUT_MS`], unless `extra` names them) and `extra`
    /// flags. Returns its index.
    pub async fn add_server(&mut self, extra: &[&str]) -> usize {
        let i = self.servers.len();
        let name = format!("cp-{i}");
        let host = self.fabric.host(&name).expect("a host for the control plane");
        let state = self.dir.path().join(&name);
        let mut cmd = host.command(agentd_bin());
        cmd.arg("server")
            .args(["--listen", &format!("{}:0", host.addr()), "--state-dir"])
            .arg(&state)
            .args(["--database-url", &self.database_url()]);
        // Short node checks, unless `extra` says otherwise.
        for (flag, value) in [("--node-check-interval-ms", CHECK_INTERVAL_MS), ("--node-heartbeat-timeout-ms", HEARTBEAT_TIMEOUT_MS)] {
            if !extra.contains(&flag) {
                cmd.args([flag, &value.to_string()]);
            }
        }
        cmd.args(extra);
        let daemon = Daemon::spawn_command(cmd);
        let line = daemon.wait_for_line("API listening").await;
        let addr: SocketAddr = line.split("listen=").nth(1).expect("listen= in the line").trim().parse().expect("an address");
        let forward = host.forward(addr).await.expect("forward to the API");
        if i == 0 {
            // The first server wrote the store's admin token into its state dir.
            self.http = super::admin_client(&state);
        }
        let api = Api { http: self.http.clone(), base: format!("http://{}", forward.addr()) };
        self.servers.push(ControlPlane { daemon, forward: Some(forward), api, url: format!("http://{addr}"), host });
        i
    }

    /// Server `i`'s API.
    pub fn api(&self, i: usize) -> &Api {
        &self.servers[i].api
    }

    /// `agentd join-token create` against the fleet's database; the token.
    pub async fn token(&self, ttl: &str) -> String {
        let mut cmd = Command::new(agentd_bin());
        cmd.args(["join-token", "create", "--database-url", &self.database_url(), "--ttl", ttl, "--description", "fleet test"]);
        let out = run_bounded(cmd, Duration::from_secs(30)).await;
        assert!(out.status.success(), "join-token create failed: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout.lines().last().expect("the token is the last line").trim().to_string()
    }

    /// Makes a node in a new host (not started): its own state dir, cgroup
    /// subtree and id range, with `spec`'s labels and capacity and `extra`
    /// flags.
    pub fn make_node(&mut self, spec: &NodeSpec<'_>, extra: &[&str]) -> FleetNode {
        let k = self.node_hosts;
        self.node_hosts += 1;
        assert!(k < 5, "at most five node hosts per fleet: their id ranges fill the test's window");
        let host = self.fabric.host(spec.id).expect("a host for the node");
        let state = self.dir.path().join(format!("node-{k}"));
        let subtree = format!("agentd-e2e-{}-fleet-{k}", std::process::id());
        let id_base = unique_id_base() + k * IDS_PER_NODE;
        assert!((1..=IDS_PER_NODE).contains(&spec.slots), "{} slots do not fit in a node's {IDS_PER_NODE} ids", spec.slots);
        let mut flags: Vec<String> = vec![
            "--state-dir".into(),
            state.display().to_string(),
            "--node-id".into(),
            spec.id.into(),
            "--cgroup-subtree".into(),
            subtree.clone(),
            "--id-base".into(),
            id_base.to_string(),
            "--id-range-size".into(),
            (IDS_PER_NODE / spec.slots).to_string(),
            "--max-sandboxes".into(),
            spec.slots.to_string(),
            "--stop-grace-ms".into(),
            "500".into(),
            "--capacity-memory".into(),
            spec.memory.into(),
            "--capacity-cpus".into(),
            spec.cpus.into(),
        ];
        if !spec.labels.is_empty() {
            flags.extend(["--labels".into(), spec.labels.into()]);
        }
        flags.extend(extra.iter().map(|s| s.to_string()));
        FleetNode { daemon: None, host, id: spec.id.to_string(), state, subtree, id_base, flags }
    }

    /// Makes a node, joins it through server 0 with a fresh token and waits
    /// until that server lists it alive. Returns its index.
    pub async fn add_node(&mut self, spec: &NodeSpec<'_>) -> usize {
        let mut node = self.make_node(spec, &[]);
        let token = self.token("10m").await;
        node.start(Some((&self.servers[0].url, &token))).await;
        self.api(0).wait_node(spec.id, "alive", Duration::from_secs(30)).await;
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The node called `id`.
    pub fn node(&mut self, id: &str) -> &mut FleetNode {
        self.nodes.iter_mut().find(|n| n.id == id).unwrap_or_else(|| panic!("no node {id} in the fleet"))
    }

    /// Logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.servers.iter().enumerate() {
            out.push_str(&format!("\n===== server {i} =====\n{}", s.daemon.log()));
        }
        for n in &self.nodes {
            out.push_str(&format!("\n===== node {} =====\n{}", n.id, n.log()));
        }
        out
    }

    /// Stops every process (servers first, then nodes, which stop their
    /// sandboxes), checks that the nodes left no cgroup, drops relays, hosts
    /// and fabric, and checks that no namespace or link is left.
    pub async fn finish(self) {
        let Fleet { servers, mut nodes, http: _, pg, dir, node_hosts: _, fabric } = self;
        let prefix = fabric.prefix().to_string();
        for mut s in servers {
            s.daemon.interrupt();
            drop(s.forward.take());
            wait_no_processes_in(&s.host).await;
            drop(s);
        }
        for n in &mut nodes {
            n.interrupt();
        }
        for n in &nodes {
            // Nothing of the node's is left: no process in its namespace (a
            // zygote, say), no sandbox process under its ids, no cgroup.
            wait_no_processes_in(&n.host).await;
            let ids = n.id_base..n.id_base + IDS_PER_NODE;
            assert_eq!(processes_with_uid(&ids), [], "processes left under node {}'s ids {ids:?}", n.id);
            wait_no_cgroups(&n.subtree).await;
        }
        drop(nodes);
        drop(fabric);
        drop(pg);
        drop(dir);
        assert_eq!(leftovers(&prefix).expect("list leftovers"), [], "namespaces or links left under {prefix}");
    }
}

/// Waits (10 s at most) until no process is left in `host`'s network
/// namespace: a namespace whose name is deleted lingers, out of sight of
/// `leftovers`, while a process holds it.
pub async fn wait_no_processes_in(host: &Host) {
    let inode = format!("net:[{}]", host.netns_inode().expect("the host's namespace"));
    let inside = || -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| procfs::namespace(*pid, "net").is_ok_and(|ns| ns == inode))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = inside();
        if left.is_empty() {
            return;
        }
        let described: Vec<String> = left.iter().map(|p| format!("{p} {:?}", procfs::status_field(*p, "Name"))).collect();
        assert!(Instant::now() < deadline, "processes left in host {}: {described:?}", host.name());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `cmd` to its end (stdout and stderr captured), for at most `within`.
pub async fn run_bounded(mut cmd: Command, within: Duration) -> Output {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn");
    drop(cmd);
    let pid = child.id();
    let waited = tokio::time::timeout(within, tokio::task::spawn_blocking(move || child.wait_with_output())).await;
    match waited {
        Ok(out) => out.unwrap().expect("wait"),
        Err(_) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            panic!("{pid} did not exit within {within:?}");
        }
    }
}
