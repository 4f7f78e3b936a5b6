//! The ACP methods agentd calls on an agent. Request bodies follow the ACP v1
//! schema; answers are parsed only as far as agentd acts on them.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::PROTOCOL_VERSION;
use super::rpc::{RpcConnection, RpcError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum AcpError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("agent speaks ACP protocol version {0}; agentd speaks {PROTOCOL_VERSION}")]
    UnsupportedVersion(u64),
    #[error("agent's {method} answer is malformed: {reason}")]
    BadAnswer { method: &'static str, reason: String },
}

impl AcpError {
    /// The agent answered ACP's `auth_required` (-32000).
    pub fn is_auth_required(&self) -> bool {
        matches!(self, AcpError::Rpc(RpcError::Remote(e)) if e.code == super::AUTH_REQUIRED)
    }
}

/// The agent's `initialize` answer: the version, and the whole answer verbatim
/// for clients that want its capabilities.
#[derive(Debug, Clone, Default)]
pub struct Initialized {
    pub protocol_version: u64,
    pub raw: String,
}

impl Initialized {
    fn answer(&self) -> serde_json::Value {
        serde_json::from_str(&self.raw).unwrap_or_default()
    }

    /// How a session of an earlier run of the agent can be reopened:
    /// `session/resume` when advertised (no replay), else `session/load`.
    pub fn reopen_method(&self) -> Option<&'static str> {
        let caps = self.answer().get("agentCapabilities").cloned().unwrap_or_default();
        if caps.pointer("/sessionCapabilities/resume").is_some_and(|r| !r.is_null()) {
            Some("session/resume")
        } else if caps.get("loadSession").and_then(serde_json::Value::as_bool) == Some(true) {
            Some("session/load")
        } else {
            None
        }
    }

    /// Whether `agentCapabilities` holds a capability at `pointer` (e.g.
    /// `/sessionCapabilities/close`): `true`, or an object (`{}` advertises).
    pub fn advertises(&self, pointer: &str) -> bool {
        match self.answer().get("agentCapabilities").and_then(|c| c.pointer(pointer)) {
            Some(serde_json::Value::Bool(b)) => *b,
            Some(serde_json::Value::Object(_)) => true,
            _ => false,
        }
    }

    /// Whether the agent accepts prompt content blocks of `kind`: text and
    /// resource_link always; image, audio and resource (embedded context)
    /// only when its promptCapabilities say so.
    pub fn accepts_block(&self, kind: &str) -> bool {
        let flag = match kind {
            "text" | "resource_link" => return true,
            "image" => "image",
            "audio" => "audio",
            "resource" => "embeddedContext",
            _ => return false,
        };
        self.answer().pointer(&format!("/agentCapabilities/promptCapabilities/{flag}")).and_then(serde_json::Value::as_bool) == Some(true)
    }
}

/// What `session/new`, `session/load` and `session/resume` carry besides
/// the session id.
pub struct SessionSetup<'a> {
    pub cwd: &'a str,
    /// ACP `mcpServers`, a JSON array.
    pub mcp_servers: &'a serde_json::Value,
    /// Sent as `additionalDirectories` when not empty: give it only to an
    /// agent that advertises `sessionCapabilities.additionalDirectories`.
    pub additional_directories: &'a [String],
}

impl SessionSetup<'_> {
    fn params(&self) -> serde_json::Value {
        let mut params = json!({"cwd": self.cwd, "mcpServers": self.mcp_servers});
        if !self.additional_directories.is_empty() {
            params["additionalDirectories"] = json!(self.additional_directories);
        }
        params
    }
}

#[derive(Clone)]
pub struct AcpClient {
    rpc: RpcConnection,
}

fn parse<'a, T: Deserialize<'a>>(method: &'static str, raw: &'a RawValue) -> Result<T, AcpError> {
    serde_json::from_str(raw.get()).map_err(|e| AcpError::BadAnswer { method, reason: e.to_string() })
}

impl AcpClient {
    pub fn new(rpc: RpcConnection) -> Self {
        Self { rpc }
    }

    pub fn rpc(&self) -> &RpcConnection {
        &self.rpc
    }

