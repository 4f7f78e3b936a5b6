//! Each session's event log: every event a client may see, numbered from 1,
//! appended to a JSONL file (`sessions/<id>.jsonl`, [`file`]) so that it
//! outlives the node process.
//!
//! - Memory holds a ring of the newest events ([`RING_EVENTS`],
//!   [`RING_BYTES`]); a client resuming from further back is served from the
//!   file, read off the executor, from a sparse index of line offsets.
//! - Files are written by the node's one writer thread ([`writer`]), never
//!   on the executor. Readers follow the *durable* head: an event is seen by
//!   no one before its line is written, so a crashed node that comes back
//!   (live restore) numbers on from exactly what clients could have seen,
//!   without a gap or a number given twice.
//! - [`EventLog::restore`] reads a file back at start: the last number, the
//!   ring, and the turn the node was running when it stopped.
//!
//! Readers follow the log by number and wait on a watch of the durable head,
//! so a slow reader never loses events (a broadcast channel would drop
//! them when it lags).

pub mod file;
pub mod writer;

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use agentd_proto::node::SessionEvent;
use agentd_proto::node::session_event::Event;
use futures::Stream;

pub use writer::LogWriter;
use writer::LogFile;

/// Events kept in memory per session at most...
pub const RING_EVENTS: usize = 1024;
/// ... and bytes of them (as their log lines), at most.
pub const RING_BYTES: usize = 4 << 20;
/// Events handed to a reader per look.
const BATCH: usize = 512;

struct Ring {
    /// Each with the length of its log line.
    events: VecDeque<(Arc<SessionEvent>, usize)>,
    /// Bytes of `events`' log lines.
    bytes: usize,
    next_seq: u64,
}

pub struct EventLog {
    session_id: String,
    ring: Mutex<Ring>,
    file: Arc<LogFile>,
    writer: LogWriter,
}

