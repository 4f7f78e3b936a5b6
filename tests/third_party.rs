//! Agents this project did not write, installed from package registries by
//! `scripts/third-party-agents` (which `scripts/test` runs) and delivered to
//! agentd the way registry agents are: a bundle archive with its sha256, named
//! by a registry entry, used by a session through `agent_id`.
//!
//! Outside `scripts/test`, a missing cache skips these tests loudly; under it
//! (`AGENTD_REQUIRE_THIRD_PARTY=1`) a missing cache fails them.

use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, agentd_bin};

/// `<cache>/<name>-<version>/<name>.tar.gz` and its sha256, as
/// `scripts/third-party-agents` leaves them, or `None` (after saying so) when
/// absent and not required.
fn cached_bundle(name: &str, version: &str) -> Option<(PathBuf, String)> {
    let cache = std::env::var_os("AGENTD_THIRD_PARTY_AGENTS").map(PathBuf::from).unwrap_or_else(|| {
        // target/<profile>/agentd -> target/third-party-agents
        agentd_bin().parent().and_then(|p| p.parent()).expect("target dir").join("third-party-agents")
    });
    let dir = cache.join(format!("{name}-{version}"));
    let archive = dir.join(format!("{name}.tar.gz"));
    match std::fs::read_to_string(dir.join(format!("{name}.tar.gz.sha256"))) {
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

/// A registry file of one `binary` entry, for `AGENTD_REGISTRY`.
fn registry_file(dir: &Path, entry: Value) -> PathBuf {
    let registry = dir.join("registry.json");
    std::fs::write(&registry, json!({"version": "1.0.0", "agents": [entry]}).to_string()).unwrap();
    registry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_echo_agent_runs_from_a_registry_bundle() {
    let Some((archive, sha)) = cached_bundle("python-echo-agent", "0.12.1") else { return };
    let dir = tempfile::tempdir().unwrap();
    let registry = registry_file(dir.path(), json!({
        "id": "python-echo-agent", "name": "Python SDK echo agent", "version": "0.12.1",
        "description": "examples/echo_agent.py of PyPI agent-client-protocol",
        "distribution": {"binary": {platform(): {"archive": format!("file://{}", archive.display()), "sha256": sha, "cmd": "./run"}}}
    }));
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

/// An agent that needs credentials, as a test drives it.
struct KeyedAgent {
    /// Bundle name and version in the cache; also the registry id.
    name: &'static str,
    version: &'static str,
    cmd: &'static str,
    args: &'static [&'static str],
    /// Set in agentd's own environment: the agent must never see them.
    host_keys: &'static [&'static str],
    /// How the problem must describe each of the agent's authMethods.
    methods: &'static [&'static str],
    /// A variable the plan sets to a fake key to get past authentication.
    key: &'static str,
    /// What the agent keeps under its HOME (the workspace) once authenticated.
    home_state: &'static str,
}

/// Without credentials the agent still initializes inside the sandbox (its
/// authMethods, from its `initialize` answer, reach the problem), answers
/// `session/new` with ACP's auth_required, and the create is a clean 422 that
/// leaves a failed session and no sandbox. With a (fake) key in the plan's
/// env the supervisor picks the method naming it, `authenticate` and then
/// `session/new` succeed, and the agent keeps its state in the writable HOME.
/// No prompt is sent: the key is not real and sandboxes have no network.
async fn initializes_and_reports_auth_required(agent: KeyedAgent) {
    let Some((archive, sha)) = cached_bundle(agent.name, agent.version) else { return };
    let dir = tempfile::tempdir().unwrap();
    let registry = |env: Value| {
        registry_file(dir.path(), json!({
            "id": agent.name, "name": agent.name, "version": agent.version,
            "distribution": {"binary": {platform(): {
                "archive": format!("file://{}", archive.display()), "sha256": sha, "cmd": agent.cmd, "args": agent.args, "env": env}}}
        }))
    };
    let host_keys: Vec<(&str, &str)> = agent.host_keys.iter().map(|k| (*k, "host-key-must-not-leak")).collect();
    let registry_path = registry(json!({})).to_str().unwrap().to_string();
    let env = [&[("AGENTD_REGISTRY", registry_path.as_str())][..], &host_keys[..]].concat();
    let body = json!({"agent_id": agent.name});

    let agentd = Agentd::start_with(&env).await;
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("agent_auth_required")), "{problem}\n{}", agentd.log());
    let detail = problem["detail"].as_str().unwrap();
    for method in agent.methods {
        assert!(detail.contains(method), "{method} missing from: {detail}");
    }
    // The session is kept, failed, with the same reason.
    let (_, sessions) = agentd.get("/v1/sessions").await;
    let failed = &sessions["sessions"][0];
    assert_eq!((failed["state"].as_str(), failed["error"].as_str()), (Some("failed"), Some(detail)), "{sessions}");
    wait_no_sandboxes(&agentd).await;
    drop(agentd);

    // The registry is read at start: a new agentd for the entry with a key.
    registry(json!({agent.key: "fake-key-for-agentd-tests"}));
    let agentd = Agentd::start_with(&env).await;
    let (status, session) = agentd.post("/v1/sessions", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{session}\n{}", agentd.log());
    let id = session["id"].as_str().unwrap().to_string();
    let (_, view) = agentd.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(view["agent"]["state"], "ready", "{view}");
    let home = agentd.sandboxes_dir().join(session["container_id"].as_str().unwrap()).join("workspace");
    let kept = std::fs::read_to_string(home.join(agent.home_state)).unwrap_or_else(|e| panic!("{} in the workspace: {e}", agent.home_state));
    assert!(!kept.contains("host-key-must-not-leak"), "{kept}");
    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    agentd.wait_for(&format!("/v1/sessions/{id}"), |s| s["state"] == "closed").await;
    wait_no_sandboxes(&agentd).await;
}

