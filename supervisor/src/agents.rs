//! Agents inside the sandbox, supervised across restarts, and the ACP turns
//! running on them.
//!
//! An [`Agent`] is what the node started under one id; a [`Process`] is one
//! run of its executable (its own process group, connection, terminals and
//! pending permission requests). When the process ends, its running turns
//! fail (their `session/prompt` sees the closed output) and [`supervise`]
//! starts a new one per the [`RestartPolicy`], with backoff, then reopens
//! every session: `session/resume` or `session/load` when the agent
//! advertises one, else `session/new`, whose new ACP id is kept behind the
//! session's first id, the one the node knows.
//!
//! States: `starting` (spawn, `initialize`, authentication), `ready`,
//! `running` (a turn runs), `auth_required` (the agent wants credentials
//! the plan does not give), `exited` (ended and not restarted: stopped, or
//! exit 0 under `on_failure`), `failed` (crashed past its restart budget,
//! or could not start again).

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentd_proto::common::AcpSettings;
use agentd_proto::error::status;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use super::auth::{self, AuthError};
use super::client_methods::{self, ClientMethods};
use super::permissions::{AnswerError, Permissions, Policy};
use super::reaper::{Exit, Reaper};
use super::restart::{RestartPolicy, STABLE_AFTER};
use super::stderr::StderrTail;
use agentd_acp::client::SessionSetup;
use agentd_acp::{AcpClient, AcpError, ErrorObject, InboundHandler, Initialized, RpcConnection, RpcError};
use agentd_harden::Hardening;
use agentd_harden::compile_custom;

/// How long `session/new`, `session/load`, `authenticate` and the like may
/// take before the agent counts as hung, unless the plan says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent left without sessions gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(2);
pub use super::turns::TurnEvent;
use super::turns::{Sink, Turn};

/// Updates a `session/load` replay buffers before the agent is slowed down.
const REPLAY_BUFFER: usize = 1024;

type Sinks = Mutex<HashMap<String, Sink>>;

/// Routes each `session/update` to the turn running on its session, and
/// serves the agent's requests to its client.
struct Inbound {
    sinks: Arc<Sinks>,
    permissions: Arc<Permissions>,
    /// `fs/*` and `terminal/*`, shared with the [`Process`] that records sessions.
    methods: Arc<ClientMethods>,
}

#[derive(Deserialize)]
struct UpdateTarget {
    #[serde(rename = "sessionId")]
    session_id: String,
}

impl InboundHandler for Inbound {
    async fn notification(&self, method: &str, params: Option<&RawValue>) {
        if method != "session/update" {
            tracing::debug!(method, "ignoring notification");
            return;
        }
        let Some(target) = params.and_then(|p| serde_json::from_str::<UpdateTarget>(p.get()).ok()) else {
            tracing::warn!("session/update without a sessionId");
            return;
        };
        let sink = self.sinks.lock().unwrap().get(&target.session_id).cloned();
        match sink {
            Some(sink) => sink.send(TurnEvent::Update(params.map(|p| p.get().to_string()).unwrap_or_default())).await,
            None => tracing::debug!(session = target.session_id, "update outside a turn dropped"),
        }
    }

    async fn request(&self, method: String, params: Option<Box<RawValue>>) -> Result<Value, ErrorObject> {
        match method.as_str() {
            "session/request_permission" => {
                let sinks = Arc::clone(&self.sinks);
                let turn = move |session: &str| sinks.lock().unwrap().get(session).cloned();
                self.permissions.request(params.as_ref().map(|p| p.get()), turn).await
            }
            m if client_methods::METHODS.contains(&m) => self.methods.serve(m, params.as_deref()).await,
            _ => Err(ErrorObject::method_not_found(&method)),
        }
    }

    /// Bad output the connection survived: every running turn hears of it,
    /// so a client sees why something it waited for may be missing.
    fn protocol_error(&self, reason: &str) {
        let event = agentd_proto::common::AgentProtocolError { error: reason.to_string() };
        for sink in self.sinks.lock().unwrap().values() {
            sink.send_now(TurnEvent::ProtocolError(event.clone()));
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct StartSpec {
    pub id: String,
    pub command: String,
    pub args: Vec<String>,
    pub env: HashMap<String, String>,
    pub cwd: String,
    pub initialize_timeout: Duration,
    /// Replaces the default seccomp filter for this agent.
    pub seccomp_json: Option<String>,
    pub restart: RestartPolicy,
    /// For every request but `session/prompt` (turns take as long as they take).
    pub request_timeout: Duration,
    /// The `authMethods` id to use; `None` picks by the credentials in `env`.
    pub auth_method: Option<String>,
}

impl StartSpec {
    /// Started from the same definition: everything but the id.
    pub fn same_definition(&self, other: &StartSpec) -> bool {
        StartSpec { id: String::new(), ..self.clone() } == StartSpec { id: String::new(), ..other.clone() }
    }
}

/// How a session is opened: `session/new`, or `session/load` /
/// `session/resume` of an ACP session the agent keeps.
pub struct OpenSpec {
    pub cwd: String,
    pub policy: Policy,
    /// ACP `mcpServers` (a JSON array), validated against the agent's
    /// mcpCapabilities.
    pub mcp_servers: Value,
    /// Further roots of the session's files besides `cwd`: the supervisor's
    /// `fs/*` serve them, and the agent is told of them when it advertises
    /// `sessionCapabilities.additionalDirectories`.
    pub additional_directories: Vec<String>,
    pub existing: Option<Existing>,
}

/// An ACP session the agent keeps, to open instead of a new one.
pub enum Existing {
    /// `session/load`: the agent replays its history.
    Load(String),
    /// `session/resume`: no replay.
    Resume(String),
}

impl Existing {
    fn method(&self) -> &'static str {
        match self {
            Self::Load(_) => "session/load",
            Self::Resume(_) => "session/resume",
        }
    }

    /// The capability the agent must advertise, as an `agentCapabilities` pointer.
    fn capability(&self) -> &'static str {
        match self {
            Self::Load(_) => "/loadSession",
            Self::Resume(_) => "/sessionCapabilities/resume",
        }
    }

    fn id(&self) -> &str {
        match self {
            Self::Load(id) | Self::Resume(id) => id,
        }
    }
}

/// An opened session: its ACP id and, for a load, the updates replayed.
pub struct Opened {
    pub acp_session_id: String,
    pub replay: Vec<String>,
}

/// One run of the agent's executable.
pub struct Process {
    /// Also the process group id: each agent leads its own group.
    pub pid: i32,
    pub initialized: Initialized,
    client: AcpClient,
    exit: watch::Receiver<Option<Exit>>,
    started: Instant,
    sinks: Arc<Sinks>,
    /// Where sessions record their directories.
    methods: Arc<ClientMethods>,
    /// Each session's permission policy and the requests waiting on clients.
    permissions: Arc<Permissions>,
    stderr: Arc<StderrTail>,
}

impl Process {
    /// Why the agent stopped answering. When it closed its output, its exit
    /// status (if it ends soon) and its last stderr lines say more than the
    /// closed pipe does.
    async fn describe(&self, error: AcpError) -> String {
        if !matches!(error, AcpError::Rpc(RpcError::Closed)) {
            return error.to_string();
        }
        let mut exit = self.exit.clone();
        let ended = match tokio::time::timeout(Duration::from_millis(500), exit.wait_for(|e| e.is_some())).await {
            Ok(Ok(e)) => e.expect("waited for Some").to_string(),
            _ => return error.to_string(),
        };
        match self.stderr.last_words(Duration::from_millis(200)).await {
            words if words.is_empty() => format!("agent exited ({ended})"),
            words => format!("agent exited ({ended}); its stderr ended with: {words}"),
        }
    }

