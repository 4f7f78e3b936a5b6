//! The container profile as clients write it (`container_profile` of a
//! session request, or `agentd sandbox run`'s flags), parsed without touching
//! the host. Limits are checked here against the bounds every host shares
//! (`cgroups::limits::check_bounds`), so absurd values are refused before
//! anything is written anywhere; against the host's capacity (and the rootfs
//! against the node's disk) where the sandbox is built, by
//! `cgroups::Limits::new`.

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use crate::network::{Network, NetworkError};
use crate::seccomp::SeccompPolicy;
use crate::secrets::{SecretError, SecretRef};
use crate::limits::{LimitsError, check_bounds};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error("memory {0:?} is not a size: use bytes or a number with K, M or G (e.g. 256M)")]
    BadSize(String),
    #[error("{field} must be {what}, got {value}")]
    BadNumber { field: &'static str, what: &'static str, value: String },
    #[error("{0}")]
    Network(#[from] NetworkError),
    #[error("rootfs must be an absolute path, got {0:?}")]
    RelativeRootfs(String),
    #[error("container_profile is not valid: {0}")]
    Shape(String),
    #[error("{0}")]
    Limit(#[from] LimitsError),
    #[error("seccomp policy is not valid: {0}")]
    Seccomp(String),
    #[error("node_id {0:?} is not a node id (lower-case letters, digits and '-', at most 63)")]
    BadNodeId(String),
    #[error("node_selector label {0:?} is not valid: keys of letters, digits, '.', '-', '_', '/' (at most 63), values at most 63 printable characters")]
    BadLabel(String),
    #[error("{0}")]
    Secret(#[from] SecretError),
}

/// `256M`, `1G`, `512K`, `1048576` (binary units).
pub fn parse_size(text: &str) -> Result<u64, ProfileError> {
    let bad = || ProfileError::BadSize(text.to_string());
    let t = text.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Limits are taken as any JSON value, so that a negative or fractional
/// number is refused naming its field (serde's own error would not).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(default)]
    memory: Option<Value>,
    #[serde(default)]
    pids: Option<Value>,
    #[serde(default)]
    cpus: Option<Value>,
    #[serde(default)]
    network: Option<Value>,
    #[serde(default)]
    rootfs: Option<String>,
    #[serde(default)]
    seccomp: Option<Value>,
    #[serde(default)]
    node_id: Option<String>,
    #[serde(default)]
    node_selector: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    secrets: Option<Value>,
}

fn memory(value: &Value) -> Result<u64, ProfileError> {
    match value {
        Value::String(t) => parse_size(t),
        Value::Number(n) => n.as_u64().ok_or_else(|| ProfileError::BadNumber {
            field: "memory",
            what: "a whole number of bytes or a size such as \"256M\"",
            value: n.to_string(),
        }),
        other => Err(ProfileError::BadNumber { field: "memory", what: "a whole number of bytes or a size such as \"256M\"", value: other.to_string() }),
    }
}

fn pids(value: &Value) -> Result<u64, ProfileError> {
    value.as_u64().ok_or_else(|| ProfileError::BadNumber { field: "pids", what: "a whole number", value: value.to_string() })
}

fn cpus(value: &Value) -> Result<f64, ProfileError> {
    value.as_f64().ok_or_else(|| ProfileError::BadNumber { field: "cpus", what: "a number of CPUs such as 0.5", value: value.to_string() })
}

/// A parsed profile. Limits are `None` when unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    pub memory_bytes: Option<u64>,
    pub pids_max: Option<u64>,
    pub cpus: Option<f64>,
    pub network: Network,
    pub rootfs: Option<PathBuf>,
    /// A custom seccomp policy for the agents (its shape checked; the node
    /// compiles it).
    pub seccomp: Option<SeccompPolicy>,
    /// The node the container must run on (the original agentd's field).
    pub node_id: Option<String>,
    /// Labels the container's node must carry, each with this value.
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// Keys the node's secrets proxy adds to requests to their upstreams;
    /// the sandbox holds only placeholders (see [`crate::secrets`]).
    pub secrets: Vec<SecretRef>,
}

impl ProfileError {
    /// The problem code a client gets for it: `invalid_network_policy` for
    /// an egress policy's fault, `invalid_secret` for a secret reference's,
    /// `invalid_profile` for anything else.
    pub fn code(&self) -> &'static str {
        match self {
            ProfileError::Network(e) if e.is_policy() => "invalid_network_policy",
            ProfileError::Secret(_) => "invalid_secret",
            _ => "invalid_profile",
        }
    }
}

