//! The fleet end to end: control planes and nodes as separate processes in
//! network namespaces of their own on one private network
//! (`support::fleet`), on one throwaway PostgreSQL. Nodes join with tokens
//! and are dialled over mutual TLS at the address they advertise; the test
//! reaches each API through a relay from the root namespace.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentd_pki::{ClusterCa, NodeKey, control_plane_client_tls, node_server_tls};
use agentd_proto::node::GetNodeInfoRequest;
use agentd_proto::node::node_client::NodeClient;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::support::fleet::{Api, CHECK_INTERVAL_MS, Fleet, HEARTBEAT_TIMEOUT_MS, NodeSpec, SLOTS, run_bounded};
use crate::support::{Sse, said, session_body};

/// A turn long enough to act in the middle of: 40 words, one every 100 ms.
const SLOW_AGENT: &[&str] = &["--delay-ms", "100"];
const SLOW_WORDS: &str = "one two three four five six seven eight nine ten \
    one two three four five six seven eight nine ten \
    one two three four five six seven eight nine ten \
    one two three four five six seven eight nine ten";

/// How long after a node goes silent the control plane calls it lost, at
/// most: the timeout, a check interval, and slack for a loaded machine.
fn lost_within() -> Duration {
    Duration::from_millis(HEARTBEAT_TIMEOUT_MS + CHECK_INTERVAL_MS) + Duration::from_secs(5)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A session body for the echo agent run with `args`, in a new container
/// shaped by `profile`.
fn body(profile: Value, args: &[&str]) -> Value {
    let mut body = session_body(args);
    body["container_profile"] = profile;
    body
}

/// Creates a session (201) and returns its view.
async fn create(api: &Api, profile: Value, args: &[&str], fleet: &Fleet) -> Value {
    let (status, view) = api.post("/v1/sessions", &body(profile.clone(), args)).await;
    assert_eq!(status, StatusCode::CREATED, "create with profile {profile}: {view}{}", fleet.logs());
    assert_eq!(view["state"], "ready", "{view}");
    view
}

/// Creates a session that must be refused with `status` and `code`; the
/// problem's detail.
async fn refused(api: &Api, profile: Value, status: StatusCode, code: &str) -> String {
    let (got, problem) = api.post("/v1/sessions", &body(profile.clone(), &[])).await;
    assert_eq!((got, problem["code"].as_str()), (status, Some(code)), "profile {profile}: {problem}");
    problem["detail"].as_str().unwrap_or_default().to_string()
}

/// The container `view`'s session runs in: it is recorded on `node_id`,
/// its sandbox directory is on that node and no other, and its PID 1 is a
/// child of that node's daemon.
async fn assert_runs_on(fleet: &Fleet, api: &Api, view: &Value, node_id: &str) -> String {
    let container = view["container_id"].as_str().unwrap().to_string();
    let (status, c) = api.get(&format!("/v1/containers/{container}")).await;
    assert_eq!(status, StatusCode::OK, "{c}");
    assert_eq!(c["node_id"], node_id, "container {container}: {c}");
    for node in &fleet.nodes {
        let holds = node.sandbox_dirs().contains(&container);
        assert_eq!(holds, node.id == node_id, "node {} holds the sandbox of {container}: {holds}", node.id);
    }
    let node = fleet.nodes.iter().find(|n| n.id == node_id).unwrap();
    let pid1 = c["supervisor_pid"].as_u64().expect("a supervisor pid") as u32;
    let parent = crate::support::procfs::status_field(pid1, "PPid").unwrap_or_default();
    assert_eq!(parent, node.pid().to_string(), "PID 1 of {container} is a child of node {node_id}'s daemon");
    container
}

/// Reads events until the first `session.update` (the turn is streaming).
async fn until_first_update(events: &mut Sse) -> Vec<crate::support::SseEvent> {
    let mut seen = Vec::new();
    while let Some(e) = events.next().await {
        let update = e.event == "session.update";
        seen.push(e);
        if update {
            return seen;
        }
    }
    panic!("the stream ended before any update: {seen:?}");
}

/// The stream ends with `run.failed` with `code`, then closes.
async fn assert_stream_ends_failed(events: &mut Sse, run_id: &str, code: &str) {
    let rest = events.until_run_end().await;
    let end = rest.last().unwrap();
    assert_eq!(end.event, "run.failed", "{rest:?}");
    let data = end.json();
    assert_eq!((data["run_id"].as_str(), data["code"].as_str()), (Some(run_id), Some(code)), "{data}");
    assert!(events.next().await.is_none(), "the stream ends after the failed run");
}

/// Issue 13's cases 1, 2, 3 and 5 on one fleet of three nodes: joining and
/// listing, restart without a token, placement (spread, pinning, selector,
/// binpack on a second control plane, refusals), a prompt streamed through
/// a remote node, cordon and drain, node removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_take_placements_stream_and_drain() {
    let mut fleet = Fleet::new().await;
    fleet.add_server(&[]).await;
    let specs = [("node-a", "zone=a,disk=ssd"), ("node-b", "zone=b,disk=ssd"), ("node-c", "zone=c,disk=hdd")];
    for (id, labels) in specs {
        fleet.add_node(&NodeSpec { labels, ..NodeSpec::new(id) }).await;
    }
    let api = fleet.api(0).clone();

    // Joined: listed alive with their labels, capacity, version and address.
    let (status, list) = api.get("/v1/nodes").await;
    assert_eq!(status, StatusCode::OK);
    let nodes = list["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{list}");
    for ((id, labels), (n, node)) in specs.iter().zip(nodes.iter().zip(&fleet.nodes)) {
        assert_eq!(n["id"], *id, "{list}");
        assert_eq!(n["state"], "alive", "{n}");
        let want: serde_json::Map<String, Value> =
            labels.split(',').map(|kv| kv.split_once('=').unwrap()).map(|(k, v)| (k.to_string(), json!(v))).collect();
        assert_eq!(n["labels"], Value::Object(want), "{n}");
        assert_eq!(n["capacity"], json!({"slots": SLOTS, "memory_bytes": 2_147_483_648_u64, "cpus": 2.0}), "{n}");
        assert_eq!(n["version"], env!("CARGO_PKG_VERSION"), "{n}");
        assert_eq!(n["address"], node.grpc_addr().to_string(), "{n}");
        // Key and certificates readable by root alone.
        for file in ["node.key", "node.crt", "ca.crt", "identity.json"] {
            let path = node.tls_dir().join(file);
            let mode = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{} is {:o}", path.display(), mode & 0o777);
        }
    }

    // Restarted without a token: it serves with the certificate it kept,
    // under the same id, and the control plane hears from it again.
    let identity = std::fs::read_to_string(fleet.node("node-b").tls_dir().join("identity.json")).unwrap();
    fleet.node("node-b").interrupt();
    let restarted = now_ms();
    fleet.node("node-b").start(None).await;
    assert!(!fleet.node("node-b").log().contains("joined the fleet"), "{}", fleet.node("node-b").log());
    api.wait_for("/v1/nodes/node-b", "a heartbeat of the restarted node-b", Duration::from_secs(15), |n| {
        n["state"] == "alive" && n["last_heartbeat_at"].as_i64().is_some_and(|t| t > restarted)
    })
    .await;
    assert_eq!(std::fs::read_to_string(fleet.node("node-b").tls_dir().join("identity.json")).unwrap(), identity);
    let (_, list) = api.get("/v1/nodes").await;
    assert_eq!(list["nodes"].as_array().unwrap().len(), 3, "no second node-b: {list}");

    // Spread: three containers reserving 1.5 GiB each, one per node.
    let mut spread = Vec::new();
    for _ in 0..3 {
        spread.push(create(&api, json!({"memory": "1536M"}), &[], &fleet).await);
    }
    let mut placed = Vec::new();
    for view in &spread {
        let (_, c) = api.get(&format!("/v1/containers/{}", view["container_id"].as_str().unwrap())).await;
        let node_id = c["node_id"].as_str().unwrap().to_string();
        assert_runs_on(&fleet, &api, view, &node_id).await;
        placed.push(node_id);
    }
    placed.sort();
    assert_eq!(placed, ["node-a", "node-b", "node-c"], "spread over the three nodes");

    // Pinned to node-b, which then holds two of its three slots.
    let pinned = create(&api, json!({"node_id": "node-b"}), &[], &fleet).await;
    assert_runs_on(&fleet, &api, &pinned, "node-b").await;

    // Binpack (a second control plane on the same database): the most
    // loaded node that fits, node-b, where spread would take a or c.
    let binpacking = fleet.add_server(&["--placement", "binpack"]).await;
    let api_binpack = fleet.api(binpacking).clone();
    let packed = create(&api_binpack, json!({}), &[], &fleet).await;
    assert_runs_on(&fleet, &api, &packed, "node-b").await;

    // By selector: the only node with disk=hdd.
    let hdd = create(&api, json!({"node_selector": {"disk": "hdd"}}), &[], &fleet).await;
    assert_runs_on(&fleet, &api, &hdd, "node-c").await;

    // No node can take 1 GiB now: each says why.
    let detail = refused(&api, json!({"memory": "1G"}), StatusCode::SERVICE_UNAVAILABLE, "no_capacity").await;
    assert!(detail.contains("node-a: not enough memory"), "{detail}");
    assert!(detail.contains(&format!("node-b: full: {SLOTS} of {SLOTS} sandbox slots taken")), "{detail}");
    assert!(detail.contains("node-c: not enough memory"), "{detail}");
    let detail = refused(&api, json!({"node_id": "node-z"}), StatusCode::UNPROCESSABLE_ENTITY, "unknown_node").await;
    assert!(detail.contains("node-z"), "{detail}");
    let detail = refused(&api, json!({"node_selector": {"zone": "mars"}}), StatusCode::UNPROCESSABLE_ENTITY, "unsatisfiable_selector").await;
    assert!(detail.contains("mars"), "{detail}");
    let detail = refused(&api, json!({"memory": "3G"}), StatusCode::UNPROCESSABLE_ENTITY, "invalid_profile").await;
    assert!(detail.contains("more than any node offers"), "{detail}");
    let (_, sessions) = api.get("/v1/sessions").await;
    assert_eq!(sessions["sessions"].as_array().map(Vec::len), Some(6), "refusals wrote nothing: {sessions}");

    // A prompt through node-c, streamed back over SSE.
    let id = hdd["id"].as_str().unwrap();
    let mut events = api.events(id).await;
    let (status, accepted) = api.prompt(id, "hello from the fleet").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let got = events.until_run_end().await;
    assert_eq!(got[0].event, "run.started", "{got:?}");
    assert_eq!(got.last().unwrap().event, "run.completed", "{got:?}");
    assert_eq!(said(&got), "hello from the fleet");
    let hdd_container = hdd["container_id"].as_str().unwrap();
    let on_node = fleet.node("node-c").session_log(hdd_container, id);
    assert_eq!(on_node.iter().filter(|l| l["kind"] == "run.started" && l["run_id"] == accepted["run_id"]).count(), 1, "{on_node:?}");

    // Cordoned: no new placement there, and the only candidate's refusal
    // says so.
    let (status, n) = api.post("/v1/nodes/node-a:cordon", &json!({})).await;
    assert_eq!((status, n["state"].as_str()), (StatusCode::OK, Some("cordoned")), "{n}");
    let detail = refused(&api, json!({"node_id": "node-a"}), StatusCode::SERVICE_UNAVAILABLE, "no_capacity").await;
    assert_eq!(detail, "no node can take the container: node-a: cordoned");
    let elsewhere = create(&api, json!({}), &[], &fleet).await;
    assert_runs_on(&fleet, &api, &elsewhere, "node-c").await;
    let (status, n) = api.post("/v1/nodes/node-a:uncordon", &json!({})).await;
    assert_eq!((status, n["state"].as_str()), (StatusCode::OK, Some("alive")), "{n}");

    // Drained: node-c's idle containers are deleted at once, the busy one
    // (a turn waiting on a permission answer) once its turn ended; the
    // node is then drained and can be removed.
    let on_c: Vec<String> = api.node("node-c").await["containers"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(on_c.len(), 3, "node-c holds three containers");
    let busy_session = elsewhere["id"].as_str().unwrap();
    let busy = elsewhere["container_id"].as_str().unwrap().to_string();
    let mut events = api.events(busy_session).await;
    let (status, accepted) = api.prompt(busy_session, "/ask may the drain wait").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let asked = loop {
        let e = events.next().await.expect("the stream stays open");
        if e.event == "permission.requested" {
            break e.json();
        }
    };
    let (status, n) = api.post("/v1/nodes/node-c:drain", &json!({"deadline_ms": 60_000})).await;
    assert_eq!((status, n["state"].as_str()), (StatusCode::OK, Some("draining")), "{n}");
    for c in on_c.iter().filter(|c| **c != busy) {
        api.wait_for(&format!("/v1/containers/{c}"), "an idle container of node-c to be deleted", Duration::from_secs(30), |v| v["state"] == "deleted").await;
    }
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(CHECK_INTERVAL_MS)).await;
        let (_, c) = api.get(&format!("/v1/containers/{busy}")).await;
        assert_eq!(c["state"], "ready", "a busy container is left alone until its deadline: {c}");
        assert_eq!(api.node("node-c").await["state"], "draining");
    }
    let answer = format!("/v1/sessions/{busy_session}/permissions/{}", asked["request_id"].as_str().unwrap());
    let (status, body) = api.post(&answer, &json!({"option_id": "allow"})).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let got = events.until_run_end().await;
    assert_eq!(got.last().unwrap().event, "run.completed", "the busy turn ran to its end: {got:?}");
    api.wait_node("node-c", "drained", Duration::from_secs(30)).await;
    for c in &on_c {
        let (_, view) = api.get(&format!("/v1/containers/{c}")).await;
        assert_eq!(view["state"], "deleted", "{view}");
    }
    assert_eq!(fleet.node("node-c").sandbox_dirs(), Vec::<String>::new(), "node-c holds no sandbox");
    let (status, problem) = api.delete("/v1/nodes/node-a").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("illegal_state")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("node-a is alive"), "names the state clients see: {problem}");
    let (status, problem) = api.delete("/v1/nodes/node-c").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{problem}");
    let (status, problem) = api.get("/v1/nodes/node-c").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("node_not_found")), "{problem}");
    let (status, problem) = api.delete("/v1/nodes/node-nowhere").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("node_not_found")), "{problem}");
    let (_, list) = api.get("/v1/nodes").await;
    let ids: Vec<&str> = list["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["node-a", "node-b"]);

    fleet.finish().await;
}

