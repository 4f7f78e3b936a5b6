//! The ACP side of the echo agent: `initialize`, `session/new`,
//! `session/prompt` and `session/cancel`, served through the SDK's v1
//! connection layer. A prompt that is one of the [`crate::commands`] calls
//! the client's file-system or terminal methods instead of echoing
//! ([`crate::tools`]).
//!
//! The SDK runs `on_receive_*` handlers one at a time on its dispatch loop, so
//! a handler that waited for a slow turn would also hold back the
//! `session/cancel` meant to stop it. Handlers therefore only validate and
//! record state; each turn streams from a task spawned on the connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use agent_client_protocol::v1::{ConnectionTo, Responder};
use agent_client_protocol::{
    Agent, Client, ConnectTo, Error, ErrorCode, RequestCancellation, on_receive_notification,
    on_receive_request,
};
use agent_client_protocol_schema::ProtocolVersion;
use agent_client_protocol_schema::v1::{
    AgentCapabilities, AuthMethod, AuthMethodAgent, AuthenticateRequest, AuthenticateResponse,
    CancelNotification, CloseSessionRequest, CloseSessionResponse, ListSessionsRequest,
    ListSessionsResponse, McpCapabilities, McpServer, ResumeSessionRequest, ResumeSessionResponse,
    SessionAdditionalDirectoriesCapabilities, SessionCapabilities, SessionResumeCapabilities,
    SessionCloseCapabilities, SessionInfo, SessionListCapabilities, ClientCapabilities, ContentBlock, ContentChunk, Implementation,
    InitializeRequest, InitializeResponse, LoadSessionRequest, LoadSessionResponse,
    NewSessionRequest, NewSessionResponse, PromptCapabilities, PromptRequest, PromptResponse,
    SessionConfigOption, SessionConfigOptionValue, SessionConfigSelectOption, SessionId,
    SessionMode, SessionModeState, SessionNotification, SessionUpdate, SetSessionConfigOptionRequest,
    SetSessionConfigOptionResponse, SetSessionModeRequest, SetSessionModeResponse, StopReason,
    TextContent, ToolCallId,
};
use tokio::sync::watch;

use crate::chunking::{self, Chunking};
use crate::cli::{FailInitialize, McpKind, PromptKind, SessionCap};
use crate::history::{History, Record};
use crate::commands::{self, Emit};
use crate::stdio::StdoutLines;
use crate::tools::Tools;

/// What `--fail-initialize garbage` writes in place of a response: clearly not
/// JSON, so a client must treat it as a framing error rather than misparse it.
pub const GARBAGE_LINE: &str = "echo-agent: this line is deliberately not JSON";

/// The exit status of `--fail-initialize exit`, distinct from the 1 of an
/// ordinary failure so tests can tell an injected crash from a real one.
pub const FAIL_EXIT_CODE: i32 = 3;

/// How many chunks a turn without `--delay-ms` sends between yields. Turn
/// tasks run inside the connection's task, next to the dispatch loop and the
/// outgoing writer, so a turn that never yielded would hold back both (and a
/// `session/cancel` with them) until it ended. Yielding after every chunk
/// would instead re-poll the whole connection per chunk, which halved
/// throughput in measurements.
const YIELD_EVERY: usize = 32;

/// The variable whose value `--require-auth`'s `echo-agent-token` method checks.
pub const TOKEN_VAR: &str = "ECHO_AGENT_TOKEN";

/// How the agent behaves, as set on the command line.
#[derive(Debug, Clone)]
pub struct Config {
    pub chunking: Chunking,
    pub delay: Duration,
    pub repeat: usize,
    pub hog_mib: usize,
    pub fail_initialize: Option<FailInitialize>,
    pub require_auth: bool,
    pub load_session: bool,
    pub hang_session_new: bool,
    pub prompt_capabilities: Vec<PromptKind>,
    pub session_capabilities: Vec<SessionCap>,
    pub mcp_capabilities: Vec<McpKind>,
}

/// Memory `--hog-mib` holds on to, so each turn grows the agent further.
static HOGGED: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

fn hog(mib: usize) {
    let mut hogged = HOGGED.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..mib {
        // Touch every page so the memory is really charged to the cgroup.
        let mut block = vec![0u8; 1 << 20];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        hogged.push(block);
    }
}