    fn signal_group(&self, signal: Signal) {
        let _ = killpg(Pid::from_raw(self.pid), signal);
    }

    async fn exited(&self) -> Exit {
        let mut exit = self.exit.clone();
        match exit.wait_for(|e| e.is_some()).await {
            Ok(e) => e.expect("waited for Some"),
            // The reaper went away: the supervisor is shutting down.
            Err(_) => Exit::Signal(libc::SIGKILL),
        }
    }

    /// Authenticates with the first usable method the agent accepts.
    async fn authenticate(&self, spec: &StartSpec) -> Result<String, AuthError> {
        let methods = auth::methods(&self.initialized.raw);
        let mut refused = Vec::new();
        for id in auth::candidates(&methods, &spec.env, spec.auth_method.as_deref())? {
            match self.client.authenticate(&id, spec.request_timeout).await {
                Ok(()) => {
                    tracing::info!(agent = spec.id, method = id, "authenticated");
                    return Ok(id);
                }
                Err(e) => refused.push(format!("{id}: {}", self.describe(e).await)),
            }
        }
        Err(AuthError::Refused(refused))
    }
}

/// A session as the agent's supervision keeps it, to reopen it after a restart.
#[derive(Clone)]
struct SessionRecord {
    cwd: String,
    policy: Policy,
    /// The ACP id in the current process: the first id (the key) unless a
    /// restart had to create the session anew.
    acp_id: String,
    /// Given again when the session is reopened after a restart.
    mcp_servers: Value,
    additional_directories: Vec<String>,
    /// What `session/new` answered (modes, config options), kept current by
    /// set_mode and set_config_option.
    opened: Value,
}

impl SessionRecord {
    /// What `session/new`, `/load` and `/resume` carry: the additional
    /// directories only to an agent that advertises them (the schema's rule);
    /// the supervisor's own confinement of `fs/*` includes them either way.
    fn setup<'a>(&'a self, process: &Process) -> SessionSetup<'a> {
        let advertised = process.initialized.advertises("/sessionCapabilities/additionalDirectories");
        SessionSetup {
            cwd: &self.cwd,
            mcp_servers: &self.mcp_servers,
            additional_directories: if advertised { &self.additional_directories } else { &[] },
        }
    }
}

/// What the agent is doing, for Status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    pub state: &'static str,
    pub restarts: u32,
    pub last_error: Option<String>,
}

pub struct Agent {
    pub id: String,
    spec: StartSpec,
    status: Mutex<AgentStatus>,
    current: Mutex<Option<Arc<Process>>>,
    /// By the session's first ACP id (the one the node knows).
    sessions: Mutex<HashMap<String, SessionRecord>>,
    /// Turns running now: `ready` shows as `running` while any does.
    turns: AtomicUsize,
    /// Each session's last turn (by its first ACP id), running or ended:
    /// kept until the next one starts or the session closes, so that a node
    /// that restarted mid-turn can take it up, its end included.
    last_turns: Mutex<HashMap<String, Arc<Turn>>>,
    /// Set when the sandbox stops: an exit then is no failure.
    stopping: AtomicBool,
}

fn agent_error(code: Code, error_code: &'static str, message: impl Into<String>) -> Status {
    status(code, error_code, message)
}

impl Agent {
    pub fn status(&self) -> AgentStatus {
        let mut s = self.status.lock().unwrap().clone();
        if s.state == "ready" && self.turns.load(Ordering::Relaxed) > 0 {
            s.state = "running";
        }
        s
    }

    pub fn pid(&self) -> i32 {
        self.current.lock().unwrap().as_ref().map_or(0, |p| p.pid)
    }

    pub fn initialized(&self) -> Option<Initialized> {
        self.current.lock().unwrap().as_ref().map(|p| p.initialized.clone())
    }

    fn set_state(&self, state: &'static str, error: Option<String>) {
        let mut s = self.status.lock().unwrap();
        s.state = state;
        if error.is_some() {
            s.last_error = error;
        }
    }

    /// The current process, if the agent can take requests now.
    fn process(&self) -> Result<Arc<Process>, Status> {
        let s = self.status();
        let current = self.current.lock().unwrap().clone();
        match current {
            Some(p) if matches!(s.state, "ready" | "running" | "auth_required") => Ok(p),
            _ => {
                let why = s.last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
                let code = if matches!(s.state, "starting") { "agent_restarting" } else { "agent_unavailable" };
                Err(agent_error(Code::Unavailable, code, format!("agent {} is {}{why}", self.id, s.state)))
            }
        }
    }

