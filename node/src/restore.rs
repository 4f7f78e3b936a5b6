//! Live restore, the sessions' side: after a restart, each sandbox taken
//! back ([`crate::sandboxes::Sandboxes::open`]) gets its sessions back from
//! their state files and event logs (numbers going on where they stopped),
//! and each turn that was running is taken up again: the supervisor kept
//! its events ([`agentd_supervisor`'s `turns`]), the node asks for those
//! after the last it logged, then follows the rest live and ends the run
//! as usual ([`crate::service::Turn::pump`]).

use std::sync::Arc;

use crate::Node;
use crate::event_log::EventLog;
use crate::sandboxes::Sandbox;
use crate::service::Turn;
use crate::sessions::{NodeSession, SessionFile};

/// Takes back the sessions of the sandboxes taken back; returns how many,
/// and how many had a turn running.
pub fn sessions(node: &Arc<Node>) -> (usize, usize) {
    let (mut sessions, mut turns) = (0, 0);
    for sandbox in node.sandboxes.list() {
        let dir = sandbox.sessions_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let file = match SessionFile::read(&path) {
                Ok(file) => file,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = e, "a session's state cannot be read: it is not taken back");
                    continue;
                }
            };
            if file.closed_at_ms.is_some() || file.container_id != sandbox.id {
                continue;
            }
            let log_path = SessionFile::log_path(&dir, &file.session_id);
            let (log, recovered) = match EventLog::restore(&file.session_id, &log_path, &node.log_writer) {
                Ok(restored) => restored,
                Err(e) => {
                    tracing::error!(session = file.session_id, path = %log_path.display(), error = %e, "a session's event log cannot be read: it starts empty");
                    (EventLog::create(&file.session_id, &log_path, &node.log_writer), Default::default())
                }
            };
            let active = recovered.active.clone();
            let session = node.sessions.insert(NodeSession::restored(file, path, log, active.as_ref().map(|(run, _)| run.clone()), recovered.runs));
            sessions += 1;
            tracing::info!(session = session.session_id, container = sandbox.id, last_seq = session.log.last_seq(), running = ?active, "session taken back");
            if let Some((run_id, last)) = active {
                turns += 1;
                take_up(node, &sandbox, session, run_id, last);
            }
        }
    }
    (sessions, turns)
}

/// Reads a turn on from the event after `last`.
fn take_up(node: &Arc<Node>, sandbox: &Arc<Sandbox>, session: Arc<NodeSession>, run_id: String, last: u64) {
    let turn = Turn { node: Arc::clone(node), session, sandbox: Arc::clone(sandbox), run_id };
    tokio::spawn(turn.pump(None, last));
}
