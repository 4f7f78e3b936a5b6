//! The container profile as clients write it (`container_profile` of a
//! session request, or `agentd sandbox run`'s flags), parsed without touching
//! the host. Limits are checked against the host's capacity where the sandbox
//! is built, by `cgroups::Limits::new`.

use std::path::PathBuf;

use serde::Deserialize;

use super::spec::Network;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error("invalid memory size {0:?}: use bytes or a number with K, M or G (e.g. 256M)")]
    BadSize(String),
    #[error("{0}")]
    BadNetwork(String),
    #[error("rootfs must be an absolute path, got {0:?}")]
    RelativeRootfs(String),
    #[error("container_profile is not valid: {0}")]
    Shape(String),
    #[error("{0} must be positive (leave it out for no limit)")]
    NotPositive(&'static str),
    #[error("seccomp policy does not compile: {0}")]
    Seccomp(String),
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

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(default)]
    memory: Option<Size>,
    #[serde(default)]
    pids: Option<u64>,
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    rootfs: Option<String>,
    #[serde(default)]
    seccomp: Option<serde_json::Value>,
}

/// A parsed profile. Limits are `None` when unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    pub memory_bytes: Option<u64>,
    pub pids_max: Option<u64>,
    pub cpus: Option<f64>,
    pub network: Network,
    pub rootfs: Option<PathBuf>,
    /// A custom seccomp policy for the agents, in seccompiler's JSON format,
    /// already checked to compile.
    pub seccomp_json: Option<String>,
}

impl Profile {
    pub fn from_json(value: &serde_json::Value) -> Result<Profile, ProfileError> {
        let input: Input = serde_json::from_value(value.clone()).map_err(|e| ProfileError::Shape(e.to_string()))?;
        let memory_bytes = match input.memory {
            None => None,
            Some(Size::Bytes(n)) => Some(n),
            Some(Size::Text(t)) => Some(parse_size(&t)?),
        };
        let network = match input.network {
            None => Network::default(),
            Some(n) => n.parse().map_err(ProfileError::BadNetwork)?,
        };
        let rootfs = match input.rootfs {
            None => None,
            Some(r) if r.starts_with('/') && !r.split('/').any(|c| c == "..") => Some(PathBuf::from(r)),
            Some(r) => return Err(ProfileError::RelativeRootfs(r)),
        };
        // Zero travels as "unlimited" to the node, so it must not be asked for.
        if memory_bytes == Some(0) {
            return Err(ProfileError::NotPositive("memory"));
        }
        if input.pids == Some(0) {
            return Err(ProfileError::NotPositive("pids"));
        }
        if input.cpus.is_some_and(|c| c.is_nan() || c <= 0.0) {
            return Err(ProfileError::NotPositive("cpus"));
        }
        let seccomp_json = match input.seccomp {
            None => None,
            Some(policy) => {
                let json = policy.to_string();
                super::seccomp::compile_custom(&json).map_err(|e| ProfileError::Seccomp(e.to_string()))?;
                Some(json)
            }
        };
        Ok(Profile { memory_bytes, pids_max: input.pids, cpus: input.cpus, network, rootfs, seccomp_json })
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
        assert!(matches!(Profile::from_json(&json!({"network": "bridge"})), Err(ProfileError::BadNetwork(_))));
        assert!(matches!(Profile::from_json(&json!({"rootfs": "srv"})), Err(ProfileError::RelativeRootfs(_))));
        assert!(matches!(Profile::from_json(&json!({"pids": -1})), Err(ProfileError::Shape(_))));
        assert_eq!(Profile::from_json(&json!({"pids": 0})), Err(ProfileError::NotPositive("pids")));
        assert_eq!(Profile::from_json(&json!({"cpus": 0})), Err(ProfileError::NotPositive("cpus")));
        assert_eq!(Profile::from_json(&json!({"memory": "0M"})), Err(ProfileError::NotPositive("memory")));
    }
}
