//! What a workflow step that serves the API ends with, as stored in its
//! outbox row's `result` and read back by the request waiting for it:
//! `{"ok": true}`, or the refusal the client should see (`{"ok": false,
//! "class", "status", "code", "detail"}`; `status` is the class's HTTP
//! status, kept for outcomes stored before classes existed).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::refusal::{Class, Refusal};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Refused(Refusal),
}

#[derive(Serialize, Deserialize)]
struct Stored {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    class: Option<Class>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl Outcome {
    pub fn to_value(&self) -> Value {
        let stored = match self {
            Outcome::Done => Stored { ok: true, class: None, status: None, code: None, detail: None },
            Outcome::Refused(r) => Stored {
                ok: false,
                class: Some(r.class),
                status: Some(r.class.http_status()),
                code: Some(r.code.to_string()),
                detail: Some(r.detail.clone()),
            },
        };
        serde_json::to_value(stored).expect("an outcome serializes")
    }

    /// A stored result read back; a result that is not an outcome (a step
    /// of another kind) counts as done.
    pub fn from_value(value: Option<&Value>) -> Outcome {
        let Some(stored) = value.and_then(|v| serde_json::from_value::<Stored>(v.clone()).ok()) else { return Outcome::Done };
        if stored.ok {
            return Outcome::Done;
        }
        let class = stored.class.or(stored.status.map(Class::of_http_status)).unwrap_or(Class::Internal);
        Outcome::Refused(Refusal::known(class, stored.code.as_deref().unwrap_or("internal"), stored.detail.unwrap_or_default()))
    }

    pub fn into_result(self) -> Result<(), Refusal> {
        match self {
            Outcome::Done => Ok(()),
            Outcome::Refused(r) => Err(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Code;
    use serde_json::json;

    #[test]
    fn outcomes_round_trip_and_old_ones_still_read() {
        let refused = Outcome::Refused(Refusal::conflict(Code::IllegalState, "container c is deleted"));
        assert_eq!(Outcome::from_value(Some(&refused.to_value())), refused);
        assert_eq!(Outcome::from_value(Some(&Outcome::Done.to_value())), Outcome::Done);
        let old = json!({"ok": false, "status": 502, "code": "agent_init_failed", "detail": "no"});
        assert_eq!(Outcome::from_value(Some(&old)), Outcome::Refused(Refusal::new(Class::BadGateway, Code::AgentInitFailed, "no")));
        let unknown = json!({"ok": false, "status": 409, "code": "made_up", "detail": "x"});
        assert_eq!(Outcome::from_value(Some(&unknown)), Outcome::Refused(Refusal::new(Class::Conflict, Code::Internal, "x")));
        assert_eq!(Outcome::from_value(Some(&json!({"alive": true}))), Outcome::Done);
        assert_eq!(Outcome::from_value(None), Outcome::Done);
    }
}
