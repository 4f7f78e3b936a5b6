//! Bearer tokens: every route but `/healthz` asks for one of a scope enough
//! for it; the first admin token is written to the state dir, mode 0600;
//! tokens are made, listed and revoked by the API and the CLI; no token
//! value reaches the log or the audit; `--no-auth` only on loopback.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, agentd_bin, session_body};

async fn call(req: reqwest::RequestBuilder) -> (StatusCode, Option<String>, Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status();
    let challenge = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).map(str::to_string);
    (status, challenge, resp.json().await.unwrap_or(Value::Null))
}

/// An API token of `scope`, made through the API with the admin token.
async fn token(agentd: &Agentd, scope: &str, ttl_seconds: Option<u64>) -> (String, String) {
    let mut body = json!({"scope": scope, "name": format!("{scope} for a test")});
    if let Some(ttl) = ttl_seconds {
        body["ttl_seconds"] = json!(ttl);
    }
    let (status, made) = agentd.post("/v1/tokens", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    (made["id"].as_str().unwrap().to_string(), made["token"].as_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_but_healthz_needs_a_token_of_its_scope() {
    // The echo agent is an executable on the node: writers may use it here.
    let echo_dir = crate::support::echo_agent().parent().unwrap().display().to_string();
    let agentd = Agentd::start_full(&["--allowed-host-paths", &echo_dir], &[]).await;
    let anon = reqwest::Client::new();

    let file = agentd.state_dir().join("admin.token");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "the admin token is the owner's alone");
    let admin = std::fs::read_to_string(&file).unwrap().trim().to_string();

    let (status, _, _) = call(anon.get(agentd.url("/healthz"))).await;
    assert_eq!(status, StatusCode::OK);

    let (status, challenge, body) = call(anon.get(agentd.url("/v1/sessions"))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")), "{body}");
    assert!(challenge.is_some_and(|c| c.starts_with("Bearer ")), "WWW-Authenticate: Bearer");
    let (status, _, body) = call(anon.get(agentd.url("/v1/sessions")).header("Authorization", format!("Basic {admin}"))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")), "{body}");
    for bad in ["agentd_0123456789abcdef_nope", "garbage", &format!("{}x", &admin[..admin.len() - 1])] {
        let (status, challenge, body) = call(anon.get(agentd.url("/v1/sessions")).bearer_auth(bad)).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("invalid_token")), "{bad}: {body}");
        assert!(challenge.is_some_and(|c| c.contains("invalid_token")));
    }

    // A read token reads, and may not write; a write token may not touch tokens or nodes.
    let (read_id, read) = token(&agentd, "read", None).await;
    let (_, write) = token(&agentd, "write", None).await;
    let (status, _, _) = call(anon.get(agentd.url("/v1/sessions")).bearer_auth(&read)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, challenge, body) = call(anon.post(agentd.url("/v1/sessions")).bearer_auth(&read).json(&session_body(&[]))).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_scope")), "{body}");
    assert!(challenge.is_some_and(|c| c.contains("scope=\"write\"")));
    let (status, _, session) = call(anon.post(agentd.url("/v1/sessions")).bearer_auth(&write).json(&session_body(&[]))).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    for (method, path) in [("GET", "/v1/tokens"), ("GET", "/v1/audit"), ("POST", "/v1/nodes/local:cordon")] {
        let req = anon.request(method.parse().unwrap(), agentd.url(path)).bearer_auth(&write);
        let (status, _, body) = call(req).await;
        assert_eq!((status, body["code"].as_str()), (StatusCode::FORBIDDEN, Some("insufficient_scope")), "{method} {path}: {body}");
    }

    // Expired and revoked tokens are refused, saying which.
    let (_, short) = token(&agentd, "read", Some(1)).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (status, _, body) = call(anon.get(agentd.url("/v1/sessions")).bearer_auth(&short)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["detail"].as_str().unwrap().contains("expired"), "{body}");
    let (status, _) = agentd.delete(&format!("/v1/tokens/{read_id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, body) = call(anon.get(agentd.url("/v1/sessions")).bearer_auth(&read)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["detail"].as_str().unwrap().contains("revoked"), "{body}");
    let (status, body) = agentd.delete("/v1/tokens/0000000000000000").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::NOT_FOUND, Some("token_not_found")));
    let (status, body) = agentd.post("/v1/tokens", &json!({"scope": "root"})).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")), "{body}");

    // The list shows ids and scopes, never secrets; the audit names token ids.
    let (_, list) = agentd.get("/v1/tokens").await;
    assert!(list["tokens"].as_array().unwrap().len() >= 4, "{list}");
    assert!(!list.to_string().contains(&write[20..]), "no secret in the list");
    let page = agentd.wait_for("/v1/audit", |b| b["records"].as_array().is_some_and(|r| r.iter().any(|r| r["path"] == "/v1/sessions"))).await;
    let create = page["records"].as_array().unwrap().iter().find(|r| r["path"] == "/v1/sessions" && r["status"] == 201).unwrap().clone();
    assert!(create["token_id"].as_str().is_some_and(|t| t.len() == 16), "{create}");
    let log = agentd.log();
    for secret in [&admin, &read, &write, &short] {
        assert!(!log.contains(secret.as_str()) && !page.to_string().contains(secret.as_str()), "a token leaked into the log or the audit");
    }
    let _ = agentd.delete(&format!("/v1/sessions/{}", session["id"].as_str().unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_command_line_and_no_auth_only_on_loopback() {
    let agentd = Agentd::start().await;
    let state = agentd.state_dir().display().to_string();
    let run = |args: &[&str]| std::process::Command::new(agentd_bin()).args(args).output().expect("run agentd");

    let made = run(&["token", "create", "--state-dir", &state, "--scope", "write", "--ttl", "1h", "--name", "cli"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let token = String::from_utf8_lossy(&made.stdout).lines().last().unwrap().to_string();
    let anon = reqwest::Client::new();
    let (status, _, _) = call(anon.get(agentd.url("/v1/sessions")).bearer_auth(&token)).await;
    assert_eq!(status, StatusCode::OK);
    let ls = run(&["token", "ls", "--state-dir", &state]);
    let listing = String::from_utf8_lossy(&ls.stdout).to_string();
    assert!(listing.contains("write") && listing.contains("cli") && !listing.contains(&token), "{listing}");
    let id = token.split('_').nth(1).unwrap();
    assert!(run(&["token", "revoke", "--state-dir", &state, id]).status.success());
    let (status, _, _) = call(anon.get(agentd.url("/v1/sessions")).bearer_auth(&token)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let bad = run(&["token", "create", "--state-dir", &state, "--scope", "root"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("unknown scope"));

    // Without tokens: refused on a non-loopback address, at once.
    let dir = tempfile::tempdir().unwrap();
    let refused = run(&["up", "--no-auth", "--listen", "0.0.0.0:0", "--state-dir", &dir.path().display().to_string()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--no-auth is only allowed on a loopback address"), "{}", String::from_utf8_lossy(&refused.stderr));

    let open = Agentd::start_full(&["--no-auth"], &[]).await;
    let (status, _, _) = call(anon.get(open.url("/v1/sessions"))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(open.log().contains("WITHOUT TOKENS"), "said loudly");
}
