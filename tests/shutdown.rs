//! Ctrl-C stops everything: sandboxes, streams, the process itself.

use reqwest::StatusCode;

use crate::support::{Agentd, procfs, wait_gone};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_sandboxes_and_leaves_nothing_behind() {
    let mut agentd = Agentd::start().await;
    let a = agentd.create_session(&["--delay-ms", "200"]).await;
    let b = agentd.create_session(&[]).await;
    let mut supervisors = Vec::new();
    for s in [&a, &b] {
        let (_, c) = agentd.get(&format!("/v1/containers/{}", s["container_id"].as_str().unwrap())).await;
        supervisors.push(c["supervisor_pid"].as_u64().unwrap() as u32);
    }
    let agents: Vec<u32> = supervisors.iter().flat_map(|p| procfs::children(*p)).collect();
    assert_eq!(agents.len(), 2);

    let id = a["id"].as_str().unwrap();
    let mut events = agentd.events(id, None).await;
    let (status, _) = agentd.prompt(id, "one two three four five six seven eight nine ten").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(events.next().await.unwrap().event, "run.started");

    let exit = agentd.interrupt();
    assert!(exit.success(), "agentd exited with {exit}");
    for pid in supervisors.iter().chain(&agents) {
        wait_gone(*pid).await;
    }
    assert!(agentd.sandbox_dirs().is_empty(), "left: {:?}", agentd.sandbox_dirs());
    assert!(!procfs::mounts_mention(&agentd.state_dir().display().to_string()));
    // The stream ends rather than hanging.
    while events.next().await.is_some() {}
}
