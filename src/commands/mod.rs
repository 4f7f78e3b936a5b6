//! One module per subcommand, plus what they share.

pub mod config;
pub mod doctor;
pub mod join_token;
pub mod token;
pub mod node;
pub mod server;
pub mod up;

use std::path::{Path, PathBuf};

use tracing_subscriber::EnvFilter;

use crate::cli::CommonArgs;

pub fn init_tracing(common: &CommonArgs) {
    let filter = EnvFilter::try_new(&common.log).unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if common.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs a daemon (`up`, `server`, `node`) on a runtime, with systemd told
/// what happens: the watchdog pinged from the start (systemd counts start-up
/// too), and a failure's reason in `STATUS=` beside the exit code.
pub fn run_daemon<Fut>(body: impl FnOnce(std::sync::Arc<crate::notify::Notifier>) -> Fut) -> anyhow::Result<()>
where
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    runtime()?.block_on(async {
        let notify = std::sync::Arc::new(crate::notify::Notifier::from_env());
        let watchdog = notify.start_watchdog();
        let result = body(std::sync::Arc::clone(&notify)).await;
        if let Err(e) = &result {
            notify.status(&format!("failed: {e:#}"));
        }
        watchdog.stop().await;
        result
    })
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}

/// [`shutdown_signal`], then tells the service manager that a stop began.
pub fn stop_signal(notify: &std::sync::Arc<crate::notify::Notifier>) -> impl Future<Output = ()> + Send + 'static {
    let notify = std::sync::Arc::clone(notify);
    async move {
        shutdown_signal().await;
        notify.stopping("stopping");
    }
}

pub fn node_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("run").join("node.sock")
}

pub fn node_config(common: &CommonArgs, flags: &crate::cli::NodeFlags) -> anyhow::Result<agentd_node::NodeConfig> {
    let sandbox_bin = match &flags.sandbox_bin {
        Some(path) => path.clone(),
        None => crate::sandbox_bin::locate()?,
    };
    anyhow::ensure!(
        sandbox_bin.is_file(),
        "sandbox binary {} not found: install {} beside agentd-daemon (`cargo build --workspace --bins` builds it) or set --sandbox-bin",
        sandbox_bin.display(),
        crate::sandbox_bin::NAME
    );
    let mut config = agentd_node::NodeConfig::new(common.state_dir.join("node"), sandbox_bin);
    config.supervisor_log_filter = common.log.clone();
    config.cgroup_subtree = flags.cgroup_subtree.clone();
    anyhow::ensure!(flags.id_base > 0, "--id-base must not map host root");
    anyhow::ensure!(flags.id_range_size > 0, "--id-range-size must be positive");
    let top = u64::from(flags.id_base) + u64::from(flags.id_range_size) * u64::from(flags.max_sandboxes);
    anyhow::ensure!(top <= u64::from(u32::MAX), "id ranges overflow: --id-base + --id-range-size * --max-sandboxes > 2^32");
    config.id_base = flags.id_base;
    config.id_range_size = flags.id_range_size;
    config.max_sandboxes = flags.max_sandboxes;
    config.stop_grace = std::time::Duration::from_millis(flags.stop_grace_ms.into());
    // The original agentd's first node was `node-1`: its smoke test pins to it.
    config.node_id = flags.node_id.clone().unwrap_or_else(|| "node-1".into());
    anyhow::ensure!(agentd_plan::ids::valid_node_id(&config.node_id), "--node-id {:?} is not a node id: lower-case letters, digits and '-', at most 63", config.node_id);
    config.labels = flags.labels.clone();
    config.capacity_memory = flags.capacity_memory;
    config.capacity_cpus = flags.capacity_cpus;
    config.live_restore = flags.live_restore;
    config.closed_session_retention = std::time::Duration::from_millis(flags.closed_session_retention_ms);
    config.secrets_file = flags.secrets_file.clone();
    config.secrets_ca_file = flags.secrets_ca_file.clone();
    if let Some(cpus) = flags.capacity_cpus {
        anyhow::ensure!(cpus.is_finite() && cpus > 0.0, "--capacity-cpus must be a positive number");
    }
    Ok(config)
}

