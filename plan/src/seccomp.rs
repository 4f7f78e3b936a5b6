//! A custom seccomp policy as a profile gives it: seccompiler's JSON format
//! (a map of named filters, each `{mismatch_action, match_action, filter}`;
//! `default_action` and `filter_action` are accepted as their aliases), not
//! Docker's or OCI's. Its shape is checked here, where no host is at hand;
//! whether every syscall it names exists on the node's architecture is for
//! the node to say, which compiles it (`agentd_harden::compile_custom`)
//! before building anything.
//!
//! [`SeccompPolicy`] serializes back into the same JSON, which is what the
//! compiler reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Named filters, linked in name order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeccompPolicy(pub BTreeMap<String, SeccompFilter>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompFilter {
    /// What a syscall that no rule matches gets.
    #[serde(alias = "default_action")]
    pub mismatch_action: SeccompAction,
    /// What a syscall that a rule matches gets.
    #[serde(alias = "filter_action")]
    pub match_action: SeccompAction,
    #[serde(rename = "filter")]
    pub rules: Vec<SeccompRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompAction {
    Allow,
    Errno(u32),
    KillThread,
    KillProcess,
    Log,
    Trace(u32),
    Trap,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompRule {
    pub syscall: String,
    /// All must hold for the rule to match; none: the syscall alone.
    #[serde(rename = "args", default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<SeccompCondition>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompCondition {
    /// Which syscall argument, 0 to 5.
    pub index: u8,
    #[serde(rename = "type")]
    pub width: ArgWidth,
    pub op: CmpOp,
    pub val: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArgWidth {
    Dword,
    Qword,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CmpOp {
    Eq,
    Ge,
    Gt,
    Le,
    Lt,
    MaskedEq(u64),
    Ne,
}

/// The most argument indices a syscall has.
const MAX_ARG_INDEX: u8 = 5;

impl SeccompPolicy {
    /// Reads a policy from a profile's JSON value, checking its shape.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, String> {
        let policy: SeccompPolicy = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        if policy.0.is_empty() {
            return Err("a policy needs at least one named filter".into());
        }
        for (name, filter) in &policy.0 {
            for rule in &filter.rules {
                if rule.syscall.is_empty() {
                    return Err(format!("filter {name:?}: a rule names no syscall"));
                }
                for c in rule.conditions.iter().flatten() {
                    if c.index > MAX_ARG_INDEX {
                        return Err(format!("filter {name:?}: {} argument index {} is above {MAX_ARG_INDEX}", rule.syscall, c.index));
                    }
                }
            }
        }
        Ok(policy)
    }

    /// The policy in seccompiler's JSON, for its compiler.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a policy serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_through_seccompilers_json() {
        let value = json!({"main": {"default_action": "allow", "filter_action": {"errno": 1},
            "filter": [{"syscall": "acct"}, {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": {"masked_eq": 255}, "val": 84}]}]}});
        let policy = SeccompPolicy::from_json(&value).unwrap();
        let main = &policy.0["main"];
        assert_eq!((main.mismatch_action, main.match_action), (SeccompAction::Allow, SeccompAction::Errno(1)));
        assert_eq!(main.rules[1].conditions.as_ref().unwrap()[0].op, CmpOp::MaskedEq(255));
        let again: serde_json::Value = serde_json::from_str(&policy.to_json()).unwrap();
        assert_eq!(SeccompPolicy::from_json(&again).unwrap(), policy);
        assert_eq!(again["main"]["mismatch_action"], json!("allow"));
    }

    #[test]
    fn malformed_policies_are_refused() {
        for bad in [
            json!({"main": {"filter": "nonsense"}}),
            json!({"x": 1}),
            json!({}),
            json!({"main": {"mismatch_action": "allow", "match_action": "sometimes", "filter": []}}),
            json!({"main": {"mismatch_action": "allow", "match_action": "log", "filter": [{"syscall": "read", "args": [{"index": 9, "type": "dword", "op": "eq", "val": 0}]}]}}),
            json!({"main": {"mismatch_action": "allow", "match_action": "log", "filter": [{"syscall": ""}]}}),
        ] {
            assert!(SeccompPolicy::from_json(&bad).is_err(), "{bad}");
        }
    }
}
