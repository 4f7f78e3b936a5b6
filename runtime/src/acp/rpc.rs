//! JSON-RPC 2.0 over newline-delimited JSON, as ACP frames it on stdio.
//!
//! One reader task parses the agent's output in order: responses complete our
//! pending requests, notifications go to the [`InboundHandler`] before the next
//! line is read (so a turn's updates always precede its answer), and the agent's
//! own requests are answered from spawned tasks, since some (a permission asked
//! of a human) take long.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

/// Longest line accepted from an agent. Embedded images make long lines
/// legitimate; anything past this is treated as garbage.
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// The error member of a JSON-RPC response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorObject {
    pub code: i64,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    pub fn method_not_found(method: &str) -> Self {
        Self { code: -32601, message: format!("method not found: {method}"), data: None }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    #[error("agent answered with error {}: {}", .0.code, .0.message)]
    Remote(ErrorObject),
    #[error("agent broke the protocol: {0}")]
    Protocol(String),
    #[error("agent closed its output")]
    Closed,
    #[error("agent did not answer {method} within {timeout:?}")]
    Timeout { method: String, timeout: Duration },
}

/// What the supervisor does with messages the agent starts.
pub trait InboundHandler: Send + Sync + 'static {
    /// Runs on the reader task, in order: keep it to a channel send.
    fn notification(&self, method: &str, params: Option<&RawValue>) -> impl Future<Output = ()> + Send;
    /// Runs on its own task; the result is sent back as the response.
    fn request(
        &self,
        method: String,
        params: Option<Box<RawValue>>,
    ) -> impl Future<Output = Result<Value, ErrorObject>> + Send;
}

type Reply = Result<Box<RawValue>, RpcError>;

#[derive(Default)]
struct Pending {
    waiting: HashMap<i64, oneshot::Sender<Reply>>,
    /// Set once the agent's output is unusable; later requests fail at once.
    broken: Option<RpcError>,
}

impl Pending {
    fn fail_all(&mut self, error: RpcError) {
        for (_, tx) in self.waiting.drain() {
            let _ = tx.send(Err(error.clone()));
        }
        self.broken = Some(error);
    }
}

/// Our half of one agent's stdio. Cheap to clone.
#[derive(Clone)]
pub struct RpcConnection {
    lines: mpsc::UnboundedSender<String>,
    next_id: Arc<AtomicI64>,
    pending: Arc<Mutex<Pending>>,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default, borrow)]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    params: Option<&'a RawValue>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<ErrorObject>,
}

impl RpcConnection {
    /// Starts the reader and writer tasks on the agent's stdout and stdin.
    pub fn start<R, W, H>(from_agent: R, to_agent: W, handler: H) -> Self
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
        H: InboundHandler,
    {
        let (lines, rx) = mpsc::unbounded_channel();
        let conn = Self { lines, next_id: Arc::new(AtomicI64::new(1)), pending: Arc::default() };
        tokio::spawn(write_loop(to_agent, rx));
        tokio::spawn(conn.clone().read_loop(from_agent, Arc::new(handler)));
        conn
    }

    /// Sends a request and waits for its answer.
    pub async fn request<P: Serialize>(&self, method: &str, params: &P) -> Reply {
        match self.send_request(method, params) {
            Ok((_, rx)) => rx.await.unwrap_or(Err(RpcError::Closed)),
            Err(e) => Err(e),
        }
    }

