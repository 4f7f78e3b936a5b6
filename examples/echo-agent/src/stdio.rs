//! Newline-delimited JSON on the process's stdin and stdout.
//!
//! The SDK has a ready-made `Stdio` transport, but it owns stdout outright.
//! `--fail-initialize garbage` must put a non-JSON line on that same channel,
//! so this module builds the transport from the SDK's `Lines` adapter around a
//! stdout writer the agent can share. A single lock around whole lines keeps
//! the injected line from interleaving with a protocol message.

use std::io;
use std::sync::Arc;

use agent_client_protocol::{Agent, ConnectTo, Lines};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::Mutex;

/// A shared handle that writes whole lines to stdout.
#[derive(Debug, Clone)]
pub struct StdoutLines(Arc<Mutex<tokio::io::Stdout>>);

impl StdoutLines {
    pub fn new() -> Self {
        Self(Arc::new(Mutex::new(tokio::io::stdout())))
    }

    /// Writes `line` plus a newline and flushes, because the peer reads line by
    /// line and a message stuck in a buffer looks like a hung agent.
    pub async fn write_line(&self, line: &str) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        let mut stdout = self.0.lock().await;
        stdout.write_all(&bytes).await?;
        stdout.flush().await
    }
}

/// The SDK transport: JSON-RPC lines read from stdin, written via `stdout`.
/// Reaching EOF on stdin ends the incoming side of the connection.
pub fn transport(stdout: StdoutLines) -> impl ConnectTo<Agent> + 'static {
    let outgoing = futures::sink::unfold(stdout, |stdout, line: String| async move {
        stdout.write_line(&line).await?;
        Ok::<_, io::Error>(stdout)
    });
    let incoming = futures::stream::unfold(
        BufReader::new(tokio::io::stdin()).lines(),
        |mut lines| async move {
            match lines.next_line().await {
                Ok(Some(line)) => Some((Ok(line), lines)),
                Ok(None) => None,
                Err(err) => Some((Err(err), lines)),
            }
        },
    );
    Lines::new(Box::pin(outgoing), Box::pin(incoming))
}
