//! Every stable `code` agentd answers with, in one closed list: problem+json
//! bodies, refusals a workflow step records, failures the store keeps
//! (`error_code`), and the codes a node sends back (`agentd-code`). Clients
//! act on these, so a code is added here or not at all; the OpenAPI
//! description lists them (`api::openapi`), each with what it means.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{RefOr, extensions::ExtensionsBuilder};

macro_rules! codes {
    ($( #[doc = $doc:literal] $variant:ident = $text:literal, )*) => {
        /// A stable code (see the module's doc).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code {
            $( #[doc = $doc] $variant, )*
        }

        impl Code {
            /// Every code, in the order of this list.
            pub const ALL: &[Code] = &[$( Code::$variant, )*];

            /// The code as clients see it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( Code::$variant => $text, )*
                }
            }

            /// What the code means, for the API's description.
            pub const fn meaning(self) -> &'static str {
                match self {
                    $( Code::$variant => $doc.trim_ascii(), )*
                }
            }
        }
    };
}

codes! {
    /// The request is malformed or one of its fields is not acceptable; `detail` names it.
    InvalidRequest = "invalid_request",
    /// The body is not JSON.
    InvalidJson = "invalid_json",
    /// A body was sent without `Content-Type: application/json`.
    UnsupportedMediaType = "unsupported_media_type",
    /// No route has this method at this path; `Allow` lists those it has.
    MethodNotAllowed = "method_not_allowed",
    /// No route has this path.
    NotFound = "not_found",
    /// `{id}:verb` names no action of this resource.
    UnknownAction = "unknown_action",
    /// No `Authorization: Bearer` token, or not one the header can carry.
    Unauthorized = "unauthorized",
    /// The token is unknown, expired or revoked.
    InvalidToken = "invalid_token",
    /// The token's scope is too weak for this route (`WWW-Authenticate` names the one needed).
    InsufficientScope = "insufficient_scope",
    /// The entity is not in a state that allows this (a deleted container, a closed session).
    IllegalState = "illegal_state",
    /// `container_profile` (or `profile`) is not valid: limits, network, rootfs, seccomp, node.
    InvalidProfile = "invalid_profile",
    /// `container_profile.network` is not a valid network policy (egress rules).
    InvalidNetworkPolicy = "invalid_network_policy",
    /// `container_profile.secrets` is not valid (a reference's name, upstream, header, scheme or env), or names secrets with `network: host`.
    InvalidSecret = "invalid_secret",
    /// The profile names a secret the node's secret store does not hold.
    UnknownSecret = "unknown_secret",
    /// The node's secret store cannot be read (its file, mode or owner).
    SecretsUnavailable = "secrets_unavailable",
    /// `prompt` is neither a string nor a non-empty array of ACP content blocks, or the agent refused it.
    InvalidPrompt = "invalid_prompt",
    /// Too many labels, or a key or value that is not valid.
    InvalidLabels = "invalid_labels",
    /// `cursor` is not a `next_cursor` of this listing.
    InvalidCursor = "invalid_cursor",
    /// `Idempotency-Key` is not 1 to 255 visible ASCII characters.
    InvalidIdempotencyKey = "invalid_idempotency_key",
    /// The `Idempotency-Key` was used for a different request.
    IdempotencyKeyReused = "idempotency_key_reused",
    /// A request with the same `Idempotency-Key` is being answered; retry.
    IdempotencyKeyInUse = "idempotency_key_in_use",
    /// An entry of `session.mcp_servers` is not a valid MCP server.
    InvalidMcpServer = "invalid_mcp_server",
    /// An entry of `session.additional_directories` is not valid, or could not be made in the sandbox.
    InvalidAdditionalDirectory = "invalid_additional_directory",
    /// The agent has no distribution for this platform.
    NoDistribution = "no_distribution",
    /// The registry has no agent of this id.
    UnknownAgent = "unknown_agent",
    /// `container_profile.node_id` names no node of the fleet.
    UnknownNode = "unknown_node",
    /// No node carries the labels of `container_profile.node_selector`.
    UnsatisfiableSelector = "unsatisfiable_selector",
    /// No node has room for the container now; retry later.
    NoCapacity = "no_capacity",
    /// No container of this id.
    ContainerNotFound = "container_not_found",
    /// No session of this id.
    SessionNotFound = "session_not_found",
    /// No run of this id.
    RunNotFound = "run_not_found",
    /// No such agent (instance) in the container.
    AgentNotFound = "agent_not_found",
    /// No node of this id.
    NodeNotFound = "node_not_found",
    /// No token of this id.
    TokenNotFound = "token_not_found",
    /// The agent asked no open permission question of this id.
    PermissionRequestNotFound = "permission_request_not_found",
    /// The session already has a running turn.
    RunActive = "run_active",
    /// `run_id` is not the session's active run.
    RunNotActive = "run_not_active",
    /// The session has no running turn to cancel.
    NoActiveRun = "no_active_run",
    /// The container holds `capacity` open sessions already.
    ContainerFull = "container_full",
    /// The container is hibernated: resume it first.
    ContainerHibernated = "container_hibernated",
    /// The session is closed and its events were not kept.
    SessionClosed = "session_closed",
    /// The node still holds containers.
    NodeBusy = "node_busy",
    /// A node of this id already joined.
    NodeIdInUse = "node_id_in_use",
    /// The join token is unknown or its proof does not match.
    InvalidJoinToken = "invalid_join_token",
    /// The join token was used already.
    JoinTokenUsed = "join_token_used",
    /// The join token expired.
    JoinTokenExpired = "join_token_expired",
    /// The node's certificate signing request is not valid.
    InvalidCsr = "invalid_csr",
    /// The registry could not be fetched.
    RegistryUnavailable = "registry_unavailable",
    /// The registry's content is not a valid agent registry.
    InvalidRegistry = "invalid_registry",
    /// No registry is configured and the request named no source.
    RegistryNotConfigured = "registry_not_configured",
    /// The store does not answer; retry after `Retry-After`.
    StoreUnavailable = "store_unavailable",
    /// The node does not answer; retry later.
    NodeUnavailable = "node_unavailable",
    /// The node did not answer a call within its deadline; retry later.
    NodeTimeout = "node_timeout",
    /// `/readyz`: no node is alive, so nothing can be scheduled.
    NoNodeAlive = "no_node_alive",
    /// The request uses a power over the node's files or network (a host path, `network: host`, seccomp, a registry source): it needs the admin scope or the operator's allow-list; `detail` names the field.
    OperatorPower = "operator_power",
    /// A workflow step lost its lease to another runner (internal; retried).
    StaleLease = "stale_lease",
    /// A node call came from a step whose lease was taken over (internal; retried).
    StaleEpoch = "stale_epoch",
    /// The node stopped answering for longer than the heartbeat timeout.
    NodeLost = "node_lost",
    /// The sandbox is gone (the node restarted, or its PID 1 died).
    SandboxLost = "sandbox_lost",
    /// The run's end could not be recorded: the node no longer ran it.
    RunEndLost = "run_end_lost",
    /// The container already runs an agent of this instance id.
    AgentExists = "agent_exists",
    /// `working_dir` is not a directory inside the sandbox.
    BadWorkingDir = "bad_working_dir",
    /// The agent's executable is not in the sandbox.
    AgentExecutableNotFound = "agent_executable_not_found",
    /// A mount's source does not exist on the node.
    MountSourceNotFound = "mount_source_not_found",
    /// An option the node does not know.
    UnknownOption = "unknown_option",
    /// The agent bundle's SHA-256 is not the one given.
    BundleChecksumMismatch = "bundle_checksum_mismatch",
    /// The agent bundle is not a valid archive.
    BundleInvalid = "bundle_invalid",
    /// The agent bundle could not be downloaded.
    BundleFetchFailed = "bundle_fetch_failed",
    /// The prompt holds content the agent does not take.
    UnsupportedContent = "unsupported_content",
    /// The agent has no mode of this id.
    UnknownMode = "unknown_mode",
    /// The agent has no config option of this id, or not this value.
    UnknownConfigOption = "unknown_config_option",
    /// The agent does not offer this (ACP capability missing).
    NotSupported = "not_supported",
    /// `session.load_session_id` names an ACP session the agent does not have.
    AcpSessionNotFound = "acp_session_not_found",
    /// The ACP session is already open in another agentd session.
    AcpSessionOpen = "acp_session_open",
    /// The agent takes no MCP servers of this kind.
    McpUnsupported = "mcp_unsupported",
    /// The agent accepts none of the credentials its env gives: fix the request's env.
    AgentAuthRequired = "agent_auth_required",
    /// The agent is being restarted; retry shortly.
    AgentRestarting = "agent_restarting",
    /// The agent exited or failed past its restart budget.
    AgentUnavailable = "agent_unavailable",
    /// The agent did not answer ACP `initialize` or `session/new` as it should.
    AgentInitFailed = "agent_init_failed",
    /// The agent answered with an error.
    AgentError = "agent_error",
    /// The agent's process could not be started.
    AgentSpawnFailed = "agent_spawn_failed",
    /// The node has no free sandbox slot.
    NodeFull = "node_full",
    /// The sandbox could not be built.
    SandboxFailed = "sandbox_failed",
    /// agentd failed; the log has the detail.
    Internal = "internal",
}

