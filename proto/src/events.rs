//! A session event's name and the JSON clients see for it, in one place:
//! the node writes its log with them, the control plane serves SSE and
//! archives with them, and reads either back with [`from_wire`].
//!
//! The agent's own payloads (`session/update` params, a permission request's
//! tool call and options) are carried verbatim: they are ACP's, and agentd
//! must pass fields it does not know through untouched.

use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::common::{AgentProtocolError, PermissionRequested, PermissionResolved, permission_resolved};
use crate::node::session_event::Event;
use crate::node::{EgressProtocol, RunCompleted, RunFailed, RunStarted, SandboxEgressDenied, SandboxOom, SessionEvent, SessionUpdate};

pub const RUN_STARTED: &str = "run.started";
pub const SESSION_UPDATE: &str = "session.update";
pub const RUN_COMPLETED: &str = "run.completed";
pub const RUN_FAILED: &str = "run.failed";
pub const PERMISSION_REQUESTED: &str = "permission.requested";
pub const PERMISSION_RESOLVED: &str = "permission.resolved";
pub const AGENT_PROTOCOL_ERROR: &str = "agent.protocol_error";
pub const SANDBOX_OOM: &str = "sandbox.oom";
pub const SANDBOX_EGRESS_DENIED: &str = "sandbox.egress_denied";
/// Streamed by the control plane to a client that follows a session being
/// created: a stage of its setup (`{"state": "installing"}`). Not in the
/// session's log, so without an id.
pub const SESSION_SETUP: &str = "session.setup";
/// Streamed by the control plane when a session followed while being
/// created failed to start (`{"state", "code", "error"}`); the stream ends.
pub const SESSION_FAILED: &str = "session.failed";
/// Streamed by the control plane as the last event of a stream whose
/// subscriber fell too far behind (`{"last_event_id", "buffer", "detail"}`):
/// it resumes with `Last-Event-ID`. Not in the session's log, so without an id.
pub const STREAM_LAGGED: &str = "stream.lagged";

/// The name of an event's kind, as SSE's `event:` field says it.
pub fn kind(event: &Event) -> &'static str {
    match event {
        Event::RunStarted(_) => RUN_STARTED,
        Event::SessionUpdate(_) => SESSION_UPDATE,
        Event::RunCompleted(_) => RUN_COMPLETED,
        Event::RunFailed(_) => RUN_FAILED,
        Event::PermissionRequested(_) => PERMISSION_REQUESTED,
        Event::PermissionResolved(_) => PERMISSION_RESOLVED,
        Event::AgentProtocolError(_) => AGENT_PROTOCOL_ERROR,
        Event::SandboxOom(_) => SANDBOX_OOM,
        Event::SandboxEgressDenied(_) => SANDBOX_EGRESS_DENIED,
    }
}

/// Whether the event ends its run.
pub fn is_run_end(event: &Event) -> bool {
    matches!(event, Event::RunCompleted(_) | Event::RunFailed(_))
}

/// An agent's JSON, embedded as it came; `null` if it is not JSON (it always
/// is: the supervisor parsed it).
fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_string()).unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

fn by_name(by: permission_resolved::By) -> &'static str {
    match by {
        permission_resolved::By::Unspecified | permission_resolved::By::Policy => "policy",
        permission_resolved::By::Client => "client",
        permission_resolved::By::Timeout => "timeout",
        permission_resolved::By::Cancel => "cancel",
        permission_resolved::By::Agent => "agent",
    }
}

fn by_of(name: &str) -> Option<permission_resolved::By> {
    use permission_resolved::By;
    Some(match name {
        "policy" => By::Policy,
        "client" => By::Client,
        "timeout" => By::Timeout,
        "cancel" => By::Cancel,
        "agent" => By::Agent,
        _ => return None,
    })
}

fn protocol_name(p: EgressProtocol) -> &'static str {
    match p {
        EgressProtocol::Unspecified => "unknown",
        EgressProtocol::Tcp => "tcp",
        EgressProtocol::Udp => "udp",
        EgressProtocol::Dns => "dns",
    }
}

fn protocol_of(name: &str) -> EgressProtocol {
    match name {
        "tcp" => EgressProtocol::Tcp,
        "udp" => EgressProtocol::Udp,
        "dns" => EgressProtocol::Dns,
        _ => EgressProtocol::Unspecified,
    }
}