/// Issue 13's case 4: a node SIGKILLed while a turn streams, and a node cut
/// off by a partition, are lost within the heartbeat timeout: their
/// sessions, runs and containers fail with `node_lost` and the open SSE
/// stream ends with `run.failed` code `node_lost`. Back again (the killed
/// one restarted on its state dir without a token, the cut one healed),
/// each is alive and holds no sandbox of what the control plane failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_nodes_fail_their_work_and_are_cleaned_when_they_return() {
    let mut fleet = Fleet::new().await;
    fleet.add_server(&[]).await;
    fleet.add_node(&NodeSpec::new("node-a")).await;
    fleet.add_node(&NodeSpec::new("node-b")).await;
    let api = fleet.api(0).clone();

    for (victim, how) in [("node-a", "SIGKILL"), ("node-b", "partition"), ("node-a", "restart")] {
        // A node restarted at once is never lost: its sandboxes are, and the
        // journal of the new process says so.
        let code = if how == "restart" { "sandbox_lost" } else { "node_lost" };
        let view = create(&api, json!({"node_id": victim}), SLOW_AGENT, &fleet).await;
        let container = assert_runs_on(&fleet, &api, &view, victim).await;
        let (_, c) = api.get(&format!("/v1/containers/{container}")).await;
        let pid1 = c["supervisor_pid"].as_u64().unwrap() as u32;
        let id = view["id"].as_str().unwrap();
        let mut events = api.events(id).await;
        let (status, accepted) = api.prompt(id, SLOW_WORDS).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let run_id = accepted["run_id"].as_str().unwrap();
        until_first_update(&mut events).await;

        let cut = Instant::now();
        match how {
            "partition" => fleet.fabric().partition(&fleet.nodes.iter().find(|n| n.id == victim).unwrap().host).unwrap(),
            _ => fleet.node(victim).kill9(),
        }
        if how == "restart" {
            fleet.node(victim).start(None).await;
        }
        let failed = api.wait_for(&format!("/v1/sessions/{id}"), &format!("the session on {victim} to fail ({how})"), lost_within(), |s| s["state"] == "failed").await;
        let waited = cut.elapsed();
        eprintln!("{how}: session failed after {waited:?}");
        assert_eq!(failed["error_code"], code, "{failed}");
        assert_eq!((failed["runs"][0]["state"].as_str(), failed["runs"][0]["error_code"].as_str()), (Some("failed"), Some(code)), "{failed}");
        // The container fails in a write of its own, after its sessions.
        let c = api.wait_for(&format!("/v1/containers/{container}"), "the container to fail", Duration::from_secs(5), |c| c["state"] != "ready").await;
        assert_eq!((c["state"].as_str(), c["error_code"].as_str()), (Some("failed"), Some(code)), "{c}");
        if how != "restart" {
            assert!(waited >= Duration::from_millis(HEARTBEAT_TIMEOUT_MS - CHECK_INTERVAL_MS), "failed only after the timeout: {waited:?}");
            let n = api.node(victim).await;
            assert_eq!(n["state"], "lost", "{n}");
        }
        assert_stream_ends_failed(&mut events, run_id, code).await;
        eprintln!("{how}: the stream ended after {:?}", cut.elapsed());

        // Back: alive again, and what the control plane failed is gone
        // from the node.
        let back = Instant::now();
        match how {
            "SIGKILL" => fleet.node(victim).start(None).await,
            "partition" => fleet.fabric().heal(&fleet.nodes.iter().find(|n| n.id == victim).unwrap().host).unwrap(),
            _ => {}
        }
        api.wait_node(victim, "alive", Duration::from_secs(20)).await;
        eprintln!("{how}: alive again {:?} after it came back", back.elapsed());
        let wait_empty = Instant::now() + Duration::from_secs(20);
        while !fleet.node(victim).sandbox_dirs().is_empty() {
            assert!(Instant::now() < wait_empty, "{victim} still holds {:?}{}", fleet.node(victim).sandbox_dirs(), fleet.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        crate::support::wait_gone(pid1).await;
        api.wait_for(&format!("/v1/nodes/{victim}"), "a heartbeat reporting no sandbox", Duration::from_secs(10), |n| {
            n["usage"]["sandboxes"] == 0
        })
        .await;
        let (_, c) = api.get(&format!("/v1/containers/{container}")).await;
        assert!(c["state"] == "failed" || c["state"] == "deleted", "{c}");
        assert_eq!(c["error_code"], code, "{c}");

        // And it takes new work.
        let again = create(&api, json!({"node_id": victim}), &[], &fleet).await;
        assert_runs_on(&fleet, &api, &again, victim).await;
        let (status, _) = api.delete(&format!("/v1/sessions/{}", again["id"].as_str().unwrap())).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    fleet.finish().await;
}

/// A partition longer than the transport's keepalive (the control plane's
/// connection to the node breaks) and shorter than the heartbeat timeout:
/// nothing fails; the turn runs on in the node, and the open stream, once
/// the node answers again, resumes where it was and carries the rest of the
/// answer, each event once, to the turn's end, which the store records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_partition_loses_nothing() {
    let mut fleet = Fleet::new().await;
    fleet.add_server(&["--node-heartbeat-timeout-ms", "60000"]).await;
    fleet.add_node(&NodeSpec::new("node-a")).await;
    let api = fleet.api(0).clone();
    let view = create(&api, json!({}), SLOW_AGENT, &fleet).await;
    let id = view["id"].as_str().unwrap();
    let words = format!("{SLOW_WORDS} {SLOW_WORDS}");
    let mut events = api.events(id).await;
    let (status, accepted) = api.prompt(id, &words).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let mut got = until_first_update(&mut events).await;

    let host = &fleet.nodes[0].host;
    fleet.fabric().partition(host).unwrap();
    // Past the keepalive (5 s interval, 5 s timeout): the connection breaks.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(api.node("node-a").await["state"], "alive", "not lost within the timeout");
    fleet.fabric().heal(host).unwrap();
    got.extend(events.until_run_end().await);

    assert_eq!(got.last().unwrap().event, "run.completed", "{got:?}");
    assert_eq!(said(&got), words, "the whole answer");
    let ids: Vec<u64> = got.iter().map(|e| e.id.unwrap()).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>(), "each event once, in order");
    let s = api.wait_for(&format!("/v1/sessions/{id}"), "the run's end recorded", Duration::from_secs(20), |s| s["runs"][0]["state"] == "completed").await;
    assert_eq!(s["state"], "ready", "{s}");
    let log = fleet.servers[0].daemon.log();
    assert!(log.contains("cannot read the node's journal") || log.contains("node did not answer its check"), "the control plane noticed the cut");
    fleet.finish().await;
}