impl Code {
    /// The code of this text, if it is one.
    pub fn parse(text: &str) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| c.as_str() == text)
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Code {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for Code {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Code {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Code, D::Error> {
        let text = Cow::<str>::deserialize(d)?;
        Code::parse(&text).ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a stable code")))
    }
}

/// A string of the closed list, each code's meaning under
/// `x-enumDescriptions` (the extension OpenAPI tools show beside an enum).
impl utoipa::PartialSchema for Code {
    fn schema() -> RefOr<Schema> {
        let meanings: serde_json::Map<String, serde_json::Value> =
            Code::ALL.iter().map(|c| (c.as_str().to_string(), c.meaning().into())).collect();
        ObjectBuilder::new()
            .schema_type(SchemaType::Type(Type::String))
            .description(Some("A stable code clients can act on; each one's meaning is under `x-enumDescriptions`."))
            .enum_values(Some(Code::ALL.iter().map(|c| c.as_str())))
            .extensions(Some(ExtensionsBuilder::new().add("x-enumDescriptions", meanings).build()))
            .into()
    }
}

impl utoipa::ToSchema for Code {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Code")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_explained() {
        let mut seen = std::collections::BTreeSet::new();
        for code in Code::ALL {
            let text = code.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(text.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{text}");
            assert!(!code.meaning().is_empty(), "{text} has no meaning");
            assert_eq!(Code::parse(text), Some(*code));
            assert_eq!(serde_json::to_value(code).unwrap(), text);
            assert_eq!(serde_json::from_value::<Code>(text.into()).unwrap(), *code);
        }
        assert_eq!(Code::parse("made_up"), None);
    }
}
