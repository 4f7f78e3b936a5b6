//! The OpenAPI description against the live server: schemathesis (PyPI)
//! fuzzes every operation of `/openapi.json` on a real `agentd up` over
//! loopback with a `write` token, and the run fails on any 5xx answer or an
//! answer (status, content type, body) the description does not allow.
//! Admin routes answer 403 to that token, which keeps the fuzzer off the
//! node table and off registry sources. Bounded: few examples per
//! operation, a time budget, a per-request timeout. Query and path
//! rejections are checked to be problems first.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::support::Agentd;

/// schemathesis: `AGENTD_SCHEMATHESIS`, else the venv
/// scripts/install-test-deps makes, else `PATH`.
fn schemathesis() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("AGENTD_SCHEMATHESIS") {
        return Some(PathBuf::from(path));
    }
    let venv = PathBuf::from("/opt/agentd-test/venv/bin/schemathesis");
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| PathBuf::from(d).join("schemathesis")).find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_and_no_answer_outside_the_description() {
    let Some(st) = schemathesis() else {
        eprintln!("\n!!!!!!!! SKIPPED: schemathesis is not installed (scripts/install-test-deps installs it into /opt/agentd-test/venv) !!!!!!!!\n");
        return;
    };
    let agentd = Agentd::start().await;
    let (status, _, doc) = agentd.send(reqwest::Client::new().get(agentd.url("/openapi.json"))).await;
    assert_eq!(status, StatusCode::OK, "the description needs no token: {doc}");
    assert_eq!(doc["openapi"], "3.1.0");

    let (status, made) = agentd.post("/v1/tokens", &json!({"scope": "write", "name": "schemathesis"})).await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let token = made["token"].as_str().unwrap().to_string();

    // What axum would refuse in plain text is a problem with a code too.
    for path in ["/v1/sessions?limit=many", "/v1/audit?after=x", "/v1/sessions/%FF%FE"] {
        let (status, content_type, body) = agentd.send(agentd.http.get(agentd.url(path))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{path}: {body}");
        assert_eq!(body["code"], "invalid_request", "{path}: {body}");
    }

    // Hypothesis keeps its database in the working directory: a temp one.
    let scratch = tempfile::Builder::new().prefix("agentd-schemathesis-").tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(&st);
    cmd.arg("run")
        .arg(agentd.url("/openapi.json"))
        // Every check but these: a schema-valid body may still be refused
        // (422 with a code) for what a schema does not say (a label key's
        // grammar, a profile's or a prompt's content); `{id}:verb` actions
        // share their resource's route, so a 405's `Allow` names the
        // resource's methods; a deleted container or closed session stays
        // readable (state `deleted` / `closed`) by design.
        .args(["--checks", "all"])
        .args(["--exclude-checks", "positive_data_acceptance,unsupported_method,allow_header_conformance,use_after_free"])
        .args(["--max-examples", "5", "--max-time", "60", "--request-timeout", "10", "--workers", "1", "--seed", "1"])
        .args(["--generation-allow-x00", "false"])
        .arg("--header")
        .arg(format!("Authorization: Bearer {token}"))
        .current_dir(scratch.path())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(85), cmd.output()).await.expect("schemathesis ran past 85 s").expect("schemathesis starts");
    let out = format!("{}\n{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(!out.contains(&token), "schemathesis printed the token");
    eprintln!("{out}");

    // Whatever the fuzzer made goes away with the containers it left.
    let (_, listed) = agentd.get("/v1/containers?limit=100").await;
    for c in listed["containers"].as_array().into_iter().flatten() {
        let id = c["id"].as_str().unwrap();
        let (status, body) = agentd.delete(&format!("/v1/containers/{id}")).await;
        assert!(status.is_success() || status == StatusCode::CONFLICT, "delete {id}: {status} {body}");
    }
    assert!(run.status.success(), "schemathesis found problems:\n{out}");
    assert!(!agentd.log().contains("panicked"), "the server panicked:\n{}", agentd.log());
}

