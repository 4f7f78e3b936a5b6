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

/// The agent's `initialize` answer: the version, and the whole answer verbatim
/// for clients that want its capabilities.
#[derive(Debug, Clone)]
pub struct Initialized {
    pub protocol_version: u64,
    pub raw: String,
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
        Ok(Initialized { protocol_version: answer.protocol_version, raw: raw.get().to_string() })
    }

    pub async fn new_session(&self, cwd: &str, timeout: Duration) -> Result<String, AcpError> {
        let params = json!({"cwd": cwd, "mcpServers": []});
        let raw = self.rpc.request_within("session/new", &params, timeout).await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Answer {
            session_id: String,
        }
        Ok(parse::<Answer>("session/new", &raw)?.session_id)
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
