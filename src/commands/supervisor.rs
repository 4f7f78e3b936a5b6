//! `agentd supervisor`: PID 1 inside a sandbox (internal; sandbox-init execs it).

use crate::cli::SupervisorArgs;

pub fn run(args: SupervisorArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if args.run {
        let env = args
            .env
            .iter()
            .map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow::anyhow!("--env takes NAME=VALUE"))?;
        anyhow::ensure!(!args.command.is_empty(), "no command to run");
        // Built before fork: it compiles the seccomp filter and reads /proc.
        let hardening = agentd_runtime::sandbox::harden::Hardening::default_for_agents()?;
        let code = agentd_runtime::supervisor::run_mode::run(&args.command, &env, &args.cwd, move || hardening.apply_in_child());
        std::process::exit(code);
    }
    let fd = args.listen_fd.ok_or_else(|| anyhow::anyhow!("--listen-fd is required"))?;
    agentd_runtime::supervisor::run(fd)?;
    Ok(())
}
