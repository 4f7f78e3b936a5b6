//! Live restore (`--live-restore`): the daemon stops or crashes, its
//! sandboxes, agents and running turns do not; started again on the same
//! state directory it takes them back. A turn streaming through a SIGKILL
//! completes, its events numbered on without a gap or a repeat, for a
//! client that stayed (`agentd server`) and one that reconnects with
//! Last-Event-ID; what died meanwhile, or whose state is damaged, is
//! recorded lost and cleaned up, the rest taken back. Without live restore a
//! clean stop archives the sessions' histories (served after the restart).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::daemon::{NodeProcess, ServerProcess};
use crate::support::host::{become_subreaper, cgroup_dirs, processes_with_uid, reap_orphans, sandbox_cgroups, unique_id_base};
use crate::support::{Agentd, Sse, SseEvent, procfs, said, session_body, turn};

/// Waits until `pid` is gone, reaping it if it comes back to us.
async fn gone(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while procfs::exists(pid) {
        reap_orphans();
        assert!(Instant::now() < deadline, "{pid} still there: {:?}", procfs::status_field(pid, "State"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sandbox's PID 1 and its agent, by host pid.
async fn processes(http: &reqwest::Client, base: &str, container_id: &str) -> (u32, u32) {
    let c: Value = http.get(format!("{base}/v1/containers/{container_id}")).send().await.unwrap().json().await.unwrap();
    let supervisor = c["supervisor_pid"].as_u64().unwrap_or_else(|| panic!("{c}")) as u32;
    let agent = procfs::children(supervisor).first().copied().unwrap_or_else(|| panic!("no agent under {supervisor}"));
    (supervisor, agent)
}

/// A prompt long enough to be cut by a kill: one chunk per word, a delay
/// before each.
fn long_prompt(words: usize) -> String {
    (1..=words).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ")
}

/// Reads until `n` session updates came (after run.started).
async fn some_updates(events: &mut Sse, n: usize) -> Vec<SseEvent> {
    let mut seen = Vec::new();
    while seen.iter().filter(|e: &&SseEvent| e.event == "session.update").count() < n {
        seen.push(events.next().await.expect("the stream goes on"));
    }
    seen
}

/// The ids run 1, 2, 3... with no gap or repeat.
fn assert_consecutive(events: &[SseEvent]) {
    let ids: Vec<u64> = events.iter().map(|e| e.id.expect("every event has an id")).collect();
    let want: Vec<u64> = (1..=ids.len() as u64).collect();
    assert_eq!(ids, want, "{events:?}");
}

/// Waits until agentd's log has a line containing `needle`.
async fn logged(agentd: &Agentd, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agentd.log().contains(needle) {
        assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", agentd.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until GET `url` satisfies `check`.
async fn wait_for(http: &reqwest::Client, url: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
        if check(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "timed out on {url}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_streaming_through_a_sigkill_of_agentd_up_completes_after_the_restart() {
    become_subreaper();
    let id_base = unique_id_base();
    let flags = ["--live-restore", "--id-base", &id_base.to_string(), "--max-sandboxes", "4"];
    let mut agentd = Agentd::start_full(&flags, &[]).await;
    let session = agentd.create_session(&["--delay-ms", "120"]).await;
    let id = session["id"].as_str().unwrap().to_string();
    let ctr = session["container_id"].as_str().unwrap().to_string();
    let (supervisor, agent) = processes(&agentd.http, &agentd.base, &ctr).await;

    let prompt = long_prompt(30);
    let mut events = agentd.events(&id, None).await;
    let (status, answer) = agentd.prompt(&id, &prompt).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let mut seen = some_updates(&mut events, 3).await;
    assert_eq!(seen[0].event, "run.started");

    agentd.kill9();
    drop(events);
    assert!(procfs::is_alive(supervisor) && procfs::is_alive(agent), "the sandbox outlives agentd");
    // The turn goes on meanwhile: the agent's events pile up in its supervisor.
    tokio::time::sleep(Duration::from_millis(500)).await;

    agentd.restart(&flags, &[]).await;
    assert_eq!(processes(&agentd.http, &agentd.base, &ctr).await, (supervisor, agent), "the same PID 1 and agent, taken back");
    logged(&agentd, "turn taken up again").await;
    let log = agentd.log();
    assert!(log.contains("sandbox taken back after the node restarted"), "{log}");
    assert!(!log.contains("killing sandbox left by an earlier node"), "{log}");

    // The client reconnects with the last id it saw and gets the rest.
    let last = seen.last().unwrap().id.unwrap();
    let mut events = agentd.events(&id, Some(last)).await;
    seen.extend(events.until_run_end().await);
    assert_eq!(seen.last().unwrap().event, "run.completed", "{seen:?}");
    assert_consecutive(&seen);
    assert_eq!(said(&seen), prompt, "every chunk once, in order");

    // Another, from further back, gets exactly what it missed.
    let mut late = agentd.events(&id, Some(2)).await;
    let missed = late.until_run_end().await;
    let tail: Vec<(Option<u64>, String, String)> = seen[2..].iter().map(|e| (e.id, e.event.clone(), e.data.clone())).collect();
    assert_eq!(missed.into_iter().map(|e| (e.id, e.event, e.data)).collect::<Vec<_>>(), tail);
    let url = agentd.url(&format!("/v1/sessions/{id}"));
    wait_for(&agentd.http, &url, |s| s["runs"][0]["state"] == "completed").await;

    // A prompt after the restart works, numbered on.
    let after = turn(&agentd, &id, &mut events, "after the restart").await;
    assert_eq!(said(&after), "after the restart");
    assert_eq!(after[0].id, Some(seen.len() as u64 + 1));

    // Deleted through the restarted node: nothing is left.
    let (status, _) = agentd.delete(&format!("/v1/containers/{ctr}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    gone(supervisor).await;
    gone(agent).await;
    let exit = agentd.interrupt();
    assert!(exit.success(), "{exit}");
    reap_orphans();
    assert!(cgroup_dirs(&agentd.subtree).is_empty(), "{:?}", cgroup_dirs(&agentd.subtree));
    assert!(processes_with_uid(&(id_base..id_base + 4 * 65_536)).is_empty());
    assert!(agentd.sandbox_dirs().is_empty());
}

/// Ctrl-C with live restore is a stop that leaves everything running: the
/// store still calls the container ready, and the turn completes once
/// agentd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_with_live_restore_leaves_the_turn_running() {
    become_subreaper();
    let id_base = unique_id_base();
    let flags = ["--live-restore", "--id-base", &id_base.to_string(), "--max-sandboxes", "4"];
    let mut agentd = Agentd::start_full(&flags, &[]).await;
    let session = agentd.create_session(&["--delay-ms", "120"]).await;
    let id = session["id"].as_str().unwrap().to_string();
    let ctr = session["container_id"].as_str().unwrap().to_string();
    let (supervisor, agent) = processes(&agentd.http, &agentd.base, &ctr).await;
    let prompt = long_prompt(20);
    let mut events = agentd.events(&id, None).await;
    assert_eq!(agentd.prompt(&id, &prompt).await.0, StatusCode::ACCEPTED);
    let mut seen = some_updates(&mut events, 2).await;

    assert!(agentd.interrupt().success());
    // The stream ends with agentd, without a run end.
    while let Some(e) = events.next().await {
        assert!(e.event != "run.completed" && e.event != "run.failed", "{e:?}");
        seen.push(e);
    }
    assert!(procfs::is_alive(supervisor) && procfs::is_alive(agent), "left running");
    assert!(agentd.log().contains("its sandboxes run on (live restore)"), "{}", agentd.log());

    agentd.restart(&flags, &[]).await;
    let (_, c) = agentd.get(&format!("/v1/containers/{ctr}")).await;
    assert_eq!(c["state"], "ready", "{c}");
    let mut events = agentd.events(&id, Some(seen.last().unwrap().id.unwrap())).await;
    seen.extend(events.until_run_end().await);
    assert_eq!(seen.last().unwrap().event, "run.completed", "{seen:?}");
    assert_consecutive(&seen);
    assert_eq!(said(&seen), prompt);

    let (status, _) = agentd.delete(&format!("/v1/containers/{ctr}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    gone(supervisor).await;
    gone(agent).await;
    assert!(agentd.interrupt().success());
    reap_orphans();
    assert!(cgroup_dirs(&agentd.subtree).is_empty(), "{:?}", cgroup_dirs(&agentd.subtree));
    assert!(processes_with_uid(&(id_base..id_base + 4 * 65_536)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_streaming_through_a_sigkill_of_agentd_node_reaches_the_client_that_stayed() {
    become_subreaper();
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let live = [("AGENTD_LIVE_RESTORE", "true")];
    let mut node = NodeProcess::start_with(dir.path(), &live).await;
    let server = ServerProcess::start(&dir.path().join("cp"), &node.socket, &[]).await;
    let http = server.http.clone();
    let resp = http.post(server.url("/v1/sessions")).json(&session_body(&["--delay-ms", "120"])).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let session: Value = resp.json().await.unwrap();
    let id = session["id"].as_str().unwrap().to_string();
    let ctr = session["container_id"].as_str().unwrap().to_string();
    let (supervisor, agent) = processes(&http, &server.base, &ctr).await;

    // The client's stream goes through the server, which stays up.
    let resp = http.get(server.url(&format!("/v1/sessions/{id}/events"))).send().await.unwrap();
    let mut events = Sse::from_response(resp);
    let prompt = long_prompt(30);
    let resp = http.post(server.url(&format!("/v1/sessions/{id}:prompt"))).json(&json!({"prompt": prompt})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let mut seen = some_updates(&mut events, 3).await;

    node.daemon.kill9();
    assert!(procfs::is_alive(supervisor) && procfs::is_alive(agent));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let node = NodeProcess::start_with(dir.path(), &live).await;
    node.daemon.wait_for_line("turn taken up again").await;

    // The same stream, waiting for the node meanwhile, goes on.
    seen.extend(events.until_run_end().await);
    assert_eq!(seen.last().unwrap().event, "run.completed", "{seen:?}");
    assert_consecutive(&seen);
    assert_eq!(said(&seen), prompt);
    assert_eq!(processes(&http, &server.base, &ctr).await, (supervisor, agent));

    // The node was not given up: back well within the heartbeat timeout.
    let nodes: Value = http.get(server.url("/v1/nodes")).send().await.unwrap().json().await.unwrap();
    assert!(nodes["nodes"].as_array().unwrap().iter().all(|n| n["state"] != "lost"), "{nodes}");
    let s = wait_for(&http, &server.url(&format!("/v1/sessions/{id}")), |s| s["runs"][0]["state"] == "completed").await;
    assert_eq!(s["state"], "ready", "{s}");

    // A reconnecting client gets exactly what it missed.
    let resp = http.get(server.url(&format!("/v1/sessions/{id}/events"))).header("Last-Event-ID", "4").send().await.unwrap();
    let mut late = Sse::from_response(resp);
    let missed = late.until_run_end().await;
    assert_eq!(missed.iter().map(|e| e.id).collect::<Vec<_>>(), seen[4..].iter().map(|e| e.id).collect::<Vec<_>>());

    // And the next prompt runs.
    let resp = http.post(server.url(&format!("/v1/sessions/{id}:prompt"))).json(&json!({"prompt": "again"})).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let next = events.until_run_end().await;
    assert_eq!((said(&next).as_str(), next.last().unwrap().event.as_str()), ("again", "run.completed"));

    let resp = http.delete(server.url(&format!("/v1/containers/{ctr}"))).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    gone(supervisor).await;
    gone(agent).await;
    drop(server);
    drop(node);
    reap_orphans();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_lost_while_agentd_was_away_are_recorded_and_cleaned_the_rest_taken_back() {
    become_subreaper();
    let id_base = unique_id_base();
    let flags = ["--live-restore", "--id-base", &id_base.to_string(), "--max-sandboxes", "4"];
    let mut agentd = Agentd::start_full(&flags, &[]).await;
    let mut made = Vec::new();
    for _ in 0..3 {
        let s = agentd.create_session(&["--delay-ms", "200"]).await;
        let (id, ctr) = (s["id"].as_str().unwrap().to_string(), s["container_id"].as_str().unwrap().to_string());
        let pids = processes(&agentd.http, &agentd.base, &ctr).await;
        made.push((id, ctr, pids));
    }
    let [(dead_id, dead_ctr, (dead_pid1, dead_agent)), (bad_id, bad_ctr, (bad_pid1, bad_agent)), (ok_id, ok_ctr, ok_pids)] = made.try_into().unwrap();
    // The sandbox that dies has a turn running.
    let (status, _) = agentd.prompt(&dead_id, &long_prompt(40)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    agentd.wait_for(&format!("/v1/sessions/{dead_id}"), |s| s["runs"][0]["state"] == "streaming").await;

    agentd.kill9();
    // While agentd is away: one sandbox's PID 1 dies, another's record is
    // cut in half as a crash mid-write would (were it not written atomically).
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(dead_pid1 as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    gone(dead_pid1).await;
    let record = agentd.sandboxes_dir().join(&bad_ctr).join("sandbox.json");
    let text = std::fs::read(&record).unwrap();
    std::fs::write(&record, &text[..text.len() / 2]).unwrap();

    agentd.restart(&flags, &[]).await;
    // The dead one: recorded lost, its turn failed, its leftovers gone.
    let s = agentd.wait_for(&format!("/v1/sessions/{dead_id}"), |s| s["state"] == "failed").await;
    // Its reason is the node's journal's, or the control plane's own when
    // its check at start comes first; the node's log says it either way.
    assert_eq!(s["error_code"], "sandbox_lost", "{s}");
    assert_eq!((s["runs"][0]["state"].as_str(), s["runs"][0]["error_code"].as_str()), (Some("failed"), Some("sandbox_lost")), "{s}");
    gone(dead_agent).await;
    // The damaged one: reported and cleaned, its processes killed.
    let s = agentd.wait_for(&format!("/v1/sessions/{bad_id}"), |s| s["state"] == "failed").await;
    assert_eq!(s["error_code"], "sandbox_lost", "{s}");
    gone(bad_pid1).await;
    gone(bad_agent).await;
    for ctr in [&dead_ctr, &bad_ctr] {
        assert!(!agentd.sandbox_dirs().contains(ctr), "{:?}", agentd.sandbox_dirs());
        assert!(cgroup_dirs(ctr).is_empty(), "{ctr}: {:?}", cgroup_dirs(ctr));
    }
    let log = agentd.log();
    for (ctr, why) in [(&dead_ctr, "exited while the node was away"), (&bad_ctr, "could not be read")] {
        assert!(log.lines().any(|l| l.contains("lost") && l.contains(why) && l.contains(ctr.as_str())), "{ctr}: {log}");
    }
    // The healthy one: taken back, and it works.
    assert_eq!(processes(&agentd.http, &agentd.base, &ok_ctr).await, ok_pids);
    let mut events = agentd.events(&ok_id, None).await;
    let done = turn(&agentd, &ok_id, &mut events, "still here").await;
    assert_eq!(said(&done), "still here");

    // Restarted without live restore, agentd stops it as before.
    assert!(agentd.interrupt().success());
    let left = sandbox_cgroups(&agentd.subtree);
    assert!(!left.is_empty() && left.iter().all(|p| p.ends_with(&ok_ctr)), "left running by the stop: {left:?}");
    agentd.restart(&["--id-base", &id_base.to_string(), "--max-sandboxes", "4"], &[]).await;
    gone(ok_pids.0).await;
    gone(ok_pids.1).await;
    assert!(agentd.log().contains("killing sandbox left by an earlier node"), "{}", agentd.log());
    assert!(agentd.interrupt().success());
    reap_orphans();
    assert!(cgroup_dirs(&agentd.subtree).is_empty(), "{:?}", cgroup_dirs(&agentd.subtree));
    assert!(processes_with_uid(&(id_base..id_base + 4 * 65_536)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_without_live_restore_archives_the_sessions_history() {
    let mut agentd = Agentd::start().await;
    let (id, mut events) = agentd.create_streaming(&session_body(&[])).await;
    let live: Vec<(Option<u64>, String, String)> =
        turn(&agentd, &id, &mut events, "keep me").await.into_iter().map(|e| (e.id, e.event, e.data)).collect();
    assert!(agentd.interrupt().success());
    assert!(agentd.earlier_log().is_empty() && agentd.log().contains("session archived"), "{}", agentd.log());

    agentd.restart(&[], &[]).await;
    let (_, s) = agentd.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(s["state"], "closed", "{s}");
    let mut replay = agentd.events(&id, None).await;
    let mut got = Vec::new();
    while let Some(e) = replay.next().await {
        got.push((e.id, e.event, e.data));
    }
    assert_eq!(got, live, "the history, served from the archive");
}
