//! `echo-agent`: a real ACP v1 agent that echoes prompts back, used by
//! agentd's tests and benchmarks as a predictable stand-in for an AI agent.
//! See `agent.rs` for the protocol, `cli.rs` for the flags and `commands.rs`
//! for the prompt commands that exercise a client's fs and terminal methods.

mod agent;
mod chunking;
mod cli;
mod commands;
mod history;
mod stdio;
mod tools;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let args = cli::Args::parse();
    // stdout carries the protocol, so every log line must go to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,echo_agent=info")),
        )
        .init();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stdout, writer) = stdio::stdout();
    let transport = stdio::transport(stdout.clone());
    let on_sigterm = args.on_sigterm;
    let served: anyhow::Result<()> = runtime.block_on(async move {
        if let Some(mode) = on_sigterm {
            trap_sigterm(mode)?;
        }
        Ok(agent::serve(args.into_config(), stdout, transport).await?)
    });
    // If the connection failed while stdin was still open, a read is parked on
    // a blocking thread that nothing can interrupt; don't wait for it.
    runtime.shutdown_background();
    // Every stdout handle went away with the connection; wait for the last
    // queued lines to be written before exiting.
    let written = writer.finish();
    served?;
    written?;
    tracing::info!("stdin closed, exiting");
    Ok(())
}

/// `--on-sigterm`: the handler is installed before the agent answers
/// anything, so a client that stops it after `initialize` always finds it.
fn trap_sigterm(mode: cli::OnSigterm) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        while term.recv().await.is_some() {
            // Straight to stderr: the log filter must not hide it.
            match mode {
                cli::OnSigterm::Exit => {
                    eprintln!("echo-agent: SIGTERM received (pid {}); exiting", std::process::id());
                    std::process::exit(0);
                }
                cli::OnSigterm::Ignore => eprintln!("echo-agent: SIGTERM received (pid {}); ignoring it", std::process::id()),
            }
        }
    });
    Ok(())
}
