//! The node's one thread that writes event log files, so that no write (a
//! disk that stalls, dirty-page throttling) ever blocks the async
//! executor's threads. Appends queue here in order; the thread writes each
//! log's queued lines in one `write` where it can, then moves that log's
//! durable head ([`LogFile::durable`]), which is what readers follow.
//!
//! A line is on disk (in the page cache: the daemon's crash keeps it)
//! before any reader sees its event, so whatever a client was sent
//! survives a crash of the node under the same number, and a restarted node
//! numbers on from exactly what its predecessor's clients could have seen.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use super::file::INDEX_EVERY;

/// One session's file, shared by its log and the writer thread.
pub struct LogFile {
    pub path: PathBuf,
    handle: Mutex<Handle>,
    /// (seq, byte offset of its line), every [`INDEX_EVERY`] events.
    index: Mutex<Vec<(u64, u64)>>,
    /// The last sequence number on disk, and whether the log is closed (set
    /// after its last line is written).
    pub durable: watch::Sender<(u64, bool)>,
}

struct Handle {
    /// `None` when the file could not be opened: the log serves from memory.
    file: Option<File>,
    /// Bytes in the file: the offset of the next line.
    len: u64,
    /// A write failed: said once, then the log serves from memory.
    failed: bool,
}

impl LogFile {
    pub fn new(path: PathBuf, file: Option<File>, len: u64, index: Vec<(u64, u64)>, last_seq: u64) -> Arc<Self> {
        Arc::new(LogFile {
            path,
            handle: Mutex::new(Handle { file, len, failed: false }),
            index: Mutex::new(index),
            durable: watch::Sender::new((last_seq, false)),
        })
    }

    /// Where to start reading to find `seq`: the start of a line at or
    /// before it.
    pub fn offset_for(&self, seq: u64) -> u64 {
        let index = self.index.lock().unwrap();
        match index.partition_point(|(s, _)| *s <= seq) {
            0 => 0,
            i => index[i - 1].1,
        }
    }

    /// Appends `buf` (whole lines; `marks` are (seq, offset in `buf`) of the
    /// lines to index) and makes them visible to readers up to `last`.
    fn write(&self, buf: &[u8], marks: &[(u64, u64)], last: u64) {
        let mut handle = self.handle.lock().unwrap();
        let start = handle.len;
        let failed = handle.failed;
        let written = match handle.file.as_mut() {
            Some(file) if !failed => file.write_all(buf),
            _ => Err(std::io::Error::other("not open")),
        };
        match written {
            Ok(()) => {
                handle.len += buf.len() as u64;
                self.index.lock().unwrap().extend(marks.iter().map(|(seq, at)| (*seq, start + at)));
            }
            Err(e) => {
                if !handle.failed {
                    tracing::error!(path = %self.path.display(), error = %e, "event log write failed: the log serves from memory only from here");
                    handle.failed = true;
                }
            }
        }
        drop(handle);
        // Moved on even when the write failed: readers must not stall.
        self.durable.send_modify(|d| d.0 = d.0.max(last));
    }

    fn close(&self) {
        self.durable.send_modify(|d| d.1 = true);
    }
}

enum Op {
    Write { file: Arc<LogFile>, seq: u64, line: Vec<u8> },
    Close(Arc<LogFile>),
    Sync(oneshot::Sender<()>),
}

/// The writer thread's queue. Cloned into every log; the thread ends when
/// the last clone goes.
#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::Sender<Op>,
}

/// Ops taken off the queue per round, so one busy log cannot starve a
/// reader waiting on another log's durable head for long.
const ROUND: usize = 1024;

impl LogWriter {
    pub fn start() -> std::io::Result<LogWriter> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new().name("event-log-writer".into()).spawn(move || run(rx))?;
        Ok(LogWriter { tx })
    }

    /// Queues `line` (event `seq`) for `file`. Must be called in `seq`
    /// order for each file (the log holds its lock).
    pub(super) fn write(&self, file: &Arc<LogFile>, seq: u64, line: Vec<u8>) {
        if self.tx.send(Op::Write { file: Arc::clone(file), seq, line }).is_err() {
            // The thread is gone (it panicked): memory only.
            file.durable.send_modify(|d| d.0 = d.0.max(seq));
        }
    }

    /// Marks `file` closed once everything queued for it is written.
    pub(super) fn close(&self, file: &Arc<LogFile>) {
        if self.tx.send(Op::Close(Arc::clone(file))).is_err() {
            file.close();
        }
    }

    /// Waits until everything queued so far is written.
    pub async fn sync(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Op::Sync(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

fn run(rx: mpsc::Receiver<Op>) {
    // The lines queued for one file, written together.
    struct Pending {
        file: Arc<LogFile>,
        buf: Vec<u8>,
        marks: Vec<(u64, u64)>,
        last: u64,
    }
    let flush = |pending: &mut Option<Pending>| {
        if let Some(p) = pending.take() {
            p.file.write(&p.buf, &p.marks, p.last);
        }
    };
    while let Ok(first) = rx.recv() {
        let mut pending: Option<Pending> = None;
        let mut op = Some(first);
        let mut taken = 1;
        while let Some(current) = op.take() {
            match current {
                Op::Write { file, seq, line } => {
                    if pending.as_ref().is_some_and(|p| !Arc::ptr_eq(&p.file, &file)) {
                        flush(&mut pending);
                    }
                    let p = pending.get_or_insert_with(|| Pending { file, buf: Vec::new(), marks: Vec::new(), last: 0 });
                    if seq % INDEX_EVERY == 1 {
                        p.marks.push((seq, p.buf.len() as u64));
                    }
                    p.buf.extend_from_slice(&line);
                    p.last = seq;
                }
                Op::Close(file) => {
                    flush(&mut pending);
                    file.close();
                }
                Op::Sync(done) => {
                    flush(&mut pending);
                    let _ = done.send(());
                }
            }
            if taken < ROUND {
                op = rx.try_recv().ok();
                taken += 1;
            }
        }
        flush(&mut pending);
    }
}