async fn wait_no_sandboxes(agentd: &Agentd) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agentd.sandbox_dirs().is_empty() {
        assert!(std::time::Instant::now() < deadline, "sandboxes left behind: {:?}", agentd.sandbox_dirs());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Zed's codex-acp (npm, a native binary): its key methods are `env_var`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_acp_initializes_and_reports_auth_required_without_credentials() {
    initializes_and_reports_auth_required(KeyedAgent {
        name: "codex-acp",
        version: "0.16.0",
        cmd: "./codex-acp",
        args: &[],
        host_keys: &["OPENAI_API_KEY", "CODEX_API_KEY"],
        methods: &[
            "chatgpt (Login with ChatGPT)",
            "codex-api-key (Use CODEX_API_KEY; needs CODEX_API_KEY)",
            "openai-api-key (Use OPENAI_API_KEY; needs OPENAI_API_KEY)",
        ],
        key: "OPENAI_API_KEY",
        // Where codex-acp's `authenticate` stores the key it was given.
        home_state: ".codex/auth.json",
    })
    .await;
}

/// Google's Gemini CLI (npm, node on the host's /usr/bin/node) with `--acp`:
/// its `gemini-api-key` method does not name its variable; the supervisor
/// reads it from the id (`GEMINI_API_KEY`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_cli_initializes_and_reports_auth_required_without_credentials() {
    initializes_and_reports_auth_required(KeyedAgent {
        name: "gemini-cli",
        version: "0.61.0",
        cmd: "./run",
        args: &["--acp"],
        host_keys: &["GEMINI_API_KEY", "GOOGLE_API_KEY"],
        methods: &[
            "oauth-personal (Log in with Google)",
            "gemini-api-key (Gemini API key; needs GEMINI_API_KEY)",
            "vertex-ai (Vertex AI)",
            "gateway (AI API Gateway)",
        ],
        key: "GEMINI_API_KEY",
        home_state: ".gemini/installation_id",
    })
    .await;
}
