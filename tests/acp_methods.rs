//! The agent-to-client methods the supervisor serves (fs/*, terminal/*),
//! driven end to end: the echo agent's prompt commands (`/read`, `/write`,
//! `/run`, `/kill`, `/output`) make it call its client, the supervisor, in a
//! real sandbox, and what the client answered streams back over SSE.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{Agentd, MARKER_VAR, Sse, procfs};

/// A session with the echo agent and its event stream.
struct Session {
    id: String,
    /// The sandbox's workspace as the host sees it (`/workspace` inside).
    workspace: PathBuf,
    supervisor: u32,
    events: Sse,
}

/// What one turn streamed back.
struct Turn {
    text: String,
    /// `tool_call` and `tool_call_update` updates, in order.
    tool_calls: Vec<Value>,
    stop_reason: Value,
}

impl Turn {
    /// The final `rawOutput` of the turn's tool call.
    fn raw_output(&self) -> &Value {
        &self.tool_calls.last().expect("a tool call")["rawOutput"]
    }
}

async fn session(agentd: &Agentd) -> Session {
    let view = agentd.create_session(&[]).await;
    let id = view["id"].as_str().unwrap().to_string();
    let container = view["container_id"].as_str().unwrap();
    let (_, c) = agentd.get(&format!("/v1/containers/{container}")).await;
    let supervisor = c["supervisor_pid"].as_u64().unwrap() as u32;
    let workspace = agentd.sandboxes_dir().join(container).join("workspace");
    assert!(workspace.is_dir(), "{}", workspace.display());
    let events = agentd.events(&id, None).await;
    Session { id, workspace, supervisor, events }
}