/// Serves one ACP client over `transport` until the client closes its side.
///
/// Turns still running at that point are allowed to finish and answer: a
/// client that writes all its prompts and then closes stdin (a shell pipe, a
/// benchmark) still gets every reply.
pub async fn serve(
    config: Config,
    stdout: StdoutLines,
    transport: impl ConnectTo<Agent> + 'static,
) -> Result<(), Error> {
    let state = Arc::new(State::new(config, stdout));
    Agent
        .v1()
        .name("echo-agent")
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: InitializeRequest, responder, _cx| {
                    state.initialize(request, responder).await
                }
            },
            on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: AuthenticateRequest, responder, _cx| {
                    match state.authenticate(&request.method_id.0) {
                        Ok(()) => responder.respond(AuthenticateResponse::new()),
                        Err(err) => responder.respond_with_error(err),
                    }
                }
            },
            on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: NewSessionRequest, responder, _cx| {
                    if state.config.hang_session_new {
                        tracing::warn!("never answering session/new (--hang-session-new)");
                        state.parked_sessions.lock().unwrap_or_else(PoisonError::into_inner).push(responder);
                        return Ok(());
                    }
                    if !state.is_authenticated() {
                        return responder.respond_with_error(Error::auth_required());
                    }
                    let id = state.new_session(&request.cwd.to_string_lossy(), &request.mcp_servers);
                    state.set_dirs(&id, &request.additional_directories);
                    let settings = Settings::default();
                    responder.respond(
                        NewSessionResponse::new(id)
                            .modes(settings.modes())
                            .config_options(vec![settings.case_option()]),
                    )
                }
            },
            on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: SetSessionModeRequest, responder, _cx| {
                    match state.set_mode(&request.session_id, &request.mode_id.0) {
                        Ok(()) => responder.respond(SetSessionModeResponse::new()),
                        Err(err) => responder.respond_with_error(err),
                    }
                }
            },
            on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: SetSessionConfigOptionRequest, responder, _cx| {
                    match state.set_config_option(&request) {
                        Ok(options) => responder.respond(SetSessionConfigOptionResponse::new(options)),
                        Err(err) => responder.respond_with_error(err),
                    }
                }
            },
            on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: LoadSessionRequest, responder, cx| {
                    if !state.config.load_session {
                        return responder.respond_with_error(Error::method_not_found());
                    }
                    if !state.is_authenticated() {
                        return responder.respond_with_error(Error::auth_required());
                    }
                    match state.reopen(&request.session_id, &request.mcp_servers, &request.additional_directories, Some(&cx)) {
                        Ok(settings) => responder.respond(
                            LoadSessionResponse::new()
                                .modes(settings.modes())
                                .config_options(vec![settings.case_option()]),
                        ),
                        Err(err) => responder.respond_with_error(err),
                    }
                }
            },
            on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: ResumeSessionRequest, responder, _cx| {
                    if !state.config.session_capabilities.contains(&SessionCap::Resume) {
                        return responder.respond_with_error(Error::method_not_found());
                    }
                    if !state.is_authenticated() {
                        return responder.respond_with_error(Error::auth_required());
                    }
                    match state.reopen(&request.session_id, &request.mcp_servers, &request.additional_directories, None) {
                        Ok(settings) => responder.respond(
                            ResumeSessionResponse::new()
                                .modes(settings.modes())
                                .config_options(vec![settings.case_option()]),
                        ),
                        Err(err) => responder.respond_with_error(err),
                    }
                }
            },
            on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: ListSessionsRequest, responder, _cx| {
                    if !state.config.session_capabilities.contains(&SessionCap::List) {
                        return responder.respond_with_error(Error::method_not_found());
                    }
                    responder.respond(ListSessionsResponse::new(state.list_sessions(request.cwd.as_deref())))
                }
            },
            on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: CloseSessionRequest, responder, _cx| {
                    if !state.config.session_capabilities.contains(&SessionCap::Close) {
                        return responder.respond_with_error(Error::method_not_found());
                    }
                    match state.close_session(&request.session_id) {
                        Ok(()) => responder.respond(CloseSessionResponse::new()),
                        Err(err) => responder.respond_with_error(err),
                    }
                }
            },
            on_receive_request!(),
        )
        .on_receive_request(
            {
                let state = state.clone();
                async move |request: PromptRequest, responder, cx| {
                    state.clone().prompt(request, responder, cx)
                }
            },
            on_receive_request!(),
        )
        .on_receive_notification(
            {
                let state = state.clone();
                async move |notification: CancelNotification, _cx| {
                    state.cancel(&notification.session_id);
                    Ok(())
                }
            },
            on_receive_notification!(),
        )
        .connect_with(transport, async |cx| {
            cx.incoming_closed().await;
            let mut active = state.active_turns.subscribe();
            // The sender lives in `state`, which outlives this wait.
            let _ = active.wait_for(|&n| n == 0).await;
            Ok(())
        })
        .await
}