/// The event's data as clients see it (SSE `data:`, archives, the node's log).
pub fn data_json(run_id: &str, event: &Event) -> String {
    let value = match event {
        Event::SessionUpdate(u) => return u.acp_update.clone(),
        Event::RunStarted(_) => json!({"run_id": run_id}),
        Event::RunCompleted(c) => json!({"run_id": run_id, "stop_reason": c.stop_reason}),
        Event::RunFailed(f) => {
            let mut v = json!({"run_id": run_id, "error": f.error});
            if !f.code.is_empty() {
                v["code"] = json!(f.code);
            }
            v
        }
        // Serialized from structs: a `Value` would reorder the agent's keys.
        Event::PermissionRequested(p) => {
            #[derive(serde::Serialize)]
            struct Requested<'a> {
                request_id: &'a str,
                tool_call: Box<RawValue>,
                options: Box<RawValue>,
                timeout_ms: u64,
            }
            let requested = Requested { request_id: &p.request_id, tool_call: raw(&p.acp_tool_call), options: raw(&p.acp_options), timeout_ms: p.timeout_ms };
            return serde_json::to_string(&requested).expect("serializes");
        }
        Event::PermissionResolved(p) => {
            #[derive(serde::Serialize)]
            struct Resolved<'a> {
                tool_call: Box<RawValue>,
                by: &'a str,
                request_id: Option<&'a str>,
                outcome: Value,
            }
            let outcome = if p.selected_option_id.is_empty() {
                json!({"outcome": "cancelled"})
            } else {
                json!({"outcome": "selected", "option_id": p.selected_option_id})
            };
            let request_id = (!p.request_id.is_empty()).then_some(p.request_id.as_str());
            let resolved = Resolved { tool_call: raw(&p.acp_tool_call), by: by_name(p.by()), request_id, outcome };
            return serde_json::to_string(&resolved).expect("serializes");
        }
        Event::AgentProtocolError(e) => json!({"error": e.error}),
        Event::SandboxOom(o) => {
            let max = if o.memory_max == 0 { Value::Null } else { json!(o.memory_max) };
            json!({"container_id": o.container_id, "oom_kills": o.oom_kills, "memory_max": max})
        }
        Event::SandboxEgressDenied(d) => {
            let port = if d.port == 0 { Value::Null } else { json!(d.port) };
            let name = if d.name.is_empty() { Value::Null } else { json!(d.name) };
            json!({
                "container_id": d.container_id,
                "protocol": protocol_name(d.protocol()),
                "destination": d.destination,
                "port": port,
                "name": name,
                "missing_rule": d.missing_rule,
                "reason": d.reason,
                "suppressed": d.suppressed,
            })
        }
    };
    value.to_string()
}

/// A session event as a client sees it: its kind's name and its data.
pub fn wire(e: &SessionEvent) -> Option<(&'static str, String)> {
    e.event.as_ref().map(|event| (kind(event), data_json(&e.run_id, event)))
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("unknown event kind {0:?}")]
    UnknownKind(String),
    #[error("{kind} event data is not what it should be: {reason}")]
    BadData { kind: String, reason: String },
}

