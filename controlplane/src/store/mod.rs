//! Durable control state: containers, sessions and runs.
//!
//! - [`states`]: the state machines every write goes through.
//! - [`Store`]: one set of methods over two backends, the embedded SQLite
//!   file (the default of `agentd up`) and PostgreSQL (multi-node, HA).
//!   [`Store::open`] picks by URL scheme.
//! - [`nodes`]: the fleet's nodes: registration, heartbeats, lost nodes and
//!   what fails with them, the journal watch leases.
//! - [`placement`]: which node a new container goes to, decided with its row.
//! - [`outbox`]: workflow steps written with the state change that needs
//!   them, claimed under fenced leases ([`crate::workflow`] runs them).
//! - [`registry`]: the agent registry's entries, replaced whole by each sync.
//! - [`agents`]: agent instances as their supervisors last reported them.
//! - [`archives`]: closed sessions' event logs.
//! - [`audit`]: a record of every state-changing API call.
//! - [`bundles`]: the agent bundles each node was given.
//! - `conformance` (tests only): one suite, run against both backends.
//!
//! # One implementation, two drivers
//!
//! [`Store`] holds a `Backend` enum over sqlx's native `SqlitePool` and
//! `PgPool`, chosen when the store is opened (an enum, not `dyn`, as youki
//! chooses its cgroup manager). Each method is written once: its body goes
//! through `with_pool!`, which expands the same expression once per pool
//! type, so the compiler checks the binds and row decoding against each
//! driver. What makes one SQL text serve both is the placeholder syntax:
//! every statement uses PostgreSQL's numbered `$1, $2, ...`, which sqlx-sqlite
//! 0.9 also binds by number (`SqliteArguments::bind` maps a parameter named
//! `$N` to the N-th bound value), so no statement exists in two spellings.
//!
//! sqlx's `Any` driver would also give one code path, but it opens SQLite from
//! a URL alone (no WAL, busy timeout or foreign keys without per-connection
//! pragma hooks), needs its drivers installed at runtime, and decodes through
//! a lowest-common-denominator value type; the migrations would still be two
//! directories. The enum keeps each driver's typed options for the price of a
//! two-armed `match` hidden in a macro.
//!
//! The schemas (`migrations/sqlite`, `migrations/postgres`) are kept column
//! for column equal; integers are 64-bit on both (`INTEGER` / `BIGINT`), times
//! are milliseconds since the Unix epoch.
//!
//! # Concurrency
//!
//! Every method here is one autocommit statement, or two (a transition's
//! `UPDATE` and, when it matched nothing, a `SELECT` to explain why). The
//! outbox (`outbox.rs`) adds short explicit transactions that write a state
//! change and its steps together; none is ever held across a network call. PostgreSQL runs at its
//! default READ COMMITTED. "One running run per session" is not a
//! check-then-insert: the partial unique index `runs_one_active` refuses the
//! second concurrent insert, and a unique violation there becomes
//! [`StoreError::RunActive`]. A transition names the states it may come from in
//! its `WHERE`, so two racing writers cannot both move a row.
//!
//! Token-by-token output never passes through here: it lives in the node's
//! per-session event logs.

pub use crate::domain::states;

#[cfg(test)]
pub(crate) mod conformance;

use crate::domain::Code;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::{Metrics, Outcome};

use serde::Serialize;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::FromRow;

use states::{Entity, IllegalTransition};

