//! What a session reaches and how it reopens, over HTTP with the echo
//! agent in a real sandbox: `session.additional_directories` widen the
//! confinement of the supervisor's `fs/*` (and reach an agent that
//! advertises `sessionCapabilities.additionalDirectories`, across a restart
//! of the agent too), and
//! `session.resume_session_id` opens an ACP session the agent keeps with
//! `session/resume` (no replay), with the bad requests around both.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, Sse, in_container, said, session_body, turn};

async fn says(agentd: &Agentd, id: &str, events: &mut Sse, prompt: &str) -> String {
    said(&turn(agentd, id, events, prompt).await)
}

fn with_dirs(args: &[&str], dirs: Value) -> Value {
    let mut body = session_body(args);
    body["session"]["additional_directories"] = dirs;
    body
}

async fn sandboxes_become(agentd: &Agentd, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while agentd.sandbox_dirs().len() != n {
        assert!(Instant::now() < deadline, "sandboxes {:?}, not {n}", agentd.sandbox_dirs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn additional_directories_widen_the_sessions_files() {
    let agentd = Agentd::start().await;
    // An agent that advertises additionalDirectories is told of them; the
    // missing one is created; both are served besides the workspace.
    let body = with_dirs(&["--session-capabilities", "additional-directories"], json!(["/tmp/shared/", "/workspace/../workspace-notes"]));
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_additional_directory")), "{problem}");
    let mut body = with_dirs(&["--session-capabilities", "additional-directories"], json!(["/tmp/shared/", "/tmp/more"]));
    body["policy"] = json!({"restart_backoff_ms": 50});
    let (id, mut events) = agentd.create_streaming(&body).await;
    assert_eq!(says(&agentd, &id, &mut events, "/dirs").await, "dirs: /tmp/shared, /tmp/more");
    assert_eq!(says(&agentd, &id, &mut events, "/write /tmp/shared/a.txt hello").await, "wrote 5 bytes to /tmp/shared/a.txt");
    assert_eq!(says(&agentd, &id, &mut events, "/read /tmp/shared/a.txt").await, "hello");
    assert_eq!(says(&agentd, &id, &mut events, "/write /tmp/more/deep/b.txt hi").await, "wrote 2 bytes to /tmp/more/deep/b.txt");
    assert_eq!(says(&agentd, &id, &mut events, "/write /workspace/c.txt ws").await, "wrote 2 bytes to /workspace/c.txt");
    // Next to them, and through `..`: still outside.
    for prompt in ["/write /tmp/other.txt x", "/read /tmp/shared/../other.txt", "/read /etc/hostname"] {
        let text = says(&agentd, &id, &mut events, prompt).await;
        assert!(text.starts_with("error -32602: "), "{prompt}: {text}");
        assert!(text.contains("is outside this session's directories (/workspace, /tmp/shared, /tmp/more)"), "{prompt}: {text}");
    }

    // A restarted agent's session keeps them (the restart opens it anew,
    // with the same directories, and the confinement follows).
    let (status, answer) = agentd.prompt(&id, "/crash 70").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(events.until_run_end().await.last().unwrap().event, "run.failed");
    agentd.wait_for(&format!("/v1/sessions/{id}"), |v| v["agent"]["state"] == "ready" && v["agent"]["restarts"] == 1).await;
    assert_eq!(says(&agentd, &id, &mut events, "/dirs").await, "dirs: /tmp/shared, /tmp/more");
    assert_eq!(says(&agentd, &id, &mut events, "/read /tmp/shared/a.txt").await, "hello");
    let text = says(&agentd, &id, &mut events, "/read /etc/hostname").await;
    assert!(text.contains("is outside this session's directories (/workspace, /tmp/shared, /tmp/more)"), "{text}");

    // An agent that does not advertise them is not told (the schema's
    // rule), but its files are confined to the same roots.
    let (id, mut events) = agentd.create_streaming(&with_dirs(&[], json!(["/tmp/shared"]))).await;
    assert_eq!(says(&agentd, &id, &mut events, "/dirs").await, "dirs: none");
    assert_eq!(says(&agentd, &id, &mut events, "/write /tmp/shared/b.txt yes").await, "wrote 3 bytes to /tmp/shared/b.txt");
    let text = says(&agentd, &id, &mut events, "/write /tmp/b.txt no").await;
    assert!(text.contains("outside this session's directories (/workspace, /tmp/shared)"), "{text}");
    // Without any, the workspace alone.
    let (id, mut events) = agentd.create_streaming(&session_body(&[])).await;
    let text = says(&agentd, &id, &mut events, "/write /tmp/shared/c.txt no").await;
    assert!(text.contains("outside this session's directories (/workspace)"), "{text}");

    // Bad lists are refused before anything is created.
    let (_, listed) = agentd.get("/v1/sessions").await;
    let sessions = listed["sessions"].as_array().unwrap().len();
    let sandboxes = agentd.sandbox_dirs().len();
    for (bad, says) in [
        (json!(["relative/dir"]), "not an absolute path"),
        (json!(["/tmp/../etc"]), "`..`"),
        (json!(["/"]), "root"),
        (json!(["/proc/1"]), "/proc"),
        (json!(["/tmp/a", "/tmp/a/"]), "twice"),
    ] {
        let (status, problem) = agentd.post("/v1/sessions", &with_dirs(&[], bad.clone())).await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_additional_directory")), "{bad}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(says), "{bad}: {problem}");
    }
    for bad in [json!("/tmp/a"), json!([1])] {
        let (status, problem) = agentd.post("/v1/sessions", &with_dirs(&[], bad.clone())).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {problem}");
    }
    let (_, listed) = agentd.get("/v1/sessions").await;
    assert_eq!(listed["sessions"].as_array().unwrap().len(), sessions, "a refused list wrote a session");
    // One the sandbox cannot create (under a read-only bind): the session
    // fails with the reason, and no sandbox is left.
    let (status, problem) = agentd.post("/v1/sessions", &with_dirs(&[], json!(["/usr/agentd-no-such-dir"]))).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_additional_directory")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("/usr/agentd-no-such-dir"), "{problem}");
    sandboxes_become(&agentd, sandboxes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_session_goes_on_without_a_replay() {
    let agentd = Agentd::start().await;
    let caps = ["--load-session", "--session-capabilities", "resume,additional-directories"];
    let (a, mut a_events) = agentd.create_streaming(&session_body(&caps)).await;
    turn(&agentd, &a, &mut a_events, "remember the milk").await;
    let (_, a_view) = agentd.get(&format!("/v1/sessions/{a}")).await;
    let container = a_view["container_id"].as_str().unwrap().to_string();
    let acp_id = a_view["acp_session_id"].as_str().unwrap().to_string();

    // Another agent process in the same sandbox (a different definition)
    // resumes A's ACP session, with a directory of its own.
    let other = ["--load-session", "--session-capabilities", "resume,additional-directories", "--chunk-chars", "4"];
    let mut body = in_container(&container, &other);
    body["session"]["resume_session_id"] = json!(acp_id);
    body["session"]["additional_directories"] = json!(["/tmp/resumed"]);
    let (b, mut b_events) = agentd.create_streaming(&body).await;
    let (_, b_view) = agentd.get(&format!("/v1/sessions/{b}")).await;
    assert_eq!(b_view["acp_session_id"], acp_id.as_str(), "{b_view}");
    assert_ne!(b_view["agent"]["instance_id"], a_view["agent"]["instance_id"]);
    assert_eq!(b_view["modes"]["currentModeId"], "echo", "the resume's answer gives the modes: {b_view}");
    // No replay: the first event of B's stream is its first turn's start.
    let (status, answer) = agentd.prompt(&b, "and eggs").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let got = b_events.until_run_end().await;
    assert_eq!(got[0].event, "run.started", "a resume replays nothing: {got:?}");
    assert_eq!(said(&got), "and eggs");
    // session/resume carried the additional directories.
    assert_eq!(says(&agentd, &b, &mut b_events, "/dirs").await, "dirs: /tmp/resumed");

    // The same ACP session twice on one agent: refused.
    let mut body = in_container(&container, &other);
    body["session"]["resume_session_id"] = json!(acp_id);
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("acp_session_open")), "{problem}");

    // An id the agent never saw: 422, that session failed, the rest goes on.
    let mut body = in_container(&container, &["--load-session", "--session-capabilities", "resume"]);
    body["session"]["resume_session_id"] = json!("sess_never_seen");
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("acp_session_not_found")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("sess_never_seen"), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("session/resume"), "{problem}");
    let (_, c) = agentd.get(&format!("/v1/containers/{container}")).await;
    assert_eq!(c["state"], "ready", "{c}");
    assert_eq!(says(&agentd, &a, &mut a_events, "still").await, "still");

    // An agent that does not advertise sessionCapabilities.resume (it loads).
    let mut body = session_body(&["--load-session"]);
    body["session"]["resume_session_id"] = json!(acp_id);
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("not_supported")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("sessionCapabilities.resume"), "{problem}");

    // Malformed requests.
    for session in [json!({"resume_session_id": ""}), json!({"resume_session_id": "x", "load_session_id": "x"})] {
        let mut body = session_body(&caps);
        body["session"] = session.clone();
        let (status, problem) = agentd.post("/v1/sessions", &body).await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")), "{session}: {problem}");
    }
}