/// Reads back what [`data_json`] wrote for `kind`.
pub fn from_wire(kind: &str, data: &str) -> Result<Event, WireError> {
    let bad = |reason: String| WireError::BadData { kind: kind.to_string(), reason };
    if kind == SESSION_UPDATE {
        return Ok(Event::SessionUpdate(SessionUpdate { acp_update: data.to_string() }));
    }
    // Embedded payloads are kept as written (a Value would reorder their keys).
    let v: std::collections::HashMap<String, Box<RawValue>> = serde_json::from_str(data).map_err(|e| bad(e.to_string()))?;
    let value = |key: &str| v.get(key).and_then(|r| serde_json::from_str::<Value>(r.get()).ok()).unwrap_or(Value::Null);
    let text = |key: &str| value(key).as_str().unwrap_or_default().to_string();
    let number = |key: &str| value(key).as_u64().unwrap_or(0);
    let embedded = |key: &str| v.get(key).map(|r| r.get().to_string()).unwrap_or_else(|| "null".into());
    Ok(match kind {
        RUN_STARTED => Event::RunStarted(RunStarted {}),
        RUN_COMPLETED => Event::RunCompleted(RunCompleted { stop_reason: text("stop_reason") }),
        RUN_FAILED => Event::RunFailed(RunFailed { error: text("error"), code: text("code") }),
        PERMISSION_REQUESTED => Event::PermissionRequested(PermissionRequested {
            request_id: text("request_id"),
            acp_tool_call: embedded("tool_call"),
            acp_options: embedded("options"),
            timeout_ms: number("timeout_ms"),
        }),
        PERMISSION_RESOLVED => {
            let by = by_of(&text("by")).ok_or_else(|| bad(format!("unknown resolver {:?}", text("by"))))?;
            let outcome = value("outcome");
            let selected = outcome.get("option_id").and_then(Value::as_str).unwrap_or_default().to_string();
            Event::PermissionResolved(PermissionResolved {
                request_id: text("request_id"),
                acp_tool_call: embedded("tool_call"),
                by: by.into(),
                selected_option_id: selected,
            })
        }
        AGENT_PROTOCOL_ERROR => Event::AgentProtocolError(AgentProtocolError { error: text("error") }),
        SANDBOX_OOM => Event::SandboxOom(SandboxOom {
            container_id: text("container_id"),
            oom_kills: number("oom_kills"),
            memory_max: number("memory_max"),
        }),
        SANDBOX_EGRESS_DENIED => Event::SandboxEgressDenied(SandboxEgressDenied {
            container_id: text("container_id"),
            protocol: protocol_of(&text("protocol")).into(),
            destination: text("destination"),
            port: u32::try_from(number("port")).unwrap_or(0),
            name: text("name"),
            missing_rule: text("missing_rule"),
            reason: text("reason"),
            suppressed: number("suppressed"),
        }),
        other => return Err(WireError::UnknownKind(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Event> {
        vec![
            Event::RunStarted(RunStarted {}),
            Event::SessionUpdate(SessionUpdate { acp_update: r#"{"sessionId":"s","update":{"sessionUpdate":"future_kind","x":[1]}}"#.into() }),
            Event::RunCompleted(RunCompleted { stop_reason: "end_turn".into() }),
            Event::RunFailed(RunFailed { error: "node n1 lost".into(), code: "node_lost".into() }),
            Event::RunFailed(RunFailed { error: "agent exited".into(), code: String::new() }),
            Event::PermissionRequested(PermissionRequested {
                request_id: "perm_1".into(),
                acp_tool_call: r#"{"toolCallId":"t1","title":"rm","newField":true}"#.into(),
                acp_options: r#"[{"optionId":"allow","kind":"allow_once","name":"Allow"}]"#.into(),
                timeout_ms: 30_000,
            }),
            Event::PermissionResolved(PermissionResolved {
                request_id: "perm_1".into(),
                acp_tool_call: r#"{"toolCallId":"t1"}"#.into(),
                by: permission_resolved::By::Client.into(),
                selected_option_id: "allow".into(),
            }),
            Event::PermissionResolved(PermissionResolved {
                request_id: String::new(),
                acp_tool_call: r#"{"toolCallId":"t2"}"#.into(),
                by: permission_resolved::By::Policy.into(),
                selected_option_id: String::new(),
            }),
            Event::AgentProtocolError(AgentProtocolError { error: "not JSON".into() }),
            Event::SandboxOom(SandboxOom { container_id: "ctr_1".into(), oom_kills: 2, memory_max: 64 << 20 }),
            Event::SandboxOom(SandboxOom { container_id: "ctr_1".into(), oom_kills: 1, memory_max: 0 }),
            Event::SandboxEgressDenied(SandboxEgressDenied {
                container_id: "ctr_1".into(),
                protocol: EgressProtocol::Tcp.into(),
                destination: "203.0.113.9".into(),
                port: 8443,
                name: "api.example.com".into(),
                missing_rule: "api.example.com:8443".into(),
                reason: "no rule allows api.example.com on port 8443".into(),
                suppressed: 3,
            }),
            Event::SandboxEgressDenied(SandboxEgressDenied {
                container_id: "ctr_1".into(),
                protocol: EgressProtocol::Dns.into(),
                destination: "evil.example".into(),
                port: 0,
                name: String::new(),
                missing_rule: "evil.example".into(),
                reason: "no rule names evil.example".into(),
                suppressed: 0,
            }),
        ]
    }

    #[test]
    fn every_kind_round_trips_through_its_json() {
        for event in every_kind() {
            let data = data_json("run_1", &event);
            assert_eq!(from_wire(kind(&event), &data).unwrap(), event, "{data}");
        }
    }

    /// The shapes clients have seen since before the events were typed.
    #[test]
    fn clients_see_the_same_json_as_before() {
        let json = |e: &Event| serde_json::from_str::<Value>(&data_json("run_1", e)).unwrap();
        let events = every_kind();
        assert_eq!(json(&events[0]), json!({"run_id": "run_1"}));
        assert_eq!(json(&events[1])["update"]["sessionUpdate"], "future_kind", "unknown ACP kinds pass through");
        assert_eq!(json(&events[2]), json!({"run_id": "run_1", "stop_reason": "end_turn"}));
        assert_eq!(json(&events[3]), json!({"run_id": "run_1", "error": "node n1 lost", "code": "node_lost"}));
        assert_eq!(json(&events[4]), json!({"run_id": "run_1", "error": "agent exited"}));
        assert_eq!(json(&events[5])["tool_call"]["newField"], true);
        assert_eq!(json(&events[6])["outcome"], json!({"outcome": "selected", "option_id": "allow"}));
        assert_eq!(json(&events[7])["request_id"], Value::Null);
        assert_eq!(json(&events[7])["outcome"], json!({"outcome": "cancelled"}));
        assert_eq!(json(&events[10])["memory_max"], Value::Null);
        assert_eq!(json(&events[11])["protocol"], "tcp");
        assert_eq!(json(&events[11])["port"], 8443);
        assert_eq!(json(&events[12])["port"], Value::Null, "a name has no port");
        assert_eq!(json(&events[12])["name"], Value::Null);
    }

    #[test]
    fn unknown_kinds_and_broken_data_are_refused() {
        assert_eq!(from_wire("run.exploded", "{}"), Err(WireError::UnknownKind("run.exploded".into())));
        assert!(matches!(from_wire(RUN_COMPLETED, "not json"), Err(WireError::BadData { .. })));
        assert!(matches!(from_wire(PERMISSION_RESOLVED, r#"{"by":"someone"}"#), Err(WireError::BadData { .. })));
    }
}
