//! A running `agentd up` for one test, an SSE reader and request helpers.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};

pub use agentd_testkit::procfs;

pub mod browser;
pub mod daemon;
pub mod fleet;
pub mod host;

/// Set in agentd's environment; agents must never see it.
pub const MARKER_VAR: &str = "AGENTD_TEST_MARKER_MUST_NOT_LEAK";

pub struct Agentd {
    child: Option<Child>,
    /// The state directory, as the host sees it.
    state: PathBuf,
    /// The temp dir holding `state`, removed after the process is gone;
    /// none when the caller owns the state directory.
    _scratch: Option<tempfile::TempDir>,
    /// The node's cgroup subtree name (`AGENTD_CGROUP_SUBTREE`).
    pub subtree: String,
    pub base: String,
    pub http: reqwest::Client,
    log: Arc<Mutex<Vec<String>>>,
    /// Logs of the processes before a restart.
    earlier: Arc<Mutex<Vec<String>>>,
}

/// `agentd`, the binary users run: it builds sandboxes (their PID 1 is a
/// fork of it) and executes agentd-daemon, this package's binary, for the
/// daemon's subcommands. Built by the agentd-sandbox package into the same
/// target directory.
pub fn agentd_bin() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_agentd-daemon")).with_file_name("agentd");
    assert!(path.is_file(), "{} is missing: build the workspace's binaries first (see README)", path.display());
    path
}

/// The example agent, built into the same target directory as agentd.
pub fn echo_agent() -> PathBuf {
    let path = agentd_bin().with_file_name("echo-agent");
    assert!(path.is_file(), "{} is missing: build the workspace's binaries first (see README)", path.display());
    path
}

/// A session request with the manual echo agent, run with `args`.
/// The text of every `agent_message_chunk`-like update, in order.
pub fn said(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.event == "session.update")
        .filter_map(|e| e.json()["update"]["content"]["text"].as_str().map(str::to_string))
        .collect()
}

/// A body for one more session in `container_id`, the echo agent run with `args`.
pub fn in_container(container_id: &str, args: &[&str]) -> Value {
    let mut body = session_body(args);
    body.as_object_mut().unwrap().remove("container_profile");
    body["container_id"] = json!(container_id);
    body
}

/// Prompts and returns the turn's events; the turn must complete.
pub async fn turn(agentd: &Agentd, id: &str, events: &mut Sse, prompt: &str) -> Vec<SseEvent> {
    let (status, answer) = agentd.prompt(id, prompt).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let got = events.until_run_end().await;
    assert_eq!(got.last().unwrap().event, "run.completed", "{got:?}");
    got
}

pub fn session_body(args: &[&str]) -> Value {
    let exe = echo_agent().display().to_string();
    json!({
        "manual_agent": {"id": "echo-local", "version": "1.0.0", "source": "manual",
            "protocol": {"auth_modes": ["agent"]},
            "distribution": {"type": "binary",
                "binary": {"url": format!("file://{exe}"), "executable": exe, "args": args}}},
        "container_profile": {},
        "session": {"working_dir": "/workspace"}
    })
}

impl Agentd {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(env: &[(&str, &str)]) -> Self {
        Self::start_full(&[], env).await
    }

    /// `agentd up` with extra command-line flags and environment.
    pub async fn start_full(args: &[&str], env: &[(&str, &str)]) -> Self {
        let state = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
        let cmd = Self::up_command(state.path(), args);
        Self::start_command(cmd, state.path().to_owned(), Some(state), env).await
    }

    fn up_command(state: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new(agentd_bin());
        cmd.args(["up", "--listen", "127.0.0.1:0", "--state-dir"]).arg(state).args(args);
        cmd
    }