/// A session's mode and config options.
///
/// Modes: `echo` (the default) and `quiet` (turns end without a word).
/// Config option `case` (select): `as-is` (the default) or `upper`.
#[derive(Debug, Clone, Default)]
struct Settings {
    quiet: bool,
    upper: bool,
}

impl Settings {
    fn modes(&self) -> SessionModeState {
        let current = if self.quiet { "quiet" } else { "echo" };
        SessionModeState::new(
            current,
            vec![
                SessionMode::new("echo", "Echo"),
                SessionMode::new("quiet", "Quiet"),
            ],
        )
    }

    fn case_option(&self) -> SessionConfigOption {
        let current = if self.upper { "upper" } else { "as-is" };
        SessionConfigOption::select(
            "case",
            "Case",
            current,
            vec![
                SessionConfigSelectOption::new("as-is", "As is"),
                SessionConfigSelectOption::new("upper", "Upper case"),
            ],
        )
    }
}

/// Shared by all handlers and turn tasks.
struct State {
    config: Config,
    stdout: StdoutLines,
    /// Every session created on this connection, with the cancel switch of its
    /// running turn, if any.
    sessions: Mutex<HashMap<SessionId, Option<RunningTurn>>>,
    /// Responses the fault modes deliberately never send. Dropping a responder
    /// makes the SDK answer with an error, which would defeat `hang`.
    parked: Mutex<Vec<Responder<InitializeResponse>>>,
    /// How many turns are streaming, so shutdown can wait for them.
    active_turns: watch::Sender<usize>,
    next_turn_id: AtomicU64,
    /// What the client offered in `initialize`: the agent calls only those of
    /// its methods.
    client_capabilities: Mutex<ClientCapabilities>,
    /// Numbers the `tool_call`s that terminal commands report.
    next_tool_call: AtomicU64,
    /// Each session's mode and config options.
    settings: Mutex<HashMap<SessionId, Settings>>,
    /// `session/new` answers `--hang-session-new` never sends.
    parked_sessions: Mutex<Vec<Responder<NewSessionResponse>>>,
    /// Whether `authenticate` succeeded (always true without `--require-auth`).
    authenticated: std::sync::atomic::AtomicBool,
    /// Where `--load-session` keeps sessions; `None` without it.
    history: Option<History>,
    /// Each open session's working directory and echoed turns.
    records: Mutex<HashMap<SessionId, Record>>,
    /// The MCP servers each session was given, as `name (transport)`.
    mcp: Mutex<HashMap<SessionId, Vec<String>>>,
    /// The `additionalDirectories` each session was given.
    dirs: Mutex<HashMap<SessionId, Vec<String>>>,
}

struct RunningTurn {
    /// Tells a stale guard apart from the turn that replaced it.
    id: u64,
    cancel: watch::Sender<bool>,
}

