//! An npx-distributed agent end to end, without the internet: the test packs
//! `tests/fixtures/echo-agent-js` (a dependency-free ACP echo agent in
//! JavaScript) with `npm pack` and serves the tarball from a local HTTP
//! server; the registry entry's `distribution.npx.package` is the tarball's
//! URL and its npm registry points at the same server, which refuses
//! anything else (so a registry lookup would show). The sandbox gets the
//! host's network (npx agents do unless the profile names one) and runs the
//! host's `/usr/bin/npx` and `node`. The session shows `installing` while
//! the tarball download is held back, then `ready`; a prompt's answer comes
//! over SSE; npm's cache is in the sandbox's workspace (its HOME), never in
//! the host's.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, said};

const TARBALL: &str = "echo-agent-js-1.0.0.tgz";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/echo-agent-js")
}

/// `npm pack` of the fixture into `dir`, with npm's cache in `dir` too
/// (the host's `~/.npm` stays untouched).
fn pack(dir: &Path) -> PathBuf {
    let out = Command::new("npm")
        .args(["pack", "--silent", "--pack-destination"])
        .arg(dir)
        .current_dir(fixture())
        .env("npm_config_cache", dir.join("npm-cache"))
        .env("npm_config_update_notifier", "false")
        .output()
        .expect("npm");
    assert!(out.status.success(), "npm pack: {}", String::from_utf8_lossy(&out.stderr));
    let tarball = dir.join(TARBALL);
    assert!(tarball.is_file(), "npm pack made no {}", tarball.display());
    tarball
}

/// Serves the tarball at `/<TARBALL>` and 404s everything else, recording
/// every request line. The first tarball request waits for `gate`.
struct Server {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(tarball: Vec<u8>, gate: mpsc::Receiver<()>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (requests, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut gate = Some(gate);
                while !stop.load(Ordering::Relaxed) {
                    let mut conn = match listener.accept() {
                        Ok((conn, _)) => conn,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        Err(e) => panic!("accept: {e}"),
                    };
                    conn.set_nonblocking(false).unwrap();
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&request).lines().next().unwrap_or_default().to_string();
                    requests.lock().unwrap().push(line.clone());
                    if line.starts_with(&format!("GET /{TARBALL} ")) {
                        if let Some(gate) = gate.take() {
                            let _ = gate.recv_timeout(Duration::from_secs(30));
                        }
                        let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", tarball.len());
                        let _ = conn.write_all(head.as_bytes()).and_then(|()| conn.write_all(&tarball));
                    } else {
                        let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    }
                }
            })
        };
        Self { port, requests, stop, thread: Some(thread) }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Every `<cache>/_npx/*/node_modules/echo-agent-js` under `cache`.
