//! `agentd`: one binary for every role.
//!
//! `main` only parses the command line and dispatches to `commands/<verb>.rs`.
//! `sandbox-init` and `sandbox run` are dispatched before any async runtime or
//! thread exists: creating a user namespace and forking need a single-threaded
//! process. The sandbox's PID 1 (the supervisor) is forked from them, not
//! exec'd.

mod cli;
mod commands;
mod config;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Internal roles take everything from their parent, never from the file.
    let internal = matches!(std::env::args().nth(1).as_deref(), Some("sandbox-init" | "sandbox"));
    if !internal {
        config::load_into_env()?;
    }
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::SandboxInit { zygote: false } => agentd_runtime::sandbox::init::main(),
        cli::Command::SandboxInit { zygote: true } => agentd_runtime::sandbox::zygote::main(),
        cli::Command::Up(args) => commands::up::run(args),
        cli::Command::Node(args) => commands::node::run(args),
        cli::Command::Server(args) => commands::server::run(args),
        cli::Command::Sandbox(cli::SandboxCommand::Run(args)) => std::process::exit(commands::sandbox::run(args)?),
    }
}