impl Profile {
    pub fn from_json(value: &serde_json::Value) -> Result<Profile, ProfileError> {
        let input: Input = serde_json::from_value(value.clone()).map_err(|e| ProfileError::Shape(e.to_string()))?;
        let memory_bytes = input.memory.as_ref().map(memory).transpose()?;
        let pids_max = input.pids.as_ref().map(pids).transpose()?;
        let cpus = input.cpus.as_ref().map(cpus).transpose()?;
        // Zero travels as "unlimited" to the node: it is below every minimum.
        check_bounds(memory_bytes, pids_max, cpus)?;
        let network = match input.network {
            None => Network::default(),
            Some(n) => Network::from_json(&n)?,
        };
        let rootfs = match input.rootfs {
            None => None,
            Some(r) if r.starts_with('/') && !r.split('/').any(|c| c == "..") => Some(PathBuf::from(r)),
            Some(r) => return Err(ProfileError::RelativeRootfs(r)),
        };
        let seccomp = input.seccomp.as_ref().map(SeccompPolicy::from_json).transpose().map_err(ProfileError::Seccomp)?;
        let node_id = match input.node_id {
            Some(id) if !crate::ids::valid_node_id(&id) => return Err(ProfileError::BadNodeId(id)),
            other => other,
        };
        let node_selector = input.node_selector.unwrap_or_default();
        if let Some((k, v)) = node_selector.iter().find(|(k, v)| !crate::ids::valid_label(k, v)) {
            return Err(ProfileError::BadLabel(format!("{k}={v}")));
        }
        let secrets = input.secrets.as_ref().map(crate::secrets::parse_list).transpose()?.unwrap_or_default();
        if !secrets.is_empty() && network == Network::Host {
            return Err(SecretError {
                field: "secrets".into(),
                problem: "need the sandbox's own network namespace: with network \"host\" the key's proxy would serve every process of the host".into(),
            }
            .into());
        }
        Ok(Profile { memory_bytes, pids_max, cpus, network, rootfs, seccomp, node_id, node_selector, secrets })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "-5M", "lots", "1.5G", "M", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn profiles_parse_and_refuse_unknown_fields() {
        let p = Profile::from_json(&json!({"memory": "64M", "pids": 32, "cpus": 0.5, "network": "host", "rootfs": "/srv/root"})).unwrap();
        assert_eq!(p.memory_bytes, Some(64 << 20));
        assert_eq!((p.pids_max, p.cpus, p.network), (Some(32), Some(0.5), Network::Host));
        assert_eq!(Profile::from_json(&json!({})).unwrap(), Profile::default());
        assert!(matches!(Profile::from_json(&json!({"seccomp": {"x": 1}})), Err(ProfileError::Seccomp(_))));
        assert!(matches!(Profile::from_json(&json!({"memroy": "1G"})), Err(ProfileError::Shape(_))));
        assert!(matches!(Profile::from_json(&json!({"network": "bridge"})), Err(ProfileError::Network(_))));
        assert_eq!(Profile::from_json(&json!({"network": "bridge"})).unwrap_err().code(), "invalid_profile");
        let bad_rule = Profile::from_json(&json!({"network": {"egress": {"allow": ["a.com:99999"]}}})).unwrap_err();
        assert_eq!(bad_rule.code(), "invalid_network_policy");
        assert!(bad_rule.to_string().contains("a.com:99999"), "{bad_rule}");
        let egress = Profile::from_json(&json!({"network": {"egress": {"allow": ["a.com:443"]}}})).unwrap();
        assert_eq!(egress.network.mode(), "egress");
        assert!(matches!(Profile::from_json(&json!({"rootfs": "srv"})), Err(ProfileError::RelativeRootfs(_))));
    }

    #[test]
    fn secrets_are_references_refused_with_their_own_code() {
        let secret = json!({"name": "K", "upstream": "https://x.example", "header": "x-k", "env": "U"});
        let p = Profile::from_json(&json!({"secrets": [secret]})).unwrap();
        assert_eq!(p.secrets[0].name, "K");
        let e = Profile::from_json(&json!({"secrets": [secret], "network": "host"})).unwrap_err();
        assert_eq!((e.code(), e.to_string().starts_with("secrets ")), ("invalid_secret", true), "{e}");
        let e = Profile::from_json(&json!({"secrets": [{"name": "K", "upstream": "http://x", "header": "x-k", "env": "U"}]})).unwrap_err();
        assert_eq!(e.code(), "invalid_secret");
        assert!(e.to_string().starts_with("secrets[0].upstream \"http://x\" must be an https:// URL"), "{e}");
        assert_eq!(Profile::from_json(&json!({"pids": 0})).unwrap_err().code(), "invalid_profile");
    }

    /// Every refusal names its field, so a client knows what to fix.
    #[test]
    fn absurd_limits_are_refused_naming_the_field() {
        for (profile, field) in [
            (json!({"pids": -1}), "pids"),
            (json!({"pids": 1.5}), "pids"),
            (json!({"pids": 0}), "pids"),
            (json!({"pids": 4_194_305}), "pids"),
            (json!({"pids": "many"}), "pids"),
            (json!({"memory": -1}), "memory"),
            (json!({"memory": 0}), "memory"),
            (json!({"memory": "0M"}), "memory"),
            (json!({"memory": "1K"}), "memory"),
            (json!({"memory": 1.5e9}), "memory"),
            (json!({"memory": "100000G"}), "memory"),
            (json!({"memory": true}), "memory"),
            (json!({"cpus": 0}), "cpus"),
            (json!({"cpus": -0.5}), "cpus"),
            (json!({"cpus": 0.001}), "cpus"),
            (json!({"cpus": 1e6}), "cpus"),
            (json!({"cpus": "2"}), "cpus"),
        ] {
            let e = Profile::from_json(&profile).unwrap_err();
            assert!(e.to_string().starts_with(field), "{profile}: {e}");
        }
        // Sane on some host: left to the node, which knows its own.
        let big = Profile::from_json(&json!({"memory": "4096G", "cpus": 512, "pids": 4_194_304})).unwrap();
        assert_eq!((big.memory_bytes, big.cpus, big.pids_max), (Some(4096 << 30), Some(512.0), Some(4_194_304)));
        assert!(matches!(Profile::from_json(&json!({"memory": "1K"})), Err(ProfileError::Limit(LimitsError::MemoryTooSmall { .. }))));
    }
}
