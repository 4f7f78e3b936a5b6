//! JSON-RPC 2.0 over newline-delimited JSON, as ACP frames it on stdio.
//!
//! One reader task parses the agent's output in order: responses complete our
//! pending requests, notifications go to the [`InboundHandler`] before the next
//! line is read (so a turn's updates always precede its answer), and the agent's
//! own requests are answered from spawned tasks, since some (a permission asked
//! of a human) take long.
//!
//! Ids: we number our requests with integers; the agent's requests keep
//! whatever id it chose (number or string) and live in their own table, so
//! the two spaces never collide. `$/cancel_request` works both ways: the
//! agent's cancels a request we are serving (answered `-32800`), and we send
//! one for a request we stop waiting for.
//!
//! Bad output: until [`RpcConnection::handshake_done`], a line that is not
//! JSON-RPC fails whatever we wait for (an agent that answers `initialize`
//! with garbage gets a clear error at once). After it, such a line, an
//! over-long line or an answer to an id we never sent is reported to the
//! handler and skipped: the session survives, as JSON-RPC allows.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};

/// Longest line accepted from an agent. Embedded images make long lines
/// legitimate; anything past this is skipped without being buffered (the
/// codec discards up to the next newline).
pub const MAX_LINE_BYTES: usize = 16 * 1024 * 1024;

/// JSON-RPC error code of a request cancelled through `$/cancel_request`.
pub const REQUEST_CANCELLED: i64 = -32800;

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

    pub fn request_cancelled() -> Self {
        Self { code: REQUEST_CANCELLED, message: "request cancelled".into(), data: None }
    }

    /// What `data` adds to `message`. Real agents put the reason there:
    /// codex-acp answers a failed turn `-32603 "Internal error"` with
    /// `data: {"message": "stream disconnected ..."}`. A string, or `data`'s
    /// own `message`, is shown as is; other data as compact JSON, cut short.
    pub fn detail(&self) -> Option<String> {
        const MAX_CHARS: usize = 500;
        let text = match self.data.as_ref()? {
            Value::Null => return None,
            Value::String(s) => s.clone(),
            data => match data.get("message").and_then(Value::as_str) {
                Some(m) => m.to_string(),
                None => data.to_string(),
            },
        };
        if text.is_empty() || text == self.message {
            return None;
        }
        Some(match text.char_indices().nth(MAX_CHARS) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text,
        })
    }
}

impl std::fmt::Display for ErrorObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(detail) = self.detail() {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    #[error("agent answered with error {0}")]
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
    /// The agent wrote something that is not a usable message (garbage, an
    /// over-long line, an answer to an unknown id) and the connection went
    /// on. Runs on the reader task: keep it short.
    fn protocol_error(&self, _reason: &str) {}
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

/// The agent's requests being served, by their id as written (`5`, `"a"`):
/// each with the switch that abandons it on `$/cancel_request`.
type Serving = Mutex<HashMap<String, oneshot::Sender<()>>>;

/// Our half of one agent's stdio. Cheap to clone.
#[derive(Clone)]
pub struct RpcConnection {
    lines: mpsc::UnboundedSender<String>,
    next_id: Arc<AtomicI64>,
    pending: Arc<Mutex<Pending>>,
    serving: Arc<Serving>,
    /// Until the handshake is done, garbage fails pending requests.
    strict: Arc<AtomicBool>,
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
        let conn = Self {
            lines,
            next_id: Arc::new(AtomicI64::new(1)),
            pending: Arc::default(),
            serving: Arc::default(),
            strict: Arc::new(AtomicBool::new(true)),
        };
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
    /// dropped (a late answer is logged as unknown rather than delivered) and
    /// the agent is told with `$/cancel_request`.
    pub async fn request_within<P: Serialize>(&self, method: &str, params: &P, timeout: Duration) -> Reply {
        let (id, rx) = self.send_request(method, params)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(reply) => reply.unwrap_or(Err(RpcError::Closed)),
            Err(_) => {
                self.abandon(id);
                Err(RpcError::Timeout { method: method.to_string(), timeout })
            }
        }
    }

