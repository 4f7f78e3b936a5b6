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
        self.initialize_with(json!({}))
    }

    fn initialize_with(&mut self, client_capabilities: Value) -> Value {
        let id = self.request(
            "initialize",
            json!({"protocolVersion": 1, "clientCapabilities": client_capabilities}),
        );
        let response = self.response(id);
        response["result"].clone()
    }

    /// Plays the client until the response to `id`: each request the agent
    /// makes is recorded and answered by `answer` (a JSON-RPC result or
    /// error object, as `Ok`/`Err`), each `session/update` recorded.
    fn serve_until(
        &mut self,
        id: u64,
        mut answer: impl FnMut(&str, &Value) -> Result<Value, Value>,
    ) -> Served {
        let mut served = Served::default();
        loop {
            let message = self.message();
            if message["id"] == json!(id) && message.get("method").is_none() {
                served.response = message;
                return served;
            }
            let method = message["method"].as_str().expect("a method").to_owned();
            if method == "session/update" {
                served.updates.push(message["params"]["update"].clone());
                continue;
            }
            let reply = match answer(&method, &message["params"]) {
                Ok(result) => json!({"jsonrpc": "2.0", "id": message["id"], "result": result}),
                Err(error) => json!({"jsonrpc": "2.0", "id": message["id"], "error": error}),
            };
            served.requests.push((method, message["params"].clone()));
            self.send(&reply);
        }
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

/// What a turn showed the client: its requests, its updates, its answer.
#[derive(Default, Debug)]
struct Served {
    requests: Vec<(String, Value)>,
    updates: Vec<Value>,
    response: Value,
}

impl Served {
    fn text(&self) -> String {
        self.updates
            .iter()
            .filter(|u| u["sessionUpdate"] == "agent_message_chunk")
            .map(|u| u["content"]["text"].as_str().unwrap().to_owned())
            .collect()
    }

    fn methods(&self) -> Vec<&str> {
        self.requests.iter().map(|(m, _)| m.as_str()).collect()
    }
}

const ALL_CAPABILITIES: &str =
    r#"{"fs": {"readTextFile": true, "writeTextFile": true}, "terminal": true}"#;

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

#[test]
fn commands_call_nothing_the_client_did_not_offer() {
    let mut agent = Agent::spawn(&[]);
    agent.initialize();
    let session = agent.new_session();
    for (prompt, said) in [
        (
            "/read /w/a.txt",
            "error: the client does not offer fs/read_text_file",
        ),
        (
            "/write /w/a.txt x",
            "error: the client does not offer fs/write_text_file",
        ),
        ("/run true", "error: the client does not offer terminals"),
        (
            "/kill sleep 1",
            "error: the client does not offer terminals",
        ),
    ] {
        let id = agent.prompt(&session, prompt);
        let served = agent.serve_until(id, |m, _| panic!("{m} called"));
        assert_eq!(served.text(), said);
        assert_eq!(served.response["result"]["stopReason"], "end_turn");
    }
    // Unknown commands and plain text are echoed as ever.
    let id = agent.prompt(&session, "/nothing here");
    assert_eq!(
        agent.serve_until(id, |m, _| panic!("{m} called")).text(),
        "/nothing here"
    );
}

#[test]
fn fs_commands_send_spec_shaped_requests() {
    let mut agent = Agent::spawn(&[]);
    agent.initialize_with(serde_json::from_str(ALL_CAPABILITIES).unwrap());
    let session = agent.new_session();

    let id = agent.prompt(&session, "/read /w/a.txt 2 3");
    let served = agent.serve_until(id, |_, _| Ok(json!({"content": "two\nthree\n"})));
    assert_eq!(
        served.requests,
        [(
            "fs/read_text_file".to_owned(),
            json!({"sessionId": session, "path": "/w/a.txt", "line": 2, "limit": 3})
        )]
    );
    assert_eq!(served.text(), "two\nthree\n");

    let id = agent.prompt(&session, "/read /etc/passwd");
    let served = agent.serve_until(id, |_, _| {
        Err(json!({"code": -32602, "message": "outside the workspace"}))
    });
    assert_eq!(
        served.requests[0].1,
        json!({"sessionId": session, "path": "/etc/passwd"})
    );
    assert_eq!(served.text(), "error -32602: outside the workspace");
    assert_eq!(served.response["result"]["stopReason"], "end_turn");

    let id = agent.prompt(&session, "/write /w/new.txt héllo\nworld");
    let served = agent.serve_until(id, |_, _| Ok(Value::Null));
    assert_eq!(
        served.requests,
        [(
            "fs/write_text_file".to_owned(),
            json!({"sessionId": session, "path": "/w/new.txt", "content": "héllo\nworld"})
        )]
    );
    assert_eq!(served.text(), "wrote 12 bytes to /w/new.txt");
}

#[test]
fn run_drives_a_terminal_and_reports_a_tool_call() {
    let mut agent = Agent::spawn(&[]);
    agent.initialize_with(serde_json::from_str(ALL_CAPABILITIES).unwrap());
    let session = agent.new_session();

    let id = agent.prompt(
        &session,
        "/run --limit 64 --env A=1 --cwd /tmp sh -c 'echo o; exit 3'",
    );
    let served = agent.serve_until(id, |method, _| match method {
        "terminal/create" => Ok(json!({"terminalId": "t1"})),
        "terminal/wait_for_exit" => Ok(json!({"exitCode": 3, "signal": null})),
        "terminal/output" => {
            Ok(json!({"output": "o\n", "truncated": false, "exitStatus": {"exitCode": 3}}))
        }
        "terminal/release" => Ok(json!({})),
        other => panic!("unexpected {other}"),
    });
    assert_eq!(
        served.methods(),
        [
            "terminal/create",
            "terminal/wait_for_exit",
            "terminal/output",
            "terminal/release"
        ]
    );
    assert_eq!(
        served.requests[0].1,
        json!({"sessionId": session, "command": "sh", "args": ["-c", "echo o; exit 3"],
               "env": [{"name": "A", "value": "1"}], "cwd": "/tmp", "outputByteLimit": 64})
    );
    for (_, params) in &served.requests[1..] {
        assert_eq!(params, &json!({"sessionId": session, "terminalId": "t1"}));
    }
    assert_eq!(served.text(), "o\n[exit code 3]");
    let calls: Vec<&Value> = served
        .updates
        .iter()
        .filter(|u| u["sessionUpdate"] != "agent_message_chunk")
        .collect();
    assert_eq!(calls[0]["sessionUpdate"], "tool_call");
    assert_eq!(calls[0]["kind"], "execute");
    assert_eq!(calls[0]["title"], "sh -c echo o; exit 3");
    let call_id = &calls[0]["toolCallId"];
    assert_eq!(
        calls[1]["content"],
        json!([{"type": "terminal", "terminalId": "t1"}])
    );
    let last = calls.last().unwrap();
    assert_eq!(last["sessionUpdate"], "tool_call_update");
    assert_eq!(&last["toolCallId"], call_id);
    assert_eq!(last["status"], "completed");
    assert_eq!(
        last["rawOutput"],
        json!({"output": "o\n", "truncated": false, "exitCode": 3, "signal": null})
    );
    assert_eq!(served.response["result"]["stopReason"], "end_turn");
}

#[test]
fn kill_kills_before_waiting_and_errors_are_reported() {
    let mut agent = Agent::spawn(&[]);
    agent.initialize_with(serde_json::from_str(ALL_CAPABILITIES).unwrap());
    let session = agent.new_session();

    let id = agent.prompt(&session, "/kill sleep 100");
    let served = agent.serve_until(id, |method, _| match method {
        "terminal/create" => Ok(json!({"terminalId": "t2"})),
        "terminal/kill" | "terminal/release" => Ok(json!({})),
        "terminal/wait_for_exit" => Ok(json!({"exitCode": null, "signal": "SIGKILL"})),
        "terminal/output" => {
            Ok(json!({"output": "", "truncated": false, "exitStatus": {"signal": "SIGKILL"}}))
        }
        other => panic!("unexpected {other}"),
    });
    assert_eq!(
        served.methods(),
        [
            "terminal/create",
            "terminal/kill",
            "terminal/wait_for_exit",
            "terminal/output",
            "terminal/release"
        ]
    );
    assert_eq!(served.text(), "[signal SIGKILL]");

    let id = agent.prompt(&session, "/run no-such-command");
    let served = agent.serve_until(id, |_, _| {
        Err(json!({"code": -32002, "message": "command not found: no-such-command"}))
    });
    assert_eq!(served.methods(), ["terminal/create"]);
    assert_eq!(
        served.text(),
        "error -32002: command not found: no-such-command"
    );
    let last = served
        .updates
        .iter()
        .rfind(|u| u["sessionUpdate"] == "tool_call_update")
        .unwrap();
    assert_eq!(last["status"], "failed");

    let id = agent.prompt(&session, "/output term_gone");
    let served = agent.serve_until(id, |_, _| {
        Err(json!({"code": -32002, "message": "no terminal term_gone"}))
    });
    assert_eq!(
        served.requests[0],
        (
            "terminal/output".to_owned(),
            json!({"sessionId": session, "terminalId": "term_gone"})
        )
    );
    assert_eq!(served.text(), "error -32002: no terminal term_gone");
}