    /// `session/new`, authenticating first if the agent answers
    /// `auth_required`. Returns the new ACP session id and the whole answer.
    async fn open_session(&self, process: &Process, setup: &SessionSetup<'_>) -> Result<(String, Value), Status> {
        let timeout = self.spec.request_timeout;
        let first = process.client.new_session(setup, timeout).await;
        let error = match first {
            Ok(id) => return Ok(id),
            Err(e) if e.is_auth_required() => e,
            Err(e) => return Err(agent_error(Code::FailedPrecondition, "agent_error", format!("session/new failed: {}", process.describe(e).await))),
        };
        tracing::info!(agent = self.id, %error, "agent requires authentication");
        if let Err(e) = process.authenticate(&self.spec).await {
            self.set_state("auth_required", Some(e.to_string()));
            return Err(agent_error(Code::FailedPrecondition, "agent_auth_required", e.to_string()));
        }
        match process.client.new_session(setup, timeout).await {
            Ok(id) => Ok(id),
            Err(e) if e.is_auth_required() => {
                let message = "the agent still requires authentication after authenticate succeeded".to_string();
                self.set_state("auth_required", Some(message.clone()));
                Err(agent_error(Code::FailedPrecondition, "agent_auth_required", message))
            }
            Err(e) => Err(agent_error(Code::FailedPrecondition, "agent_error", format!("session/new failed: {}", process.describe(e).await))),
        }
    }

    /// Makes `record`'s session live in `process`, which just started.
    async fn reopen(&self, process: &Process, first_id: &str, record: &mut SessionRecord) -> Result<(), Status> {
        let timeout = self.spec.request_timeout;
        if let Some(method) = process.initialized.reopen_method() {
            match process.client.reopen_session(method, &record.acp_id, &record.setup(process), timeout).await {
                Ok(_) => return Ok(()),
                Err(e) => tracing::warn!(agent = self.id, session = first_id, %e, method, "reopening failed; creating the session anew"),
            }
        }
        (record.acp_id, record.opened) = self.open_session(process, &record.setup(process)).await?;
        Ok(())
    }

    /// `session/load` or `session/resume` of an ACP session the agent keeps,
    /// authenticating first if the agent answers `auth_required`. The
    /// updates the agent replays meanwhile (a load's) are collected, in
    /// order, and returned with the answer.
    async fn open_existing(&self, process: &Process, existing: &Existing, setup: &SessionSetup<'_>) -> Result<(Value, Vec<String>), Status> {
        let (method, acp_id) = (existing.method(), existing.id());
        let (tx, mut rx) = mpsc::channel(REPLAY_BUFFER);
        {
            let mut sinks = process.sinks.lock().unwrap();
            if sinks.contains_key(acp_id) {
                return Err(status(Code::FailedPrecondition, "acp_session_open", format!("ACP session {acp_id} is already open on agent {}", self.id)));
            }
            sinks.insert(acp_id.to_string(), Sink::Collect(tx));
        }
        // Drained while the load runs: the connection's reader waits on a full sink.
        let collector = tokio::spawn(async move {
            let mut replay = Vec::new();
            while let Some(event) = rx.recv().await {
                if let TurnEvent::Update(json) = event {
                    replay.push(json);
                }
            }
            replay
        });
        let timeout = self.spec.request_timeout;
        let mut answer = process.client.reopen_session(method, acp_id, setup, timeout).await;
        if answer.as_ref().is_err_and(AcpError::is_auth_required) {
            match process.authenticate(&self.spec).await {
                Ok(_) => answer = process.client.reopen_session(method, acp_id, setup, timeout).await,
                Err(e) => {
                    self.set_state("auth_required", Some(e.to_string()));
                    process.sinks.lock().unwrap().remove(acp_id);
                    return Err(agent_error(Code::FailedPrecondition, "agent_auth_required", e.to_string()));
                }
            }
        }
        process.sinks.lock().unwrap().remove(acp_id);
        let replay = collector.await.unwrap_or_default();
        match answer {
            Ok(answer) => Ok((answer, replay)),
            Err(AcpError::Rpc(RpcError::Remote(e))) if e.code == client_methods::RESOURCE_NOT_FOUND || e.code == client_methods::INVALID_PARAMS => {
                Err(status(Code::NotFound, "acp_session_not_found", format!("the agent has no session {acp_id} to open with {method}: {}", e.message)))
            }
            Err(e) => Err(agent_error(Code::FailedPrecondition, "agent_error", format!("{method} failed: {}", process.describe(e).await))),
        }
    }

    /// Refuses `mcpServers` the agent cannot take: http and sse servers need
    /// its mcpCapabilities (stdio every agent supports).
    fn check_mcp_servers(&self, process: &Process, servers: &Value) -> Result<(), Status> {
        let invalid = |m: String| status(Code::InvalidArgument, "invalid_mcp_server", m);
        let Some(servers) = servers.as_array() else { return Err(invalid("mcpServers must be an array".into())) };
        for server in servers {
            let kind = server.get("type").and_then(Value::as_str).unwrap_or("stdio");
            let advertised = match kind {
                "stdio" => true,
                "http" | "sse" => process.initialized.advertises(&format!("/mcpCapabilities/{kind}")),
                other => return Err(invalid(format!("unknown MCP server type {other:?}"))),
            };
            if !advertised {
                let name = server.get("name").and_then(Value::as_str).unwrap_or_default();
                return Err(status(
                    Code::InvalidArgument,
                    "mcp_unsupported",
                    format!("MCP server {name:?} is {kind}, which the agent does not support (its mcpCapabilities do not advertise {kind})"),
                ));
            }
        }
        Ok(())
    }