/// What a log read back at start says of its session's turns.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The turn that was running (its run id), and the supervisor's number
    /// of the last of its events logged.
    pub active: Option<(String, u64)>,
    /// The newest run ids started in this log.
    pub runs: VecDeque<String>,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl EventLog {
    /// A new log at `path` (a file there is replaced: a session being made
    /// again after a crash mid-create starts afresh). A log that cannot be
    /// written to disk still serves from memory; the failure is logged.
    pub fn create(session_id: &str, path: &Path, writer: &LogWriter) -> Self {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)
            .inspect_err(|e| tracing::error!(path = %path.display(), error = %e, "cannot open event log file"))
            .ok();
        Self::with(session_id, LogFile::new(path.to_owned(), file, 0, Vec::new(), 0), VecDeque::new(), writer)
    }

    /// The log an earlier node process wrote at `path`, to go on with. A
    /// tail cut short by a crash mid-write is cut off.
    pub fn restore(session_id: &str, path: &Path, writer: &LogWriter) -> std::io::Result<(Self, Recovered)> {
        let scanned = file::scan(session_id, path, RING_EVENTS)?;
        let file = OpenOptions::new().append(true).open(path)?;
        if file.metadata()?.len() > scanned.valid_len {
            tracing::warn!(path = %path.display(), keep = scanned.valid_len, "event log ends in a partial or bad line; cut off");
            file.set_len(scanned.valid_len)?;
        }
        let log_file = LogFile::new(path.to_owned(), Some(file), scanned.valid_len, scanned.index, scanned.last_seq);
        let log = Self::with(session_id, log_file, scanned.tail, writer);
        Ok((log, Recovered { active: scanned.active, runs: scanned.runs }))
    }

    fn with(session_id: &str, file: Arc<LogFile>, tail: VecDeque<(Arc<SessionEvent>, usize)>, writer: &LogWriter) -> Self {
        let next_seq = file.durable.borrow().0 + 1;
        let bytes = tail.iter().map(|(_, n)| n).sum();
        let ring = Ring { events: tail, bytes, next_seq };
        Self { session_id: session_id.to_string(), ring: Mutex::new(ring), file, writer: writer.clone() }
    }

    /// Appends one event. Returns its sequence number.
    pub fn append(&self, run_id: &str, event: Event) -> u64 {
        self.append_turn(run_id, event, 0)
    }

    /// Appends one event of a turn, with the supervisor's number for it
    /// (`turn`; 0 for events the node adds). Returns its sequence number.
    pub fn append_turn(&self, run_id: &str, event: Event, turn: u64) -> u64 {
        let mut ring = self.ring.lock().unwrap();
        let seq = ring.next_seq;
        ring.next_seq += 1;
        let event = Arc::new(SessionEvent {
            seq,
            session_id: self.session_id.clone(),
            run_id: run_id.to_string(),
            ts_ms: now_ms(),
            event: Some(event),
        });
        let line = file::encode(&event, turn);
        let len = line.len();
        // Queued under the lock: the writer gets each log's lines in order.
        self.writer.write(&self.file, seq, line);
        ring.bytes += len;
        ring.events.push_back((event, len));
        while ring.events.len() > RING_EVENTS || (ring.bytes > RING_BYTES && ring.events.len() > 1) {
            let (_, old) = ring.events.pop_front().expect("not empty");
            ring.bytes -= old;
        }
        seq
    }

    /// Waits until event `seq` is on disk (or the log is closed).
    pub async fn written(&self, seq: u64) {
        let mut durable = self.file.durable.subscribe();
        let _ = durable.wait_for(|(last, closed)| *last >= seq || *closed).await;
    }

    /// Marks the log finished: readers end once they have read everything.
    pub fn close(&self) {
        self.writer.close(&self.file);
    }

    /// The last event on disk: what readers can be given.
    pub fn last_seq(&self) -> u64 {
        self.file.durable.borrow().0
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Events `next..=last` (a batch), from memory or else from the file;
    /// returns them and the next number to read. Events the file cannot
    /// give back (a failed write, a damaged file) are skipped, with a
    /// warning, rather than stalling the reader.
    async fn batch(&self, next: u64, last: u64) -> (Vec<Arc<SessionEvent>>, u64) {
        // From memory when it holds `next`; else the file, up to what memory holds.
        let upto = {
            let ring = self.ring.lock().unwrap();
            match ring.events.front().map(|(e, _)| e.seq) {
                Some(first) if next >= first => {
                    let skip = (next - first) as usize;
                    let events: Vec<_> = ring.events.iter().skip(skip).map(|(e, _)| e).take_while(|e| e.seq <= last).take(BATCH).cloned().collect();
                    let after = events.last().map_or(last + 1, |e| e.seq + 1);
                    return (events, after);
                }
                Some(first) => (first - 1).min(last),
                None => last,
            }
        };
        self.read_file(next, upto).await
    }

    async fn read_file(&self, next: u64, upto: u64) -> (Vec<Arc<SessionEvent>>, u64) {
        let (session, path, offset) = (self.session_id.clone(), self.file.path.clone(), self.file.offset_for(next));
        let read = tokio::task::spawn_blocking(move || file::read(&session, &path, offset, next, upto, BATCH)).await;
        match read {
            Ok(Ok(events)) if events.first().is_some_and(|e| e.seq == next) => {
                let after = events.last().map_or(next, |e| e.seq + 1);
                (events, after)
            }
            other => {
                let why = match other {
                    Ok(Ok(_)) => "not in the file".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(session = self.session_id, from = next, to = upto, why, "events cannot be read back from the log file; skipped");
                (Vec::new(), upto + 1)
            }
        }
    }

    /// Events after `after_seq`, then live ones until the log is closed.
    pub fn follow(self: Arc<Self>, after_seq: u64) -> impl Stream<Item = Arc<SessionEvent>> + Send + 'static {
        let mut durable = self.file.durable.subscribe();
        async_stream::stream! {
            let mut next = after_seq + 1;
            loop {
                let (last, closed) = *durable.borrow_and_update();
                if next <= last {
                    let (batch, after) = self.batch(next, last).await;
                    next = after;
                    for event in batch {
                        yield event;
                    }
                    continue;
                }
                if closed || durable.changed().await.is_err() {
                    return;
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

    fn update(i: usize) -> Event {
        Event::SessionUpdate(SessionUpdate { acp_update: format!("{{\"n\":{i}}}") })
    }

    #[tokio::test]
    async fn replays_from_any_point_then_follows_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let writer = LogWriter::start().unwrap();
        let log = Arc::new(EventLog::create("ses_1", &dir.path().join("events.jsonl"), &writer));
        for i in 0..3 {
            log.append("run_1", update(i));
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
        let writer = LogWriter::start().unwrap();
        let log = Arc::new(EventLog::create("ses_1", &dir.path().join("events.jsonl"), &writer));
        let mut stream = Box::pin(Arc::clone(&log).follow(0));
        let next = tokio::spawn(async move { stream.next().await.map(|e| e.seq) });
        tokio::task::yield_now().await;
        log.append("run_1", Event::RunStarted(RunStarted {}));
        assert_eq!(next.await.unwrap(), Some(1));
    }

    #[tokio::test]
    async fn memory_holds_the_newest_and_older_events_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let writer = LogWriter::start().unwrap();
        let log = Arc::new(EventLog::create("ses_1", &dir.path().join("events.jsonl"), &writer));
        let total = RING_EVENTS * 3 + 7;
        for i in 0..total {
            log.append("run_1", update(i));
        }
        log.close();
        assert_eq!(log.ring.lock().unwrap().events.len(), RING_EVENTS, "bounded in memory");
        let all: Vec<u64> = Arc::clone(&log).follow(0).map(|e| e.seq).collect().await;
        assert_eq!(all, (1..=total as u64).collect::<Vec<_>>(), "every event once, in order");
        let from_500: Vec<String> = Arc::clone(&log)
            .follow(500)
            .take(2)
            .map(|e| match e.event.as_ref() {
                Some(Event::SessionUpdate(u)) => u.acp_update.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
            .await;
        assert_eq!(from_500, [r#"{"n":500}"#, r#"{"n":501}"#], "read back from the file as written");
    }

    #[tokio::test]
    async fn a_restored_log_numbers_on_and_knows_its_running_turn() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let writer = LogWriter::start().unwrap();
        let log = EventLog::create("ses_1", &path, &writer);
        log.append("run_1", Event::RunStarted(RunStarted {}));
        log.append_turn("run_1", update(0), 1);
        log.append_turn("run_1", Event::RunCompleted(RunCompleted { stop_reason: "end_turn".into() }), 2);
        log.append("run_2", Event::RunStarted(RunStarted {}));
        log.append_turn("run_2", update(1), 1);
        let last = log.append_turn("run_2", update(2), 2);
        log.written(last).await;
        drop(log);
        // A crash mid-write: half a line at the end.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(br#"{"seq":7,"kind":"session.upd"#);
        std::fs::write(&path, &bytes).unwrap();

        let (log, recovered) = EventLog::restore("ses_1", &path, &writer).unwrap();
        assert_eq!(recovered.active, Some(("run_2".to_string(), 2)), "run_2 runs, logged to its event 2");
        assert_eq!(Vec::from(recovered.runs), ["run_1", "run_2"]);
        assert_eq!(log.last_seq(), 6);
        let seq = log.append_turn("run_2", update(3), 3);
        assert_eq!(seq, 7, "numbers go on after the last whole line");
        log.written(seq).await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 7, "{text}");
        assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "the torn line is gone: {text}");
    }
}