/// A control plane's settings from the flags, on `store`.
pub fn control_plane_settings(api: &crate::cli::ApiArgs, state_dir: &Path, store: agentd_controlplane::store::Store) -> agentd_controlplane::process::Settings {
    agentd_controlplane::process::Settings {
        store,
        runner: runner_config(state_dir),
        defaults: agentd_controlplane::plan::PlanDefaults { initialize_timeout_ms: api.initialize_timeout_ms },
        node_call_timeout: std::time::Duration::from_millis(api.node_call_timeout_ms.max(1)),
        registry_source: api.registry.clone(),
        allowances: agentd_controlplane::powers::Allowances {
            host_paths: api.allowed_host_paths.clone(),
            registry_sources: api.allowed_registry_sources.clone(),
        },
        fleet: fleet_config(api),
        placement: api.placement,
        tls: true,
        auth: !api.no_auth,
        admin_token_file: Some(state_dir.join("admin.token")),
        sse: agentd_controlplane::api::sse::SseConfig {
            keep_alive: std::time::Duration::from_millis(api.sse_keepalive_ms),
            buffer: api.sse_buffer as usize,
        },
    }
}

/// Refuses to serve without tokens anywhere but on loopback, and says so
/// loudly where it is allowed.
pub fn check_auth_setting(api: &crate::cli::ApiArgs) -> anyhow::Result<()> {
    if !api.no_auth {
        return Ok(());
    }
    anyhow::ensure!(
        api.listen.ip().is_loopback(),
        "--no-auth is only allowed on a loopback address, not {}: anyone who reaches the port could run anything",
        api.listen
    );
    tracing::warn!(listen = %api.listen, "THE API RUNS WITHOUT TOKENS (--no-auth): every local process may create sandboxes and drive agents");
    Ok(())
}

/// Binds `--metrics-listen`; the address bound is logged (port 0 in tests).
pub async fn bind_metrics(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let bound = listener.local_addr().context("cannot read the metrics address")?;
    tracing::info!(metrics_listen = %bound, "metrics listening");
    Ok(listener)
}

pub fn prepare_state_dir(state_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(state_dir.join("run"))?;
    Ok(())
}

/// The workflow runner's settings. Its owner name is stable across restarts
/// of one control plane (host and state dir), so a restarted process takes
/// back the steps its predecessor held at once (see
/// `agentd_controlplane::start_workflows`).
pub fn runner_config(state_dir: &Path) -> agentd_controlplane::workflow::RunnerConfig {
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".into());
    agentd_controlplane::workflow::RunnerConfig {
        owner: format!("agentd@{host}:{}", state_dir.display()),
        // On a pool of its own (see `start_workflows`): API requests always
        // find a connection.
        workers: 16,
        ..Default::default()
    }
}

/// Node checks: heartbeats, lost nodes, orphan sandboxes.
pub fn fleet_config(api: &crate::cli::ApiArgs) -> agentd_controlplane::flows::node_check::FleetConfig {
    use std::time::Duration;
    let interval = Duration::from_millis(api.node_check_interval_ms.max(10));
    agentd_controlplane::flows::node_check::FleetConfig {
        check_interval: interval,
        heartbeat_timeout: Duration::from_millis(api.node_heartbeat_timeout_ms),
        // A probe never outlasts the next check.
        probe_timeout: interval.min(Duration::from_secs(2)),
        hibernate_after: (api.hibernate_after_ms > 0).then(|| Duration::from_millis(api.hibernate_after_ms)),
        ttl: (api.container_ttl_ms > 0).then(|| Duration::from_millis(api.container_ttl_ms)),
        registry_sync_interval: (api.registry_sync_interval_ms > 0).then(|| Duration::from_millis(api.registry_sync_interval_ms.max(10))),
        ..Default::default()
    }
}

/// The store the flags name: PostgreSQL when a URL is given, else the embedded
/// SQLite file in the state dir.
pub async fn open_store(api: &crate::cli::ApiArgs, state_dir: &Path) -> anyhow::Result<agentd_controlplane::store::Store> {
    use anyhow::Context;
    let location = match api.database_url() {
        Some(url) => url.to_owned(),
        None => state_dir.join("agentd.db").display().to_string(),
    };
    let store = agentd_controlplane::store::Store::open(&location).await.context("cannot open store")?;
    tracing::info!(backend = store.backend(), "store open");
    Ok(store)
}
