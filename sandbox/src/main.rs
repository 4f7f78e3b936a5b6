//! `agentd`: the command operators, tests and the node run.
//!
//! `sandbox ...` and `sandbox-init` run here, in process (see the library's
//! docs): this binary links only the sandbox builder, the supervisor and what they need, so a `sandbox run` and
//! every sandbox's PID 1 carry no control plane, store or HTTP stack. Every
//! other subcommand (`up`, `node`, `server`, `--help`, ...) is
//! `agentd-daemon`'s, installed beside this binary, which is executed in
//! this process's place with the same arguments.

fn main() -> anyhow::Result<()> {
    match std::env::args_os().nth(1).as_deref().and_then(|a| a.to_str()) {
        Some("sandbox" | "sandbox-init") => agentd_sandbox::main(),
        _ => {
            eprintln!("agentd: {:#}", agentd_sandbox::daemon::exec());
            std::process::exit(1)
        }
    }
}
