//! Live restore benchmark: prints figures, asserts nothing.
//!
//! `./scripts/build-release && cargo bench --bench restore`
//!
//! How long `agentd node --live-restore` takes from its start to ready (its
//! socket answers `GetNodeInfo`, listing every sandbox it took back) when an
//! earlier node process, killed by SIGKILL, left 0 and then N sandboxes
//! running, each with an agent and a session (`BENCH_RESTORE`, default
//! "0,100"), over `BENCH_RESTARTS` restarts (default 3). The release
//! binaries in target/release are the ones measured.
//!
//! The bench process is a subreaper, so the sandboxes' PID 1s come back to
//! it when a node is killed; everything is deleted at the end.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentd_proto::node::node_client::NodeClient;
use agentd_proto::node::{AgentPlan, CreateSandboxRequest, CreateSessionRequest, DeleteSandboxRequest, GetNodeInfoRequest, Mount, SandboxPlan, StartAgentRequest, mount};
use common::{agentd_bin, env_usize, release_bin};
use tonic::transport::Channel;

/// `agentd node --live-restore` (`agentd`) on `state`, its log to /dev/null.
fn start_node(agentd: &Path, state: &Path, subtree: &str, max: usize) -> Child {
    Command::new(agentd)
        .args(["node", "--live-restore", "--state-dir"])
        .arg(state)
        .arg("--socket")
        .arg(state.join("node.sock"))
        .args(["--max-sandboxes", &max.to_string(), "--cgroup-subtree", subtree, "--log", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start agentd node")
}

/// Polls the node's socket until it answers with `n` sandboxes; returns the
/// client and how long that took from `t0`.
async fn ready(socket: &Path, n: usize, t0: Instant) -> (NodeClient<Channel>, Duration) {
    let deadline = t0 + Duration::from_secs(120);
    loop {
        if let Ok(channel) = agentd_proto::unix::connect(socket).await {
            let mut node = NodeClient::new(channel);
            if let Ok(info) = node.get_node_info(GetNodeInfoRequest {}).await
                && info.get_ref().sandboxes.len() == n
            {
                return (node, t0.elapsed());
            }
        }
        assert!(Instant::now() < deadline, "the node did not get ready");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A sandbox with the echo agent and one session in it.
async fn populate(node: &mut NodeClient<Channel>, i: usize) -> String {
    let echo = release_bin("echo-agent");
    let id = format!("restore-{i}");
    let plan = SandboxPlan {
        container_id: id.clone(),
        hostname: "bench".into(),
        workspace_path: "/workspace".into(),
        mounts: vec![Mount { source: echo.display().to_string(), target: "/opt/echo-agent".into(), read_only: true, role: mount::Role::Agent.into() }],
        ..Default::default()
    };
    node.create_sandbox(CreateSandboxRequest { plan: Some(plan), fence: None }).await.expect("create sandbox");
    let agent = AgentPlan { command: "/opt/echo-agent".into(), cwd: "/workspace".into(), ..Default::default() };
    let started = StartAgentRequest { container_id: id.clone(), agent_instance_id: format!("agi-{i}"), agent: Some(agent), reuse: false, fence: None };
    node.start_agent(started).await.expect("start agent");
    let session = CreateSessionRequest {
        container_id: id.clone(),
        agent_instance_id: format!("agi-{i}"),
        session_id: format!("ses-{i}"),
        cwd: "/workspace".into(),
        ..Default::default()
    };
    node.create_session(session).await.expect("create session");
    id
}

/// Reaps whatever came back to this process and has exited.
fn reap() {
    while let Ok(status) = nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
        if status == nix::sys::wait::WaitStatus::StillAlive {
            break;
        }
    }
}

async fn figures(agentd: &Path, n: usize, restarts: usize) {
    let state = tempfile::Builder::new().prefix("agentd-bench-restore-").tempdir().unwrap();
    let subtree = format!("agentd-bench-restore-{}-{n}", std::process::id());
    let socket = state.path().join("node.sock");
    let max = n.max(1);
    let mut child = start_node(agentd, state.path(), &subtree, max);
    let (mut node, _) = ready(&socket, 0, Instant::now()).await;
    let t0 = Instant::now();
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(populate(&mut node, i).await);
    }
    if n > 0 {
        println!("{n} sandboxes with an agent and a session each, made in {:.1} s", t0.elapsed().as_secs_f64());
    }
    let mut took = Vec::new();
    for _ in 0..restarts {
        drop(node);
        child.kill().unwrap();
        child.wait().unwrap();
        let t0 = Instant::now();
        child = start_node(agentd, state.path(), &subtree, max);
        let (again, elapsed) = ready(&socket, n, t0).await;
        node = again;
        took.push(elapsed);
    }
    took.sort();
    let ms = |d: &Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
    println!(
        "start -> ready, {n:>3} live sandboxes to take back: median {} ms (each: {} ms)",
        ms(&took[took.len() / 2]),
        took.iter().map(ms).collect::<Vec<_>>().join(", ")
    );
    for id in ids {
        node.delete_sandbox(DeleteSandboxRequest { container_id: id, fence: None }).await.expect("delete");
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT);
    child.wait().unwrap();
    reap();
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // Orphaned PID 1s come here, not to the host's init, and are reaped.
    nix::sys::prctl::set_child_subreaper(true).expect("subreaper");
    let counts: Vec<usize> = std::env::var("BENCH_RESTORE").unwrap_or_else(|_| "0,100".into()).split(',').filter_map(|n| n.trim().parse().ok()).collect();
    let restarts = env_usize("BENCH_RESTARTS", 3).max(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agentd = agentd_bin();
    rt.block_on(async {
        for n in counts {
            figures(&agentd, n, restarts).await;
        }
    });
}
