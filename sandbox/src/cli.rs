//! The sandbox subcommands of `agentd`'s command line (`agentd-daemon`
//! lists them too, for its help, and hands them back here).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "agentd", version, about = "agentd's sandboxes: the node's zygote and `sandbox run`")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Sandboxes for operators and tests.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Builds one sandbox from a spec on stdin (internal).
    #[command(hide = true)]
    SandboxInit {
        /// Serve specs from stdin, one worker per sandbox, until end of file.
        #[arg(long)]
        zygote: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Runs one command in a sandbox built exactly as agent sandboxes are,
    /// stdio attached; exits with its code (or 128 + signal).
    Run(SandboxRunArgs),
}

#[derive(Debug, Args)]
pub struct SandboxRunArgs {
    /// Memory limit (bytes, or with a K/M/G suffix); no swap beyond it.
    // A negative value reaches the limit checks, which say what is wrong
    // with it, rather than the parser, which would take it for a flag.
    #[arg(long, allow_hyphen_values = true)]
    pub memory: Option<String>,
    /// Maximum number of processes and threads.
    #[arg(long)]
    pub pids: Option<u64>,
    /// CPU limit in CPUs, e.g. 0.5.
    #[arg(long, allow_negative_numbers = true)]
    pub cpus: Option<f64>,
    /// none (own network namespace, loopback only), host, or egress (own
    /// network namespace, a route out through a gateway that lets through
    /// only what --allow names).
    #[arg(long, default_value = "none")]
    pub network: String,
    /// With --network egress: a destination the sandbox may reach, as a
    /// profile's egress rule: NAME, *.NAME, IPv4 or CIDR, each with an
    /// optional :PORT (80 and 443 without one). Repeatable.
    #[arg(long = "allow", value_name = "RULE")]
    pub allow: Vec<String>,
    /// A root filesystem directory to use instead of the host's system dirs.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Host directory mounted read-write at /workspace (default: a fresh
    /// temporary directory, removed afterwards; on /dev/shm, in memory, when
    /// that is a tmpfs).
    #[arg(long)]
    pub workspace: Option<PathBuf>,
    /// Extra read-only bind mount, HOST:SANDBOX (repeatable).
    #[arg(long = "ro-bind", value_name = "HOST:SANDBOX")]
    pub ro_binds: Vec<String>,
    /// NAME=VALUE for the command's environment (repeatable). The command gets
    /// only PATH, HOME, LANG, TMPDIR and these.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// First host uid/gid of the sandbox's id range. Default: a free range
    /// from 1000000000 up, held for the run's life, so concurrent runs never
    /// share ids; a range given here is the caller's to keep apart.
    #[arg(long)]
    pub uid_base: Option<u32>,
    #[arg(long, default_value_t = 65536)]
    pub uid_count: u32,
    /// Seccomp policy for the command, in seccompiler's JSON format (as a
    /// container profile's `seccomp`), replacing the default one.
    #[arg(long, value_name = "FILE")]
    pub seccomp: Option<PathBuf>,
    /// Fail setup at this stage on purpose (tests of the undo path; only in
    /// builds with the `faults` feature).
    #[cfg(feature = "faults")]
    #[arg(long, hide = true)]
    pub inject_failure: Option<String>,
    /// Where the search for a free id range starts (default: this
    /// process's pid), so that tests can make runs want the same range.
    #[arg(long, hide = true)]
    pub id_hint: Option<u32>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}
