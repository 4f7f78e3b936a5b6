//! The plan vocabulary (agentd-plan) in messages and back: the control plane
//! compiles plans with the one, the node reads them with the other.

use agentd_plan::{Network, SecretError, SecretRef};
use agentd_plan::network::{EgressPolicy, EgressRule, Ipv4Net, Ports, Target};
use agentd_plan::seccomp::{ArgWidth, CmpOp, SeccompAction, SeccompCondition, SeccompFilter, SeccompPolicy, SeccompRule};

use crate::common;
use crate::node::{self, NetworkMode, egress_rule};

pub fn network_mode(network: &Network) -> NetworkMode {
    match network {
        Network::None => NetworkMode::None,
        Network::Host => NetworkMode::Host,
        Network::Egress(_) => NetworkMode::Egress,
    }
}

/// The plan's network fields for `network`: its mode, and an egress
/// sandbox's allow-list.
pub fn network_plan(network: &Network) -> (NetworkMode, Option<node::EgressPolicy>) {
    let policy = match network {
        Network::Egress(p) => Some(egress_message(p)),
        _ => None,
    };
    (network_mode(network), policy)
}

pub fn egress_message(policy: &EgressPolicy) -> node::EgressPolicy {
    let allow = policy
        .allow
        .iter()
        .map(|r| node::EgressRule {
            target: Some(match &r.target {
                Target::Domain(d) => egress_rule::Target::Domain(d.clone()),
                Target::Subdomains(d) => egress_rule::Target::Subdomains(d.clone()),
                Target::Net(n) => egress_rule::Target::Net(node::Ipv4Net { addr: u32::from(n.addr()), prefix_len: u32::from(n.prefix_len()) }),
            }),
            port: match r.ports {
                Ports::Web => 0,
                Ports::One(p) => u32::from(p),
            },
        })
        .collect();
    node::EgressPolicy { allow }
}

/// A plan's network, checked as the profile's was: `Err` names the rule
/// that cannot be (a plan from a control plane that checked less).
pub fn network(mode: NetworkMode, egress: Option<&node::EgressPolicy>) -> Result<Network, String> {
    Ok(match mode {
        NetworkMode::None => Network::None,
        NetworkMode::Host => Network::Host,
        NetworkMode::Egress => {
            let message = egress.ok_or("an egress network without its policy")?;
            if message.allow.len() > agentd_plan::network::MAX_RULES {
                return Err(agentd_plan::NetworkError::TooManyRules(message.allow.len()).to_string());
            }
            let mut allow = Vec::with_capacity(message.allow.len());
            for r in &message.allow {
                let target = match &r.target {
                    Some(egress_rule::Target::Domain(d)) => {
                        agentd_plan::network::valid_domain(d).map_err(|e| format!("egress rule {d:?}: {e}"))?;
                        Target::Domain(agentd_plan::network::normal_name(d))
                    }
                    Some(egress_rule::Target::Subdomains(d)) => match Target::domain(&format!("*.{d}")) {
                        Ok(t) => t,
                        Err(e) => return Err(format!("egress rule \"*.{d}\": {e}")),
                    },
                    Some(egress_rule::Target::Net(n)) => {
                        let len = u8::try_from(n.prefix_len).map_err(|_| format!("egress rule: prefix length {} is over 32", n.prefix_len))?;
                        Target::Net(Ipv4Net::new(std::net::Ipv4Addr::from(n.addr), len).map_err(|e| format!("egress rule: {e}"))?)
                    }
                    None => return Err("an egress rule without a destination".into()),
                };
                let ports = match r.port {
                    0 => Ports::Web,
                    p => Ports::One(u16::try_from(p).map_err(|_| format!("egress rule {target}: port {p} is over 65535"))?),
                };
                allow.push(EgressRule { target, ports });
            }
            Network::Egress(EgressPolicy { allow })
        }
    })
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
    fn an_egress_policy_survives_the_trip() {
        let value = json!({"egress": {"allow": ["api.anthropic.com:443", "*.openai.com", "198.18.0.0/15:8080", "1.2.3.4"]}});
        let net = Network::from_json(&value).unwrap();
        let (mode, policy) = network_plan(&net);
        assert_eq!(mode, NetworkMode::Egress);
        assert_eq!(network(mode, policy.as_ref()).unwrap(), net);
        assert_eq!(network(NetworkMode::Host, None).unwrap(), Network::Host);
        assert!(network(NetworkMode::Egress, None).is_err());
        let bad = node::EgressPolicy { allow: vec![node::EgressRule { target: Some(egress_rule::Target::Domain("bad..name".into())), port: 0 }] };
        assert!(network(NetworkMode::Egress, Some(&bad)).unwrap_err().contains("bad..name"));
        let bad_port = node::EgressPolicy { allow: vec![node::EgressRule { target: Some(egress_rule::Target::Domain("a.com".into())), port: 70000 }] };
        assert!(network(NetworkMode::Egress, Some(&bad_port)).is_err());
    }

    #[test]
    fn a_message_missing_its_actions_is_refused() {
        let message = common::SeccompPolicy { filters: vec![common::SeccompFilter { name: "main".into(), ..Default::default() }] };
        assert!(seccomp(&message).is_err());
    }
}
