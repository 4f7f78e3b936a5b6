//! `session/request_permission`, decided by the session's policy.
//!
//! - `allow` / `deny`: answered at once with the first option of the matching
//!   kind (`allow_once` before `allow_always`, `reject_once` before
//!   `reject_always`); a deny with no reject option is answered `cancelled`.
//! - `ask`: the request goes out on the running turn's stream as a
//!   `permission.requested` event and waits for a client's answer
//!   ([`Permissions::answer`]) until the policy's timeout, then falls back to
//!   denying. A request outside a turn has nobody to ask and is denied.
//! - `session/cancel` answers every pending request of the session
//!   `cancelled`, as the spec requires.
//!
//! Each outcome is also reported as a `permission.resolved` event, saying who
//! decided (client, policy, timeout or cancel). When the agent itself drops
//! an asked request (`$/cancel_request`; the connection answers it
//! `-32800`), the pending entry goes and the event says `"by": "agent"`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use agentd_proto::common::permission_resolved::By;
use agentd_proto::common::{PermissionMode, PermissionRequested, PermissionResolved};

use super::turns::{Sink, TurnEvent};
use agentd_acp::ErrorObject;

pub const DEFAULT_ASK_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Allow,
    Deny,
    Ask,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub ask_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self { mode: Mode::Ask, ask_timeout: DEFAULT_ASK_TIMEOUT }
    }
}

impl Policy {
    /// From the session's fields; unspecified or zero means the default.
    pub fn new(mode: PermissionMode, timeout_ms: u32) -> Policy {
        let mode = match mode {
            PermissionMode::Unspecified | PermissionMode::Ask => Mode::Ask,
            PermissionMode::Allow => Mode::Allow,
            PermissionMode::Deny => Mode::Deny,
        };
        let ask_timeout = if timeout_ms == 0 { DEFAULT_ASK_TIMEOUT } else { Duration::from_millis(timeout_ms.into()) };
        Policy { mode, ask_timeout }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct PermissionOption {
    #[serde(rename = "optionId")]
    option_id: String,
    kind: String,
}

#[derive(Debug, Deserialize)]
struct Request {
    #[serde(rename = "sessionId")]
    session_id: String,
    #[serde(rename = "toolCall", default)]
    tool_call: Value,
    options: Vec<PermissionOption>,
}

enum Outcome {
    Selected(String),
    Cancelled,
}

impl Outcome {
    fn to_json(&self) -> Value {
        match self {
            Outcome::Selected(id) => json!({"outcome": {"outcome": "selected", "optionId": id}}),
            Outcome::Cancelled => json!({"outcome": {"outcome": "cancelled"}}),
        }
    }

    /// The chosen option's id; empty when cancelled.
    fn selected(&self) -> String {
        match self {
            Outcome::Selected(id) => id.clone(),
            Outcome::Cancelled => String::new(),
        }
    }
}

struct Pending {
    session_id: String,
    option_ids: Vec<String>,
    answer: oneshot::Sender<Outcome>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("no pending permission request {0} (answered, timed out, cancelled, or never asked)")]
    Unknown(String),
    #[error("option {option:?} is not one of the request's options {options:?}")]
    UnknownOption { option: String, options: Vec<String> },
}

/// An asked request being waited on. Dropped while waiting means the agent
/// cancelled it (the handler's future was dropped): forget the request and
/// tell the turn.
struct Asked<'a> {
    permissions: &'a Permissions,
    request_id: &'a str,
    sink: &'a Sink,
    tool_call: &'a Value,
}

impl Drop for Asked<'_> {
    fn drop(&mut self) {
        self.permissions.pending.lock().unwrap().remove(self.request_id);
        let resolved = PermissionResolved {
            request_id: self.request_id.to_string(),
            acp_tool_call: self.tool_call.to_string(),
            by: By::Agent.into(),
            selected_option_id: Outcome::Cancelled.selected(),
        };
        self.sink.send_now(TurnEvent::PermissionResolved(resolved));
    }
}

/// Pending requests and policies of one agent's sessions.
#[derive(Default)]
pub struct Permissions {
    policies: Mutex<HashMap<String, Policy>>,
    pending: Mutex<HashMap<String, Pending>>,
    next: AtomicU64,
}

