//! A turn's events, kept by the supervisor apart from any stream that reads
//! them, so that a turn outlives the node's `Prompt` stream: when the node
//! daemon stops or crashes (live restore), the agent goes on, its events
//! pile up here, and the restarted node takes them up where its log ends
//! (`AttachTurn`), then the rest live, up to the terminal event.
//!
//! Each event is numbered within its turn from 1 (`PromptEvent.index`); the
//! node records the number of each event it logs, so it knows where to ask
//! from and can skip any it has already.
//!
//! Bounds: the newest [`KEEP_EVENTS`] events and [`KEEP_BYTES`] are kept
//! (older ones were read by a node long ago, or the node was away for a
//! turn that large; an attach past them starts at the oldest kept, and the
//! node sees the jump in numbers). While a node reads, the agent is held to
//! its pace ([`PACE`] events ahead at most), as the bounded channel before
//! this did; while none does, nothing waits.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use agentd_proto::supervisor::{PromptEvent, prompt_event};
use futures::Stream;
use prost::Message;
use tokio::sync::{mpsc, watch};

/// One event of a running turn, in the order the agent produced it.
#[derive(Debug)]
pub enum TurnEvent {
    /// `session/update` params, verbatim.
    Update(String),
    Stopped(String),
    Failed(String),
    // Events agentd adds to the turn.
    PermissionRequested(agentd_proto::common::PermissionRequested),
    PermissionResolved(agentd_proto::common::PermissionResolved),
    ProtocolError(agentd_proto::common::AgentProtocolError),
}

impl TurnEvent {
    fn into_proto(self, index: u64) -> PromptEvent {
        let event = match self {
            TurnEvent::Update(json) => prompt_event::Event::AcpUpdate(json),
            TurnEvent::Stopped(reason) => prompt_event::Event::StopReason(reason),
            TurnEvent::Failed(error) => prompt_event::Event::Error(error),
            TurnEvent::PermissionRequested(e) => prompt_event::Event::PermissionRequested(e),
            TurnEvent::PermissionResolved(e) => prompt_event::Event::PermissionResolved(e),
            TurnEvent::ProtocolError(e) => prompt_event::Event::AgentProtocolError(e),
        };
        PromptEvent { index, event: Some(event) }
    }
}

/// Events kept per turn at most.
pub const KEEP_EVENTS: usize = 4096;
/// Bytes of events kept per turn at most (as encoded).
pub const KEEP_BYTES: usize = 4 << 20;
/// How far the agent may run ahead of a node that reads the turn.
pub const PACE: u64 = 1024;
/// Events handed to a reader per look at the buffer.
const BATCH: usize = 256;
/// Events kept once a reader has taken the terminal event: the node has
/// them all but for the few its log may not have written yet when it dies
/// right then; an idle sandbox does not hold its last turn whole.
const KEEP_AFTER_END: usize = 256;

pub struct Turn {
    /// The node's name for it (its run id): an attach must name it, so that a
    /// node that restarted never takes an earlier turn's events for its run's.
    pub id: String,
    kept: Mutex<Kept>,
    /// The last index pushed, and whether the terminal event is among them.
    head: watch::Sender<(u64, bool)>,
    /// The reader the agent is held to: (reader, last index it took). The
    /// newest reader wins; `None` while no node reads.
    reader: watch::Sender<Option<(u64, u64)>>,
    readers: AtomicU64,
}

struct Kept {
    events: VecDeque<Arc<PromptEvent>>,
    bytes: usize,
}

impl Turn {
    pub fn new(id: String) -> Arc<Self> {
        Arc::new(Turn {
            id,
            kept: Mutex::new(Kept { events: VecDeque::new(), bytes: 0 }),
            head: watch::Sender::new((0, false)),
            reader: watch::Sender::new(None),
            readers: AtomicU64::new(0),
        })
    }

    /// Adds an event, first waiting while a reader is [`PACE`] events behind.
    pub async fn push(&self, event: TurnEvent) {
        let mut reader = self.reader.subscribe();
        loop {
            let last = self.head.borrow().0;
            let lagging = matches!(*reader.borrow_and_update(), Some((_, at)) if last.saturating_sub(at) >= PACE);
            if !lagging || reader.changed().await.is_err() {
                break;
            }
        }
        self.push_now(event, false);
    }

    /// Adds an event at once, from code that cannot wait.
    pub fn push_now(&self, event: TurnEvent, terminal: bool) {
        let mut kept = self.kept.lock().unwrap();
        let (last, ended) = *self.head.borrow();
        if ended {
            // Nothing follows a turn's end (an agent's late update).
            return;
        }
        let event = Arc::new(event.into_proto(last + 1));
        kept.bytes += event.encoded_len();
        kept.events.push_back(event);
        while kept.events.len() > 1 && (kept.events.len() > KEEP_EVENTS || kept.bytes > KEEP_BYTES) {
            let old = kept.events.pop_front().expect("more than one");
            kept.bytes -= old.encoded_len();
        }
        // Under the lock: readers see events in the order of their numbers.
        self.head.send_replace((last + 1, terminal));
    }

    /// Ends the turn with its terminal event (`Stopped` or `Failed`).
    pub fn finish(&self, event: TurnEvent) {
        self.push_now(event, true);
    }

    pub fn is_finished(&self) -> bool {
        self.head.borrow().1
    }