impl State {
    fn new(config: Config, stdout: StdoutLines) -> Self {
        let config_requires_auth = config.require_auth;
        let config_load = config.load_session;
        Self {
            config,
            stdout,
            sessions: Mutex::default(),
            parked: Mutex::default(),
            active_turns: watch::Sender::new(0),
            next_turn_id: AtomicU64::new(0),
            client_capabilities: Mutex::default(),
            next_tool_call: AtomicU64::new(1),
            parked_sessions: Mutex::default(),
            settings: Mutex::default(),
            authenticated: std::sync::atomic::AtomicBool::new(!config_requires_auth),
            history: config_load.then(History::from_env),
            records: Mutex::default(),
            mcp: Mutex::default(),
            dirs: Mutex::default(),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Option<RunningTurn>>> {
        // A panic elsewhere cannot leave the map half-updated in a way that
        // matters to an echo agent, so keep serving.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn initialize(
        &self,
        request: InitializeRequest,
        responder: Responder<InitializeResponse>,
    ) -> Result<(), Error> {
        tracing::info!(client_version = %request.protocol_version, "initialize");
        *self
            .client_capabilities
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = request.client_capabilities;
        match self.config.fail_initialize {
            None => responder.respond(self.initialize_response()),
            Some(FailInitialize::Error) => responder.respond_with_error(Error::new(
                ErrorCode::INTERNAL_ERROR,
                "initialize failed (injected by --fail-initialize error)",
            )),
            Some(FailInitialize::Exit) => {
                tracing::warn!("exiting on initialize (--fail-initialize exit)");
                std::process::exit(FAIL_EXIT_CODE);
            }
            Some(FailInitialize::Hang) => {
                tracing::warn!("never answering initialize (--fail-initialize hang)");
                self.park(responder);
                Ok(())
            }
            Some(FailInitialize::Garbage) => {
                tracing::warn!("writing garbage instead of initialize (--fail-initialize garbage)");
                self.stdout
                    .write_line(GARBAGE_LINE.to_owned())
                    .await
                    .map_err(Error::into_internal_error)?;
                self.park(responder);
                Ok(())
            }
        }
    }

    fn initialize_response(&self) -> InitializeResponse {
        let kinds = &self.config.prompt_capabilities;
        let prompt = PromptCapabilities::new()
            .image(kinds.contains(&PromptKind::Image))
            .audio(kinds.contains(&PromptKind::Audio))
            .embedded_context(kinds.contains(&PromptKind::EmbeddedContext));
        let session_caps = &self.config.session_capabilities;
        let mut sessions = SessionCapabilities::new();
        if session_caps.contains(&SessionCap::List) {
            sessions = sessions.list(SessionListCapabilities::new());
        }
        if session_caps.contains(&SessionCap::Close) {
            sessions = sessions.close(SessionCloseCapabilities::new());
        }
        if session_caps.contains(&SessionCap::Resume) {
            sessions = sessions.resume(SessionResumeCapabilities::new());
        }
        if session_caps.contains(&SessionCap::AdditionalDirectories) {
            sessions = sessions.additional_directories(SessionAdditionalDirectoriesCapabilities::new());
        }
        let mcp = McpCapabilities::new()
            .http(self.config.mcp_capabilities.contains(&McpKind::Http))
            .sse(self.config.mcp_capabilities.contains(&McpKind::Sse));
        let capabilities = AgentCapabilities::new()
            .load_session(self.config.load_session)
            .prompt_capabilities(prompt)
            .session_capabilities(sessions)
            .mcp_capabilities(mcp);
        let mut response = InitializeResponse::new(ProtocolVersion::V1)
            .agent_capabilities(capabilities)
            .agent_info(Implementation::new("echo-agent", env!("CARGO_PKG_VERSION")));
        if self.config.require_auth {
            response = response.auth_methods(vec![
                AuthMethod::Agent(AuthMethodAgent::new("browser-login", "Log in with a browser")),
                AuthMethod::Agent(
                    AuthMethodAgent::new("echo-agent-token", "Use a token").description(format!(
                        "Requires setting the `{TOKEN_VAR}` environment variable"
                    )),
                ),
            ]);
        }
        response
    }

    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    fn authenticate(&self, method_id: &str) -> Result<(), Error> {
        match method_id {
            "echo-agent-token" if std::env::var(TOKEN_VAR).is_ok_and(|v| !v.is_empty()) => {
                tracing::info!("authenticated with {TOKEN_VAR}");
                self.authenticated.store(true, Ordering::Relaxed);
                Ok(())
            }
            "echo-agent-token" => Err(Error::auth_required().data(serde_json::json!({"missing": TOKEN_VAR}))),
            "browser-login" => Err(Error::new(ErrorCode::INTERNAL_ERROR, "no browser to log in with")),
            other => Err(Error::new(ErrorCode::INVALID_PARAMS, format!("unknown auth method {other}"))),
        }
    }

    /// `session/load` (with `replay`: replays the session's turns, its
    /// prompts as user message chunks, its answers as agent message chunks)
    /// or `session/resume` (without), then goes on with the session. An id
    /// neither open nor on disk is ACP's resource-not-found.
    fn reopen(
        &self,
        id: &SessionId,
        mcp_servers: &[McpServer],
        dirs: &[std::path::PathBuf],
        replay: Option<&ConnectionTo<Client>>,
    ) -> Result<Settings, Error> {
        let open = self.records.lock().unwrap_or_else(PoisonError::into_inner).get(id).cloned();
        let on_disk = || self.history.as_ref().and_then(|h| h.load(&id.0));
        let Some(record) = open.or_else(on_disk) else {
            return Err(Error::new(ErrorCode::RESOURCE_NOT_FOUND, format!("no session {id} to load"))
                .data(serde_json::json!({ "sessionId": id })));
        };
        let chunk = |text: &str| ContentChunk::new(ContentBlock::Text(TextContent::new(text)));
        for (prompt, answer) in replay.map_or(&[][..], |_| &record.turns[..]) {
            let cx = replay.expect("replaying");
            cx.send_notification(SessionNotification::new(id.clone(), SessionUpdate::UserMessageChunk(chunk(prompt))))?;
            cx.send_notification(SessionNotification::new(id.clone(), SessionUpdate::AgentMessageChunk(chunk(answer))))?;
        }
        if replay.is_some() {
            tracing::info!(session = %id, turns = record.turns.len(), "session loaded");
        } else {
            tracing::info!(session = %id, turns = record.turns.len(), "session resumed");
        }
        self.sessions().entry(id.clone()).or_insert(None);
        self.records.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), record);
        self.mcp.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), mcp_names(mcp_servers));
        self.set_dirs(id, dirs);
        Ok(self.settings(id))
    }

    fn set_dirs(&self, id: &SessionId, dirs: &[std::path::PathBuf]) {
        let dirs = dirs.iter().map(|d| d.display().to_string()).collect();
        self.dirs.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), dirs);
    }

    /// `session/list`: the open sessions and those on disk, by cwd if given.
    fn list_sessions(&self, cwd: Option<&std::path::Path>) -> Vec<SessionInfo> {
        let mut all: HashMap<String, String> = HashMap::new();
        if let Some(history) = &self.history {
            for id in history.ids() {
                if let Some(record) = history.load(&id) {
                    all.insert(id, record.cwd);
                }
            }
        }
        for (id, record) in self.records.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            all.insert(id.0.to_string(), record.cwd.clone());
        }
        let mut list: Vec<SessionInfo> = all
            .into_iter()
            .filter(|(_, c)| cwd.is_none_or(|want| std::path::Path::new(c) == want))
            .map(|(id, c)| SessionInfo::new(SessionId::new(id), c))
            .collect();
        list.sort_by(|a, b| a.session_id.0.cmp(&b.session_id.0));
        list
    }

    /// `session/close`: stops the session's turn, if any, and forgets it
    /// (what is on disk stays loadable).
    fn close_session(&self, id: &SessionId) -> Result<(), Error> {
        let Some(running) = self.sessions().remove(id) else {
            return Err(Error::new(ErrorCode::INVALID_PARAMS, format!("unknown session id {id}")));
        };
        if let Some(turn) = running {
            turn.cancel.send_replace(true);
        }
        self.records.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
        self.mcp.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
        tracing::info!(session = %id, "session closed");
        Ok(())
    }

    /// Adds an echoed turn to the session's record (and its file).
    fn record_turn(&self, id: &SessionId, prompt: &str, answer: String) {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(record) = records.get_mut(id) else { return };
        record.turns.push((prompt.to_string(), answer));
        if let Some(history) = &self.history {
            history.save(&id.0, record);
        }
    }

    fn settings(&self, session_id: &SessionId) -> Settings {
        self.settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(session_id)
            .cloned()
            .unwrap_or_default()
    }

    fn update_settings(
        &self,
        session_id: &SessionId,
        change: impl FnOnce(&mut Settings) -> Result<(), Error>,
    ) -> Result<Settings, Error> {
        if !self.sessions().contains_key(session_id) {
            return Err(Error::new(ErrorCode::INVALID_PARAMS, format!("unknown session id {session_id}")));
        }
        let mut all = self.settings.lock().unwrap_or_else(PoisonError::into_inner);
        let settings = all.entry(session_id.clone()).or_default();
        change(settings)?;
        Ok(settings.clone())
    }

    fn set_mode(&self, session_id: &SessionId, mode: &str) -> Result<(), Error> {
        self.update_settings(session_id, |s| {
            s.quiet = match mode {
                "echo" => false,
                "quiet" => true,
                other => return Err(Error::new(ErrorCode::INVALID_PARAMS, format!("unknown mode {other}"))),
            };
            Ok(())
        })?;
        tracing::info!(session = %session_id, mode, "mode set");
        Ok(())
    }

    fn set_config_option(&self, request: &SetSessionConfigOptionRequest) -> Result<Vec<SessionConfigOption>, Error> {
        let settings = self.update_settings(&request.session_id, |s| {
            s.upper = match (&*request.config_id.0, &request.value) {
                ("case", SessionConfigOptionValue::ValueId { value }) if &*value.0 == "upper" => true,
                ("case", SessionConfigOptionValue::ValueId { value }) if &*value.0 == "as-is" => false,
                ("case", _) => return Err(Error::new(ErrorCode::INVALID_PARAMS, "case is as-is or upper")),
                (other, _) => return Err(Error::new(ErrorCode::INVALID_PARAMS, format!("unknown config option {other}"))),
            };
            Ok(())
        })?;
        Ok(vec![settings.case_option()])
    }

    fn park(&self, responder: Responder<InitializeResponse>) {
        self.parked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(responder);
    }

    fn new_session(&self, cwd: &str, mcp_servers: &[McpServer]) -> SessionId {
        let id = SessionId::new(format!("sess_{}", uuid::Uuid::new_v4().simple()));
        self.sessions().insert(id.clone(), None);
        let record = Record { cwd: cwd.to_string(), turns: Vec::new() };
        if let Some(history) = &self.history {
            history.save(&id.0, &record);
        }
        self.records.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), record);
        self.mcp.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), mcp_names(mcp_servers));
        tracing::info!(session = %id, "session created");
        id
    }

    /// Registers the turn, then streams it from a spawned task. Registration
    /// happens here, on the dispatch loop, so that two prompts sent back to
    /// back are checked in order and the second one reliably sees the first.
    fn prompt(
        self: Arc<Self>,
        request: PromptRequest,
        responder: Responder<PromptResponse>,
        cx: ConnectionTo<Client>,
    ) -> Result<(), Error> {
        let session_id = request.session_id;
        if !self.is_authenticated() {
            return responder.respond_with_error(Error::auth_required());
        }
        let (guard, cancel) = match self.clone().begin_turn(&session_id) {
            Ok(started) => started,
            Err(err) => return responder.respond_with_error(err),
        };
        let text = prompt_text(&request.prompt);
        tracing::info!(session = %session_id, chars = text.chars().count(), "prompt");
        let cancel = TurnCancel {
            session: cancel,
            request: responder.cancellation(),
        };
        cx.clone().spawn(async move {
            let stop_reason = match commands::parse(&text) {
                Some(command) => self.run_command(&cx, &session_id, command, cancel).await,
                None => self.stream_echo(&cx, &session_id, &text, cancel).await,
            };
            // Free the session before answering: a client may send its next
            // prompt the moment it sees this response.
            drop(guard);
            let sent = match stop_reason {
                Ok(stop_reason) => {
                    tracing::info!(session = %session_id, ?stop_reason, "turn finished");
                    responder.respond(PromptResponse::new(stop_reason))
                }
                Err(err) => responder.respond_with_error(err),
            };
            // An error returned from a spawned task tears the whole connection
            // down; failing to answer only means the client is already gone.
            if let Err(err) = sent {
                tracing::debug!(%err, "could not answer session/prompt");
            }
            Ok(())
        })
    }

    fn begin_turn(
        self: Arc<Self>,
        session_id: &SessionId,
    ) -> Result<(TurnGuard, watch::Receiver<bool>), Error> {
        let mut sessions = self.sessions();
        let Some(running) = sessions.get_mut(session_id) else {
            return Err(Error::new(
                ErrorCode::INVALID_PARAMS,
                format!("unknown session id {session_id}"),
            )
            .data(serde_json::json!({ "sessionId": session_id })));
        };
        if running.is_some() {
            return Err(Error::new(
                ErrorCode::INVALID_REQUEST,
                format!("session {session_id} already has a prompt turn running"),
            )
            .data(serde_json::json!({ "sessionId": session_id })));
        }
        let id = self.next_turn_id.fetch_add(1, Ordering::Relaxed);
        let (cancel, cancelled) = watch::channel(false);
        *running = Some(RunningTurn { id, cancel });
        drop(sessions);
        self.active_turns.send_modify(|n| *n += 1);
        let guard = TurnGuard {
            state: self,
            session_id: session_id.clone(),
            turn_id: id,
        };
        Ok((guard, cancelled))
    }

    fn cancel(&self, session_id: &SessionId) {
        match self.sessions().get(session_id) {
            Some(Some(turn)) => {
                tracing::info!(session = %session_id, "cancelling turn");
                turn.cancel.send_replace(true);
            }
            // Cancel is a notification and may race with the turn's end, so a
            // cancel with nothing to stop is normal, not an error.
            Some(None) => tracing::debug!(session = %session_id, "cancel: no turn running"),
            None => tracing::warn!(session = %session_id, "cancel: unknown session"),
        }
    }

    /// A prompt command: calls the client and streams what it answered.
    async fn run_command(
        &self,
        cx: &ConnectionTo<Client>,
        session_id: &SessionId,
        command: commands::Command,
        cancel: TurnCancel,
    ) -> Result<StopReason, Error> {
        tracing::info!(session = %session_id, ?command, "prompt command");
        let said = match command {
            commands::Command::Crash { code, orphan } => {
                if orphan {
                    // Same process group as the agent: an npm launcher's native child.
                    let child = std::process::Command::new("sleep").arg("600").spawn();
                    tracing::warn!(ok = child.is_ok(), "left a child behind (/crash orphan)");
                }
                tracing::warn!(code, "crashing on request (/crash)");
                std::process::exit(code);
            }
            commands::Command::Emit(what) => self.emit(what).await?,
            commands::Command::Logout => {
                self.authenticated.store(!self.config.require_auth, Ordering::Relaxed);
                "logged out".to_owned()
            }
            commands::Command::Dirs => {
                let dirs = self.dirs.lock().unwrap_or_else(PoisonError::into_inner).get(session_id).cloned().unwrap_or_default();
                if dirs.is_empty() { "dirs: none".to_owned() } else { format!("dirs: {}", dirs.join(", ")) }
            }
            commands::Command::Mcp => {
                let names = self.mcp.lock().unwrap_or_else(PoisonError::into_inner).get(session_id).cloned().unwrap_or_default();
                if names.is_empty() { "mcp: none".to_owned() } else { format!("mcp: {}", names.join(", ")) }
            }
            command => return self.run_tool(cx, session_id, command, cancel).await,
        };
        cx.send_notification(SessionNotification::new(
            session_id.clone(),
            SessionUpdate::AgentMessageChunk(ContentChunk::new(ContentBlock::Text(TextContent::new(said)))),
        ))?;
        Ok(StopReason::EndTurn)
    }

    /// `/emit`: writes something that is no valid message straight to stdout.
    async fn emit(&self, what: Emit) -> Result<String, Error> {
        let (line, said) = match what {
            Emit::Garbage => (GARBAGE_LINE.to_owned(), "emitted garbage".to_owned()),
            Emit::Stray => (
                r#"{"jsonrpc":"2.0","id":"echo-stray-1","result":{}}"#.to_owned(),
                "emitted a stray response".to_owned(),
            ),
            Emit::Huge(mib) => ("x".repeat(mib << 20), format!("emitted a {mib} MiB line")),
        };
        self.stdout.write_line(line).await.map_err(Error::into_internal_error)?;
        Ok(said)
    }

    async fn run_tool(
        &self,
        cx: &ConnectionTo<Client>,
        session_id: &SessionId,
        command: commands::Command,
        mut cancel: TurnCancel,
    ) -> Result<StopReason, Error> {
        let caps = self
            .client_capabilities
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let id = self.next_tool_call.fetch_add(1, Ordering::Relaxed);
        let tools = Tools {
            cx,
            session_id,
            caps: &caps,
            tool_call_id: ToolCallId::new(format!("call_{id}")),
        };
        tools.run(command, &mut cancel).await
    }

    async fn stream_echo(
        &self,
        cx: &ConnectionTo<Client>,
        session_id: &SessionId,
        text: &str,
        mut cancel: TurnCancel,
    ) -> Result<StopReason, Error> {
        if self.config.hog_mib > 0 {
            hog(self.config.hog_mib);
        }
        let settings = self.settings(session_id);
        if settings.quiet {
            return Ok(StopReason::EndTurn);
        }
        let upper;
        let text = if settings.upper {
            upper = text.to_uppercase();
            upper.as_str()
        } else {
            text
        };
        let chunks = chunking::split(text, self.config.chunking);
        let echoed = std::iter::repeat_n(chunks.as_slice(), self.config.repeat).flatten();
        let mut answer = String::new();
        for (i, chunk) in echoed.enumerate() {
            let pace = async {
                if !self.config.delay.is_zero() {
                    tokio::time::sleep(self.config.delay).await;
                } else if i % YIELD_EVERY == 0 {
                    tokio::task::yield_now().await;
                }
                self.stdout.chunk_slot().await;
            };
            tokio::select! {
                biased;
                () = pace => {}
                () = cancel.cancelled() => {}
            }
            if cancel.is_cancelled() {
                return Ok(StopReason::Cancelled);
            }
            if self.history.is_some() {
                answer.push_str(chunk);
            }
            cx.send_notification(SessionNotification::new(
                session_id.clone(),
                SessionUpdate::AgentMessageChunk(ContentChunk::new(ContentBlock::Text(
                    TextContent::new(*chunk),
                ))),
            ))?;
        }
        self.record_turn(session_id, text, answer);
        Ok(StopReason::EndTurn)
    }
}

