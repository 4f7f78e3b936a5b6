//! Agent processes inside the sandbox and the ACP turns running on them.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_proto::error::status;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch};
use tonic::{Code, Status};

use super::client_methods::{self, ClientMethods};
use super::permissions::{AnswerError, Permissions, Policy};
use super::reaper::{Exit, Reaper};
use crate::sandbox::harden::Hardening;
use crate::sandbox::seccomp::compile_custom;
use crate::acp::{AcpClient, AcpError, ErrorObject, InboundHandler, Initialized, RpcConnection, RpcError};

/// How long `session/new` may take before the agent counts as hung.
const SESSION_NEW_TIMEOUT: Duration = Duration::from_secs(60);
/// Events buffered per turn before the agent is slowed down to the reader's pace.
const TURN_BUFFER: usize = 1024;

/// One event of a running turn, in the order the agent produced it.
#[derive(Debug)]
pub enum TurnEvent {
    /// `session/update` params, verbatim.
    Update(String),
    Stopped(String),
    Failed(String),
    /// An event agentd adds to the turn (permission.requested, ...).
    Event { kind: &'static str, data: String },
}

type Sinks = Mutex<HashMap<String, mpsc::Sender<TurnEvent>>>;

/// Routes each `session/update` to the turn running on its session, and
/// serves the agent's requests to its client.
struct Inbound {
    sinks: Arc<Sinks>,
    permissions: Arc<Permissions>,
    /// `fs/*` and `terminal/*`, shared with the [`Agent`] that records sessions.
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
            Some(tx) => {
                let _ = tx.send(TurnEvent::Update(params.map(|p| p.get().to_string()).unwrap_or_default())).await;
            }
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
}

pub struct StartSpec {
    pub id: String,
    pub command: String,
    pub args: Vec<String>,
    pub env: HashMap<String, String>,
    pub cwd: String,
    pub initialize_timeout: Duration,
    /// Replaces the default seccomp filter for this agent.
    pub seccomp_json: Option<String>,
}

pub struct Agent {
    pub id: String,
    /// Also the process group id: each agent leads its own group.
    pub pid: i32,
    pub initialized: Initialized,
    client: AcpClient,
    exit: watch::Receiver<Option<Exit>>,
    sinks: Arc<Sinks>,
    /// Where `new_session` records each session's directory.
    methods: Arc<ClientMethods>,
    /// Each session's permission policy and the requests waiting on clients.
    permissions: Arc<Permissions>,
}

impl Agent {
    pub fn state(&self) -> &'static str {
        if self.exit.borrow().is_some() { "exited" } else { "ready" }
    }

    /// Why the agent stopped answering. When it closed its output, its exit
    /// status (if it ends soon) says more than the closed pipe does.
    async fn describe(&self, error: AcpError) -> String {
        if !matches!(error, AcpError::Rpc(RpcError::Closed)) {
            return error.to_string();
        }
        let mut exit = self.exit.clone();
        let ended = tokio::time::timeout(Duration::from_millis(500), exit.wait_for(|e| e.is_some())).await;
        match ended {
            Ok(Ok(e)) => format!("agent exited ({})", e.expect("waited for Some")),
            _ => error.to_string(),
        }
    }

    fn signal_group(&self, signal: Signal) {
        let _ = killpg(Pid::from_raw(self.pid), signal);
    }
}

pub struct Agents {
    reaper: Arc<Reaper>,
    /// Applied to every agent between fork and exec: empty capability sets,
    /// no_new_privs, rlimits, a raised OOM score, the seccomp filter.
    hardening: Arc<Hardening>,
    table: Mutex<HashMap<String, Arc<Agent>>>,
}