async fn turn(agentd: &Agentd, s: &mut Session, prompt: &str) -> Turn {
    // Prompting right after the previous run.completed must be accepted.
    let (status, body) = agentd.prompt(&s.id, prompt).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let events = s.events.until_run_end().await;
    let mut turn = Turn { text: String::new(), tool_calls: Vec::new(), stop_reason: Value::Null };
    for event in &events {
        match event.event.as_str() {
            "session.update" => {
                let update = event.json()["update"].clone();
                match update["sessionUpdate"].as_str() {
                    Some("agent_message_chunk") => turn.text.push_str(update["content"]["text"].as_str().unwrap()),
                    Some("tool_call" | "tool_call_update") => turn.tool_calls.push(update),
                    other => panic!("unexpected update {other:?}"),
                }
            }
            "run.completed" => turn.stop_reason = event.json()["stop_reason"].clone(),
            "run.started" => {}
            other => panic!("unexpected event {other}: {events:?}\n{}", agentd.log()),
        }
    }
    assert_eq!(turn.stop_reason, "end_turn", "{prompt}: {}", turn.text);
    turn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_read_and_written_in_the_sessions_workspace() {
    let agentd = Agentd::start().await;
    let mut s = session(&agentd).await;
    std::fs::write(s.workspace.join("notes.txt"), "one\ntwo\nthree\n").unwrap();

    let t = turn(&agentd, &mut s, "/read /workspace/notes.txt").await;
    assert_eq!(t.text, "one\ntwo\nthree\n");
    let t = turn(&agentd, &mut s, "/read /workspace/notes.txt 2 1").await;
    assert_eq!(t.text, "two\n");
    let t = turn(&agentd, &mut s, "/read /workspace/notes.txt 3").await;
    assert_eq!(t.text, "three\n");
    let t = turn(&agentd, &mut s, "/read /workspace/notes.txt 1 2").await;
    assert_eq!(t.text, "one\ntwo\n");

    let content = "héllo\nwörld 日本\n";
    let t = turn(&agentd, &mut s, &format!("/write /workspace/out/new.txt {content}")).await;
    assert_eq!(t.text, format!("wrote {} bytes to /workspace/out/new.txt", content.len()));
    let on_host = s.workspace.join("out/new.txt");
    assert_eq!(std::fs::read_to_string(&on_host).unwrap(), content);
    // Written by the sandbox's root, an unprivileged uid on the host.
    assert!(std::fs::metadata(&on_host).unwrap().uid() >= 100_000);
    let t = turn(&agentd, &mut s, "/read /workspace/out/new.txt 2").await;
    assert_eq!(t.text, "wörld 日本\n");

    // Overwriting replaces the whole content.
    turn(&agentd, &mut s, "/write /workspace/out/new.txt short").await;
    assert_eq!(std::fs::read_to_string(&on_host).unwrap(), "short");

    let t = turn(&agentd, &mut s, "/read /workspace/missing.txt").await;
    assert_eq!(t.text, "error -32002: /workspace/missing.txt does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_workspace_get_an_acp_error_and_the_session_goes_on() {
    let agentd = Agentd::start().await;
    let mut s = session(&agentd).await;
    std::os::unix::fs::symlink("/etc/passwd", s.workspace.join("passwd_link")).unwrap();
    std::os::unix::fs::symlink("/etc", s.workspace.join("etc_link")).unwrap();
    std::os::unix::fs::symlink("../..", s.workspace.join("up_link")).unwrap();

    for prompt in [
        "/read /etc/passwd",
        "/read /workspace/../etc/passwd",
        "/read /workspace/passwd_link",
        "/read /workspace/etc_link/passwd",
        "/read /workspace/up_link/etc/passwd",
        "/write /workspace/etc_link/agentd-test x",
        "/write /workspace/../tmp/agentd-test x",
        "/write /tmp/agentd-test x",
    ] {
        let t = turn(&agentd, &mut s, prompt).await;
        assert!(t.text.starts_with("error -32602: "), "{prompt}: {}", t.text);
        assert!(t.text.contains("is outside this session's directories (/workspace)"), "{prompt}: {}", t.text);
    }
    let t = turn(&agentd, &mut s, "/read ../../x").await;
    assert_eq!(t.text, "error -32602: path ../../x is not absolute: ACP file paths must be absolute");
    let t = turn(&agentd, &mut s, "/write workspace/x hi").await;
    assert!(t.text.starts_with("error -32602: path workspace/x is not absolute"), "{}", t.text);
    assert!(!s.workspace.join("x").exists());

    // The session is unharmed.
    let t = turn(&agentd, &mut s, "still here").await;
    assert_eq!(t.text, "still here");
    let t = turn(&agentd, &mut s, "/write /workspace/ok.txt fine").await;
    assert_eq!(t.text, "wrote 4 bytes to /workspace/ok.txt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_run_commands_in_the_sandbox() {
    let agentd = Agentd::start().await;
    let mut s = session(&agentd).await;

    let t = turn(&agentd, &mut s, "/run /bin/echo hi").await;
    assert_eq!(t.text, "hi\n[exit code 0]");
    assert_eq!(t.tool_calls[0]["sessionUpdate"], "tool_call");
    assert_eq!(t.tool_calls[0]["kind"], "execute");
    let terminal_id = t.tool_calls[1]["content"][0]["terminalId"].as_str().unwrap();
    assert!(!terminal_id.is_empty());
    assert_eq!(t.tool_calls.last().unwrap()["status"], "completed");
    assert_eq!(t.raw_output(), &serde_json::json!({"output": "hi\n", "truncated": false, "exitCode": 0, "signal": null}));

    let t = turn(&agentd, &mut s, "/run sh -c 'echo to stderr >&2; exit 3'").await;
    assert_eq!(t.text, "to stderr\n[exit code 3]");
    assert_eq!(t.raw_output()["exitCode"], 3);

    // The session's cwd by default, the request's env over the agent's own.
    let t = turn(&agentd, &mut s, "/run --env FOO=bar sh -c 'pwd; echo $FOO; id -u'").await;
    assert_eq!(t.text, "/workspace\nbar\n0\n[exit code 0]");
    let t = turn(&agentd, &mut s, "/run --cwd /tmp pwd").await;
    assert_eq!(t.text, "/tmp\n[exit code 0]");
    let t = turn(&agentd, &mut s, "/run env").await;
    let mut names: Vec<&str> = t.raw_output()["output"].as_str().unwrap().lines().map(|l| l.split('=').next().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["HOME", "LANG", "PATH", "TMPDIR"], "only the agent's environment ({MARKER_VAR} must not leak)");

    // Hardened like the agent.
    let t = turn(&agentd, &mut s, "/run cat /proc/self/status").await;
    let status = t.raw_output()["output"].as_str().unwrap().to_string();
    for line in ["NoNewPrivs:\t1", "Seccomp:\t2", "CapEff:\t0000000000000000", "CapBnd:\t0000000000000000"] {
        assert!(status.lines().any(|l| l == line), "{line} missing in\n{status}");
    }

    // 10 × "日" is 30 bytes: a 10-byte limit keeps the last 3 whole characters.
    let t = turn(&agentd, &mut s, "/run --limit 10 printf 日日日日日日日日日日").await;
    assert_eq!(t.raw_output()["output"], "日日日");
    assert_eq!(t.raw_output()["truncated"], true);
    assert_eq!(t.text, "日日日\n[exit code 0] [truncated]");

    let t = turn(&agentd, &mut s, "/run no-such-command-agentd").await;
    assert_eq!(t.text, "error -32002: command not found: no-such-command-agentd");
    assert_eq!(t.tool_calls.last().unwrap()["status"], "failed");

    let t = turn(&agentd, &mut s, "/output term_nope").await;
    assert_eq!(t.text, "error -32002: no terminal term_nope in this session (never created, or released)");
    // Released terminals are gone too.
    let t = turn(&agentd, &mut s, &format!("/output {terminal_id}")).await;
    assert!(t.text.starts_with("error -32002: no terminal"), "{}", t.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_ends_a_running_terminal_and_nothing_is_left_behind() {
    let agentd = Agentd::start().await;
    let mut s = session(&agentd).await;
    let agent = procfs::children(s.supervisor);
    assert_eq!(agent.len(), 1);

    let t = turn(&agentd, &mut s, "/kill sleep 100").await;
    assert_eq!(t.text, "[signal SIGKILL]");
    assert_eq!(t.raw_output()["signal"], "SIGKILL");
    assert_eq!(t.raw_output()["exitCode"], Value::Null);
    // Also a group with a background job: kill takes the whole group.
    let t = turn(&agentd, &mut s, "/kill sh -c 'sleep 100 & sleep 100'").await;
    assert_eq!(t.text, "[signal SIGKILL]");

    // Killed, released and reaped: the agent is the supervisor's only child.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while procfs::children(s.supervisor) != agent {
        assert!(std::time::Instant::now() < deadline, "left behind: {:?}", procfs::children(s.supervisor));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let t = turn(&agentd, &mut s, "after the kill").await;
    assert_eq!(t.text, "after the kill");
}
