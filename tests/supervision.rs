//! The supervisor as an ACP client that keeps going: `authenticate` with
//! credentials from the plan, agent states, restart after a crash (the
//! session reopened so the next prompt works), bad output and silent agents
//! mid-session, and content blocks gated by the agent's promptCapabilities.
//! All through the HTTP path, with the echo agent in a real sandbox.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, Sse, SseEvent, procfs, said, session_body};

/// A session body for the echo agent run with `args`, its env and policy.
fn body(args: &[&str], env: &[(&str, &str)], policy: Value) -> Value {
    let mut body = session_body(args);
    let env: serde_json::Map<String, Value> = env.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
    body["manual_agent"]["distribution"]["binary"]["env"] = Value::Object(env);
    body["policy"] = policy;
    body
}



/// Prompts and returns the turn's events; the turn must end with `end`.
async fn turn(agentd: &Agentd, id: &str, events: &mut Sse, prompt: Value, end: &str) -> Vec<SseEvent> {
    let (status, answer) = agentd.post(&format!("/v1/sessions/{id}:prompt"), &json!({"prompt": prompt})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let got = events.until_run_end().await;
    assert_eq!(got.last().unwrap().event, end, "{got:?}");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticate_with_the_plans_credentials_or_report_auth_required() {
    let agentd = Agentd::start().await;
    // The token in the plan's env: the supervisor picks echo-agent-token
    // (its description names ECHO_AGENT_TOKEN), authenticates and retries.
    let (id, mut events) = agentd.create_streaming(&body(&["--require-auth"], &[("ECHO_AGENT_TOKEN", "s3cret")], json!({}))).await;
    let (_, view) = agentd.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(view["agent"]["state"], "ready", "{view}");
    let got = turn(&agentd, &id, &mut events, json!("hello"), "run.completed").await;
    assert_eq!(said(&got), "hello");

    // The credential "expires" (the agent forgets it): the next prompt is
    // answered auth_required, the supervisor authenticates again and resends.
    let got = turn(&agentd, &id, &mut events, json!("/logout"), "run.completed").await;
    assert_eq!(said(&got), "logged out");
    let got = turn(&agentd, &id, &mut events, json!("again"), "run.completed").await;
    assert_eq!(said(&got), "again");

    // No credentials: a clear problem naming every method.
    let (status, problem) = agentd.post("/v1/sessions", &body(&["--require-auth"], &[], json!({}))).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("agent_auth_required")), "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("browser-login (Log in with a browser)"), "{detail}");
    assert!(detail.contains("echo-agent-token (Use a token; needs ECHO_AGENT_TOKEN)"), "{detail}");

    // The plan names a method the agent refuses: the refusal is reported.
    let policy = json!({"auth_method": "browser-login"});
    let (status, problem) = agentd.post("/v1/sessions", &body(&["--require-auth"], &[("ECHO_AGENT_TOKEN", "s3cret")], policy)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("agent_auth_required")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("browser-login: agent answered with error -32603: no browser to log in with"), "{problem}");
    // A method the agent does not offer.
    let policy = json!({"auth_method": "magic"});
    let (status, problem) = agentd.post("/v1/sessions", &body(&["--require-auth"], &[], policy)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("agent_auth_required")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("\"magic\" is not one the agent offers"), "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_fails_the_turn_and_the_restarted_agent_takes_the_next_prompt() {
    let agentd = Agentd::start().await;
    let resumes = ["--load-session", "--session-capabilities", "resume"];
    for (args, reopened_by) in [(&[][..], "session/new"), (&["--load-session"][..], "session/load"), (&resumes[..], "session/resume")] {
        let (id, mut events) = agentd.create_streaming(&body(args, &[], json!({"restart_backoff_ms": 50}))).await;
        let (_, before) = agentd.get(&format!("/v1/sessions/{id}")).await;
        assert_eq!((before["agent"]["state"].as_str(), before["agent"]["restarts"].as_u64()), (Some("ready"), Some(0)), "{before}");

        let got = turn(&agentd, &id, &mut events, json!("/crash 70"), "run.failed").await;
        let error = got.last().unwrap().json()["error"].as_str().unwrap().to_string();
        assert!(error.contains("the agent ended during the turn: agent exited (exit code 70)"), "{error}");

        let path = format!("/v1/sessions/{id}");
        let after = agentd.wait_for(&path, |v| v["agent"]["state"] == "ready" && v["agent"]["restarts"] == 1).await;
        assert!(after["agent"]["last_error"].as_str().unwrap().contains("exit code 70"), "{after}");
        assert_ne!(after["agent"]["pid"], before["agent"]["pid"], "a new process");

        let got = turn(&agentd, &id, &mut events, json!("still here"), "run.completed").await;
        assert_eq!(said(&got), "still here", "{reopened_by}");
        let container = after["container_id"].as_str().unwrap();
        let log = std::fs::read_to_string(agentd.sandboxes_dir().join(container).join("supervisor.log")).unwrap();
        let reopened = (log.contains("session loaded"), log.contains("session resumed"));
        assert_eq!(reopened, (reopened_by == "session/load", reopened_by == "session/resume"), "{reopened_by}: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agents_whole_process_group_is_killed() {
    let agentd = Agentd::start().await;
    let (id, mut events) = agentd.create_streaming(&body(&[], &[], json!({"restart": "never"}))).await;
    let (_, view) = agentd.get(&format!("/v1/sessions/{id}")).await;
    let (_, container) = agentd.get(&format!("/v1/containers/{}", view["container_id"].as_str().unwrap())).await;
    let supervisor = container["supervisor_pid"].as_u64().unwrap() as u32;
    assert_eq!(procfs::children(supervisor).len(), 1, "the agent alone");
    // The agent starts `sleep 600` in its own process group, then exits.
    turn(&agentd, &id, &mut events, json!("/crash 70 orphan"), "run.failed").await;
    agentd.wait_for(&format!("/v1/sessions/{id}"), |v| v["agent"]["state"] == "failed").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !procfs::children(supervisor).is_empty() {
        assert!(std::time::Instant::now() < deadline, "left behind: {:?}", procfs::children(supervisor));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policies_never_and_the_restart_budget() {
    let agentd = Agentd::start().await;
    let (id, mut events) = agentd.create_streaming(&body(&[], &[], json!({"restart": "never"}))).await;
    turn(&agentd, &id, &mut events, json!("/crash 3"), "run.failed").await;
    let path = format!("/v1/sessions/{id}");
    let view = agentd.wait_for(&path, |v| v["agent"]["state"] == "failed").await;
    assert_eq!(view["agent"]["restarts"], 0);
    let (status, problem) = agentd.prompt(&id, "anyone?").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("agent_unavailable")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("exit code 3"), "{problem}");

    // A budget of one restart in a row: the second crash is final.
    let (id, mut events) = agentd.create_streaming(&body(&[], &[], json!({"max_restarts": 1, "restart_backoff_ms": 20}))).await;
    let path = format!("/v1/sessions/{id}");
    turn(&agentd, &id, &mut events, json!("/crash"), "run.failed").await;
    agentd.wait_for(&path, |v| v["agent"]["state"] == "ready" && v["agent"]["restarts"] == 1).await;
    turn(&agentd, &id, &mut events, json!("/crash"), "run.failed").await;
    let view = agentd.wait_for(&path, |v| v["agent"]["state"] == "failed").await;
    assert!(view["agent"]["last_error"].as_str().unwrap().contains("gave up after 1 restarts in a row"), "{view}");

    let (status, problem) = agentd.post("/v1/sessions", &body(&[], &[], json!({"restart": "sometimes"}))).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_output_mid_session_is_reported_and_the_session_goes_on() {
    let agentd = Agentd::start().await;
    let (id, mut events) = agentd.create_streaming(&body(&[], &[], json!({}))).await;
    for (command, reported) in [
        ("/emit garbage", "not JSON-RPC"),
        ("/emit stray", "agent answered request id \"echo-stray-1\""),
        ("/emit huge 17", "longer than 16777216 bytes was dropped"),
    ] {
        let got = turn(&agentd, &id, &mut events, json!(command), "run.completed").await;
        let errors: Vec<Value> = got.iter().filter(|e| e.event == "agent.protocol_error").map(SseEvent::json).collect();
        assert_eq!(errors.len(), 1, "{command}: {got:?}");
        assert!(errors[0]["error"].as_str().unwrap().contains(reported), "{command}: {errors:?}");
        assert!(said(&got).starts_with("emitted"), "{command}");
    }
    let got = turn(&agentd, &id, &mut events, json!("fine"), "run.completed").await;
    assert_eq!(said(&got), "fine");
    let (_, view) = agentd.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!((view["agent"]["state"].as_str(), view["agent"]["restarts"].as_u64()), (Some("ready"), Some(0)), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_never_answers_gets_a_timeout() {
    let agentd = Agentd::start().await;
    let policy = json!({"request_timeout_ms": 300});
    let (status, problem) = agentd.post("/v1/sessions", &body(&["--hang-session-new"], &[], policy)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("agent_error")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("did not answer session/new within 300ms"), "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_blocks_beyond_text_need_the_agents_prompt_capabilities() {
    let agentd = Agentd::start().await;
    let image = json!({"type": "image", "mimeType": "image/png", "data": "iVBORw0KGgo="});
    let resource = json!({"type": "resource", "resource": {"uri": "file:///workspace/a.txt", "text": "hi"}});
    let link = json!({"type": "resource_link", "name": "a.txt", "uri": "file:///workspace/a.txt"});

    let (id, mut events) = agentd.create_streaming(&body(&[], &[], json!({}))).await;
    let got = turn(&agentd, &id, &mut events, json!([{"type": "text", "text": "see "}, link]), "run.completed").await;
    assert_eq!(said(&got), "see ");
    for (block, kind) in [(&image, "image"), (&resource, "resource")] {
        let (status, problem) = agentd.post(&format!("/v1/sessions/{id}:prompt"), &json!({"prompt": [block]})).await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unsupported_content")), "{problem}");
        assert!(problem["detail"].as_str().unwrap().contains(&format!("{kind:?} content blocks")), "{problem}");
        events.until_run_end().await;
    }
    let (status, problem) = agentd.post(&format!("/v1/sessions/{id}:prompt"), &json!({"prompt": [{"type": "video"}]})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unsupported_content")), "{problem}");
    events.until_run_end().await;

    let (id, mut events) = agentd.create_streaming(&body(&["--prompt-capabilities", "image,embedded-context"], &[], json!({}))).await;
    let got = turn(&agentd, &id, &mut events, json!([{"type": "text", "text": "both"}, image, resource]), "run.completed").await;
    assert_eq!(said(&got), "both");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modes_and_config_options_the_session_advertises_are_set_through_the_api() {
    let agentd = Agentd::start().await;
    let (id, mut events) = agentd.create_streaming(&body(&[], &[], json!({}))).await;
    let action = |verb: &str| format!("/v1/sessions/{id}:{verb}");

    let (status, view) = agentd.post(&action("set_config_option"), &json!({"config_id": "case", "value": "upper"})).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["config_options"][0]["currentValue"], "upper", "{view}");
    let got = turn(&agentd, &id, &mut events, json!("loud words"), "run.completed").await;
    assert_eq!(said(&got), "LOUD WORDS");

    let (status, view) = agentd.post(&action("set_mode"), &json!({"mode_id": "quiet"})).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["modes"]["currentModeId"], "quiet", "{view}");
    let got = turn(&agentd, &id, &mut events, json!("shh"), "run.completed").await;
    assert_eq!(said(&got), "", "quiet mode says nothing");

    let (status, problem) = agentd.post(&action("set_mode"), &json!({"mode_id": "loud"})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_mode")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains(r#"["echo", "quiet"]"#), "{problem}");
    let (status, problem) = agentd.post(&action("set_config_option"), &json!({"config_id": "font", "value": "x"})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_config_option")), "{problem}");
    // The agent itself refuses a value it does not know.
    let (status, problem) = agentd.post(&action("set_config_option"), &json!({"config_id": "case", "value": "sideways"})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("case is as-is or upper"), "{problem}");
    let (status, problem) = agentd.post(&action("set_mode"), &json!({})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")), "{problem}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_states_are_stored_and_shown_when_the_node_cannot_answer() {
    // Node checks every 100 ms refresh the stored agent instances.
    let agentd = Agentd::start_with(&[("AGENTD_NODE_CHECK_INTERVAL_MS", "100")]).await;
    let (id, mut events) = agentd.create_streaming(&body(&[], &[], json!({"restart_backoff_ms": 50}))).await;
    let (_, view) = agentd.get(&format!("/v1/sessions/{id}")).await;
    let container = view["container_id"].as_str().unwrap().to_string();
    let instance = view["agent"]["instance_id"].as_str().unwrap().to_string();
    // Recorded when it started.
    let (_, c) = agentd.get(&format!("/v1/containers/{container}")).await;
    assert_eq!((c["agents"][0]["instance_id"].as_str(), c["agents"][0]["state"].as_str()), (Some(instance.as_str()), Some("ready")), "{c}");

    // A crash and a restart: the next node checks record them.
    turn(&agentd, &id, &mut events, json!("/crash 70"), "run.failed").await;
    let c = agentd.wait_for(&format!("/v1/containers/{container}"), |c| c["agents"][0]["restarts"] == 1 && c["agents"][0]["state"] == "ready").await;
    assert!(c["agents"][0]["observed_at"].as_i64().is_some(), "{c}");

    // Once the session is closed, GET shows the stored state: stopped with
    // its container.
    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert!(status.is_success(), "{status}");
    let (_, closed) = agentd.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!((closed["agent"]["state"].as_str(), closed["agent"]["restarts"].as_i64()), (Some("stopped"), Some(1)), "{closed}");
    assert!(closed["agent"]["pid"].is_null(), "{closed}");
}
