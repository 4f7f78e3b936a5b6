//! Keys that never enter the sandbox.
//!
//! A profile names secrets by reference (`agentd_plan::secrets`); their
//! values live in the node's secret store ([`store`], `--secrets-file`).
//! For each secret of a sandbox the node listens on a port of the
//! sandbox's own 127.0.0.1 ([`listen`]: a socket made in its network
//! namespace, served by the node), and forwards every request there over
//! TLS to the secret's upstream with the value in the secret's header
//! ([`forward`], trust in [`tls`]). The agent gets `env` =
//! `http://127.0.0.1:PORT<base path>` and `name` = the placeholder
//! ([`SandboxProxies::env`]); nothing of the value is in the sandbox, the
//! plan, the API or the logs ([`value::SecretValue`]).
//!
//! The upstream is dialled from the node's own network namespace, so a
//! sandbox reaches its model API with `network: none`, and an egress policy
//! need not allow the upstream for it.
//!
//! Lifecycle: [`Proxies::start`] after PID 1 exists; the listeners and
//! their connections end when PID 1 exits, when [`SandboxProxies::stop`]
//! is awaited (the sandbox's delete) or when the handle is dropped. They
//! hold the sandbox's network namespace alive until then.

mod forward;
mod listen;
pub mod store;
mod tls;
pub mod value;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agentd_plan::SecretRef;
use agentd_plan::secrets::PLACEHOLDER;
use agentd_proto::error::status;
use http::{HeaderName, HeaderValue};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Status};

pub use store::{SecretStore, StoreError};
pub use tls::TlsError;

/// Connections one sandbox may hold open through its proxies at once; more
/// wait to be accepted.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's head.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{field}: this node holds no secret {name:?}; add it to the node's secrets file (--secrets-file)")]
    Unknown { field: String, name: String },
    #[error("secret {name:?} cannot go in header {header:?}")]
    Header { name: String, header: String },
    #[error("cannot listen in the sandbox's network namespace: {0}")]
    Listen(std::io::Error),
}

impl ProxyError {
    pub fn status(&self) -> Status {
        match self {
            ProxyError::Unknown { .. } => status(Code::InvalidArgument, "unknown_secret", self.to_string()),
            ProxyError::Store(_) | ProxyError::Tls(_) | ProxyError::Header { .. } => status(Code::Internal, "secrets_unavailable", self.to_string()),
            ProxyError::Listen(_) => status(Code::Internal, "sandbox_failed", self.to_string()),
        }
    }
}

/// The node's side of every sandbox's proxies: where values come from, and
/// the upstream client they share.
pub struct Proxies {
    store: SecretStore,
    upstreams: forward::Upstreams,
    /// /proc, where sandboxes' network namespaces are found.
    proc_root: PathBuf,
}

impl Proxies {
    /// Reads the store and the CA bundle once: a node whose secrets cannot
    /// be used does not start.
    pub fn new(secrets_file: Option<PathBuf>, extra_ca: Option<&Path>, proc_root: PathBuf) -> Result<Proxies, ProxyError> {
        let store = SecretStore::open(secrets_file)?;
        let upstreams = forward::upstreams(tls::client_config(extra_ca)?);
        Ok(Proxies { store, upstreams, proc_root })
    }

    /// Whether the store holds every secret `refs` name (at a plan's check,
    /// before anything is made).
    pub fn check(&self, refs: &[SecretRef]) -> Result<(), ProxyError> {
        if refs.is_empty() {
            return Ok(());
        }
        self.routes(refs).map(drop)
    }

    fn routes(&self, refs: &[SecretRef]) -> Result<Vec<forward::Route>, ProxyError> {
        let held = self.store.load()?;
        refs.iter()
            .enumerate()
            .map(|(i, r)| {
                let value = held.get(&r.name).ok_or_else(|| ProxyError::Unknown { field: format!("secrets[{i}].name"), name: r.name.clone() })?;
                let bad_header = || ProxyError::Header { name: r.name.clone(), header: r.header.clone() };
                let header = HeaderName::from_bytes(r.header.as_bytes()).map_err(|_| bad_header())?;
                let mut value = HeaderValue::from_str(&r.header_value(value.expose())).map_err(|_| bad_header())?;
                value.set_sensitive(true);
                Ok(forward::Route { secret: r.name.clone(), upstream: r.upstream.clone(), header, value })
            })
            .collect()
    }

