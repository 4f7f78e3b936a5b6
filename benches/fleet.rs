//! Fleet benchmark: prints figures, asserts nothing (but the fleet harness's
//! own check, at the end, that nothing is left behind).
//!
//! `./scripts/build-release && cargo bench --bench fleet` (as root: network
//! namespaces, cgroups; PostgreSQL's `initdb` as the e2e fleet tests need)
//!
//! On the e2e tests' fleet harness (tests/support/fleet.rs, compiled into
//! this bench as a module): three `agentd node`s and two `agentd server`s,
//! each in a network namespace of its own on one private network and one
//! throwaway PostgreSQL; nodes join with tokens and are called over mutual
//! TLS; the bench reaches the APIs through relays from the root namespace.
//!
//! - placements: the three nodes' slots (SLOTS each) filled by CLIENTS
//!   concurrent clients, alternately through either server, FILLS times
//!   (deleted after each), then once by one client per slot (a burst):
//!   create -> 201 latency and creates/s (a create builds the sandbox,
//!   starts the echo agent and opens its session); send -> container row
//!   written (its `created_at`, ms: the placement's transaction, which
//!   locks the chosen node's row) and rows/s; then, the fleet full,
//!   REFUSALS creates refused `no_capacity` (no row, no sandbox: the
//!   placement query alone, in the transaction `preview_placement` rolls
//!   back); deletes/s.
//! - node death: ROUNDS times, a node holding LOST_SESSIONS sessions is
//!   SIGKILLed: kill -> node `lost`, kill -> every one of its sessions failed
//!   `node_lost` (polled every 10 ms), with the servers' check interval and
//!   heartbeat timeout, which bound it; the node is restarted between rounds.
//! - remote against local: a third server beside a node on a unix socket
//!   (`agentd server --node-socket`, the node in a namespace of its own);
//!   creates pinned alternately to that node and to a joined one (mutual
//!   TLS over the private network), through that same server, each deleted
//!   before the next: create -> 201 medians and their ratio.
//!
//! Environment: BENCH_SLOTS (8 per node), BENCH_CLIENTS (8), BENCH_FILLS (3),
//! BENCH_REFUSALS (200), BENCH_ROUNDS (5), BENCH_LOST_SESSIONS (2),
//! BENCH_CHECK_INTERVAL_MS (250), BENCH_HEARTBEAT_TIMEOUT_MS (2000),
//! BENCH_CREATES (30 per side), BENCH_FLEET_LOG=FILE (every process's log,
//! written at the end).

mod common;
// The e2e tests' harness, whole; the bench uses a part of it.
#[allow(dead_code)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::env_usize;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::fleet::{Api, Fleet, NodeSpec};
use support::session_body;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Prints p50, p99 and max of `samples`; returns the p50.
fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    if samples.is_empty() {
        println!("{name:<44} n=0");
        return Duration::ZERO;
    }
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    println!(
        "{name:<44} n={:<4} p50={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        samples.len(),
        ms(p50),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap())
    );
    p50
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string()
}

/// A session body for the echo agent in a new container shaped by `profile`.
fn body(profile: Value) -> Value {
    let mut body = session_body(&[]);
    body["container_profile"] = profile;
    body
}

/// One answered request: when it was sent (wall clock, ms), how long it
/// took, its status and body.
struct Answer {
    sent_ms: i64,
    took: Duration,
    status: StatusCode,
    body: Value,
}

