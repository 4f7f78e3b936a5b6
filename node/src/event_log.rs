//! Each session's event log: every event a client may see, numbered from 1,
//! kept in memory for replay and appended to a JSONL file so that it outlives
//! the node process.
//!
//! Readers follow the log by index and wait on a watch of the last sequence
//! number, so a slow reader never loses events (a broadcast channel would drop
//! them when it lags).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use agentd_proto::events;
use agentd_proto::node::SessionEvent;
use agentd_proto::node::session_event::Event;
use futures::Stream;
use tokio::sync::watch;

/// One line of the JSONL file: the event as clients see it
/// ([`agentd_proto::events`]), which reads back into the typed event.
#[derive(serde::Serialize)]
struct LogLine<'a> {
    seq: u64,
    kind: &'a str,
    run_id: &'a str,
    ts_ms: i64,
    data: Option<&'a serde_json::value::RawValue>,
}

struct Inner {
    events: Vec<Arc<SessionEvent>>,
    file: Option<File>,
}

pub struct EventLog {
    session_id: String,
    inner: Mutex<Inner>,
    /// Last sequence number written, and whether the log is closed.
    head: watch::Sender<(u64, bool)>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl EventLog {
    /// Opens (creating) the log file at `path`. A log that cannot be written
    /// to disk still serves from memory; the failure is logged.
    pub fn open(session_id: &str, path: &Path) -> Self {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .inspect_err(|e| tracing::error!(path = %path.display(), error = %e, "cannot open event log file"))
            .ok();
        Self {
            session_id: session_id.to_string(),
            inner: Mutex::new(Inner { events: Vec::new(), file }),
            head: watch::Sender::new((0, false)),
        }
    }

    /// Appends one event and wakes readers. Returns its sequence number.
    pub fn append(&self, run_id: &str, event: Event) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        let seq = inner.events.len() as u64 + 1;
        let kind = events::kind(&event);
        let data = events::data_json(run_id, &event);
        let event = Arc::new(SessionEvent {
            seq,
            session_id: self.session_id.clone(),
            run_id: run_id.to_string(),
            ts_ms: now_ms(),
            event: Some(event),
        });
        if let Some(file) = inner.file.as_mut() {
            let line = LogLine { seq, kind, run_id: &event.run_id, ts_ms: event.ts_ms, data: serde_json::from_str(&data).ok() };
            // One write per event: formatting straight into the file would
            // issue a write syscall per JSON token.
            let mut buf = serde_json::to_vec(&line).expect("a log line serializes");
            buf.push(b'\n');
            if let Err(e) = file.write_all(&buf) {
                tracing::error!(error = %e, session = self.session_id, "event log write failed");
            }
        }
        inner.events.push(event);
        self.head.send_modify(|h| h.0 = seq);
        seq
    }

    /// Marks the log finished: readers end once they have read everything.
    pub fn close(&self) {
        self.head.send_modify(|h| h.1 = true);
    }

    pub fn last_seq(&self) -> u64 {
        self.head.borrow().0
    }

    /// Events after `after_seq`, then live ones until the log is closed.
    pub fn follow(self: Arc<Self>, after_seq: u64) -> impl Stream<Item = Arc<SessionEvent>> + Send + 'static {
        let mut head = self.head.subscribe();
        async_stream::stream! {
            let mut next = after_seq as usize;
            loop {
                let batch: Vec<Arc<SessionEvent>> = {
                    let inner = self.inner.lock().unwrap();
                    inner.events.get(next..).map(|s| s.to_vec()).unwrap_or_default()
                };
                next += batch.len();
                let empty = batch.is_empty();
                for event in batch {
                    yield event;
                }
                if empty {
                    if head.borrow_and_update().1 {
                        return;
                    }
                    if head.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::node::{RunCompleted, RunStarted, SessionUpdate};
    use futures::StreamExt;

    #[tokio::test]
    async fn replays_from_any_point_then_follows_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EventLog::open("ses_1", &dir.path().join("events.jsonl")));
        for i in 0..3 {
            log.append("run_1", Event::SessionUpdate(SessionUpdate { acp_update: format!("{{\"n\":{i}}}") }));
        }
        let follower = tokio::spawn(Arc::clone(&log).follow(1).map(|e| e.seq).collect::<Vec<_>>());
        tokio::task::yield_now().await;
        log.append("run_1", Event::RunCompleted(RunCompleted { stop_reason: "end_turn".into() }));
        log.close();
        assert_eq!(follower.await.unwrap(), vec![2, 3, 4]);
        let file = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
        assert_eq!(file.lines().count(), 4);
        assert!(file.lines().last().unwrap().contains("\"kind\":\"run.completed\""));
    }

    #[tokio::test]
    async fn a_reader_past_the_end_waits_for_new_events() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EventLog::open("ses_1", &dir.path().join("events.jsonl")));
        let mut stream = Box::pin(Arc::clone(&log).follow(0));
        let next = tokio::spawn(async move { stream.next().await.map(|e| e.seq) });
        tokio::task::yield_now().await;
        log.append("run_1", Event::RunStarted(RunStarted {}));
        assert_eq!(next.await.unwrap(), Some(1));
    }
}