    /// Starts `cmd`, an `agentd up` listening on port 0 however it is run
    /// (through a wrapper, in a chroot), whose state directory the host
    /// sees at `state`; `scratch` is removed once the process is gone.
    pub async fn start_command(cmd: Command, state: PathBuf, scratch: Option<tempfile::TempDir>, env: &[(&str, &str)]) -> Self {
        let subtree = format!("agentd-e2e-{}-{}", std::process::id(), state.file_name().unwrap().to_string_lossy().replace('.', ""));
        let (child, base, log) = Self::spawn(cmd, &subtree, env);
        let http = admin_client(&state);
        Self { child: Some(child), state, _scratch: scratch, subtree, base, http, log, earlier: Arc::default() }
    }

    /// Runs `cmd` (an `agentd up` on its cgroup subtree) until it listens.
    fn spawn(mut cmd: Command, subtree: &str, env: &[(&str, &str)]) -> (Child, String, Arc<Mutex<Vec<String>>>) {
        let mut child = cmd
            .env("AGENTD_LOG", "info,agentd_controlplane=debug")
            .env(MARKER_VAR, "1")
            .env("AGENTD_CGROUP_SUBTREE", subtree)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agentd up");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn({
            let log = Arc::clone(&log);
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("API listening")
                        && let Some(addr) = line.split("listen=").nth(1)
                    {
                        let _ = addr_tx.send(addr.trim().to_string());
                    }
                    log.lock().unwrap().push(line);
                }
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("agentd did not start; its log:\n{}", log.lock().unwrap().join("\n"));
            }
        };
        (child, format!("http://{addr}"), log)
    }

    /// SIGKILL, as a crash: no shutdown, no cleanup.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("agentd runs");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `agentd up` again on the same state directory and cgroup subtree,
    /// after [`Self::kill9`] or [`Self::interrupt`]; its log starts afresh
    /// (the previous one is kept in [`Self::earlier_log`]).
    pub async fn restart(&mut self, args: &[&str], env: &[(&str, &str)]) {
        self.restart_command(Self::up_command(&self.state, args), env).await;
    }

    /// [`Self::restart`] with a command of the caller's (through a
    /// wrapper, in a root of its own), as [`Self::start_command`].
    pub async fn restart_command(&mut self, cmd: Command, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "stop agentd first");
        let (child, base, log) = Self::spawn(cmd, &self.subtree, env);
        let earlier = std::mem::replace(&mut self.log, log);
        self.earlier.lock().unwrap().extend(earlier.lock().unwrap().drain(..));
        self.child = Some(child);
        self.base = base;
    }

    /// The logs of the processes before the last [`Self::restart`].
    pub fn earlier_log(&self) -> String {
        self.earlier.lock().unwrap().join("\n")
    }

    /// For an `agentd up` run in a network-namespace `host` (listening on
    /// its loopback): relays a port of the test's namespace to its API and
    /// points [`Self::base`] there, for as long as the returned relay lives.
    pub async fn reach_in(&mut self, host: &agentd_testkit::netns::Host) -> agentd_testkit::netns::Forward {
        let port: u16 = self.base.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {}", self.base));
        let forward = host.forward(std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port))).await.expect("relay to agentd's API");
        self.base = format!("http://{}", forward.addr());
        forward
    }

    /// The `agentd up` process (agentd-daemon after agentd's exec).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agentd runs").id()
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn sandboxes_dir(&self) -> PathBuf {
        self.state.join("node").join("sandboxes")
    }

    /// Names of the sandbox directories the node holds.
    pub fn sandbox_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.sandboxes_dir())
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Option<String>, Value) {
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let content_type = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_string);
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        (status, content_type, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (s, _, b) = self.send(self.http.get(self.url(path))).await;
        (s, b)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let (s, _, b) = self.send(self.http.post(self.url(path)).json(body)).await;
        (s, b)
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let (s, _, b) = self.send(self.http.delete(self.url(path))).await;
        (s, b)
    }

    /// Creates a session with the echo agent and returns its view.
    pub async fn create_session(&self, args: &[&str]) -> Value {
        let (status, body) = self.post("/v1/sessions", &session_body(args)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}\n{}", self.log());
        body
    }

    /// Creates a session from `body` and opens its event stream.
    pub async fn create_streaming(&self, body: &Value) -> (String, Sse) {
        let (status, view) = self.post("/v1/sessions", body).await;
        assert_eq!(status, StatusCode::CREATED, "{view}\n{}", self.log());
        let id = view["id"].as_str().unwrap().to_string();
        let events = self.events(&id, None).await;
        (id, events)
    }

    pub async fn prompt(&self, session: &str, text: &str) -> (StatusCode, Value) {
        self.post(&format!("/v1/sessions/{session}:prompt"), &json!({"prompt": text})).await
    }

    pub async fn events(&self, session: &str, last_event_id: Option<u64>) -> Sse {
        let mut req = self.http.get(self.url(&format!("/v1/sessions/{session}/events")));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        Sse::from_response(req.send().await.unwrap())
    }

    /// Polls `GET path` until `check` accepts the body.
    pub async fn wait_for(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = self.get(path).await;
            if check(&body) {
                return body;
            }
            assert!(Instant::now() < deadline, "timed out waiting on {path}; last: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGINT, as Ctrl-C does, and waits for the exit.
    pub fn interrupt(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("agentd runs");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        wait_timeout(&mut child, Duration::from_secs(20)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("agentd did not stop on SIGINT; its log:\n{}", self.log());
        })
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Agentd {
    fn drop(&mut self) {
        if self.child.is_some() && !std::thread::panicking() {
            self.interrupt();
        } else if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // Whatever a failed test left (or a stop with live restore): its
        // sandboxes and cgroups.
        host::kill_leftovers(&self.sandboxes_dir(), &self.subtree);
    }
}

/// Waits until `pid` is gone (reaped, not a zombie).
pub async fn wait_gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while procfs::exists(pid) {
        assert!(Instant::now() < deadline, "process {pid} still exists: {:?}", procfs::status_field(pid, "State"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

pub struct Sse {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: String,
}

impl Sse {
    /// Reads an SSE answer (which must be one).
    pub fn from_response(resp: reqwest::Response) -> Sse {
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Sse { stream: Box::pin(resp.bytes_stream()), buf: String::new() }
    }

    /// The next event (comments skipped), or None when the stream ends.
    pub async fn next(&mut self) -> Option<SseEvent> {
        let deadline = Duration::from_secs(15);
        tokio::time::timeout(deadline, self.next_inner()).await.expect("no SSE event within 15 s")
    }

    async fn next_inner(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent { id: None, event: "message".into(), data: String::new() };
                let mut has_field = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        ev.id = v.trim().parse().ok();
                        has_field = true;
                    } else if let Some(v) = line.strip_prefix("event:") {
                        ev.event = v.trim().to_string();
                        has_field = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !ev.data.is_empty() {
                            ev.data.push('\n');
                        }
                        ev.data.push_str(v.strip_prefix(' ').unwrap_or(v));
                        has_field = true;
                    }
                }
                if has_field {
                    return Some(ev);
                }
                continue;
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// Events up to and including the first terminal event of a run.
    pub async fn until_run_end(&mut self) -> Vec<SseEvent> {
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            let done = ev.event == "run.completed" || ev.event == "run.failed";
            out.push(ev);
            if done {
                return out;
            }
        }
        panic!("stream ended before the run did: {out:?}");
    }
}

/// An HTTP client that sends the admin token a daemon wrote into
/// `state_dir` on its first start (`admin.token`), or a plain client when
/// there is none (the daemon shares a store whose first daemon wrote it).
pub fn admin_client(state_dir: &Path) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(token) = std::fs::read_to_string(state_dir.join("admin.token")) {
        let value = format!("Bearer {}", token.trim());
        headers.insert(reqwest::header::AUTHORIZATION, reqwest::header::HeaderValue::from_str(&value).expect("a token is a header value"));
    }
    reqwest::Client::builder().default_headers(headers).build().expect("an HTTP client")
}
