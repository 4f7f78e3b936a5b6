//! The registry and bundles end to end: sync from a file, sessions by
//! `agent_id` from a bundle archive the test makes of the example echo agent,
//! and every kind of bad input (unknown agent, no distribution for this
//! platform, bad archive URL, digest mismatch, corrupt archive, path
//! traversal, a registry that does not parse), each a clear problem that
//! leaves no sandbox and nothing in the bundle cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, echo_agent};

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_string()
}

/// `tar -czf archive -C dir args...`, fast gzip (a debug echo-agent is ~100 MB).
fn tar_gz(archive: &Path, dir: &Path, args: &[&str]) {
    let status = Command::new("tar")
        .args(["--use-compress-program", "gzip -1", "-cf"])
        .arg(archive)
        .arg("-C")
        .arg(dir)
        .args(args)
        .status()
        .expect("tar");
    assert!(status.success());
}

fn entry(id: &str, platform: &str, archive: &Path, sha: Option<&str>, cmd: &str) -> Value {
    let mut target = json!({"archive": format!("file://{}", archive.display()), "cmd": cmd, "args": ["--chunk-chars", "4"]});
    if let Some(sha) = sha {
        target["sha256"] = json!(sha);
    }
    json!({"id": id, "name": id, "version": "1.0.0", "description": "test", "distribution": {"binary": {platform: target}}})
}

fn platform() -> String {
    format!("linux-{}", std::env::consts::ARCH)
}

