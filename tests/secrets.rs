//! Keys that never enter the sandbox, end to end: `agentd up` holds a
//! secret in its `--secrets-file`; a container profile names it by
//! reference. The fake upstream is an HTTPS server on the host's loopback
//! with a certificate from a CA the test makes (given to the node with
//! `--secrets-ca-file`). The echo agent runs curl in the sandbox against
//! the URL the node gave it; the upstream must see the real key in the
//! named header, and the sandbox's processes, files, the event stream, the
//! API's answers and the node's log must hold no trace of it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Agentd, said, session_body, turn};

/// One request as the fake upstream read it: its request line and headers.
#[derive(Debug, Clone)]
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
}

/// An HTTPS server on 127.0.0.1 that records each request's head and
/// answers `upstream-ok`.
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A CA (its PEM) and a server configuration for `localhost` it signed.
fn test_pki() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "agentd secrets test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    (ca_cert.pem(), config)
}

fn start_upstream(config: rustls::ServerConfig) -> Upstream {
    serve_upstream(TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap(), config)
}

fn serve_upstream(listener: TcpListener, config: rustls::ServerConfig) -> Upstream {
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen, stop) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
    let config = Arc::new(config);
    let thread = {
        let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((tcp, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                tcp.set_nonblocking(false).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let conn = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match tls.read(&mut buf) {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => break,
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let mut lines = text.split("\r\n");
                let line = lines.next().unwrap_or_default().to_string();
                let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
                seen.lock().unwrap().push(Seen { line, headers });
                let body = "upstream-ok";
                let _ = write!(tls, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        })
    };
    Upstream { port, seen, stop, thread: Some(thread) }
}

/// Files under `root` (not following symlinks, not crossing into /proc,
/// /sys or /dev) whose bytes contain `needle`.
fn files_containing(root: &Path, needle: &[u8], found: &mut Vec<String>, budget: &mut usize) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() {
            files_containing(&path, needle, found, budget);
        } else if meta.is_file()
            && meta.len() <= 16 << 20
            && std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
        {
            found.push(path.display().to_string());
        }
    }
}

