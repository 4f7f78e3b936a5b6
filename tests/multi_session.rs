//! Several sessions and agents in one sandbox through the API: a create
//! with `container_id` reuses the running agent of the same definition or
//! starts another beside it; deleting a session closes only that session
//! (`session/close` when advertised) and its agent when it was the agent's
//! last; `session/list`, `session/load` with its replay on the new stream,
//! `mcpServers`, and the bad requests around them. All over HTTP with the
//! echo agent in a real sandbox.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, in_container, procfs, said, session_body, turn};

/// The host pids of the sandbox's agents (the supervisor's children), once
/// they number `n`.
async fn agents_become(supervisor: u32, n: usize) -> Vec<u32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let agents = procfs::children(supervisor);
        if agents.len() == n {
            return agents;
        }
        assert!(Instant::now() < deadline, "the sandbox runs agents {agents:?}, not {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn acp_ids(listed: &Value) -> Vec<String> {
    let mut ids: Vec<String> = listed["sessions"].as_array().unwrap().iter().map(|s| s["sessionId"].as_str().unwrap().to_string()).collect();
    ids.sort();
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_share_a_container_and_its_agent_and_close_one_by_one() {
    let agentd = Agentd::start().await;
    let caps = ["--session-capabilities", "list,close"];
    let (a, mut a_events) = agentd.create_streaming(&session_body(&caps)).await;
    let (_, a_view) = agentd.get(&format!("/v1/sessions/{a}")).await;
    let container = a_view["container_id"].as_str().unwrap().to_string();
    let instance = a_view["agent"]["instance_id"].as_str().unwrap().to_string();
    // The modes and config options the agent announced for the session.
    assert_eq!(a_view["modes"]["currentModeId"], "echo", "{a_view}");
    assert_eq!(a_view["config_options"][0]["id"], "case", "{a_view}");
    let (_, c) = agentd.get(&format!("/v1/containers/{container}")).await;
    let supervisor = c["supervisor_pid"].as_u64().unwrap() as u32;
    agents_become(supervisor, 1).await;

    // The same definition: the running agent takes the second session.
    let (b, mut b_events) = agentd.create_streaming(&in_container(&container, &caps)).await;
    let (_, b_view) = agentd.get(&format!("/v1/sessions/{b}")).await;
    assert_eq!((b_view["container_id"].as_str(), b_view["agent"]["instance_id"].as_str()), (Some(&*container), Some(&*instance)), "{b_view}");
    assert_ne!(a_view["acp_session_id"], b_view["acp_session_id"]);
    agents_become(supervisor, 1).await;
    assert_eq!(said(&turn(&agentd, &a, &mut a_events, "one").await), "one");
    assert_eq!(said(&turn(&agentd, &b, &mut b_events, "two").await), "two");

    // The agent's session/list names both.
    let path = format!("/v1/containers/{container}/agents/{instance}/sessions");
    let (status, listed) = agentd.get(&path).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let mut both = vec![a_view["acp_session_id"].as_str().unwrap().to_string(), b_view["acp_session_id"].as_str().unwrap().to_string()];
    both.sort();
    assert_eq!(acp_ids(&listed), both, "{listed}");
    let (status, listed) = agentd.get(&format!("{path}?cwd=/elsewhere")).await;
    assert_eq!((status, acp_ids(&listed).len()), (StatusCode::OK, 0), "{listed}");
    let (status, problem) = agentd.get(&format!("{path}?cwd=relative")).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")), "{problem}");
    let (status, problem) = agentd.get(&format!("/v1/containers/{container}/agents/agi_nope/sessions")).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("agent_not_found")), "{problem}");
    let (status, problem) = agentd.get(&format!("/v1/containers/ctr_nope/agents/{instance}/sessions")).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("container_not_found")), "{problem}");

    // Another definition: a second agent beside the first.
    let (d, mut d_events) = agentd.create_streaming(&in_container(&container, &["--chunk-chars", "2"])).await;
    let (_, d_view) = agentd.get(&format!("/v1/sessions/{d}")).await;
    let d_instance = d_view["agent"]["instance_id"].as_str().unwrap().to_string();
    assert_ne!(d_instance, instance);
    agents_become(supervisor, 2).await;
    assert_eq!(said(&turn(&agentd, &d, &mut d_events, "three").await), "three");
    let (_, c) = agentd.get(&format!("/v1/containers/{container}")).await;
    let agents: Vec<&str> = c["agents"].as_array().unwrap().iter().map(|a| a["instance_id"].as_str().unwrap()).collect();
    assert_eq!(agents, [instance.as_str(), d_instance.as_str()], "{c}");
    // That agent advertises no session/list.
    let (status, problem) = agentd.get(&format!("/v1/containers/{container}/agents/{d_instance}/sessions")).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("not_supported")), "{problem}");

    // Deleting B closes B alone (session/close: the agent forgets it).
    let (status, body) = agentd.delete(&format!("/v1/sessions/{b}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, b_view) = agentd.get(&format!("/v1/sessions/{b}")).await;
    assert_eq!(b_view["state"], "closed", "{b_view}");
    let (_, listed) = agentd.get(&path).await;
    assert_eq!(acp_ids(&listed), [a_view["acp_session_id"].as_str().unwrap()], "{listed}");
    assert_eq!(said(&turn(&agentd, &a, &mut a_events, "still here").await), "still here");
    agents_become(supervisor, 2).await;

    // Deleting D, its agent's only session, stops that agent (it
    // advertises no session/close: the session is just forgotten).
    let (status, body) = agentd.delete(&format!("/v1/sessions/{d}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    agents_become(supervisor, 1).await;
    let (_, c) = agentd.get(&format!("/v1/containers/{container}")).await;
    assert_eq!((c["state"].as_str(), c["agents"].as_array().unwrap().len()), (Some("ready"), 1), "{c}");

    // A again: the last session takes the sandbox with it.
    let (status, body) = agentd.delete(&format!("/v1/sessions/{a}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, c) = agentd.get(&format!("/v1/containers/{container}")).await;
    assert_eq!(c["state"], "deleted", "{c}");
    crate::support::wait_gone(supervisor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_container_closes_every_session() {
    let agentd = Agentd::start().await;
    let a = agentd.create_session(&[]).await;
    let container = a["container_id"].as_str().unwrap();
    let (status, b) = agentd.post("/v1/sessions", &in_container(container, &["--chunk-chars", "3"])).await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    let (status, body) = agentd.delete(&format!("/v1/containers/{container}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for id in [&a["id"], &b["id"]] {
        let (_, view) = agentd.get(&format!("/v1/sessions/{}", id.as_str().unwrap())).await;
        assert_eq!(view["state"], "closed", "{view}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_further_session_needs_a_ready_container() {
    let agentd = Agentd::start().await;
    let sessions_before = |v: &Value| v["sessions"].as_array().map(Vec::len);
    // No such container.
    let (status, problem) = agentd.post("/v1/sessions", &in_container("ctr_nope", &[])).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("container_not_found")), "{problem}");
    // A profile shapes a new container only.
    let a = agentd.create_session(&[]).await;
    let container = a["container_id"].as_str().unwrap().to_string();
    let mut body = in_container(&container, &[]);
    body["container_profile"] = json!({});
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")), "{problem}");
    // Hibernated: refused, naming the state; nothing is written.
    let (_, listed) = agentd.get("/v1/sessions").await;
    let count = sessions_before(&listed);
    let (status, _) = agentd.post(&format!("/v1/containers/{container}:hibernate"), &json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, problem) = agentd.post("/v1/sessions", &in_container(&container, &[])).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("illegal_state")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("is hibernated"), "{problem}");
    let (_, listed) = agentd.get("/v1/sessions").await;
    assert_eq!(sessions_before(&listed), count);
    let (status, _) = agentd.post(&format!("/v1/containers/{container}:resume"), &json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Deleted.
    let (status, _) = agentd.delete(&format!("/v1/containers/{container}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, problem) = agentd.post("/v1/sessions", &in_container(&container, &[])).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("illegal_state")), "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaded_session_replays_its_history_on_the_new_stream() {
    let agentd = Agentd::start().await;
    let (a, mut a_events) = agentd.create_streaming(&session_body(&["--load-session"])).await;
    turn(&agentd, &a, &mut a_events, "remember the milk").await;
    let (_, a_view) = agentd.get(&format!("/v1/sessions/{a}")).await;
    let container = a_view["container_id"].as_str().unwrap().to_string();
    let acp_id = a_view["acp_session_id"].as_str().unwrap().to_string();

    // Another agent process in the same sandbox (a different definition)
    // loads A's ACP session: its history opens B's stream.
    let mut body = in_container(&container, &["--load-session", "--chunk-chars", "4"]);
    body["session"]["load_session_id"] = json!(acp_id);
    let (b, mut b_events) = agentd.create_streaming(&body).await;
    let (_, b_view) = agentd.get(&format!("/v1/sessions/{b}")).await;
    assert_eq!(b_view["acp_session_id"], acp_id.as_str(), "{b_view}");
    assert_ne!(b_view["agent"]["instance_id"], a_view["agent"]["instance_id"]);
    let mut replay = Vec::new();
    for _ in 0..2 {
        let e = b_events.next().await.unwrap();
        assert_eq!(e.event, "session.update", "{e:?}");
        replay.push((e.json()["update"]["sessionUpdate"].as_str().unwrap().to_string(), e.json()["update"]["content"]["text"].as_str().unwrap().to_string()));
    }
    assert_eq!(
        replay,
        [("user_message_chunk".to_string(), "remember the milk".to_string()), ("agent_message_chunk".to_string(), "remember the milk".to_string())]
    );
    // The loaded session goes on.
    assert_eq!(said(&turn(&agentd, &b, &mut b_events, "and eggs").await), "and eggs");

    // The same ACP session twice on one agent: refused.
    let mut body = in_container(&container, &["--load-session"]);
    body["session"]["load_session_id"] = json!(acp_id);
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("acp_session_open")), "{problem}");

    // An id the agent never saw: a clear problem; the session is failed,
    // the container and its sessions go on.
    let mut body = in_container(&container, &["--load-session", "--chunk-chars", "4"]);
    body["session"]["load_session_id"] = json!("sess_never_seen");
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("acp_session_not_found")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("sess_never_seen"), "{problem}");
    let (_, c) = agentd.get(&format!("/v1/containers/{container}")).await;
    assert_eq!(c["state"], "ready", "{c}");
    assert_eq!(said(&turn(&agentd, &a, &mut a_events, "still").await), "still");

    // An agent that does not advertise loadSession.
    let mut body = session_body(&[]);
    body["session"]["load_session_id"] = json!(acp_id);
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("not_supported")), "{problem}");
    let (status, problem) = agentd.post("/v1/sessions", &{
        let mut body = session_body(&[]);
        body["session"]["load_session_id"] = json!("");
        body
    }).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")), "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_servers_reach_the_agent_and_bad_ones_are_refused() {
    let agentd = Agentd::start().await;
    let stdio = json!({"name": "files", "command": "/usr/bin/mcp-files", "args": ["--root", "/workspace"], "env": [{"name": "A", "value": "1"}]});
    let http = json!({"type": "http", "name": "web", "url": "https://mcp.example/api", "headers": [{"name": "Authorization", "value": "Bearer x"}]});
    let with = |args: &[&str], servers: Value| {
        let mut body = session_body(args);
        body["session"]["mcp_servers"] = servers;
        body
    };
    let (id, mut events) = agentd.create_streaming(&with(&[], json!([stdio]))).await;
    assert_eq!(said(&turn(&agentd, &id, &mut events, "/mcp").await), "mcp: files (stdio)");
    let (id, mut events) = agentd.create_streaming(&with(&["--mcp-capabilities", "http"], json!([stdio, http]))).await;
    assert_eq!(said(&turn(&agentd, &id, &mut events, "/mcp").await), "mcp: files (stdio), web (http)");

    let (_, listed) = agentd.get("/v1/sessions").await;
    let sessions = listed["sessions"].as_array().unwrap().len();
    let sandboxes = agentd.sandbox_dirs().len();
    // An http server for an agent without mcpCapabilities.http: refused
    // when the agent's capabilities are known; no sandbox is left.
    let (status, problem) = agentd.post("/v1/sessions", &with(&[], json!([http]))).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("mcp_unsupported")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("\"web\" is http"), "{problem}");
    // Shapes the spec does not have: refused before anything is written.
    for bad in [json!([{"type": "websocket", "name": "w", "url": "ws://x"}]), json!([{"name": "x", "command": "relative"}]), json!({"name": "x"})] {
        let (status, problem) = agentd.post("/v1/sessions", &with(&[], bad.clone())).await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_mcp_server")), "{bad}: {problem}");
    }
    let (_, listed) = agentd.get("/v1/sessions").await;
    assert_eq!(listed["sessions"].as_array().unwrap().len(), sessions + 1, "only the mcp_unsupported create left a (failed) session");
    let deadline = Instant::now() + Duration::from_secs(10);
    while agentd.sandbox_dirs().len() != sandboxes {
        assert!(Instant::now() < deadline, "a refused create left a sandbox: {:?}", agentd.sandbox_dirs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_bundle_is_being_fetched_shows_installing() {
    use std::io::{Read, Write};
    // A bundle server that sends the headers and a first few bytes, then
    // stalls until the test has looked, then hangs up mid-body.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let _ = conn.read(&mut request);
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: application/gzip\r\n\r\n\x1f\x8b").unwrap();
        conn.flush().unwrap();
        let _ = released.recv_timeout(Duration::from_secs(30));
    });
    let agentd = Agentd::start().await;
    let body = json!({
        "manual_agent": {"id": "slow-bundle", "version": "1.0.0", "source": "manual", "protocol": {"auth_modes": ["agent"]},
            "distribution": {"type": "binary", "binary": {"url": format!("http://127.0.0.1:{port}/echo.tar.gz"), "executable": "bin/echo-agent"}}},
        "session": {"working_dir": "/workspace"}
    });
    let create = {
        let (http, url) = (agentd.http.clone(), agentd.url("/v1/sessions"));
        tokio::spawn(async move {
            let resp = http.post(url).json(&body).send().await.unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        })
    };
    let listed = agentd.wait_for("/v1/sessions", |v| v["sessions"].as_array().is_some_and(|s| s.len() == 1)).await;
    let id = listed["sessions"][0]["id"].as_str().unwrap().to_string();
    let view = agentd.wait_for(&format!("/v1/sessions/{id}"), |v| v["agent"]["state"] == "installing").await;
    assert_eq!(view["state"], "creating", "{view}");
    // A client may follow the create: it sees the setup, then how it ended.
    let mut events = agentd.events(&id, None).await;
    let setup = events.next().await.expect("a setup event");
    assert_eq!((setup.event.as_str(), setup.id, setup.json()["state"].as_str()), ("session.setup", None, Some("installing")), "{setup:?}");
    release.send(()).unwrap();
    server.join().unwrap();
    let (status, problem) = create.await.unwrap();
    assert_eq!((status, problem["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("bundle_fetch_failed")), "{problem}");
    let failed = events.next().await.expect("the failure");
    assert_eq!((failed.event.as_str(), failed.json()["code"].as_str()), ("session.failed", Some("bundle_fetch_failed")), "{failed:?}");
    assert!(events.next().await.is_none(), "the stream ends with it");
    let (_, view) = agentd.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!((view["state"].as_str(), &view["agent"]["state"]), (Some("failed"), &Value::Null), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_session_mid_turn_ends_its_turn_and_spares_the_others() {
    let agentd = Agentd::start().await;
    let slow = ["--delay-ms", "100", "--session-capabilities", "close"];
    let (a, mut a_events) = agentd.create_streaming(&session_body(&slow)).await;
    let (_, a_view) = agentd.get(&format!("/v1/sessions/{a}")).await;
    let container = a_view["container_id"].as_str().unwrap().to_string();
    let (b, mut b_events) = agentd.create_streaming(&in_container(&container, &slow)).await;
    let (status, answer) = agentd.prompt(&b, "a b c d e f g h i j k l m n o p q r s t").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let run = answer["run_id"].as_str().unwrap().to_string();
    assert_eq!(b_events.next().await.unwrap().event, "run.started");
    assert_eq!(b_events.next().await.unwrap().event, "session.update");

    let (status, body) = agentd.delete(&format!("/v1/sessions/{b}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // The turn ended (cancelled by the close), the stream with it.
    let rest = b_events.until_run_end().await;
    assert_eq!(rest.last().unwrap().json()["stop_reason"], "cancelled", "{rest:?}");
    assert!(b_events.next().await.is_none(), "the closed session's stream ends");
    let view = agentd.wait_for(&format!("/v1/sessions/{b}"), |v| ["completed", "cancelled", "failed"].contains(&v["runs"][0]["state"].as_str().unwrap_or(""))).await;
    assert_eq!(view["state"], "closed", "{view}");
    assert_eq!(view["runs"][0]["id"], run.as_str());
    assert!(["cancelled", "failed"].contains(&view["runs"][0]["state"].as_str().unwrap()), "{view}");
    let (status, problem) = agentd.prompt(&b, "again").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("illegal_state")), "{problem}");
    let (status, problem) = agentd.delete(&format!("/v1/sessions/{b}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "deleting again is answered as the first delete: {problem}");
    // A goes on.
    assert_eq!(said(&turn(&agentd, &a, &mut a_events, "fine").await), "fine");
}

/// `session.close` is a fenced step like the others: a `CloseSession` whose
/// answer comes past the deadline is retried and answered from the node's
/// memory, and the session ends closed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_close_that_times_out_is_retried_and_answered_once() {
    use crate::support::daemon::{NodeProcess, ServerProcess};
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut node = NodeProcess::start_with(dir.path(), &[("AGENTD_TEST_DELAY_ANSWER", "close_session:2500")]).await;
    let mut server = ServerProcess::start(&dir.path().join("cp"), &node.socket, &[("AGENTD_NODE_CALL_TIMEOUT_MS", "1000")]).await;
    let http = server.http.clone();
    let send = async |req: reqwest::RequestBuilder| {
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json::<Value>().await.unwrap_or(Value::Null))
    };
    let caps = ["--session-capabilities", "close"];
    let (status, a) = send(http.post(server.url("/v1/sessions")).json(&session_body(&caps))).await;
    assert_eq!(status, StatusCode::CREATED, "{a}");
    let container = a["container_id"].as_str().unwrap();
    let (status, b) = send(http.post(server.url("/v1/sessions")).json(&in_container(container, &caps))).await;
    assert_eq!(status, StatusCode::CREATED, "{b}");

    let (status, body) = send(http.delete(server.url(&format!("/v1/sessions/{}", b["id"].as_str().unwrap())))).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}\n{}", server.daemon.log());
    let log = server.daemon.log();
    assert!(log.contains("step failed; will retry") && log.contains("no answer within 1000 ms"), "{log}");
    assert!(node.daemon.count(&["repeated call answered with its first result"]) >= 1, "{}", node.daemon.log());
    let (_, b) = send(http.get(server.url(&format!("/v1/sessions/{}", b["id"].as_str().unwrap())))).await;
    assert_eq!(b["state"], "closed", "{b}");
    let (status, run) = send(http.post(server.url(&format!("/v1/sessions/{}:prompt", a["id"].as_str().unwrap()))).json(&json!({"prompt": "hi"}))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    let (status, _) = send(http.delete(server.url(&format!("/v1/containers/{container}")))).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(node.sandbox_dirs().is_empty(), "{:?}", node.sandbox_dirs());
    server.daemon.interrupt();
    node.daemon.interrupt();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_last_two_sessions_at_once_removes_the_container() {
    let agentd = Agentd::start().await;
    let a = agentd.create_session(&[]).await;
    let container = a["container_id"].as_str().unwrap().to_string();
    let (status, b) = agentd.post("/v1/sessions", &in_container(&container, &[])).await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    let (path_a, path_b) = (format!("/v1/sessions/{}", a["id"].as_str().unwrap()), format!("/v1/sessions/{}", b["id"].as_str().unwrap()));
    let (ra, rb) = tokio::join!(agentd.delete(&path_a), agentd.delete(&path_b));
    assert_eq!((ra.0, rb.0), (StatusCode::NO_CONTENT, StatusCode::NO_CONTENT), "{ra:?} {rb:?}");
    let c = agentd.wait_for(&format!("/v1/containers/{container}"), |c| c["state"] == "deleted").await;
    assert_eq!(c["agents"].as_array().unwrap().len(), 0, "{c}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agentd.sandbox_dirs().is_empty() {
        assert!(Instant::now() < deadline, "left: {:?}", agentd.sandbox_dirs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A prompt that meets an older step of its container still open (another
/// session's close, held 2 s at the node) is stored `queued` until a runner
/// takes its dispatch, and then goes on to streaming and completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_behind_an_open_step_is_queued_until_a_runner_takes_it() {
    let agentd = Agentd::start_with(&[("AGENTD_TEST_DELAY_ANSWER", "close_session:2000")]).await;
    let (a, mut a_events) = agentd.create_streaming(&session_body(&[])).await;
    let path_a = format!("/v1/sessions/{a}");
    let (_, view) = agentd.get(&path_a).await;
    let container = view["container_id"].as_str().unwrap().to_string();
    let (status, b) = agentd.post("/v1/sessions", &in_container(&container, &[])).await;
    assert_eq!(status, StatusCode::CREATED, "{b}");

    let path_b = format!("/v1/sessions/{}", b["id"].as_str().unwrap());
    let close_b = agentd.delete(&path_b);
    let prompt_a = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !agentd.log().contains("answer delayed for a fault test") {
            assert!(Instant::now() < deadline, "the close never reached the node:\n{}", agentd.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        agentd.prompt(&a, "after the close").await
    };
    let seen_queued = agentd.wait_for(&path_a, |v| v["runs"][0]["state"] == "queued");
    let ((closed, _), (status, accepted), queued) = tokio::join!(close_b, prompt_a, seen_queued);
    assert_eq!(closed, StatusCode::NO_CONTENT);
    assert_eq!((status, accepted["state"].as_str()), (StatusCode::ACCEPTED, Some("streaming")), "{accepted}");
    assert_eq!(queued["runs"][0]["started_at"], Value::Null, "{queued}");

    assert_eq!(said(&a_events.until_run_end().await), "after the close");
    // The node's taking of the turn is recorded with its dispatch step's
    // end, which may come after the run's.
    let done = agentd.wait_for(&path_a, |v| v["runs"][0]["state"] == "completed" && v["runs"][0]["started_at"].is_i64()).await;
    let run = &done["runs"][0];
    assert_eq!(run["id"], accepted["run_id"]);
    assert!(run["started_at"].as_i64().is_some_and(|s| s <= run["completed_at"].as_i64().unwrap()), "{done}");
}
