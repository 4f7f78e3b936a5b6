//! Command-line flags. They exist to shape the agent's behaviour for client
//! tests (timing, chunking, injected faults) and for throughput benchmarks.

use std::num::NonZeroUsize;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::agent::Config;
use crate::chunking::Chunking;

/// An ACP v1 agent that echoes each prompt back as streamed message chunks.
///
/// Speaks newline-delimited JSON-RPC 2.0 on stdin/stdout; logs go to stderr
/// (filter with `RUST_LOG`).
#[derive(Debug, Parser)]
#[command(name = "echo-agent", version)]
pub struct Args {
    /// Stream fixed-size chunks of this many characters instead of one chunk
    /// per whitespace-separated word.
    #[arg(long, value_name = "N")]
    pub chunk_chars: Option<NonZeroUsize>,

    /// Sleep this many milliseconds before each chunk, so that cancellation
    /// can land in the middle of a turn.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub delay_ms: u64,

    /// Echo the prompt text this many times in a row within one turn.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub repeat: usize,

    /// Allocate and touch this many MiB at the start of every turn and keep
    /// them, to test how a client reports a sandbox's OOM kill.
    #[arg(long, value_name = "MIB", default_value_t = 0)]
    pub hog_mib: usize,

    /// Misbehave on `initialize`, to test how a client copes with a broken
    /// agent.
    #[arg(long, value_name = "MODE")]
    pub fail_initialize: Option<FailInitialize>,

    /// Require `authenticate` before `session/new` (which answers ACP's
    /// `auth_required` until then). Two methods are advertised: an
    /// interactive `browser-login` that always fails here, and
    /// `echo-agent-token`, which succeeds when the environment variable
    /// ECHO_AGENT_TOKEN is set and not empty.
    #[arg(long)]
    pub require_auth: bool,

    /// Advertise `loadSession`, keep every session's history on disk
    /// (`$HOME/.echo-agent/sessions/<id>.json`) and answer `session/load` of
    /// one (even one an earlier run of the agent created) by replaying it;
    /// an id it never saw is ACP's resource-not-found.
    #[arg(long)]
    pub load_session: bool,

    /// Advertise these session capabilities: `list` (session/list of the
    /// sessions it knows, on disk too), `close` (session/close), `resume`
    /// (session/resume: `--load-session`'s reopening without the replay)
    /// and `additional-directories` (taken by session/new, load and resume;
    /// the prompt `/dirs` names them).
    #[arg(long, value_name = "CAP", value_delimiter = ',')]
    pub session_capabilities: Vec<SessionCap>,

    /// Advertise these MCP transports besides stdio (http, sse). The
    /// prompt `/mcp` names the MCP servers the session was given.
    #[arg(long, value_name = "KIND", value_delimiter = ',')]
    pub mcp_capabilities: Vec<McpKind>,

    /// Never answer `session/new`, to test a client's request timeout.
    #[arg(long)]
    pub hang_session_new: bool,

    /// Advertise these prompt capabilities (image, audio, embedded-context).
    #[arg(long, value_name = "KIND", value_delimiter = ',')]
    pub prompt_capabilities: Vec<PromptKind>,

    /// Trap SIGTERM: say so on stderr (the client's account of the stop can
    /// quote it), then exit 0 (`exit`) or carry on (`ignore`), to test how a
    /// client stops its agents (a grace period, then SIGKILL).
    #[arg(long, value_name = "MODE")]
    pub on_sigterm: Option<OnSigterm>,
}

/// What `--on-sigterm` does after reporting the signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnSigterm {
    /// Exit with status 0, as an agent that saves its state and leaves.
    Exit,
    /// Keep running, as an agent that hangs in its shutdown.
    Ignore,
}

/// A session capability `--session-capabilities` can advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SessionCap {
    List,
    Close,
    Resume,
    AdditionalDirectories,
}

/// An MCP transport `--mcp-capabilities` can advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum McpKind {
    Http,
    Sse,
}

/// A content block kind `--prompt-capabilities` can advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PromptKind {
    Image,
    Audio,
    EmbeddedContext,
}

/// The ways `--fail-initialize` can break the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FailInitialize {
    /// Write a line that is not JSON to stdout instead of answering, then keep
    /// serving stdin.
    Garbage,
    /// Exit with status 3 without answering.
    Exit,
    /// Never answer.
    Hang,
    /// Answer with a JSON-RPC error.
    Error,
}

impl Args {
    pub fn into_config(self) -> Config {
        Config {
            chunking: self.chunk_chars.map_or(Chunking::Words, Chunking::Chars),
            delay: Duration::from_millis(self.delay_ms),
            repeat: self.repeat,
            hog_mib: self.hog_mib,
            fail_initialize: self.fail_initialize,
            require_auth: self.require_auth,
            load_session: self.load_session,
            hang_session_new: self.hang_session_new,
            prompt_capabilities: self.prompt_capabilities,
            session_capabilities: self.session_capabilities,
            mcp_capabilities: self.mcp_capabilities,
        }
    }
}
