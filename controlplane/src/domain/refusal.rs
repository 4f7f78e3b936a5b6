//! Why something the API asked for was refused, as the domain says it: a
//! class (what kind of refusal: the HTTP edge turns it into a status), a
//! stable code clients can act on, and a detail for people.

use serde::{Deserialize, Serialize};

use super::code::Code;

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
    pub code: Code,
    pub detail: String,
}

impl Refusal {
    pub fn new(class: Class, code: Code, detail: impl Into<String>) -> Refusal {
        Refusal { class, code, detail: detail.into() }
    }

    pub fn conflict(code: Code, detail: impl Into<String>) -> Refusal {
        Refusal::new(Class::Conflict, code, detail)
    }

    pub fn not_found(code: Code, detail: impl Into<String>) -> Refusal {
        Refusal::new(Class::NotFound, code, detail)
    }

    pub fn invalid(code: Code, detail: impl Into<String>) -> Refusal {
        Refusal::new(Class::Invalid, code, detail)
    }

    /// A refusal read back from storage: a code that is no longer one of
    /// the stable codes becomes `internal`.
    pub fn known(class: Class, code: &str, detail: impl Into<String>) -> Refusal {
        Refusal::new(class, Code::parse(code).unwrap_or(Code::Internal), detail)
    }

    /// What a node's answer means: its stable code (`agentd-code`) and the
    /// class that code has, or, without one, unavailable when the node could
    /// not be reached.
    pub fn from_node(s: &tonic::Status) -> Refusal {
        match agentd_proto::error::code_of(s) {
            Some(code) => {
                let (code, class) = NODE_CODES.iter().find(|(c, _)| *c == code).copied().unwrap_or((Code::Internal, Class::Internal));
                Refusal::new(class, code, s.message())
            }
            None if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) => {
                Refusal::new(Class::Unavailable, Code::NodeUnavailable, format!("the node did not answer: {}", s.message()))
            }
            None => Refusal::new(Class::Internal, Code::Internal, s.message()),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// The stable codes a node may send back, with the class each has. A
/// closed set: any other code is treated as internal.
pub const NODE_CODES: &[(Code, Class)] = &[
    (Code::ContainerNotFound, Class::NotFound),
    (Code::SessionNotFound, Class::NotFound),
    (Code::AgentNotFound, Class::NotFound),
    (Code::PermissionRequestNotFound, Class::NotFound),
    (Code::RunActive, Class::Conflict),
    (Code::AgentExists, Class::Conflict),
    (Code::ContainerHibernated, Class::Conflict),
    // A workflow step whose lease was taken over called the node late.
    (Code::StaleEpoch, Class::Conflict),
    (Code::InvalidRequest, Class::Invalid),
    (Code::InvalidProfile, Class::Invalid),
    (Code::InvalidNetworkPolicy, Class::Invalid),
    (Code::InvalidPrompt, Class::Invalid),
    (Code::BadWorkingDir, Class::Invalid),
    (Code::AgentExecutableNotFound, Class::Invalid),
    (Code::MountSourceNotFound, Class::Invalid),
    // The profile names a secret the node's secret store does not hold.
    (Code::UnknownSecret, Class::Invalid),
    // The node's secret store cannot be read (its file, mode or owner).
    (Code::SecretsUnavailable, Class::Internal),
    (Code::UnknownOption, Class::Invalid),
    (Code::BundleChecksumMismatch, Class::Invalid),
    (Code::BundleInvalid, Class::Invalid),
    (Code::BundleFetchFailed, Class::BadGateway),
    (Code::UnsupportedContent, Class::Invalid),
    (Code::UnknownMode, Class::Invalid),
    (Code::UnknownConfigOption, Class::Invalid),
    (Code::NotSupported, Class::Conflict),
    // session/load of an ACP session the agent does not have.
    (Code::AcpSessionNotFound, Class::Invalid),
    (Code::AcpSessionOpen, Class::Conflict),
    (Code::InvalidMcpServer, Class::Invalid),
    (Code::McpUnsupported, Class::Invalid),
    // One the supervisor could not create in the sandbox.
    (Code::InvalidAdditionalDirectory, Class::Invalid),
    // The plan gives no credentials the agent accepts: fix the request's env.
    (Code::AgentAuthRequired, Class::Invalid),
    (Code::AgentRestarting, Class::Unavailable),
    // Exited or failed past its restart budget: retrying will not help.
    (Code::AgentUnavailable, Class::Conflict),
    (Code::AgentInitFailed, Class::BadGateway),
    (Code::AgentError, Class::BadGateway),
    (Code::AgentSpawnFailed, Class::BadGateway),
    (Code::NodeFull, Class::Unavailable),
    (Code::SandboxFailed, Class::Internal),
    (Code::Internal, Class::Internal),
];
