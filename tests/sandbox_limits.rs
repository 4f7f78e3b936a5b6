//! Container profiles through the API: cgroup limits, OOM reporting,
//! hibernate and resume, and invalid profiles.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::support::host::{cgroup_file, sandbox_cgroups, wait_no_cgroups};
use crate::support::{Agentd, procfs, session_body, turn, wait_gone};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_and_an_oom_kill_fails_the_turn_with_a_clear_reason() {
    let agentd = Agentd::start().await;
    let mut body = session_body(&["--hog-mib", "256"]);
    body["container_profile"] = json!({"memory": "48M", "pids": 64, "cpus": 0.5});
    let (status, session) = agentd.post("/v1/sessions", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let id = session["id"].as_str().unwrap();
    let container_id = session["container_id"].as_str().unwrap();

    let (_, container) = agentd.get(&format!("/v1/containers/{container_id}")).await;
    assert_eq!(container["usage"]["memory_max_bytes"], 48 << 20, "{container}");
    assert_eq!(container["usage"]["pids_max"], 64);
    let supervisor = container["supervisor_pid"].as_u64().unwrap() as u32;
    let agent = procfs::children(supervisor)[0];
    let cgroups = std::fs::read_to_string(format!("/proc/{agent}/cgroup")).unwrap();
    assert!(cgroups.lines().any(|l| l.contains("memory:") && l.ends_with(container_id)), "{cgroups}");

    let mut events = agentd.events(id, None).await;
    let (status, _) = agentd.prompt(id, "eat").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = events.until_run_end().await;
    let end = got.last().unwrap();
    assert_eq!(end.event, "run.failed", "{got:?}");
    let error = end.json()["error"].as_str().unwrap().to_string();
    assert!(error.contains("out of memory"), "{error}");
    if !got.iter().any(|e| e.event == "sandbox.oom") {
        loop {
            match events.next().await {
                Some(e) if e.event == "sandbox.oom" => break,
                Some(_) => {}
                None => panic!("the stream ended without a sandbox.oom event; the turn's events: {got:?}"),
            }
        }
    }
    let view = agentd.wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"][0]["state"] == "failed").await;
    assert!(view["runs"][0]["error"].as_str().unwrap().contains("out of memory"));

    let (status, _) = agentd.delete(&format!("/v1/containers/{container_id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_gone(supervisor).await;
    wait_no_cgroups(container_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernate_freezes_the_sandbox_and_resume_continues_the_turn() {
    let agentd = Agentd::start().await;
    let session = agentd.create_session(&["--delay-ms", "50"]).await;
    let id = session["id"].as_str().unwrap();
    let container_id = session["container_id"].as_str().unwrap();
    let mut events = agentd.events(id, None).await;
    let words: Vec<String> = (0..30).map(|i| format!("w{i}")).collect();
    let text = words.join(" ");
    let (status, _) = agentd.prompt(id, &text).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(events.next().await.unwrap().event, "run.started");
    let mut echoed = String::new();
    let first = events.next().await.unwrap();
    echoed.push_str(first.json()["update"]["content"]["text"].as_str().unwrap());

    let hibernate = format!("/v1/containers/{container_id}:hibernate");
    let (status, body) = agentd.post(&hibernate, &json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, container) = agentd.get(&format!("/v1/containers/{container_id}")).await;
    assert_eq!((container["state"].as_str(), container["usage"]["frozen"].as_bool()), (Some("hibernated"), Some(true)));
    let (status, body) = agentd.post(&hibernate, &json!({})).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("illegal_state")));

    // Frozen: nothing moves. Drain what was in flight, then expect silence.
    let quiet_from = Instant::now() + Duration::from_millis(300);
    let mut during_freeze = 0;
    while Instant::now() < quiet_from + Duration::from_millis(700) {
        match tokio::time::timeout(Duration::from_millis(100), events.next()).await {
            Ok(Some(e)) => {
                if Instant::now() > quiet_from {
                    during_freeze += 1;
                }
                echoed.push_str(e.json()["update"]["content"]["text"].as_str().unwrap_or(""));
            }
            Ok(None) => panic!("stream ended"),
            Err(_) => {}
        }
    }
    assert_eq!(during_freeze, 0, "events arrived while frozen");

    let (status, _) = agentd.post(&format!("/v1/containers/{container_id}:resume"), &json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let rest = events.until_run_end().await;
    for e in &rest[..rest.len() - 1] {
        echoed.push_str(e.json()["update"]["content"]["text"].as_str().unwrap());
    }
    assert_eq!(rest.last().unwrap().json()["stop_reason"], "end_turn");
    assert_eq!(echoed, text, "the agent's state survived the freeze");
    let (_, container) = agentd.get(&format!("/v1/containers/{container_id}")).await;
    assert_eq!(container["state"], "ready");
}

/// The host's memory (MemTotal) in bytes, as the node reads it.
fn host_memory_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap();
    kb * 1024
}

/// Every invalid profile gets 422 `invalid_profile` naming its field, and
/// nothing is created for it: no session or container row (the API refuses
/// what no host could take; the node, asked before any row is written,
/// what this host cannot), no sandbox directory, cgroup or process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_profiles_are_refused_before_anything_is_created() {
    let id_base = crate::support::host::unique_id_base();
    let agentd = Agentd::start_with(&[("AGENTD_ID_BASE", &id_base.to_string()), ("AGENTD_MAX_SANDBOXES", "8")]).await;
    let host_cpus = std::thread::available_parallelism().unwrap().get();
    let too_much_memory = host_memory_bytes() + (1 << 30);
    let not_a_dir = tempfile::NamedTempFile::new().unwrap();
    let cases = [
        // Refused by the API: wrong on any host.
        (json!({"memory": "1K"}), "memory"),
        (json!({"memory": 0}), "memory"),
        (json!({"memory": -5}), "memory"),
        (json!({"memory": 1.5}), "memory"),
        (json!({"memory": "lots"}), "memory"),
        (json!({"memory": "100000G"}), "memory"),
        (json!({"pids": 0}), "pids"),
        (json!({"pids": -1}), "pids"),
        (json!({"pids": 4_194_305}), "pids"),
        (json!({"cpus": 0}), "cpus"),
        (json!({"cpus": -1}), "cpus"),
        (json!({"cpus": 1e9}), "cpus"),
        (json!({"network": "bridge"}), "network"),
        (json!({"memroy": "1G"}), "memroy"),
        (json!({"rootfs": "relative"}), "rootfs"),
        (json!({"rootfs": "/srv/../etc"}), "rootfs"),
        (json!("not an object"), "container_profile"),
        // Refused by the node, which alone knows its memory, CPUs and disk.
        (json!({"memory": too_much_memory}), "memory"),
        (json!({"cpus": host_cpus as f64 + 1.0}), "cpus"),
        (json!({"rootfs": "/definitely/not/a/rootfs"}), "rootfs"),
        (json!({"rootfs": not_a_dir.path()}), "rootfs"),
    ];
    for (profile, field) in cases {
        let mut body = session_body(&[]);
        body["container_profile"] = profile.clone();
        let (status, problem) = agentd.post("/v1/sessions", &body).await;
        assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_profile")), "{profile}: {problem}");
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(field), "{profile}: the detail names {field}: {detail}");
    }
    let (_, list) = agentd.get("/v1/sessions").await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 0, "no session row: {list}");
    assert!(agentd.sandbox_dirs().is_empty(), "{:?}", agentd.sandbox_dirs());
    assert!(sandbox_cgroups(&agentd.subtree).is_empty(), "{:?}", sandbox_cgroups(&agentd.subtree));
    let ids = id_base..id_base + 8 * 65_536;
    assert!(crate::support::host::processes_with_uid(&ids).is_empty());
    assert!(!agentd.log().contains("sandbox created"), "{}", agentd.log());
    // The same node still builds a valid one.
    let mut body = session_body(&[]);
    body["container_profile"] = json!({"memory": "64M", "cpus": host_cpus as f64});
    let (status, session) = agentd.post("/v1/sessions", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
}

/// The limits reach the kernel as asked (the cgroup files, read on the host)
/// and the container's view reports live usage from those cgroups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_written_to_the_cgroups_and_usage_is_live() {
    let agentd = Agentd::start().await;
    let mut body = session_body(&["--repeat", "200"]);
    body["container_profile"] = json!({"memory": "64M", "pids": 48, "cpus": 0.5});
    let (id, mut events) = agentd.create_streaming(&body).await;
    let (_, session) = agentd.get(&format!("/v1/sessions/{id}")).await;
    let container_id = session["container_id"].as_str().unwrap().to_string();
    let path = format!("/v1/containers/{container_id}");
    let (_, container) = agentd.get(&path).await;
    let supervisor = container["supervisor_pid"].as_u64().unwrap() as u32;
    let agent = procfs::children(supervisor)[0];

    let memory = (64u64 << 20).to_string();
    for pid in [supervisor, agent] {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let ours = |l: &&str| l.starts_with("0::") || ["memory", "pids", "cpu", "cpuacct", "freezer"].iter().any(|c| l.split(':').nth(1).is_some_and(|cs| cs.split(',').any(|x| x == *c)));
        assert!(cgroups.lines().filter(ours).all(|l| l.ends_with(&container_id)), "{pid} is in the sandbox's cgroups: {cgroups}");
        let file = |controller: &str, name: &str| {
            cgroup_file(pid, controller, name).unwrap_or_else(|| panic!("no {name} for {pid}")).trim().to_string()
        };
        match cgroup_file(pid, "memory", "memory.limit_in_bytes") {
            // v1 (and hybrid): one hierarchy per controller.
            Some(limit) => {
                assert_eq!(limit.trim(), memory);
                if let Some(memsw) = cgroup_file(pid, "memory", "memory.memsw.limit_in_bytes") {
                    assert_eq!(memsw.trim(), memory, "no swap on top");
                }
                assert_eq!(file("pids", "pids.max"), "48");
                assert_eq!(file("cpu", "cpu.cfs_period_us"), "100000");
                assert_eq!(file("cpu", "cpu.cfs_quota_us"), "50000");
            }
            None => {
                assert_eq!(file("memory", "memory.max"), memory);
                if let Some(swap) = cgroup_file(pid, "memory", "memory.swap.max") {
                    assert_eq!(swap.trim(), "0", "no swap on top");
                }
                assert_eq!(file("pids", "pids.max"), "48");
                assert_eq!(file("cpu", "cpu.max"), "50000 100000");
            }
        }
    }

    let before = container["usage"].clone();
    assert_eq!(before["memory_max_bytes"], 64 << 20, "{container}");
    assert_eq!(before["pids_max"], 48, "{container}");
    turn(&agentd, &id, &mut events, "spend a little cpu time on echoing these words").await;
    let (_, container) = agentd.get(&path).await;
    let after = &container["usage"];
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("usage.{k} missing: {v}"));
    assert!(n(after, "memory_bytes") > 0 && n(after, "memory_bytes") <= 64 << 20, "{after}");
    assert!(n(after, "pids") >= 2, "the supervisor and the agent at least: {after}");
    assert!(n(after, "cpu_usage_usec") > n(&before, "cpu_usage_usec"), "the turn cost CPU time: {before} -> {after}");

    let (status, _) = agentd.delete(&path).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    wait_gone(supervisor).await;
    wait_gone(agent).await;
    wait_no_cgroups(&container_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_seccomp_policy_replaces_the_default_one() {
    let agentd = Agentd::start_with(&[("AGENTD_INITIALIZE_TIMEOUT_MS", "3000")]).await;
    let policy = |syscall: &str| {
        json!({"main": {"mismatch_action": "allow", "filter_action": {"errno": 1}, "filter": [{"syscall": syscall}]}})
    };
    // A policy that takes `write` away: the agent cannot even answer.
    let mut body = session_body(&[]);
    body["container_profile"] = json!({"seccomp": policy("write")});
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("agent_init_failed")), "{problem}");

    // A harmless one: the agent works, under it rather than the default.
    body["container_profile"] = json!({"seccomp": policy("acct")});
    let (status, session) = agentd.post("/v1/sessions", &body).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let (_, container) = agentd.get(&format!("/v1/containers/{}", session["container_id"].as_str().unwrap())).await;
    let agent = procfs::children(container["supervisor_pid"].as_u64().unwrap() as u32)[0];
    assert_eq!(procfs::status_field(agent, "Seccomp").as_deref(), Some("2"));

    body["container_profile"] = json!({"seccomp": {"main": {"filter": "nonsense"}}});
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_profile")), "{problem}");
}
