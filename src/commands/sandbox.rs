//! `agentd sandbox run`: one command in a sandbox built by the same code as
//! agent sandboxes, for operators trying a profile and for the hostile-workload
//! tests. This process is single-threaded throughout: it builds the sandbox
//! itself (as `sandbox-init` does), waits for it, and cleans up.

use std::os::fd::AsFd;
use std::path::PathBuf;

use agentd_runtime::sandbox::spec::DEFAULT_SYSTEM_BINDS;
use agentd_runtime::sandbox::{BindMount, IdRange, Network, Payload, SandboxSpec, init};
use agentd_runtime::supervisor::run_mode;
use anyhow::{Context, anyhow, bail};
use nix::sys::wait::{WaitStatus, waitpid};

use crate::cli::SandboxRunArgs;

/// Exit code when agentd itself fails, as `env` and container runtimes use.
const SETUP_FAILED: i32 = 125;

fn parse_bind(spec: &str) -> anyhow::Result<BindMount> {
    let (source, target) = spec.split_once(':').ok_or_else(|| anyhow!("--ro-bind takes HOST:SANDBOX, got {spec:?}"))?;
    Ok(BindMount { source: source.into(), target: target.into(), read_only: true })
}

fn parse_env(kv: &str) -> anyhow::Result<(String, String)> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => bail!("--env takes NAME=VALUE, got {kv:?}"),
    }
}

/// Runs the sandbox and returns the exit code to leave with.
pub fn run(args: SandboxRunArgs) -> anyhow::Result<i32> {
    match run_sandbox(args) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("agentd sandbox: {e:#}");
            Ok(SETUP_FAILED)
        }
    }
}

fn run_sandbox(args: SandboxRunArgs) -> anyhow::Result<i32> {
    let network: Network = args.network.parse().map_err(|e: String| anyhow!(e))?;
    if args.memory.is_some() || args.pids.is_some() || args.cpus.is_some() {
        bail!("resource limits need the cgroup layer, which this build lacks");
    }
    let uid_base = args.uid_base.unwrap_or(1_000_000_000 + (std::process::id() % 40_000) * 65_536);
    let mut mounts: Vec<BindMount> = args.ro_binds.iter().map(|b| parse_bind(b)).collect::<Result<_, _>>()?;
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
        ("HOME".into(), "/workspace".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TMPDIR".into(), "/tmp".into()),
    ];
    for kv in &args.env {
        let (k, v) = parse_env(kv)?;
        env.retain(|(name, _)| *name != k);
        env.push((k, v));
    }

    let scratch = tempfile::Builder::new().prefix("agentd-run-").tempdir().context("cannot create a scratch directory")?;
    let rootfs_dir = scratch.path().join("rootfs");
    std::fs::create_dir(&rootfs_dir)?;
    let workspace = match &args.workspace {
        Some(dir) => dir.canonicalize().with_context(|| format!("workspace {}", dir.display()))?,
        None => {
            let dir = scratch.path().join("workspace");
            std::fs::create_dir(&dir)?;
            std::os::unix::fs::chown(&dir, Some(uid_base), Some(uid_base))?;
            dir
        }
    };
    mounts.insert(0, BindMount { source: workspace, target: "/workspace".into(), read_only: false });

    let spec = SandboxSpec {
        id: format!("run-{}", std::process::id()),
        rootfs_dir,
        rootfs: args.rootfs.clone(),
        hostname: "sandbox".into(),
        ids: IdRange { host_base: uid_base, size: args.uid_count },
        system_binds: DEFAULT_SYSTEM_BINDS.iter().map(PathBuf::from).collect(),
        mounts,
        network,
        cgroup_procs: Vec::new(),
        payload: Payload::Command { argv: args.command.clone(), env, cwd: "/workspace".into() },
        supervisor_log_filter: args.log.clone(),
    };
    spec.validate()?;

    // Building the sandbox leaves this process in a private mount namespace
    // whose mounts sit on the scratch directory: come back to the original one
    // before removing it, or the removal would walk into the bind mounts.
    let host_mnt = std::fs::File::open("/proc/self/ns/mnt").context("cannot open own mount namespace")?;
    let pid = init::create(&spec).map_err(|e| anyhow!("sandbox setup failed at {e}"))?;
    run_mode::forward_signals_to(pid.as_raw()).context("cannot forward signals")?;
    let code = loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, signal, _)) => break 128 + signal as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(anyhow!("waitpid: {e}")),
        }
    };
    nix::sched::setns(host_mnt.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS).context("cannot return to the host mount namespace")?;
    drop(scratch);
    Ok(code)
}
