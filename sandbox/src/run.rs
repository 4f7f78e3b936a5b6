//! `agentd sandbox run`: one command in a sandbox built by the same code as
//! agent sandboxes, for operators trying a profile and for the hostile-workload
//! tests. This process is single-threaded throughout: it builds the sandbox
//! itself (as `sandbox-init` does), waits for it, reports an OOM kill or a
//! fork refused at the pids limit, and removes everything it made.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use agentd_builder::spec::DEFAULT_SYSTEM_BINDS;
use agentd_builder::{BindMount, IdRange, Network, Payload, SandboxSpec, init};
use agentd_cgroups::limits::{HostCapacity, Limits};
use agentd_cgroups::sandbox::SandboxCgroup;
use agentd_cgroups::tree::CgroupTree;
use agentd_harden::{Hardening, compile_custom};
use agentd_plan::{EgressPolicy, parse_size};
use agentd_supervisor::run_mode;
use anyhow::{Context, anyhow, bail};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitStatus, waitpid};

use crate::cli::SandboxRunArgs;
use crate::ids::IdLease;

/// The stage a fault test asked setup to fail at (builds with `faults` only).
#[cfg(feature = "faults")]
fn inject_failure(args: &SandboxRunArgs) -> Option<&str> {
    args.inject_failure.as_deref()
}

#[cfg(not(feature = "faults"))]
fn inject_failure(_args: &SandboxRunArgs) -> Option<&str> {
    None
}

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

/// Where a run's scratch directories go: `/dev/shm` when it is a tmpfs
/// (world-writable and sticky, as /tmp is), else the usual temporary
/// directory. The default workspace is then memory, like the sandbox's /tmp.
fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    match nix::sys::statfs::statfs(shm) {
        Ok(fs) if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC => shm.to_owned(),
        _ => std::env::temp_dir(),
    }
}

/// Runs the sandbox and returns the exit code to leave with.
pub fn run(args: SandboxRunArgs) -> anyhow::Result<i32> {
    // The signals forwarded to the command wait, blocked, until the sandbox's
    // PID 1 can take them: arriving during setup they would kill this process
    // before it undoes what it made. PID 1 inherits the mask and unblocks
    // them once its command runs (`run_mode`), so none is lost on the way.
    let forwarded = forwarded_signals();
    forwarded.thread_block().context("cannot block signals")?;
    match run_sandbox(args) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("agentd sandbox: {e:#}");
            Ok(SETUP_FAILED)
        }
    }
}

fn forwarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    for &signal in run_mode::FORWARDED {
        set.add(Signal::try_from(signal).expect("a forwarded signal is a signal"));
    }
    set
}

/// The cgroups a `sandbox run` makes: its own subtree, one sandbox in it.
/// Dropping it kills what is left and removes both.
struct RunCgroups {
    tree: CgroupTree,
    sandbox: SandboxCgroup,
}

impl RunCgroups {
    fn create(limits: &Limits) -> anyhow::Result<Self> {
        let self_cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
        let subtree = format!("agentd-run-{}", std::process::id());
        let tree = CgroupTree::discover(Path::new("/sys/fs/cgroup"), &self_cgroup, &subtree)?;
        let sandbox = match tree.create("sandbox", limits) {
            Ok(sandbox) => sandbox,
            Err(e) => {
                let _ = tree.remove_subtree();
                return Err(e.into());
            }
        };
        Ok(Self { tree, sandbox })
    }
}

impl Drop for RunCgroups {
    fn drop(&mut self) {
        let _ = self.sandbox.kill();
        if let Err(e) = self.sandbox.remove() {
            eprintln!("agentd sandbox: cannot remove cgroup: {e}");
        }
        if let Err(e) = self.tree.remove_subtree() {
            eprintln!("agentd sandbox: cannot remove cgroup subtree: {e}");
        }
    }
}

/// The limits asked for, checked against this host; `None` without any.
fn limits(args: &SandboxRunArgs) -> anyhow::Result<Option<Limits>> {
    if args.memory.is_none() && args.pids.is_none() && args.cpus.is_none() {
        return Ok(None);
    }
    let host = HostCapacity::detect(Path::new("/proc"))?;
    let memory = args.memory.as_deref().map(|m| parse_size(m).with_context(|| format!("--memory {m}"))).transpose()?;
    Ok(Some(Limits::new(memory, args.pids, args.cpus, &host)?))
}