    /// Like [`Self::request`] with a deadline. On timeout the pending entry is
    /// dropped, so a late answer is logged as unknown rather than delivered.
    pub async fn request_within<P: Serialize>(&self, method: &str, params: &P, timeout: Duration) -> Reply {
        let (id, rx) = self.send_request(method, params)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(reply) => reply.unwrap_or(Err(RpcError::Closed)),
            Err(_) => {
                self.pending.lock().unwrap().waiting.remove(&id);
                Err(RpcError::Timeout { method: method.to_string(), timeout })
            }
        }
    }

    fn send_request<P: Serialize>(&self, method: &str, params: &P) -> Result<(i64, oneshot::Receiver<Reply>), RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().unwrap();
            if let Some(e) = &pending.broken {
                return Err(e.clone());
            }
            pending.waiting.insert(id, tx);
        }
        let line = serde_json::to_string(&serde_json::json!({
            "jsonrpc": "2.0", "id": id, "method": method, "params": params,
        }))
        .expect("request serializes");
        if self.lines.send(line).is_err() {
            self.pending.lock().unwrap().waiting.remove(&id);
            return Err(RpcError::Closed);
        }
        Ok((id, rx))
    }

    pub fn notify<P: Serialize>(&self, method: &str, params: &P) -> Result<(), RpcError> {
        let line = serde_json::to_string(&serde_json::json!({
            "jsonrpc": "2.0", "method": method, "params": params,
        }))
        .expect("notification serializes");
        self.lines.send(line).map_err(|_| RpcError::Closed)
    }

    fn respond(&self, id: Value, result: Result<Value, ErrorObject>) {
        let msg = match result {
            Ok(result) => serde_json::json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err(error) => serde_json::json!({"jsonrpc": "2.0", "id": id, "error": error}),
        };
        let _ = self.lines.send(msg.to_string());
    }

    /// The reason the connection stopped working, if it has.
    pub fn broken(&self) -> Option<RpcError> {
        self.pending.lock().unwrap().broken.clone()
    }

    async fn read_loop<R: AsyncRead + Unpin, H: InboundHandler>(self, from_agent: R, handler: Arc<H>) {
        let mut frames = FramedRead::new(from_agent, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
        while let Some(frame) = frames.next().await {
            let line = match frame {
                Ok(line) => line,
                Err(LinesCodecError::MaxLineLengthExceeded) => {
                    self.protocol_error(format!("line longer than {MAX_LINE_BYTES} bytes"));
                    continue;
                }
                Err(LinesCodecError::Io(e)) => {
                    tracing::warn!(error = %e, "reading from agent failed");
                    break;
                }
            };
            if line.trim().is_empty() {
                continue;
            }
            self.dispatch(&line, &handler).await;
        }
        self.pending.lock().unwrap().fail_all(RpcError::Closed);
    }

    async fn dispatch<H: InboundHandler>(&self, line: &str, handler: &Arc<H>) {
        let msg: Incoming<'_> = match serde_json::from_str(line) {
            Ok(msg) => msg,
            Err(e) => {
                let shown: String = line.chars().take(200).collect();
                self.protocol_error(format!("not JSON-RPC ({e}): {shown:?}"));
                return;
            }
        };
        match (msg.method, msg.id) {
            (Some(method), None) => handler.notification(&method, msg.params).await,
            (Some(method), Some(id)) => {
                let handler = Arc::clone(handler);
                let conn = self.clone();
                let method = method.into_owned();
                let params = msg.params.map(|p| p.to_owned());
                tokio::spawn(async move {
                    let result = handler.request(method, params).await;
                    conn.respond(id, result);
                });
            }
            (None, Some(id)) => self.complete(id, msg.result, msg.error),
            (None, None) => self.protocol_error("message has neither method nor id".to_string()),
        }
    }

    fn complete(&self, id: Value, result: Option<&RawValue>, error: Option<ErrorObject>) {
        let waiter = id.as_i64().and_then(|n| self.pending.lock().unwrap().waiting.remove(&n));
        let Some(waiter) = waiter else {
            tracing::warn!(%id, "agent answered a request we did not send (or no longer wait for)");
            return;
        };
        let reply = match (result, error) {
            (_, Some(error)) => Err(RpcError::Remote(error)),
            (Some(result), None) => Ok(result.to_owned()),
            (None, None) => Err(RpcError::Protocol("response has neither result nor error".into())),
        };
        let _ = waiter.send(reply);
    }

    /// Garbage on the agent's stdout fails whatever we are waiting for: an agent
    /// that speaks garbage must get a clear error, never a hang.
    fn protocol_error(&self, reason: String) {
        tracing::warn!(%reason, "agent broke the protocol");
        let mut pending = self.pending.lock().unwrap();
        for (_, tx) in pending.waiting.drain() {
            let _ = tx.send(Err(RpcError::Protocol(reason.clone())));
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(to_agent: W, mut rx: mpsc::UnboundedReceiver<String>) {
    let mut out = BufWriter::new(to_agent);
    while let Some(line) = rx.recv().await {
        let mut batch = Some(line);
        // Write everything already queued, then flush once.
        while let Some(line) = batch {
            if out.write_all(line.as_bytes()).await.is_err() || out.write_all(b"\n").await.is_err() {
                return;
            }
            batch = rx.try_recv().ok();
        }
        if out.flush().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl InboundHandler for Recorder {
        async fn notification(&self, method: &str, params: Option<&RawValue>) {
            self.0.lock().unwrap().push(format!("{method} {}", params.map(|p| p.get()).unwrap_or("")));
        }
        async fn request(&self, method: String, _params: Option<Box<RawValue>>) -> Result<Value, ErrorObject> {
            Err(ErrorObject::method_not_found(&method))
        }
    }

    /// A fake agent on an in-memory pipe: returns our connection, the agent's
    /// line reader and its writer.
    fn pair(handler: Recorder) -> (RpcConnection, tokio::io::Lines<BufReader<tokio::io::DuplexStream>>, tokio::io::DuplexStream) {
        let (ours_out, theirs_in) = tokio::io::duplex(1 << 16);
        let (theirs_out, ours_in) = tokio::io::duplex(1 << 16);
        let conn = RpcConnection::start(ours_in, ours_out, handler);
        (conn, BufReader::new(theirs_in).lines(), theirs_out)
    }

    #[tokio::test]
    async fn request_gets_its_own_response_and_notifications_keep_order() {
        let rec = Recorder::default();
        let (conn, mut agent_in, mut agent_out) = pair(rec.clone());
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.request("initialize", &serde_json::json!({"protocolVersion": 1})).await }
        });
        let sent: Value = serde_json::from_str(&agent_in.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(sent["method"], "initialize");
        let id = sent["id"].clone();
        // Their request ids may collide with ours: they are a separate space.
        let script = format!(
            "{{\"jsonrpc\":\"2.0\",\"method\":\"session/update\",\"params\":{{\"a\":1}}}}\n\
             {{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"fs/read_text_file\",\"params\":{{}}}}\n\
             {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"protocolVersion\":1}}}}\n"
        );
        agent_out.write_all(script.as_bytes()).await.unwrap();
        let reply = call.await.unwrap().unwrap();
        assert_eq!(reply.get(), "{\"protocolVersion\":1}");
        assert_eq!(rec.0.lock().unwrap().as_slice(), ["session/update {\"a\":1}"]);
        let answer: Value = serde_json::from_str(&agent_in.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(answer["id"], id);
        assert_eq!(answer["error"]["code"], -32601);
    }

    #[tokio::test]
    async fn garbage_fails_the_pending_request_with_a_protocol_error() {
        let (conn, mut agent_in, mut agent_out) = pair(Recorder::default());
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.request("initialize", &serde_json::json!({})).await }
        });
        agent_in.next_line().await.unwrap().unwrap();
        agent_out.write_all(b"Hello, I am not JSON\n").await.unwrap();
        match call.await.unwrap() {
            Err(RpcError::Protocol(reason)) => assert!(reason.contains("not JSON-RPC"), "{reason}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn closed_output_fails_pending_and_later_requests() {
        let (conn, mut agent_in, agent_out) = pair(Recorder::default());
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.request("session/new", &serde_json::json!({})).await }
        });
        agent_in.next_line().await.unwrap().unwrap();
        drop(agent_out);
        assert!(matches!(call.await.unwrap(), Err(RpcError::Closed)));
        assert!(matches!(conn.request("x", &()).await, Err(RpcError::Closed)));
    }

    #[tokio::test]
    async fn unanswered_request_times_out() {
        let (conn, _agent_in, _agent_out) = pair(Recorder::default());
        let r = conn.request_within("initialize", &(), Duration::from_millis(50)).await;
        assert!(matches!(r, Err(RpcError::Timeout { .. })));
    }
}
