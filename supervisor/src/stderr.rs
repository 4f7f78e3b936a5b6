//! An agent's stderr: logged line by line, its last lines kept, so that an
//! agent that dies before answering (an npx launcher that cannot fetch its
//! package, a missing library) is reported in its own words.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;

/// Lines kept, and how much of them a report quotes.
const KEPT_LINES: usize = 8;
const QUOTED_CHARS: usize = 500;
/// Longest line logged (a runaway line is cut, not buffered whole).
const LOGGED_CHARS: usize = 2000;

pub struct StderrTail {
    lines: Mutex<VecDeque<String>>,
    closed: watch::Sender<bool>,
}

impl StderrTail {
    /// Reads `stderr` until it closes, logging each line under the agent's id.
    pub fn follow(id: String, stderr: std::process::ChildStderr) -> Arc<Self> {
        let tail = Arc::new(Self { lines: Mutex::default(), closed: watch::Sender::new(false) });
        let Ok(stderr) = tokio::process::ChildStderr::from_std(stderr) else {
            tail.closed.send_replace(true);
            return tail;
        };
        let reader = Arc::clone(&tail);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line: String = line.chars().take(LOGGED_CHARS).collect();
                tracing::info!(agent = id, "{line}");
                if line.trim().is_empty() {
                    continue;
                }
                let mut kept = reader.lines.lock().unwrap();
                if kept.len() == KEPT_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
            reader.closed.send_replace(true);
        });
        tail
    }

    /// The last lines, joined with ` | ` and cut to [`QUOTED_CHARS`], once
    /// stderr has closed or `wait` has passed (the pipe may close a moment
    /// after the exit is seen); empty if the agent wrote nothing.
    pub async fn last_words(&self, wait: Duration) -> String {
        let mut closed = self.closed.subscribe();
        let _ = tokio::time::timeout(wait, closed.wait_for(|c| *c)).await;
        let joined = self.lines.lock().unwrap().iter().map(String::as_str).collect::<Vec<_>>().join(" | ");
        if joined.chars().count() <= QUOTED_CHARS {
            return joined;
        }
        // Keep the end: the last words say why.
        let skip = joined.chars().count() - QUOTED_CHARS;
        format!("...{}", joined.chars().skip(skip).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_last_lines_until_the_pipe_closes() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i >&2; done; echo >&2"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let tail = StderrTail::follow("t".into(), child.stderr.take().unwrap());
        child.wait().unwrap();
        let words = tail.last_words(Duration::from_secs(5)).await;
        assert_eq!(words, "line 3 | line 4 | line 5 | line 6 | line 7 | line 8 | line 9 | line 10");
    }
}
