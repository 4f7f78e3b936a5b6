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
//!
//! Layout: [`cli`] (flags), [`config`] (the config file and its key table),
//! `commands/` (one module per daemon subcommand), [`client`] (the HTTP
//! client commands: `session`, `prompt`, `container`, `node ls`, `events`;
//! one module per command group), [`doctor`] (`agentd doctor`'s host
//! checks, one module per concern).

mod cli;
mod client;
mod commands;
mod config;
mod doctor;
mod join;
mod notify;
mod sandbox_bin;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            // One line, whatever RUST_BACKTRACE says: an error here is for
            // the operator (a bad config, a port in use), not a crash.
            eprintln!("agentd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `agentd up` run by hand in a terminal stops its sandboxes on Ctrl-C, as
/// a developer expects, even where the packaged config (for the service)
/// turns live restore on: the file's setting is dropped; `--live-restore`
/// or `AGENTD_LIVE_RESTORE` given by the user still turn it on. Must run
/// while the process is single-threaded.
fn up_by_hand(loaded: Option<&config::Loaded>) {
    use std::io::IsTerminal;
    const VAR: &str = "AGENTD_LIVE_RESTORE";
    if std::io::stdin().is_terminal() && loaded.is_some_and(|l| l.set.iter().any(|v| v == VAR)) {
        // SAFETY: called from main before any thread exists.
        unsafe { std::env::remove_var(VAR) };
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let first = std::env::args_os().nth(1);
    let first = first.as_deref().and_then(|a| a.to_str());
    if matches!(first, Some("sandbox-init" | "sandbox")) {
        return agentd_sandbox::main().map(|()| ExitCode::SUCCESS);
    }
    // `config check` reads the file itself (perhaps another one): a broken
    // default file must not stop it from saying what is broken.
    let loaded = if first == Some("config") { None } else { config::load_into_env()? };
    if first == Some("up") {
        up_by_hand(loaded.as_ref());
    }
    let cli = cli::Cli::parse();
    match cli.command {
        cli::Command::Up(args) => commands::up::run(args).map(|()| ExitCode::SUCCESS),
        cli::Command::Node(mut args) => match args.command.take() {
            Some(command) => client::node::run(command),
            None => commands::node::run(args).map(|()| ExitCode::SUCCESS),
        },
        cli::Command::Session(command) => client::session::run(command),
        cli::Command::Prompt(args) => client::prompt::run(args),
        cli::Command::Container(command) => client::container::run(command),
        cli::Command::Events(args) => client::events::run(args),
        cli::Command::Server(args) => commands::server::run(args).map(|()| ExitCode::SUCCESS),
        cli::Command::JoinToken(command) => commands::join_token::run(command).map(|()| ExitCode::SUCCESS),
        cli::Command::Token(command) => commands::token::run(command).map(|()| ExitCode::SUCCESS),
        cli::Command::Doctor(args) => commands::doctor::run(args, loaded),
        cli::Command::Config(command) => commands::config::run(command),
        // Dispatched above, before parsing.
        cli::Command::Sandbox { .. } | cli::Command::SandboxInit { .. } => agentd_sandbox::main().map(|()| ExitCode::SUCCESS),
    }
}
