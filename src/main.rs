//! `agentd`: the entry point for every role.
//!
//! `main` only parses the command line and dispatches to `commands/<verb>.rs`.
//! `sandbox ...` and `sandbox-init` run in process ([`agentd_sandbox::main`])
//! before anything else, as they do in the small `agentd-sandbox` binary; the
//! node starts its zygote from that one ([`sandbox_bin`]), since every
//! sandbox's PID 1 is a fork of the zygote and what it links is paid per
//! sandbox. (Executing agentd-sandbox from here would cost a second exec and
//! agentd's own start, about 1.5 ms, more than running the same code here.)

mod cli;
mod commands;
mod config;
mod sandbox_bin;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    if matches!(std::env::args_os().nth(1).as_deref().and_then(|a| a.to_str()), Some("sandbox-init" | "sandbox")) {
        return agentd_sandbox::main();
    }
    config::load_into_env()?;
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Up(args) => commands::up::run(args),
        cli::Command::Node(args) => commands::node::run(args),
        cli::Command::Server(args) => commands::server::run(args),
        // Dispatched above, before parsing.
        cli::Command::Sandbox { .. } | cli::Command::SandboxInit { .. } => agentd_sandbox::main(),
    }
}