    /// A request on a session; the agent's invalid-params answer is the
    /// caller's fault (422), anything else the agent's (502).
    async fn call(&self, process: &Process, method: &str, params: &Value) -> Result<Value, Status> {
        match process.client.call(method, params, self.spec.request_timeout).await {
            Ok(answer) => Ok(answer),
            Err(AcpError::Rpc(RpcError::Remote(e))) if e.code == client_methods::INVALID_PARAMS => {
                Err(status(Code::InvalidArgument, "invalid_request", format!("{method}: the agent refused: {}", e.detail().map_or(e.message.clone(), |d| format!("{} ({d})", e.message)))))
            }
            Err(e) => Err(status(Code::FailedPrecondition, "agent_error", format!("{method} failed: {}", process.describe(e).await))),
        }
    }

    /// The session's modes and config options as the agent last reported them.
    pub fn session_settings(&self, session_id: &str) -> AcpSettings {
        self.settings_of(session_id)
    }

    /// Every session's settings, by its first ACP id.
    pub fn all_session_settings(&self) -> HashMap<String, AcpSettings> {
        let ids: Vec<String> = self.sessions.lock().unwrap().keys().cloned().collect();
        ids.into_iter().map(|id| (id.clone(), self.settings_of(&id))).collect()
    }

    /// The session's modes and config options as its agent last announced
    /// them, verbatim; empty where it announced none.
    fn settings_of(&self, session_id: &str) -> AcpSettings {
        let opened = self.sessions.lock().unwrap().get(session_id).map(|r| r.opened.clone()).unwrap_or_default();
        let raw = |key: &str| opened.get(key).filter(|v| !v.is_null()).map(Value::to_string).unwrap_or_default();
        AcpSettings { acp_modes: raw("modes"), acp_config_options: raw("configOptions") }
    }

    fn record_in(process: &Process, record: &SessionRecord) {
        process.methods.add_session(&record.acp_id, &record.cwd, &record.additional_directories);
        process.permissions.set_policy(&record.acp_id, record.policy);
    }
}

pub struct Agents {
    reaper: Arc<Reaper>,
    /// Applied to every agent between fork and exec: empty capability sets,
    /// no_new_privs, rlimits, a raised OOM score, the seccomp filter.
    hardening: Arc<Hardening>,
    table: Mutex<HashMap<String, Arc<Agent>>>,
}

impl Agents {
    pub fn new(reaper: Arc<Reaper>, hardening: Hardening) -> Self {
        Self { reaper, hardening: Arc::new(hardening), table: Mutex::default() }
    }

