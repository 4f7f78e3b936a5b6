//! Secrets a container's profile names by reference: which key of the
//! node's secret store goes to which HTTPS upstream, in which header. The
//! value never appears here, in the API, in plans or in the sandbox: the
//! node's secrets proxy adds it to requests on their way out
//! (node/src/secrets_proxy/).
//!
//! ```json
//! "secrets": [{"name": "ANTHROPIC_API_KEY", "upstream": "https://api.anthropic.com",
//!              "header": "x-api-key", "env": "ANTHROPIC_BASE_URL"},
//!             {"name": "OPENAI_API_KEY", "upstream": "https://api.openai.com/v1",
//!              "header": "authorization", "scheme": "Bearer", "env": "OPENAI_BASE_URL"}]
//! ```
//!
//! The agent gets `env` pointing at the proxy (`http://127.0.0.1:PORT` plus
//! the upstream's path) and `name` set to [`PLACEHOLDER`].

use std::collections::BTreeSet;

use serde::Deserialize;

/// What the agent finds in the variable `name`: a stand-in the proxy
/// replaces, so clients that insist on a key being set start.
pub const PLACEHOLDER: &str = "agentd-placeholder";

/// Most secrets one profile names.
pub const MAX_SECRETS: usize = 16;

/// Headers the proxy owns (hop-by-hop, framing, routing): a secret in one of
/// them would break the request or the connection.
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A refusal, naming the field (`secrets[1].upstream`) so a client knows
/// what to fix. Never carries a secret's value: there is none here.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field} {problem}")]
pub struct SecretError {
    pub field: String,
    pub problem: String,
}

fn refuse(field: impl Into<String>, problem: impl Into<String>) -> SecretError {
    SecretError { field: field.into(), problem: problem.into() }
}

/// An `https://` upstream: host, port and a base path (empty or `/v1`-like,
/// no trailing `/`), with nothing else (no user info, query or fragment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// A DNS name (lower case), an IPv4 address or a bracketed IPv6 one.
    host: String,
    port: u16,
    base_path: String,
}