/// How `/mcp` names a session's MCP servers: `name (transport)`.
fn mcp_names(servers: &[McpServer]) -> Vec<String> {
    servers
        .iter()
        .map(|server| match server {
            McpServer::Stdio(s) => format!("{} (stdio)", s.name),
            McpServer::Http(s) => format!("{} (http)", s.name),
            McpServer::Sse(s) => format!("{} (sse)", s.name),
            _ => "unknown (other)".to_owned(),
        })
        .collect()
}

/// Marks a session idle again when its turn ends, however it ends: normally,
/// by error, or by the task being dropped as the connection shuts down.
struct TurnGuard {
    state: Arc<State>,
    session_id: SessionId,
    turn_id: u64,
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        if let Some(running) = self.state.sessions().get_mut(&self.session_id)
            && running.as_ref().is_some_and(|turn| turn.id == self.turn_id)
        {
            *running = None;
        }
        self.state.active_turns.send_modify(|n| *n -= 1);
    }
}

/// Either way a client can stop a turn: ACP's `session/cancel`, or the
/// JSON-RPC-level `$/cancel_request` for the prompt request itself. Both end
/// the turn with `stopReason: cancelled`, which ACP requires for the former
/// and is the most useful answer for the latter.
pub(crate) struct TurnCancel {
    session: watch::Receiver<bool>,
    request: RequestCancellation,
}

impl TurnCancel {
    fn is_cancelled(&self) -> bool {
        *self.session.borrow() || self.request.is_cancelled()
    }

    pub(crate) async fn cancelled(&mut self) {
        tokio::select! {
            fired = async { self.session.wait_for(|&c| c).await.is_ok() } => {
                // The sender is dropped only after this turn ends; should that
                // ever change, never firing is safer than cancelling.
                if !fired {
                    std::future::pending::<()>().await;
                }
            }
            () = self.request.cancelled() => {}
        }
    }
}

/// The text the agent echoes: all text blocks of the prompt, in order. Other
/// block kinds (images, resources) have no text to echo and are skipped.
fn prompt_text(prompt: &[ContentBlock]) -> String {
    prompt
        .iter()
        .filter_map(|block| match block {
            ContentBlock::Text(text) => Some(text.text.as_str()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_text_concatenates_text_blocks_only() {
        let prompt = vec![
            ContentBlock::from("hello "),
            ContentBlock::ResourceLink(agent_client_protocol_schema::v1::ResourceLink::new(
                "file",
                "file:///x",
            )),
            ContentBlock::from("world"),
        ];
        assert_eq!(prompt_text(&prompt), "hello world");
        assert_eq!(prompt_text(&[]), "");
    }
}
