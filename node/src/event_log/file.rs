//! The JSONL file of a session's log: one line per event, as clients see it
//! ([`agentd_proto::events`], which reads back into the typed event), and
//! the two ways it is read back: whole at a node's start ([`scan`]), and a
//! range of old events for a client resuming further back than memory holds
//! ([`read`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use agentd_proto::events;
use agentd_proto::node::SessionEvent;
use agentd_proto::node::session_event::Event;
use serde_json::value::RawValue;

/// One index entry per this many events: where to start reading a range.
pub const INDEX_EVERY: u64 = 256;

/// Run ids remembered per session (see [`Scanned::runs`]).
pub const RUNS_KEPT: usize = 256;

#[derive(serde::Serialize)]
struct LineOut<'a> {
    seq: u64,
    kind: &'a str,
    run_id: &'a str,
    ts_ms: i64,
    data: Option<&'a RawValue>,
    /// The supervisor's number for the event within its turn, for events
    /// that came from it: where a restarted node asks the turn to go on from.
    #[serde(skip_serializing_if = "is_zero")]
    turn: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(serde::Deserialize)]
struct LineIn<'a> {
    seq: u64,
    kind: String,
    run_id: String,
    ts_ms: i64,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    turn: u64,
}

/// The line for `event` (with its newline).
pub fn encode(event: &SessionEvent, turn: u64) -> Vec<u8> {
    let Some(kind_event) = event.event.as_ref() else { return Vec::new() };
    let data = events::data_json(&event.run_id, kind_event);
    let data: Option<&RawValue> = serde_json::from_str(&data).ok();
    let line = LineOut { seq: event.seq, kind: events::kind(kind_event), run_id: &event.run_id, ts_ms: event.ts_ms, data, turn };
    // One write per event at most: formatting straight into the file would
    // issue a write syscall per JSON token.
    let mut buf = serde_json::to_vec(&line).expect("a log line serializes");
    buf.push(b'\n');
    buf
}

/// A line read back: the event, its turn number and its kind's event.
fn decode(session_id: &str, line: &[u8]) -> Option<(SessionEvent, u64)> {
    let line: LineIn = serde_json::from_slice(line).ok()?;
    let event = events::from_wire(&line.kind, line.data.map_or("null", RawValue::get)).ok()?;
    let event = SessionEvent { seq: line.seq, session_id: session_id.to_string(), run_id: line.run_id, ts_ms: line.ts_ms, event: Some(event) };
    Some((event, line.turn))
}

/// What a log file holds, read at a node's start.
#[derive(Debug, Default)]
pub struct Scanned {
    pub last_seq: u64,
    /// Bytes of whole, valid lines; anything after them (a line cut short
    /// by a crash mid-write) is cut off.
    pub valid_len: u64,
    /// (seq, byte offset of its line), every [`INDEX_EVERY`] events.
    pub index: Vec<(u64, u64)>,
    /// The newest `keep` events, for memory, each with its line's length.
    pub tail: VecDeque<(Arc<SessionEvent>, usize)>,
    /// A run started and not ended: the turn the node was running, and the
    /// turn number of its last event logged.
    pub active: Option<(String, u64)>,
    /// The newest run ids started in this log ([`RUNS_KEPT`]): a prompt
    /// retried with one of them was taken already.
    pub runs: VecDeque<String>,
}

/// Reads the whole file. Stops at the first line that is cut short, not
/// JSON, or out of sequence: what follows cannot be trusted, and is cut off
/// by the caller.
pub fn scan(session_id: &str, path: &Path, keep: usize) -> std::io::Result<Scanned> {
    let mut reader = BufReader::new(File::open(path)?);
    let mut scanned = Scanned::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let Some((event, turn)) = decode(session_id, &line) else { break };
        if event.seq != scanned.last_seq + 1 {
            break;
        }
        if event.seq % INDEX_EVERY == 1 {
            scanned.index.push((event.seq, scanned.valid_len));
        }
        match event.event.as_ref() {
            Some(Event::RunStarted(_)) => {
                scanned.active = Some((event.run_id.clone(), 0));
                scanned.runs.push_back(event.run_id.clone());
                if scanned.runs.len() > RUNS_KEPT {
                    scanned.runs.pop_front();
                }
            }
            Some(e) if events::is_run_end(e) && scanned.active.as_ref().is_some_and(|(run, _)| *run == event.run_id) => {
                scanned.active = None;
            }
            _ => {}
        }
        if turn > 0
            && let Some((run, last)) = scanned.active.as_mut()
            && *run == event.run_id
        {
            *last = turn;
        }
        scanned.last_seq = event.seq;
        scanned.valid_len += n as u64;
        scanned.tail.push_back((Arc::new(event), n));
        if scanned.tail.len() > keep {
            scanned.tail.pop_front();
        }
    }
    Ok(scanned)
}

/// Events `next..=upto` (at most `max`), reading from `offset`, the start of
/// a line at or before `next`'s.
pub fn read(session_id: &str, path: &Path, offset: u64, next: u64, upto: u64, max: usize) -> std::io::Result<Vec<Arc<SessionEvent>>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file);
    let mut out = Vec::new();
    let mut line = Vec::new();
    while out.len() < max {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 || line.last() != Some(&b'\n') {
            break;
        }
        let Some((event, _)) = decode(session_id, &line) else { break };
        if event.seq > upto {
            break;
        }
        if event.seq >= next {
            out.push(Arc::new(event));
        }
    }
    Ok(out)
}