/// Issue 13's case 6: two control planes on one PostgreSQL. Creates racing
/// through both never oversubscribe a node; either answers any session's
/// GET and SSE; the one recording the node's journal is SIGKILLed mid-turn,
/// and the other takes the journal over once the lease expires, records the
/// run's end and takes the next prompt; the node ran the first prompt once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_mid_run_is_taken_over_by_the_other() {
    let mut fleet = Fleet::new().await;
    fleet.add_server(&[]).await;
    fleet.add_server(&[]).await;
    fleet.add_node(&NodeSpec::new("node-a")).await;

    // Placement is decided in the container's transaction: creates racing
    // through both control planes never take more than node-a's slots.
    let creates = (0..2 * SLOTS as usize).map(|i| {
        let api = fleet.api(i % 2).clone();
        async move { api.post("/v1/sessions", &body(json!({}), &[])).await }
    });
    let answers = futures::future::join_all(creates).await;
    let mut created = Vec::new();
    for (status, answer) in &answers {
        match *status {
            StatusCode::CREATED => created.push(answer["id"].as_str().unwrap().to_string()),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(answer["code"], "no_capacity", "{answer}");
                let detail = answer["detail"].as_str().unwrap();
                assert!(detail.contains(&format!("node-a: full: {SLOTS} of {SLOTS}")), "{detail}");
            }
            other => panic!("{other}: {answer}{}", fleet.logs()),
        }
    }
    assert_eq!(created.len(), SLOTS as usize, "as many as node-a has slots: {answers:?}");
    assert_eq!(fleet.node("node-a").sandbox_dirs().len(), SLOTS as usize);
    for id in &created {
        let (status, body) = fleet.api(0).delete(&format!("/v1/sessions/{id}")).await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    assert_eq!(fleet.node("node-a").sandbox_dirs(), Vec::<String>::new());

    // The watcher of node-a's journal is one of the two.
    let deadline = Instant::now() + Duration::from_secs(15);
    let watching = |s: &crate::support::fleet::ControlPlane| s.daemon.count(&["watching the node's journal", "node-a"]) > 0;
    let holder = loop {
        if let Some(i) = fleet.servers.iter().position(watching) {
            break i;
        }
        assert!(Instant::now() < deadline, "no control plane watches node-a{}", fleet.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let other = 1 - holder;
    let (doomed, survivor) = (fleet.api(holder).clone(), fleet.api(other).clone());

    let view = create(&doomed, json!({}), SLOW_AGENT, &fleet).await;
    let id = view["id"].as_str().unwrap();
    let container = view["container_id"].as_str().unwrap();
    let (status, seen) = survivor.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!((status, &seen["state"]), (StatusCode::OK, &json!("ready")), "the other control plane answers too: {seen}");

    let mut on_doomed = doomed.events(id).await;
    let mut on_survivor = survivor.events(id).await;
    let (status, accepted) = doomed.prompt(id, SLOW_WORDS).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let run_id = accepted["run_id"].as_str().unwrap().to_string();
    until_first_update(&mut on_doomed).await;
    until_first_update(&mut on_survivor).await;

    assert_eq!(fleet.servers[other].daemon.count(&["watching the node's journal"]), 0, "one watcher at a time{}", fleet.logs());
    fleet.servers[holder].daemon.kill9();
    let killed = Instant::now();
    // The doomed stream is cut; the survivor's goes on to the turn's end.
    while on_doomed.next().await.is_some() {}
    let rest = on_survivor.until_run_end().await;
    assert_eq!(rest.last().unwrap().event, "run.completed", "{rest:?}");
    let full = said(&rest);
    assert!(SLOW_WORDS.ends_with(&full), "the rest of the answer: {full:?}");

    // The survivor records the end once the dead one's lease expired.
    let path = format!("/v1/sessions/{id}");
    let ended = survivor.wait_for(&path, "the run's end to be recorded", Duration::from_secs(30), |s| s["runs"][0]["state"] == "completed").await;
    eprintln!("run end recorded {:?} after the SIGKILL", killed.elapsed());
    assert_eq!(ended["runs"].as_array().unwrap().len(), 1, "{ended}");
    assert!(fleet.servers[other].daemon.count(&["watching the node's journal", "node-a"]) > 0, "{}", fleet.logs());

    let mut events = survivor.events(id).await;
    let (status, second) = survivor.prompt(id, "after the takeover").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{second}");
    let mut got = Vec::new();
    loop {
        let more = events.until_run_end().await;
        let done = more.last().is_some_and(|e| e.json()["run_id"] == second["run_id"]);
        got.extend(more);
        if done {
            break;
        }
    }
    assert_eq!(got.last().unwrap().event, "run.completed", "{got:?}");

    let log = fleet.node("node-a").session_log(container, id);
    let started = |run: &str| log.iter().filter(|l| l["kind"] == "run.started" && l["run_id"] == run).count();
    assert_eq!(started(&run_id), 1, "the first prompt ran once: {log:?}");
    assert_eq!(started(second["run_id"].as_str().unwrap()), 1, "{log:?}");
    assert_eq!(log.iter().filter(|l| l["kind"] == "run.started").count(), 2, "{log:?}");
    fleet.finish().await;
}

/// The cluster CA's certificate and key, read from the fleet's database
/// (what a control plane would load).
async fn cluster_ca(fleet: &Fleet) -> ClusterCa {
    let psql = agentd_testkit::postgres::pg_bin("psql").expect("psql");
    let query = |column: &str| {
        let mut cmd = std::process::Command::new(&psql);
        cmd.args([&fleet.pg.url(), "-tAc", &format!("SELECT {column} FROM cluster_ca")]);
        cmd
    };
    let cert = run_bounded(query("cert_pem"), Duration::from_secs(10)).await;
    let key = run_bounded(query("key_pem"), Duration::from_secs(10)).await;
    ClusterCa::from_pem(&String::from_utf8_lossy(&cert.stdout), &String::from_utf8_lossy(&key.stdout)).expect("the stored CA")
}

/// Calls GetNodeInfo at `addr` with `tls`, bounded; the node id or the error.
async fn node_info(addr: std::net::SocketAddr, tls: ClientTlsConfig) -> Result<String, String> {
    let call = async {
        let endpoint = Endpoint::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).map_err(|e| e.to_string())?;
        let channel = endpoint.connect_timeout(Duration::from_secs(5)).connect().await.map_err(|e| format!("{e:?}"))?;
        let info = NodeClient::new(channel).get_node_info(GetNodeInfoRequest {}).await.map_err(|s| format!("{s:?}"))?;
        Ok(info.into_inner().node_id)
    };
    tokio::time::timeout(Duration::from_secs(15), call).await.expect("the call ends within 15 s")
}

/// A gRPC server with a certificate of the test's choosing at an address
/// inside a host; counts the connections it accepts.
struct Impersonator {
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Impersonator {
    fn start(host: &agentd_testkit::netns::Host, addr: std::net::SocketAddr, tls: tonic::transport::ServerTlsConfig) -> Self {
        let listener = host.listen(addr).expect("listen in the host");
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).inspect(move |_| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder().tls_config(tls).unwrap().add_service(health);
        let task = tokio::spawn(server.serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        }));
        Self { accepted, stop, task }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops serving; its sockets in the host are closed when this returns.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("the impersonator stops").unwrap().unwrap();
    }
}

