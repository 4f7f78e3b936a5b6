//! The node's sandboxes from the host's side: a create that fails at any
//! stage undoes everything; a node killed by SIGKILL cleans what it left when
//! it starts again; each sandbox runs under its own host id range.

use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::Value;

use crate::support::daemon::{NodeProcess, ServerProcess};
use crate::support::host::{cgroup_dirs, processes_with_uid, sandbox_cgroups, uids, unique_id_base, wait_no_cgroups, zombie_children};
use crate::support::{Agentd, procfs, session_body, turn, wait_gone};

/// Node stages first, then sandbox-init's, in the order a create meets them.
const STAGES: &[&str] = &["prepare", "join-cgroup", "mount", "clone", "id-map", "pivot-root", "connect"];

/// A create that fails at each stage (the node's own, and sandbox-init's in
/// the zygote's worker) answers a clear problem naming the stage and leaves
/// nothing: no state directory, no cgroup in any hierarchy under the node's
/// subtree, no mount, no process under the sandbox's host ids, no zombie; its
/// id slot is free again (the next sandbox gets the first range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_failing_at_any_stage_leaves_nothing_behind() {
    let id_base = unique_id_base();
    let failures = STAGES.join(",");
    let agentd = Agentd::start_with(&[
        ("AGENTD_TEST_FAIL_CREATE", &failures),
        ("AGENTD_ID_BASE", &id_base.to_string()),
        ("AGENTD_MAX_SANDBOXES", "4"),
    ])
    .await;
    let ids = id_base..id_base + 4 * 65_536;
    for stage in STAGES {
        let (status, problem) = agentd.post("/v1/sessions", &session_body(&[])).await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("sandbox_failed")), "{stage}: {problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(&format!("at {stage}: injected failure")), "{stage}: {detail}");

        assert!(agentd.sandbox_dirs().is_empty(), "{stage}: {:?}", agentd.sandbox_dirs());
        let cgroups = sandbox_cgroups(&agentd.subtree);
        assert!(cgroups.is_empty(), "{stage}: {cgroups:?}");
        assert!(!procfs::mounts_mention(&agentd.state_dir().display().to_string()), "{stage}");
        let left = processes_with_uid(&ids);
        assert!(left.is_empty(), "{stage}: processes under the sandbox's ids: {left:?}");
        let zombies = zombie_children(agentd.pid());
        assert!(zombies.is_empty(), "{stage}: zombies {zombies:?}");
    }
    let log = agentd.log();
    assert_eq!(log.matches("sandbox create failed; undoing it").count(), STAGES.len(), "{log}");
    assert!(!log.contains("stays reserved"), "{log}");
    let (_, list) = agentd.get("/v1/sessions").await;
    for s in list["sessions"].as_array().unwrap() {
        assert_eq!(s["state"], "failed", "{s}");
    }

    // Past the list, creates work, and every slot came back: the first range.
    let session = agentd.create_session(&[]).await;
    let (_, c) = agentd.get(&format!("/v1/containers/{}", session["container_id"].as_str().unwrap())).await;
    let supervisor = c["supervisor_pid"].as_u64().unwrap() as u32;
    assert_eq!(uids(supervisor), vec![id_base; 4], "slot 0 again");
}

