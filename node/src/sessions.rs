//! ACP sessions held on this node, each with its event log and at most one
//! running turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentd_proto::error::status;
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::event_log::EventLog;

/// How long closing a container waits for its turns to record their end.
const RUN_DRAIN: Duration = Duration::from_secs(2);

pub struct NodeSession {
    pub session_id: String,
    pub container_id: String,
    pub agent_instance_id: String,
    pub acp_session_id: String,
    pub log: Arc<EventLog>,
    /// The running turn's run id, if any.
    active_run: watch::Sender<Option<String>>,
}

impl NodeSession {
    pub fn new(session_id: String, container_id: String, agent_instance_id: String, acp_session_id: String, log: EventLog) -> Self {
        Self { session_id, container_id, agent_instance_id, acp_session_id, log: Arc::new(log), active_run: watch::Sender::new(None) }
    }

    /// Claims the session for a turn; refused while another turn runs.
    pub fn begin_run(&self, run_id: &str) -> Result<(), Status> {
        let mut claimed = false;
        self.active_run.send_if_modified(|active| {
            if active.is_none() {
                *active = Some(run_id.to_string());
                claimed = true;
            }
            claimed
        });
        if claimed {
            return Ok(());
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

    /// Registers a session, or returns the one already registered under its id.
    pub fn insert(&self, session: NodeSession) -> Arc<NodeSession> {
        let mut table = self.table.lock().unwrap();
        Arc::clone(table.entry(session.session_id.clone()).or_insert_with(|| Arc::new(session)))
    }

    /// Forgets one session once its turn (cancelled by the close) has
    /// recorded how it ended, and closes its log so that followers finish.
    pub async fn close_one(&self, session_id: &str) {
        let Some(session) = self.table.lock().unwrap().remove(session_id) else { return };
        let mut active = session.active_run.subscribe();
        let _ = tokio::time::timeout(RUN_DRAIN, active.wait_for(|r| r.is_none())).await;
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
