//! One request through the proxy: from the sandbox in plain HTTP/1.1, to
//! the upstream over TLS with the secret in its header, and the answer back,
//! both bodies streamed as they come (a model API's SSE reaches the agent
//! event by event; nothing is buffered whole).
//!
//! hyper's own client and server (already in the node through tonic and
//! reqwest) rather than reqwest or a proxy crate: the request is forwarded
//! as it came (method, path, headers, body frames) with only hop-by-hop
//! headers, `host` and the secret's header changed; no redirect following,
//! decompression or header rewriting of a higher-level client in between.
//! Upstream connections are HTTP/1.1 (no h2 ALPN), pooled and shared by
//! every sandbox of the node: each request carries its own key.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use agentd_plan::secrets::Upstream;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// How long a TCP connect to an upstream may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);

/// The client every proxy of the node forwards through.
pub type Upstreams = Client<HttpsConnector<HttpConnector>, Incoming>;
/// An upstream's body streamed through, or the proxy's own short answer.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself:
/// never forwarded either way.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Where one listener sends its requests, and the header it adds.
pub struct Route {
    /// The secret's name, for logs (never its value).
    pub secret: String,
    pub upstream: Upstream,
    pub header: HeaderName,
    /// The header's value, marked sensitive (hyper's Debug hides it).
    pub value: HeaderValue,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route").field("secret", &self.secret).field("upstream", &self.upstream.to_string()).field("header", &self.header).finish_non_exhaustive()
    }
}

pub fn upstreams(tls: rustls::ClientConfig) -> Upstreams {
    let mut http = HttpConnector::new();
    // The TLS connector above it wants https URIs through.
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only().enable_http1().wrap_connector(http);
    Client::builder(TokioExecutor::new()).pool_idle_timeout(POOL_IDLE).pool_timer(TokioTimer::new()).build(https)
}

/// Forwards `request` along `route`; failures become the proxy's own
/// answers (400, 403, 405, 502), text naming the cause.
pub async fn handle(request: Request<Incoming>, route: Arc<Route>, upstreams: Upstreams) -> Result<Response<ProxyBody>, Infallible> {
    let (mut parts, body) = request.into_parts();
    if parts.method == Method::CONNECT {
        return Ok(answer(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not served: send plain HTTP requests to this endpoint"));
    }
    let path = parts.uri.path();
    if let Err((status, why)) = check_path(path, route.upstream.base_path()) {
        return Ok(answer(status, &why));
    }
    let target = format!("https://{}{}", route.upstream.authority(), parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    let Ok(uri) = target.parse::<Uri>() else {
        return Ok(answer(StatusCode::BAD_REQUEST, "the request's path is not a valid URI path"));
    };
    tracing::debug!(secret = route.secret, method = %parts.method, upstream = %route.upstream, path = uri.path(), "secrets proxy: forwarding");
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    // hyper's client sets the upstream's own; the server answered 100
    // Continue already when the body was asked for.
    parts.headers.remove(header::HOST);
    parts.headers.remove(header::EXPECT);
    // Whatever the agent sent there (the placeholder) is replaced.
    parts.headers.remove(&route.header);
    parts.headers.insert(route.header.clone(), route.value.clone());
    match upstreams.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, Either::Left(body)))
        }
        Err(e) => {
            let cause = chain(&e);
            tracing::warn!(secret = route.secret, upstream = %route.upstream, error = cause, "secrets proxy: upstream failed");
            Ok(answer(StatusCode::BAD_GATEWAY, &format!("upstream {} failed: {cause}", route.upstream)))
        }
    }
}

/// Paths under the upstream's base only, without `.` or `..` segments
/// (also percent-encoded) and without encoded slashes or backslashes (which
/// an upstream or its front proxy may decode before normalising): the key
/// goes to the API it was given for.
fn check_path(path: &str, base: &str) -> Result<(), (StatusCode, String)> {
    let lower = path.to_ascii_lowercase();
    if path.contains('\\') || lower.contains("%2f") || lower.contains("%5c") {
        return Err((StatusCode::BAD_REQUEST, "paths with encoded slashes or backslashes are not forwarded".into()));
    }
    let dotted = path.split('/').any(|s| matches!(s.to_ascii_lowercase().replace("%2e", ".").as_str(), "." | ".."));
    if dotted {
        return Err((StatusCode::BAD_REQUEST, "paths with `.` or `..` segments are not forwarded".into()));
    }
    if !base.is_empty() && path != base && !path.strip_prefix(base).is_some_and(|rest| rest.starts_with('/')) {
        return Err((StatusCode::FORBIDDEN, format!("only paths under {base} are forwarded to this upstream")));
    }
    Ok(())
}

/// Removes hop-by-hop headers, and those the `connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP) {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
}

/// An error and its sources, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn answer(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!("agentd secrets proxy: {text}\n")))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_base() {
        assert!(check_path("/v1/messages", "").is_ok());
        assert!(check_path("/", "").is_ok());
        assert!(check_path("/v1/chat/completions", "/v1").is_ok());
        assert!(check_path("/v1", "/v1").is_ok());
        for (path, base, status) in [
            ("/v2/x", "/v1", StatusCode::FORBIDDEN),
            ("/v10/x", "/v1", StatusCode::FORBIDDEN),
            ("/", "/v1", StatusCode::FORBIDDEN),
            ("/v1/../admin", "/v1", StatusCode::BAD_REQUEST),
            ("/v1/%2E%2e/admin", "/v1", StatusCode::BAD_REQUEST),
            ("/./x", "", StatusCode::BAD_REQUEST),
            ("/v1/x%2f..%2f..%2fadmin", "/v1", StatusCode::BAD_REQUEST),
            ("/v1/x%5C..%5Cadmin", "/v1", StatusCode::BAD_REQUEST),
            ("/v1/x\\..\\admin", "/v1", StatusCode::BAD_REQUEST),
        ] {
            assert_eq!(check_path(path, base).unwrap_err().0, status, "{path} under {base:?}");
        }
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("connection", "close, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("content-type", "application/json"),
            ("x-api-key", "placeholder"),
        ] {
            headers.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-type", "x-api-key"]);
    }

    #[test]
    fn routes_never_show_their_value() {
        let mut value = HeaderValue::from_static("sk-secret-value");
        value.set_sensitive(true);
        let route = Route {
            secret: "K".into(),
            upstream: Upstream::parse("https://api.example").unwrap(),
            header: HeaderName::from_static("x-api-key"),
            value,
        };
        let shown = format!("{route:?} {:?}", route.value);
        assert!(!shown.contains("sk-secret"), "{shown}");
    }
}
