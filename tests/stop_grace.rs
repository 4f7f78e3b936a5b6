//! Agents get a grace period when their sandbox goes: the node asks the
//! supervisor to SIGTERM each agent's process group, waits the grace, then
//! SIGKILLs the groups, and only then kills the sandbox. The echo agent
//! traps SIGTERM (`--on-sigterm`) and says so on stderr; the supervisor
//! hands its last words to the node, which logs how each agent ended, and
//! the test reads that log from the host once the sandbox is gone.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::daemon::{NodeProcess, ServerProcess};
use crate::support::host::{sandbox_cgroups, wait_no_cgroups, wait_no_sandbox_cgroups, zombie_children};
use crate::support::{Agentd, procfs, session_body, wait_gone};

/// The node's "agent stopped" line for `container_id`.
fn stop_line(log: &str, container_id: &str) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("agent stopped") && l.contains(container_id)).collect();
    assert_eq!(lines.len(), 1, "one stopped agent in {container_id}; log:\n{log}");
    lines[0].to_string()
}

/// `after_ms=N` of a stop line.
fn after_ms(line: &str) -> u64 {
    line.split("after_ms=").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no after_ms in {line}"))
}

/// A sandbox's PID 1 and agent as the host sees them.
async fn pids(agentd: &Agentd, container_id: &str) -> (u32, u32) {
    let (_, c) = agentd.get(&format!("/v1/containers/{container_id}")).await;
    let supervisor = c["supervisor_pid"].as_u64().unwrap() as u32;
    let agents = procfs::children(supervisor);
    assert_eq!(agents.len(), 1, "{agents:?}");
    (supervisor, agents[0])
}