/// Sends `count` requests made by `request(i)` from `clients` concurrent
/// clients, client c through `apis[c % apis.len()]`; each client sends its
/// next one when the last is answered. The answers and the wall time.
async fn drive<F, Fut>(apis: &[Api], clients: usize, count: usize, request: F) -> (Vec<Answer>, Duration)
where
    F: Fn(Api, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = (StatusCode, Value)> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let request = Arc::new(request);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|c| {
            let (api, next, request) = (apis[c % apis.len()].clone(), Arc::clone(&next), Arc::clone(&request));
            tokio::spawn(async move {
                let mut answers = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return answers;
                    }
                    let sent_ms = now_ms();
                    let t0 = Instant::now();
                    let (status, body) = request(api.clone(), i).await;
                    answers.push(Answer { sent_ms, took: t0.elapsed(), status, body });
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.extend(task.await.expect("a client task"));
    }
    (answers, start.elapsed())
}

/// Prints answers other than `want` (status and code), at most three.
fn unexpected(what: &str, answers: &[Answer], want: StatusCode) -> usize {
    let odd: Vec<&Answer> = answers.iter().filter(|a| a.status != want).collect();
    for a in odd.iter().take(3) {
        println!("  {what}: unexpected {} {}", a.status, a.body);
    }
    odd.len()
}

/// Waits until no node holds a sandbox (directory or cgroup).
async fn wait_nodes_empty(fleet: &Fleet) {
    for node in &fleet.nodes {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.sandbox_dirs().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        support::host::wait_no_sandbox_cgroups(&node.subtree).await;
    }
}

/// Fills the three nodes' slots FILLS times with CLIENTS clients, then once
/// more with one client per slot (a burst); on each full fleet, refused
/// creates; then deletes.
async fn placements(fleet: &Fleet, slots: usize, clients: usize, fills: usize, refusals: usize) {
    let total = slots * NODES.len();
    let apis = [fleet.api(0).clone(), fleet.api(1).clone()];
    println!("\n== placements: {} nodes x {slots} slots, {clients} clients over 2 control planes, {fills} fills of {total}, then a burst of {total}", NODES.len());
    let (mut create_lat, mut row_lat, mut refused_lat, mut delete_lat) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut create_rates, mut row_rates, mut refused_rates, mut delete_rates) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut burst_lat, mut burst_row_lat) = (Vec::new(), Vec::new());
    for fill in 0..=fills {
        let burst = fill == fills;
        let senders = if burst { total } else { clients };
        let (answers, wall) = drive(&apis, senders, total, |api, _| async move { api.post("/v1/sessions", &body(json!({}))).await }).await;
        let failed = unexpected("create", &answers, StatusCode::CREATED);
        let created: Vec<&Answer> = answers.iter().filter(|a| a.status == StatusCode::CREATED).collect();
        let rate = created.len() as f64 / wall.as_secs_f64();
        let mut per_node = std::collections::BTreeMap::<String, usize>::new();
        let (mut first_sent, mut last_row) = (i64::MAX, i64::MIN);
        for a in &created {
            let (_, c) = fleet.api(0).get(&format!("/v1/containers/{}", a.body["container_id"].as_str().unwrap_or_default())).await;
            *per_node.entry(c["node_id"].as_str().unwrap_or("?").to_string()).or_default() += 1;
            let row = c["created_at"].as_i64().map(|at| Duration::from_millis((at - a.sent_ms).max(0) as u64));
            first_sent = first_sent.min(a.sent_ms);
            last_row = last_row.max(c["created_at"].as_i64().unwrap_or(i64::MIN));
            if burst {
                burst_lat.push(a.took);
                burst_row_lat.extend(row);
            } else {
                create_lat.push(a.took);
                row_lat.extend(row);
            }
        }
        // Rows written per second, from the first create sent to the last row.
        let rows_rate = created.len() as f64 / ((last_row - first_sent).max(1) as f64 / 1e3);
        let what = if burst { "burst".to_string() } else { format!("fill {fill}") };
        print!("{what}: {} created in {:.2} s ({rate:.1}/s; rows {rows_rate:.1}/s), {failed} not; per node {per_node:?}", created.len(), wall.as_secs_f64());
        if burst {
            println!();
            println!("{:<44} {rate:.1}/s to 201, {rows_rate:.1}/s to the row", "burst");
        } else {
            create_rates.push(rate);
            row_rates.push(rows_rate);
        }

        // Full: every create is refused before any row is written.
        if !burst {
            let (answers, wall) = drive(&apis, clients, refusals, |api, _| async move { api.post("/v1/sessions", &body(json!({}))).await }).await;
            let odd = answers.iter().filter(|a| a.status != StatusCode::SERVICE_UNAVAILABLE || a.body["code"] != "no_capacity").count();
            refused_lat.extend(answers.iter().filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE).map(|a| a.took));
            refused_rates.push(answers.len() as f64 / wall.as_secs_f64());
            print!("; {} refused in {:.2} s ({:.0}/s), {odd} otherwise", answers.len() - odd, wall.as_secs_f64(), refused_rates[fill]);
            unexpected("refusal", &answers, StatusCode::SERVICE_UNAVAILABLE);
        }

        let ids: Arc<Vec<String>> = Arc::new(created.iter().filter_map(|a| a.body["id"].as_str().map(str::to_string)).collect());
        let (answers, wall) = {
            let ids = Arc::clone(&ids);
            drive(&apis, clients, ids.len(), move |api, i| {
                let id = ids[i].clone();
                async move { api.delete(&format!("/v1/sessions/{id}")).await }
            })
            .await
        };
        unexpected("delete", &answers, StatusCode::NO_CONTENT);
        delete_lat.extend(answers.iter().map(|a| a.took));
        delete_rates.push(answers.len() as f64 / wall.as_secs_f64());
        if !burst {
            println!("; {} deleted in {:.2} s", answers.len(), wall.as_secs_f64());
        }
        wait_nodes_empty(fleet).await;
    }
    let rates = |r: &[f64]| r.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ");
    report("create -> 201 (sandbox, agent, session)", create_lat);
    println!("{:<44} {} per fill", "creates/s", rates(&create_rates));
    report("send -> container row written (created_at)", row_lat);
    println!("{:<44} {} per fill", "rows/s (first send -> last row)", rates(&row_rates));
    report("burst: create -> 201", burst_lat);
    report("burst: send -> container row written", burst_row_lat);
    report("refused no_capacity (placement query only)", refused_lat);
    println!("{:<44} {} per fill", "refusals/s", rates(&refused_rates));
    report("delete -> 204", delete_lat);
    println!("{:<44} {} per fill (the burst's last)", "deletes/s", rates(&delete_rates));
}