    pub fn get(&self, id: &str) -> Result<Arc<Agent>, Status> {
        self.table
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NotFound, "agent_not_found", format!("no agent {id} in this sandbox")))
    }

    pub fn list(&self) -> Vec<Arc<Agent>> {
        self.table.lock().unwrap().values().cloned().collect()
    }

    /// Spawns the agent and completes `initialize` (and `authenticate`, when
    /// the plan names a method); on any failure the agent's whole process
    /// group is killed and nothing is registered. Once registered, the agent
    /// is supervised: restarted per its policy when it ends.
    pub async fn start(self: &Arc<Self>, spec: StartSpec, reuse: bool) -> Result<Arc<Agent>, Status> {
        if reuse && let Some(agent) = self.running_like(&spec) {
            tracing::info!(agent = agent.id, asked = spec.id, "reusing the agent started from the same definition");
            return Ok(agent);
        }
        if self.table.lock().unwrap().contains_key(&spec.id) {
            return Err(status(Code::AlreadyExists, "agent_exists", format!("agent {} already runs", spec.id)));
        }
        if let Err(e) = std::fs::create_dir_all(&spec.cwd) {
            return Err(status(Code::InvalidArgument, "bad_working_dir", format!("cannot create {}: {e}", spec.cwd)));
        }
        let hardening = match &spec.seccomp_json {
            None => Arc::clone(&self.hardening),
            Some(json) => {
                let program = compile_custom(json)
                    .map_err(|e| status(Code::InvalidArgument, "invalid_profile", format!("seccomp policy: {e}")))?;
                Arc::new((*self.hardening).clone().with_seccomp(Some(program)))
            }
        };
        let process = self.launch(&spec, &hardening).await?;
        let agent = Arc::new(Agent {
            id: spec.id.clone(),
            spec,
            status: Mutex::new(AgentStatus { state: "ready", restarts: 0, last_error: None }),
            current: Mutex::new(Some(process)),
            sessions: Mutex::default(),
            turns: AtomicUsize::new(0),
            last_turns: Mutex::default(),
            stopping: AtomicBool::new(false),
        });
        {
            let mut table = self.table.lock().unwrap();
            if table.contains_key(&agent.id) {
                drop(table);
                agent.current.lock().unwrap().as_ref().expect("just set").signal_group(Signal::SIGKILL);
                return Err(status(Code::AlreadyExists, "agent_exists", format!("agent {} already runs", agent.id)));
            }
            table.insert(agent.id.clone(), Arc::clone(&agent));
        }
        tokio::spawn(supervise(Arc::clone(self), Arc::clone(&agent), hardening));
        Ok(agent)
    }

    /// An agent started from `spec`'s definition that can take sessions
    /// (asked for under its own id, it is the same agent again).
    fn running_like(&self, spec: &StartSpec) -> Option<Arc<Agent>> {
        let table = self.table.lock().unwrap();
        let usable = |a: &Arc<Agent>| !a.stopping.load(Ordering::Relaxed) && matches!(a.status().state, "ready" | "running" | "auth_required");
        if let Some(a) = table.get(&spec.id) {
            return (a.spec.same_definition(spec) && usable(a)).then(|| Arc::clone(a));
        }
        let mut like: Vec<&Arc<Agent>> = table.values().filter(|a| a.spec.same_definition(spec) && usable(a)).collect();
        like.sort_by(|a, b| a.id.cmp(&b.id));
        like.first().map(|a| Arc::clone(a))
    }

    /// One run of the agent: spawn, `initialize`, and `authenticate` when the
    /// plan names a method.
    async fn launch(&self, spec: &StartSpec, hardening: &Arc<Hardening>) -> Result<Arc<Process>, Status> {
        let mut command = std::process::Command::new(&spec.command);
        // The agent's terminals run with its hardening and environment.
        let methods = Arc::new(ClientMethods::new(Arc::clone(&self.reaper), Arc::clone(hardening), spec.env.clone()));
        let child_hardening = Arc::clone(hardening);
        // SAFETY: apply_in_child makes only async-signal-safe system calls and
        // allocates nothing (its contract), as a pre_exec hook must.
        unsafe { command.pre_exec(move || child_hardening.apply_in_child()) };
        let mut child = command
            .args(&spec.args)
            .env_clear()
            .envs(&spec.env)
            .current_dir(&spec.cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => status(
                    Code::FailedPrecondition,
                    "agent_executable_not_found",
                    format!("agent executable {} not found in the sandbox", spec.command),
                ),
                _ => status(Code::FailedPrecondition, "agent_spawn_failed", format!("cannot start {}: {e}", spec.command)),
            })?;
        let pid = child.id() as i32;
        let exit = self.reaper.watch(pid);
        // Terminals die with their agent.
        tokio::spawn({
            let methods = Arc::clone(&methods);
            let mut exit = exit.clone();
            async move {
                let _ = exit.wait_for(|e| e.is_some()).await;
                methods.release_all();
            }
        });
        let io = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(stderr)) = io else { unreachable!("all three are piped") };
        let stderr = StderrTail::follow(spec.id.clone(), stderr);
        let (stdin, stdout) = match (tokio::process::ChildStdin::from_std(stdin), tokio::process::ChildStdout::from_std(stdout)) {
            (Ok(i), Ok(o)) => (i, o),
            _ => {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(status(Code::Internal, "agent_spawn_failed", "cannot register agent pipes"));
            }
        };
        let sinks: Arc<Sinks> = Arc::default();
        let permissions: Arc<Permissions> = Arc::default();
        let inbound = Inbound { sinks: Arc::clone(&sinks), permissions: Arc::clone(&permissions), methods: Arc::clone(&methods) };
        let client = AcpClient::new(RpcConnection::start(stdout, stdin, inbound));
        let mut process = Process {
            pid,
            initialized: Initialized { protocol_version: 0, raw: String::new() },
            client,
            exit,
            started: Instant::now(),
            sinks,
            methods,
            permissions,
            stderr,
        };
        match process.client.initialize(spec.initialize_timeout).await {
            Ok(init) => process.initialized = init,
            Err(e) => {
                let reason = process.describe(e).await;
                process.signal_group(Signal::SIGKILL);
                return Err(status(Code::FailedPrecondition, "agent_init_failed", format!("initialize failed: {reason}")));
            }
        }
        if spec.auth_method.is_some()
            && let Err(e) = process.authenticate(spec).await
        {
            process.signal_group(Signal::SIGKILL);
            return Err(status(Code::FailedPrecondition, "agent_auth_required", e.to_string()));
        }
        Ok(Arc::new(process))
    }

    /// Opens an ACP session; its id is how the node names it from then on,
    /// across restarts of the agent.
    pub async fn new_session(&self, agent_id: &str, open: OpenSpec) -> Result<Opened, Status> {
        let agent = self.get(agent_id)?;
        let process = agent.process()?;
        agent.check_mcp_servers(&process, &open.mcp_servers)?;
        if let Some(existing) = &open.existing {
            // Before any directory is made: a refusal leaves nothing behind.
            if !process.initialized.advertises(existing.capability()) {
                let capability = existing.capability().trim_start_matches('/').replace('/', ".");
                return Err(status(Code::FailedPrecondition, "not_supported", format!("the agent does not advertise {capability}: no {}", existing.method())));
            }
            let id = existing.id();
            if agent.sessions.lock().unwrap().values().any(|r| r.acp_id == id) {
                return Err(status(Code::FailedPrecondition, "acp_session_open", format!("ACP session {id} is already open on agent {agent_id}")));
            }
        }
        for dir in &open.additional_directories {
            std::fs::create_dir_all(dir).map_err(|e| {
                status(Code::InvalidArgument, "invalid_additional_directory", format!("cannot create additional directory {dir} in the sandbox: {e}"))
            })?;
        }
        let record = SessionRecord {
            cwd: open.cwd,
            policy: open.policy,
            acp_id: String::new(),
            mcp_servers: open.mcp_servers,
            additional_directories: open.additional_directories,
            opened: Value::Null,
        };
        let setup = record.setup(&process);
        let (id, opened, replay) = match &open.existing {
            None => {
                let (id, opened) = agent.open_session(&process, &setup).await?;
                (id, opened, Vec::new())
            }
            Some(existing) => {
                let (answer, replay) = agent.open_existing(&process, existing, &setup).await?;
                (existing.id().to_string(), answer, replay)
            }
        };
        let record = SessionRecord { acp_id: id.clone(), opened, ..record };
        Agent::record_in(&process, &record);
        agent.sessions.lock().unwrap().insert(id.clone(), record);
        // A session opened after authenticating clears auth_required.
        let mut s = agent.status.lock().unwrap();
        if s.state == "auth_required" {
            s.state = "ready";
        }
        Ok(Opened { acp_session_id: id, replay })
    }

    /// Closes a session: `session/close` when the agent advertises it (a
    /// turn still running is cancelled first either way), then forgets it.
    /// An agent left without sessions is stopped and forgotten too. An empty
    /// `session_id` only does the latter. Returns (closed by the agent,
    /// agent stopped).
    pub async fn close_session(&self, agent_id: &str, session_id: &str) -> Result<(bool, bool), Status> {
        let agent = self.get(agent_id)?;
        let mut closed_by_agent = false;
        let record = if session_id.is_empty() { None } else { agent.sessions.lock().unwrap().remove(session_id) };
        agent.last_turns.lock().unwrap().remove(session_id);
        if let (Some(record), Ok(process)) = (record, agent.process()) {
            let acp_id = record.acp_id;
            process.permissions.cancel_session(&acp_id);
            if process.sinks.lock().unwrap().contains_key(&acp_id) {
                let _ = process.client.cancel(&acp_id);
            }
            if process.initialized.advertises("/sessionCapabilities/close") {
                let params = serde_json::json!({"sessionId": acp_id});
                match process.client.call("session/close", &params, agent.spec.request_timeout).await {
                    Ok(_) => closed_by_agent = true,
                    Err(e) => tracing::warn!(agent = agent_id, session = acp_id, error = %e, "session/close failed; forgetting the session anyway"),
                }
            }
        }
        if !agent.sessions.lock().unwrap().is_empty() {
            return Ok((closed_by_agent, false));
        }
        self.stop(&agent, STOP_GRACE).await;
        self.table.lock().unwrap().remove(agent_id);
        tracing::info!(agent = agent_id, "agent stopped: no session left");
        Ok((closed_by_agent, true))
    }

    /// `session/list`, when the agent advertises it: its answer as sent.
    pub async fn list_sessions(&self, agent_id: &str, cwd: &str, cursor: &str) -> Result<Value, Status> {
        let agent = self.get(agent_id)?;
        let process = agent.process()?;
        if !process.initialized.advertises("/sessionCapabilities/list") {
            return Err(status(Code::FailedPrecondition, "not_supported", format!("agent {agent_id} does not advertise session/list")));
        }
        let mut params = serde_json::json!({});
        if !cwd.is_empty() {
            params["cwd"] = cwd.into();
        }
        if !cursor.is_empty() {
            params["cursor"] = cursor.into();
        }
        agent.call(&process, "session/list", &params).await
    }

    /// SIGTERM to the agent's process group, SIGKILL after `grace`; it is
    /// not restarted.
    async fn stop(&self, agent: &Agent, grace: Duration) {
        agent.stopping.store(true, Ordering::Relaxed);
        let Some(process) = agent.current.lock().unwrap().clone() else { return };
        process.signal_group(Signal::SIGTERM);
        if tokio::time::timeout(grace, process.exited()).await.is_err() {
            process.signal_group(Signal::SIGKILL);
        }
    }

    /// The current process and the session's ACP id in it.
    fn session_target(&self, agent_id: &str, session_id: &str) -> Result<(Arc<Agent>, Arc<Process>, String), Status> {
        let agent = self.get(agent_id)?;
        let process = agent.process()?;
        let acp_id = agent.sessions.lock().unwrap().get(session_id).map(|r| r.acp_id.clone());
        let acp_id = acp_id.ok_or_else(|| status(Code::NotFound, "session_not_found", format!("agent {agent_id} has no session {session_id}")))?;
        Ok((agent, process, acp_id))
    }

    /// Starts a turn named `turn_id` (the node's run id). Its events are
    /// kept in the returned [`Turn`], ending with exactly one `Stopped` or
    /// `Failed`, whoever reads them and whenever: a node that goes away
    /// leaves the turn running ([`Self::attach`] takes it up again).
    pub fn prompt(&self, agent_id: &str, session_id: &str, prompt_json: &str, turn_id: &str) -> Result<Arc<Turn>, Status> {
        let (agent, process, acp_id) = self.session_target(agent_id, session_id)?;
        let prompt = RawValue::from_string(prompt_json.to_string())
            .map_err(|e| status(Code::InvalidArgument, "invalid_prompt", format!("prompt is not JSON: {e}")))?;
        check_blocks(&process.initialized, &prompt)?;
        let turn = Turn::new(turn_id.to_string());
        {
            let mut sinks = process.sinks.lock().unwrap();
            if sinks.contains_key(&acp_id) {
                return Err(status(Code::FailedPrecondition, "run_active", "a turn is already running on this session"));
            }
            sinks.insert(acp_id.clone(), Sink::Turn(Arc::clone(&turn)));
        }
        agent.last_turns.lock().unwrap().insert(session_id.to_string(), Arc::clone(&turn));
        agent.turns.fetch_add(1, Ordering::Relaxed);
        tracing::info!(agent = agent.id, acp_session_id = acp_id, "turn started");
        let running = Arc::clone(&turn);
        // Carried: the turn's log lines keep the prompt's trace id.
        tokio::spawn(agentd_proto::trace::carry(async move {
            let mut result = process.client.prompt(&acp_id, &prompt).await;
            // A credential that expired mid-session: authenticate again and
            // resend (the agent refused the prompt, so it did none of it).
            if result.as_ref().is_err_and(AcpError::is_auth_required) {
                match process.authenticate(&agent.spec).await {
                    Ok(_) => result = process.client.prompt(&acp_id, &prompt).await,
                    Err(e) => agent.set_state("auth_required", Some(e.to_string())),
                }
            }
            process.sinks.lock().unwrap().remove(&acp_id);
            agent.turns.fetch_sub(1, Ordering::Relaxed);
            let last = match result {
                Ok(stop_reason) => TurnEvent::Stopped(stop_reason),
                Err(e @ AcpError::Rpc(RpcError::Closed)) => {
                    let why = process.describe(e).await;
                    let next = if agent.stopping.load(Ordering::Relaxed) { "the sandbox is stopping" } else { "it is restarted per its policy" };
                    TurnEvent::Failed(format!("the agent ended during the turn: {why}; {next}"))
                }
                Err(e) if e.is_auth_required() => {
                    let why = agent.status().last_error.unwrap_or_default();
                    TurnEvent::Failed(format!("the agent requires authentication again and agentd cannot give it: {why}"))
                }
                Err(e) => TurnEvent::Failed(process.describe(e).await),
            };
            match &last {
                TurnEvent::Stopped(reason) => tracing::info!(agent = agent.id, acp_session_id = acp_id, stop_reason = reason, "turn ended"),
                other => tracing::info!(agent = agent.id, acp_session_id = acp_id, outcome = ?other, "turn ended"),
            }
            running.finish(last);
        }));
        Ok(turn)
    }

    /// The session's last turn, if it is `turn_id`: for a node that lost its
    /// stream (it restarted) to read on from where its log ends.
    pub fn attach(&self, agent_id: &str, session_id: &str, turn_id: &str) -> Result<Arc<Turn>, Status> {
        let agent = self.get(agent_id)?;
        let turn = agent.last_turns.lock().unwrap().get(session_id).cloned();
        match turn {
            Some(turn) if turn.id == turn_id => Ok(turn),
            Some(turn) => Err(status(
                Code::NotFound,
                "turn_not_found",
                format!("session {session_id}'s last turn is {:?}, not {turn_id:?}: the agent never got that prompt", turn.id),
            )),
            None => Err(status(Code::NotFound, "turn_not_found", format!("session {session_id} has had no turn here: the agent never got the prompt of {turn_id:?}"))),
        }
    }

    pub fn cancel(&self, agent_id: &str, session_id: &str) -> Result<bool, Status> {
        let (_, process, acp_id) = self.session_target(agent_id, session_id)?;
        let running = process.sinks.lock().unwrap().contains_key(&acp_id);
        // The spec: on cancel, every pending permission request is answered
        // `cancelled`.
        process.permissions.cancel_session(&acp_id);
        if running {
            process
                .client
                .cancel(&acp_id)
                .map_err(|e| status(Code::Unavailable, "agent_error", format!("session/cancel failed: {e}")))?;
        }
        Ok(running)
    }

    /// `session/set_mode`, when the session advertised modes and `mode_id` is one.
    pub async fn set_mode(&self, agent_id: &str, session_id: &str, mode_id: &str) -> Result<Value, Status> {
        let (agent, process, acp_id) = self.session_target(agent_id, session_id)?;
        let opened = agent.sessions.lock().unwrap().get(session_id).map(|r| r.opened.clone()).unwrap_or_default();
        let Some(modes) = opened.pointer("/modes/availableModes").and_then(Value::as_array) else {
            return Err(status(Code::FailedPrecondition, "not_supported", "the agent advertises no modes for this session"));
        };
        let ids: Vec<&str> = modes.iter().filter_map(|m| m["id"].as_str()).collect();
        if !ids.contains(&mode_id) {
            return Err(status(Code::InvalidArgument, "unknown_mode", format!("mode {mode_id:?} is not one of the session's modes {ids:?}")));
        }
        let params = serde_json::json!({"sessionId": acp_id, "modeId": mode_id});
        let answer = agent.call(&process, "session/set_mode", &params).await?;
        if let Some(r) = agent.sessions.lock().unwrap().get_mut(session_id) {
            r.opened["modes"]["currentModeId"] = Value::String(mode_id.to_string());
        }
        Ok(answer)
    }

    /// `session/set_config_option`, when the session advertised the option.
    /// `value` is a string (an option id) or a boolean.
    pub async fn set_config_option(&self, agent_id: &str, session_id: &str, config_id: &str, value: Value) -> Result<Value, Status> {
        let (agent, process, acp_id) = self.session_target(agent_id, session_id)?;
        let opened = agent.sessions.lock().unwrap().get(session_id).map(|r| r.opened.clone()).unwrap_or_default();
        let Some(options) = opened.get("configOptions").and_then(Value::as_array) else {
            return Err(status(Code::FailedPrecondition, "not_supported", "the agent advertises no config options for this session"));
        };
        let ids: Vec<&str> = options.iter().filter_map(|o| o["id"].as_str()).collect();
        if !ids.contains(&config_id) {
            return Err(status(Code::InvalidArgument, "unknown_config_option", format!("config option {config_id:?} is not one of {ids:?}")));
        }
        let mut params = serde_json::json!({"sessionId": acp_id, "configId": config_id, "value": value});
        match value {
            Value::Bool(_) => params["type"] = "boolean".into(),
            Value::String(_) => {}
            other => return Err(status(Code::InvalidArgument, "invalid_request", format!("a config value is a string or a boolean, not {other}"))),
        }
        let answer = agent.call(&process, "session/set_config_option", &params).await?;
        if let Some(options) = answer.get("configOptions")
            && let Some(r) = agent.sessions.lock().unwrap().get_mut(session_id)
        {
            r.opened["configOptions"] = options.clone();
        }
        Ok(answer)
    }

    pub fn answer_permission(&self, agent_id: &str, request_id: &str, option_id: &str) -> Result<(), Status> {
        let process = self.get(agent_id)?.process()?;
        process.permissions.answer(request_id, option_id).map_err(|e| match e {
            AnswerError::Unknown(_) => status(Code::NotFound, "permission_request_not_found", e.to_string()),
            AnswerError::UnknownOption { .. } => status(Code::InvalidArgument, "unknown_option", e.to_string()),
        })
    }

    /// SIGTERM to every agent's process group, SIGKILL to the groups still
    /// there after `grace`. Returns how each agent ended; agents whose
    /// process had already ended are left out.
    pub async fn stop_all(&self, grace: Duration) -> Vec<Stopped> {
        let agents = self.list();
        let processes: Vec<(String, Arc<Process>)> = agents
            .iter()
            .filter_map(|a| {
                a.stopping.store(true, Ordering::Relaxed);
                let process = a.current.lock().unwrap().clone()?;
                // Signalling a group whose leader was reaped could hit a
                // later group that reused the id.
                let running = process.exit.borrow().is_none();
                running.then(|| (a.id.clone(), process))
            })
            .collect();
        let started = tokio::time::Instant::now();
        for (_, p) in &processes {
            p.signal_group(Signal::SIGTERM);
        }
        let stops = processes.into_iter().map(|(id, p)| async move {
            let in_grace = tokio::time::timeout_at(started + grace, p.exited()).await.ok();
            let killed = in_grace.is_none();
            let exit = match in_grace {
                Some(exit) => Some(exit),
                None => {
                    p.signal_group(Signal::SIGKILL);
                    tokio::time::timeout(KILL_WAIT, p.exited()).await.ok()
                }
            };
            let stopped = Stopped {
                agent_id: id,
                pid: p.pid,
                exit,
                after: started.elapsed(),
                killed,
                stderr_tail: p.stderr.last_words(Duration::from_millis(200)).await,
            };
            tracing::info!(agent = stopped.agent_id, pid = stopped.pid, exit = ?stopped.exit, after_ms = stopped.after.as_millis() as u64, killed, "agent stopped with the sandbox");
            stopped
        });
        futures::future::join_all(stops).await
    }
}