fn assert_problem(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!((status, body["code"].as_str()), (want, Some(code)), "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
}

struct Archives {
    _dir: tempfile::TempDir,
    good: PathBuf,
    corrupt: PathBuf,
    traversal: PathBuf,
    registry: PathBuf,
}

fn archives() -> Archives {
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir_all(content.join("bin")).unwrap();
    std::fs::copy(echo_agent(), content.join("bin/echo-agent")).unwrap();
    let good = dir.path().join("echo.tar.gz");
    tar_gz(&good, &content, &["."]);
    // The bad archives need no agent: they fail before any runs.
    let small = dir.path().join("small");
    std::fs::create_dir_all(small.join("bin")).unwrap();
    std::fs::write(small.join("bin/echo-agent"), vec![b'x'; 64 * 1024]).unwrap();
    let corrupt = dir.path().join("corrupt.tar.gz");
    tar_gz(&corrupt, &small, &["."]);
    let mut bytes = std::fs::read(&corrupt).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&corrupt, bytes).unwrap();
    // An entry named ../escaped (GNU tar keeps it with -P).
    std::fs::write(dir.path().join("escaped"), b"evil").unwrap();
    let traversal = dir.path().join("traversal.tar.gz");
    tar_gz(&traversal, &small, &["-P", "bin/echo-agent", "../escaped"]);
    let registry = dir.path().join("registry.json");
    Archives { good, corrupt, traversal, registry, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_agents_run_from_bundles_and_bad_input_leaves_nothing() {
    let a = archives();
    let sha = sha256(&a.good);
    let agents = json!({"agents": [
        entry("echo-bundle", &platform(), &a.good, Some(&sha), "./bin/echo-agent"),
        entry("echo-unchecked", &platform(), &a.good, None, "bin/echo-agent"),
        entry("mac-only", "darwin-aarch64", &a.good, None, "bin/echo-agent"),
        entry("bad-url", &platform(), Path::new("/nonexistent/echo.tar.gz"), None, "bin/echo-agent"),
        entry("mismatch", &platform(), &a.good, Some(&"0".repeat(64)), "bin/echo-agent"),
        entry("corrupt", &platform(), &a.corrupt, None, "bin/echo-agent"),
        entry("traversal", &platform(), &a.traversal, None, "bin/echo-agent"),
    ]});
    std::fs::write(&a.registry, agents.to_string()).unwrap();
    let agentd = Agentd::start().await;
    let bundles = agentd.state_dir().join("node/bundles");
    let cache = || std::fs::read_dir(&bundles).map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect::<Vec<_>>()).unwrap_or_default();

    // Nothing configured: a sync needs a source.
    let (status, body) = agentd.post("/v1/registry:sync", &json!({})).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "registry_not_configured");
    let (status, report) = agentd.post("/v1/registry:sync", &json!({"source": a.registry.to_str().unwrap()})).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["agents"], 7);
    let (_, list) = agentd.get("/v1/registry/agents").await;
    assert_eq!(list["agents"].as_array().unwrap().len(), 7);
    let (status, one) = agentd.get("/v1/registry/agents/mac-only").await;
    assert_eq!((status, &one["launch"]), (StatusCode::OK, &Value::Null), "{one}");
    let (status, body) = agentd.get("/v1/registry/agents/nope").await;
    assert_problem(status, &body, StatusCode::NOT_FOUND, "unknown_agent");

    // A registry that does not parse, or cannot be read, changes nothing.
    let broken = a.registry.with_file_name("broken.json");
    std::fs::write(&broken, b"{\"agents\": [").unwrap();
    let (status, body) = agentd.post("/v1/registry:sync", &json!({"source": broken.to_str().unwrap()})).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_registry");
    let (status, body) = agentd.post("/v1/registry:sync", &json!({"source": "/nonexistent/registry.json"})).await;
    assert_problem(status, &body, StatusCode::BAD_GATEWAY, "registry_unavailable");
    let (_, list) = agentd.get("/v1/registry/agents").await;
    assert_eq!(list["agents"].as_array().unwrap().len(), 7, "the stored registry stays");

    // Bad input: each a clear problem, no sandbox, nothing cached.
    for (agent, status, code) in [
        ("nope", StatusCode::NOT_FOUND, "unknown_agent"),
        ("mac-only", StatusCode::UNPROCESSABLE_ENTITY, "no_distribution"),
        ("bad-url", StatusCode::BAD_GATEWAY, "bundle_fetch_failed"),
        ("mismatch", StatusCode::UNPROCESSABLE_ENTITY, "bundle_checksum_mismatch"),
        ("corrupt", StatusCode::UNPROCESSABLE_ENTITY, "bundle_invalid"),
        ("traversal", StatusCode::UNPROCESSABLE_ENTITY, "bundle_invalid"),
    ] {
        let (got, body) = agentd.post("/v1/sessions", &json!({"agent_id": agent})).await;
        assert_problem(got, &body, status, code);
        assert!(agentd.sandbox_dirs().is_empty(), "{agent}: {:?}", agentd.sandbox_dirs());
        assert!(cache().is_empty(), "{agent}: {:?}", cache());
    }
    let (status, body) = agentd.post("/v1/sessions", &json!({"agent_id": "echo-bundle", "manual_agent": {}})).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");

    // The good bundle, by two agents at once (with and without its digest):
    // one tree in the cache, and prompted.
    let (checked, unchecked) = (json!({"agent_id": "echo-bundle"}), json!({"agent_id": "echo-unchecked"}));
    let (a, b) = tokio::join!(agentd.post("/v1/sessions", &checked), agentd.post("/v1/sessions", &unchecked));
    let mut ids = Vec::new();
    for (status, session) in [a, b] {
        assert_eq!(status, StatusCode::CREATED, "{session}\n{}", agentd.log());
        ids.push(session["id"].as_str().unwrap().to_string());
    }
    assert_eq!(cache(), vec![sha.clone()]);
    // The store's account: the archive given with and without its digest,
    // one sandbox each; the refused creates count nothing.
    let (_, listed) = agentd.get("/v1/bundles").await;
    let mut rows: Vec<(String, u64, String)> = listed["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["sha256"].as_str().unwrap().to_string(), b["uses"].as_u64().unwrap(), b["node_id"].as_str().unwrap().to_string()))
        .collect();
    rows.sort();
    assert_eq!(rows, [(String::new(), 1, "node-1".to_string()), (sha.clone(), 1, "node-1".to_string())], "{listed}");
    assert!(listed["bundles"].as_array().unwrap().iter().all(|b| b["archive_url"].as_str().unwrap().ends_with(".tar.gz")), "{listed}");
    let mut events = agentd.events(&ids[0], None).await;
    let (status, _) = agentd.prompt(&ids[0], "from a bundle").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = events.until_run_end().await;
    let text: String = got
        .iter()
        .filter(|e| e.event == "session.update")
        .filter_map(|e| e.json()["update"]["content"]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "from a bundle");
    assert_eq!(got.last().unwrap().event, "run.completed");
    for id in &ids {
        let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_agent_may_be_a_bundle_in_either_shape() {
    let a = archives();
    let sha = sha256(&a.good);
    let agentd = Agentd::start().await;
    let registry_shape = entry("echo-inline", &platform(), &a.good, Some(&sha), "./bin/echo-agent");
    let manual_shape = json!({"id": "echo-manual", "version": "1.0.0", "source": "manual",
        "distribution": {"type": "binary", "binary": {"url": format!("file://{}", a.good.display()), "sha256": sha, "executable": "bin/echo-agent"}}});
    for agent in [registry_shape, manual_shape] {
        let (status, session) = agentd.post("/v1/sessions", &json!({"manual_agent": agent})).await;
        assert_eq!(status, StatusCode::CREATED, "{session}\n{}", agentd.log());
        let id = session["id"].as_str().unwrap();
        let mut events = agentd.events(id, None).await;
        agentd.prompt(id, "hi").await;
        assert_eq!(events.until_run_end().await.last().unwrap().event, "run.completed");
        let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_fails_at_start_is_logged_and_agentd_still_serves() {
    let agentd = Agentd::start_with(&[("AGENTD_REGISTRY", "/nonexistent/registry.json")]).await;
    let (status, list) = agentd.get("/v1/registry/agents").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["agents"], json!([]));
    assert!(agentd.log().contains("registry sync failed"), "{}", agentd.log());
    // The configured source is the default of a sync.
    let (status, body) = agentd.post("/v1/registry:sync", &json!({})).await;
    assert_problem(status, &body, StatusCode::BAD_GATEWAY, "registry_unavailable");
    assert!(body["detail"].as_str().unwrap().contains("/nonexistent/registry.json"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_synced_again_periodically_and_a_bad_source_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.json");
    let entry = |id: &str, version: &str| json!({"id": id, "name": id, "version": version, "description": "d",
        "distribution": {"npx": {"package": format!("@example/{id}")}}});
    std::fs::write(&file, json!({"agents": [entry("first", "1.0.0")]}).to_string()).unwrap();
    let source = file.display().to_string();
    let agentd = Agentd::start_with(&[("AGENTD_REGISTRY", &source), ("AGENTD_REGISTRY_SYNC_INTERVAL_MS", "200")]).await;
    let ids = |list: &Value| list["agents"].as_array().unwrap().iter().map(|a| a["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let (_, list) = agentd.get("/v1/registry/agents").await;
    assert_eq!(ids(&list), ["first"]);

    // A changed source is picked up without a restart or a sync call.
    std::fs::write(&file, json!({"agents": [entry("first", "1.1.0"), entry("second", "2.0.0")]}).to_string()).unwrap();
    let list = agentd.wait_for("/v1/registry/agents", |l| l["agents"].as_array().is_some_and(|a| a.len() == 2)).await;
    assert_eq!(ids(&list), ["first", "second"]);
    assert_eq!(list["agents"][0]["version"], "1.1.0");

    // A source gone bad: the sync fails and says so, the registry stays.
    std::fs::write(&file, "{ not json").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agentd.log().contains("periodic registry sync failed") {
        assert!(std::time::Instant::now() < deadline, "no failed periodic sync logged:\n{}", agentd.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (_, list) = agentd.get("/v1/registry/agents").await;
    assert_eq!(ids(&list), ["first", "second"]);
}
