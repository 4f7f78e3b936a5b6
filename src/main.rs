//! `agentd`: the entry point for every role.
//!
//! `main` only parses the command line and dispatches to `commands/<verb>.rs`.
//! `sandbox ...` and `sandbox-init` belong to the small `agentd-sandbox`
//! binary ([`sandbox_bin`]), which this one executes in its place before doing
//! anything else: every sandbox's PID 1 is a fork of that binary, and what it
//! links is paid per sandbox.

mod cli;
mod commands;
mod config;
mod sandbox_bin;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    if matches!(std::env::args_os().nth(1).as_deref().and_then(|a| a.to_str()), Some("sandbox-init" | "sandbox")) {
        sandbox_bin::exec_with_args();
    }
    config::load_into_env()?;
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Up(args) => commands::up::run(args),
        cli::Command::Node(args) => commands::node::run(args),
        cli::Command::Server(args) => commands::server::run(args),
        // Handed over above, before parsing.
        cli::Command::Sandbox { .. } | cli::Command::SandboxInit { .. } => sandbox_bin::exec_with_args(),
    }
}
