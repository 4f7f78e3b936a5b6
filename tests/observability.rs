//! What operators watch, against a real `agentd up`: `/metrics` after a
//! session and a prompt (specific series, non-zero), on the API with a
//! token and on `--metrics-listen` without; `/readyz`; `X-Request-Id`
//! echoed, in the problem's `instance` and in the log; a caller's
//! `traceparent` followed into the node's log; an event stream's `retry:`
//! hint and keep-alive comments at `--sse-keepalive-ms`.

use std::time::{Duration, Instant};

use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{Agentd, said, session_body, turn};

/// The value of the series `series` (name and labels exactly as written),
/// if the scrape has it.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// The sum of every series whose line starts with `prefix`.
fn sum(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

async fn scrape(client: &reqwest::Client, url: &str) -> (StatusCode, String) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status();
    if status == StatusCode::OK {
        assert_eq!(response.headers()["content-type"], "application/openmetrics-text; version=1.0.0; charset=utf-8");
    }
    (status, response.text().await.unwrap())
}

/// The address `--metrics-listen 127.0.0.1:0` bound, from the log.
async fn metrics_address(agentd: &Agentd) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = agentd.log();
        if let Some(addr) = log.lines().filter(|l| l.contains("metrics listening")).find_map(|l| l.split("metrics_listen=").nth(1)) {
            return addr.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no metrics address in the log:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readiness_request_ids_traces_and_keepalives() {
    let agentd = Agentd::start_full(&["--sse-keepalive-ms", "200", "--metrics-listen", "127.0.0.1:0"], &[]).await;
    let anonymous = reqwest::Client::new();

    // Ready: the store answers and the local node is registered alive.
    let ready = agentd.wait_for("/readyz", |b| b == "ok").await;
    assert_eq!(ready, "ok");
    let response = anonymous.get(agentd.url("/readyz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "/readyz needs no token");

    // A session and a prompt, the prompt in a trace of the caller's.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let (id, mut events) = agentd.create_streaming(&session_body(&[])).await;
    let prompt = agentd
        .http
        .post(agentd.url(&format!("/v1/sessions/{id}:prompt")))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({"prompt": "hello metrics"}));
    let response = prompt.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert!(response.headers().contains_key("x-request-id"), "every answer has a request id");
    let got = events.until_run_end().await;
    assert_eq!(said(&got), "hello metrics");
    assert_eq!(said(&turn(&agentd, &id, &mut events, "again").await), "again");

    // The node logged the turn under the caller's trace id.
    let log = agentd.log();
    assert!(
        log.lines().any(|l| l.contains(trace_id) && l.contains("turn started") && l.contains("agentd_node")),
        "the node's log follows the trace {trace_id}:\n{log}"
    );

    // /metrics on the API wants a token of scope read.
    let (status, body) = scrape(&anonymous, &agentd.url("/metrics")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // The run ends are recorded from the node's journal: wait for both.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let (status, text) = scrape(&agentd.http, &agentd.url("/metrics")).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        if value(&text, r#"agentd_runs_ended_total{outcome="completed"}"#) == Some(2.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "two completed runs never counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expect = |series: &str, want: f64| assert_eq!(value(&text, series), Some(want), "{series}:\n{text}");
    expect(r#"agentd_sessions{state="ready"}"#, 1.0);
    expect(r#"agentd_containers{state="ready"}"#, 1.0);
    expect("agentd_runs_started_total", 2.0);
    expect("agentd_run_duration_seconds_count", 2.0);
    expect("agentd_sandbox_create_duration_seconds_count", 1.0);
    expect("agentd_prompt_first_event_seconds_count", 2.0);
    expect("agentd_sse_subscribers", 1.0);
    expect("agentd_store_up", 1.0);
    assert!(value(&text, "agentd_sandbox_create_duration_seconds_sum").unwrap() > 0.0, "{text}");
    assert!(value(&text, "agentd_prompt_first_event_seconds_sum").unwrap() > 0.0, "{text}");
    assert!(value(&text, r#"agentd_node_heartbeat_age_seconds{node="node-1"}"#).is_some(), "{text}");
    assert!(value(&text, r#"agentd_outbox_steps{state="pending"}"#).is_some(), "{text}");
    assert!(value(&text, "agentd_outbox_oldest_pending_age_seconds").is_some(), "{text}");
    expect(r#"agentd_http_requests_total{method="POST",route="/v1/sessions",status="201"}"#, 1.0);
    expect(r#"agentd_http_requests_total{method="POST",route="/v1/sessions/{id}:prompt",status="202"}"#, 2.0);
    expect(r#"agentd_http_request_duration_seconds_count{method="POST",route="/v1/sessions/{id}:prompt"}"#, 2.0);
    assert!(sum(&text, r#"agentd_http_requests_total{method="GET",route="/metrics",status="401"}"#) >= 1.0, "{text}");
    assert!(!text.contains(&id), "a raw path never becomes a label: {text}");

    // The metrics address serves the same without a token.
    let open = format!("http://{}", metrics_address(&agentd).await);
    let (status, text) = scrape(&anonymous, &format!("{open}/metrics")).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(value(&text, "agentd_runs_started_total") == Some(2.0), "{text}");
    assert_eq!(anonymous.get(format!("{open}/readyz")).send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(anonymous.get(format!("{open}/v1/sessions")).send().await.unwrap().status(), StatusCode::NOT_FOUND, "only metrics and probes there");

    // A request id is taken, echoed, named in the problem and logged.
    let response = agentd.http.get(agentd.url("/v1/sessions/ses_none")).header("x-request-id", "e2e-req-42").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.headers()["x-request-id"], "e2e-req-42");
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["instance"], "urn:agentd:request:e2e-req-42", "{problem}");
    // Or made, when there is none: a refusal before any handler has one too.
    let response = anonymous.get(agentd.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let made = response.headers()["x-request-id"].to_str().unwrap().to_string();
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["instance"], format!("urn:agentd:request:{made}"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agentd.log().lines().any(|l| l.contains("request_id=e2e-req-42")) {
        assert!(Instant::now() < deadline, "the request's log lines name its id:\n{}", agentd.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An event stream: the retry hint first, then keep-alive comments at
    // the configured interval while nothing happens.
    let response = agentd.http.get(agentd.url(&format!("/v1/sessions/{id}/events"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();
    let mut raw = String::new();
    let started = Instant::now();
    while raw.matches("\n:").count() + usize::from(raw.starts_with(':')) < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("keep-alives come").expect("the stream stays open");
        raw.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(raw.starts_with("retry: 1000\n"), "{raw:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "three keep-alives at 200 ms took {:?}", started.elapsed());
    drop(stream);
    drop(events);

    // The subscriber gauge follows streams as they close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, text) = scrape(&anonymous, &format!("{open}/metrics")).await;
        if value(&text, "agentd_sse_subscribers") == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "closed streams still counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert!(status.is_success(), "{status}");
}
