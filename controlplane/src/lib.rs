//! The control plane: HTTP/SSE API, durable store, execution-plan compiler and
//! the client side of the node service.
//!
//! Layout:
//! Layers, each using only those below it (checked by `layers`, a test):
//! [`domain`] (state machines, refusals, step outcomes; with the request
//! compilers [`plan`], [`agent_spec`], [`mcp`], and [`metrics`]) <- [`store`] <- [`workflow`]
//! <- [`flows`] (with [`context`], [`fleet`], [`teardown`],
//! [`agent_registry`], [`audit`]) <- [`api`] <- [`process`] and this root.
//!
//! - [`api`]: axum routes, one module per resource; errors as problem+json,
//!   made here only.
//! - [`domain`]: what the layers above share: states, refusals, outcomes.
//! - [`context`]: [`AppState`], what handlers, steps and tasks share.
//! - [`audit`]: the audit trail's batching writer.
//! - [`agent_spec`]: agent definitions in the ACP registry's shape and the
//!   original agentd's, read into one validated `AgentSpec`.
//! - [`agent_registry`]: registry sync from a file or URL into the store.
//! - [`mcp`]: the ACP `mcpServers` a session create passes on, validated.
//! - [`metrics`]: the Prometheus registry (`GET /metrics`); plain data any
//!   layer records into.
//! - [`plan`]: compiles a session request (agent, profile, session options)
//!   into the sandbox and agent plans a node executes.
//! - [`store`]: containers, sessions and runs, behind enforced state machines.
//! - [`fleet`]: a client per node, and each node's journal (turn ends,
//!   sandboxes lost) recorded by the control plane holding its watch.
//! - [`flows`]: the API's workflows (session create, container delete) as
//!   outbox steps, and the API's wait for their outcome.
//! - [`teardown`]: recording containers gone; direct deletion on shutdown.
//! - [`workflow`]: the outbox runner: steps written with their state change,
//!   claimed under fenced leases, retried with backoff.
//!
//! - [`process`]: [`process::ControlPlane`], one control plane wired from its
//!   settings; both binaries start theirs with it.
//!
//! [`serve`] runs the API until shutdown; [`app`] builds the router alone.

/// Writes each listed check (an `async fn(&Store)` in the calling module) once
/// as a test on SQLite and once on a throwaway PostgreSQL, using the calling
/// module's `sqlite()` and `postgres()` (see `store::conformance`).
#[cfg(test)]
macro_rules! backend_suite {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let (_dir, store) = super::sqlite().await;
                    super::$check(&store).await;
                    store.close().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let (_pg, store) = super::postgres().await;
                    super::$check(&store).await;
                    store.close().await;
                }
            )*
        }
    };
}

pub mod agent_registry;
pub mod agent_spec;
pub mod api;
pub mod audit;
pub mod auth;
pub mod context;
pub mod domain;
pub mod fleet;
pub mod flows;
pub mod mcp;
pub mod metrics;
pub mod plan;
pub mod powers;
pub mod process;
pub mod store;
pub mod teardown;
pub mod workflow;

#[cfg(test)]
mod layers;
#[cfg(test)]
mod outage_tests;

use std::future::Future;
use std::net::SocketAddr;

use agentd_proto::node::GetSandboxRequest;
use tokio_util::sync::CancellationToken;

pub use context::AppState;
use store::states::container;

pub use agentd_plan::new_id;

