//! ACP sessions held on this node, each with its event log and at most one
//! running turn.
//!
//! Each session has a state file, `sessions/<id>.json` in its sandbox's
//! directory ([`SessionFile`], written atomically when it is made and when
//! it closes): which agent and which ACP session it is. With its event log
//! (`<id>.jsonl`, which says which turn was running and how far its events
//! got), that is all a restarted node needs to take the session back.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_proto::error::status;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::event_log::file::RUNS_KEPT;
use crate::event_log::{EventLog, now_ms};

/// How long closing a container waits for its turns to record their end.
const RUN_DRAIN: Duration = Duration::from_secs(2);

/// A session's state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionFile {
    pub session_id: String,
    pub container_id: String,
    pub agent_instance_id: String,
    pub acp_session_id: String,
    pub created_at_ms: i64,
    /// Set when the session closes: it is not taken back after a restart,
    /// and its files go once the node's retention for closed sessions has
    /// passed (`retention.rs`).
    #[serde(default)]
    pub closed_at_ms: Option<i64>,
}

impl SessionFile {
    pub fn path(sessions_dir: &Path, session_id: &str) -> PathBuf {
        sessions_dir.join(format!("{session_id}.json"))
    }

    pub fn log_path(sessions_dir: &Path, session_id: &str) -> PathBuf {
        sessions_dir.join(format!("{session_id}.jsonl"))
    }

    pub fn read(path: &Path) -> Result<SessionFile, String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        crate::state_file::write_atomic(path, &serde_json::to_vec_pretty(self).expect("a session file serializes"))
    }
}

pub struct NodeSession {
    pub session_id: String,
    pub container_id: String,
    pub agent_instance_id: String,
    pub acp_session_id: String,
    pub log: Arc<EventLog>,
    /// The running turn's run id, if any.
    active_run: watch::Sender<Option<String>>,
    /// The newest run ids started here (from the log after a restart): a
    /// prompt retried with one of them was taken already.
    runs: Mutex<VecDeque<String>>,
    /// Its state file.
    file: SessionFile,
    state_path: PathBuf,
}

impl NodeSession {
    /// A session just opened; its state file is written before it counts.
    pub fn create(file: SessionFile, state_path: PathBuf, log: EventLog) -> std::io::Result<Self> {
        file.write(&state_path)?;
        Ok(Self::with(file, state_path, log, None, VecDeque::new()))
    }

    /// A session an earlier node process held, with the turn that was
    /// running (`active`) and the runs its log names.
    pub fn restored(file: SessionFile, state_path: PathBuf, log: EventLog, active: Option<String>, runs: VecDeque<String>) -> Self {
        Self::with(file, state_path, log, active, runs)
    }

    fn with(file: SessionFile, state_path: PathBuf, log: EventLog, active: Option<String>, runs: VecDeque<String>) -> Self {
        Self {
            session_id: file.session_id.clone(),
            container_id: file.container_id.clone(),
            agent_instance_id: file.agent_instance_id.clone(),
            acp_session_id: file.acp_session_id.clone(),
            log: Arc::new(log),
            active_run: watch::Sender::new(active),
            runs: Mutex::new(runs),
            file,
            state_path,
        }
    }

    /// Claims the session for a turn; refused while another turn runs.
    /// `Ok(false)`: this run was taken already (a prompt retried after the
    /// node restarted): nothing is to be done again.
    pub fn begin_run(&self, run_id: &str) -> Result<bool, Status> {
        if self.runs.lock().unwrap().iter().any(|r| r == run_id) {
            return Ok(false);
        }
        let mut claimed = false;
        self.active_run.send_if_modified(|active| {
            if active.is_none() {
                *active = Some(run_id.to_string());
                claimed = true;
            }
            claimed
        });
        if claimed {
            let mut runs = self.runs.lock().unwrap();
            runs.push_back(run_id.to_string());
            if runs.len() > RUNS_KEPT {
                runs.pop_front();
            }
            return Ok(true);
        }
        let running = self.active_run.borrow().clone().unwrap_or_default();
        Err(status(Code::FailedPrecondition, "run_active", format!("run {running} is still running on this session")))
    }

    pub fn end_run(&self) {
        self.active_run.send_replace(None);
    }

    pub fn active_run(&self) -> Option<String> {
        self.active_run.borrow().clone()
    }

    /// Records the session closed in its state file.
    fn mark_closed(&self) {
        let file = SessionFile { closed_at_ms: Some(now_ms()), ..self.file.clone() };
        if let Err(e) = file.write(&self.state_path) {
            tracing::warn!(session = self.session_id, error = %e, "cannot record the session closed: a restart would take it back");
        }
    }
}

#[derive(Default)]
pub struct Sessions {
    table: Mutex<HashMap<String, Arc<NodeSession>>>,
}

impl Sessions {
    pub fn get(&self, id: &str) -> Result<Arc<NodeSession>, Status> {
        self.table
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| status(Code::NotFound, "session_not_found", format!("no session {id} on this node")))
    }

    pub fn of_container(&self, container_id: &str) -> Vec<Arc<NodeSession>> {
        self.table.lock().unwrap().values().filter(|s| s.container_id == container_id).cloned().collect()
    }

    pub fn all(&self) -> Vec<Arc<NodeSession>> {
        self.table.lock().unwrap().values().cloned().collect()
    }

    /// Registers a session, or returns the one already registered under its id.
    pub fn insert(&self, session: NodeSession) -> Arc<NodeSession> {
        let mut table = self.table.lock().unwrap();
        Arc::clone(table.entry(session.session_id.clone()).or_insert_with(|| Arc::new(session)))
    }

    /// Forgets one session once its turn (cancelled by the close) has
    /// recorded how it ended, records it closed, and closes its log so that
    /// followers finish.
    pub async fn close_one(&self, session_id: &str) {
        let Some(session) = self.table.lock().unwrap().remove(session_id) else { return };
        let mut active = session.active_run.subscribe();
        let _ = tokio::time::timeout(RUN_DRAIN, active.wait_for(|r| r.is_none())).await;
        session.mark_closed();
        session.log.close();
    }

    /// Forgets the container's sessions once their turns have recorded how they
    /// ended, and closes their logs so that followers finish.
    pub async fn close_container(&self, container_id: &str) {
        let closing: Vec<Arc<NodeSession>> = {
            let mut table = self.table.lock().unwrap();
            let ids: Vec<String> = table.values().filter(|s| s.container_id == container_id).map(|s| s.session_id.clone()).collect();
            ids.iter().filter_map(|id| table.remove(id)).collect()
        };
        for session in closing {
            let mut active = session.active_run.subscribe();
            let _ = tokio::time::timeout(RUN_DRAIN, active.wait_for(|r| r.is_none())).await;
            session.log.close();
        }
    }
}
