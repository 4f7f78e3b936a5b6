//! `agentd-sandbox`: the sandbox side of agentd in a binary of its own.
//!
//! - `agentd-sandbox sandbox-init --zygote`: the node's zygote, which forks
//!   a worker per sandbox; the sandbox's PID 1 (the supervisor) is a fork of
//!   it, so this binary's size is what every sandbox carries.
//! - `agentd-sandbox sandbox-init`: one sandbox, one-shot (the fallback).
//! - `agentd-sandbox sandbox run ...` ([`run`]): one command in a sandbox.
//!
//! The subcommands are spelled as `agentd`'s, which hands `agentd sandbox ...`
//! and `agentd sandbox-init` over to this binary unchanged (an exec), so
//! `agentd` need not carry the sandbox code and this binary need not carry
//! the control plane. Everything runs before any thread exists: creating a
//! user namespace and forking need a single-threaded process.

mod cli;
mod run;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    match cli::Cli::parse().command {
        cli::Command::SandboxInit { zygote: false } => agentd_runtime::sandbox::init::main(),
        cli::Command::SandboxInit { zygote: true } => agentd_runtime::sandbox::zygote::main(),
        cli::Command::Sandbox(cli::SandboxCommand::Run(args)) => std::process::exit(run::run(args)?),
    }
}
