//! `echo-agent`: a real ACP v1 agent that echoes prompts back, used by
//! agentd's tests and benchmarks as a predictable stand-in for an AI agent.
//! See `agent.rs` for the protocol and `cli.rs` for the flags.

mod agent;
mod chunking;
mod cli;
mod stdio;

use clap::Parser as _;
use tracing_subscriber::EnvFilter;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
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

    let (stdout, writer) = stdio::stdout();
    let transport = stdio::transport(stdout.clone());
    let served = agent::serve(args.into_config(), stdout, transport).await;
    // Every stdout handle is gone with the connection; wait for the last
    // queued lines to be written before exiting.
    let written = writer.finish();
    served?;
    written?;
    tracing::info!("stdin closed, exiting");
    Ok(())
}