/// The pids of the processes in the pid namespace of `pid1` (as the host
/// numbers them).
fn processes_of(pid1: i32) -> Vec<i32> {
    let ns = std::fs::metadata(format!("/proc/{pid1}/ns/pid")).unwrap().ino();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::metadata(format!("/proc/{pid}/ns/pid")).is_ok_and(|m| m.ino() == ns))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_its_upstream_and_nothing_in_the_sandbox() {
    let (ca_pem, server) = test_pki();
    let upstream = start_upstream(server);
    // Different each run, long enough that a match is no accident.
    let secret = format!("sk-test-{}-{:x}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let files = tempfile::tempdir().unwrap();
    let secrets_file = files.path().join("secrets");
    std::fs::write(&secrets_file, format!("# the test's key\nTEST_API_KEY={secret}\n")).unwrap();
    std::fs::set_permissions(&secrets_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();

    let args = ["--secrets-file", secrets_file.to_str().unwrap(), "--secrets-ca-file", ca_file.to_str().unwrap()];
    let agentd = Agentd::start_full(&args, &[]).await;

    let reference = |name: &str| json!({"name": name, "upstream": format!("https://localhost:{}/v1", upstream.port), "header": "x-api-key", "env": "TEST_BASE_URL"});
    // A malformed reference is refused at the API, naming its field.
    let mut body = session_body(&[]);
    body["container_profile"] = json!({"secrets": [{"name": "TEST_API_KEY", "upstream": "http://localhost/", "header": "x-api-key", "env": "TEST_BASE_URL"}]});
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_secret")), "{problem}");
    // A secret the node does not hold: refused by the node, by name.
    body["container_profile"] = json!({"secrets": [reference("NOT_HELD")]});
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_secret")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("NOT_HELD"), "{problem}");

    body["container_profile"] = json!({"secrets": [reference("TEST_API_KEY")]});
    let (session, mut events) = agentd.create_streaming(&body).await;
    let (_, view) = agentd.get(&format!("/v1/sessions/{session}")).await;
    let container = view["container_id"].as_str().unwrap().to_string();
    let mut seen_events = Vec::new();

    // The agent sees the proxy's URL and a placeholder, and works through them.
    let got = turn(&agentd, &session, &mut events, "/run sh -c 'echo \"base=$TEST_BASE_URL key=$TEST_API_KEY\"'").await;
    let text = said(&got);
    assert!(text.contains("base=http://127.0.0.1:"), "{text}");
    assert!(text.contains("/v1 key=") && !text.contains("key= "), "{text}");
    seen_events.extend(got);
    let got = turn(
        &agentd,
        &session,
        &mut events,
        "/run sh -c 'curl -sS -m 10 -H \"x-api-key: $TEST_API_KEY\" -H \"content-type: application/json\" -d \"{}\" \"$TEST_BASE_URL/messages\"'",
    )
    .await;
    assert!(said(&got).contains("upstream-ok\n[exit code 0]"), "{got:?}\n{}", agentd.log());
    seen_events.extend(got);
    // Outside the base path: refused by the proxy, never sent on.
    let got = turn(&agentd, &session, &mut events, "/run sh -c 'curl -sS -m 10 -o /dev/null -w \"%{http_code}\" \"${TEST_BASE_URL%/v1}/admin\"'").await;
    assert!(said(&got).contains("403"), "{got:?}");
    seen_events.extend(got);

    let requests = upstream.seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].line, "POST /v1/messages HTTP/1.1", "{requests:?}");
    let keys: Vec<&str> = requests[0].headers.iter().filter(|(k, _)| k == "x-api-key").map(|(_, v)| v.as_str()).collect();
    assert_eq!(keys, [secret.as_str()], "the upstream gets the real key, once");
    assert!(requests[0].headers.iter().any(|(k, v)| k == "host" && *v == format!("localhost:{}", upstream.port)), "{requests:?}");

    // No trace of the key: the sandbox's processes' environments and command
    // lines (the agent is still running), its files as it sees them and as
    // the host keeps them, the events, the API's answers, the node's log.
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(agentd.sandboxes_dir().join(&container).join("sandbox.json")).unwrap()).unwrap();
    let pid1 = record["pid"].as_i64().unwrap() as i32;
    let needle = secret.as_bytes();
    let pids = processes_of(pid1);
    assert!(pids.len() >= 2, "PID 1 and the agent at least: {pids:?}");
    for pid in &pids {
        for what in ["environ", "cmdline"] {
            let bytes = std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "/proc/{pid}/{what} holds the key");
        }
    }
    let agent_env = pids.iter().map(|p| String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default()).into_owned()).collect::<Vec<_>>().join("\n");
    assert!(agent_env.contains("TEST_API_KEY="), "the agent has the placeholder variable");
    // The sandbox's own view of its files (its root; /proc, /sys and /dev
    // are not files), and what the node keeps of it on the host. The host's
    // system directories, bound read-only, are left out: the node writes
    // nothing there, and reading all of /usr takes minutes.
    let root = std::path::PathBuf::from(format!("/proc/{pid1}/root"));
    let search_sandbox = |needle: &[u8], found: &mut Vec<String>, budget: &mut usize| {
        for top in std::fs::read_dir(&root).unwrap().flatten() {
            let name = top.file_name();
            if ["proc", "sys", "dev", "usr", "bin", "sbin", "lib", "lib64"].iter().any(|skip| name == *skip) {
                continue;
            }
            let path = top.path();
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                files_containing(&path, needle, found, budget);
            }
        }
    };
    let mut found = Vec::new();
    let mut budget = 200_000;
    search_sandbox(needle, &mut found, &mut budget);
    // The whole state directory: the sandbox's, the sessions' event logs,
    // the store.
    files_containing(agentd.state_dir(), needle, &mut found, &mut budget);
    assert!(found.is_empty(), "files hold the key: {found:?}");
    assert!(budget > 0, "the file search was cut short");
    assert!(200_000 - budget > 100, "the file search saw the sandbox's files ({} entries)", 200_000 - budget);
    // The search works: it finds what a command in the sandbox writes.
    let got = turn(&agentd, &session, &mut events, "/run sh -c 'echo control-$((6*7))-marker > /workspace/control'").await;
    seen_events.extend(got);
    let mut control = Vec::new();
    search_sandbox(b"control-42-marker", &mut control, &mut 200_000);
    assert!(control.iter().any(|p| p.ends_with("/workspace/control")), "{control:?}");
    let stream = seen_events.iter().map(|e| e.data.clone()).collect::<Vec<_>>().join("\n");
    assert!(!stream.contains(&secret), "the event stream holds the key");
    let mut replay = agentd.events(&session, Some(0)).await;
    let replayed = replay.until_run_end().await;
    assert!(!replayed.is_empty());
    assert!(!replayed.iter().any(|e| e.data.contains(&secret)), "the replayed event log holds the key");
    for path in [format!("/v1/sessions/{session}"), format!("/v1/containers/{container}")] {
        let (_, answer) = agentd.get(&path).await;
        assert!(!answer.to_string().contains(&secret), "{path} shows the key");
    }
    assert!(!agentd.log().contains(&secret), "the node's log holds the key");

    // The delete takes the proxy's listener with the sandbox.
    let (status, _) = agentd.delete(&format!("/v1/containers/{container}")).await;
    assert!(status.is_success(), "{status}");
    assert!(!agentd.sandboxes_dir().join(&container).exists());
}