/// ROUNDS times: sessions on a node, the node SIGKILLed, the time until the
/// control plane calls it lost and fails its sessions `node_lost`.
async fn node_death(fleet: &mut Fleet, rounds: usize, sessions: usize, interval_ms: u64, timeout_ms: u64) {
    println!("\n== node death: {rounds} rounds, {sessions} sessions on the node, check interval {interval_ms} ms, heartbeat timeout {timeout_ms} ms");
    let api = fleet.api(0).clone();
    let (mut to_lost, mut to_failed) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let victim = NODES[round % NODES.len()];
        let mut ids = Vec::new();
        for _ in 0..sessions {
            let (status, view) = api.post("/v1/sessions", &body(json!({"node_id": victim}))).await;
            if status != StatusCode::CREATED {
                println!("  round {round}: create on {victim}: {status} {view}");
                continue;
            }
            ids.push(view["id"].as_str().unwrap().to_string());
        }
        let killed = Instant::now();
        fleet.node(victim).kill9();
        let (mut lost, mut failed) = (None, None);
        let deadline = killed + Duration::from_millis(timeout_ms + interval_ms) + Duration::from_secs(30);
        while (lost.is_none() || failed.is_none()) && Instant::now() < deadline {
            if lost.is_none() && api.node(victim).await["state"] == "lost" {
                lost = Some(killed.elapsed());
            }
            if failed.is_none() {
                let mut all = true;
                for id in &ids {
                    let (_, s) = api.get(&format!("/v1/sessions/{id}")).await;
                    all &= s["state"] == "failed" && s["error_code"] == "node_lost";
                }
                if all {
                    failed = Some(killed.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let show = |d: Option<Duration>| d.map_or("never".to_string(), |d| format!("{:.0} ms", ms(d)));
        println!("round {round}: {victim} killed: lost after {}, its {} sessions node_lost after {}", show(lost), ids.len(), show(failed));
        to_lost.extend(lost);
        to_failed.extend(failed);

        // Back on its state dir: it removes what it left, and is alive again.
        fleet.node(victim).start(None).await;
        api.wait_node(victim, "alive", Duration::from_secs(30)).await;
        api.wait_for(&format!("/v1/nodes/{victim}"), "no sandbox on the node", Duration::from_secs(30), |n| n["usage"]["sandboxes"] == 0).await;
        wait_nodes_empty(fleet).await;
    }
    report("kill -> node lost", to_lost);
    let p50 = report("kill -> its sessions failed node_lost", to_failed);
    println!("{:<44} {:+.0} ms (p50 - timeout; the check interval is {interval_ms} ms)", "beyond the heartbeat timeout", ms(p50) - timeout_ms as f64);
}

/// Creates pinned alternately to a node beside a third control plane (unix
/// socket) and to a joined node (mutual TLS), through that control plane.
async fn remote_vs_local(fleet: &mut Fleet, slots: u32, creates: usize, checks: &[&str]) {
    let mut local = fleet.make_node(&NodeSpec { slots, ..NodeSpec::new("node-local") }, &[]);
    local.start_local().await;
    let socket = local.socket().display().to_string();
    fleet.nodes.push(local);
    let cp = fleet.add_server(&[checks, &["--node-socket", socket.as_str()][..]].concat()).await;
    let api = fleet.api(cp).clone();
    api.wait_node("node-local", "alive", Duration::from_secs(30)).await;
    let remote = NODES[0];
    println!("\n== sandbox create, remote ({remote}, mutual TLS over the fabric) against local (node-local, unix socket), one control plane, {creates} each");
    let mut lat = [Vec::new(), Vec::new()];
    let mut deletes = [Vec::new(), Vec::new()];
    let mut odd = 0;
    // Two warm-up creates each (zygote, spare, connections), then the timed ones.
    for i in 0..creates + 2 {
        // Alternate which goes first.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let node = ["node-local", remote][side];
            let t0 = Instant::now();
            let (status, view) = api.post("/v1/sessions", &body(json!({"node_id": node}))).await;
            let took = t0.elapsed();
            if status != StatusCode::CREATED {
                odd += 1;
                println!("  create on {node}: {status} {view}");
                continue;
            }
            let t0 = Instant::now();
            let (status, answer) = api.delete(&format!("/v1/sessions/{}", view["id"].as_str().unwrap())).await;
            if status != StatusCode::NO_CONTENT {
                println!("  delete on {node}: {status} {answer}");
            }
            if i >= 2 {
                lat[side].push(took);
                deletes[side].push(t0.elapsed());
            }
        }
    }
    let [local_lat, remote_lat] = lat;
    let [local_del, remote_del] = deletes;
    let local_p50 = report("local: create -> 201", local_lat);
    let remote_p50 = report("remote: create -> 201", remote_lat);
    println!("{:<44} {:.2} (remote p50 / local p50){}", "ratio", remote_p50.as_secs_f64() / local_p50.as_secs_f64().max(1e-9), if odd > 0 { format!(", {odd} creates failed") } else { String::new() });
    let local_p50 = report("local: delete -> 204", local_del);
    let remote_p50 = report("remote: delete -> 204", remote_del);
    println!("{:<44} {:.2}", "ratio", remote_p50.as_secs_f64() / local_p50.as_secs_f64().max(1e-9));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let slots = env_usize("BENCH_SLOTS", 8);
    let clients = env_usize("BENCH_CLIENTS", 8);
    let fills = env_usize("BENCH_FILLS", 3);
    let refusals = env_usize("BENCH_REFUSALS", 200);
    let rounds = env_usize("BENCH_ROUNDS", 5);
    let lost_sessions = env_usize("BENCH_LOST_SESSIONS", 2);
    let interval_ms = env_usize("BENCH_CHECK_INTERVAL_MS", 250) as u64;
    let timeout_ms = env_usize("BENCH_HEARTBEAT_TIMEOUT_MS", 2000) as u64;
    let creates = env_usize("BENCH_CREATES", 30);
    // Notes a dynamically linked `agentd` (not what is shipped).
    common::agentd_bin();
    println!("load at start: {}", loadavg());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let started = Instant::now();
        let mut fleet = Fleet::new().await;
        let checks = ["--node-check-interval-ms".to_string(), interval_ms.to_string(), "--node-heartbeat-timeout-ms".into(), timeout_ms.to_string()];
        let checks: Vec<&str> = checks.iter().map(String::as_str).collect();
        fleet.add_server(&checks).await;
        fleet.add_server(&checks).await;
        for id in NODES {
            fleet.add_node(&NodeSpec { slots: slots as u32, ..NodeSpec::new(id) }).await;
        }
        println!("fleet up in {:.1} s", started.elapsed().as_secs_f64());

        placements(&fleet, slots, clients, fills, refusals).await;
        node_death(&mut fleet, rounds, lost_sessions, interval_ms, timeout_ms).await;
        remote_vs_local(&mut fleet, slots as u32, creates, &checks).await;

        if let Some(path) = std::env::var_os("BENCH_FLEET_LOG") {
            std::fs::write(&path, fleet.logs()).expect("BENCH_FLEET_LOG");
        }
        println!("\nload at end: {}; {:.0} s in all", loadavg(), started.elapsed().as_secs_f64());
        fleet.finish().await;
    });
}