/// How long a query waits for a connection before the store counts as
/// unavailable (the API answers 503 with Retry-After).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no {entity} {id}")]
    NotFound { entity: Entity, id: String },
    #[error(transparent)]
    Illegal(#[from] IllegalTransition),
    #[error("session {session_id} already has a running turn")]
    RunActive { session_id: String },
    /// A step's lease was taken over: what the transaction recorded for it
    /// must be rolled back.
    #[error("outbox row {id}: lease epoch {epoch} is no longer held")]
    StaleLease { id: i64, epoch: i64 },
    /// An idempotency key already stored with another request's result.
    #[error("idempotency key {key:?} is already in use")]
    KeyTaken { key: String },
    /// Anything the database or the connection to it did wrong, including an
    /// unreachable server (`PoolTimedOut`) and an unusable store URL
    /// (`Configuration`).
    #[error("store unavailable: {0}")]
    Db(#[from] sqlx::Error),
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Labels kept as JSON text, served as the object they are.
fn labels_object<S: serde::Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    let labels: std::collections::BTreeMap<String, String> = serde_json::from_str(text).unwrap_or_default();
    serde::Serialize::serialize(&labels, s)
}

/// What a store failure means to whoever asked.
impl From<StoreError> for crate::domain::Refusal {
    fn from(e: StoreError) -> Self {
        use crate::domain::{Class, Refusal};
        match &e {
            StoreError::NotFound { entity, .. } => {
                let code = match entity {
                    Entity::Container => Code::ContainerNotFound,
                    Entity::Session => Code::SessionNotFound,
                    Entity::Run => Code::RunNotFound,
                    Entity::AgentInstance => Code::AgentNotFound,
                };
                Refusal::not_found(code, e.to_string())
            }
            StoreError::Illegal(_) => Refusal::conflict(Code::IllegalState, e.to_string()),
            StoreError::RunActive { .. } => Refusal::conflict(Code::RunActive, e.to_string()),
            StoreError::StaleLease { .. } => Refusal::conflict(Code::StaleLease, e.to_string()),
            // A request with the same key committed first: a retry answers it.
            StoreError::KeyTaken { .. } => Refusal::conflict(Code::IdempotencyKeyInUse, e.to_string()),
            StoreError::Db(_) | StoreError::Migrate(_) => {
                tracing::error!(error = %e, "store error");
                Refusal::new(Class::Unavailable, Code::StoreUnavailable, "the store is unavailable; retry later")
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct ContainerRow {
    pub id: String,
    pub node_id: String,
    pub state: String,
    #[serde(skip)]
    pub profile_json: String,
    pub supervisor_pid: Option<i64>,
    pub error: Option<String>,
    /// A stable code of why it failed, when agentd knows one ([`crate::domain::Code`]).
    pub error_code: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The most sessions it holds; `None`: no limit.
    pub capacity: Option<i64>,
    /// A JSON object of string labels (served as the object).
    #[serde(serialize_with = "labels_object")]
    pub labels: String,
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct SessionRow {
    pub id: String,
    pub container_id: String,
    pub agent_id: String,
    pub agent_version: String,
    pub agent_instance_id: String,
    pub acp_session_id: Option<String>,
    pub state: String,
    pub working_dir: String,
    pub error: Option<String>,
    pub error_code: Option<String>,
    /// A JSON object of string labels (served as the object).
    #[serde(serialize_with = "labels_object")]
    pub labels: String,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize, FromRow)]
pub struct RunRow {
    pub id: String,
    pub session_id: String,
    pub state: String,
    pub stop_reason: Option<String>,
    pub error: Option<String>,
    pub error_code: Option<String>,
    pub created_at: i64,
    /// When the node took it (streaming).
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    /// Its last state change.
    pub updated_at: Option<i64>,
}

/// A new session's fixed facts.
pub struct NewSession<'a> {
    pub id: &'a str,
    pub container_id: &'a str,
    pub agent_id: &'a str,
    pub agent_version: &'a str,
    pub agent_instance_id: &'a str,
    pub working_dir: &'a str,
}

/// The connection pool of the backend a store was opened on.
#[derive(Clone)]
enum Backend {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Evaluates `$body` with `$pool` bound to the store's pool, whichever it is.
/// The body is compiled once per backend, so it must be valid for both: write
/// SQL with `$N` placeholders, bind values both drivers encode, and yield a
/// type both arms share (rows, scalars; `rows_affected()` of an execute).
macro_rules! with_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.backend {
            Backend::Sqlite($pool) => $body,
            Backend::Postgres($pool) => $body,
        }
    };
}

// After `with_pool!`, which they use.
#[macro_use]
pub mod outbox;
pub mod cluster;
pub mod nodes;
pub mod listing;
pub mod placement;
pub mod tokens;
pub mod agents;
pub mod archives;
pub mod audit;
pub mod bundles;
mod checkpoint;
pub mod registry;
pub mod gauges;

#[derive(Clone)]
pub struct Store {
    /// Which database, and the pool of connections to it.
    backend: Backend,
    /// This process's metrics: the store records what only it sees whole
    /// (every run end passes through it), and shares them with the API.
    metrics: Arc<Metrics>,
}

fn table(entity: Entity) -> &'static str {
    match entity {
        Entity::Container => "containers",
        Entity::Session => "sessions",
        Entity::Run => "runs",
        Entity::AgentInstance => "agent_instances",
    }
}

/// The time columns a transition to `to` sets to its time (`$3`).
fn time_columns(entity: Entity, to: &str) -> &'static str {
    match (entity, to) {
        (Entity::Run, states::run::COMPLETED | states::run::CANCELLED | states::run::FAILED) => "updated_at = $3, completed_at = $3",
        _ => "updated_at = $3",
    }
}

/// A column a transition sets besides state, error and time, with its value.
#[derive(Clone, Copy)]
enum Extra<'a> {
    SupervisorPid(i64),
    AcpSessionId(&'a str),
    StopReason(&'a str),
    /// Set with the move to `failed`, so that no reader sees the failure
    /// without its code.
    ErrorCode(&'a str),
}

impl Extra<'_> {
    fn column(self) -> &'static str {
        match self {
            Extra::SupervisorPid(_) => "supervisor_pid",
            Extra::AcpSessionId(_) => "acp_session_id",
            Extra::StopReason(_) => "stop_reason",
            Extra::ErrorCode(_) => "error_code",
        }
    }
}

/// What an insert's constraint violation means, if it is one the caller can act on.
fn insert_refused(e: &sqlx::Error) -> Option<ConstraintKind> {
    match e {
        sqlx::Error::Database(e) if e.is_unique_violation() => Some(ConstraintKind::Unique),
        sqlx::Error::Database(e) if e.is_foreign_key_violation() => Some(ConstraintKind::ForeignKey),
        _ => None,
    }
}

enum ConstraintKind {
    Unique,
    ForeignKey,
}

/// Splits `scheme://rest` off a store location; `None` for a plain path.
fn scheme_of(location: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = location.split_once(':')?;
    let valid = !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    // "sqlite:agentd.db" is sqlx's own spelling; anything else needs "://".
    (valid && (rest.starts_with("//") || scheme.eq_ignore_ascii_case("sqlite"))).then_some((scheme, rest))
}

impl Store {
    /// Opens the store at `location`: a PostgreSQL URL (`postgres://` or
    /// `postgresql://`), or a SQLite file given as a path or a `sqlite://`
    /// (or `sqlite:`) URL whose remainder is the path. Either is migrated.
    pub async fn open(location: &str) -> Result<Self, StoreError> {
        match scheme_of(location) {
            None => Self::open_sqlite(Path::new(location)).await,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("postgres") || scheme.eq_ignore_ascii_case("postgresql") => {
                Self::open_postgres(location).await
            }
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("sqlite") => {
                let path = rest.strip_prefix("//").unwrap_or(rest);
                Self::open_sqlite(Path::new(path)).await
            }
            Some((scheme, _)) => Err(StoreError::Db(sqlx::Error::Configuration(
                format!("unsupported store URL scheme {scheme:?}: use postgres://, postgresql://, sqlite:// or a file path").into(),
            ))),
        }
    }

    /// Opens (creating) the SQLite store at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            // Checkpoints run on a task of their own (`checkpoint`).
            .pragma("wal_autocheckpoint", "0");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        checkpoint::spawn(pool.clone());
        Ok(Self { backend: Backend::Sqlite(pool), metrics: Arc::default() })
    }

    /// Connects to the PostgreSQL database at `url` and migrates it (sqlx's
    /// migrator holds an advisory lock, so control planes starting together
    /// migrate once). An unreachable server is [`StoreError::Db`] after the
    /// acquire timeout (5 s).
    pub async fn open_postgres(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new().max_connections(16).acquire_timeout(ACQUIRE_TIMEOUT).connect(url).await?;
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        let isolation: String = sqlx::query_scalar("SELECT current_setting('default_transaction_isolation')").fetch_one(&pool).await?;
        if isolation != "read committed" {
            // Every statement here is its own transaction, so this stays correct,
            // but stricter levels add serialization failures the store does not retry.
            tracing::warn!(%isolation, "PostgreSQL default_transaction_isolation is not read committed");
        }
        Ok(Self { backend: Backend::Postgres(pool), metrics: Arc::default() })
    }

    /// The same database through a pool of its own of `max_connections`, so
    /// that one user (the workflow runner) cannot starve another (the API)
    /// of connections: sqlx's pool is not fair under contention. Connects
    /// lazily. On SQLite, which has one writer anyway, the same pool.
    pub fn with_own_pool(&self, max_connections: u32) -> Self {
        match &self.backend {
            Backend::Sqlite(_) => self.clone(),
            Backend::Postgres(pool) => {
                let options = (*pool.connect_options()).clone();
                let pool = PgPoolOptions::new().max_connections(max_connections.max(2)).acquire_timeout(ACQUIRE_TIMEOUT).connect_lazy_with(options);
                Self { backend: Backend::Postgres(pool), metrics: Arc::clone(&self.metrics) }
            }
        }
    }

    /// Whether [`Self::with_own_pool`] gives a pool apart from this one's,
    /// which its user may close (on SQLite it is this very pool).
    pub fn own_pools_are_separate(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The backend's name, for logs: `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Records a new container, `provisioning`.
    pub async fn insert_container(&self, id: &str, node_id: &str, profile_json: &str) -> Result<(), StoreError> {
        self.transaction(async |tx| tx.insert_container(id, node_id, profile_json).await).await
    }

    /// Records a new session, `creating`, on an existing container.
    pub async fn insert_session(&self, s: NewSession<'_>) -> Result<(), StoreError> {
        self.transaction(async |tx| tx.insert_session(s).await).await
    }

    /// Starts a run; refused while the session has another one running. The
    /// partial unique index `runs_one_active` decides, so concurrent callers
    /// get exactly one success and [`StoreError::RunActive`] for the rest.
    /// (A reused run id is a unique violation too, and reads the same; ids
    /// are fresh UUIDs.) A missing session is [`StoreError::NotFound`].
    pub async fn insert_run(&self, id: &str, session_id: &str) -> Result<(), StoreError> {
        self.transaction(async |tx| tx.insert_run(id, session_id, states::run::DISPATCHING).await).await
    }

    pub async fn get_run(&self, id: &str) -> Result<RunRow, StoreError> {
        let sql = "SELECT * FROM runs WHERE id = $1";
        with_pool!(self, |pool| sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?
            .ok_or_else(|| StoreError::NotFound { entity: Entity::Run, id: id.to_string() })
    }

    /// Moves `entity` `id` to `to`, recording `error` and `extra` too when
    /// given, and the move in the `transitions` history (the error, if any,
    /// as its reason). Repeating a transition that already happened is
    /// harmless and changes nothing (the first write's error and extra value
    /// stay, no second history row).
    async fn transition(
        &self,
        entity: Entity,
        id: &str,
        to: &str,
        error: Option<&str>,
        extra: Option<Extra<'_>>,
    ) -> Result<(), StoreError> {
        let reason = error.unwrap_or_default();
        self.transaction(async |tx| tx.transition_with(entity, id, to, error, extra, reason).await.map(|_| ())).await
    }

    pub async fn container_hibernated(&self, id: &str) -> Result<(), StoreError> {
        self.transition(Entity::Container, id, states::container::HIBERNATED, None, None).await
    }

    /// Back from hibernation; unlike [`Self::container_ready`] the pid stays.
    pub async fn container_resumed(&self, id: &str) -> Result<(), StoreError> {
        self.transition(Entity::Container, id, states::container::READY, None, None).await
    }

    pub async fn container_ready(&self, id: &str, supervisor_pid: i32) -> Result<(), StoreError> {
        let extra = Extra::SupervisorPid(i64::from(supervisor_pid));
        self.transition(Entity::Container, id, states::container::READY, None, Some(extra)).await
    }

    /// A built container and its session recorded ready together: a store
    /// lost between two separate writes would leave a ready container with a
    /// session still `creating`, which a retried create cannot finish.
    pub async fn container_and_session_ready(
        &self,
        container_id: &str,
        supervisor_pid: i32,
        session_id: &str,
        acp_session_id: &str,
    ) -> Result<(), StoreError> {
        use states::{container, session};
        self.transaction(async |tx| {
            let pid = Extra::SupervisorPid(i64::from(supervisor_pid));
            tx.transition_with(Entity::Container, container_id, container::READY, None, Some(pid), "").await?;
            let acp = Extra::AcpSessionId(acp_session_id);
            tx.transition_with(Entity::Session, session_id, session::READY, None, Some(acp), "").await.map(|_| ())
        })
        .await
    }

    pub async fn container_failed(&self, id: &str, error: &str) -> Result<(), StoreError> {
        self.transition(Entity::Container, id, states::container::FAILED, Some(error), None).await
    }

    pub async fn container_deleted(&self, id: &str) -> Result<(), StoreError> {
        self.transition(Entity::Container, id, states::container::DELETED, None, None).await
    }

    pub async fn session_ready(&self, id: &str, acp_session_id: &str) -> Result<(), StoreError> {
        let extra = Extra::AcpSessionId(acp_session_id);
        self.transition(Entity::Session, id, states::session::READY, None, Some(extra)).await
    }

    /// The agent a session being opened ended up on (a reused one, maybe).
    pub async fn set_session_agent_instance(&self, id: &str, agent_instance_id: &str) -> Result<(), StoreError> {
        let sql = "UPDATE sessions SET agent_instance_id = $1 WHERE id = $2 AND state = $3";
        with_pool!(self, |pool| sqlx::query(sql).bind(agent_instance_id).bind(id).bind(states::session::CREATING).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn session_failed(&self, id: &str, error: &str) -> Result<(), StoreError> {
        self.transition(Entity::Session, id, states::session::FAILED, Some(error), None).await
    }

    pub async fn session_closed(&self, id: &str) -> Result<(), StoreError> {
        self.transition(Entity::Session, id, states::session::CLOSED, None, None).await
    }

    /// Ends a run as the agent reported it: `cancelled` when the stop reason
    /// says so, `completed` otherwise; the stop reason is kept either way.
    pub async fn run_completed(&self, id: &str, stop_reason: &str) -> Result<(), StoreError> {
        let to = if stop_reason == "cancelled" { states::run::CANCELLED } else { states::run::COMPLETED };
        self.transition(Entity::Run, id, to, None, Some(Extra::StopReason(stop_reason))).await?;
        self.run_ended();
        let outcome = if to == states::run::CANCELLED { Outcome::cancelled } else { Outcome::completed };
        self.count_run_end(id, outcome).await;
        Ok(())
    }

    pub async fn run_failed(&self, id: &str, error: &str) -> Result<(), StoreError> {
        self.run_failed_with(id, error, None).await
    }

    /// A run failed, with a stable `code` of why when there is one.
    pub async fn run_failed_with(&self, id: &str, error: &str, code: Option<&str>) -> Result<(), StoreError> {
        match code {
            Some(code) => self.failed_with_code(Entity::Run, id, states::run::FAILED, error, code).await?,
            None => self.transition(Entity::Run, id, states::run::FAILED, Some(error), None).await?,
        }
        self.run_ended();
        self.count_run_end(id, Outcome::failed).await;
        Ok(())
    }

    /// Counts a run's recorded end, with its duration from its creation.
    async fn count_run_end(&self, id: &str, outcome: Outcome) {
        let duration = match self.get_run(id).await {
            Ok(r) => r.completed_at.map(|end| Duration::from_millis(end.saturating_sub(r.created_at).max(0) as u64)),
            Err(_) => None,
        };
        self.metrics.run_ended(outcome, duration);
    }

    /// This process's metrics ([`crate::metrics`]).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub async fn session_failed_with(&self, id: &str, error: &str, code: &str) -> Result<(), StoreError> {
        self.failed_with_code(Entity::Session, id, states::session::FAILED, error, code).await
    }

    pub async fn container_failed_with(&self, id: &str, error: &str, code: &str) -> Result<(), StoreError> {
        self.failed_with_code(Entity::Container, id, states::container::FAILED, error, code).await
    }

    /// Moves a row to `failed` with its error and code in one statement (a
    /// reader never sees the one without the other); a row failed already
    /// without a code gets this one.
    async fn failed_with_code(&self, entity: Entity, id: &str, failed: &str, error: &str, code: &str) -> Result<(), StoreError> {
        self.transition(entity, id, failed, Some(error), Some(Extra::ErrorCode(code))).await?;
        self.set_error_code(entity, id, code).await
    }

    async fn set_error_code(&self, entity: Entity, id: &str, code: &str) -> Result<(), StoreError> {
        let table = match entity {
            Entity::Container => "containers",
            Entity::Session => "sessions",
            Entity::Run => "runs",
            other => unreachable!("{other:?} has no error code"),
        };
        // Audited: the table name is one of three constants.
        let sql = sqlx::AssertSqlSafe(format!("UPDATE {table} SET error_code = COALESCE(error_code, $1) WHERE id = $2"));
        with_pool!(self, |pool| sqlx::query(sql).bind(code).bind(id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// Runs the store calls active (queued, dispatching, streaming) in
    /// containers on `node_id`.
    pub async fn active_runs_of_node(&self, node_id: &str) -> Result<Vec<RunRow>, StoreError> {
        let sql = "SELECT r.* FROM runs r JOIN sessions s ON r.session_id = s.id JOIN containers c ON s.container_id = c.id \
                   WHERE c.node_id = $1 AND r.state IN ('queued', 'dispatching', 'streaming') ORDER BY r.created_at, r.id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(node_id).fetch_all(pool).await)?)
    }

    pub async fn get_container(&self, id: &str) -> Result<ContainerRow, StoreError> {
        let sql = "SELECT * FROM containers WHERE id = $1";
        with_pool!(self, |pool| sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?
            .ok_or_else(|| StoreError::NotFound { entity: Entity::Container, id: id.to_string() })
    }

    pub async fn get_session(&self, id: &str) -> Result<SessionRow, StoreError> {
        let sql = "SELECT * FROM sessions WHERE id = $1";
        with_pool!(self, |pool| sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?
            .ok_or_else(|| StoreError::NotFound { entity: Entity::Session, id: id.to_string() })
    }

    /// All sessions, newest first (ids are time-ordered, so they break ties).
    pub async fn list_sessions(&self) -> Result<Vec<SessionRow>, StoreError> {
        let sql = "SELECT * FROM sessions ORDER BY created_at DESC, id DESC";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).fetch_all(pool).await)?)
    }

    /// Sessions in `state`, oldest first.
    pub async fn sessions_in_state(&self, state: &str) -> Result<Vec<SessionRow>, StoreError> {
        let sql = "SELECT * FROM sessions WHERE state = $1 ORDER BY created_at, id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(state).fetch_all(pool).await)?)
    }

    /// Sessions on a container, oldest first.
    pub async fn sessions_of_container(&self, container_id: &str) -> Result<Vec<SessionRow>, StoreError> {
        let sql = "SELECT * FROM sessions WHERE container_id = $1 ORDER BY created_at, id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(container_id).fetch_all(pool).await)?)
    }

    /// Containers in `state`, oldest first.
    pub async fn containers_in_state(&self, state: &str) -> Result<Vec<ContainerRow>, StoreError> {
        let sql = "SELECT * FROM containers WHERE state = $1 ORDER BY created_at, id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(state).fetch_all(pool).await)?)
    }

    /// A session's runs, oldest first.
    pub async fn runs_of_session(&self, session_id: &str) -> Result<Vec<RunRow>, StoreError> {
        let sql = "SELECT * FROM runs WHERE session_id = $1 ORDER BY created_at, id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(session_id).fetch_all(pool).await)?)
    }

    /// The session's running run, if any (at most one, by `runs_one_active`).
    pub async fn running_runs_of_session(&self, session_id: &str) -> Result<Vec<RunRow>, StoreError> {
        let sql = "SELECT * FROM runs WHERE session_id = $1 AND state IN ('queued', 'dispatching', 'streaming') ORDER BY created_at, id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(session_id).fetch_all(pool).await)?)
    }

    /// The node took the run (now): its events flow.
    pub async fn run_streaming(&self, id: &str) -> Result<(), StoreError> {
        self.transaction(async |tx| {
            tx.transition(Entity::Run, id, states::run::STREAMING, None, "").await?;
            tx.set_run_started_at(id, now_ms()).await
        })
        .await
    }

    /// A runner took a queued run's dispatch.
    pub async fn run_dispatching(&self, id: &str) -> Result<(), StoreError> {
        self.transition(Entity::Run, id, states::run::DISPATCHING, None, None).await
    }

    /// The run a prompt with idempotency `key` made on `session_id`, and that
    /// prompt's digest.
    pub async fn run_by_idempotency_key(&self, session_id: &str, key: &str) -> Result<Option<(String, Option<String>)>, StoreError> {
        let sql = "SELECT id, request_digest FROM runs WHERE session_id = $1 AND idempotency_key = $2";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(session_id).bind(key).fetch_optional(pool).await)?)
    }

    /// The session a create with idempotency `key` made, and that create's digest.
    pub async fn session_by_idempotency_key(&self, key: &str) -> Result<Option<(String, Option<String>)>, StoreError> {
        let sql = "SELECT id, request_digest FROM sessions WHERE idempotency_key = $1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(key).fetch_optional(pool).await)?)
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        with_pool!(self, |pool| pool.close().await)
    }
}