/// How long an agent's group gets to disappear after SIGKILL before a stop
/// reports it as not ended (only a process stuck in the kernel takes longer).
const KILL_WAIT: Duration = Duration::from_secs(1);

/// How one agent ended when the sandbox stopped ([`Agents::stop_all`]).
#[derive(Debug, Clone)]
pub struct Stopped {
    pub agent_id: String,
    pub pid: i32,
    /// `None`: still there after SIGKILL and [`KILL_WAIT`].
    pub exit: Option<Exit>,
    /// From SIGTERM to the exit (or to giving up on it).
    pub after: Duration,
    /// The grace ran out and the group was SIGKILLed.
    pub killed: bool,
    /// The agent's last stderr lines: its own account of the stop.
    pub stderr_tail: String,
}

/// Refuses content blocks the agent did not advertise (ACP: image, audio
/// and embedded resources need promptCapabilities), naming the first one.
fn check_blocks(initialized: &Initialized, prompt: &RawValue) -> Result<(), Status> {
    #[derive(Deserialize)]
    struct Block {
        #[serde(rename = "type")]
        kind: String,
    }
    let blocks: Vec<Block> = serde_json::from_str(prompt.get())
        .map_err(|e| status(Code::InvalidArgument, "invalid_prompt", format!("prompt must be an array of ACP content blocks: {e}")))?;
    match blocks.iter().find(|b| !initialized.accepts_block(&b.kind)) {
        None => Ok(()),
        Some(b) if matches!(b.kind.as_str(), "image" | "audio" | "resource") => Err(status(
            Code::InvalidArgument,
            "unsupported_content",
            format!("the agent does not accept {:?} content blocks (its promptCapabilities do not advertise them)", b.kind),
        )),
        Some(b) => Err(status(Code::InvalidArgument, "unsupported_content", format!("unknown content block type {:?}", b.kind))),
    }
}