/// Nothing of the sandbox is left: no process, zombie, cgroup, directory or mount.
async fn assert_gone(agentd: &Agentd, container_id: &str, pids: &[u32]) {
    for pid in pids {
        wait_gone(*pid).await;
    }
    wait_no_cgroups(container_id).await;
    assert!(!agentd.sandbox_dirs().contains(&container_id.to_string()), "{:?}", agentd.sandbox_dirs());
    assert!(!procfs::mounts_mention(container_id));
    assert!(zombie_children(agentd.pid()).is_empty(), "zombies: {:?}", zombie_children(agentd.pid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_gives_agents_their_grace_then_kills_their_groups() {
    let agentd = Agentd::start_with(&[("AGENTD_STOP_GRACE_MS", "1500")]).await;
    let polite = agentd.create_session(&["--on-sigterm", "exit", "--delay-ms", "100"]).await;
    let stubborn = agentd.create_session(&["--on-sigterm", "ignore"]).await;
    let polite_ctr = polite["container_id"].as_str().unwrap().to_string();
    let stubborn_ctr = stubborn["container_id"].as_str().unwrap().to_string();
    let polite_pids = pids(&agentd, &polite_ctr).await;
    let stubborn_pids = pids(&agentd, &stubborn_ctr).await;

    // A turn runs while its sandbox is deleted: it fails, saying why.
    let id = polite["id"].as_str().unwrap();
    let mut events = agentd.events(id, None).await;
    let (status, _) = agentd.prompt(id, "one two three four five six seven eight nine ten eleven twelve").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(events.next().await.unwrap().event, "run.started");

    let started = Instant::now();
    let (status, body) = agentd.delete(&format!("/v1/containers/{polite_ctr}")).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(took < Duration::from_millis(1500), "an agent that exits on SIGTERM is not waited for: {took:?}");
    let line = stop_line(&agentd.log(), &polite_ctr);
    assert!(line.contains("SIGTERM received") && line.contains("exiting"), "the agent saw SIGTERM: {line}");
    assert!(line.contains("killed=false") && line.contains("exit code 0"), "and left on its own: {line}");
    let end = events.until_run_end().await;
    let last = end.last().unwrap();
    assert_eq!(last.event, "run.failed", "{end:?}");
    // Said by the supervisor ("the sandbox is stopping"), or by the node
    // when the stream broke first ("the sandbox stopped during the run").
    let error = last.json()["error"].as_str().unwrap().to_string();
    assert!(error.contains("the sandbox is stopping") || error.contains("the sandbox stopped during the run"), "{error}");
    assert_gone(&agentd, &polite_ctr, &[polite_pids.0, polite_pids.1]).await;

    let started = Instant::now();
    let (status, body) = agentd.delete(&format!("/v1/containers/{stubborn_ctr}")).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(took >= Duration::from_millis(1500), "an agent that ignores SIGTERM keeps its grace: {took:?}");
    assert!(took < Duration::from_secs(8), "then it is killed: {took:?}");
    let line = stop_line(&agentd.log(), &stubborn_ctr);
    assert!(line.contains("SIGTERM received") && line.contains("ignoring it"), "SIGTERM came first: {line}");
    assert!(line.contains("killed=true") && line.contains("killed by signal 9"), "then SIGKILL: {line}");
    assert!(after_ms(&line) >= 1500, "after the grace: {line}");
    assert_gone(&agentd, &stubborn_ctr, &[stubborn_pids.0, stubborn_pids.1]).await;
}

/// A supervisor that cannot answer (stopped from the host) holds delete up
/// for the grace plus the node's margin, no longer; its sandbox still goes
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_supervisor_does_not_hold_up_delete() {
    let agentd = Agentd::start_with(&[("AGENTD_STOP_GRACE_MS", "1000")]).await;
    let session = agentd.create_session(&["--on-sigterm", "ignore"]).await;
    let ctr = session["container_id"].as_str().unwrap().to_string();
    let (supervisor, agent) = pids(&agentd, &ctr).await;
    // SIGSTOP from an ancestor namespace reaches even a namespace's init.
    kill(Pid::from_raw(supervisor as i32), Signal::SIGSTOP).unwrap();

    let started = Instant::now();
    let (status, body) = agentd.delete(&format!("/v1/containers/{ctr}")).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // Grace 1 s + the node's 2 s margin at most, then the kill.
    assert!(took >= Duration::from_millis(2000), "waited for the supervisor: {took:?}");
    assert!(took < Duration::from_secs(6), "but not beyond the deadline: {took:?}");
    assert!(agentd.log().contains("did not stop its agents in time"), "{}", agentd.log());
    assert!(!agentd.log().lines().any(|l| l.contains("agent stopped") && l.contains(&ctr)));
    assert_gone(&agentd, &ctr, &[supervisor, agent]).await;
}

/// A hibernated (frozen) sandbox is thawed for its agents' grace, then killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hibernated_sandbox_is_thawed_so_its_agents_get_their_grace() {
    let agentd = Agentd::start_with(&[("AGENTD_STOP_GRACE_MS", "1500")]).await;
    let session = agentd.create_session(&["--on-sigterm", "exit"]).await;
    let ctr = session["container_id"].as_str().unwrap().to_string();
    let (supervisor, agent) = pids(&agentd, &ctr).await;
    let (status, body) = agentd.post(&format!("/v1/containers/{ctr}:hibernate"), &json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, c) = agentd.get(&format!("/v1/containers/{ctr}")).await;
    assert_eq!(c["usage"]["frozen"], true, "{c}");

    let started = Instant::now();
    let (status, body) = agentd.delete(&format!("/v1/containers/{ctr}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    let line = stop_line(&agentd.log(), &ctr);
    assert!(line.contains("SIGTERM received") && line.contains("killed=false") && line.contains("exit code 0"), "{line}");
    assert_gone(&agentd, &ctr, &[supervisor, agent]).await;
}

async fn post(http: &reqwest::Client, url: String, body: &Value) -> (StatusCode, Value) {
    let resp = http.post(url).json(body).send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `agentd node` stopping (SIGINT) stops its sandboxes as a delete does,
/// all at once: three agents that ignore SIGTERM cost one grace, not three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_shutdown_stops_every_sandbox_with_its_grace_concurrently() {
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut node = NodeProcess::start_with(dir.path(), &[("AGENTD_STOP_GRACE_MS", "1500")]).await;
    let mut server = ServerProcess::start(&dir.path().join("cp"), &node.socket, &[]).await;
    let http = server.http.clone();
    let mut pids = Vec::new();
    let mut containers = Vec::new();
    for _ in 0..3 {
        let (status, session) = post(&http, server.url("/v1/sessions"), &session_body(&["--on-sigterm", "ignore"])).await;
        assert_eq!(status, StatusCode::CREATED, "{session}");
        let ctr = session["container_id"].as_str().unwrap().to_string();
        let c: Value = http.get(server.url(&format!("/v1/containers/{ctr}"))).send().await.unwrap().json().await.unwrap();
        let supervisor = c["supervisor_pid"].as_u64().unwrap() as u32;
        pids.push(supervisor);
        pids.extend(procfs::children(supervisor));
        containers.push(ctr);
    }
    assert_eq!(pids.len(), 6);

    let started = Instant::now();
    node.daemon.interrupt();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500), "the agents had their grace: {took:?}");
    assert!(took < Duration::from_millis(4500), "concurrently, not one sandbox after another: {took:?}");
    let log = node.daemon.log();
    for ctr in &containers {
        let line = stop_line(&log, ctr);
        assert!(line.contains("SIGTERM received") && line.contains("killed=true"), "{line}");
    }
    for pid in &pids {
        wait_gone(*pid).await;
    }
    assert!(node.sandbox_dirs().is_empty(), "{:?}", node.sandbox_dirs());
    for ctr in &containers {
        assert!(crate::support::host::cgroup_dirs(ctr).is_empty(), "{ctr}");
    }
    server.daemon.interrupt();
}

/// `agentd up` on Ctrl-C: the control plane deletes its containers all at
/// once, each agent given its grace; nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_gives_every_agent_its_grace_at_once() {
    let mut agentd = Agentd::start_with(&[("AGENTD_STOP_GRACE_MS", "1500")]).await;
    let mut pids = Vec::new();
    for _ in 0..3 {
        let session = agentd.create_session(&["--on-sigterm", "ignore"]).await;
        let (supervisor, agent) = self::pids(&agentd, session["container_id"].as_str().unwrap()).await;
        pids.extend([supervisor, agent]);
    }
    let subtree = agentd.subtree.clone();
    let started = Instant::now();
    let exit = agentd.interrupt();
    let took = started.elapsed();
    assert!(exit.success(), "{exit}");
    assert!(took >= Duration::from_millis(1500), "the agents had their grace: {took:?}");
    assert!(took < Duration::from_millis(4500), "concurrently: {took:?}");
    assert_eq!(agentd.log().lines().filter(|l| l.contains("agent stopped") && l.contains("killed=true")).count(), 3, "{}", agentd.log());
    for pid in &pids {
        wait_gone(*pid).await;
    }
    wait_no_sandbox_cgroups(&subtree).await;
    assert!(sandbox_cgroups(&subtree).is_empty());
    assert!(agentd.sandbox_dirs().is_empty(), "{:?}", agentd.sandbox_dirs());
}
