//! Sandbox benchmark: prints figures, asserts nothing.
//!
//! `./scripts/build-release && cargo bench --bench sandbox` (the script
//! builds `agentd` as shipped: the dense `sandbox` profile, linked statically)
//!
//! - create -> supervisor ready (CreateSandbox answered and a Status call
//!   answered), create -> first exec (an ACP agent started and initialized),
//!   and teardown, p50/p99 over RUNS sandboxes;
//! - supervisor RSS of idle sandboxes;
//! - IDLE idle sandboxes held at once, and host memory per sandbox;
//! - `agentd sandbox run -- true` against `bwrap --unshare-all ... true`
//!   (Debian's bubblewrap: the invocation, which fails for want of a
//!   root to find `true` in, the cheapest one that runs, and one with the
//!   mounts a sandbox has), as whole processes, interleaved in the same run.
//!
//! The p99 of create -> ready depends on the kernel (a cgroup migration may
//! wait for an RCU grace period): the settings that matter are printed first.
//!
//! Environment: BENCH_RUNS (default 200), BENCH_IDLE (default 500),
//! BENCH_ZYGOTE (default: `agentd`; another binary's name under
//! target/release, e.g. `agentd-daemon`, which runs the same code, makes it
//! the zygote, to compare in the same conditions).

mod common;

use common::{agentd_bin, env_usize, release_bin};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_node::{Node, NodeConfig};
use agentd_proto::node::SandboxPlan;
use agentd_proto::supervisor::{StartAgentRequest, StatusRequest};


fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    println!(
        "{name:<34} n={:<4} p50={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        samples.len(),
        p50.as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3
    );
    p50
}

fn plan(id: &str) -> SandboxPlan {
    SandboxPlan { container_id: id.into(), hostname: "bench".into(), workspace_path: "/workspace".into(), ..Default::default() }
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").parse().unwrap_or(0))))
        .unwrap_or(0)
}

/// A field of /proc/PID/smaps_rollup, in KiB.
fn rollup_kib(pid: i32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(|v| v.trim().trim_end_matches(" kB").parse().unwrap_or(0))))
        .unwrap_or(0)
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:").map(|v| v.trim().trim_end_matches(" kB").parse().unwrap()))
        .unwrap()
}

async fn node_figures(node: &Arc<Node>, runs: usize, idle: usize) {
    let echo = release_bin("echo-agent");
    let (mut ready, mut exec, mut teardown) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let id = format!("bench-{i}");
        let mut p = plan(&id);
        p.mounts.push(agentd_proto::node::Mount {
            source: echo.display().to_string(),
            target: "/opt/echo-agent".into(),
            read_only: true,
            role: agentd_proto::node::mount::Role::Agent.into(),
        });
        let t0 = Instant::now();
        let sandbox = node.sandboxes.create(p).await.expect("create");
        let mut sup = sandbox.supervisor.clone();
        sup.status(StatusRequest {}).await.expect("status");
        ready.push(t0.elapsed());
        sup.start_agent(StartAgentRequest {
            agent_instance_id: "a".into(),
            command: "/opt/echo-agent".into(),
            cwd: "/workspace".into(),
            ..Default::default()
        })
        .await
        .expect("start agent");
        exec.push(t0.elapsed());
        let t1 = Instant::now();
        node.delete_sandbox(&id).await;
        teardown.push(t1.elapsed());
    }
    report("create -> supervisor ready", ready);
    report("create -> agent exec'd + initialized", exec);
    report("teardown (kill, reap, rm state)", teardown);

    let before = mem_available_kib();
    let t0 = Instant::now();
    let mut held = 0;
    for i in 0..idle {
        match node.sandboxes.create(plan(&format!("idle-{i}"))).await {
            Ok(_) => held += 1,
            Err(e) => {
                println!("idle sandbox {i} failed: {}", e.message());
                break;
            }
        }
    }
    let elapsed = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = mem_available_kib();
    let pids: Vec<i32> = node.sandboxes.list().iter().map(|s| s.pid).collect();
    let mut rss: Vec<u64> = pids.iter().map(|&pid| rss_kib(pid)).collect();
    rss.sort();
    // RSS counts every page mapped, the code shared by all supervisors (and
    // the zygote) included; PSS splits shared pages among their users, and
    // private dirty pages are what one supervisor alone holds.
    let median = |field: &str| {
        let mut v: Vec<u64> = pids.iter().map(|&pid| rollup_kib(pid, field)).collect();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let (pss, private, anon) = (median("Pss"), median("Private_Dirty"), median("Anonymous"));
    println!(
        "idle sandboxes held: {held}/{idle} (created in {:.1} s); host memory per sandbox: {:.0} KiB (MemAvailable delta)",
        elapsed.as_secs_f64(),
        before.saturating_sub(after) as f64 / held.max(1) as f64
    );
    if !rss.is_empty() {
        println!("supervisor RSS: p50 {} KiB, max {} KiB", rss[rss.len() / 2], rss[rss.len() - 1]);
        println!("supervisor PSS p50 {pss} KiB, private dirty p50 {private} KiB, anonymous p50 {anon} KiB");
    }
    let t0 = Instant::now();
    node.stop_all().await;
    println!("stopped {held} sandboxes in {:.1} s", t0.elapsed().as_secs_f64());
}

