//! Agents this project did not write, installed from package registries by
//! `scripts/third-party-agents` (which `scripts/test` runs) and delivered to
//! agentd the way registry agents are: a bundle archive with its sha256, named
//! by a registry entry, used by a session through `agent_id`.
//!
//! Outside `scripts/test`, a missing cache skips these tests loudly; under it
//! (`AGENTD_REQUIRE_THIRD_PARTY=1`) a missing cache fails them.

use std::path::PathBuf;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, agentd_bin};

/// `<cache>/<name>/` as `scripts/third-party-agents` leaves it, or `None`
/// (after saying so) when it is absent and not required.
fn cached_bundle(name: &str) -> Option<(PathBuf, String)> {
    let cache = std::env::var_os("AGENTD_THIRD_PARTY_AGENTS").map(PathBuf::from).unwrap_or_else(|| {
        // target/<profile>/agentd -> target/third-party-agents
        agentd_bin().parent().and_then(|p| p.parent()).expect("target dir").join("third-party-agents")
    });
    let dir = cache.join(name);
    let archive = dir.join("python-echo-agent.tar.gz");
    match std::fs::read_to_string(dir.join("python-echo-agent.tar.gz.sha256")) {
        Ok(sha) => Some((archive, sha.trim().to_string())),
        Err(e) => {
            let message = format!(
                "third-party agent cache {} is missing ({e}): run scripts/third-party-agents (scripts/test does)",
                dir.display()
            );
            if std::env::var("AGENTD_REQUIRE_THIRD_PARTY").is_ok_and(|v| v == "1") {
                panic!("{message}");
            }
            eprintln!("\n********** SKIPPED: {message} **********\n");
            None
        }
    }
}

fn platform() -> String {
    format!("linux-{}", std::env::consts::ARCH)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_echo_agent_runs_from_a_registry_bundle() {
    let Some((archive, sha)) = cached_bundle("python-echo-agent-0.12.1") else { return };
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("registry.json");
    let entry = json!({
        "id": "python-echo-agent", "name": "Python SDK echo agent", "version": "0.12.1",
        "description": "examples/echo_agent.py of PyPI agent-client-protocol",
        "distribution": {"binary": {platform(): {"archive": format!("file://{}", archive.display()), "sha256": sha, "cmd": "./run"}}}
    });
    std::fs::write(&registry, json!({"version": "1.0.0", "agents": [entry]}).to_string()).unwrap();
    let agentd = Agentd::start_with(&[("AGENTD_REGISTRY", registry.to_str().unwrap())]).await;

    let (status, agents) = agentd.get("/v1/registry/agents").await;
    assert_eq!(status, StatusCode::OK, "{agents}");
    assert_eq!(agents["agents"][0]["id"], "python-echo-agent", "the registry was synced at start: {agents}");
    assert_eq!(agents["agents"][0]["launch"], "binary");

    let (status, session) = agentd.post("/v1/sessions", &json!({"agent_id": "python-echo-agent"})).await;
    assert_eq!(status, StatusCode::CREATED, "{session}\n{}", agentd.log());
    assert_eq!(session["agent"]["id"], "python-echo-agent");
    assert_eq!(session["agent"]["version"], "0.12.1");
    let id = session["id"].as_str().unwrap().to_string();
    let cached = agentd.state_dir().join("node/bundles").join(&sha);
    assert!(cached.join("echo_agent.py").is_file(), "the bundle is unpacked under its digest");

    let mut events = agentd.events(&id, None).await;
    let prompt = "hello from agentd to a Python agent";
    let (status, accepted) = agentd.prompt(&id, prompt).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let got = events.until_run_end().await;
    assert_eq!(got[0].event, "run.started");
    let updates: Vec<Value> = got.iter().filter(|e| e.event == "session.update").map(|e| e.json()).collect();
    let echoed: String = updates
        .iter()
        .filter(|u| u["update"]["sessionUpdate"] == "agent_message_chunk")
        .filter_map(|u| u["update"]["content"]["text"].as_str())
        .collect();
    assert_eq!(echoed, prompt, "updates: {updates:?}");
    // Relayed as the agent sent them: its _meta survives.
    assert_eq!(updates[0]["update"]["_meta"]["echo"], true, "{}", updates[0]);
    let end = got.last().unwrap();
    assert_eq!(end.event, "run.completed", "{end:?}");
    assert_eq!(end.json()["stop_reason"], "end_turn");

    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    agentd.wait_for(&format!("/v1/sessions/{id}"), |s| s["state"] == "closed").await;
    assert!(agentd.sandbox_dirs().is_empty(), "{:?}", agentd.sandbox_dirs());
    assert!(cached.is_dir(), "the bundle stays cached for the next session");
}
