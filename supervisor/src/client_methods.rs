//! The agent-to-client methods the supervisor serves, as the ACP client of an
//! agent: `fs/*` ([`super::fs`]) and `terminal/*` ([`super::terminals`]).
//!
//! Every one of them names a session; only sessions this agent opened through
//! `session/new` are known, each with the directories its file methods are
//! confined to. Errors are JSON-RPC errors the agent can act on: `-32602`
//! (invalid params) when the request is at fault, with a message saying why;
//! `-32002` (ACP's resource not found) for a missing file, command or
//! terminal; `-32603` (internal error) for the rest.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::fs::{self, FsError, Roots};
use super::reaper::Reaper;
use super::terminals::{CreateParams, TerminalError, Terminals};
use agentd_acp::ErrorObject;
use agentd_harden::Hardening;

pub const INVALID_PARAMS: i64 = -32602;
pub const RESOURCE_NOT_FOUND: i64 = -32002;
pub const INTERNAL_ERROR: i64 = -32603;

/// The methods [`ClientMethods::serve`] answers; the client capabilities
/// `initialize` advertises must match.
pub const METHODS: &[&str] = &[
    "fs/read_text_file",
    "fs/write_text_file",
    "terminal/create",
    "terminal/output",
    "terminal/wait_for_exit",
    "terminal/kill",
    "terminal/release",
];

fn error(code: i64, message: impl Into<String>) -> ErrorObject {
    ErrorObject { code, message: message.into(), data: None }
}

/// The ACP error code for a failure: the request's fault, a missing thing, or ours.
fn classify(invalid_params: bool, not_found: bool, message: String) -> ErrorObject {
    let code = if invalid_params {
        INVALID_PARAMS
    } else if not_found {
        RESOURCE_NOT_FOUND
    } else {
        INTERNAL_ERROR
    };
    error(code, message)
}

impl From<FsError> for ErrorObject {
    fn from(e: FsError) -> Self {
        classify(e.is_invalid_params(), e.is_not_found(), e.to_string())
    }
}

impl From<TerminalError> for ErrorObject {
    fn from(e: TerminalError) -> Self {
        classify(e.is_invalid_params(), e.is_not_found(), e.to_string())
    }
}