/// Watches the agent's process and starts it again when it ends, per the
/// policy, until the sandbox stops or the restart budget is spent.
async fn supervise(agents: Arc<Agents>, agent: Arc<Agent>, hardening: Arc<Hardening>) {
    let policy = agent.spec.restart;
    let mut in_a_row = 0u32;
    loop {
        let Some(process) = agent.current.lock().unwrap().clone() else { return };
        let exit = process.exited().await;
        // Whatever is left of its group (an npm launcher's native child) goes too.
        process.signal_group(Signal::SIGKILL);
        if agent.stopping.load(Ordering::Relaxed) {
            agent.set_state("exited", None);
            return;
        }
        let error = format!("agent exited ({exit})");
        tracing::warn!(agent = agent.id, %exit, "agent ended");
        if !policy.wants_restart(exit) {
            let state = if exit == Exit::Code(0) { "exited" } else { "failed" };
            agent.set_state(state, Some(error));
            return;
        }
        if process.started.elapsed() >= STABLE_AFTER {
            in_a_row = 0;
        }
        agent.set_state("starting", Some(error));
        loop {
            in_a_row += 1;
            if in_a_row > policy.max_restarts {
                let error = format!("gave up after {} restarts in a row", policy.max_restarts);
                tracing::error!(agent = agent.id, "{error}");
                agent.set_state("failed", Some(error));
                return;
            }
            tokio::time::sleep(policy.delay(in_a_row)).await;
            if agent.stopping.load(Ordering::Relaxed) {
                agent.set_state("exited", None);
                return;
            }
            agent.status.lock().unwrap().restarts += 1;
            match restart(&agents, &agent, &hardening).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(agent = agent.id, error = e.message(), "restart failed");
                    agent.set_state("starting", Some(e.message().to_string()));
                }
            }
        }
    }
}

