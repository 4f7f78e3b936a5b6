//! What every request handler, workflow step and background task of one
//! control plane shares.

use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::{audit, fleet, plan, store, workflow};

/// What every request handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    /// Whether the API asks for bearer tokens (off only on a loopback
    /// listener, by the operator's choice).
    pub auth: bool,
    /// A client per node of the fleet.
    pub nodes: fleet::Nodes,
    /// How a new container's node is chosen.
    pub placement: store::placement::Strategy,
    pub defaults: plan::PlanDefaults,
    /// Deadline of each node call a workflow step makes (calls that wait
    /// for the agent get `initialize_timeout` on top): past it the attempt
    /// fails and the runner retries it under the same idempotency key.
    pub node_call_timeout: std::time::Duration,
    /// The registry file or URL synced at start and by `POST /v1/registry:sync`.
    pub registry_source: Option<String>,
    /// What callers without the admin scope may use of the node's own
    /// files and of registry sources ([`crate::powers`]).
    pub allowances: crate::powers::Allowances,
    /// For registry syncs over http(s).
    pub http: reqwest::Client,
    /// Cancelled on shutdown: ends SSE streams and session followers.
    pub shutdown: CancellationToken,
    /// Where the API's audit records go ([`api::audit`]).
    pub audit: audit::AuditLog,
    /// How a step the API runs itself is leased (a prompt's dispatch): under
    /// this control plane's runner's owner name.
    pub steps: workflow::InlineConfig,
    /// How event streams keep alive and cut off slow subscribers.
    pub sse: SseConfig,
}

/// How event streams keep alive and bound their subscribers (api/sse.rs).
#[derive(Clone, Copy, Debug)]
pub struct SseConfig {
    /// A keep-alive comment this long after the last thing sent.
    pub keep_alive: std::time::Duration,
    /// Events a subscriber may have unread before it risks the cut-off.
    pub buffer: usize,
}

impl Default for SseConfig {
    fn default() -> Self {
        SseConfig { keep_alive: std::time::Duration::from_secs(15), buffer: 1024 }
    }
}