/// The agents' hardening, with the policy of `--seccomp` instead of the
/// default one when given.
fn hardening(args: &SandboxRunArgs) -> anyhow::Result<Hardening> {
    let hardening = Hardening::default_for_agents()?;
    let Some(file) = &args.seccomp else { return Ok(hardening) };
    let json = std::fs::read_to_string(file).with_context(|| format!("--seccomp {}", file.display()))?;
    let program = compile_custom(&json).with_context(|| format!("--seccomp {}", file.display()))?;
    Ok(hardening.with_seccomp(Some(program)))
}

/// `--network` with its `--allow` rules.
fn network(args: &SandboxRunArgs) -> anyhow::Result<Network> {
    match args.network.as_str() {
        "egress" => Ok(Network::Egress(EgressPolicy::parse(&args.allow)?)),
        other => {
            anyhow::ensure!(args.allow.is_empty(), "--allow needs --network egress");
            Ok(other.parse()?)
        }
    }
}

fn run_sandbox(args: SandboxRunArgs) -> anyhow::Result<i32> {
    // Everything the request says is checked before anything exists: a
    // refused run creates no directory, cgroup or mount.
    let network = network(&args)?;
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
    if let Some(stage) = inject_failure(&args) {
        anyhow::ensure!(init::FAULT_STAGES.contains(&stage) || stage == "cgroup", "unknown stage {stage:?}");
    }
    let limits = limits(&args)?;
    let hardening = hardening(&args)?;
    if let Some(dir) = &args.workspace {
        let dir = dir.canonicalize().with_context(|| format!("--workspace {}", dir.display()))?;
        anyhow::ensure!(dir.is_dir(), "--workspace {} is not a directory", dir.display());
        mounts.insert(0, BindMount { source: dir, target: "/workspace".into(), read_only: false });
    }
    // Held until this process exits: the sandbox dies with it.
    let lease = match args.uid_base {
        Some(_) => None,
        None => Some(IdLease::claim("agentd-run-ids-", args.id_hint.unwrap_or(std::process::id()), args.uid_count).context("cannot claim a host id range")?),
    };
    let uid_base = args.uid_base.or(lease.as_ref().map(IdLease::base)).expect("a base given or claimed");
    let scratch = scratch_dir();
    let mut spec = SandboxSpec {
        id: format!("run-{}", std::process::id()),
        // Where the root's mount point will be made, once the spec is known
        // to be good; only its being absolute is checked.
        rootfs_dir: scratch.clone(),
        rootfs: args.rootfs.clone(),
        hostname: "sandbox".into(),
        ids: IdRange { host_base: uid_base, size: args.uid_count },
        system_binds: DEFAULT_SYSTEM_BINDS.iter().map(PathBuf::from).collect(),
        mounts,
        network,
        cgroup_procs: Vec::new(),
        payload: Payload::Command { argv: args.command.clone(), env, cwd: "/workspace".into() },
        // Run mode sets up no logging: it reports on stderr itself.
        supervisor_log_filter: String::new(),
        inject_failure: inject_failure(&args).map(str::to_string),
    };
    spec.validate()?;

    // Two fresh directories at most: the empty mount point of the new root,
    // and the default workspace, in memory where the host has a tmpfs for it
    // (an rmdir on this machine's ext4 /tmp takes ~4 ms, which would be most
    // of a run).
    let prefix = format!("agentd-run-{}-", std::process::id());
    let root = tempfile::Builder::new().prefix(&prefix).tempdir_in(&scratch).context("cannot create the root's mount point")?;
    spec.rootfs_dir = root.path().to_owned();
    let scratch_workspace = match &args.workspace {
        Some(_) => None,
        None => {
            let dir = tempfile::Builder::new()
                .prefix(&prefix)
                .suffix("-workspace")
                .tempdir_in(&scratch)
                .context("cannot create a workspace")?;
            std::os::unix::fs::chown(dir.path(), Some(uid_base), Some(uid_base))?;
            spec.mounts.insert(0, BindMount { source: dir.path().to_owned(), target: "/workspace".into(), read_only: false });
            Some(dir)
        }
    };
    // cgroups carry the limits and the OOM count; without limits the pid
    // namespace alone holds the tree together (it dies with PID 1), and
    // skipping the cgroups saves their mkdir and rmdir in every hierarchy.
    let cgroups = limits.as_ref().map(RunCgroups::create).transpose()?;
    if inject_failure(&args) == Some("cgroup") {
        bail!("sandbox setup failed at cgroup: injected failure");
    }
    if let Some(cg) = &cgroups {
        spec.cgroup_procs = cg.sandbox.procs_files();
    }

    // Building the sandbox leaves this process in a private mount namespace
    // whose mounts sit on the root's mount point: come back to the original
    // one before removing it, whatever happened, or the removal would walk
    // into the bind mounts (the workspace among them). PID 1 has a copy of
    // its own, so this one goes as soon as the sandbox is built, while the
    // command runs: tearing down its mounts takes a few hundred microseconds
    // that would otherwise follow the command's exit.
    // An egress sandbox's gateway: reserved now (its resolver's address goes
    // into the sandbox's /etc/resolv.conf), attached by the creator before
    // the command runs, served on a thread of its own once the build is done.
    let (gateway, _resolv_conf) = match &spec.network {
        Network::Egress(policy) => {
            let upstream = agentd_egress::upstream_dns().map_err(|e| anyhow!(e))?;
            let gateway = agentd_egress::Gateway::reserve(policy.clone(), upstream).map_err(|e| anyhow!(e))?;
            let file = tempfile::Builder::new().prefix(&prefix).suffix("-resolv.conf").tempfile_in(&scratch).context("cannot write resolv.conf")?;
            std::fs::write(file.path(), gateway.resolv_conf())?;
            std::fs::set_permissions(file.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
            spec.mounts.push(BindMount { source: file.path().to_owned(), target: "/etc/resolv.conf".into(), read_only: true });
            (Some(std::cell::RefCell::new(gateway)), Some(file))
        }
        _ => (None, None),
    };
    let attach = |pid: nix::unistd::Pid| match &gateway {
        Some(g) => g.borrow_mut().attach(pid.as_raw()),
        None => Ok(()),
    };
    let host_mnt = std::fs::File::open("/proc/self/ns/mnt").context("cannot open own mount namespace")?;
    let created = init::create_attached(&spec, hardening, crate::PID1, gateway.as_ref().map(|_| &attach as &init::AttachNetwork<'_>));
    if let Err(e) = nix::sched::setns(host_mnt.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS) {
        // Still in the private namespace: removing the root's mount point
        // here would walk into its bind mounts. Leave the empty directory.
        let _ = root.keep();
        return Err(e).context("cannot return to the host mount namespace");
    }
    let pid = created.map_err(|e| anyhow!("sandbox setup failed at {e}"))?;
    // Before the signals are unblocked: the gateway's thread keeps them
    // blocked (they go to this one, which forwards them).
    let gateway = match gateway.map(|g| crate::egress::serve(g.into_inner())).transpose() {
        Ok(g) => g,
        Err(e) => {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(e);
        }
    };
    // Unblocks the signals held since the start: one that came meanwhile is
    // forwarded now.
    run_mode::forward_signals_to(pid.as_raw()).context("cannot forward signals")?;
    drop(root);
    let code = loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, signal, _)) => break 128 + signal as i32,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => bail!("waitpid: {e}"),
        }
    };
    // PID 1 is gone and its pid may be reused: forward nothing more, and let
    // no signal cut the cleanup short.
    let _ = forwarded_signals().thread_block();
    if let Some(cg) = &cgroups {
        if let Ok(Some(kills)) = cg.sandbox.oom_kills()
            && kills > 0
        {
            let limit = args.memory.as_deref().unwrap_or("?");
            eprintln!("agentd sandbox: the sandbox ran out of memory: {kills} process(es) OOM-killed (limit {limit})");
        }
        if let Ok(Some(hits)) = cg.sandbox.pids_limit_hits()
            && hits > 0
        {
            let limit = args.pids.map_or("?".to_string(), |p| p.to_string());
            eprintln!("agentd sandbox: the sandbox hit its process limit ({limit}): {hits} fork(s) refused");
        }
    }
    drop(gateway);
    drop(cgroups);
    drop(scratch_workspace);
    drop(lease);
    Ok(code)
}