fn log_stderr(id: String, stderr: std::process::ChildStderr) {
    let Ok(stderr) = tokio::process::ChildStderr::from_std(stderr) else { return };
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(agent = id, "{}", line.chars().take(2000).collect::<String>());
        }
    });
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

    /// Spawns the agent and completes `initialize`; on any failure the agent's
    /// whole process group is killed and nothing is registered.
    pub async fn start(&self, spec: StartSpec) -> Result<Arc<Agent>, Status> {
        if self.table.lock().unwrap().contains_key(&spec.id) {
            return Err(status(Code::AlreadyExists, "agent_exists", format!("agent {} already runs", spec.id)));
        }
        if let Err(e) = std::fs::create_dir_all(&spec.cwd) {
            return Err(status(Code::InvalidArgument, "bad_working_dir", format!("cannot create {}: {e}", spec.cwd)));
        }
        let mut command = std::process::Command::new(&spec.command);
        let hardening = match &spec.seccomp_json {
            None => Arc::clone(&self.hardening),
            Some(json) => {
                let program = compile_custom(json)
                    .map_err(|e| status(Code::InvalidArgument, "invalid_profile", format!("seccomp policy: {e}")))?;
                Arc::new((*self.hardening).clone().with_seccomp(Some(program)))
            }
        };
        // The agent's terminals run with its hardening and environment.
        let methods = Arc::new(ClientMethods::new(Arc::clone(&self.reaper), Arc::clone(&hardening), spec.env.clone()));
        // SAFETY: apply_in_child makes only async-signal-safe system calls and
        // allocates nothing (its contract), as a pre_exec hook must.
        unsafe { command.pre_exec(move || hardening.apply_in_child()) };
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
        log_stderr(spec.id.clone(), stderr);
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
        let initialized = match client.initialize(spec.initialize_timeout).await {
            Ok(init) => init,
            Err(e) => {
                let agent = Agent { id: spec.id, pid, initialized: Initialized { protocol_version: 0, raw: String::new() }, client, exit, sinks, methods, permissions };
                let reason = agent.describe(e).await;
                agent.signal_group(Signal::SIGKILL);
                return Err(status(Code::FailedPrecondition, "agent_init_failed", format!("initialize failed: {reason}")));
            }
        };
        let agent = Arc::new(Agent { id: spec.id.clone(), pid, initialized, client, exit, sinks, methods, permissions });
        self.table.lock().unwrap().insert(spec.id, Arc::clone(&agent));
        Ok(agent)
    }

    pub async fn new_session(&self, agent_id: &str, cwd: &str, policy: Policy) -> Result<String, Status> {
        let agent = self.get(agent_id)?;
        match agent.client.new_session(cwd, SESSION_NEW_TIMEOUT).await {
            Ok(id) => {
                agent.methods.add_session(&id, cwd);
                agent.permissions.set_policy(&id, policy);
                Ok(id)
            }
            Err(e) => Err(status(Code::FailedPrecondition, "agent_error", format!("session/new failed: {}", agent.describe(e).await))),
        }
    }

    /// Starts a turn. Its events arrive on the returned channel, ending with
    /// exactly one `Stopped` or `Failed`.
    pub fn prompt(&self, agent_id: &str, session_id: &str, prompt_json: &str) -> Result<mpsc::Receiver<TurnEvent>, Status> {
        let agent = self.get(agent_id)?;
        let prompt = RawValue::from_string(prompt_json.to_string())
            .map_err(|e| status(Code::InvalidArgument, "invalid_prompt", format!("prompt is not JSON: {e}")))?;
        let (tx, rx) = mpsc::channel(TURN_BUFFER);
        {
            let mut sinks = agent.sinks.lock().unwrap();
            if sinks.contains_key(session_id) {
                return Err(status(Code::FailedPrecondition, "run_active", "a turn is already running on this session"));
            }
            sinks.insert(session_id.to_string(), tx.clone());
        }
        let session_id = session_id.to_string();
        tokio::spawn(async move {
            let result = agent.client.prompt(&session_id, &prompt).await;
            agent.sinks.lock().unwrap().remove(&session_id);
            let last = match result {
                Ok(stop_reason) => TurnEvent::Stopped(stop_reason),
                Err(e) => TurnEvent::Failed(agent.describe(e).await),
            };
            let _ = tx.send(last).await;
        });
        Ok(rx)
    }

    pub fn cancel(&self, agent_id: &str, session_id: &str) -> Result<bool, Status> {
        let agent = self.get(agent_id)?;
        let running = agent.sinks.lock().unwrap().contains_key(session_id);
        // The spec: on cancel, every pending permission request is answered
        // `cancelled`.
        agent.permissions.cancel_session(session_id);
        if running {
            agent
                .client
                .cancel(session_id)
                .map_err(|e| status(Code::Unavailable, "agent_error", format!("session/cancel failed: {e}")))?;
        }
        Ok(running)
    }

    pub fn answer_permission(&self, agent_id: &str, request_id: &str, option_id: &str) -> Result<(), Status> {
        let agent = self.get(agent_id)?;
        agent.permissions.answer(request_id, option_id).map_err(|e| match e {
            AnswerError::Unknown(_) => status(Code::NotFound, "permission_request_not_found", e.to_string()),
            AnswerError::UnknownOption { .. } => status(Code::InvalidArgument, "unknown_option", e.to_string()),
        })
    }

    /// SIGTERM to every agent's process group, SIGKILL to what is left after `grace`.
    pub async fn stop_all(&self, grace: Duration) {
        let agents = self.list();
        for agent in &agents {
            agent.signal_group(Signal::SIGTERM);
        }
        let all_exited = futures::future::join_all(agents.iter().map(|a| {
            let mut exit = a.exit.clone();
            async move { exit.wait_for(|e| e.is_some()).await.is_ok() }
        }));
        if tokio::time::timeout(grace, all_exited).await.is_err() {
            for agent in &agents {
                agent.signal_group(Signal::SIGKILL);
            }
        }
    }
}
