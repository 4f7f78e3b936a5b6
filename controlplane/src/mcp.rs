//! The ACP `mcpServers` a session create passes on to `session/new` or
//! `session/load`, checked against the spec's three shapes before anything
//! is written: stdio `{name, command, args, env: [{name, value}]}` (every
//! agent takes it), and `{type: "http" | "sse", name, url, headers: [{name,
//! value}]}` (only agents whose `mcpCapabilities` advertise the transport:
//! the supervisor checks that, knowing the agent's `initialize` answer).
//! Missing `args`, `env` and `headers` become `[]`, which the spec requires.

use serde_json::{Map, Value, json};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("session.mcp_servers[{index}]: {reason}")]
pub struct McpError {
    pub index: usize,
    pub reason: String,
}

/// Validates `servers` and returns them as the agent gets them.
pub fn validate(servers: &Value) -> Result<Value, McpError> {
    let Some(list) = servers.as_array() else {
        return Err(McpError { index: 0, reason: "mcp_servers must be an array of MCP server objects".into() });
    };
    let mut names = Vec::new();
    let mut out = Vec::with_capacity(list.len());
    for (index, server) in list.iter().enumerate() {
        let fail = |reason: String| McpError { index, reason };
        let server = one(server).map_err(fail)?;
        let name = server["name"].as_str().unwrap_or_default().to_string();
        if names.contains(&name) {
            return Err(McpError { index, reason: format!("a second server named {name:?}") });
        }
        names.push(name);
        out.push(server);
    }
    Ok(Value::Array(out))
}

fn one(server: &Value) -> Result<Value, String> {
    let Some(fields) = server.as_object() else { return Err("an MCP server is an object".into()) };
    let kind = match fields.get("type") {
        None => "stdio",
        Some(Value::String(t)) => t.as_str(),
        Some(other) => return Err(format!("type must be a string, got {other}")),
    };
    let allowed: &[&str] = match kind {
        "stdio" => &["type", "name", "command", "args", "env", "_meta"],
        "http" | "sse" => &["type", "name", "url", "headers", "_meta"],
        other => return Err(format!("unknown MCP server type {other:?} (stdio, http or sse)")),
    };
    if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field {unknown:?} for a {kind} server"));
    }
    let name = non_empty(fields, "name")?;
    let mut out = Map::new();
    if let Some(meta) = fields.get("_meta") {
        out.insert("_meta".into(), meta.clone());
    }
    out.insert("name".into(), json!(name));
    if kind == "stdio" {
        let command = non_empty(fields, "command")?;
        if !command.starts_with('/') {
            return Err(format!("command must be an absolute path inside the sandbox, got {command:?}"));
        }
        out.insert("command".into(), json!(command));
        let args = match fields.get("args") {
            None => Vec::new(),
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => a.clone(),
            Some(_) => return Err("args must be an array of strings".into()),
        };
        out.insert("args".into(), Value::Array(args));
        out.insert("env".into(), pairs(fields, "env")?);
    } else {
        let url = non_empty(fields, "url")?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!("url must be http:// or https://, got {url:?}"));
        }
        out.insert("type".into(), json!(kind));
        out.insert("url".into(), json!(url));
        out.insert("headers".into(), pairs(fields, "headers")?);
    }
    Ok(Value::Object(out))
}

fn non_empty<'a>(fields: &'a Map<String, Value>, key: &str) -> Result<&'a str, String> {
    match fields.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(format!("{key} must be a non-empty string")),
        None => Err(format!("{key} is required")),
    }
}

/// `env` / `headers`: `[{name, value}]`, both strings.
fn pairs(fields: &Map<String, Value>, key: &str) -> Result<Value, String> {
    let Some(value) = fields.get(key) else { return Ok(json!([])) };
    let bad = || format!("{key} must be an array of {{\"name\": string, \"value\": string}}");
    let list = value.as_array().ok_or_else(bad)?;
    for pair in list {
        let ok = pair.as_object().is_some_and(|p| {
            p.get("name").is_some_and(|n| n.as_str().is_some_and(|n| !n.is_empty()))
                && p.get("value").is_some_and(Value::is_string)
                && p.keys().all(|k| ["name", "value", "_meta"].contains(&k.as_str()))
        });
        if !ok {
            return Err(bad());
        }
    }
    Ok(value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_shapes_pass_and_gain_their_empty_lists() {
        let given = json!([
            {"name": "fs", "command": "/usr/bin/mcp-fs", "args": ["--root", "/workspace"], "env": [{"name": "A", "value": "1"}]},
            {"type": "stdio", "name": "bare", "command": "/bin/true"},
            {"type": "http", "name": "web", "url": "https://mcp.example/x", "headers": [{"name": "Authorization", "value": "Bearer t"}]},
            {"type": "sse", "name": "events", "url": "http://127.0.0.1:9/sse"},
        ]);
        let out = validate(&given).unwrap();
        assert_eq!(out[1], json!({"name": "bare", "command": "/bin/true", "args": [], "env": []}));
        assert_eq!(out[2]["type"], "http");
        assert_eq!(out[3], json!({"type": "sse", "name": "events", "url": "http://127.0.0.1:9/sse", "headers": []}));
        assert_eq!(validate(&json!([])).unwrap(), json!([]));
    }

    #[test]
    fn bad_shapes_name_the_server_and_the_field() {
        let cases = [
            (json!({"servers": []}), "must be an array"),
            (json!([{"type": "websocket", "name": "x", "url": "ws://x"}]), "unknown MCP server type \"websocket\""),
            (json!([{"name": "x"}]), "command is required"),
            (json!([{"name": "x", "command": "mcp"}]), "absolute path"),
            (json!([{"type": "http", "name": "x", "url": "ftp://x"}]), "http:// or https://"),
            (json!([{"type": "http", "name": "x", "url": "http://x", "command": "/bin/x"}]), "unknown field \"command\""),
            (json!([{"name": "x", "command": "/x", "env": {"A": "1"}}]), "env must be an array"),
            (json!([{"name": "x", "command": "/x", "args": [1]}]), "args must be an array of strings"),
            (json!([{"name": "", "command": "/x"}]), "name must be a non-empty string"),
            (json!([{"name": "a", "command": "/x"}, {"name": "a", "command": "/y"}]), "a second server named \"a\""),
        ];
        for (given, expected) in cases {
            let e = validate(&given).unwrap_err().to_string();
            assert!(e.contains(expected), "{given}: {e}");
        }
    }
}
