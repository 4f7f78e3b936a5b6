//! The plan vocabulary (agentd-plan) in messages and back: the control plane
//! compiles plans with the one, the node reads them with the other.

use agentd_plan::{Network, SecretError, SecretRef};
use agentd_plan::seccomp::{ArgWidth, CmpOp, SeccompAction, SeccompCondition, SeccompFilter, SeccompPolicy, SeccompRule};

use crate::common;
use crate::node::NetworkMode;

pub fn network_mode(network: Network) -> NetworkMode {
    match network {
        Network::None => NetworkMode::None,
        Network::Host => NetworkMode::Host,
    }
}

pub fn network(mode: NetworkMode) -> Network {
    match mode {
        NetworkMode::None => Network::None,
        NetworkMode::Host => Network::Host,
    }
}

pub fn secret_message(r: &SecretRef) -> crate::node::SecretRef {
    crate::node::SecretRef {
        name: r.name.clone(),
        upstream: r.upstream.to_string(),
        header: r.header.clone(),
        scheme: r.scheme.clone().unwrap_or_default(),
        env: r.env.clone(),
    }
}

/// The plan's secrets, checked again where they are used (a node trusts no
/// message unchecked).
pub fn secrets(messages: &[crate::node::SecretRef]) -> Result<Vec<SecretRef>, SecretError> {
    let refs = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let scheme = (!m.scheme.is_empty()).then_some(m.scheme.as_str());
            SecretRef::new(&format!("secrets[{i}]"), &m.name, &m.upstream, &m.header, scheme, &m.env)
        })
        .collect::<Result<Vec<_>, _>>()?;
    agentd_plan::secrets::check_unique(&refs)?;
    Ok(refs)
}

/// An agent's state as the API and the store name it.
pub fn agent_state_name(state: common::AgentState) -> &'static str {
    match state {
        common::AgentState::Unspecified => "unknown",
        common::AgentState::Starting => "starting",
        common::AgentState::Ready => "ready",
        common::AgentState::Running => "running",
        common::AgentState::AuthRequired => "auth_required",
        common::AgentState::Exited => "exited",
        common::AgentState::Failed => "failed",
    }
}

fn action_message(a: SeccompAction) -> common::SeccompAction {
    use common::seccomp_action::Kind;
    let (kind, value) = match a {
        SeccompAction::Allow => (Kind::Allow, 0),
        SeccompAction::Errno(n) => (Kind::Errno, n),
        SeccompAction::KillThread => (Kind::KillThread, 0),
        SeccompAction::KillProcess => (Kind::KillProcess, 0),
        SeccompAction::Log => (Kind::Log, 0),
        SeccompAction::Trace(n) => (Kind::Trace, n),
        SeccompAction::Trap => (Kind::Trap, 0),
    };
    common::SeccompAction { kind: kind.into(), value }
}

fn action(a: Option<&common::SeccompAction>) -> Result<SeccompAction, String> {
    use common::seccomp_action::Kind;
    let a = a.ok_or("a seccomp filter without an action")?;
    Ok(match a.kind() {
        Kind::Allow => SeccompAction::Allow,
        Kind::Errno => SeccompAction::Errno(a.value),
        Kind::KillThread => SeccompAction::KillThread,
        Kind::KillProcess => SeccompAction::KillProcess,
        Kind::Log => SeccompAction::Log,
        Kind::Trace => SeccompAction::Trace(a.value),
        Kind::Trap => SeccompAction::Trap,
        Kind::Unspecified => return Err("a seccomp action of no kind".into()),
    })
}

pub fn seccomp_message(policy: &SeccompPolicy) -> common::SeccompPolicy {
    use common::seccomp_condition::Op;
    let filters = policy
        .0
        .iter()
        .map(|(name, f)| common::SeccompFilter {
            name: name.clone(),
            mismatch_action: Some(action_message(f.mismatch_action)),
            match_action: Some(action_message(f.match_action)),
            rules: f
                .rules
                .iter()
                .map(|r| common::SeccompRule {
                    syscall: r.syscall.clone(),
                    conditions: r
                        .conditions
                        .iter()
                        .flatten()
                        .map(|c| {
                            let (op, mask) = match c.op {
                                CmpOp::Eq => (Op::Eq, 0),
                                CmpOp::Ne => (Op::Ne, 0),
                                CmpOp::Lt => (Op::Lt, 0),
                                CmpOp::Le => (Op::Le, 0),
                                CmpOp::Gt => (Op::Gt, 0),
                                CmpOp::Ge => (Op::Ge, 0),
                                CmpOp::MaskedEq(m) => (Op::MaskedEq, m),
                            };
                            common::SeccompCondition { index: u32::from(c.index), qword: c.width == ArgWidth::Qword, op: op.into(), value: c.val, mask }
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    common::SeccompPolicy { filters }
}

/// A policy from its message; `Err` names what is missing or out of range.
pub fn seccomp(message: &common::SeccompPolicy) -> Result<SeccompPolicy, String> {
    use common::seccomp_condition::Op;
    let mut policy = std::collections::BTreeMap::new();
    for f in &message.filters {
        let mut rules = Vec::with_capacity(f.rules.len());
        for r in &f.rules {
            let mut conditions = Vec::with_capacity(r.conditions.len());
            for c in &r.conditions {
                let op = match c.op() {
                    Op::Eq => CmpOp::Eq,
                    Op::Ne => CmpOp::Ne,
                    Op::Lt => CmpOp::Lt,
                    Op::Le => CmpOp::Le,
                    Op::Gt => CmpOp::Gt,
                    Op::Ge => CmpOp::Ge,
                    Op::MaskedEq => CmpOp::MaskedEq(c.mask),
                    Op::Unspecified => return Err(format!("{}: a condition with no operator", r.syscall)),
                };
                let index = u8::try_from(c.index).map_err(|_| format!("{}: argument index {} out of range", r.syscall, c.index))?;
                let width = if c.qword { ArgWidth::Qword } else { ArgWidth::Dword };
                conditions.push(SeccompCondition { index, width, op, val: c.value, comment: None });
            }
            let conditions = (!conditions.is_empty()).then_some(conditions);
            rules.push(SeccompRule { syscall: r.syscall.clone(), conditions, comment: None });
        }
        let filter = SeccompFilter {
            mismatch_action: action(f.mismatch_action.as_ref())?,
            match_action: action(f.match_action.as_ref())?,
            rules,
        };
        policy.insert(f.name.clone(), filter);
    }
    Ok(SeccompPolicy(policy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_policy_survives_the_trip() {
        let policy = SeccompPolicy::from_json(&json!({"main": {"mismatch_action": "allow", "match_action": {"errno": 1},
            "filter": [{"syscall": "acct"}, {"syscall": "ioctl", "args": [{"index": 1, "type": "qword", "op": {"masked_eq": 255}, "val": 84}]}]},
            "second": {"mismatch_action": {"trace": 7}, "match_action": "kill_process", "filter": []}}))
        .unwrap();
        assert_eq!(seccomp(&seccomp_message(&policy)).unwrap(), policy);
    }

    #[test]
    fn a_message_missing_its_actions_is_refused() {
        let message = common::SeccompPolicy { filters: vec![common::SeccompFilter { name: "main".into(), ..Default::default() }] };
        assert!(seccomp(&message).is_err());
    }
}
