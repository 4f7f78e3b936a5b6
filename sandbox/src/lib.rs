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
mod egress;
pub mod daemon;
mod ids;
mod run;

/// The first host id `sandbox run` gives its command; the node's ranges
/// (`--id-base` onwards) stay below it (`agentd doctor` checks).
pub use ids::FIRST_ID;

use agentd_builder::Pid1;
use agentd_harden::Hardening;
use clap::Parser;

/// What every sandbox's PID 1 runs: the supervisor, or `sandbox run`'s command.
const PID1: Pid1 = Pid1 {
    supervisor: agentd_supervisor::run,
    command: |argv, env, cwd, hardening: Hardening| agentd_supervisor::run_mode::run(argv, env, cwd, move || hardening.apply_in_child()),
};

/// Parses the process's command line (`<any argv0> sandbox ...` or
/// `<any argv0> sandbox-init ...`) and runs it.
pub fn main() -> anyhow::Result<()> {
    match cli::Cli::parse().command {
        cli::Command::SandboxInit { zygote: false } => agentd_builder::init::main(PID1),
        cli::Command::SandboxInit { zygote: true } => agentd_builder::zygote::main(PID1),
        cli::Command::Sandbox(cli::SandboxCommand::Run(args)) => std::process::exit(run::run(args)?),
    }
}
