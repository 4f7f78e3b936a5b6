//! What only an operator may ask for: host paths, the host's network, a
//! seccomp policy, a registry source of the caller's choice. A write token
//! is refused with 403 `operator_power` naming the field, unless the
//! operator's allow-lists admit it; an admin token may do all of it. And
//! the loose ends of the API: deletes answered again as the first was, a
//! stream opened while its session is being created.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, echo_agent, session_body};

async fn write_token(agentd: &Agentd) -> String {
    let (status, made) = agentd.post("/v1/tokens", &json!({"scope": "write", "name": "powers"})).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    made["token"].as_str().unwrap().to_string()
}

async fn post_as(agentd: &Agentd, token: &str, path: &str, body: &Value) -> (StatusCode, Value) {
    let resp = reqwest::Client::new().post(agentd.url(path)).bearer_auth(token).json(body).send().await.unwrap();
    (resp.status(), resp.json().await.unwrap_or(Value::Null))
}

fn refused_field(status: StatusCode, body: &Value) -> String {
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("operator_power")), "{body}");
    body["detail"].as_str().unwrap().split(':').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_powers_need_an_admin_or_the_operators_allowance() {
    let allowed = tempfile::tempdir().unwrap();
    let copy = allowed.path().join("echo-agent");
    std::fs::copy(echo_agent(), &copy).unwrap();
    let registry = allowed.path().join("registry.json");
    std::fs::write(&registry, json!({"version": "1.0.0", "agents": []}).to_string()).unwrap();
    let allowed_paths = allowed.path().display().to_string();
    let agentd = Agentd::start_full(
        &["--allowed-host-paths", &allowed_paths, "--allowed-registry-sources", &registry.display().to_string()],
        &[],
    )
    .await;
    let write = write_token(&agentd).await;

    // An executable on the node outside the allowance.
    let (status, body) = post_as(&agentd, &write, "/v1/sessions", &session_body(&[])).await;
    assert_eq!(refused_field(status, &body), "manual_agent.distribution.binary.executable");
    // The same agent from an allowed directory.
    let mut allowed_agent = session_body(&[]);
    let exe = copy.display().to_string();
    allowed_agent["manual_agent"]["distribution"]["binary"] = json!({"url": format!("file://{exe}"), "executable": exe});
    let (status, session) = post_as(&agentd, &write, "/v1/sessions", &allowed_agent).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");

    for (profile, field) in [
        (json!({"network": "host"}), "container_profile.network"),
        (json!({"rootfs": "/"}), "container_profile.rootfs"),
        (json!({"seccomp": {"main": {"mismatch_action": "allow", "filter_action": {"errno": 1}, "filter": [{"syscall": "acct"}]}}}), "container_profile.seccomp"),
    ] {
        let mut body = allowed_agent.clone();
        body["container_profile"] = profile;
        let (status, problem) = post_as(&agentd, &write, "/v1/sessions", &body).await;
        assert_eq!(refused_field(status, &problem), field);
    }
    let (status, problem) = post_as(&agentd, &write, "/v1/containers", &json!({"profile": {"network": "host"}})).await;
    assert_eq!(refused_field(status, &problem), "profile.network");

    // Registry syncs: the configured one (none here) or an allowed source.
    let (status, problem) = post_as(&agentd, &write, "/v1/registry:sync", &json!({"source": "/etc/passwd"})).await;
    assert_eq!(refused_field(status, &problem), "source");
    let (status, problem) = post_as(&agentd, &write, "/v1/registry:sync", &json!({})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("registry_not_configured")), "{problem}");
    let (status, synced) = post_as(&agentd, &write, "/v1/registry:sync", &json!({"source": registry.display().to_string()})).await;
    assert_eq!(status, StatusCode::OK, "{synced}");

    // The admin may do what the writer may not.
    let mut host = session_body(&[]);
    host["container_profile"] = json!({"network": "host"});
    let (status, admin_session) = agentd.post("/v1/sessions", &host).await;
    assert_eq!(status, StatusCode::CREATED, "{admin_session}");

    for id in [&session["id"], &admin_session["id"]] {
        let (status, _) = agentd.delete(&format!("/v1/sessions/{}", id.as_str().unwrap())).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_again_is_answered_as_the_first_delete() {
    let agentd = Agentd::start().await;
    let session = agentd.create_session(&[]).await;
    let path = format!("/v1/sessions/{}", session["id"].as_str().unwrap());
    for attempt in ["first", "second"] {
        let (status, body) = agentd.delete(&path).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{attempt} delete of the session: {body}");
    }
    let (status, container) = agentd.post("/v1/containers", &json!({"profile": {}})).await;
    assert_eq!(status, StatusCode::CREATED, "{container}");
    let path = format!("/v1/containers/{}", container["id"].as_str().unwrap());
    // Two at once, then one more: each is 204.
    let (a, b) = tokio::join!(agentd.delete(&path), agentd.delete(&path));
    assert_eq!((a.0, b.0), (StatusCode::NO_CONTENT, StatusCode::NO_CONTENT), "{a:?} {b:?}");
    let (status, body) = agentd.delete(&path).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = agentd.delete("/v1/containers/ctr_nosuch").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("container_not_found")), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_while_creating_carries_on_into_the_sessions_events() {
    let agentd = Agentd::start().await;
    let req = agentd.http.post(agentd.url("/v1/sessions")).header("Prefer", "respond-async").json(&session_body(&[]));
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let view: Value = resp.json().await.unwrap();
    assert!(status == StatusCode::ACCEPTED || status == StatusCode::CREATED, "{status} {view}");
    let id = view["id"].as_str().unwrap().to_string();
    let mut events = agentd.events(&id, None).await;
    agentd.wait_for(&format!("/v1/sessions/{id}"), |v| v["state"] == "ready").await;
    let (status, answer) = agentd.prompt(&id, "hello").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let got = events.until_run_end().await;
    let kinds: Vec<&str> = got.iter().map(|e| e.event.as_str()).filter(|k| *k != "session.setup").collect();
    assert_eq!(kinds.first(), Some(&"run.started"), "{got:?}");
    assert_eq!(kinds.last(), Some(&"run.completed"), "{got:?}");
    assert!(got.iter().all(|e| e.event == "session.setup" || e.id.is_some()), "log events keep their ids: {got:?}");
    let _ = agentd.delete(&format!("/v1/sessions/{id}")).await;
}