fn parse<T: DeserializeOwned>(method: &str, params: Option<&RawValue>) -> Result<T, ErrorObject> {
    let raw = params.map_or("null", RawValue::get);
    serde_json::from_str(raw).map_err(|e| error(INVALID_PARAMS, format!("invalid {method} params: {e}")))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionParams {
    session_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadParams {
    path: PathBuf,
    #[serde(default)]
    line: Option<u32>,
    #[serde(default)]
    limit: Option<u32>,
}

#[derive(Deserialize)]
struct WriteParams {
    path: PathBuf,
    content: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TerminalParams {
    terminal_id: String,
}

/// One agent's sessions (with their directories) and terminals.
pub struct ClientMethods {
    /// ACP session id -> the directories its file methods may touch.
    sessions: Mutex<HashMap<String, Roots>>,
    terminals: Terminals,
}

impl ClientMethods {
    /// `hardening` and `env` are the agent's own: its terminals get them too.
    pub fn new(reaper: Arc<Reaper>, hardening: Arc<Hardening>, env: HashMap<String, String>) -> Self {
        Self { sessions: Mutex::default(), terminals: Terminals::new(reaper, hardening, env) }
    }

    /// Records a session opened in `cwd`, its files confined to `cwd` and
    /// `additional` directories.
    pub fn add_session(&self, session_id: &str, cwd: &str, additional: &[String]) {
        let roots = Roots::new(cwd, additional.iter().map(std::path::PathBuf::from));
        self.sessions.lock().unwrap().insert(session_id.to_string(), roots);
    }

    /// Kills every terminal: the agent has exited.
    pub fn release_all(&self) {
        self.terminals.release_all();
    }

    /// Answers one of [`METHODS`]; method-not-found for anything else.
    pub async fn serve(&self, method: &str, params: Option<&RawValue>) -> Result<Value, ErrorObject> {
        if !METHODS.contains(&method) {
            return Err(ErrorObject::method_not_found(method));
        }
        let SessionParams { session_id } = parse(method, params)?;
        let roots = self.sessions.lock().unwrap().get(&session_id).cloned();
        let Some(roots) = roots else {
            return Err(error(INVALID_PARAMS, format!("unknown session {session_id}: not opened by this agent's session/new")));
        };
        match method {
            "fs/read_text_file" => {
                let p: ReadParams = parse(method, params)?;
                let content = blocking(move || fs::read_text_file(&roots, &p.path, p.line, p.limit)).await??;
                Ok(json!({"content": content}))
            }
            "fs/write_text_file" => {
                let p: WriteParams = parse(method, params)?;
                blocking(move || fs::write_text_file(&roots, &p.path, &p.content)).await??;
                Ok(json!({}))
            }
            "terminal/create" => {
                let p: CreateParams = parse(method, params)?;
                let terminal_id = self.terminals.create(&session_id, roots.cwd(), p)?;
                Ok(json!({"terminalId": terminal_id}))
            }
            _ => {
                let TerminalParams { terminal_id } = parse(method, params)?;
                let t = &self.terminals;
                match method {
                    "terminal/output" => Ok(t.output(&session_id, &terminal_id).await?),
                    "terminal/wait_for_exit" => Ok(t.wait_for_exit(&session_id, &terminal_id).await?),
                    "terminal/kill" => t.kill(&session_id, &terminal_id).map(|()| json!({})).map_err(Into::into),
                    "terminal/release" => t.release(&session_id, &terminal_id).map(|()| json!({})).map_err(Into::into),
                    _ => unreachable!("{method} is in METHODS"),
                }
            }
        }
    }
}

/// File I/O off the supervisor's single runtime thread, which also reads
/// every agent's output.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ErrorObject> {
    tokio::task::spawn_blocking(f).await.map_err(|e| error(INTERNAL_ERROR, format!("file operation failed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn methods() -> ClientMethods {
        let hardening = Hardening::default_for_agents().unwrap();
        // These tests spawn nothing, and nextest gives each test its own
        // process, so the reaper cannot take another test's children.
        let reaper = Reaper::start().unwrap();
        ClientMethods::new(reaper, Arc::new(hardening), HashMap::new())
    }

    fn raw(v: Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).unwrap()
    }

    #[tokio::test]
    async fn unknown_sessions_and_methods_are_refused() {
        let m = methods();
        let e = m.serve("fs/read_text_file", Some(&raw(json!({"sessionId": "s", "path": "/etc/passwd"})))).await.unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        assert!(e.message.contains("unknown session s"), "{}", e.message);
        let e = m.serve("session/request_permission", None).await.unwrap_err();
        assert_eq!(e.code, -32601);
        let e = m.serve("fs/read_text_file", None).await.unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
    }

    #[tokio::test]
    async fn file_errors_carry_their_codes() {
        let dir = tempfile::tempdir().unwrap();
        let m = methods();
        m.add_session("s", dir.path().to_str().unwrap(), &[]);
        let call = |path: String| {
            let params = raw(json!({"sessionId": "s", "path": path}));
            let m = &m;
            async move { m.serve("fs/read_text_file", Some(&params)).await }
        };
        assert_eq!(call("/etc/passwd".into()).await.unwrap_err().code, INVALID_PARAMS);
        assert_eq!(call("relative".into()).await.unwrap_err().code, INVALID_PARAMS);
        let missing = call(dir.path().join("missing").display().to_string()).await.unwrap_err();
        assert_eq!(missing.code, RESOURCE_NOT_FOUND, "{}", missing.message);

        let path = dir.path().join("f.txt").display().to_string();
        let write = raw(json!({"sessionId": "s", "path": path, "content": "a\nb\n"}));
        assert_eq!(m.serve("fs/write_text_file", Some(&write)).await.unwrap(), json!({}));
        assert_eq!(call(path).await.unwrap(), json!({"content": "a\nb\n"}));
    }

    #[tokio::test]
    async fn unknown_terminals_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let m = methods();
        m.add_session("s", dir.path().to_str().unwrap(), &[]);
        for method in ["terminal/output", "terminal/wait_for_exit", "terminal/kill", "terminal/release"] {
            let e = m.serve(method, Some(&raw(json!({"sessionId": "s", "terminalId": "term_9"})))).await.unwrap_err();
            assert_eq!(e.code, RESOURCE_NOT_FOUND, "{method}");
            assert!(e.message.contains("term_9"), "{}", e.message);
        }
    }
}