    /// Stops waiting for our request `id` and asks the agent to drop it.
    fn abandon(&self, id: i64) {
        if self.pending.lock().unwrap().waiting.remove(&id).is_some() {
            let _ = self.notify("$/cancel_request", &serde_json::json!({"requestId": id}));
        }
    }

    /// The handshake is over: from now on bad output is reported and
    /// skipped instead of failing what we wait for.
    pub fn handshake_done(&self) {
        self.strict.store(false, Ordering::Relaxed);
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
        let mut frames = LineReader::new(from_agent, MAX_LINE_BYTES);
        loop {
            let line = match frames.next().await {
                Ok(Frame::Line(line)) => line,
                Ok(Frame::Eof) => break,
                Ok(Frame::TooLong) => {
                    self.protocol_error(&*handler, format!("a line longer than {MAX_LINE_BYTES} bytes was dropped"));
                    continue;
                }
                Ok(Frame::NotUtf8) => {
                    self.protocol_error(&*handler, "a line that is not UTF-8 was dropped".to_string());
                    continue;
                }
                Err(e) => {
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
                self.protocol_error(&**handler, format!("not JSON-RPC ({e}): {shown:?}"));
                return;
            }
        };
        match (msg.method, msg.id) {
            (Some(method), None) if method == "$/cancel_request" => self.cancel_serving(msg.params),
            (Some(method), None) => handler.notification(&method, msg.params).await,
            (Some(method), Some(id)) => self.serve(Arc::clone(handler), id, method.into_owned(), msg.params.map(|p| p.to_owned())),
            (None, Some(id)) => self.complete(&**handler, id, msg.result, msg.error),
            (None, None) => self.protocol_error(&**handler, "message has neither method nor id".to_string()),
        }
    }

    /// Answers one of the agent's requests from its own task, unless the
    /// agent cancels it first.
    fn serve<H: InboundHandler>(&self, handler: Arc<H>, id: Value, method: String, params: Option<Box<RawValue>>) {
        let key = id.to_string();
        let (cancel_tx, cancel_rx) = oneshot::channel();
        if self.serving.lock().unwrap().insert(key.clone(), cancel_tx).is_some() {
            tracing::warn!(%id, "agent reused the id of a request still being served");
        }
        let conn = self.clone();
        tokio::spawn(async move {
            let result = tokio::select! {
                result = handler.request(method, params) => result,
                Ok(()) = cancel_rx => Err(ErrorObject::request_cancelled()),
            };
            conn.serving.lock().unwrap().remove(&key);
            conn.respond(id, result);
        });
    }

    /// `$/cancel_request` from the agent: the request it names is answered
    /// `-32800` (its handler is dropped). An unknown id is normal: the answer
    /// may have crossed the cancel.
    fn cancel_serving(&self, params: Option<&RawValue>) {
        #[derive(Deserialize)]
        struct Cancel {
            #[serde(rename = "requestId")]
            request_id: Value,
        }
        let Some(Cancel { request_id }) = params.and_then(|p| serde_json::from_str(p.get()).ok()) else {
            tracing::warn!("$/cancel_request without a requestId");
            return;
        };
        match self.serving.lock().unwrap().remove(&request_id.to_string()) {
            Some(cancel) => {
                tracing::info!(%request_id, "agent cancelled its request");
                let _ = cancel.send(());
            }
            None => tracing::debug!(%request_id, "$/cancel_request for a request not being served"),
        }
    }

    fn complete<H: InboundHandler>(&self, handler: &H, id: Value, result: Option<&RawValue>, error: Option<ErrorObject>) {
        let waiter = id.as_i64().and_then(|n| self.pending.lock().unwrap().waiting.remove(&n));
        let Some(waiter) = waiter else {
            let reason = format!("agent answered request id {id}, which we did not send or no longer wait for");
            tracing::warn!("{reason}");
            handler.protocol_error(&reason);
            return;
        };
        let reply = match (result, error) {
            (_, Some(error)) => Err(RpcError::Remote(error)),
            (Some(result), None) => Ok(result.to_owned()),
            (None, None) => Err(RpcError::Protocol("response has neither result nor error".into())),
        };
        let _ = waiter.send(reply);
    }

    /// Garbage during the handshake fails whatever we are waiting for: an
    /// agent that speaks garbage must get a clear error, never a hang. Later
    /// the handler hears of it and the connection goes on.
    fn protocol_error<H: InboundHandler + ?Sized>(&self, handler: &H, reason: String) {
        tracing::warn!(%reason, "agent broke the protocol");
        if self.strict.load(Ordering::Relaxed) {
            let mut pending = self.pending.lock().unwrap();
            for (_, tx) in pending.waiting.drain() {
                let _ = tx.send(Err(RpcError::Protocol(reason.clone())));
            }
        } else {
            handler.protocol_error(&reason);
        }
    }
}

enum Frame {
    Line(String),
    /// Longer than the limit: its bytes were skipped, not kept.
    TooLong,
    NotUtf8,
    Eof,
}

/// Newline-delimited lines with a length limit that survives an over-long
/// line (tokio-util's `LinesCodec` ends the stream after one).
struct LineReader<R> {
    inner: BufReader<R>,
    line: Vec<u8>,
    max: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    fn new(inner: R, max: usize) -> Self {
        Self { inner: BufReader::with_capacity(64 * 1024, inner), line: Vec::new(), max }
    }

