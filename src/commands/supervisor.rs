use crate::cli::SupervisorArgs;

pub fn run(args: SupervisorArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    agentd_runtime::supervisor::run(args.listen_fd)?;
    Ok(())
}
