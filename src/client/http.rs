//! The API over HTTP: which server, which token, and every answer that is
//! not a success turned into an [`ApiError`] (a problem+json answer keeps
//! its stable `code`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::Value;

use crate::cli::ClientArgs;

/// Where `agentd up` listens unless told otherwise.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// The local agentd's token for its operator, in its state directory.
pub const TOKEN_FILE: &str = "admin.token";

/// How long a connection may take to open; requests themselves have no
/// deadline (a create waits for its sandbox, a stream lasts).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Nothing answers at the server's address.
    #[error("cannot reach agentd at {url}: {reason} (is it running? `agentd up` starts one; --server or AGENTD_URL names another)")]
    Unreachable { url: String, reason: String },
    /// The API refused, with a stable code (`application/problem+json`).
    #[error("{code}: {detail}{hint}")]
    Problem { status: StatusCode, code: String, detail: String, hint: &'static str },
    /// An error answer that is not a problem (a proxy's, say).
    #[error("{method} {url}: HTTP {status}{body}")]
    Http { method: Method, url: String, status: StatusCode, body: String },
    /// The connection broke, or the request could not be sent.
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    /// A success whose body is not what the API answers.
    #[error("{url}: the answer is not the JSON expected: {reason}")]
    Decode { url: String, reason: String },
    #[error("--server {0:?} is not an http:// or https:// URL")]
    BadServer(String),
    #[error("the token ({0}) has characters a header cannot carry")]
    BadToken(&'static str),
}

impl ApiError {
    /// The problem's code, if the API answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Problem { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether trying again later may work (the server or the network was
    /// away), as opposed to a refusal.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Unreachable { .. } | ApiError::Transport { .. } => true,
            ApiError::Problem { status, .. } | ApiError::Http { status, .. } => {
                status.is_server_error() && *status != StatusCode::NOT_IMPLEMENTED
            }
            _ => false,
        }
    }
}

/// A client of one agentd API. The token is only ever put in the
/// `Authorization` header (marked sensitive), never printed.
pub struct Api {
    /// `http://host:port`, without a trailing slash.
    base: String,
    /// Whether requests carry a token: a 401 without one says how to give one.
    has_token: bool,
    http: reqwest::Client,
}

impl Api {
    pub fn new(args: &ClientArgs) -> Result<Api, ApiError> {
        let base = server_url(args.server.as_deref(), std::env::var("AGENTD_LISTEN").ok().as_deref())?;
        let (token, source) = match args.token.as_ref().map(|t| t.0.trim()).filter(|t| !t.is_empty()) {
            Some(token) => (Some(token.to_string()), "--token or AGENTD_TOKEN"),
            None => (read_token_file(&args.state_dir), "the state directory's admin.token"),
        };
        let mut headers = HeaderMap::new();
        if let Some(token) = &token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ApiError::BadToken(source))?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("agentd-cli/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .build()
            .map_err(|e| ApiError::Transport { url: base.clone(), reason: root_cause(&e) })?;
        Ok(Api { base, has_token: token.is_some(), http })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `method path`, the request shaped by `build` (headers, a body); any
    /// answer but a success is an error.
    pub async fn call(&self, method: Method, path: &str, build: impl FnOnce(RequestBuilder) -> RequestBuilder) -> Result<Response, ApiError> {
        let url = self.url(path);
        let request = build(self.http.request(method.clone(), &url));
        let response = request.send().await.map_err(|e| self.transport_error(&url, &e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        Err(self.refusal(method, url, status, &text))
    }

    /// What an error answer means: a problem, or the status and the start of the body.
    fn refusal(&self, method: Method, url: String, status: StatusCode, text: &str) -> ApiError {
        if let Ok(v) = serde_json::from_str::<Value>(text)
            && let Some(code) = v.get("code").and_then(Value::as_str)
        {
            let detail = v.get("detail").or_else(|| v.get("title")).and_then(Value::as_str).unwrap_or("").to_string();
            let hint = if status == StatusCode::UNAUTHORIZED && !self.has_token {
                " (no token was sent: give --token or AGENTD_TOKEN, or run where <state-dir>/admin.token is readable)"
            } else {
                ""
            };
            return ApiError::Problem { status, code: code.to_string(), detail, hint };
        }
        let line = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("");
        let body = if line.is_empty() { String::new() } else { format!(": {}", truncate(line, 200)) };
        ApiError::Http { method, url, status, body }
    }

    pub fn transport_error(&self, url: &str, e: &reqwest::Error) -> ApiError {
        if e.is_connect() {
            ApiError::Unreachable { url: self.base.clone(), reason: root_cause(e) }
        } else {
            ApiError::Transport { url: url.to_string(), reason: root_cause(e) }
        }
    }

    /// `GET path` as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, ApiError> {
        let response = self.call(Method::GET, path, |r| r).await?;
        self.json(path, response).await
    }

    /// `POST path` with a JSON body; the status and the JSON answer (null
    /// when empty).
    pub async fn post(&self, path: &str, body: &Value) -> Result<(StatusCode, Value), ApiError> {
        let response = self.call(Method::POST, path, |r| r.json(body)).await?;
        let status = response.status();
        Ok((status, self.json(path, response).await?))
    }

    /// [`Api::post`] with an `Idempotency-Key`: the same request again is
    /// answered as the first was, waiting for it if it is still under way.
    pub async fn post_keyed(&self, path: &str, key: &str, body: &Value) -> Result<(StatusCode, Value), ApiError> {
        let response = self.call(Method::POST, path, |r| r.header("Idempotency-Key", key).json(body)).await?;
        let status = response.status();
        Ok((status, self.json(path, response).await?))
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(), ApiError> {
        self.call(Method::DELETE, path, |r| r).await.map(drop)
    }

    /// A success's body as JSON; an empty body is null.
    pub async fn json(&self, path: &str, response: Response) -> Result<Value, ApiError> {
        let bytes = response.bytes().await.map_err(|e| self.transport_error(&self.url(path), &e))?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode { url: self.url(path), reason: e.to_string() })
    }
}

/// `--server` / `AGENTD_URL`, else the address the daemon listens on by
/// the same configuration (`listen`, `AGENTD_LISTEN`: a wildcard address
/// reached on loopback), else [`DEFAULT_SERVER`]. A bare `host:port` is
/// taken as http://.
pub fn server_url(server: Option<&str>, listen: Option<&str>) -> Result<String, ApiError> {
    let server = server.map(str::trim).filter(|s| !s.is_empty());
    let Some(server) = server else {
        let from_listen = listen.and_then(|l| l.trim().parse::<SocketAddr>().ok()).filter(|a| a.port() != 0).map(|mut a| {
            if a.ip().is_unspecified() {
                a.set_ip(if a.is_ipv4() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V6(Ipv6Addr::LOCALHOST) });
            }
            format!("http://{a}")
        });
        return Ok(from_listen.unwrap_or_else(|| DEFAULT_SERVER.to_string()));
    };
    let url = if server.contains("://") { server.to_string() } else { format!("http://{server}") };
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(url.trim_end_matches('/').to_string()),
        _ => Err(ApiError::BadServer(server.to_string())),
    }
}

