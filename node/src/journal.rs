//! The node's journal: the facts a control plane must record and must not
//! lose, in the order they happened — each turn's end, each sandbox lost.
//!
//! It is the one path by which run ends reach the store: the control plane
//! that holds this node's watch lease reads the journal from its cursor
//! (`WatchJournal`) and records each entry together with the cursor, so an
//! entry is recorded once, whichever control plane holds the lease and
//! however often the stream breaks.
//!
//! Entries are numbered from 1 within an incarnation (`id`, made with the
//! file) and appended to `journal.bin` (length-delimited protobuf records),
//! so a restarted node serves what its predecessor journaled. Only the newest
//! [`KEEP`] entries are kept; a cursor older than that gets `gap_before`.
//! Appends are not fsynced: the journal must survive the daemon's crash,
//! which leaves the page cache intact; a host crash ends the sandboxes too.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agentd_proto::node::JournalEntry;
use agentd_proto::node::journal_entry::Fact;
use futures::Stream;
use prost::Message;
use tokio::sync::watch;

use crate::event_log::now_ms;

/// Entries kept in memory and on disk; the oldest go first.
pub const KEEP: usize = 16_384;

pub struct Journal {
    id: String,
    path: PathBuf,
    inner: Mutex<Inner>,
    /// The last sequence number written, and whether the journal is closed
    /// (the node stops: followers end).
    head: watch::Sender<(u64, bool)>,
}

struct Inner {
    entries: VecDeque<Arc<JournalEntry>>,
    next_seq: u64,
    file: Option<File>,
}

/// Writes `entries` to `path` whole (a temp file renamed over it).
fn rewrite(path: &Path, entries: &VecDeque<Arc<JournalEntry>>) -> std::io::Result<File> {
    let tmp = path.with_extension("bin.tmp");
    let mut file = File::create(&tmp)?;
    let mut buf = Vec::new();
    for e in entries {
        e.encode_length_delimited(&mut buf).expect("a Vec grows");
    }
    file.write_all(&buf)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    OpenOptions::new().append(true).open(path)
}

