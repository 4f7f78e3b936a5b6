//! Why something the API asked for was refused, as the domain says it: a
//! class (what kind of refusal: the HTTP edge turns it into a status), a
//! stable code clients can act on, and a detail for people.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    Gone,
    /// Well-formed but not acceptable (HTTP 422).
    Invalid,
    Internal,
    /// A peer (the node, the agent) failed.
    BadGateway,
    /// Try again later: the node or the store does not answer.
    Unavailable,
}

impl Class {
    /// The HTTP status of this class.
    pub fn http_status(self) -> u16 {
        match self {
            Class::BadRequest => 400,
            Class::Unauthorized => 401,
            Class::Forbidden => 403,
            Class::NotFound => 404,
            Class::Conflict => 409,
            Class::Gone => 410,
            Class::Invalid => 422,
            Class::Internal => 500,
            Class::BadGateway => 502,
            Class::Unavailable => 503,
        }
    }

    /// The class of an HTTP status, for outcomes stored before classes were
    /// (they kept the status).
    pub fn of_http_status(status: u16) -> Class {
        match status {
            400 => Class::BadRequest,
            401 => Class::Unauthorized,
            403 => Class::Forbidden,
            404 => Class::NotFound,
            409 => Class::Conflict,
            410 => Class::Gone,
            422 => Class::Invalid,
            502 => Class::BadGateway,
            503 => Class::Unavailable,
            _ => Class::Internal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub class: Class,
    pub code: &'static str,
    pub detail: String,
}

impl Refusal {
    pub fn new(class: Class, code: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal { class, code, detail: detail.into() }
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal::new(Class::Conflict, code, detail)
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal::new(Class::NotFound, code, detail)
    }

    pub fn invalid(code: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal::new(Class::Invalid, code, detail)
    }

    /// A refusal read back from storage: `code` must be one of the stable
    /// codes, else it becomes `internal`.
    pub fn known(class: Class, code: &str, detail: impl Into<String>) -> Refusal {
        let code = NODE_CODES.iter().map(|(c, _)| *c).chain(CONTROL_PLANE_CODES.iter().copied()).find(|c| *c == code).unwrap_or("internal");
        Refusal::new(class, code, detail)
    }

    /// What a node's answer means: its stable code (`agentd-code`) and the
    /// class that code has, or, without one, unavailable when the node could
    /// not be reached.
    pub fn from_node(s: &tonic::Status) -> Refusal {
        match agentd_proto::error::code_of(s) {
            Some(code) => {
                let (code, class) = NODE_CODES.iter().find(|(c, _)| *c == code).copied().unwrap_or(("internal", Class::Internal));
                Refusal::new(class, code, s.message())
            }
            None if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => {
                Refusal::new(Class::Unavailable, "node_unavailable", format!("the node did not answer: {}", s.message()))
            }
            None => Refusal::new(Class::Internal, "internal", s.message()),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// Codes the control plane itself gives that a workflow step may record.
const CONTROL_PLANE_CODES: &[&str] = &["illegal_state", "node_unavailable", "store_unavailable", "no_capacity", "node_lost", "sandbox_lost"];

/// The stable codes a node may send back, with the class each has. A
/// closed set: any other code is treated as internal.
pub const NODE_CODES: &[(&str, Class)] = &[
    ("container_not_found", Class::NotFound),
    ("session_not_found", Class::NotFound),
    ("agent_not_found", Class::NotFound),
    ("permission_request_not_found", Class::NotFound),
    ("run_active", Class::Conflict),
    ("agent_exists", Class::Conflict),
    ("container_hibernated", Class::Conflict),
    // A workflow step whose lease was taken over called the node late.
    ("stale_epoch", Class::Conflict),
    ("invalid_request", Class::Invalid),
    ("invalid_profile", Class::Invalid),
    ("invalid_network_policy", Class::Invalid),
    ("invalid_prompt", Class::Invalid),
    ("bad_working_dir", Class::Invalid),
    ("agent_executable_not_found", Class::Invalid),
    ("mount_source_not_found", Class::Invalid),
    // The profile names a secret the node's secret store does not hold.
    ("unknown_secret", Class::Invalid),
    // The node's secret store cannot be read (its file, mode or owner).
    ("secrets_unavailable", Class::Internal),
    ("unknown_option", Class::Invalid),
    ("bundle_checksum_mismatch", Class::Invalid),
    ("bundle_invalid", Class::Invalid),
    ("bundle_fetch_failed", Class::BadGateway),
    ("unsupported_content", Class::Invalid),
    ("unknown_mode", Class::Invalid),
    ("unknown_config_option", Class::Invalid),
    ("not_supported", Class::Conflict),
    // session/load of an ACP session the agent does not have.
    ("acp_session_not_found", Class::Invalid),
    ("acp_session_open", Class::Conflict),
    ("invalid_mcp_server", Class::Invalid),
    ("mcp_unsupported", Class::Invalid),
    // One the supervisor could not create in the sandbox.
    ("invalid_additional_directory", Class::Invalid),
    // The plan gives no credentials the agent accepts: fix the request's env.
    ("agent_auth_required", Class::Invalid),
    ("agent_restarting", Class::Unavailable),
    // Exited or failed past its restart budget: retrying will not help.
    ("agent_unavailable", Class::Conflict),
    ("agent_init_failed", Class::BadGateway),
    ("agent_error", Class::BadGateway),
    ("agent_spawn_failed", Class::BadGateway),
    ("node_full", Class::Unavailable),
    ("sandbox_failed", Class::Internal),
    ("internal", Class::Internal),
];
