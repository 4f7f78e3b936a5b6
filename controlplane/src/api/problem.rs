//! Errors to HTTP clients: `application/problem+json` with a stable `code`.
//! Internals are logged; clients see only what they may.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self { status, code, detail: detail.into() }
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, detail)
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }

    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }

    /// A problem read back from storage (a workflow step's outcome): `code`
    /// must be one of the stable codes, else it becomes `internal`.
    pub fn known(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        let code = NODE_CODES.iter().map(|(c, _)| *c).chain(CONTROL_PLANE_CODES.iter().copied()).find(|c| *c == code).unwrap_or("internal");
        Self::new(status, code, detail)
    }
}

/// Codes the control plane itself gives that a workflow step may record.
const CONTROL_PLANE_CODES: &[&str] = &["illegal_state", "node_unavailable", "store_unavailable"];

/// The `code` of a problem answer, kept on the response.
#[derive(Debug, Clone)]
pub struct ProblemCode(pub String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, detail = %self.detail, "request failed");
        }
        let body = json!({
            "type": format!("https://agentd.dev/problems/{}", self.code),
            "title": self.status.canonical_reason().unwrap_or("error"),
            "status": self.status.as_u16(),
            "code": self.code,
            "detail": self.detail,
        });
        let mut response = (self.status, body.to_string()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // For the audit record, which sees the response and not this body.
        response.extensions_mut().insert(ProblemCode(self.code.to_string()));
        response
    }
}

impl From<crate::store::placement::PlacementError> for Problem {
    fn from(e: crate::store::placement::PlacementError) -> Self {
        use crate::store::placement::PlacementError;
        match e {
            PlacementError::NoCapacity(_) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "no_capacity", e.to_string()),
            PlacementError::UnknownNode(_) => Problem::invalid("unknown_node", e.to_string()),
            PlacementError::NoNodeMatches(_) => Problem::invalid("unsatisfiable_selector", e.to_string()),
            PlacementError::NeverFits(_) => Problem::invalid("invalid_profile", e.to_string()),
            PlacementError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound { entity, .. } => {
                let code = match entity {
                    crate::store::states::Entity::Container => "container_not_found",
                    crate::store::states::Entity::Session => "session_not_found",
                    crate::store::states::Entity::Run => "run_not_found",
                    crate::store::states::Entity::AgentInstance => "agent_not_found",
                };
                Problem::not_found(code, e.to_string())
            }
            StoreError::Illegal(_) => Problem::conflict("illegal_state", e.to_string()),
            StoreError::RunActive { .. } => Problem::conflict("run_active", e.to_string()),
            // A request with the same key committed first: a retry answers it.
            StoreError::StaleLease { .. } => Problem::conflict("stale_lease", e.to_string()),
            StoreError::KeyTaken { .. } => Problem::conflict("idempotency_key_in_use", e.to_string()),
            StoreError::Db(_) | StoreError::Migrate(_) => {
                tracing::error!(error = %e, "store error");
                Problem::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the store is unavailable; retry later")
            }
        }
    }
}

/// The stable codes a node may send back, with the HTTP status each becomes.
/// A closed set: any other code is treated as internal.
const NODE_CODES: &[(&str, StatusCode)] = &[
    ("container_not_found", StatusCode::NOT_FOUND),
    ("session_not_found", StatusCode::NOT_FOUND),
    ("agent_not_found", StatusCode::NOT_FOUND),
    ("permission_request_not_found", StatusCode::NOT_FOUND),
    ("run_active", StatusCode::CONFLICT),
    ("agent_exists", StatusCode::CONFLICT),
    ("container_hibernated", StatusCode::CONFLICT),
    // A workflow step whose lease was taken over called the node late.
    ("stale_epoch", StatusCode::CONFLICT),
    ("invalid_request", StatusCode::UNPROCESSABLE_ENTITY),
    ("invalid_profile", StatusCode::UNPROCESSABLE_ENTITY),
    ("invalid_prompt", StatusCode::UNPROCESSABLE_ENTITY),
    ("bad_working_dir", StatusCode::UNPROCESSABLE_ENTITY),
    ("agent_executable_not_found", StatusCode::UNPROCESSABLE_ENTITY),
    ("mount_source_not_found", StatusCode::UNPROCESSABLE_ENTITY),
    ("unknown_option", StatusCode::UNPROCESSABLE_ENTITY),
    ("bundle_checksum_mismatch", StatusCode::UNPROCESSABLE_ENTITY),
    ("bundle_invalid", StatusCode::UNPROCESSABLE_ENTITY),
    ("bundle_fetch_failed", StatusCode::BAD_GATEWAY),
    ("unsupported_content", StatusCode::UNPROCESSABLE_ENTITY),
    ("unknown_mode", StatusCode::UNPROCESSABLE_ENTITY),
    ("unknown_config_option", StatusCode::UNPROCESSABLE_ENTITY),
    ("not_supported", StatusCode::CONFLICT),
    // session/load of an ACP session the agent does not have.
    ("acp_session_not_found", StatusCode::UNPROCESSABLE_ENTITY),
    ("acp_session_open", StatusCode::CONFLICT),
    ("invalid_mcp_server", StatusCode::UNPROCESSABLE_ENTITY),
    ("mcp_unsupported", StatusCode::UNPROCESSABLE_ENTITY),
    // One the supervisor could not create in the sandbox.
    ("invalid_additional_directory", StatusCode::UNPROCESSABLE_ENTITY),
    // The plan gives no credentials the agent accepts: fix the request's env.
    ("agent_auth_required", StatusCode::UNPROCESSABLE_ENTITY),
    ("agent_restarting", StatusCode::SERVICE_UNAVAILABLE),
    // Exited or failed past its restart budget: retrying will not help.
    ("agent_unavailable", StatusCode::CONFLICT),
    ("agent_init_failed", StatusCode::BAD_GATEWAY),
    ("agent_error", StatusCode::BAD_GATEWAY),
    ("agent_spawn_failed", StatusCode::BAD_GATEWAY),
    ("node_full", StatusCode::SERVICE_UNAVAILABLE),
    ("sandbox_failed", StatusCode::INTERNAL_SERVER_ERROR),
    ("internal", StatusCode::INTERNAL_SERVER_ERROR),
];

impl From<tonic::Status> for Problem {
    fn from(s: tonic::Status) -> Self {
        match agentd_proto::error::code_of(&s) {
            Some(code) => {
                let (code, status) =
                    NODE_CODES.iter().find(|(c, _)| *c == code).copied().unwrap_or(("internal", StatusCode::INTERNAL_SERVER_ERROR));
                Problem::new(status, code, s.message().to_string())
            }
            None if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "node_unavailable",
                format!("the node did not answer: {}", s.message()),
            ),
            None => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", s.message().to_string()),
        }
    }
}