/// Starts a new process and reopens every session in it.
async fn restart(agents: &Agents, agent: &Arc<Agent>, hardening: &Arc<Hardening>) -> Result<(), Status> {
    let process = agents.launch(&agent.spec, hardening).await?;
    let sessions: Vec<(String, SessionRecord)> = agent.sessions.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut reopened = Vec::new();
    for (first_id, mut record) in sessions {
        if let Err(e) = agent.reopen(&process, &first_id, &mut record).await {
            process.signal_group(Signal::SIGKILL);
            return Err(e);
        }
        Agent::record_in(&process, &record);
        reopened.push((first_id, record));
    }
    agent.sessions.lock().unwrap().extend(reopened);
    tracing::info!(agent = agent.id, pid = process.pid, "agent restarted");
    *agent.current.lock().unwrap() = Some(process);
    if agent.stopping.load(Ordering::Relaxed) {
        // stop_all ran while this process started: it was not signalled.
        if let Some(p) = agent.current.lock().unwrap().as_ref() {
            p.signal_group(Signal::SIGKILL);
        }
    }
    agent.set_state("ready", None);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str, args: &[&str]) -> StartSpec {
        StartSpec {
            id: id.into(),
            command: "/usr/bin/agent".into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: HashMap::from([("HOME".into(), "/workspace".into())]),
            cwd: "/workspace".into(),
            initialize_timeout: Duration::from_secs(30),
            seccomp_json: None,
            restart: RestartPolicy::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            auth_method: None,
        }
    }

    #[test]
    fn agents_of_one_definition_differ_only_by_id() {
        assert!(spec("agi_1", &["--x"]).same_definition(&spec("agi_2", &["--x"])));
        assert!(!spec("agi_1", &["--x"]).same_definition(&spec("agi_1", &["--y"])));
        let mut other_env = spec("agi_2", &["--x"]);
        other_env.env.insert("TOKEN".into(), "t".into());
        assert!(!spec("agi_1", &["--x"]).same_definition(&other_env), "credentials are part of the definition");
        let mut other_policy = spec("agi_2", &["--x"]);
        other_policy.restart = RestartPolicy::new(agentd_proto::common::RestartPolicy::Never, 0, 0);
        assert!(!spec("agi_1", &["--x"]).same_definition(&other_policy));
    }
}