impl Upstream {
    pub fn parse(text: &str) -> Result<Upstream, String> {
        let rest = text
            .get(..8)
            .filter(|scheme| scheme.eq_ignore_ascii_case("https://"))
            .map(|_| &text[8..])
            .ok_or("must be an https:// URL (the proxy speaks TLS to the upstream)")?;
        if rest.contains(['?', '#']) {
            return Err("must have no query or fragment".into());
        }
        if !rest.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be printable ASCII without spaces".into());
        }
        let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
        if authority.contains('@') {
            return Err("must not carry user information: the node's secret is the credential".into());
        }
        let (host, port) = split_host_port(authority)?;
        let base_path = path.trim_end_matches('/');
        if base_path.split('/').any(|s| s == "." || s == ".." || s.to_ascii_lowercase().contains("%2e")) {
            return Err("must not have `.` or `..` path segments".into());
        }
        Ok(Upstream { host, port, base_path: base_path.to_string() })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host` or `host:port` when the port is not 443.
    pub fn authority(&self) -> String {
        if self.port == 443 { self.host.clone() } else { format!("{}:{}", self.host, self.port) }
    }

    /// Empty, or a path such as `/v1` without a trailing `/`.
    pub fn base_path(&self) -> &str {
        &self.base_path
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "https://{}{}", self.authority(), self.base_path)
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or("has an unclosed `[` in its host")?;
        addr.parse::<std::net::Ipv6Addr>().map_err(|_| format!("host [{addr}] is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("has something after its IPv6 host that is not :PORT")?),
        };
        (format!("[{addr}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        None => 443,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("port {p:?} is not a port from 1 to 65535"))?,
    };
    if !host.starts_with('[') {
        let labels_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        if !labels_ok {
            return Err(format!("host {host:?} is not a DNS name or an IP address"));
        }
    }
    Ok((host.to_ascii_lowercase(), port))
}

/// An environment variable's name as shells and agents read them.
fn env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= 128
}

/// RFC 9110's `token` (a header field name, an auth scheme).
fn token(text: &str) -> bool {
    !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// One secret, by reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// The key in the node's secret store, and the variable the agent finds
    /// [`PLACEHOLDER`] in.
    pub name: String,
    pub upstream: Upstream,
    /// The header the proxy sets to the value (lower case).
    pub header: String,
    /// An auth scheme put before the value (`Bearer`), if any.
    pub scheme: Option<String>,
    /// The variable that points the agent at the proxy
    /// (`ANTHROPIC_BASE_URL`, `OPENAI_BASE_URL`, `GOOGLE_GEMINI_BASE_URL`).
    pub env: String,
}

/// A secret as a profile writes it; checked by [`SecretRef::new`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    name: String,
    upstream: String,
    header: String,
    #[serde(default)]
    scheme: Option<String>,
    env: String,
}

impl SecretRef {
    /// Checks one secret; `field` names it in errors (`secrets[0]`).
    pub fn new(field: &str, name: &str, upstream: &str, header: &str, scheme: Option<&str>, env: &str) -> Result<SecretRef, SecretError> {
        if !env_name(name) {
            return Err(refuse(format!("{field}.name"), format!("{name:?} is not an environment variable name (letters, digits, '_', not first a digit)")));
        }
        let upstream = Upstream::parse(upstream).map_err(|p| refuse(format!("{field}.upstream"), format!("{upstream:?} {p}")))?;
        if !token(header) {
            return Err(refuse(format!("{field}.header"), format!("{header:?} is not a header name (RFC 9110 token characters, at most 64)")));
        }
        let header = header.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&header.as_str()) {
            return Err(refuse(format!("{field}.header"), format!("{header:?} is a header the proxy owns (framing, routing or hop-by-hop)")));
        }
        if let Some(s) = scheme
            && !token(s)
        {
            return Err(refuse(format!("{field}.scheme"), format!("{s:?} is not an auth scheme (RFC 9110 token characters, e.g. Bearer)")));
        }
        if !env_name(env) {
            return Err(refuse(format!("{field}.env"), format!("{env:?} is not an environment variable name (letters, digits, '_', not first a digit)")));
        }
        if env == name {
            return Err(refuse(format!("{field}.env"), "must differ from name: one holds the proxy's URL, the other the placeholder key"));
        }
        Ok(SecretRef { name: name.to_string(), upstream, header, scheme: scheme.map(str::to_string), env: env.to_string() })
    }

    /// What the header carries for `value`: `value`, or `scheme value`.
    pub fn header_value(&self, value: &str) -> String {
        match &self.scheme {
            Some(s) => format!("{s} {value}"),
            None => value.to_string(),
        }
    }
}

/// `secrets` of a profile: a list of [`SecretRef`]s, each name and each
/// variable used once.
pub fn parse_list(value: &serde_json::Value) -> Result<Vec<SecretRef>, SecretError> {
    let items = value.as_array().ok_or_else(|| refuse("secrets", "must be a list of {name, upstream, header, env} objects"))?;
    if items.len() > MAX_SECRETS {
        return Err(refuse("secrets", format!("has {} entries; at most {MAX_SECRETS}", items.len())));
    }
    let mut refs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let field = format!("secrets[{i}]");
        let input: Input = serde_json::from_value(item.clone()).map_err(|e| refuse(field.clone(), format!("is not a secret reference: {e}")))?;
        refs.push(SecretRef::new(&field, &input.name, &input.upstream, &input.header, input.scheme.as_deref(), &input.env)?);
    }
    check_unique(&refs)?;
    Ok(refs)
}

/// Each variable (a name or an env) is set once: two secrets cannot share
/// a key's placeholder or a base URL.
pub fn check_unique(refs: &[SecretRef]) -> Result<(), SecretError> {
    let mut seen = BTreeSet::new();
    for (i, r) in refs.iter().enumerate() {
        for (what, var) in [("name", &r.name), ("env", &r.env)] {
            if !seen.insert(var.as_str()) {
                return Err(refuse(format!("secrets[{i}].{what}"), format!("{var:?} is used by another secret of this profile")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(entry: serde_json::Value) -> Result<SecretRef, SecretError> {
        parse_list(&json!([entry])).map(|mut v| v.remove(0))
    }

    fn anthropic() -> serde_json::Value {
        json!({"name": "ANTHROPIC_API_KEY", "upstream": "https://api.anthropic.com", "header": "x-api-key", "env": "ANTHROPIC_BASE_URL"})
    }

    #[test]
    fn references_parse() {
        let r = one(anthropic()).unwrap();
        assert_eq!((r.upstream.host(), r.upstream.port(), r.upstream.base_path()), ("api.anthropic.com", 443, ""));
        assert_eq!(r.upstream.to_string(), "https://api.anthropic.com");
        assert_eq!(r.header_value("k"), "k");

        let r = one(json!({"name": "OPENAI_API_KEY", "upstream": "HTTPS://API.openai.com:8443/v1/", "header": "Authorization",
            "scheme": "Bearer", "env": "OPENAI_BASE_URL"}))
        .unwrap();
        assert_eq!(r.upstream.to_string(), "https://api.openai.com:8443/v1");
        assert_eq!((r.header.as_str(), r.header_value("k")), ("authorization", "Bearer k".to_string()));

        let r = one(json!({"name": "K", "upstream": "https://10.0.0.2", "header": "x-k", "env": "U"})).unwrap();
        assert_eq!(r.upstream.authority(), "10.0.0.2");
        let r = one(json!({"name": "K", "upstream": "https://[::1]:9443", "header": "x-k", "env": "U"})).unwrap();
        assert_eq!(r.upstream.authority(), "[::1]:9443");
    }

    /// Every refusal names the field to fix.
    #[test]
    fn bad_references_are_refused_naming_the_field() {
        let with = |key: &str, value: serde_json::Value| {
            let mut e = anthropic();
            e[key] = value;
            e
        };
        for (entry, field) in [
            (with("upstream", json!("http://api.anthropic.com")), "secrets[0].upstream"),
            (with("upstream", json!("https://")), "secrets[0].upstream"),
            (with("upstream", json!("https:///v1")), "secrets[0].upstream"),
            (with("upstream", json!("api.anthropic.com")), "secrets[0].upstream"),
            (with("upstream", json!("https://user:pw@api.anthropic.com")), "secrets[0].upstream"),
            (with("upstream", json!("https://api.anthropic.com/?x=1")), "secrets[0].upstream"),
            (with("upstream", json!("https://api.anthropic.com:0")), "secrets[0].upstream"),
            (with("upstream", json!("https://api.anthropic.com:99999")), "secrets[0].upstream"),
            (with("upstream", json!("https://api anthropic.com")), "secrets[0].upstream"),
            (with("upstream", json!("https://a_b.com")), "secrets[0].upstream"),
            (with("upstream", json!("https://[nope]")), "secrets[0].upstream"),
            (with("upstream", json!("https://x.com/a/../b")), "secrets[0].upstream"),
            (with("upstream", json!("https://x.com/a/%2E%2E/b")), "secrets[0].upstream"),
            (with("header", json!("x api key")), "secrets[0].header"),
            (with("header", json!("")), "secrets[0].header"),
            (with("header", json!("x-key:")), "secrets[0].header"),
            (with("header", json!("Host")), "secrets[0].header"),
            (with("header", json!("transfer-encoding")), "secrets[0].header"),
            (with("scheme", json!("Bearer x")), "secrets[0].scheme"),
            (with("name", json!("1KEY")), "secrets[0].name"),
            (with("name", json!("KEY-X")), "secrets[0].name"),
            (with("env", json!("")), "secrets[0].env"),
            (with("env", json!("ANTHROPIC_API_KEY")), "secrets[0].env"),
            (with("upstream", json!(5)), "secrets[0]"),
            (with("value", json!("sk-inline")), "secrets[0]"),
        ] {
            let e = one(entry.clone()).unwrap_err();
            assert_eq!(e.field, field, "{entry}: {e}");
            assert!(e.to_string().starts_with(field), "{e}");
        }
        let mut missing = anthropic();
        missing.as_object_mut().unwrap().remove("env");
        assert_eq!(one(missing).unwrap_err().field, "secrets[0]");
    }

    #[test]
    fn names_and_variables_are_unique() {
        let mut other = anthropic();
        other["env"] = json!("OTHER_URL");
        assert_eq!(parse_list(&json!([anthropic(), other])).unwrap_err().field, "secrets[1].name");
        let mut other = anthropic();
        other["name"] = json!("OTHER_KEY");
        assert_eq!(parse_list(&json!([anthropic(), other])).unwrap_err().field, "secrets[1].env");
        let mut crossed = anthropic();
        crossed["name"] = json!("OTHER_KEY");
        crossed["env"] = json!("ANTHROPIC_API_KEY");
        assert_eq!(parse_list(&json!([anthropic(), crossed])).unwrap_err().field, "secrets[1].env");
        assert_eq!(parse_list(&json!({"name": "x"})).unwrap_err().field, "secrets");
        let many: Vec<_> = (0..=MAX_SECRETS)
            .map(|i| json!({"name": format!("K{i}"), "upstream": "https://x.com", "header": "x-k", "env": format!("U{i}")}))
            .collect();
        assert_eq!(parse_list(&json!(many)).unwrap_err().field, "secrets");
    }
}
