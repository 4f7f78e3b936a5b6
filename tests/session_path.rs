//! The first path: create a session in a real sandbox, prompt, read the SSE
//! stream, resume it, delete it, and check all of it from the host.

use reqwest::StatusCode;

use crate::support::{Agentd, MARKER_VAR, procfs, wait_gone};

const NAMESPACES: &[&str] = &["pid", "user", "mnt", "uts", "ipc", "net", "cgroup"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_streams_back_from_an_agent_in_its_own_namespaces() {
    let agentd = Agentd::start().await;
    let session = agentd.create_session(&[]).await;
    let id = session["id"].as_str().unwrap().to_string();
    assert_eq!(session["state"], "ready");
    assert!(session["acp_session_id"].as_str().is_some_and(|s| !s.is_empty()));
    let container_id = session["container_id"].as_str().unwrap().to_string();

    let (status, container) = agentd.get(&format!("/v1/containers/{container_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(container["state"], "ready");
    let supervisor = container["supervisor_pid"].as_u64().unwrap() as u32;
    let agents = procfs::children(supervisor);
    assert_eq!(agents.len(), 1, "the agent is the supervisor's only child");
    let agent = agents[0];

    let me = std::process::id();
    for ns in NAMESPACES {
        assert_ne!(procfs::namespace(agent, ns).unwrap(), procfs::namespace(me, ns).unwrap(), "{ns} namespace is the host's");
    }
    // PID 1 and 2 inside; the host sees other numbers.
    assert!(procfs::status_field(supervisor, "NSpid").unwrap().ends_with("\t1"));
    assert!(procfs::status_field(agent, "NSpid").unwrap().ends_with("\t2"));
    // Root inside is an unprivileged host uid.
    let uid: u32 = procfs::status_field(agent, "Uid").unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(uid >= 100_000, "agent runs as host uid {uid}");
    // Hardened: no capabilities, no new privileges, the seccomp filter.
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(procfs::status_field(agent, set).as_deref(), Some("0000000000000000"), "{set}");
    }
    assert_eq!(procfs::status_field(agent, "NoNewPrivs").as_deref(), Some("1"));
    assert_eq!(procfs::status_field(agent, "Seccomp").as_deref(), Some("2"));
    // Only the plan's environment.
    let env = procfs::environ(agent).unwrap();
    assert!(env.iter().all(|v| !v.starts_with(MARKER_VAR)), "daemon environment leaked: {env:?}");
    let mut names: Vec<&str> = env.iter().map(|v| v.split('=').next().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["HOME", "LANG", "PATH", "TMPDIR"]);

    let mut events = agentd.events(&id, None).await;
    let (status, accepted) = agentd.prompt(&id, "hello world from agentd").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let run_id = accepted["run_id"].as_str().unwrap().to_string();

    let got = events.until_run_end().await;
    let ids: Vec<u64> = got.iter().map(|e| e.id.unwrap()).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "ids are 1, 2, 3, ...");
    assert_eq!(got[0].event, "run.started");
    assert_eq!(got[0].json()["run_id"], run_id.as_str());
    let mut text = String::new();
    for update in &got[1..got.len() - 1] {
        assert_eq!(update.event, "session.update");
        let params = update.json();
        assert_eq!(params["sessionId"], session["acp_session_id"], "params as the agent sent them");
        assert_eq!(params["update"]["sessionUpdate"], "agent_message_chunk");
        text.push_str(params["update"]["content"]["text"].as_str().unwrap());
    }
    assert_eq!(text, "hello world from agentd");
    let end = got.last().unwrap();
    assert_eq!(end.event, "run.completed");
    assert_eq!(end.json(), serde_json::json!({"run_id": run_id, "stop_reason": "end_turn"}));

    let view = agentd
        .wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"][0]["state"] == "completed")
        .await;
    assert_eq!(view["runs"][0]["stop_reason"], "end_turn");
    assert_eq!(view["runs"].as_array().unwrap().len(), 1);

    // Resume: a client that saw event 2 gets 3 onwards.
    let mut resumed = agentd.events(&id, Some(2)).await;
    assert_eq!(resumed.next().await.unwrap().id, Some(3));

    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_gone(agent).await;
    wait_gone(supervisor).await;
    assert!(agentd.sandbox_dirs().is_empty(), "sandbox directory removed");
    assert!(!procfs::mounts_mention(&agentd.state_dir().display().to_string()), "no mount left on the host");
    let (_, container) = agentd.get(&format!("/v1/containers/{container_id}")).await;
    assert_eq!(container["state"], "deleted");
    let (_, view) = agentd.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(view["state"], "closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_running_turn_and_the_session_goes_on() {
    let agentd = Agentd::start().await;
    let session = agentd.create_session(&["--delay-ms", "100"]).await;
    let id = session["id"].as_str().unwrap();
    let mut events = agentd.events(id, None).await;
    let words = "a b c d e f g h i j k l m n o p q r s t u v w x y z";
    let (status, _) = agentd.prompt(id, words).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(events.next().await.unwrap().event, "run.started");
    assert_eq!(events.next().await.unwrap().event, "session.update");

    let (status, problem) = agentd.prompt(id, "second").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(problem["code"], "run_active");

    let (status, _) = agentd.post(&format!("/v1/sessions/{id}:cancel"), &serde_json::json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let rest = events.until_run_end().await;
    let end = rest.last().unwrap();
    assert_eq!(end.event, "run.completed");
    assert_eq!(end.json()["stop_reason"], "cancelled");
    let updates = rest.iter().filter(|e| e.event == "session.update").count();
    assert!(updates < 25, "the turn stopped early ({updates} more updates)");
    agentd.wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"][0]["state"] == "cancelled").await;

    let (status, problem) = agentd.post(&format!("/v1/sessions/{id}:cancel"), &serde_json::json!({})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("no_active_run")));

    let (status, _) = agentd.prompt(id, "still here").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let end = events.until_run_end().await.pop().unwrap();
    assert_eq!(end.json()["stop_reason"], "end_turn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_path_runs_on_postgresql() {
    let pg = agentd_testkit::postgres::TempPostgres::start().expect("start postgres");
    let agentd = Agentd::start_with(&[("AGENTD_DATABASE_URL", &pg.url())]).await;
    assert!(agentd.log().contains("backend=\"postgres\""), "{}", agentd.log());
    let session = agentd.create_session(&[]).await;
    let id = session["id"].as_str().unwrap();
    let mut events = agentd.events(id, None).await;
    let (status, _) = agentd.prompt(id, "stored in postgres").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let end = events.until_run_end().await.pop().unwrap();
    assert_eq!(end.json()["stop_reason"], "end_turn");
    agentd.wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"][0]["state"] == "completed").await;
    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_sent_the_moment_a_run_completes_is_accepted() {
    let agentd = Agentd::start().await;
    let session = agentd.create_session(&[]).await;
    let id = session["id"].as_str().unwrap();
    let mut events = agentd.events(id, None).await;
    for i in 0..20 {
        let (status, body) = agentd.prompt(id, &format!("turn {i}")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "turn {i}: {body}");
        let end = events.until_run_end().await.pop().unwrap();
        assert_eq!(end.json()["stop_reason"], "end_turn");
    }
    let view = agentd.wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"][19]["state"] == "completed").await;
    assert!(view["runs"].as_array().unwrap().iter().all(|r| r["state"] == "completed"), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_shows_its_workflow_states() {
    let agentd = Agentd::start().await;
    let mut body = crate::support::session_body(&[]);
    body["policy"] = serde_json::json!({"permissions": "ask"});
    let (id, mut events) = agentd.create_streaming(&body).await;
    // A turn held open by a permission ask.
    let (status, accepted) = agentd.prompt(&id, "/ask deploy").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    assert_eq!(accepted["state"], "streaming", "the node took it: {accepted}");
    let asked = loop {
        let e = events.next().await.expect("stream open");
        if e.event == "permission.requested" {
            break e.json();
        }
    };
    let path = format!("/v1/sessions/{id}");
    // Recorded dispatching with the prompt, streaming once the node took it.
    let streaming = agentd.wait_for(&path, |v| v["runs"][0]["state"] == "streaming").await;
    let run = &streaming["runs"][0];
    assert!(run["started_at"].is_i64() && run["completed_at"].is_null(), "{streaming}");
    let (status, problem) = agentd.prompt(&id, "meanwhile").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("run_active")), "{problem}");
    let answer = format!("/v1/sessions/{id}/permissions/{}", asked["request_id"].as_str().unwrap());
    let (status, _) = agentd.post(&answer, &serde_json::json!({"option_id": "allow"})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    events.until_run_end().await;
    let view = agentd.wait_for(&path, |v| v["runs"][0]["state"] == "completed").await;
    assert_eq!(view["runs"][0]["id"], accepted["run_id"]);
}