/// Reaps `pid`, a child of this (subreaper) test process, once it has exited.
async fn reap(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => return,
            Err(e) => panic!("{pid} is not ours to reap: {e}"),
        }
        assert!(Instant::now() < deadline, "{pid} still runs: {:?}", procfs::status_field(pid, "State"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get(http: &reqwest::Client, url: String) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// `agentd node` killed by SIGKILL leaves its sandboxes running (PID 1
/// re-parented, cgroups and state in place); started again on the same
/// state directory and subtree, it kills them, removes their cgroups and
/// directories, and serves new sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_by_sigkill_cleans_up_after_itself_when_restarted() {
    // The orphaned PID 1 (and the old zygote) come to this process, which
    // reaps them, rather than to the host's init, which may not.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut node = NodeProcess::start(dir.path()).await;
    let mut server = ServerProcess::start(&dir.path().join("cp"), &node.socket, &[]).await;
    let http = server.http.clone();
    let resp = http.post(server.url("/v1/sessions")).json(&session_body(&[])).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let session: Value = resp.json().await.unwrap();
    let ctr = session["container_id"].as_str().unwrap().to_string();
    let c = get(&http, server.url(&format!("/v1/containers/{ctr}"))).await;
    let supervisor = c["supervisor_pid"].as_u64().unwrap() as u32;
    let agent = procfs::children(supervisor)[0];

    node.daemon.kill9();
    assert!(procfs::is_alive(supervisor) && procfs::is_alive(agent), "the sandbox outlives its node");
    assert_eq!(procfs::status_field(supervisor, "PPid").unwrap(), std::process::id().to_string(), "re-parented to us");
    assert!(!cgroup_dirs(&ctr).is_empty(), "its cgroups remain");
    assert_eq!(node.sandbox_dirs(), vec![ctr.clone()]);

    let node = NodeProcess::start(dir.path()).await;
    reap(supervisor).await;
    wait_gone(agent).await;
    wait_no_cgroups(&ctr).await;
    assert!(node.sandbox_dirs().is_empty(), "{:?}", node.sandbox_dirs());
    let log = node.daemon.log();
    assert!(log.contains("killing sandbox left by an earlier node") && log.contains(&ctr), "{log}");
    assert!(log.contains("removed leftover sandbox cgroup"), "{log}");

    // A new session works on the restarted node.
    let resp = http.post(server.url("/v1/sessions")).json(&session_body(&[])).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let session: Value = resp.json().await.unwrap();
    let id = session["id"].as_str().unwrap();
    let prompt = http.post(server.url(&format!("/v1/sessions/{id}:prompt"))).json(&serde_json::json!({"prompt": "still here"})).send().await.unwrap();
    assert_eq!(prompt.status(), StatusCode::ACCEPTED);
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&http, server.url(&format!("/v1/sessions/{id}"))).await["runs"][0]["state"] != "completed" {
        assert!(Instant::now() < deadline, "the turn did not complete");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut node = node;
    server.daemon.interrupt();
    node.daemon.interrupt();
    // The first node's zygote, orphaned with it, exited on its closed stdin.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for zombie in zombie_children(std::process::id()) {
            reap(zombie).await;
        }
        let children = procfs::children(std::process::id());
        let strays: Vec<u32> = children.iter().copied().filter(|p| procfs::status_field(*p, "Name").is_some_and(|n| n.starts_with("agentd"))).collect();
        if strays.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left running: {strays:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Each sandbox's root maps to its own host range, id_base + slot *
/// id_range_size (the `--id-base` and `--id-range-size` flags), so two live
/// sandboxes never share a host uid; a deleted sandbox's range is given
/// again once nothing of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sandbox_gets_its_own_host_id_range() {
    let id_base = unique_id_base();
    let size = 100_000;
    let agentd = Agentd::start_full(&["--id-base", &id_base.to_string(), "--id-range-size", &size.to_string(), "--max-sandboxes", "4"], &[]).await;
    let mut sandboxes = Vec::new();
    for _ in 0..2 {
        let (id, mut events) = agentd.create_streaming(&session_body(&[])).await;
        turn(&agentd, &id, &mut events, "who am i").await;
        let (_, s) = agentd.get(&format!("/v1/sessions/{id}")).await;
        let ctr = s["container_id"].as_str().unwrap().to_string();
        let (_, c) = agentd.get(&format!("/v1/containers/{ctr}")).await;
        let supervisor = c["supervisor_pid"].as_u64().unwrap() as u32;
        let agent = procfs::children(supervisor)[0];
        sandboxes.push((ctr, supervisor, agent));
    }
    let mut bases = Vec::new();
    for (ctr, supervisor, agent) in &sandboxes {
        let base = uids(*supervisor)[0];
        assert_eq!(uids(*supervisor), vec![base; 4], "{ctr}: root inside is one host uid");
        assert_eq!(uids(*agent), vec![base; 4], "{ctr}: its agent too");
        assert_eq!(procfs::status_field(*agent, "Gid").unwrap().split_whitespace().collect::<Vec<_>>(), vec![base.to_string(); 4]);
        let map = std::fs::read_to_string(format!("/proc/{supervisor}/uid_map")).unwrap();
        assert_eq!(map.split_whitespace().collect::<Vec<_>>(), ["0", &base.to_string(), &size.to_string()], "{ctr}");
        bases.push(base);
    }
    bases.sort();
    assert_eq!(bases, [id_base, id_base + size], "slots 0 and 1, different host ids");

    // The first range comes back once its sandbox is wholly gone.
    let (first, supervisor, agent) = &sandboxes.iter().find(|s| uids(s.1)[0] == id_base).unwrap().clone();
    let (status, _) = agentd.delete(&format!("/v1/containers/{first}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_gone(*supervisor).await;
    wait_gone(*agent).await;
    wait_no_cgroups(first).await;
    // The slot is freed by the same task that removed the cgroups, a moment after.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let session = agentd.create_session(&[]).await;
    let (_, c) = agentd.get(&format!("/v1/containers/{}", session["container_id"].as_str().unwrap())).await;
    assert_eq!(uids(c["supervisor_pid"].as_u64().unwrap() as u32)[0], id_base);
}

/// The zygote's worker waiting in the spare cgroups, if there is one (v1
/// hierarchies only): a child of the zygote, which is agentd's child.
async fn parked_worker(agentd: &Agentd) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let zygotes: Vec<u32> = procfs::children(agentd.pid())
            .into_iter()
            .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.windows(8).any(|w| w == b"--zygote")))
            .collect();
        if let Some(worker) = zygotes.iter().flat_map(|z| procfs::children(*z)).next() {
            return Some(worker);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// On v1 hierarchies a sandbox's cgroups are the spare renamed, with a
/// worker of the zygote waiting in them (its PID 1 is then born there, and
/// no create waits for the kernel's cgroup move). With that worker gone, a
/// create still builds the sandbox, moving PID 1 in, limits and all; the next
/// one has a worker again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_without_its_parked_worker_still_gets_its_cgroups() {
    let agentd = Agentd::start().await;
    let Some(worker) = parked_worker(&agentd).await else {
        assert!(!std::path::Path::new("/sys/fs/cgroup/memory").exists(), "v1 hierarchies but no parked worker");
        eprintln!("SKIPPED: no v1 hierarchy, no spare (pure cgroup v2 host)");
        return;
    };
    nix::sys::signal::kill(Pid::from_raw(worker as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    for round in ["without the parked worker", "with a new one"] {
        let mut body = session_body(&[]);
        body["container_profile"] = serde_json::json!({"memory": "48M", "pids": 32});
        let (status, session) = agentd.post("/v1/sessions", &body).await;
        assert_eq!(status, StatusCode::CREATED, "{round}: {session}");
        let container_id = session["container_id"].as_str().unwrap();
        let (_, container) = agentd.get(&format!("/v1/containers/{container_id}")).await;
        let supervisor = container["supervisor_pid"].as_u64().unwrap() as u32;
        let cgroups = std::fs::read_to_string(format!("/proc/{supervisor}/cgroup")).unwrap();
        for controller in ["memory", "pids", "freezer"] {
            assert!(
                cgroups.lines().any(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == controller)) && l.ends_with(container_id)),
                "{round}: PID 1 not in its {controller} cgroup: {cgroups}"
            );
        }
        let limit = crate::support::host::cgroup_file(supervisor, "memory", "memory.limit_in_bytes").unwrap();
        assert_eq!(limit.trim(), (48u64 << 20).to_string(), "{round}");
        let pids = crate::support::host::cgroup_file(supervisor, "pids", "pids.max").unwrap();
        assert_eq!(pids.trim(), "32", "{round}");
        if round == "without the parked worker" {
            assert!(agentd.log().contains("no parked worker; moving PID 1 into its cgroups"), "{}", agentd.log());
            assert!(parked_worker(&agentd).await.is_some(), "a worker is parked again after the create");
        }
    }
}
