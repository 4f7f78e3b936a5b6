//! The configuration file: `/etc/agentd/agentd.toml` when installed, or the
//! file `AGENTD_CONFIG` names. Its keys become `AGENTD_*` environment defaults
//! before the command line is parsed, so the order of precedence is: flag,
//! then environment, then file, then built-in default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const DEFAULT_PATH: &str = "/etc/agentd/agentd.toml";

/// Keys the file may set; anything else is refused so typos do not go unseen.
const KEYS: &[&str] = &["listen", "state_dir", "log", "log_json", "initialize_timeout_ms", "node_call_timeout_ms", "node_socket", "database_url", "node_check_interval_ms", "node_heartbeat_timeout_ms", "hibernate_after_ms", "container_ttl_ms", "cgroup_subtree", "id_base", "id_range_size", "max_sandboxes", "stop_grace_ms", "registry", "registry_sync_interval_ms", "sandbox_bin"];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path} is not valid TOML: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("config {path}: unknown key {key:?} (known: {known})")]
    UnknownKey { path: PathBuf, key: String, known: String },
    #[error("config {path}: {key} must be a string, number or boolean")]
    BadValue { path: PathBuf, key: String },
}

/// The `AGENTD_*` variables a config file's text sets.
pub fn parse(path: &Path, text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let table: BTreeMap<String, toml::Value> =
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
    table
        .into_iter()
        .map(|(key, value)| {
            if !KEYS.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey { path: path.to_owned(), key, known: KEYS.join(", ") });
            }
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => return Err(ConfigError::BadValue { path: path.to_owned(), key }),
            };
            Ok((format!("AGENTD_{}", key.to_uppercase()), value))
        })
        .collect()
}

/// Loads the config file, if any, into the environment. Must run while the
/// process is single-threaded.
pub fn load_into_env() -> Result<(), ConfigError> {
    let (path, required) = match std::env::var_os("AGENTD_CONFIG") {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(()),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    for (name, value) in parse(&path, &text)? {
        if std::env::var_os(&name).is_none() {
            // SAFETY: called from main before any thread exists.
            unsafe { std::env::set_var(name, value) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_config_parses() {
        let text = include_str!("../packaging/agentd.toml");
        let vars = parse(Path::new("agentd.toml"), text).unwrap();
        assert!(vars.contains(&("AGENTD_LISTEN".into(), "127.0.0.1:8080".into())));
        assert!(vars.contains(&("AGENTD_INITIALIZE_TIMEOUT_MS".into(), "30000".into())));
        assert!(vars.contains(&("AGENTD_LOG_JSON".into(), "false".into())));
    }

    #[test]
    fn unknown_keys_and_tables_are_refused() {
        assert!(matches!(parse(Path::new("x"), "listn = \"a\""), Err(ConfigError::UnknownKey { .. })));
        assert!(matches!(parse(Path::new("x"), "log = [1]"), Err(ConfigError::BadValue { .. })));
        assert!(matches!(parse(Path::new("x"), "listen = "), Err(ConfigError::Parse { .. })));
        let vars = parse(Path::new("x"), "registry = \"https://example.org/registry.json\"").unwrap();
        assert_eq!(vars, [("AGENTD_REGISTRY".to_string(), "https://example.org/registry.json".to_string())]);
    }
}
