//! The `agentd` binary: the sandbox side of agentd, and the hand-over of
//! every other subcommand to `agentd-daemon` ([`daemon`]).
//!
//! - `sandbox-init --zygote`: the node's zygote, which forks a worker per
//!   sandbox; the sandbox's PID 1 (the supervisor) is a fork of it, so the
//!   size of this binary is what every sandbox carries.
//! - `sandbox-init`: one sandbox, one-shot (the fallback).
//! - `sandbox run ...` ([`run`]): one command in a sandbox, under a host id
//!   range it holds while it runs ([`ids`]).
//!
//! [`main`] must run before any thread exists: creating a user namespace and
//! forking need a single-threaded process.

mod cli;
pub mod daemon;
mod ids;
mod run;

use clap::Parser;

/// Parses the process's command line (`<any argv0> sandbox ...` or
/// `<any argv0> sandbox-init ...`) and runs it.
pub fn main() -> anyhow::Result<()> {
    match cli::Cli::parse().command {
        cli::Command::SandboxInit { zygote: false } => agentd_runtime::sandbox::init::main(),
        cli::Command::SandboxInit { zygote: true } => agentd_runtime::sandbox::zygote::main(),
        cli::Command::Sandbox(cli::SandboxCommand::Run(args)) => std::process::exit(run::run(args)?),
    }
}