    pub async fn initialize(&self, timeout: Duration) -> Result<Initialized, AcpError> {
        // The supervisor serves fs/* (confined to each session's directory)
        // and terminal/* (commands in the sandbox): see supervisor::client_methods.
        let params = json!({
            "protocolVersion": PROTOCOL_VERSION,
            "clientCapabilities": {"fs": {"readTextFile": true, "writeTextFile": true}, "terminal": true},
            "clientInfo": {"name": "agentd", "version": env!("CARGO_PKG_VERSION")},
        });
        let raw = self.rpc.request_within("initialize", &params, timeout).await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            protocol_version: u64,
        }
        let answer: Answer = parse("initialize", &raw)?;
        if answer.protocol_version != PROTOCOL_VERSION {
            return Err(AcpError::UnsupportedVersion(answer.protocol_version));
        }
        // Past the handshake, bad output no longer fails what we wait for.
        self.rpc.handshake_done();
        Ok(Initialized { protocol_version: answer.protocol_version, raw: raw.get().to_string() })
    }

    pub async fn authenticate(&self, method_id: &str, timeout: Duration) -> Result<(), AcpError> {
        self.rpc.request_within("authenticate", &json!({"methodId": method_id}), timeout).await?;
        Ok(())
    }

    /// `session/load` (replays the history as updates) or `session/resume`
    /// (does not): reopens a session a previous run of the agent created, or
    /// one the agent keeps. Returns the answer (a load's may carry modes and
    /// config options).
    pub async fn reopen_session(&self, method: &'static str, session_id: &str, setup: &SessionSetup<'_>, timeout: Duration) -> Result<serde_json::Value, AcpError> {
        let mut params = setup.params();
        params["sessionId"] = session_id.into();
        let raw = self.rpc.request_within(method, &params, timeout).await?;
        Ok(serde_json::from_str(raw.get()).unwrap_or_default())
    }

    /// `session/new`: the new session's id and the whole answer (its modes
    /// and config options, if any).
    pub async fn new_session(&self, setup: &SessionSetup<'_>, timeout: Duration) -> Result<(String, serde_json::Value), AcpError> {
        let raw = self.rpc.request_within("session/new", &setup.params(), timeout).await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            session_id: String,
        }
        let id = parse::<Answer>("session/new", &raw)?.session_id;
        Ok((id, serde_json::from_str(raw.get()).unwrap_or_default()))
    }

    /// Any other request on a session (`session/set_mode`, ...): the answer as JSON.
    pub async fn call(&self, method: &str, params: &serde_json::Value, timeout: Duration) -> Result<serde_json::Value, AcpError> {
        let raw = self.rpc.request_within(method, params, timeout).await?;
        Ok(serde_json::from_str(raw.get()).unwrap_or_default())
    }

    /// Runs one turn and returns its stop reason. Updates arrive meanwhile
    /// through the connection's handler.
    pub async fn prompt(&self, session_id: &str, prompt: &RawValue) -> Result<String, AcpError> {
        let params = json!({"sessionId": session_id, "prompt": prompt});
        let raw = self.rpc.request("session/prompt", &params).await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            stop_reason: String,
        }
        Ok(parse::<Answer>("session/prompt", &raw)?.stop_reason)
    }

    pub fn cancel(&self, session_id: &str) -> Result<(), AcpError> {
        Ok(self.rpc.notify("session/cancel", &json!({"sessionId": session_id}))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(capabilities: serde_json::Value) -> Initialized {
        Initialized { protocol_version: 1, raw: json!({"protocolVersion": 1, "agentCapabilities": capabilities}).to_string() }
    }

    #[test]
    fn additional_directories_go_out_only_when_given() {
        let servers = json!([]);
        let bare = SessionSetup { cwd: "/workspace", mcp_servers: &servers, additional_directories: &[] };
        assert_eq!(bare.params(), json!({"cwd": "/workspace", "mcpServers": []}));
        let dirs = ["/tmp/a".to_string()];
        let with = SessionSetup { additional_directories: &dirs, ..bare };
        assert_eq!(with.params(), json!({"cwd": "/workspace", "mcpServers": [], "additionalDirectories": ["/tmp/a"]}));
    }

    #[test]
    fn content_blocks_follow_prompt_capabilities() {
        let bare = init(json!({}));
        assert!(bare.accepts_block("text") && bare.accepts_block("resource_link"));
        assert!(!bare.accepts_block("image") && !bare.accepts_block("audio") && !bare.accepts_block("resource"));
        assert!(!bare.accepts_block("video"), "unknown kinds never pass");
        let rich = init(json!({"promptCapabilities": {"image": true, "audio": false, "embeddedContext": true}}));
        assert!(rich.accepts_block("image") && rich.accepts_block("resource"));
        assert!(!rich.accepts_block("audio"));
    }

    #[test]
    fn sessions_reopen_by_resume_then_load() {
        assert_eq!(init(json!({})).reopen_method(), None);
        assert_eq!(init(json!({"loadSession": true})).reopen_method(), Some("session/load"));
        let both = init(json!({"loadSession": true, "sessionCapabilities": {"resume": {}}}));
        assert_eq!(both.reopen_method(), Some("session/resume"));
        assert_eq!(init(json!({"sessionCapabilities": {"resume": null}})).reopen_method(), None);
    }

    #[test]
    fn capabilities_are_advertised_by_true_or_an_object() {
        let caps = init(json!({"sessionCapabilities": {"close": {}, "list": null}, "mcpCapabilities": {"http": true, "sse": false}}));
        assert!(caps.advertises("/sessionCapabilities/close"));
        assert!(!caps.advertises("/sessionCapabilities/list"), "null does not advertise");
        assert!(caps.advertises("/mcpCapabilities/http"));
        assert!(!caps.advertises("/mcpCapabilities/sse"));
        assert!(!caps.advertises("/loadSession"));
    }
}