pub fn app(state: AppState) -> axum::Router {
    api::router(state)
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// Brings the store in line with the node after a restart: containers the node
/// no longer runs are recorded lost (their sessions and running turns failed,
/// code `sandbox_lost`, as the node's journal says too), or gone when they
/// were being deleted, and live sessions are followed again.
/// A container with a workflow step still open (a create or delete that was
/// running when the control plane stopped) is left to that step: the runner
/// finishes it, its node calls answered from the node's memory where they
/// already happened.
pub async fn reconcile(state: &AppState) -> Result<(), store::StoreError> {
    for state_name in [container::PROVISIONING, container::STOPPING, container::READY, container::HIBERNATED] {
        for c in state.store.containers_in_state(state_name).await? {
            let in_flight = c.state == container::PROVISIONING || c.state == container::STOPPING;
            if in_flight && state.store.has_open_steps(flows::CONTAINER, &c.id).await? {
                tracing::info!(container = c.id, state = c.state, "interrupted work resumes on the runner");
                continue;
            }
            let known = match state.nodes.client(&c.node_id).await {
                Ok(client) => client.clone().get_sandbox(GetSandboxRequest { container_id: c.id.clone() }).await,
                Err(e) => Err(e),
            };
            match known {
                Ok(_) if c.state == container::STOPPING => {
                    // Its delete step failed for good: try once more now.
                    if let Err(e) = teardown::delete_container(state, &c.id, "container deleted").await {
                        tracing::warn!(container = c.id, error = ?e, "cannot finish deleting container");
                    }
                }
                Ok(_) => {}
                Err(status) if status.code() == tonic::Code::NotFound => {
                    tracing::warn!(container = c.id, "node no longer runs this sandbox; recording it lost");
                    match c.state.as_str() {
                        container::PROVISIONING => {
                            state.store.container_failed(&c.id, "agentd stopped while provisioning").await?;
                            teardown::record_gone(state, &c.id, "the sandbox was lost when agentd restarted").await?;
                        }
                        container::STOPPING => teardown::record_gone(state, &c.id, "the sandbox was lost when agentd restarted").await?,
                        // What the node's journal says of it too (`SandboxLost`),
                        // whichever is recorded first: failed, not closed, so a
                        // client learns its session was lost.
                        _ => {
                            let reason = "the sandbox was lost when agentd restarted";
                            state.store.fail_container_work(&c.id, reason, crate::domain::Code::SandboxLost.as_str()).await?;
                        }
                    }
                }
                Err(status) => tracing::warn!(container = c.id, error = %status, "cannot reach node to reconcile"),
            }
        }
    }
    Ok(())
}

/// Syncs the configured registry, if any. A failure is logged, not fatal:
/// the registry stored by the last good sync stays in use.
pub async fn sync_registry_at_start(state: &AppState) {
    let Some(source) = &state.registry_source else { return };
    if let Err(e) = agent_registry::sync(&state.store, &state.http, source).await {
        tracing::error!(error = %e, "registry sync failed; keeping the registry stored before");
    }
}

/// Starts the workflow runner that carries out the API's steps
/// ([`flows`]), until `shutdown`. Steps that `config.owner` still holds were
/// leased by this control plane's previous process, which died running them:
/// they are given back first, so they resume now rather than when their
/// leases expire. Give each control plane a stable owner name of its own.
///
/// Node checks ([`flows::node_check`]) are scheduled every
/// `fleet.check_interval` on the same runner, and registry syncs
/// ([`flows::registry_sync`]) every `fleet.registry_sync_interval`.
pub async fn start_workflows(
    state: &AppState,
    config: workflow::RunnerConfig,
    fleet: flows::node_check::FleetConfig,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, store::StoreError> {
    let released = state.store.release_leases_of(&config.owner).await?;
    if released > 0 {
        tracing::warn!(steps = released, owner = config.owner, "resuming steps this control plane was running when it stopped");
    }
    // The runner and its handlers on a pool of their own: each running step
    // may hold a connection, and the claim loop and janitor one each.
    let runner_store = state.store.with_own_pool(u32::try_from(config.workers).unwrap_or(64) + 4);
    let runner_state = AppState { store: runner_store.clone(), ..state.clone() };
    tokio::spawn(flows::node_check::schedule(runner_state.clone(), fleet, shutdown.clone()));
    tokio::spawn(fleet::watch::run(runner_state.clone(), config.owner.clone(), fleet::watch::WatchConfig::default(), shutdown.clone()));
    if let Some(interval) = fleet.registry_sync_interval {
        tokio::spawn(flows::registry_sync::schedule(runner_state.clone(), interval, shutdown.clone()));
    }
    let runner = workflow::Runner::new(runner_store.clone(), flows::registry(&runner_state, fleet), config);
    // On SQLite the runner's pool is the API's: closing it with the runner
    // would leave `agentd up` no store for what it does after (archiving
    // and deleting every container on a stop).
    let close_pool = runner_store.own_pools_are_separate();
    Ok(tokio::spawn(async move {
        runner.run(shutdown).await;
        if close_pool {
            runner_store.close().await;
        }
    }))
}

/// Deletes every live container; `agentd up` without live restore does this
/// on Ctrl-C so that nothing is left running and the store says so. As a
/// delete through the API does (`container.delete`), each session's event
/// log is archived first, so its history stays readable after the restart,
/// and the sessions are recorded closed once the sandbox is gone; each
/// agent gets the node's stop grace.
pub async fn stop_all_containers(state: &AppState) {
    let mut live = Vec::new();
    for s in [container::READY, container::HIBERNATED] {
        live.extend(state.store.containers_in_state(s).await.unwrap_or_default());
    }
    // All at once: each delete may spend its agents' grace period on the node.
    let deletes = live.iter().map(|c| async move {
        flows::archive::archive_container(state, &c.id).await;
        if let Err(e) = teardown::delete_container(state, &c.id, "agentd stopped").await {
            tracing::warn!(container = c.id, error = ?e, "cannot stop container on shutdown");
        }
    });
    futures::future::join_all(deletes).await;
}

/// Serves the API on `listen` until `shutdown` resolves.
pub async fn serve(state: AppState, listen: SocketAddr, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
    let listener = bind(listen).await?;
    serve_on(state, listener, shutdown).await
}

/// Binds the API's address. Split from [`serve_on`] so that a daemon can
/// say it is ready (systemd's READY=1) once connections are accepted, and
/// not before.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, ServeError> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|source| ServeError::Listen { addr: listen, source })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Listen { addr: listen, source })?;
    // Tests and scripts that ask for port 0 read the real address here.
    tracing::info!(listen = %bound, "API listening");
    Ok(listener)
}

/// Serves `/metrics`, `/healthz` and `/readyz` without tokens on
/// `listener` (`--metrics-listen`) until the control plane shuts down.
pub async fn serve_metrics_on(state: AppState, listener: tokio::net::TcpListener) -> Result<(), ServeError> {
    let stop = state.shutdown.clone();
    axum::serve(listener, api::health::open_router(state)).with_graceful_shutdown(stop.cancelled_owned()).await.map_err(ServeError::Http)
}

/// Serves the API on a listener from [`bind`] until `shutdown` resolves.
pub async fn serve_on(state: AppState, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
    let token = state.shutdown.clone();
    let graceful = async move {
        shutdown.await;
        token.cancel();
    };
    // The peer address goes into audit records.
    let service = app(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service).with_graceful_shutdown(graceful).await.map_err(ServeError::Http)
}