    async fn next(&mut self) -> std::io::Result<Frame> {
        self.line.clear();
        let mut skipping = false;
        loop {
            let available = self.inner.fill_buf().await?;
            if available.is_empty() {
                // End of output; a last line without its newline still counts.
                return Ok(match (skipping, self.line.is_empty()) {
                    (true, _) => Frame::TooLong,
                    (false, true) => Frame::Eof,
                    (false, false) => self.take(),
                });
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let part = &available[..newline.unwrap_or(available.len())];
            if !skipping && self.line.len() + part.len() > self.max {
                skipping = true;
                self.line = Vec::new();
            }
            if !skipping {
                self.line.extend_from_slice(part);
            }
            let used = newline.map_or(available.len(), |i| i + 1);
            self.inner.consume(used);
            if newline.is_some() {
                return Ok(if skipping { Frame::TooLong } else { self.take() });
            }
        }
    }

    fn take(&mut self) -> Frame {
        match String::from_utf8(std::mem::take(&mut self.line)) {
            Ok(line) => Frame::Line(line),
            Err(_) => Frame::NotUtf8,
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
    use serde_json::json;

    #[test]
    fn an_agents_error_shows_the_reason_in_its_data() {
        let e = |data: Value| RpcError::Remote(ErrorObject { code: -32603, message: "Internal error".into(), data: Some(data) }).to_string();
        // codex-acp 0.16.0's answer to a prompt it could not send upstream.
        let codex = json!({"message": "stream disconnected before completion: error sending request", "codex_error_info": "other"});
        assert_eq!(e(codex), "agent answered with error -32603: Internal error (stream disconnected before completion: error sending request)");
        assert_eq!(e(json!("disk full")), "agent answered with error -32603: Internal error (disk full)");
        assert_eq!(e(json!({"path": "/x"})), r#"agent answered with error -32603: Internal error ({"path":"/x"})"#);
        assert_eq!(e(json!(null)), "agent answered with error -32603: Internal error");
        assert_eq!(e(json!("Internal error")), "agent answered with error -32603: Internal error", "no echo of the message");
        let long = e(json!("é".repeat(600)));
        assert!(long.ends_with(&format!("({}...)", "é".repeat(500))), "cut on a character boundary: {long}");
    }

    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    impl InboundHandler for Recorder {
        async fn notification(&self, method: &str, params: Option<&RawValue>) {
            self.0.lock().unwrap().push(format!("{method} {}", params.map(|p| p.get()).unwrap_or("")));
        }
        async fn request(&self, method: String, _params: Option<Box<RawValue>>) -> Result<Value, ErrorObject> {
            if method == "terminal/wait_for_exit" {
                // Long like a real wait: only a cancel ends it.
                std::future::pending::<()>().await;
            }
            Err(ErrorObject::method_not_found(&method))
        }
        fn protocol_error(&self, reason: &str) {
            self.0.lock().unwrap().push(format!("protocol error: {reason}"));
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
    async fn unanswered_request_times_out_and_is_cancelled() {
        let (conn, mut agent_in, _agent_out) = pair(Recorder::default());
        let r = conn.request_within("initialize", &(), Duration::from_millis(50)).await;
        assert!(matches!(r, Err(RpcError::Timeout { .. })));
        let sent: Value = serde_json::from_str(&agent_in.next_line().await.unwrap().unwrap()).unwrap();
        let cancel: Value = serde_json::from_str(&agent_in.next_line().await.unwrap().unwrap()).unwrap();
        assert_eq!(cancel["method"], "$/cancel_request");
        assert_eq!(cancel["params"]["requestId"], sent["id"]);
        assert!(cancel.get("id").is_none(), "a notification: {cancel}");
    }

    #[tokio::test]
    async fn after_the_handshake_bad_output_is_reported_and_skipped() {
        let rec = Recorder::default();
        let (conn, mut agent_in, mut agent_out) = pair(rec.clone());
        conn.handshake_done();
        let call = tokio::spawn({
            let conn = conn.clone();
            async move { conn.request("session/prompt", &serde_json::json!({})).await }
        });
        let sent: Value = serde_json::from_str(&agent_in.next_line().await.unwrap().unwrap()).unwrap();
        let id = sent["id"].clone();
        let huge = "x".repeat(MAX_LINE_BYTES + 10);
        let script = format!(
            "not json at all\n{huge}\n{{\"jsonrpc\":\"2.0\",\"id\":987654,\"result\":{{}}}}\n\
             {{\"jsonrpc\":\"2.0\",\"method\":\"session/update\",\"params\":{{\"b\":2}}}}\n\
             {{\"jsonrpc\":\"2.0\",\"id\":{id},\"result\":{{\"stopReason\":\"end_turn\"}}}}\n"
        );
        let writer = tokio::spawn(async move {
            agent_out.write_all(script.as_bytes()).await.unwrap();
            agent_out
        });
        let reply = call.await.unwrap().expect("the turn survives bad lines");
        assert_eq!(reply.get(), "{\"stopReason\":\"end_turn\"}");
        let _agent_out = writer.await.unwrap();
        let seen = rec.0.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen[0].starts_with("protocol error: not JSON-RPC"), "{seen:?}");
        assert!(seen[1].contains("longer than"), "{seen:?}");
        assert!(seen[2].contains("request id 987654"), "{seen:?}");
        assert_eq!(seen[3], "session/update {\"b\":2}");
    }

    #[tokio::test]
    async fn the_agents_cancel_request_answers_its_request_cancelled() {
        let (_conn, mut agent_in, mut agent_out) = pair(Recorder::default());
        // A string id and a numeric one, the same method: only the cancelled one ends.
        agent_out
            .write_all(
                b"{\"jsonrpc\":\"2.0\",\"id\":\"w-1\",\"method\":\"terminal/wait_for_exit\",\"params\":{}}\n\
                  {\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"terminal/wait_for_exit\",\"params\":{}}\n\
                  {\"jsonrpc\":\"2.0\",\"method\":\"$/cancel_request\",\"params\":{\"requestId\":\"w-1\"}}\n\
                  {\"jsonrpc\":\"2.0\",\"id\":\"x\",\"method\":\"nope\"}\n",
            )
            .await
            .unwrap();
        let mut answers = Vec::new();
        for _ in 0..2 {
            answers.push(serde_json::from_str::<Value>(&agent_in.next_line().await.unwrap().unwrap()).unwrap());
        }
        answers.sort_by_key(|a| a["id"].to_string());
        assert_eq!(answers[0]["id"], "w-1");
        assert_eq!(answers[0]["error"]["code"], REQUEST_CANCELLED);
        assert_eq!(answers[1]["id"], "x");
        assert_eq!(answers[1]["error"]["code"], -32601);
        // The numeric request 1 is still being served: nothing else came.
        let more = tokio::time::timeout(Duration::from_millis(100), agent_in.next_line()).await;
        assert!(more.is_err(), "unexpected answer: {more:?}");
    }
}