fn npx_installs(cache: &Path) -> Vec<PathBuf> {
    let Ok(dirs) = std::fs::read_dir(cache.join("_npx")) else { return Vec::new() };
    dirs.flatten().map(|d| d.path().join("node_modules/echo-agent-js")).filter(|p| p.join("package.json").is_file()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_npx_agent_installs_in_the_sandbox_and_answers() {
    if !Path::new("/usr/bin/npx").exists() || !Path::new("/usr/bin/node").exists() {
        assert!(std::env::var("AGENTD_REQUIRE_THIRD_PARTY").is_err(), "/usr/bin/npx and /usr/bin/node are needed");
        eprintln!("SKIPPED: no /usr/bin/npx or /usr/bin/node on this host");
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let tarball = std::fs::read(pack(scratch.path())).unwrap();
    let host_cache = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".npm"));
    let host_installs_before = host_cache.as_deref().map(npx_installs).unwrap_or_default();

    let (release, gate) = mpsc::channel();
    let server = Server::start(tarball, gate);
    let base = format!("http://127.0.0.1:{}", server.port);
    let registry = scratch.path().join("registry.json");
    let entry = json!({"id": "echo-agent-js", "name": "echo-agent-js", "version": "1.0.0", "description": "ACP echo agent in JavaScript",
        "distribution": {"npx": {"package": format!("{base}/{TARBALL}"), "args": [],
            "env": {"npm_config_registry": format!("{base}/registry/"), "npm_config_fetch_retries": "0"}}}});
    std::fs::write(&registry, json!({"agents": [entry]}).to_string()).unwrap();

    let agentd = Agentd::start().await;
    let (status, synced) = agentd.post("/v1/registry:sync", &json!({"source": registry})).await;
    assert_eq!(status, StatusCode::OK, "{synced}");
    let create = {
        let (http, url) = (agentd.http.clone(), agentd.url("/v1/sessions"));
        tokio::spawn(async move {
            let resp = http.post(url).json(&json!({"agent_id": "echo-agent-js"})).send().await.unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        })
    };
    // Installing while npx waits for the tarball.
    let listed = agentd.wait_for("/v1/sessions", |v| v["sessions"].as_array().is_some_and(|s| s.len() == 1)).await;
    let id = listed["sessions"][0]["id"].as_str().unwrap().to_string();
    let view = agentd.wait_for(&format!("/v1/sessions/{id}"), |v| v["agent"]["state"] == "installing").await;
    assert_eq!(view["state"], "creating", "{view}");
    agentd.wait_for("/v1/sessions", |_| server.requests().iter().any(|r| r.contains(TARBALL))).await;
    release.send(()).unwrap();

    let (status, view) = create.await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{view}\n{}", agentd.log());
    assert_eq!((view["state"].as_str(), view["agent"]["state"].as_str()), (Some("ready"), Some("ready")), "{view}");
    let container = view["container_id"].as_str().unwrap().to_string();

    let mut events = agentd.events(&id, None).await;
    let (status, answer) = agentd.prompt(&id, "hello from npx").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let got = events.until_run_end().await;
    assert_eq!(got.last().unwrap().event, "run.completed", "{got:?}");
    assert_eq!(got.last().unwrap().json()["stop_reason"], "end_turn");
    assert_eq!(said(&got), "hello from npx");

    // npx installed the package into npm's cache in the workspace (HOME).
    agentd.prompt(&id, "/where").await;
    let where_ = said(&events.until_run_end().await);
    assert!(where_.starts_with("dir=/workspace/.npm/_npx/") && where_.ends_with("/node_modules/echo-agent-js HOME=/workspace cache=/workspace/.npm"), "{where_}");
    let workspace = agentd.sandboxes_dir().join(&container).join("workspace");
    assert_eq!(npx_installs(&workspace.join(".npm")).len(), 1, "no install in {}", workspace.display());
    let host_installs_after = host_cache.as_deref().map(npx_installs).unwrap_or_default();
    assert_eq!(host_installs_after, host_installs_before, "npx installed into the host's cache");
    // From the local server alone: the tarball, no registry lookup.
    let requests = server.requests();
    assert!(requests.iter().all(|r| r.starts_with(&format!("GET /{TARBALL} "))), "{requests:?}");
    let served = requests.len();

    // A package npx cannot fetch: the create fails with npm's reason and
    // leaves no sandbox; the other session is unharmed.
    let mut missing = entry.clone();
    missing["id"] = json!("missing-js");
    missing["distribution"]["npx"]["package"] = json!(format!("{base}/missing-1.0.0.tgz"));
    let sandboxes = agentd.sandbox_dirs().len();
    let (status, problem) = agentd.post("/v1/sessions", &json!({"manual_agent": missing})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("agent_init_failed")), "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("agent exited (exit code 1); its stderr ended with: ") && detail.contains("404"), "{problem}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while agentd.sandbox_dirs().len() != sandboxes {
        assert!(std::time::Instant::now() < deadline, "a failed npx create left a sandbox: {:?}", agentd.sandbox_dirs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agentd.prompt(&id, "still here").await;
    assert_eq!(said(&events.until_run_end().await), "still here");

    assert!(server.requests()[served..].iter().all(|r| r.starts_with("GET /missing-1.0.0.tgz ")), "{:?}", server.requests());
    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    agentd.wait_for(&format!("/v1/containers/{container}"), |c| c["state"] == "deleted").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while workspace.exists() {
        assert!(std::time::Instant::now() < deadline, "the sandbox's workspace is left: {}", workspace.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