/// With live restore, a sandbox's secrets are served again after agentd is
/// killed and restarted, on the ports its agent was told (the agent is the
/// same process; its environment cannot change).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_serves_a_taken_back_sandbox_its_secrets_on_the_same_port() {
    use crate::support::host::{become_subreaper, cgroup_dirs, reap_orphans, unique_id_base};
    become_subreaper();
    let (ca_pem, server) = test_pki();
    let upstream = start_upstream(server);
    let secret = format!("sk-restore-{}-{:x}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let files = tempfile::tempdir().unwrap();
    let secrets_file = files.path().join("secrets");
    std::fs::write(&secrets_file, format!("TEST_API_KEY={secret}\n")).unwrap();
    std::fs::set_permissions(&secrets_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let id_base = unique_id_base().to_string();
    let flags = [
        "--live-restore",
        "--id-base",
        &id_base,
        "--max-sandboxes",
        "4",
        "--secrets-file",
        secrets_file.to_str().unwrap(),
        "--secrets-ca-file",
        ca_file.to_str().unwrap(),
    ];
    let mut agentd = Agentd::start_full(&flags, &[]).await;
    let mut body = session_body(&[]);
    body["container_profile"] = json!({"secrets": [{"name": "TEST_API_KEY", "upstream": format!("https://localhost:{}", upstream.port), "header": "authorization", "scheme": "Bearer", "env": "TEST_BASE_URL"}]});
    let (session, mut events) = agentd.create_streaming(&body).await;
    let (_, view) = agentd.get(&format!("/v1/sessions/{session}")).await;
    let container = view["container_id"].as_str().unwrap().to_string();
    let fetch = "/run sh -c 'curl -sS -m 10 \"$TEST_BASE_URL/v1/models\"'";
    let got = turn(&agentd, &session, &mut events, fetch).await;
    assert!(said(&got).contains("upstream-ok\n[exit code 0]"), "{got:?}\n{}", agentd.log());

    let last = got.last().unwrap().id;
    agentd.kill9();
    drop(events);
    agentd.restart(&flags, &[]).await;
    assert!(agentd.log().contains("sandbox taken back after the node restarted"), "{}", agentd.log());
    let mut events = agentd.events(&session, last).await;
    let got = turn(&agentd, &session, &mut events, fetch).await;
    assert!(said(&got).contains("upstream-ok\n[exit code 0]"), "{got:?}\n{}", agentd.log());

    let requests = upstream.seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    for r in &requests {
        let auth: Vec<&str> = r.headers.iter().filter(|(k, _)| k == "authorization").map(|(_, v)| v.as_str()).collect();
        assert_eq!(auth, [format!("Bearer {secret}").as_str()], "{:?}", r.line);
    }
    assert!(!agentd.log().contains(&secret) && !agentd.earlier_log().contains(&secret), "a log holds the key");

    let (status, _) = agentd.delete(&format!("/v1/containers/{container}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let exit = agentd.interrupt();
    assert!(exit.success(), "{exit}");
    reap_orphans();
    assert!(cgroup_dirs(&agentd.subtree).is_empty(), "{:?}", cgroup_dirs(&agentd.subtree));
    assert!(agentd.sandbox_dirs().is_empty());
}

/// A sandbox with an egress policy that does not allow the upstream still
/// reaches it through its secret's endpoint: the proxy listens on the
/// sandbox's loopback, which the policy does not filter, and dials from the
/// node's namespace. `agentd up` and the upstream run in a test network
/// namespace ("node"), the upstream on its loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_sandbox_reaches_its_secrets_upstream_without_a_rule_for_it() {
    use std::net::SocketAddr;

    use agentd_testkit::netns::Fabric;

    let fabric = Fabric::new().unwrap();
    let node = fabric.host("node").unwrap();
    let (ca_pem, server) = test_pki();
    let upstream = serve_upstream(node.listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap(), server);
    let secret = format!("sk-egress-{}-{:x}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    let files = tempfile::tempdir().unwrap();
    let secrets_file = files.path().join("secrets");
    std::fs::write(&secrets_file, format!("TEST_API_KEY={secret}\n")).unwrap();
    std::fs::set_permissions(&secrets_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca_file = files.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let locks = tempfile::tempdir().unwrap();
    let state = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut cmd = node.command(crate::support::agentd_bin());
    cmd.args(["up", "--listen", "127.0.0.1:0", "--state-dir"]).arg(state.path());
    cmd.arg("--secrets-file").arg(&secrets_file).arg("--secrets-ca-file").arg(&ca_file);
    // No resolver answers there: nothing in this test resolves a name.
    let dns = format!("{}:53", node.addr());
    let lock_dir = locks.path().display().to_string();
    let env = [("AGENTD_EGRESS_DNS", dns.as_str()), ("AGENTD_EGRESS_LOCK_DIR", lock_dir.as_str())];
    let state_path = state.path().to_owned();
    let mut agentd = Agentd::start_command(cmd, state_path, Some(state), &env).await;
    let forward = agentd.reach_in(&node).await;

    let mut body = session_body(&[]);
    body["container_profile"] = json!({
        "network": {"egress": {"allow": ["elsewhere.test:443"]}},
        "secrets": [{"name": "TEST_API_KEY", "upstream": format!("https://localhost:{}", upstream.port), "header": "x-api-key", "env": "TEST_BASE_URL"}]
    });
    let (session, mut events) = agentd.create_streaming(&body).await;
    let (_, view) = agentd.get(&format!("/v1/sessions/{session}")).await;
    let container = view["container_id"].as_str().unwrap().to_string();
    let got = turn(&agentd, &session, &mut events, "/run sh -c 'curl -sS -m 10 \"$TEST_BASE_URL/v1/messages\"'").await;
    assert!(said(&got).contains("upstream-ok\n[exit code 0]"), "{got:?}\n{}", agentd.log());
    let requests = upstream.seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(requests[0].headers.iter().any(|(k, v)| k == "x-api-key" && *v == secret), "{requests:?}");
    // The upstream itself is not reachable from the sandbox directly.
    let direct = format!("/run sh -c 'curl -sS -m 5 -k https://localhost:{}/ >/dev/null 2>&1; echo direct=$?'", upstream.port);
    let got = turn(&agentd, &session, &mut events, &direct).await;
    assert!(!said(&got).contains("direct=0"), "{got:?}");
    assert_eq!(upstream.seen.lock().unwrap().len(), 1);

    let (status, _) = agentd.delete(&format!("/v1/containers/{container}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let exit = agentd.interrupt();
    assert!(exit.success(), "{exit}");
    drop(forward);
}
