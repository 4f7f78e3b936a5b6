//! Middleware: every route but `/healthz`, `/readyz`, `/openapi.json`, the dashboard's static
//! files (`/ui`: they hold no data; its calls for data carry the token) and
//! the node join (whose join token is its credential) needs `Authorization: Bearer <token>` of a
//! scope enough for it: `read` for GET, `write` for the rest, `admin` for
//! tokens, nodes and the audit log (and, checked by handlers, for what
//! reaches the host: [`crate::powers`]). A request without a
//! usable token is 401 with `WWW-Authenticate: Bearer`; one whose token is
//! too weak, 403. The caller is handed on (request and response
//! extensions): the audit record names its token's id, never the token.

use crate::domain::Code;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Problem;
use crate::AppState;
use crate::auth::{AuthError, Caller, Scope};
use crate::powers::Authority;

/// The scope a request needs; `None`: open to anyone.
pub fn required(method: &Method, path: &str) -> Option<Scope> {
    if path == "/healthz" || path == "/readyz" || path == "/openapi.json" || path == "/v1/nodes:join" || path == "/ui" || path.starts_with("/ui/") {
        return None;
    }
    let reading = matches!(*method, Method::GET | Method::HEAD);
    let admin = path.starts_with("/v1/tokens")
        || path.starts_with("/v1/audit")
        || (path.starts_with("/v1/nodes") && !reading);
    Some(if admin { Scope::Admin } else if reading { Scope::Read } else { Scope::Write })
}

fn challenge(problem: Problem, error: &str, scope: Option<Scope>) -> Response {
    let mut response = problem.into_response();
    let mut value = format!("Bearer realm=\"agentd\", error=\"{error}\"");
    if let Some(scope) = scope {
        value.push_str(&format!(", scope=\"{}\"", scope.name()));
    }
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_str(&value).expect("a header value"));
    response
}

pub async fn require(State(app): State<AppState>, mut request: Request, next: Next) -> Response {
    let Some(needed) = required(request.method(), request.uri().path()) else {
        return next.run(request).await;
    };
    if !app.auth {
        return next.run(request).await;
    }
    let presented = request.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    let caller = match crate::auth::check(&app.store, presented).await {
        Ok(caller) => caller,
        Err(AuthError::Store(e)) => return Problem::from(e).into_response(),
        Err(e @ (AuthError::Missing | AuthError::Malformed)) => {
            return challenge(Problem::new(StatusCode::UNAUTHORIZED, Code::Unauthorized, e.to_string()), "invalid_request", None);
        }
        Err(e) => return challenge(Problem::new(StatusCode::UNAUTHORIZED, Code::InvalidToken, e.to_string()), "invalid_token", None),
    };
    if caller.scope < needed {
        let detail = format!("token {} has scope {}; this needs {}", caller.token_id, caller.scope.name(), needed.name());
        return challenge(Problem::new(StatusCode::FORBIDDEN, Code::InsufficientScope, detail), "insufficient_scope", Some(needed));
    }
    request.extensions_mut().insert(caller.clone());
    let mut response = next.run(request).await;
    response.extensions_mut().insert(caller);
    response
}

/// The caller of a request that passed [`require`], for handlers.
pub fn caller(request_extensions: &axum::http::Extensions) -> Option<&Caller> {
    request_extensions.get::<Caller>()
}

/// Who a request speaks for, for [`crate::powers`]: an admin token, or any
/// request of an API run without tokens (the operator's loopback choice),
/// is the operator.
pub fn authority(app: &AppState, caller: Option<&Caller>) -> Authority {
    match caller {
        _ if !app.auth => Authority::Operator,
        Some(c) if c.scope == Scope::Admin => Authority::Operator,
        _ => Authority::User,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_by_route() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(required(&get, "/healthz"), None);
        assert_eq!(required(&get, "/readyz"), None);
        assert_eq!(required(&get, "/metrics"), Some(Scope::Read));
        assert_eq!(required(&post, "/v1/nodes:join"), None);
        assert_eq!(required(&get, "/ui"), None);
        assert_eq!(required(&get, "/ui/app.js"), None);
        assert_eq!(required(&get, "/uix"), Some(Scope::Read));
        assert_eq!(required(&get, "/v1/sessions"), Some(Scope::Read));
        assert_eq!(required(&post, "/v1/sessions/ses_1:prompt"), Some(Scope::Write));
        assert_eq!(required(&Method::DELETE, "/v1/containers/c"), Some(Scope::Write));
        assert_eq!(required(&get, "/v1/nodes"), Some(Scope::Read));
        assert_eq!(required(&post, "/v1/nodes/n1:cordon"), Some(Scope::Admin));
        assert_eq!(required(&get, "/v1/tokens"), Some(Scope::Admin));
        assert_eq!(required(&get, "/v1/audit"), Some(Scope::Admin));
        // A source of the caller's choice is checked by the handler.
        assert_eq!(required(&post, "/v1/registry:sync"), Some(Scope::Write));
    }
}