/// `id` as one path segment: ids are plain ASCII, but whatever a user
/// types must not reach another path (`..`, `/`, `?`).
pub fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') || (b == b'.' && id != "." && id != "..") {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The admin token in `<state_dir>/admin.token`, if this user may read it.
fn read_token_file(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(state_dir.join(TOKEN_FILE)).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}

/// The innermost cause of an error: "Connection refused (os error 111)"
/// rather than "error sending request".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    if let Some(io) = cause.downcast_ref::<std::io::Error>()
        && io.kind() == std::io::ErrorKind::ConnectionRefused
    {
        return "connection refused".into();
    }
    cause.to_string()
}

fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_comes_from_the_flag_then_the_listen_address_then_the_default() {
        assert_eq!(server_url(Some("http://10.0.0.1:9000/"), Some("0.0.0.0:1")).unwrap(), "http://10.0.0.1:9000");
        assert_eq!(server_url(Some("localhost:9000"), None).unwrap(), "http://localhost:9000");
        assert_eq!(server_url(Some("https://agentd.example"), None).unwrap(), "https://agentd.example");
        assert_eq!(server_url(None, Some("0.0.0.0:9090")).unwrap(), "http://127.0.0.1:9090");
        assert_eq!(server_url(None, Some("[::]:9090")).unwrap(), "http://[::1]:9090");
        assert_eq!(server_url(None, Some("192.168.1.5:80")).unwrap(), "http://192.168.1.5:80");
        assert_eq!(server_url(None, Some("127.0.0.1:0")).unwrap(), DEFAULT_SERVER, "port 0 is no address to reach");
        assert_eq!(server_url(Some(" "), None).unwrap(), DEFAULT_SERVER);
        assert!(matches!(server_url(Some("ftp://x"), None), Err(ApiError::BadServer(_))));
        assert!(matches!(server_url(Some("http://"), None), Err(ApiError::BadServer(_))));
    }

    #[test]
    fn ids_stay_one_path_segment() {
        assert_eq!(segment("ses_01ab-C.d"), "ses_01ab-C.d");
        assert_eq!(segment("../x?y"), "..%2Fx%3Fy");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("a b"), "a%20b");
    }

    #[test]
    fn the_token_file_is_read_trimmed_and_an_empty_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_token_file(dir.path()), None);
        std::fs::write(dir.path().join(TOKEN_FILE), "  \n").unwrap();
        assert_eq!(read_token_file(dir.path()), None);
        std::fs::write(dir.path().join(TOKEN_FILE), "agt_secret\n").unwrap();
        assert_eq!(read_token_file(dir.path()).as_deref(), Some("agt_secret"));
    }

    #[test]
    fn problems_keep_their_code_and_other_errors_their_status() {
        let api = Api::new(&ClientArgs { server: None, token: Some(crate::cli::Secret("t".into())), state_dir: "/nonexistent".into() }).unwrap();
        let problem = r#"{"type":"x","title":"Not Found","status":404,"code":"session_not_found","detail":"no session ses_1"}"#;
        let e = api.refusal(Method::GET, "u".into(), StatusCode::NOT_FOUND, problem);
        assert_eq!(e.to_string(), "session_not_found: no session ses_1");
        assert_eq!(e.code(), Some("session_not_found"));
        let e = api.refusal(Method::GET, "http://x/v1".into(), StatusCode::BAD_GATEWAY, "<html>\n  bad gateway</html>\n");
        assert_eq!(e.to_string(), "GET http://x/v1: HTTP 502 Bad Gateway: <html>");
        assert!(e.is_transient());
    }

    #[test]
    fn an_unauthorized_answer_without_a_token_says_how_to_give_one() {
        let api = Api::new(&ClientArgs { server: None, token: None, state_dir: "/nonexistent".into() }).unwrap();
        let e = api.refusal(Method::GET, "u".into(), StatusCode::UNAUTHORIZED, r#"{"code":"unauthorized","detail":"a bearer token is required"}"#);
        assert!(e.to_string().starts_with("unauthorized: a bearer token is required (no token was sent"), "{e}");
    }
}
