//! The client commands (`agentd session`, `prompt`, `events`, `container`,
//! `node ls`), run as a user runs them: the real `agentd` binary against an
//! `agentd up`, its output and exit code read back.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

use crate::support::{Agentd, agentd_bin, session_body};

/// `agentd ARGS` against `agentd`'s API, with nothing of the caller's
/// agentd settings.
fn cli(agentd: &Agentd, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(agentd_bin());
    cmd.args(args)
        .env("AGENTD_URL", &agentd.base)
        .env("AGENTD_STATE_DIR", agentd.state_dir())
        .env_remove("AGENTD_TOKEN")
        .env_remove("AGENTD_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn run(agentd: &Agentd, args: &[&str]) -> Output {
    let output = cli(agentd, args).output();
    tokio::time::timeout(Duration::from_secs(60), output).await.unwrap_or_else(|_| panic!("agentd {args:?} did not end within 60 s")).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs and requires exit 0; stdout.
async fn ok(agentd: &Agentd, args: &[&str]) -> String {
    let out = run(agentd, args).await;
    assert!(out.status.success(), "agentd {args:?}: {:?}\nstdout: {}\nstderr: {}\nlog:\n{}", out.status, text(&out.stdout), text(&out.stderr), agentd.log());
    text(&out.stdout)
}

/// The echo agent's definition (`manual_agent`), run with `args`, in a file.
fn agent_file(dir: &tempfile::TempDir, args: &[&str]) -> String {
    let path = dir.path().join(format!("agent-{}.json", args.len()));
    std::fs::write(&path, session_body(args)["manual_agent"].to_string()).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_created_prompted_listed_and_removed_from_the_command_line() {
    let agentd = Agentd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_file(&dir, &[]);
    let id = ok(&agentd, &["session", "create", "--agent-file", &agent]).await.trim().to_string();
    assert!(id.starts_with("ses_"), "{id:?}");

    let out = run(&agentd, &["prompt", &id, "hello world"]).await;
    assert_eq!((text(&out.stdout), out.status.code()), ("hello world\n".to_string(), Some(0)), "stderr: {}", text(&out.stderr));

    // A turn the agent fails: exit 1, the reason on stderr.
    let out = run(&agentd, &["prompt", &id, "/crash 70"]).await;
    assert_eq!(out.status.code(), Some(1), "stdout: {}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("agentd: the turn failed: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");

    // The restarted agent's next turn shows only itself.
    agentd.wait_for(&format!("/v1/sessions/{id}"), |v| v["agent"]["state"] == "ready").await;
    let out = run(&agentd, &["prompt", &id, "again"]).await;
    assert_eq!((text(&out.stdout), out.status.code()), ("again\n".to_string(), Some(0)), "stderr: {}", text(&out.stderr));

    // Every event, one JSON line each, up to the latest.
    let (_, view) = agentd.get(&format!("/v1/sessions/{id}")).await;
    let last = view["last_event_id"].as_u64().expect("a ready session says its latest event id");
    let lines = ok(&agentd, &["events", &id, "--after", "0"]).await;
    let events: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let ids: Vec<u64> = events.iter().map(|e| e["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=last).collect::<Vec<_>>(), "{lines}");
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "run.started").count(), 3, "{kinds:?}");
    assert!(kinds.contains(&"run.failed") && kinds.last() == Some(&"run.completed"), "{kinds:?}");
    assert_eq!(events.last().unwrap()["data"]["stop_reason"], "end_turn");
    let tail = ok(&agentd, &["events", &id, "--after", &(last - 1).to_string()]).await;
    assert_eq!(tail.lines().count(), 1, "{tail}");
    assert_eq!(ok(&agentd, &["events", &id, "--after", &last.to_string()]).await, "");

    let listed: Value = serde_json::from_str(&ok(&agentd, &["session", "ls", "--json"]).await).unwrap();
    let row = listed["sessions"].as_array().unwrap().iter().find(|s| s["id"] == id.as_str()).expect("listed");
    assert_eq!(row["state"], "ready");
    let table = ok(&agentd, &["session", "ls"]).await;
    assert!(table.starts_with("SESSION") && table.contains(&id), "{table}");
    let shown = ok(&agentd, &["session", "get", &id]).await;
    assert!(shown.contains("completed") && shown.contains("failed"), "its runs: {shown}");

    let container = view["container_id"].as_str().unwrap();
    let containers: Value = serde_json::from_str(&ok(&agentd, &["container", "ls", "--json"]).await).unwrap();
    assert!(containers["containers"].as_array().unwrap().iter().any(|c| c["id"] == container && c["state"] == "ready"), "{containers}");
    assert!(ok(&agentd, &["container", "get", container]).await.contains(&id));
    let nodes: Value = serde_json::from_str(&ok(&agentd, &["node", "ls", "--json"]).await).unwrap();
    assert!(!nodes["nodes"].as_array().unwrap().is_empty(), "{nodes}");
    assert!(ok(&agentd, &["node", "ls"]).await.starts_with("NODE"));

    // A session that does not exist: the problem's code, exit 1.
    let (status, problem) = agentd.get("/v1/sessions/ses_nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for args in [&["session", "get", "ses_nope"][..], &["prompt", "ses_nope", "hi"], &["events", "ses_nope"]] {
        let out = run(&agentd, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(text(&out.stderr), format!("agentd: {}: {}\n", problem["code"].as_str().unwrap(), problem["detail"].as_str().unwrap()), "{args:?}");
    }

    assert_eq!(ok(&agentd, &["session", "rm", &id]).await.trim(), id);
    agentd.wait_for(&format!("/v1/containers/{container}"), |c| c["state"] == "deleted").await;
    let listed: Value = serde_json::from_str(&ok(&agentd, &["session", "ls", "--json"]).await).unwrap();
    assert!(listed["sessions"].as_array().unwrap().iter().all(|s| s["id"] != id.as_str()), "closed sessions are left out");
    let all: Value = serde_json::from_str(&ok(&agentd, &["session", "ls", "--all", "--json"]).await).unwrap();
    assert!(all["sessions"].as_array().unwrap().iter().any(|s| s["id"] == id.as_str()), "--all has them");
    // A closed session's archived events, still listed.
    let archived = ok(&agentd, &["events", &id]).await;
    assert_eq!(archived.lines().count() as u64, last, "{archived}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_turn_and_the_command_says_so() {
    let agentd = Agentd::start().await;
    let id = agentd.create_session(&["--delay-ms", "300"]).await["id"].as_str().unwrap().to_string();
    let mut child = cli(&agentd, &["prompt", &id, "one two three four five six seven eight nine ten eleven twelve"]).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), stdout.read(&mut first)).await.expect("a first chunk").unwrap();
    assert!(n > 0 && text(&first[..n]).starts_with("one"), "{:?}", text(&first[..n]));
    kill(Pid::from_raw(child.id().unwrap() as i32), Signal::SIGINT).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.expect("the command ends").unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cancelling the turn") && stderr.ends_with("agentd: the turn was cancelled\n"), "{stderr}");
    let view = agentd.wait_for(&format!("/v1/sessions/{id}"), |v| v["runs"][0]["state"] != "streaming").await;
    assert_eq!((view["runs"][0]["state"].as_str(), view["runs"][0]["stop_reason"].as_str()), (Some("cancelled"), Some("cancelled")), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permission_request_is_asked_on_a_terminal_and_left_to_the_policy_otherwise() {
    let agentd = Agentd::start().await;
    let session = async |policy: Value| {
        let mut body = session_body(&[]);
        body["policy"] = policy;
        let (status, view) = agentd.post("/v1/sessions", &body).await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        view["id"].as_str().unwrap().to_string()
    };

    // stdin is no terminal: the policy's timeout answers.
    let id = session(json!({"permissions": "ask", "ask_timeout_ms": 300})).await;
    let out = run(&agentd, &["prompt", &id, "/ask deploy"]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("permission: deploy [allow, reject]: stdin is not a terminal"), "{stderr}");
    assert!(stderr.contains("permission: deploy: reject (by timeout)"), "{stderr}");
    assert_eq!(text(&out.stdout), "permission: selected reject\n");

    // On a terminal, the person at it picks an option.
    let id = session(json!({"permissions": "ask"})).await;
    let tty = Pty::open();
    let mut cmd = cli(&agentd, &["prompt", &id, "/ask deploy again"]);
    cmd.stdin(tty.slave()).stderr(tty.slave());
    let child = cmd.spawn().unwrap();
    tty.wait_for("answer 1-2").await;
    tty.write(b"1\n");
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.expect("the command ends").unwrap();
    tty.wait_for("(by client)").await;
    let seen = tty.text();
    assert_eq!(out.status.code(), Some(0), "{seen}");
    assert!(seen.contains("permission: the agent asks for deploy again") && seen.contains("1) Allow [allow_once]"), "{seen}");
    assert!(seen.contains("permission: deploy again: allow (by client)"), "{seen}");
    assert_eq!(text(&out.stdout), "permission: selected allow\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_on_a_terminal_shows_its_progress_and_prints_the_id() {
    let agentd = Agentd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_file(&dir, &[]);
    let tty = Pty::open();
    let profile = dir.path().join("profile.json");
    std::fs::write(&profile, r#"{"node_selector": {"zone": "nowhere"}}"#).unwrap();
    let profile = profile.display().to_string();
    let mut cmd = cli(&agentd, &["session", "create", "--agent-file", &agent, "--profile-file", &profile, "--label", "team=a"]);
    cmd.stderr(tty.slave());
    // No node carries the selector's label: refused before anything is made, with its code.
    // `output()` would capture stderr again.
    let out = cmd.spawn().unwrap().wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    tty.wait_for("agentd: unsatisfiable_selector: ").await;

    let tty = Pty::open();
    let mut cmd = cli(&agentd, &["session", "create", "--agent-file", &agent, "--json"]);
    cmd.stderr(tty.slave());
    // `output()` would capture stderr again.
    let out = cmd.spawn().unwrap().wait_with_output().await.unwrap();
    let seen = tty.settled().await;
    assert_eq!(out.status.code(), Some(0), "{seen}");
    let view: Value = serde_json::from_str(&text(&out.stdout)).unwrap();
    let id = view["id"].as_str().unwrap();
    assert_eq!(view["state"], "ready", "the create's final answer: {view}");
    assert!(seen.contains(&format!("\r\x1b[2Ksession {id}: ")), "the progress line: {seen:?}");
    assert!(seen.ends_with("\r\x1b[2K"), "cleared at the end: {seen:?}");
    let (_, listed) = agentd.get("/v1/sessions").await;
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 1, "one session, however many requests: {listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_named_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(agentd_bin())
        .args(["session", "ls", "--server", "http://127.0.0.1:1", "--state-dir"])
        .arg(dir.path())
        .env_remove("AGENTD_URL")
        .env_remove("AGENTD_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "agentd: cannot reach agentd at http://127.0.0.1:1: connection refused (is it running? `agentd up` starts one; --server or AGENTD_URL names another)\n"
    );
}

/// A pseudo-terminal for a child's stdin or stderr; what the child writes
/// to it is collected from the master side.
struct Pty {
    master: std::fs::File,
    slave: OwnedFd,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    fn open() -> Pty {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let master = std::fs::File::from(pty.master);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let collected = Arc::clone(&seen);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once every slave end is closed.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                collected.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty { master, slave: pty.slave, seen }
    }

    fn slave(&self) -> Stdio {
        Stdio::from(self.slave.try_clone().unwrap())
    }

    fn text(&self) -> String {
        text(&self.seen.lock().unwrap())
    }

    fn write(&self, bytes: &[u8]) {
        (&self.master).write_all(bytes).unwrap();
    }

    /// What came, once nothing more has for a moment.
    async fn settled(&self) -> String {
        let mut last = self.text();
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.text();
            if now == last {
                return now;
            }
            last = now;
        }
    }

    async fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.text().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} on the terminal: {:?}", self.text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
