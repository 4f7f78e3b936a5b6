//! Container profiles through the API: cgroup limits, OOM reporting,
//! hibernate and resume, and invalid profiles.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Agentd, procfs, session_body, wait_gone};

/// cgroup directories named after `needle` anywhere under /sys/fs/cgroup.
fn cgroup_dirs(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![std::path::PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                let path = e.path();
                if path.to_string_lossy().contains(needle) {
                    found.push(path.display().to_string());
                }
                stack.push(path);
            }
        }
    }
    found
}

async fn wait_no_cgroups(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = cgroup_dirs(needle);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "cgroups left: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_and_an_oom_kill_fails_the_turn_with_a_clear_reason() {
    let agentd = Agentd::start().await;
    let mut body = session_body(&["--hog-mib", "256"]);
    body["container_profile"] = json!({"memory": "48M", "pids": 64, "cpus": 0.5});
    let (status, session) = agentd.post("/v1/sessions", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let id = session["id"].as_str().unwrap();
    let container_id = session["container_id"].as_str().unwrap();

    let (_, container) = agentd.get(&format!("/v1/containers/{container_id}")).await;
    assert_eq!(container["usage"]["memory_max_bytes"], 48 << 20, "{container}");
    assert_eq!(container["usage"]["pids_max"], 64);
    let supervisor = container["supervisor_pid"].as_u64().unwrap() as u32;
    let agent = procfs::children(supervisor)[0];
    let cgroups = std::fs::read_to_string(format!("/proc/{agent}/cgroup")).unwrap();
    assert!(cgroups.lines().any(|l| l.contains("memory:") && l.ends_with(container_id)), "{cgroups}");

    let mut events = agentd.events(id, None).await;
    let (status, _) = agentd.prompt(id, "eat").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = events.until_run_end().await;
    let end = got.last().unwrap();
    assert_eq!(end.event, "run.failed", "{got:?}");
    let error = end.json()["error"].as_str().unwrap().to_string();
    assert!(error.contains("out of memory"), "{error}");
    let mut saw_oom = got.iter().any(|e| e.event == "sandbox.oom");
    while !saw_oom {
        saw_oom = events.next().await.is_some_and(|e| e.event == "sandbox.oom");
    }
    let view = agentd.wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"][0]["state"] == "failed").await;
    assert!(view["runs"][0]["error"].as_str().unwrap().contains("out of memory"));

    let (status, _) = agentd.delete(&format!("/v1/containers/{container_id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_gone(supervisor).await;
    wait_no_cgroups(container_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernate_freezes_the_sandbox_and_resume_continues_the_turn() {
    let agentd = Agentd::start().await;
    let session = agentd.create_session(&["--delay-ms", "50"]).await;
    let id = session["id"].as_str().unwrap();
    let container_id = session["container_id"].as_str().unwrap();
    let mut events = agentd.events(id, None).await;
    let words: Vec<String> = (0..30).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let (status, _) = agentd.prompt(id, &text).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(events.next().await.unwrap().event, "run.started");
    let mut echoed = String::new();
    let first = events.next().await.unwrap();
    echoed.push_str(first.json()["update"]["content"]["text"].as_str().unwrap());

    let hibernate = format!("/v1/containers/{container_id}:hibernate");
    let (status, body) = agentd.post(&hibernate, &json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, container) = agentd.get(&format!("/v1/containers/{container_id}")).await;
    assert_eq!((container["state"].as_str(), container["usage"]["frozen"].as_bool()), (Some("hibernated"), Some(true)));
    let (status, body) = agentd.post(&hibernate, &json!({})).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("illegal_state")));

    // Frozen: nothing moves. Drain what was in flight, then expect silence.
    let quiet_from = Instant::now() + Duration::from_millis(300);
    let mut during_freeze = 0;
    while Instant::now() < quiet_from + Duration::from_millis(700) {
        match tokio::time::timeout(Duration::from_millis(100), events.next()).await {
            Ok(Some(e)) => {
                if Instant::now() > quiet_from {
                    during_freeze += 1;
                }
                echoed.push_str(e.json()["update"]["content"]["text"].as_str().unwrap_or(""));
            }
            Ok(None) => panic!("stream ended"),
            Err(_) => {}
        }
    }
    assert_eq!(during_freeze, 0, "events arrived while frozen");

    let (status, _) = agentd.post(&format!("/v1/containers/{container_id}:resume"), &json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let rest = events.until_run_end().await;
    for e in &rest[..rest.len() - 1] {
        echoed.push_str(e.json()["update"]["content"]["text"].as_str().unwrap());
    }
    assert_eq!(rest.last().unwrap().json()["stop_reason"], "end_turn");
    assert_eq!(echoed, text, "the agent's state survived the freeze");
    let (_, container) = agentd.get(&format!("/v1/containers/{container_id}")).await;
    assert_eq!(container["state"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_profiles_are_refused_and_nothing_is_left() {
    let agentd = Agentd::start().await;
    for (profile, code) in [
        (json!({"memory": "1K"}), "invalid_profile"),
        (json!({"memory": "lots"}), "invalid_profile"),
        (json!({"pids": 0}), "invalid_profile"),
        (json!({"cpus": -1}), "invalid_profile"),
        (json!({"network": "bridge"}), "invalid_profile"),
        (json!({"memroy": "1G"}), "invalid_profile"),
        (json!({"rootfs": "relative"}), "invalid_profile"),
        (json!({"rootfs": "/definitely/not/a/rootfs"}), "invalid_profile"),
        (json!("not an object"), "invalid_profile"),
    ] {
        let mut body = session_body(&[]);
        body["container_profile"] = profile.clone();
        let (status, problem) = agentd.post("/v1/sessions", &body).await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(code)), "{profile}: {problem}");
    }
    assert!(agentd.sandbox_dirs().is_empty());
    let (_, list) = agentd.get("/v1/sessions").await;
    for s in list["sessions"].as_array().unwrap() {
        assert!(cgroup_dirs(s["container_id"].as_str().unwrap()).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_seccomp_policy_replaces_the_default_one() {
    let agentd = Agentd::start_with(&[("AGENTD_INITIALIZE_TIMEOUT_MS", "3000")]).await;
    let policy = |syscall: &str| {
        json!({"main": {"mismatch_action": "allow", "filter_action": {"errno": 1}, "filter": [{"syscall": syscall}]}})
    };
    // A policy that takes `write` away: the agent cannot even answer.
    let mut body = session_body(&[]);
    body["container_profile"] = json!({"seccomp": policy("write")});
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("agent_init_failed")), "{problem}");

    // A harmless one: the agent works, under it rather than the default.
    body["container_profile"] = json!({"seccomp": policy("acct")});
    let (status, session) = agentd.post("/v1/sessions", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let (_, container) = agentd.get(&format!("/v1/containers/{}", session["container_id"].as_str().unwrap())).await;
    let agent = procfs::children(container["supervisor_pid"].as_u64().unwrap() as u32)[0];
    assert_eq!(procfs::status_field(agent, "Seccomp").as_deref(), Some("2"));

    body["container_profile"] = json!({"seccomp": {"main": {"filter": "nonsense"}}});
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_profile")), "{problem}");
}