fn pick(options: &[PermissionOption], kinds: &[&str]) -> Option<String> {
    kinds.iter().find_map(|k| options.iter().find(|o| o.kind == *k).map(|o| o.option_id.clone()))
}

fn by_policy(options: &[PermissionOption], mode: Mode) -> Outcome {
    let chosen = match mode {
        Mode::Allow => pick(options, &["allow_once", "allow_always"]),
        Mode::Deny | Mode::Ask => pick(options, &["reject_once", "reject_always"]),
    };
    chosen.map(Outcome::Selected).unwrap_or(Outcome::Cancelled)
}

impl Permissions {
    pub fn set_policy(&self, session_id: &str, policy: Policy) {
        self.policies.lock().unwrap().insert(session_id.to_string(), policy);
    }

    /// Serves one `session/request_permission`; `turn` is the running turn's
    /// event sink, if a turn runs on the session.
    pub async fn request(&self, params: Option<&str>, turn: impl Fn(&str) -> Option<Sink>) -> Result<Value, ErrorObject> {
        let invalid = |m: String| ErrorObject { code: -32602, message: m, data: None };
        let request: Request = serde_json::from_str(params.unwrap_or("null")).map_err(|e| invalid(format!("invalid permission request: {e}")))?;
        let policy = self.policies.lock().unwrap().get(&request.session_id).copied();
        let Some(policy) = policy else {
            return Err(invalid(format!("unknown session {}", request.session_id)));
        };
        let sink = turn(&request.session_id);
        let (outcome, by, request_id) = match (policy.mode, sink.as_ref()) {
            (Mode::Ask, Some(sink)) => {
                let request_id = format!("perm_{}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
                let (tx, rx) = oneshot::channel();
                let option_ids = request.options.iter().map(|o| o.option_id.clone()).collect();
                self.pending.lock().unwrap().insert(
                    request_id.clone(),
                    Pending { session_id: request.session_id.clone(), option_ids, answer: tx },
                );
                let options: Value = serde_json::from_str(params.unwrap_or("null"))
                    .ok()
                    .and_then(|v: Value| v.get("options").cloned())
                    .unwrap_or(Value::Null);
                let requested = PermissionRequested {
                    request_id: request_id.clone(),
                    acp_tool_call: request.tool_call.to_string(),
                    acp_options: options.to_string(),
                    timeout_ms: policy.ask_timeout.as_millis() as u64,
                };
                sink.send(TurnEvent::PermissionRequested(requested)).await;
                let guard = Asked { permissions: self, request_id: &request_id, sink, tool_call: &request.tool_call };
                let answered = tokio::time::timeout(policy.ask_timeout, rx).await;
                std::mem::forget(guard);
                match answered {
                    Ok(Ok(outcome)) => {
                        let by = if matches!(outcome, Outcome::Cancelled) { By::Cancel } else { By::Client };
                        (outcome, by, Some(request_id))
                    }
                    _ => {
                        self.pending.lock().unwrap().remove(&request_id);
                        (by_policy(&request.options, Mode::Deny), By::Timeout, Some(request_id))
                    }
                }
            }
            (mode, _) => (by_policy(&request.options, mode), By::Policy, None),
        };
        if let Some(sink) = sink {
            let resolved = PermissionResolved {
                request_id: request_id.unwrap_or_default(),
                acp_tool_call: request.tool_call.to_string(),
                by: by.into(),
                selected_option_id: outcome.selected(),
            };
            sink.send(TurnEvent::PermissionResolved(resolved)).await;
        }
        Ok(outcome.to_json())
    }

    /// A client's answer to a pending request.
    pub fn answer(&self, request_id: &str, option_id: &str) -> Result<(), AnswerError> {
        let mut pending = self.pending.lock().unwrap();
        let Some(p) = pending.get(request_id) else { return Err(AnswerError::Unknown(request_id.to_string())) };
        if !p.option_ids.iter().any(|o| o == option_id) {
            return Err(AnswerError::UnknownOption { option: option_id.to_string(), options: p.option_ids.clone() });
        }
        let p = pending.remove(request_id).expect("checked above");
        let _ = p.answer.send(Outcome::Selected(option_id.to_string()));
        Ok(())
    }

    /// Answers every pending request of `session_id` `cancelled`.
    pub fn cancel_session(&self, session_id: &str) {
        let mut pending = self.pending.lock().unwrap();
        let ids: Vec<String> = pending.iter().filter(|(_, p)| p.session_id == session_id).map(|(id, _)| id.clone()).collect();
        for id in ids {
            if let Some(p) = pending.remove(&id) {
                let _ = p.answer.send(Outcome::Cancelled);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    const REQUEST: &str = r#"{"sessionId":"s1","toolCall":{"toolCallId":"t1","title":"rm -rf"},
        "options":[{"optionId":"yes","name":"Allow","kind":"allow_once"},{"optionId":"no","name":"Reject","kind":"reject_once"}]}"#;

    fn perms(mode: Mode, timeout_ms: u64) -> Permissions {
        let p = Permissions::default();
        p.set_policy("s1", Policy { mode, ask_timeout: Duration::from_millis(timeout_ms) });
        p
    }

    #[tokio::test]
    async fn allow_and_deny_pick_the_matching_kind() {
        let allow = perms(Mode::Allow, 10).request(Some(REQUEST), |_| None).await.unwrap();
        assert_eq!(allow["outcome"]["optionId"], "yes");
        let deny = perms(Mode::Deny, 10).request(Some(REQUEST), |_| None).await.unwrap();
        assert_eq!(deny["outcome"]["optionId"], "no");
        let only_allow = REQUEST.replace(r#",{"optionId":"no","name":"Reject","kind":"reject_once"}"#, "");
        let none = perms(Mode::Deny, 10).request(Some(&only_allow), |_| None).await.unwrap();
        assert_eq!(none["outcome"]["outcome"], "cancelled");
    }

    #[tokio::test]
    async fn ask_waits_for_the_answer_and_rejects_unknown_options() {
        let p = std::sync::Arc::new(perms(Mode::Ask, 5_000));
        let (tx, mut rx) = mpsc::channel(8);
        let asking = tokio::spawn({
            let p = std::sync::Arc::clone(&p);
            async move { p.request(Some(REQUEST), move |_| Some(Sink::Collect(tx.clone()))).await }
        });
        let TurnEvent::PermissionRequested(requested) = rx.recv().await.unwrap() else { panic!("expected a request") };
        let id = requested.request_id.clone();
        let options: Value = serde_json::from_str(&requested.acp_options).unwrap();
        assert_eq!(options[0]["optionId"], "yes");
        assert!(matches!(p.answer(&id, "maybe"), Err(AnswerError::UnknownOption { .. })));
        p.answer(&id, "yes").unwrap();
        assert_eq!(asking.await.unwrap().unwrap()["outcome"]["optionId"], "yes");
        let TurnEvent::PermissionResolved(resolved) = rx.recv().await.unwrap() else { panic!("expected a resolution") };
        assert_eq!((resolved.by(), resolved.selected_option_id.as_str()), (By::Client, "yes"));
        assert_eq!(p.answer(&id, "yes"), Err(AnswerError::Unknown(id.clone())), "answered once only");
    }

    #[tokio::test]
    async fn ask_times_out_to_deny_and_cancel_answers_cancelled() {
        let (tx, _rx) = mpsc::channel(8);
        let timed_out = perms(Mode::Ask, 30).request(Some(REQUEST), move |_| Some(Sink::Collect(tx.clone()))).await.unwrap();
        assert_eq!(timed_out["outcome"]["optionId"], "no");

        let p = std::sync::Arc::new(perms(Mode::Ask, 5_000));
        let (tx, mut rx) = mpsc::channel(8);
        let asking = tokio::spawn({
            let p = std::sync::Arc::clone(&p);
            async move { p.request(Some(REQUEST), move |_| Some(Sink::Collect(tx.clone()))).await }
        });
        rx.recv().await.unwrap();
        p.cancel_session("s1");
        assert_eq!(asking.await.unwrap().unwrap()["outcome"]["outcome"], "cancelled");
    }

    #[tokio::test]
    async fn ask_outside_a_turn_denies_and_unknown_sessions_are_errors() {
        let outside = perms(Mode::Ask, 5_000).request(Some(REQUEST), |_| None).await.unwrap();
        assert_eq!(outside["outcome"]["optionId"], "no");
        let err = Permissions::default().request(Some(REQUEST), |_| None).await.unwrap_err();
        assert_eq!(err.code, -32602);
    }
}