/// Whether a call failed on the node's refusal of the client's certificate:
/// the TLS alert naming why or, since TLS 1.3 checks the client's
/// certificate after the client finished its side of the handshake (the
/// client may already be sending its request when the alert comes), the
/// connection closed under it.
/// Under TLS 1.3 a server judges the client's certificate after the client
/// has finished its side of the handshake: the client sees the alert, or
/// only the connection closing (or its write failing).
fn refused_by_tls(err: &str, alert: &str) -> bool {
    err.contains(&format!("received fatal alert: {alert}"))
        || err.contains("connection closed")
        || err.contains("peer closed connection")
        || err.contains("broken pipe")
        || err.contains("connection reset")
}

/// A node join run to its end: its exit status and stderr.
async fn join_attempt(node: &crate::support::fleet::FleetNode, url: &str, token: &str) -> (bool, String) {
    let out = run_bounded(node.command(Some((url, token))), Duration::from_secs(30)).await;
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Issue 13's case 7: what the fleet refuses. Joins with a wrong, a used
/// and an expired token and as the id of a live node end non-zero with one
/// clear line and leave nothing; a client without the cluster's
/// certificate cannot call a node; a TLS server at a node's address with a
/// certificate from another CA is never trusted (the node is lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_refuses_bad_tokens_duplicate_ids_and_strangers() {
    let mut fleet = Fleet::new().await;
    fleet.add_server(&[]).await;
    fleet.add_node(&NodeSpec::new("node-a")).await;
    let api = fleet.api(0).clone();
    let url = fleet.servers[0].url.clone();

    let stranger = fleet.make_node(&NodeSpec::new("node-x"), &[]);
    let twin = fleet.make_node(&NodeSpec::new("node-a"), &[]);

    // A wrong token: the right id and CA, another secret.
    let token = fleet.token("10m").await;
    let parts: Vec<&str> = token.split('.').collect();
    let wrong = format!("{}.{}.{}.{}", parts[0], parts[1], "A".repeat(43), parts[3]);
    // A used one: node-y joins with it first.
    let mut first = fleet.make_node(&NodeSpec::new("node-y"), &[]);
    let used = fleet.token("10m").await;
    first.start(Some((&url, &used))).await;
    fleet.nodes.push(first);
    api.wait_node("node-y", "alive", Duration::from_secs(20)).await;
    // An expired one.
    let expired = fleet.token("1s").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let cases = [(&stranger, wrong.as_str(), "invalid_join_token"), (&stranger, used.as_str(), "join_token_used"), (&stranger, expired.as_str(), "join_token_expired"), (&twin, token.as_str(), "node_id_in_use")];
    for (node, token, code) in cases {
        let (ok, stderr) = join_attempt(node, &url, token).await;
        assert!(!ok, "joined with {code}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(last.starts_with("agentd: the control plane refused the join") && last.contains(code), "one clear line for {code}: {stderr}");
        assert!(!node.tls_dir().join("identity.json").exists(), "a refused join keeps nothing");
    }
    let (_, list) = api.get("/v1/nodes").await;
    let ids: Vec<&str> = list["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["node-a", "node-y"], "{list}");
    // Not a token at all.
    let (ok, stderr) = join_attempt(&stranger, &url, "agentd-join.nonsense").await;
    assert!(!ok && stderr.contains("malformed join token"), "{stderr}");

    // Callers of node-a's gRPC port: only a cluster certificate gets in.
    let grpc = fleet.node("node-a").grpc_addr();
    let forward = fleet.node("node-a").host.forward(grpc).await.unwrap();
    let ca = cluster_ca(&fleet).await;
    let ours = ca.issue_control_plane(Duration::from_secs(3600)).unwrap();
    let tls = control_plane_client_tls(ca.cert_pem(), &ours, "node-a").unwrap();
    assert_eq!(node_info(forward.addr(), tls).await.as_deref(), Ok("node-a"), "a cluster certificate is let in");
    let other_ca = ClusterCa::generate().unwrap();
    let theirs = other_ca.issue_control_plane(Duration::from_secs(3600)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.cert_pem()))
        .identity(tonic::transport::Identity::from_pem(&theirs.cert_pem, &theirs.key_pem))
        .domain_name("node-a.node.agentd");
    let err = node_info(forward.addr(), tls).await.expect_err("a certificate from another CA was let in");
    assert!(refused_by_tls(&err, "UnknownCA"), "the node refuses another CA's client: {err}");
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.cert_pem())).domain_name("node-a.node.agentd");
    let err = node_info(forward.addr(), tls).await.expect_err("a client without a certificate was let in");
    assert!(refused_by_tls(&err, "CertificateRequired"), "the node refuses a client without a certificate: {err}");

    // A node's own certificate (serverAuth only) does not make a client.
    let y_tls = fleet.node("node-y").tls_dir();
    let read = |f: &str| std::fs::read_to_string(y_tls.join(f)).unwrap();
    let (y_cert, y_key) = (read("node.crt"), read("node.key"));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.cert_pem()))
        .identity(tonic::transport::Identity::from_pem(&y_cert, &y_key))
        .domain_name("node-a.node.agentd");
    let err = node_info(forward.addr(), tls).await.expect_err("a node certificate was let in as a client");
    assert!(refused_by_tls(&err, "UnsupportedCertificate"), "the node refuses a node certificate as a client: {err}");
    drop(forward);

    // Impersonators at node-a's address once it is gone: the same name
    // from another CA, then node-y's own certificate from the cluster CA
    // (a stale address now reaching another node). Neither is trusted.
    fleet.node("node-a").kill9();
    let key = NodeKey::generate().unwrap();
    let cert = other_ca.sign_node_csr(&key.csr_pem("node-a").unwrap(), "node-a", Duration::from_secs(3600)).unwrap();
    let impostors = [
        (node_server_tls(&cert, &key.key_pem(), other_ca.cert_pem()).unwrap(), "invalid peer certificate: UnknownIssuer"),
        (node_server_tls(&y_cert, &y_key, ca.cert_pem()).unwrap(), "certificate is only valid for DnsName(\\\"node-y.node.agentd\\\")"),
    ];
    for (i, (tls, why)) in impostors.into_iter().enumerate() {
        let host = &fleet.nodes.iter().find(|n| n.id == "node-a").unwrap().host;
        let impersonator = Impersonator::start(host, grpc, tls);
        if i == 0 {
            api.wait_node("node-a", "lost", lost_within()).await;
        }
        let server = &fleet.servers[0].daemon;
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.count(&["node did not answer its check", "node-a", why]) < 3 {
            assert!(Instant::now() < deadline, "the control plane met no impersonator ({why}){}", fleet.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let n = api.node("node-a").await;
        assert_eq!(n["state"], "lost", "an impersonator was trusted: {n}");
        assert!(impersonator.accepted() > 0, "the control plane dialled the impersonator");
        impersonator.stop().await;
    }
    let why = fleet.servers[0].daemon.count(&["node node-a lost", "invalid peer certificate: UnknownIssuer"]);
    assert_eq!(why, 1, "the control plane says why it gave node-a up{}", fleet.logs());

    // The real node-a, back on its state dir, is trusted again.
    fleet.node("node-a").start(None).await;
    api.wait_node("node-a", "alive", Duration::from_secs(20)).await;
    drop(stranger);
    drop(twin);
    fleet.finish().await;
}
