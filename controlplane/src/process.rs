//! One control plane process, wired from its settings: the state every
//! request shares, start-up reconciliation, the registry's first sync, the
//! workflow runner with its periodic steps and the nodes' journal watchers.
//! `agentd up` and `agentd server` both build theirs here.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::fleet::{NodeTls, Nodes};
use crate::flows::node_check::FleetConfig;
use crate::store::placement::Strategy;
use crate::store::{Store, StoreError};
use crate::{AppState, ServeError, plan, workflow};

/// A control plane's settings.
pub struct Settings {
    pub store: Store,
    /// Its runner's owner name: stable across restarts of one control plane
    /// (see [`crate::start_workflows`]).
    pub runner: workflow::RunnerConfig,
    pub defaults: plan::PlanDefaults,
    /// Deadline of each node call a workflow step makes.
    pub node_call_timeout: Duration,
    pub registry_source: Option<String>,
    /// What callers without the admin scope may use of the host.
    pub allowances: crate::powers::Allowances,
    pub fleet: FleetConfig,
    pub placement: Strategy,
    /// Dial nodes over TCP with the cluster CA's certificates (kept in the
    /// store, made on first use). Without it only unix-socket nodes answer.
    pub tls: bool,
    /// Ask API callers for bearer tokens.
    pub auth: bool,
    /// Where the first admin token of a store with none is written.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Event streams' keep-alive and slow-subscriber bound.
    pub sse: crate::api::sse::SseConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot set up the cluster certificates: {0}")]
    Ca(#[from] crate::fleet::ca::CaError),
    #[error(transparent)]
    AdminToken(#[from] crate::auth::BootstrapError),
    #[error("cannot reconcile the store with the nodes: {0}")]
    Reconcile(StoreError),
    #[error("cannot start the workflow runner: {0}")]
    Runner(StoreError),
}

/// A running control plane.
pub struct ControlPlane {
    pub state: AppState,
    runner: JoinHandle<()>,
    runner_stop: CancellationToken,
}

impl ControlPlane {
    /// Builds the shared state, brings the store in line with the nodes,
    /// syncs the registry and starts the runner.
    pub async fn start(s: Settings) -> Result<ControlPlane, StartError> {
        let tls: Option<NodeTls> = if s.tls { Some(crate::fleet::ca::node_tls(&s.store).await?) } else { None };
        if s.auth
            && let Some(file) = &s.admin_token_file
        {
            crate::auth::bootstrap_admin(&s.store, file).await?;
        }
        let state = AppState {
            store: s.store.clone(),
            auth: s.auth,
            nodes: Nodes::new(s.store.clone(), tls),
            placement: s.placement,
            defaults: s.defaults,
            node_call_timeout: s.node_call_timeout,
            registry_source: s.registry_source,
            allowances: s.allowances,
            http: crate::agent_registry::http_client(),
            shutdown: CancellationToken::new(),
            audit: crate::audit::AuditLog::start(s.store.clone()),
            steps: workflow::InlineConfig::of(&s.runner),
            sse: s.sse,
        };
        crate::reconcile(&state).await.map_err(StartError::Reconcile)?;
        crate::sync_registry_at_start(&state).await;
        let runner_stop = CancellationToken::new();
        let runner = crate::start_workflows(&state, s.runner, s.fleet, runner_stop.clone()).await.map_err(StartError::Runner)?;
        Ok(ControlPlane { state, runner, runner_stop })
    }

    /// Serves the API on `listen` until `shutdown` resolves.
    pub async fn serve(&self, listen: SocketAddr, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
        crate::serve(self.state.clone(), listen, shutdown).await
    }

    /// Serves the API on a listener from [`crate::bind`] until `shutdown`
    /// resolves (a daemon binds first, to say it is ready only once it is).
    pub async fn serve_on(&self, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ServeError> {
        crate::serve_on(self.state.clone(), listener, shutdown).await
    }

    /// Serves metrics and probes without tokens on `listener` (see
    /// [`crate::serve_metrics_on`]), on a task of its own, until shutdown.
    pub fn serve_metrics_on(&self, listener: tokio::net::TcpListener) -> JoinHandle<()> {
        let state = self.state.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::serve_metrics_on(state, listener).await {
                tracing::error!(error = %e, "metrics server failed");
            }
        })
    }

    /// Flushes the audit log and stops the runner: steps still running get
    /// its drain bound.
    pub async fn stop(self) {
        self.state.audit.close().await;
        self.runner_stop.cancel();
        if let Err(e) = self.runner.await {
            tracing::error!(error = %e, "workflow runner panicked");
        }
    }
}