    /// Keeps the newest `keep` events only.
    fn trim(&self, keep: usize) {
        let mut kept = self.kept.lock().unwrap();
        while kept.events.len() > keep {
            let old = kept.events.pop_front().expect("more than kept");
            kept.bytes -= old.encoded_len();
        }
    }

    /// Drops the events up to `index`: a node that attaches has logged them.
    pub fn forget_through(&self, index: u64) {
        let mut kept = self.kept.lock().unwrap();
        while kept.events.front().is_some_and(|e| e.index <= index) {
            let old = kept.events.pop_front().expect("checked");
            kept.bytes -= old.encoded_len();
        }
    }

    /// The events after `after` (from the oldest kept, if those are gone),
    /// then live ones, ending with the terminal event. The agent is held to
    /// this reader's pace until it is dropped or a newer one comes.
    pub fn follow(self: Arc<Self>, after: u64) -> impl Stream<Item = PromptEvent> + Send + 'static {
        let id = self.readers.fetch_add(1, Ordering::Relaxed);
        self.reader.send_replace(Some((id, after)));
        let guard = ReaderGuard { turn: Arc::clone(&self), id };
        let mut head = self.head.subscribe();
        async_stream::stream! {
            let _guard = guard;
            let mut next = after + 1;
            loop {
                let batch: Vec<Arc<PromptEvent>> = {
                    let kept = self.kept.lock().unwrap();
                    let first = kept.events.front().map_or(next, |e| e.index);
                    let skip = next.saturating_sub(first) as usize;
                    kept.events.iter().skip(skip).take(BATCH).cloned().collect()
                };
                for event in batch {
                    next = event.index + 1;
                    yield (*event).clone();
                }
                self.reader.send_if_modified(|r| match r {
                    Some((reader, at)) if *reader == id => {
                        *at = next - 1;
                        true
                    }
                    _ => false,
                });
                let (last, ended) = *head.borrow_and_update();
                if next > last && ended {
                    self.trim(KEEP_AFTER_END);
                    return;
                }
                if next > last && head.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Lets the agent run free once its reader is gone (the node went away).
struct ReaderGuard {
    turn: Arc<Turn>,
    id: u64,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.turn.reader.send_if_modified(|r| {
            let ours = matches!(r, Some((reader, _)) if *reader == self.id);
            if ours {
                *r = None;
            }
            ours
        });
    }
}

/// Where a session's updates go: the turn running on it, or a collector (the
/// updates a `session/load` replays before its answer).
#[derive(Clone)]
pub enum Sink {
    Turn(Arc<Turn>),
    Collect(mpsc::Sender<TurnEvent>),
}

impl Sink {
    pub async fn send(&self, event: TurnEvent) {
        match self {
            Sink::Turn(turn) => turn.push(event).await,
            Sink::Collect(tx) => {
                let _ = tx.send(event).await;
            }
        }
    }

    /// From code that cannot wait: a collector that is full drops it.
    pub fn send_now(&self, event: TurnEvent) {
        match self {
            Sink::Turn(turn) => turn.push_now(event, false),
            Sink::Collect(tx) => {
                let _ = tx.try_send(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn update(n: usize) -> TurnEvent {
        TurnEvent::Update(format!("{{\"n\":{n}}}"))
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_loses_nothing_and_the_next_takes_up_after_its_last() {
        let turn = Turn::new("run_1".into());
        let first = Arc::clone(&turn).follow(0);
        for n in 0..3 {
            turn.push(update(n)).await;
        }
        let seen: Vec<u64> = first.take(2).map(|e| e.index).collect().await;
        assert_eq!(seen, [1, 2]);
        // The node went away after logging 2; the turn goes on meanwhile.
        for n in 3..5 {
            turn.push(update(n)).await;
        }
        turn.finish(TurnEvent::Stopped("end_turn".into()));
        turn.forget_through(2);
        let rest: Vec<u64> = Arc::clone(&turn).follow(2).map(|e| e.index).collect().await;
        assert_eq!(rest, [3, 4, 5, 6], "the rest, ending with the terminal event");
        let again: Vec<u64> = Arc::clone(&turn).follow(4).map(|e| e.index).collect().await;
        assert_eq!(again, [5, 6], "a node that died before its log had them asks again");
        turn.push_now(update(9), false);
        assert_eq!(turn.head.borrow().0, 6, "nothing after the end");
    }

    #[tokio::test]
    async fn the_agent_waits_for_a_slow_reader_but_not_for_none() {
        let turn = Turn::new("run_1".into());
        for n in 0..(PACE as usize + 10) {
            turn.push(update(n)).await;
        }
        let reader = Arc::clone(&turn).follow(0);
        let blocked = tokio::time::timeout(std::time::Duration::from_millis(50), turn.push(update(0))).await;
        assert!(blocked.is_err(), "a reader at 0 holds the agent back");
        drop(reader);
        tokio::time::timeout(std::time::Duration::from_secs(1), turn.push(update(0))).await.expect("free once the reader is gone");
    }

    #[tokio::test]
    async fn only_the_newest_events_are_kept() {
        let turn = Turn::new("run_1".into());
        for n in 0..(KEEP_EVENTS + 5) {
            turn.push_now(update(n), false);
        }
        turn.finish(TurnEvent::Stopped("end_turn".into()));
        let first = Box::pin(Arc::clone(&turn).follow(0)).next().await.unwrap();
        assert_eq!(first.index, 7, "the oldest kept: the node sees the jump");
    }
}