/// The bwrap invocations compared against, each with whether it succeeds:
/// the (which cannot find `true`: its root is empty, so it fails
/// after building the sandbox), the cheapest one that runs `true`, and one
/// with the mounts a sandbox has (the host's /usr with merged-/usr symlinks,
/// /proc, /dev, /tmp).
const BWRAP: &[(&str, bool, &[&str])] = &[
    ("bwrap --unshare-all true (fails)", false, &["--unshare-all", "true"]),
    ("bwrap --unshare-all --ro-bind / / true", true, &["--unshare-all", "--ro-bind", "/", "/", "true"]),
    (
        "bwrap --unshare-all (/usr /proc /dev /tmp)",
        true,
        &[
            "--unshare-all", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "/bin/true",
        ],
    ),
];

fn whole_process_figures(runs: usize) {
    let time = |cmd: &mut Command, succeeds: bool| {
        let t0 = Instant::now();
        let status = cmd.stderr(std::process::Stdio::null()).status().expect("run");
        assert_eq!(status.success(), succeeds, "{cmd:?}: {status}");
        t0.elapsed()
    };
    let have_bwrap = Command::new("bwrap").arg("--version").output().is_ok();
    // The second row adds the cgroups that limits need (an agent sandbox
    // always has them): their mkdir in every hierarchy, the move and rmdir.
    let agentd = agentd_bin();
    let mut ours: Vec<(&str, bool, Command, Vec<Duration>)> = Vec::new();
    for (name, flags) in [
        ("agentd sandbox run -- true", &[][..]),
        ("agentd sandbox run --memory 256M --pids 64 -- true", &["--memory", "256M", "--pids", "64"][..]),
    ] {
        let mut cmd = Command::new(&agentd);
        cmd.args(["sandbox", "run"]).args(flags).args(["--", "true"]);
        ours.push((name, true, cmd, Vec::new()));
    }
    let mut theirs: Vec<(&str, bool, Command, Vec<Duration>)> = Vec::new();
    if have_bwrap {
        for (name, succeeds, args) in BWRAP {
            let mut cmd = Command::new("bwrap");
            cmd.args(*args);
            theirs.push((name, *succeeds, cmd, Vec::new()));
        }
    }
    // Interleaved, so that a noisy neighbour hurts every row alike.
    for _ in 0..runs {
        for (_, succeeds, cmd, samples) in ours.iter_mut().chain(theirs.iter_mut()) {
            samples.push(time(cmd, *succeeds));
        }
    }
    let ours: Vec<_> = ours.into_iter().map(|(name, _, _, samples)| (name, report(name, samples))).collect();
    if !have_bwrap {
        println!("bwrap not installed (apt-get install bubblewrap): no comparison");
        return;
    }
    let theirs: Vec<_> = theirs.into_iter().map(|(name, _, _, samples)| (name, report(name, samples))).collect();
    for (a_name, a) in &ours {
        for (b_name, b) in &theirs {
            println!("ratio {a_name} / {b_name} (p50): {:.2}", a.as_secs_f64() / b.as_secs_f64());
        }
    }
}

/// What sets the p99 of create -> ready on a host: the one cgroup migration
/// of a create waits for an RCU grace period whenever no migration happened
/// for a while, unless a cgroup hierarchy is mounted with `favordynmods` or
/// grace periods are expedited (see HACKING.md).
fn kernel_settings() -> String {
    let favordynmods = std::fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.contains(" cgroup") && l.split_whitespace().nth(3).is_some_and(|o| o.split(',').any(|o| o == "favordynmods"))))
        .unwrap_or(false);
    let expedited = std::fs::read_to_string("/sys/kernel/rcu_expedited").map(|s| s.trim().to_string()).unwrap_or_else(|_| "?".into());
    format!("cgroup favordynmods: {}, rcu_expedited: {expedited}", if favordynmods { "on" } else { "off" })
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!("{}", kernel_settings());
    let runs = env_usize("BENCH_RUNS", 200);
    let idle = env_usize("BENCH_IDLE", 500);
    let state = tempfile::Builder::new().prefix("agentd-bench-").tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // BENCH_ZYGOTE=agentd-daemon makes the big binary the zygote, to
        // compare the two in the same conditions.
        let zygote = match std::env::var("BENCH_ZYGOTE") {
            Ok(name) => release_bin(&name),
            Err(_) => agentd_bin(),
        };
        let size = std::fs::metadata(&zygote).map(|m| m.len()).unwrap_or(0);
        println!("zygote: {} sandbox-init --zygote ({:.1} MB file)", zygote.display(), size as f64 / 1e6);
        let mut config = NodeConfig::new(state.path().to_owned(), zygote);
        config.supervisor_log_filter = "warn".into();
        config.cgroup_subtree = format!("agentd-bench-{}", std::process::id());
        let node = Node::start(config).await.expect("node");
        node_figures(&node, runs, idle).await;
    });
    whole_process_figures(runs);
}
