//! Registry sync: reads an agent registry from a file or a URL, validates
//! every entry, and stores them all or none (`store::registry`).
//!
//! A registry is the ACP registry's `registry.json` (`{"version", "agents":
//! [...]}`), a bare array of entries, or one entry (`agent.json`); each entry
//! is in either shape [`AgentSpec`] reads. One bad entry fails the whole
//! sync with its index and id, and the registry stored before stays.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::agent_spec::{AgentSpec, SpecError};
use crate::store::registry::NewRegistryAgent;
use crate::store::{Store, StoreError};

/// Registries larger than this are refused.
const MAX_REGISTRY_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read registry {location}: {reason}")]
    Fetch { location: String, reason: String },
    #[error("registry {location} is not valid: {reason}")]
    Parse { location: String, reason: String },
    #[error("registry {location}: entry {index} ({id}): {error}")]
    Entry { location: String, index: usize, id: String, error: Box<SpecError> },
    #[error("registry {location}: agent id {id:?} appears more than once")]
    Duplicate { location: String, id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a sync stored.
#[derive(Debug, Clone, Serialize)]
pub struct SyncReport {
    pub source: String,
    pub agents: usize,
}

/// The HTTP client registry syncs use.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("a client with timeouts only builds")
}

/// Reads the registry at `source`: an http(s):// or file:// URL, or a path.
pub async fn fetch(http: &reqwest::Client, source: &str) -> Result<Vec<u8>, RegistryError> {
    let fetch_err = |reason: String| RegistryError::Fetch { location: source.to_string(), reason };
    let lower = source.to_ascii_lowercase();
    let bytes = if lower.starts_with("http://") || lower.starts_with("https://") {
        let response = http.get(source).send().await.map_err(|e| fetch_err(e.to_string()))?;
        let response = response.error_for_status().map_err(|e| fetch_err(e.to_string()))?;
        if response.content_length().is_some_and(|n| n > MAX_REGISTRY_BYTES as u64) {
            return Err(fetch_err(format!("larger than {MAX_REGISTRY_BYTES} bytes")));
        }
        response.bytes().await.map_err(|e| fetch_err(e.to_string()))?.to_vec()
    } else {
        let path = match source.split_once("://") {
            None => std::path::PathBuf::from(source),
            Some(("file", _)) => reqwest::Url::parse(source)
                .ok()
                .and_then(|u| u.to_file_path().ok())
                .ok_or_else(|| fetch_err("not a valid file:// URL".into()))?,
            Some((scheme, _)) => return Err(fetch_err(format!("unsupported scheme {scheme:?} (use http://, https://, file:// or a path)"))),
        };
        tokio::fs::read(&path).await.map_err(|e| fetch_err(format!("{}: {e}", path.display())))?
    };
    if bytes.len() > MAX_REGISTRY_BYTES {
        return Err(fetch_err(format!("larger than {MAX_REGISTRY_BYTES} bytes")));
    }
    Ok(bytes)
}

/// Every entry of a registry, validated, with the entry as given.
pub fn parse(source: &str, bytes: &[u8]) -> Result<Vec<(AgentSpec, Value)>, RegistryError> {
    let parse_err = |reason: String| RegistryError::Parse { location: source.to_string(), reason };
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| parse_err(format!("not JSON: {e}")))?;
    let entries = match doc {
        Value::Object(mut o) if o.contains_key("agents") => match o.remove("agents") {
            Some(Value::Array(a)) => a,
            _ => return Err(parse_err("\"agents\" must be an array".into())),
        },
        Value::Object(o) if o.contains_key("distribution") => vec![Value::Object(o)],
        Value::Array(a) => a,
        _ => return Err(parse_err("expected {\"agents\": [...]}, an array of agents, or one agent".into())),
    };
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(entries.len());
    for (index, entry) in entries.into_iter().enumerate() {
        let id = entry.get("id").and_then(Value::as_str).unwrap_or("no id").to_string();
        let spec = AgentSpec::from_json(&entry).map_err(|error| RegistryError::Entry { location: source.to_string(), index, id, error: Box::new(error) })?;
        if !seen.insert(spec.id.clone()) {
            return Err(RegistryError::Duplicate { location: source.to_string(), id: spec.id });
        }
        out.push((spec, entry));
    }
    Ok(out)
}

