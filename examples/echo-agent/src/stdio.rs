//! Newline-delimited JSON on the process's stdin and stdout.
//!
//! The SDK has a ready-made `Stdio` transport, but it owns stdout outright.
//! `--fail-initialize garbage` must put a non-JSON line on that same channel,
//! so this module builds the transport from the SDK's `Lines` adapter around a
//! stdout handle the agent can share.
//!
//! All stdout lines go through one writer thread. That keeps an injected line
//! from interleaving with a protocol message, and lets the thread flush once
//! per burst instead of once per line: the SDK flushes after every message,
//! and through tokio's stdout every write and every flush is a round trip to
//! the blocking pool, a large share of the agent's cost per streamed chunk.

use std::io::{self, Write as _};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use agent_client_protocol::{Agent, ConnectTo, Lines};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{Semaphore, mpsc};

/// Lines waiting for the writer thread.
const QUEUE_LINES: usize = 1024;

/// How many streamed chunks may be produced but not yet written. The SDK's
/// own outgoing queue is unbounded, so without this window a long `--repeat`
/// turn outruns a slower reader and buffers the whole echo in memory.
const CHUNK_WINDOW: usize = 4096;

/// A shared handle that queues whole lines for stdout.
#[derive(Debug, Clone)]
pub struct StdoutLines {
    tx: mpsc::Sender<String>,
    window: Arc<Semaphore>,
}

/// The thread behind [`StdoutLines`]. It finishes once every handle is
/// dropped and all queued lines are written, so joining it is how `main`
/// makes sure the last response is out before the process exits.
#[derive(Debug)]
pub struct StdoutWriter(JoinHandle<io::Result<()>>);

/// Starts the stdout writer thread.
pub fn stdout() -> (StdoutLines, StdoutWriter) {
    let (tx, mut rx) = mpsc::channel::<String>(QUEUE_LINES);
    let window = Arc::new(Semaphore::new(CHUNK_WINDOW));
    let written = window.clone();
    let thread = thread::Builder::new()
        .name("stdout".into())
        .spawn(move || {
            let result = write_lines(&mut rx, &written);
            // Nothing will reopen the window any more; closing it keeps turns
            // from waiting forever while the connection shuts down.
            written.close();
            result
        })
        .expect("spawn stdout writer thread");
    (StdoutLines { tx, window }, StdoutWriter(thread))
}

fn write_lines(rx: &mut mpsc::Receiver<String>, window: &Semaphore) -> io::Result<()> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    while let Some(line) = rx.blocking_recv() {
        writeln!(out, "{line}")?;
        reopen(window);
        while let Ok(line) = rx.try_recv() {
            writeln!(out, "{line}")?;
            reopen(window);
        }
        // Nothing else queued: the peer reads line by line and must not wait
        // on a buffer that no further write would fill.
        out.flush()?;
    }
    Ok(())
}

/// Any written line reopens the window by one. The cap keeps lines that took
/// no slot (responses, say) from widening it for good.
fn reopen(window: &Semaphore) {
    if window.available_permits() < CHUNK_WINDOW {
        window.add_permits(1);
    }
}

impl StdoutLines {
    /// Queues `line` (without its newline) for stdout.
    pub async fn write_line(&self, line: String) -> io::Result<()> {
        self.tx
            .send(line)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "stdout writer has stopped"))
    }

    /// Waits until one more streamed chunk fits in the window. Call before
    /// producing each chunk.
    pub async fn chunk_slot(&self) {
        if let Ok(permit) = self.window.acquire().await {
            permit.forget();
        }
    }
}

impl StdoutWriter {
    /// Waits until everything queued is written; fails if stdout failed.
    pub fn finish(self) -> io::Result<()> {
        self.0
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("stdout writer panicked")))
    }
}

/// The SDK transport: JSON-RPC lines read from stdin, written via `stdout`.
/// Reaching EOF on stdin ends the incoming side of the connection.
pub fn transport(stdout: StdoutLines) -> impl ConnectTo<Agent> + 'static {
    let outgoing = futures::sink::unfold(stdout, |stdout, line: String| async move {
        stdout.write_line(line).await?;
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
