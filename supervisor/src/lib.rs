//! The supervisor: PID 1 inside each sandbox.
//!
//! - [`reaper`]: reaps every child and orphan, and hands exit statuses to
//!   whoever waits for a pid (PID 1 must reap, or zombies pile up).
//! - [`agents`]: agent processes, each in its own process group, supervised
//!   across restarts ([`restart`]: policy and backoff), and the ACP sessions
//!   they hold; [`auth`] picks the `authMethods` the plan's credentials allow.
//! - [`client_methods`]: the agent-to-client methods the supervisor serves as
//!   each agent's ACP client, gathering [`fs`] (text files, confined to the
//!   session's directories) and [`terminals`] (commands run in the sandbox).
//! - [`permissions`]: `session/request_permission` by the session's policy.
//! - [`turns`]: each turn's events, kept apart from the node's stream so a
//!   turn outlives a node restart and the node takes it up again.
//! - [`service`]: the `Supervisor` gRPC service on the inherited unix socket.
//! - [`run_mode`]: PID 1 of `agentd sandbox run`: one command, stdio attached,
//!   started by [`spawn`] (a `CLONE_VM | CLONE_VFORK` child, as posix_spawn).
//!
//! It runs on a current-thread runtime: one sandbox's work is small, and one
//! thread keeps its memory small.

pub mod agents;
pub mod auth;
pub mod client_methods;
pub mod fs;
pub mod permissions;
pub mod reaper;
pub mod restart;
pub mod run_mode;
pub mod service;
pub mod spawn;
pub mod stderr;
pub mod terminals;
pub mod turns;

use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;

/// How long agents get between SIGTERM and SIGKILL when the sandbox stops.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);

/// Runs the supervisor on the listening socket `listen_fd` until told to
/// stop, hardening agents with `hardening`.
pub fn run(listen_fd: i32, hardening: agentd_harden::Hardening) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(serve(listen_fd, hardening))
}

async fn serve(listen_fd: i32, hardening: agentd_harden::Hardening) -> std::io::Result<()> {
    // Agents must not inherit the listener, or they could drive the supervisor.
    // SAFETY: fcntl only changes the descriptor's flags.
    if unsafe { libc::fcntl(listen_fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sandbox setup hands us this descriptor, open and used by no one else.
    let std_listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(listen_fd) };
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(std_listener)?;

    let reaper = reaper::Reaper::start()?;
    let (stop_tx, mut stop_rx) = watch::channel(None::<Duration>);
    let agents = Arc::new(agents::Agents::new(Arc::clone(&reaper), hardening));
    let svc = service::SupervisorService::new(Arc::clone(&agents), stop_tx.clone());

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn({
        let stop_tx = stop_tx.clone();
        async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = stop_tx.send(Some(DEFAULT_GRACE));
        }
    });

    tracing::info!("supervisor ready");
    // The agents stop before the server drains: a graceful drain waits for
    // the running turns' streams, which end only when their agents do.
    let shutdown = {
        let agents = Arc::clone(&agents);
        async move {
            let grace = match stop_rx.wait_for(|v| v.is_some()).await {
                Ok(grace) => grace.unwrap_or(DEFAULT_GRACE),
                Err(_) => DEFAULT_GRACE,
            };
            agents.stop_all(grace).await;
        }
    };
    let served = tonic::transport::Server::builder()
        .layer(agentd_proto::trace::ServerLayer)
        .add_service(agentd_proto::supervisor::supervisor_server::SupervisorServer::new(svc))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    // Also when serving failed before any stop was asked for; agents
    // already stopped are skipped.
    let grace = stop_tx.borrow().unwrap_or(DEFAULT_GRACE);
    agents.stop_all(grace).await;
    tracing::info!("supervisor stopped");
    served.map_err(std::io::Error::other)
}
