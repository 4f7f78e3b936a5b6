//! `agentd-daemon`: the control plane and the node, run through `agentd`.
//!
//! `agentd` (the agentd-sandbox package's binary) runs the sandbox
//! subcommands itself and executes this binary, installed beside it, for
//! every other one, so that `agentd sandbox run` and every sandbox's PID 1
//! load only the runtime, not this binary's control plane, store and HTTP
//! stack (its start alone took ~0.6 ms more). `main` only parses the command
//! line and dispatches to `commands/<verb>.rs`. The sandbox subcommands are
//! listed here too, for `agentd --help`, and run in process if this binary
//! is called with them ([`agentd_sandbox::main`]); the node starts its
//! zygote from `agentd` ([`sandbox_bin`]).

mod cli;
mod commands;
mod config;
mod notify;
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
