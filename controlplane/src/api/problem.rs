//! Errors to HTTP clients: `application/problem+json` with a stable `code`.
//! Internals are logged; clients see only what they may.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::domain::{Code, Refusal};
use crate::store::StoreError;

#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub code: Code,
    pub detail: String,
    /// `Allow` of a 405: the methods the resource does take (RFC 9110).
    pub allow: Option<&'static str>,
}

impl Problem {
    pub fn new(status: StatusCode, code: Code, detail: impl Into<String>) -> Self {
        Self { status, code, detail: detail.into(), allow: None }
    }

    /// 405 for a method (or an action) the resource does not take.
    pub fn method_not_allowed(allow: &'static str, detail: impl Into<String>) -> Self {
        Self { allow: Some(allow), ..Self::new(StatusCode::METHOD_NOT_ALLOWED, Code::MethodNotAllowed, detail) }
    }

    pub fn not_found(code: Code, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, detail)
    }

    pub fn conflict(code: Code, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }

    pub fn invalid(code: Code, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }

}

/// The `code` of a problem answer, kept on the response.
#[derive(Debug, Clone)]
pub struct ProblemCode(pub String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code.as_str(), detail = %self.detail, "request failed");
        }
        let mut body = json!({
            "type": format!("https://agentd.dev/problems/{}", self.code),
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "code": self.code.as_str(),
            "detail": self.detail,
        });
        if let Some(id) = super::telemetry::current_request_id() {
            body["instance"] = json!(format!("urn:agentd:request:{id}"));
        }
        let mut response = (self.status, body.to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(allow) = self.allow {
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        // For the audit record, which sees the response and not this body.
        response.extensions_mut().insert(ProblemCode(self.code.as_str().to_string()));
        response
    }
}

impl From<crate::store::placement::PlacementError> for Problem {
    fn from(e: crate::store::placement::PlacementError) -> Self {
        use crate::store::placement::PlacementError;
        match e {
            PlacementError::NoCapacity(_) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, Code::NoCapacity, e.to_string()),
            PlacementError::UnknownNode(_) => Problem::invalid(Code::UnknownNode, e.to_string()),
            PlacementError::NoNodeMatches(_) => Problem::invalid(Code::UnsatisfiableSelector, e.to_string()),
            PlacementError::NeverFits(_) => Problem::invalid(Code::InvalidProfile, e.to_string()),
            PlacementError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        Refusal::from(e).into()
    }
}

impl From<Refusal> for Problem {
    fn from(r: Refusal) -> Self {
        let status = StatusCode::from_u16(r.class.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Problem::new(status, r.code, r.detail)
    }
}

impl From<tonic::Status> for Problem {
    fn from(s: tonic::Status) -> Self {
        Refusal::from_node(&s).into()
    }
}