    /// Serves `refs` in the network namespace of `pid` (a sandbox's PID 1)
    /// until `exited` turns true or the handle is stopped or dropped.
    /// `ports`: the ports to bind, one per secret (a sandbox re-adopted
    /// after a node restart keeps the ones its agents were given); `None`
    /// picks free ones.
    pub fn start(&self, pid: i32, refs: &[SecretRef], ports: Option<&[u16]>, mut exited: watch::Receiver<bool>) -> Result<SandboxProxies, ProxyError> {
        if refs.is_empty() {
            return Ok(SandboxProxies::none());
        }
        let routes = self.routes(refs)?;
        let wanted = ports.map_or_else(|| vec![0; refs.len()], <[u16]>::to_vec);
        if wanted.len() != refs.len() {
            return Err(ProxyError::Listen(std::io::Error::other(format!("{} ports given for {} secrets", wanted.len(), refs.len()))));
        }
        let listeners = listen::listeners_in(&self.proc_root, pid, &wanted).map_err(ProxyError::Listen)?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut endpoints = Vec::with_capacity(refs.len());
        for ((listener, route), r) in listeners.into_iter().zip(routes).zip(refs) {
            let port = listener.local_addr().map_err(ProxyError::Listen)?.port();
            let listener = tokio::net::TcpListener::from_std(listener).map_err(ProxyError::Listen)?;
            endpoints.push(Endpoint { name: r.name.clone(), env: r.env.clone(), port, base_path: r.upstream.base_path().to_string() });
            tracing::info!(pid, secret = r.name, port, upstream = %r.upstream, "secrets proxy listening in the sandbox");
            tasks.spawn(serve(listener, Arc::new(route), self.upstreams.clone(), Arc::clone(&limit), stop.clone(), tasks.clone()));
        }
        // PID 1 gone: the namespace is to go too, which these sockets prevent.
        let on_exit = stop.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = exited.wait_for(|e| *e) => on_exit.cancel(),
                _ = on_exit.cancelled() => {}
            }
        });
        tasks.close();
        Ok(SandboxProxies { endpoints, stop, tasks })
    }
}

/// Accepts on one listener until `stop`; a task per connection.
async fn serve(
    listener: tokio::net::TcpListener,
    route: Arc<forward::Route>,
    upstreams: forward::Upstreams,
    limit: Arc<Semaphore>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = Arc::clone(&limit).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: again shortly rather than spin.
                    tracing::warn!(secret = route.secret, error = %e, "secrets proxy: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (route, upstreams, stop) = (Arc::clone(&route), upstreams.clone(), stop.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| forward::handle(request, Arc::clone(&route), upstreams.clone()));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = connection => if let Err(e) = served {
                    tracing::debug!(error = %e, "secrets proxy: connection ended");
                },
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// What the agent is told about one secret.
#[derive(Debug, Clone)]
struct Endpoint {
    name: String,
    env: String,
    port: u16,
    base_path: String,
}

/// One sandbox's proxies. Dropping the handle stops them too, without
/// waiting.
pub struct SandboxProxies {
    endpoints: Vec<Endpoint>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl SandboxProxies {
    /// For a sandbox without secrets.
    pub fn none() -> SandboxProxies {
        let tasks = TaskTracker::new();
        tasks.close();
        SandboxProxies { endpoints: Vec::new(), stop: CancellationToken::new(), tasks }
    }

    /// The variables every agent of the sandbox gets (over its plan's own):
    /// each secret's base URL, and its placeholder key.
    pub fn env(&self) -> Vec<(String, String)> {
        self.endpoints
            .iter()
            .flat_map(|e| [(e.env.clone(), format!("http://127.0.0.1:{}{}", e.port, e.base_path)), (e.name.clone(), PLACEHOLDER.to_string())])
            .collect()
    }

    /// The ports listened on, in the order of the plan's secrets.
    pub fn ports(&self) -> Vec<u16> {
        self.endpoints.iter().map(|e| e.port).collect()
    }

    /// Closes the listeners and every connection through them, and waits
    /// until their sockets are gone.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

impl Drop for SandboxProxies {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
