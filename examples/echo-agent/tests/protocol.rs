//! Drives the built `echo-agent` binary over raw JSON lines, the way an ACP
//! client would, without going through any SDK: the point is to pin down
//! exactly what goes over the wire.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Generous, because the test binary may share two cores with a workspace build.
const TIMEOUT: Duration = Duration::from_secs(20);

struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines from stdout, read on a thread so reads can time out.
    lines: Receiver<String>,
    next_id: u64,
}

impl Agent {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_echo-agent"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn echo-agent");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
            next_id: 1,
        }
    }

    fn send(&mut self, message: &Value) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{message}").expect("write to agent");
        stdin.flush().expect("flush to agent");
    }

    /// Sends a request and returns its id, without waiting for the answer.
    fn request(&mut self, method: &str, params: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        id
    }

    fn notify(&mut self, method: &str, params: Value) {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    fn line(&self) -> String {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => panic!("no line from agent within {TIMEOUT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("agent closed stdout"),
        }
    }

    fn message(&self) -> Value {
        let line = self.line();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Reads messages until the response to `id`, returning it together with
    /// the text of every `agent_message_chunk` seen on the way.
    fn response_with_chunks(&self, id: u64) -> (Value, Vec<String>) {
        let mut chunks = Vec::new();
        loop {
            let message = self.message();
            assert_eq!(message["jsonrpc"], "2.0", "{message}");
            if message["id"] == json!(id) {
                return (message, chunks);
            }
            assert_eq!(message["method"], "session/update", "unexpected: {message}");
            let update = &message["params"]["update"];
            assert_eq!(update["sessionUpdate"], "agent_message_chunk", "{message}");
            assert_eq!(update["content"]["type"], "text", "{message}");
            chunks.push(
                update["content"]["text"]
                    .as_str()
                    .expect("chunk text")
                    .to_owned(),
            );
        }
    }

    fn response(&self, id: u64) -> Value {
        let (response, chunks) = self.response_with_chunks(id);
        assert!(
            chunks.is_empty(),
            "unexpected updates before response {id}: {chunks:?}"
        );
        response
    }

    fn initialize(&mut self) -> Value {
        let id = self.request(
            "initialize",
            json!({"protocolVersion": 1, "clientCapabilities": {}}),
        );
        let response = self.response(id);
        response["result"].clone()
    }

    fn new_session(&mut self) -> String {
        let id = self.request("session/new", json!({"cwd": "/tmp", "mcpServers": []}));
        let response = self.response(id);
        response["result"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {response}"))
            .to_owned()
    }

    fn prompt(&mut self, session_id: &str, text: &str) -> u64 {
        self.request(
            "session/prompt",
            json!({"sessionId": session_id, "prompt": [{"type": "text", "text": text}]}),
        )
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn echoes_a_prompt_as_word_chunks() {
    let mut agent = Agent::spawn(&[]);

    let init = agent.initialize();
    assert_eq!(init["protocolVersion"], json!(1));
    assert!(init["protocolVersion"].is_u64(), "{init}");
    assert_eq!(init["agentCapabilities"]["loadSession"], json!(false));
    assert!(
        init.get("authMethods").is_none_or(|m| m == &json!([])),
        "{init}"
    );

    let session = agent.new_session();
    assert!(session.starts_with("sess_"), "{session}");
    assert_ne!(agent.new_session(), session, "session ids must be fresh");

    let id = agent.prompt(&session, "hello world");
    let (response, chunks) = agent.response_with_chunks(id);
    assert_eq!(chunks, ["hello ", "world"]);
    assert_eq!(chunks.concat(), "hello world");
    assert_eq!(response["result"], json!({"stopReason": "end_turn"}));

    // Text blocks are concatenated; other block kinds are skipped.
    let id = agent.request(
        "session/prompt",
        json!({"sessionId": session, "prompt": [
            {"type": "text", "text": "one "},
            {"type": "resource_link", "name": "f", "uri": "file:///f"},
            {"type": "text", "text": "two"},
        ]}),
    );
    let (response, chunks) = agent.response_with_chunks(id);
    assert_eq!(chunks.concat(), "one two");
    assert_eq!(response["result"]["stopReason"], "end_turn");

    agent.close_stdin();
    assert_eq!(agent.wait().code(), Some(0));
}

#[test]
fn chunk_size_and_repeat_flags() {
    let mut agent = Agent::spawn(&["--chunk-chars", "4", "--repeat", "3"]);
    agent.initialize();
    let session = agent.new_session();

    let text = "abcdefghij klmnö";
    let id = agent.prompt(&session, text);
    let (response, chunks) = agent.response_with_chunks(id);
    assert_eq!(chunks.concat(), text.repeat(3));
    assert!(
        chunks.iter().all(|c| (1..=4).contains(&c.chars().count())),
        "{chunks:?}"
    );
    assert_eq!(chunks.len(), 3 * 4);
    assert_eq!(response["result"]["stopReason"], "end_turn");
}

#[test]
fn unknown_session_is_invalid_params() {
    let mut agent = Agent::spawn(&[]);
    agent.initialize();
    let id = agent.prompt("sess_does_not_exist", "hi");
    let response = agent.response(id);
    assert_eq!(response["error"]["code"], json!(-32602), "{response}");
}

#[test]
fn cancel_stops_a_running_turn() {
    let mut agent = Agent::spawn(&["--delay-ms", "200"]);
    agent.initialize();
    let session = agent.new_session();

    let words = 30;
    let text = (0..words)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let started = Instant::now();
    let id = agent.prompt(&session, &text);

    // Wait for the turn to be visibly under way before cancelling.
    let first = agent.message();
    assert_eq!(first["method"], "session/update", "{first}");

    // A second prompt on a busy session is refused, and the first goes on.
    let busy = agent.prompt(&session, "again");
    let refused = agent.response(busy);
    assert!(refused["error"]["code"].is_i64(), "{refused}");

    agent.notify("session/cancel", json!({"sessionId": session}));
    let (response, chunks) = agent.response_with_chunks(id);
    assert_eq!(response["result"], json!({"stopReason": "cancelled"}));
    assert!(
        chunks.len() + 1 < words,
        "turn was not cut short: {chunks:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(200 * words as u64),
        "cancel took too long"
    );

    // The session is free again once the cancelled turn has answered.
    let id = agent.prompt(&session, "after");
    let (response, chunks) = agent.response_with_chunks(id);
    assert_eq!(chunks, ["after"]);
    assert_eq!(response["result"]["stopReason"], "end_turn");
}

#[test]
fn cancel_stops_a_turn_without_delay() {
    // Far more chunks than can be written before the cancel arrives, so this
    // checks that a turn with nothing to wait on still notices the cancel.
    let repeat = 100_000;
    let mut agent = Agent::spawn(&["--repeat", &repeat.to_string()]);
    agent.initialize();
    let session = agent.new_session();

    let id = agent.prompt(&session, "a b c d");
    let first = agent.message();
    assert_eq!(first["method"], "session/update", "{first}");
    agent.notify("session/cancel", json!({"sessionId": session}));

    let (response, chunks) = agent.response_with_chunks(id);
    assert_eq!(response["result"], json!({"stopReason": "cancelled"}));
    assert!(chunks.len() + 1 < 4 * repeat, "turn was not cut short");
}

#[test]
fn eof_lets_running_turns_finish() {
    let mut agent = Agent::spawn(&["--delay-ms", "20"]);
    agent.initialize();
    let session = agent.new_session();
    let id = agent.prompt(&session, "still delivered after eof");
    agent.close_stdin();
    let (response, chunks) = agent.response_with_chunks(id);
    assert_eq!(chunks.concat(), "still delivered after eof");
    assert_eq!(response["result"]["stopReason"], "end_turn");
    assert_eq!(agent.wait().code(), Some(0));
}

#[test]
fn fail_initialize_exit_exits_with_code_3() {
    let mut agent = Agent::spawn(&["--fail-initialize", "exit"]);
    agent.request(
        "initialize",
        json!({"protocolVersion": 1, "clientCapabilities": {}}),
    );
    assert_eq!(agent.wait().code(), Some(3));
    assert!(
        agent.lines.recv_timeout(TIMEOUT).is_err(),
        "no output expected"
    );
}

#[test]
fn fail_initialize_garbage_writes_a_non_json_line_and_keeps_running() {
    let mut agent = Agent::spawn(&["--fail-initialize", "garbage"]);
    agent.request(
        "initialize",
        json!({"protocolVersion": 1, "clientCapabilities": {}}),
    );
    let line = agent.line();
    assert!(
        serde_json::from_str::<Value>(&line).is_err(),
        "expected garbage, got {line}"
    );

    thread::sleep(Duration::from_millis(200));
    assert!(
        agent.is_running(),
        "agent must keep running after the garbage"
    );
    assert!(
        agent
            .lines
            .recv_timeout(Duration::from_millis(200))
            .is_err(),
        "initialize must stay unanswered"
    );

    agent.close_stdin();
    assert_eq!(agent.wait().code(), Some(0));
}

#[test]
fn fail_initialize_error_answers_with_an_error() {
    let mut agent = Agent::spawn(&["--fail-initialize", "error"]);
    let id = agent.request(
        "initialize",
        json!({"protocolVersion": 1, "clientCapabilities": {}}),
    );
    let response = agent.response(id);
    assert!(response.get("result").is_none(), "{response}");
    assert!(response["error"]["code"].is_i64(), "{response}");
    assert!(response["error"]["message"].is_string(), "{response}");
}

#[test]
fn fail_initialize_hang_never_answers() {
    let mut agent = Agent::spawn(&["--fail-initialize", "hang"]);
    agent.request(
        "initialize",
        json!({"protocolVersion": 1, "clientCapabilities": {}}),
    );
    assert!(
        agent
            .lines
            .recv_timeout(Duration::from_millis(500))
            .is_err(),
        "initialize must stay unanswered"
    );
    assert!(agent.is_running());
    agent.close_stdin();
    assert_eq!(agent.wait().code(), Some(0));
}