impl Journal {
    /// Opens the journal in `dir`, keeping what an earlier node wrote.
    pub fn open(dir: &Path) -> std::io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let id_path = dir.join("journal.id");
        let path = dir.join("journal.bin");
        let id = match std::fs::read_to_string(&id_path) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_string(),
            _ => {
                // A new incarnation: whatever entries lie around belong to no id.
                let id = uuid::Uuid::new_v4().simple().to_string();
                let _ = std::fs::remove_file(&path);
                std::fs::write(&id_path, &id)?;
                id
            }
        };
        let records = crate::state_file::read_delimited::<JournalEntry>(&path, "journal");
        let next_seq = records.last().map_or(1, |e| e.seq + 1);
        let skip = records.len().saturating_sub(KEEP);
        let entries: VecDeque<Arc<JournalEntry>> = records.into_iter().skip(skip).map(Arc::new).collect();
        // Rewritten at every start: drops a partial tail and old entries.
        let file = rewrite(&path, &entries)?;
        Ok(Journal { id, path, inner: Mutex::new(Inner { entries, next_seq, file: Some(file) }), head: watch::Sender::new((next_seq - 1, false)) })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Journals `fact`; returns its sequence number.
    pub fn append(&self, fact: Fact) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let entry = Arc::new(JournalEntry { journal_id: self.id.clone(), seq, ts_ms: now_ms(), gap_before: false, fact: Some(fact) });
        inner.entries.push_back(Arc::clone(&entry));
        if inner.entries.len() > 2 * KEEP {
            let drop = inner.entries.len() - KEEP;
            inner.entries.drain(..drop);
            match rewrite(&self.path, &inner.entries) {
                Ok(file) => inner.file = Some(file),
                Err(e) => tracing::error!(error = %e, "cannot compact the journal"),
            }
        } else if let Some(file) = inner.file.as_mut() {
            let mut buf = Vec::new();
            entry.encode_length_delimited(&mut buf).expect("a Vec grows");
            if let Err(e) = file.write_all(&buf) {
                tracing::error!(error = %e, seq, "journal write failed: the entry is served from memory only");
            }
        }
        drop(inner);
        self.head.send_modify(|h| h.0 = seq);
        seq
    }

    /// Ends every follower once it has read what there is.
    pub fn close(&self) {
        self.head.send_modify(|h| h.1 = true);
    }

    /// Entries after the cursor, then live ones until the journal is closed.
    /// A cursor of another journal starts at the first entry.
    pub fn follow(self: Arc<Self>, journal_id: &str, after_seq: u64) -> impl Stream<Item = Arc<JournalEntry>> + Send + 'static {
        let mut next = if journal_id == self.id { after_seq + 1 } else { 1 };
        let mut head = self.head.subscribe();
        async_stream::stream! {
            loop {
                let batch: Vec<Arc<JournalEntry>> = {
                    let inner = self.inner.lock().unwrap();
                    inner.entries.iter().filter(|e| e.seq >= next).cloned().collect()
                };
                for entry in batch {
                    let gap = entry.seq > next;
                    next = entry.seq + 1;
                    if gap {
                        yield Arc::new(JournalEntry { gap_before: true, ..(*entry).clone() });
                    } else {
                        yield entry;
                    }
                }
                let (last, closed) = *head.borrow_and_update();
                if last >= next {
                    continue;
                }
                if closed || head.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::node::{RunCompleted, RunEnded, SandboxLost, run_ended};
    use futures::StreamExt;

    fn ended(run: &str) -> Fact {
        Fact::RunEnded(RunEnded {
            container_id: "ctr_1".into(),
            session_id: "ses_1".into(),
            run_id: run.into(),
            outcome: Some(run_ended::Outcome::Completed(RunCompleted { stop_reason: "end_turn".into() })),
        })
    }

    #[tokio::test]
    async fn serves_from_a_cursor_then_live_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        journal.append(ended("run_1"));
        journal.append(Fact::SandboxLost(SandboxLost { container_id: "ctr_2".into(), reason: "gone".into() }));
        let id = journal.id().to_string();
        let mut stream = Box::pin(Arc::clone(&journal).follow(&id, 1));
        assert_eq!(stream.next().await.unwrap().seq, 2);
        let live = tokio::spawn(async move { stream.next().await.map(|e| e.seq) });
        tokio::task::yield_now().await;
        journal.append(ended("run_3"));
        assert_eq!(live.await.unwrap(), Some(3));

        drop(journal);
        let again = Arc::new(Journal::open(dir.path()).unwrap());
        assert_eq!(again.id(), id, "the same incarnation");
        assert_eq!(again.append(ended("run_4")), 4, "numbers go on");
        let seqs: Vec<u64> = Arc::clone(&again).follow(&id, 0).take(4).map(|e| e.seq).collect().await;
        assert_eq!(seqs, [1, 2, 3, 4]);
    }

    #[tokio::test]
    async fn another_journals_cursor_starts_over_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal.append(ended("run_1"));
        journal.append(ended("run_2"));
        drop(journal);
        // A crash mid-write: half a record at the end.
        let mut bytes = std::fs::read(dir.path().join("journal.bin")).unwrap();
        let torn = bytes[..3].to_vec();
        bytes.extend_from_slice(&torn);
        std::fs::write(dir.path().join("journal.bin"), &bytes).unwrap();
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let first = Box::pin(Arc::clone(&journal).follow("some-other-journal", 7)).next().await.unwrap();
        assert_eq!((first.seq, first.gap_before), (1, false));
        assert_eq!(journal.append(ended("run_3")), 3);
    }

    #[tokio::test]
    async fn a_cursor_older_than_what_is_kept_is_told_of_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        for i in 0..(2 * KEEP + 1) {
            journal.append(ended(&format!("run_{i}")));
        }
        let id = journal.id().to_string();
        let first = Box::pin(Arc::clone(&journal).follow(&id, 3)).next().await.unwrap();
        assert!(first.gap_before && first.seq > 4, "{first:?}");
        let reopened = Journal::open(dir.path()).unwrap();
        assert_eq!(reopened.inner.lock().unwrap().entries.len(), KEEP, "compacted on disk too");
    }
}