/// Fetches, validates and stores the registry at `source`, replacing the
/// stored one; on any failure the stored registry is unchanged.
pub async fn sync(store: &Store, http: &reqwest::Client, source: &str) -> Result<SyncReport, RegistryError> {
    let bytes = fetch(http, source).await?;
    let agents = parse(source, &bytes)?;
    let entries: Vec<String> = agents.iter().map(|(_, v)| v.to_string()).collect();
    let rows: Vec<NewRegistryAgent<'_>> = agents
        .iter()
        .zip(&entries)
        .map(|((spec, _), entry_json)| NewRegistryAgent {
            id: &spec.id,
            name: &spec.name,
            version: &spec.version,
            description: &spec.description,
            entry_json,
        })
        .collect();
    store.replace_registry(source, &rows).await?;
    tracing::info!(source, agents = rows.len(), "registry synced");
    Ok(SyncReport { source: source.to_string(), agents: rows.len() })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn entry(id: &str) -> Value {
        json!({"id": id, "name": id, "version": "1.0.0", "description": "d",
            "distribution": {"npx": {"package": format!("@example/{id}")}}})
    }

    #[test]
    fn reads_the_three_layouts() {
        let doc = json!({"version": "1.0.0", "agents": [entry("a"), entry("b")], "extensions": []});
        let agents = parse("r", doc.to_string().as_bytes()).unwrap();
        assert_eq!(agents.iter().map(|(s, _)| s.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(agents[0].1, entry("a"), "the entry is kept as given");
        assert_eq!(parse("r", json!([entry("c")]).to_string().as_bytes()).unwrap().len(), 1);
        assert_eq!(parse("r", entry("d").to_string().as_bytes()).unwrap()[0].0.id, "d");
    }

    #[test]
    fn refuses_bad_registries_naming_the_entry() {
        assert!(matches!(parse("r", b"{not json"), Err(RegistryError::Parse { reason, .. }) if reason.contains("not JSON")));
        assert!(matches!(parse("r", b"{\"agents\": 3}"), Err(RegistryError::Parse { .. })));
        assert!(matches!(parse("r", b"42"), Err(RegistryError::Parse { .. })));
        let mut bad = entry("bad");
        bad["distribution"]["npx"]["package"] = json!("--evil");
        match parse("r", json!({"agents": [entry("ok"), bad]}).to_string().as_bytes()) {
            Err(e @ RegistryError::Entry { index: 1, .. }) => assert!(e.to_string().contains("entry 1 (bad)"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse("r", json!([entry("x"), entry("x")]).to_string().as_bytes()), Err(RegistryError::Duplicate { id, .. }) if id == "x"));
    }

    #[tokio::test]
    async fn fetches_files_by_path_and_url_and_names_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        std::fs::write(&path, b"[]").unwrap();
        let http = http_client();
        assert_eq!(fetch(&http, path.to_str().unwrap()).await.unwrap(), b"[]");
        assert_eq!(fetch(&http, &format!("file://{}", path.display())).await.unwrap(), b"[]");
        let missing = dir.path().join("nope.json");
        match fetch(&http, missing.to_str().unwrap()).await {
            Err(e @ RegistryError::Fetch { .. }) => assert!(e.to_string().contains("nope.json"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(fetch(&http, "ftp://x/registry.json").await, Err(RegistryError::Fetch { reason, .. }) if reason.contains("ftp")));
    }

    /// Serves each of `responses` once over plain HTTP/1.1 on loopback.
    async fn http_server(responses: Vec<(u16, String)>) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for (code, body) in responses {
                let Ok((mut conn, _)) = listener.accept().await else { return };
                let _ = conn.read(&mut [0u8; 4096]).await;
                let head = format!("HTTP/1.1 {code} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn syncs_over_http_and_reports_http_errors() {
        let (_dir, store) = crate::store::conformance::sqlite().await;
        let addr = http_server(vec![(200, json!({"agents": [entry("remote")]}).to_string()), (500, "oops".into())]).await;
        let http = http_client();
        let url = format!("http://{addr}/registry.json");
        let report = sync(&store, &http, &url).await.unwrap();
        assert_eq!((report.agents, report.source.as_str()), (1, url.as_str()));
        assert_eq!(store.registry_agent("remote").await.unwrap().unwrap().source, url);
        match sync(&store, &http, &url).await {
            Err(e @ RegistryError::Fetch { .. }) => assert!(e.to_string().contains("500"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.registry_agents().await.unwrap().len(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn a_failed_sync_keeps_the_stored_registry() {
        let (_dir, store) = crate::store::conformance::sqlite().await;
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(&good, json!({"agents": [entry("a"), entry("b")]}).to_string()).unwrap();
        let http = http_client();
        let report = sync(&store, &http, good.to_str().unwrap()).await.unwrap();
        assert_eq!(report.agents, 2);
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, b"{\"agents\": [").unwrap();
        assert!(matches!(sync(&store, &http, bad.to_str().unwrap()).await, Err(RegistryError::Parse { .. })));
        let stored = store.registry_agents().await.unwrap();
        assert_eq!(stored.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(serde_json::from_str::<Value>(&stored[0].entry_json).unwrap(), entry("a"));
        store.close().await;
    }
}
