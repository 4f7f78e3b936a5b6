//! The transactional outbox: steps of workflows, written in the same
//! transaction as the state change that needs them, claimed by workers under
//! a fenced lease, retried with backoff. [`crate::workflow`] runs them.
//!
//! # Transactions
//!
//! [`Store::begin`] opens a [`Tx`] on either backend (SQLite: `BEGIN
//! IMMEDIATE`, so the writer lock is taken up front and two writers never
//! deadlock upgrading; PostgreSQL: the default READ COMMITTED). A state
//! change ([`Tx::transition`]) and its steps ([`Tx::enqueue`]) commit or
//! vanish together. [`Store::transaction`] wraps the same in a closure.
//!
//! # Clock
//!
//! Every outbox time (`available_at`, `lease_expires_at`, `created_at`,
//! `completed_at`) is read from the database's clock inside the statement
//! that writes or compares it, so control planes with skewed clocks agree on
//! when a lease expires. PostgreSQL: `statement_timestamp()` (stable within a
//! statement, so the claim's comparison can use the `outbox_due` index, which
//! the volatile `clock_timestamp()` would forbid); SQLite: `unixepoch('subsec')`.
//!
//! # Ordering and fencing
//!
//! A step is claimable when it is pending, due, and no older step (lower id)
//! of the same entity is pending or leased: one entity's steps never run
//! concurrently or out of order, while different entities' steps run in
//! parallel. Ids follow commit order per entity as long as an entity's
//! enqueuing transactions serialize, which they do when each first moves the
//! entity's row ([`Tx::transition`] updates it before enqueueing; the second
//! transaction waits on its row lock, or on SQLite's single writer); a
//! transaction that enqueues without moving the row takes [`Tx::lock`] first.
//!
//! Each claim bumps `lease_epoch`; completion, failure, lease extension and
//! release all say `WHERE id = $1 AND lease_epoch = $2 AND state = 'leased'`,
//! and a worker whose lease was reaped and re-claimed matches nothing:
//! [`OutboxError::StaleLease`].
//!
//! # Wake-ups
//!
//! A committed enqueue wakes this process's runners at once through a watch
//! channel per database ([`Store::outbox_wakeups`]), which is all SQLite
//! needs. On PostgreSQL other control planes hear of it by NOTIFY, sent
//! outside the enqueuing transaction (a commit that notifies takes a global
//! lock, which would serialize every state change): the commit also bumps
//! [`Store::outbox_enqueued`], and the runner's notifier
//! ([`crate::workflow::wake`]) sends one `pg_notify` for however many
//! commits happened while its previous one was in flight. All of these are
//! hints: runners poll as well.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sqlx::{AssertSqlSafe, FromRow, Postgres, Sqlite, Transaction};
use tokio::sync::watch;

use super::states::{self, Entity, IllegalTransition};
use super::{Backend, ConstraintKind, Extra, NewSession, Store, StoreError, insert_refused, now_ms, table, time_columns};
/// Store writes a step's handler left to its completion (see
/// `workflow::StepContext::complete_with`).
pub type CompletionWriteFn = Arc<dyn for<'t> Fn(&'t mut Tx) -> futures::future::BoxFuture<'t, Result<(), StoreError>> + Send + Sync>;

/// The PostgreSQL channel a committed enqueue notifies.
pub const CHANNEL: &str = "agentd_outbox";

/// This process's name in the payload of its notifications, so that its
/// listener can skip them: its runners were woken in process already.
pub fn notifier_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| crate::new_id("cp"))
}

/// How many finished rows one pruning statement deletes at most, so that a
/// large backlog is removed in short statements.
const PRUNE_BATCH: i64 = 5_000;

/// The outbox row states: pending -> leased -> done | failed, and back to
/// pending from leased on a retryable failure, an expired lease or a release.
pub mod step_state {
    pub const PENDING: &str = "pending";
    pub const LEASED: &str = "leased";
    pub const DONE: &str = "done";
    pub const FAILED: &str = "failed";
}

/// "Now" in milliseconds since the epoch on the database's clock; replaces
/// `NOW_MS` in the statements below.
const PG_NOW: &str = "(extract(epoch from statement_timestamp()) * 1000)::bigint";
const SQLITE_NOW: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The row was re-claimed (or finished) since this worker claimed it:
    /// its result must be dropped.
    #[error("outbox row {id}: lease epoch {epoch} is no longer held")]
    StaleLease { id: i64, epoch: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for OutboxError {
    fn from(e: sqlx::Error) -> Self {
        Self::Store(e.into())
    }
}

/// One outbox row, as stored.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub entity_kind: String,
    pub entity_id: String,
    pub kind: String,
    pub payload: Value,
    pub idempotency_key: String,
    pub state: String,
    /// Claims so far, this one included while leased.
    pub attempts: i64,
    pub max_attempts: i64,
    pub available_at: i64,
    pub lease_owner: Option<String>,
    pub lease_epoch: i64,
    pub lease_expires_at: Option<i64>,
    pub last_error: Option<String>,
    /// What the handler returned, once done.
    pub result: Option<Value>,
    pub created_at: i64,
    pub completed_at: Option<i64>,
}

/// One recorded state change of an entity.
#[derive(Debug, Clone, Serialize, FromRow)]
pub struct TransitionRow {
    pub id: i64,
    pub entity_kind: String,
    pub entity_id: String,
    pub from_state: String,
    pub to_state: String,
    pub at: i64,
    pub reason: Option<String>,
}

/// A step to enqueue.
#[derive(Debug, Clone)]
pub struct NewStep<'a> {
    /// With `entity_id`, the ordering key: one entity's steps run in order.
    pub entity_kind: &'a str,
    pub entity_id: &'a str,
    /// The handler that runs it.
    pub kind: &'a str,
    pub payload: Value,
    /// Enqueueing the same key again returns the existing row.
    pub idempotency_key: &'a str,
    /// Tries before the step fails for good.
    pub max_attempts: i64,
    /// Not claimable before this much time has passed.
    pub delay: Duration,
}

impl<'a> NewStep<'a> {
    pub const DEFAULT_MAX_ATTEMPTS: i64 = 5;

    pub fn new(entity_kind: &'a str, entity_id: &'a str, kind: &'a str, idempotency_key: &'a str, payload: Value) -> Self {
        Self {
            entity_kind,
            entity_id,
            kind,
            payload,
            idempotency_key,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            delay: Duration::ZERO,
        }
    }

    pub fn max_attempts(mut self, max_attempts: i64) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// Where a failed step went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// Pending again, claimable from `available_at` (database clock, ms).
    Retry { available_at: i64 },
    /// Out of attempts, or not retryable: `failed` for good.
    Final,
}

/// A fenced update matched its row, or the lease is stale.
fn fenced(updated: u64, id: i64, epoch: i64) -> Result<(), OutboxError> {
    if updated == 1 { Ok(()) } else { Err(OutboxError::StaleLease { id, epoch }) }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// The outcome of storing an idempotency key on `entity` `id`.
fn key_set(updated: Result<u64, sqlx::Error>, entity: Entity, id: &str, key: &str) -> Result<(), StoreError> {
    match updated {
        Ok(1) => Ok(()),
        Ok(_) => Err(StoreError::NotFound { entity, id: id.to_string() }),
        Err(e) if matches!(insert_refused(&e), Some(ConstraintKind::Unique)) => Err(StoreError::KeyTaken { key: key.to_string() }),
        Err(e) => Err(e.into()),
    }
}

/// The open transaction of one backend.
pub(super) enum TxConn {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// An open transaction on the store; dropped without [`Tx::commit`], it
/// rolls back. Never hold one across a network call.
pub struct Tx {
    pub(super) conn: TxConn,
    /// Steps inserted and left to the runners (not leased by
    /// [`Tx::claim_enqueued`]): the commit wakes runners when there are any.
    enqueued: usize,
    /// This database's in-process wake-up signals.
    signals: Arc<Signals>,
    /// SQLite: this process's writer turn, until the transaction ends.
    _writer: Option<tokio::sync::OwnedMutexGuard<()>>,
    /// Steps this transaction recorded done: their handlers' flags, set on commit.
    completes: Vec<Arc<std::sync::atomic::AtomicBool>>,
}

/// Evaluates `$body` with `$conn` bound to the transaction's connection, as
/// `with_pool!` does for the pool.
macro_rules! with_tx {
    ($tx:expr, |$conn:ident| $body:expr) => {
        match &mut $tx.conn {
            TxConn::Sqlite(t) => {
                let $conn = &mut **t;
                $body
            }
            TxConn::Postgres(t) => {
                let $conn = &mut **t;
                $body
            }
        }
    };
}

/// The in-process wake-up signals of one database: counters whose changes
/// receivers wait for (a watch never loses a change made while its receiver
/// was busy, unlike a bare `Notify`).
struct Signals {
    /// Steps may have become claimable: wakes claim loops.
    claimable: watch::Sender<u64>,
    /// Steps were enqueued here: wakes the NOTIFY forwarder.
    enqueued: watch::Sender<u64>,
    /// A run's end was recorded here: wakes a prompt waiting for the end
    /// of the turn before it.
    runs_ended: watch::Sender<u64>,
    /// SQLite: held by whoever writes, so that this process's writers queue
    /// here and are woken the moment the writer before them is done. Left to
    /// SQLite alone, a writer that finds the database locked sleeps in its
    /// busy handler (1, 2, 5, 10 ms ...), which cost prompts milliseconds.
    /// Other processes on the file still meet the busy handler.
    sqlite_writer: Arc<tokio::sync::Mutex<()>>,
}

/// The signals of each database this process opened (keyed by file, or by
/// server and database), shared by every clone of a store and every store
/// opened on the same database.
fn signals_for(key: String) -> Arc<Signals> {
    static SIGNALS: OnceLock<Mutex<HashMap<String, Arc<Signals>>>> = OnceLock::new();
    let mut signals = SIGNALS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    signals
        .entry(key)
        .or_insert_with(|| Arc::new(Signals { claimable: watch::Sender::new(0), enqueued: watch::Sender::new(0), runs_ended: watch::Sender::new(0),
            sqlite_writer: Default::default(),
        }))
        .clone()
}

fn bump(signal: &watch::Sender<u64>) {
    signal.send_modify(|n| *n = n.wrapping_add(1));
}

impl Tx {
    fn now_sql(&self) -> &'static str {
        match self.conn {
            TxConn::Sqlite(_) => SQLITE_NOW,
            TxConn::Postgres(_) => PG_NOW,
        }
    }

    fn sql(&self, template: &str) -> AssertSqlSafe<String> {
        // Audited: the only substitution is a constant clock expression.
        AssertSqlSafe(template.replace("NOW_MS", self.now_sql()))
    }

    /// Inserts a pending step, or returns the row already holding its
    /// idempotency key (unchanged, whatever its state).
    pub async fn enqueue(&mut self, step: NewStep<'_>) -> Result<OutboxRow, StoreError> {
        let insert = self.sql(
            "INSERT INTO outbox \
             (entity_kind, entity_id, kind, payload, idempotency_key, state, max_attempts, available_at, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, NOW_MS + $7, NOW_MS) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING *",
        );
        let delay = millis(step.delay);
        let inserted: Option<OutboxRow> = with_tx!(self, |conn| sqlx::query_as(insert)
            .bind(step.entity_kind)
            .bind(step.entity_id)
            .bind(step.kind)
            .bind(&step.payload)
            .bind(step.idempotency_key)
            .bind(step.max_attempts.max(1))
            .bind(delay)
            .fetch_optional(conn)
            .await)?;
        if let Some(row) = inserted {
            self.enqueued += 1;
            return Ok(row);
        }
        // The key exists: committed before (on PostgreSQL the insert waited
        // for a concurrent holder to commit), so this statement sees it.
        let sql = "SELECT * FROM outbox WHERE idempotency_key = $1";
        Ok(with_tx!(self, |conn| sqlx::query_as(sql).bind(step.idempotency_key).fetch_one(conn).await)?)
    }

    /// Leases `step`, just enqueued by this transaction, to `owner` for
    /// `lease`, as a claim would (epoch and attempts up by one), so that the
    /// caller runs it itself ([`crate::workflow::inline`]). `None`, leaving
    /// it to the runners, when it is not pending and due or an older step of
    /// its entity is still open (the claim's ordering rule: within this
    /// transaction the entity's steps are as the lock on its row left them).
    pub async fn claim_enqueued(&mut self, step: &OutboxRow, owner: &str, lease: Duration) -> Result<Option<OutboxRow>, StoreError> {
        if step.state != step_state::PENDING {
            return Ok(None);
        }
        let sql = self.sql(
            "UPDATE outbox SET state = 'leased', lease_owner = $2, lease_epoch = lease_epoch + 1, \
             attempts = attempts + 1, lease_expires_at = NOW_MS + $3 \
             WHERE id = $1 AND state = 'pending' AND available_at <= NOW_MS \
             AND NOT EXISTS (SELECT 1 FROM outbox p \
                 WHERE p.entity_kind = outbox.entity_kind AND p.entity_id = outbox.entity_id \
                 AND p.id < outbox.id AND p.state IN ('pending', 'leased')) \
             RETURNING *",
        );
        let leased: Option<OutboxRow> =
            with_tx!(self, |conn| sqlx::query_as(sql).bind(step.id).bind(owner).bind(millis(lease)).fetch_optional(conn).await)?;
        if leased.is_some() {
            // No runner need look for it (a claim that finds nothing is a
            // write transaction on SQLite).
            self.enqueued = self.enqueued.saturating_sub(1);
        }
        Ok(leased)
    }

    /// Records the step `ctx` is running done with `result`, in this
    /// transaction: a handler whose work is writes to the store commits them
    /// and the step's end together (one commit and no completion statement
    /// of the runner's), exactly once in effect. Fenced like a completion:
    /// a lease taken over is [`StoreError::StaleLease`], and the transaction
    /// must be rolled back (its writes were the stale worker's).
    /// `recorded` is the handler's flag, set once this transaction commits.
    pub async fn complete_step(&mut self, id: i64, epoch: i64, recorded: &Arc<std::sync::atomic::AtomicBool>, result: &Value) -> Result<(), StoreError> {
        if self.mark_done(id, epoch, result).await? != 1 {
            return Err(StoreError::StaleLease { id, epoch });
        }
        self.completes.push(Arc::clone(recorded));
        Ok(())
    }

    /// The completion statement: how many rows it marked done (0 if the
    /// lease at `epoch` is no longer held).
    async fn mark_done(&mut self, id: i64, epoch: i64, result: &Value) -> Result<u64, StoreError> {
        let sql = self.sql(
            "UPDATE outbox SET state = 'done', result = $3, completed_at = NOW_MS, lease_expires_at = NULL \
             WHERE id = $1 AND lease_epoch = $2 AND state = 'leased'",
        );
        Ok(with_tx!(self, |conn| sqlx::query(sql).bind(id).bind(epoch).bind(result).execute(conn).await.map(|done| done.rows_affected()))?)
    }

    /// Sets when the node took run `id`, with its move to `streaming` (or
    /// without: a turn whose end was recorded first, whose start then is no
    /// later than its end: the dispatch step's end may be recorded after it).
    pub async fn set_run_started_at(&mut self, id: &str, at: i64) -> Result<(), StoreError> {
        let sql = "UPDATE runs SET started_at = CASE WHEN completed_at IS NOT NULL AND completed_at < $2 THEN completed_at ELSE $2 END WHERE id = $1";
        with_tx!(self, |conn| sqlx::query(sql).bind(id).bind(at).execute(conn).await.map(|_| ()))?;
        Ok(())
    }

    /// Starts a run in `state` (`dispatching` when its caller hands it to the
    /// node, `queued` when a runner will), as [`Store::insert_run`] does. A
    /// refusal (a run already active) aborts a PostgreSQL transaction: roll
    /// it back.
    pub async fn insert_run(&mut self, id: &str, session_id: &str, state: &str) -> Result<(), StoreError> {
        debug_assert!(states::run::ACTIVE.contains(&state), "a run starts active, not {state}");
        let sql = "INSERT INTO runs (id, session_id, state, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)";
        let inserted = with_tx!(self, |conn| sqlx::query(sql)
            .bind(id)
            .bind(session_id)
            .bind(state)
            .bind(now_ms())
            .execute(conn)
            .await
            .map(|done| done.rows_affected()));
        match inserted {
            Ok(_) => Ok(()),
            Err(e) => match insert_refused(&e) {
                Some(ConstraintKind::Unique) => Err(StoreError::RunActive { session_id: session_id.to_string() }),
                Some(ConstraintKind::ForeignKey) => Err(StoreError::NotFound { entity: Entity::Session, id: session_id.to_string() }),
                None => Err(e.into()),
            },
        }
    }

    /// Remembers on run `run_id` the idempotency key its prompt came with,
    /// and the request's digest ([`crate::api::idempotency`]). A key another
    /// run of the session holds is [`StoreError::KeyTaken`] (which aborts a
    /// PostgreSQL transaction: roll it back).
    pub async fn set_run_idempotency_key(&mut self, run_id: &str, key: &str, digest: &str) -> Result<(), StoreError> {
        let sql = "UPDATE runs SET idempotency_key = $2, request_digest = $3 WHERE id = $1";
        let updated = with_tx!(self, |conn| sqlx::query(sql).bind(run_id).bind(key).bind(digest).execute(conn).await.map(|d| d.rows_affected()));
        key_set(updated, Entity::Run, run_id, key)
    }

    /// Remembers on session `session_id` the idempotency key its create came
    /// with, as [`Self::set_run_idempotency_key`] does for a run (keys of
    /// creates are global).
    pub async fn set_session_idempotency_key(&mut self, session_id: &str, key: &str, digest: &str) -> Result<(), StoreError> {
        let sql = "UPDATE sessions SET idempotency_key = $2, request_digest = $3 WHERE id = $1";
        let updated =
            with_tx!(self, |conn| sqlx::query(sql).bind(session_id).bind(key).bind(digest).execute(conn).await.map(|d| d.rows_affected()));
        key_set(updated, Entity::Session, session_id, key)
    }

    /// Locks `entity` `id`'s row until this transaction ends (PostgreSQL:
    /// `FOR UPDATE`; SQLite's `BEGIN IMMEDIATE` already holds the only writer
    /// lock). A transaction that enqueues a step of an entity without moving
    /// its row takes this first, so that the entity's step ids follow commit
    /// order (see the module doc): a concurrent transaction that moves the
    /// row waits for it, and the other way round.
    pub async fn lock(&mut self, entity: Entity, id: &str) -> Result<(), StoreError> {
        if let TxConn::Postgres(t) = &mut self.conn {
            let sql = format!("SELECT id FROM {} WHERE id = $1 FOR UPDATE", table(entity));
            // Audited: built from a constant table name only.
            let found: Option<String> = sqlx::query_scalar(AssertSqlSafe(sql)).bind(id).fetch_optional(&mut **t).await?;
            if found.is_none() {
                return Err(StoreError::NotFound { entity, id: id.to_string() });
            }
        }
        Ok(())
    }

    /// Locks container `id` as [`Self::lock`] does and reads its state: a
    /// decision on it holds until this transaction ends.
    pub async fn lock_container_state(&mut self, id: &str) -> Result<String, StoreError> {
        let sql = match self.conn {
            TxConn::Postgres(_) => "SELECT state FROM containers WHERE id = $1 FOR UPDATE",
            TxConn::Sqlite(_) => "SELECT state FROM containers WHERE id = $1",
        };
        let state: Option<String> = with_tx!(self, |conn| sqlx::query_scalar(sql).bind(id).fetch_optional(conn).await)?;
        state.ok_or_else(|| StoreError::NotFound { entity: Entity::Container, id: id.to_string() })
    }

    /// Records a new container, `provisioning`.
    pub async fn insert_container(&mut self, id: &str, node_id: &str, profile_json: &str) -> Result<(), StoreError> {
        let now = now_ms();
        let sql = "INSERT INTO containers (id, node_id, state, profile_json, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $5)";
        with_tx!(self, |conn| sqlx::query(sql)
            .bind(id)
            .bind(node_id)
            .bind(states::container::PROVISIONING)
            .bind(profile_json)
            .bind(now)
            .execute(conn)
            .await
            .map(|done| done.rows_affected()))?;
        Ok(())
    }

    /// Records a new session, `creating`, on an existing container.
    pub async fn insert_session(&mut self, s: NewSession<'_>) -> Result<(), StoreError> {
        let now = now_ms();
        let sql = "INSERT INTO sessions \
                   (id, container_id, agent_id, agent_version, agent_instance_id, state, working_dir, created_at, updated_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)";
        let inserted = with_tx!(self, |conn| sqlx::query(sql)
            .bind(s.id)
            .bind(s.container_id)
            .bind(s.agent_id)
            .bind(s.agent_version)
            .bind(s.agent_instance_id)
            .bind(states::session::CREATING)
            .bind(s.working_dir)
            .bind(now)
            .execute(conn)
            .await
            .map(|done| done.rows_affected()));
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if matches!(insert_refused(&e), Some(ConstraintKind::ForeignKey)) => {
                Err(StoreError::NotFound { entity: Entity::Container, id: s.container_id.to_string() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves `entity` `id` to `to` along its state machine and records the
    /// change (with `reason`) in `transitions`. Returns the state it came
    /// from, or `None` when it already was `to` (a repeat changes and records
    /// nothing). `error` is kept on the row, as the store's own transitions do.
    pub async fn transition(
        &mut self,
        entity: Entity,
        id: &str,
        to: &str,
        error: Option<&str>,
        reason: &str,
    ) -> Result<Option<String>, StoreError> {
        self.transition_with(entity, id, to, error, None, reason).await
    }

    /// [`Self::transition`], also setting `extra`'s column.
    pub(super) async fn transition_with(
        &mut self,
        entity: Entity,
        id: &str,
        to: &str,
        error: Option<&str>,
        extra: Option<Extra<'_>>,
        reason: &str,
    ) -> Result<Option<String>, StoreError> {
        if let TxConn::Postgres(_) = self.conn {
            return self.transition_in_one_statement(entity, id, to, error, extra, reason).await;
        }
        let select = format!("SELECT state FROM {} WHERE id = $1", table(entity));
        let times = time_columns(entity, to);
        let extra_sql = extra.map(|e| format!(", {} = $6", e.column())).unwrap_or_default();
        let update = format!(
            "UPDATE {} SET state = $1, error = COALESCE($2, error), {times}{extra_sql} WHERE id = $4 AND state = $5",
            table(entity)
        );
        loop {
            // Audited: both statements are built from constant table and column names only.
            let current: Option<String> =
                with_tx!(self, |conn| sqlx::query_scalar(AssertSqlSafe(select.clone())).bind(id).fetch_optional(conn).await)?;
            let current = match current {
                None => return Err(StoreError::NotFound { entity, id: id.to_string() }),
                Some(current) if current == to => return Ok(None),
                Some(current) if !states::sources(entity, to).contains(&current.as_str()) => {
                    return Err(IllegalTransition { entity, id: id.to_string(), current, to: to.to_string() }.into());
                }
                Some(current) => current,
            };
            // Compare-and-set on the state just read: a concurrent writer that
            // moved the row first makes this match nothing, and we read again.
            let now = now_ms();
            let updated = with_tx!(self, |conn| {
                let query = sqlx::query(AssertSqlSafe(update.clone())).bind(to).bind(error).bind(now).bind(id).bind(&current);
                let query = match extra {
                    None => query,
                    Some(Extra::SupervisorPid(pid)) => query.bind(pid),
                    Some(Extra::AcpSessionId(value) | Extra::StopReason(value) | Extra::ErrorCode(value)) => query.bind(value),
                };
                query.execute(conn).await.map(|done| done.rows_affected())
            })?;
            if updated == 1 {
                let history = self.sql(
                    "INSERT INTO transitions (entity_kind, entity_id, from_state, to_state, at, reason) \
                     VALUES ($1, $2, $3, $4, NOW_MS, $5)",
                );
                with_tx!(self, |conn| sqlx::query(history)
                    .bind(entity.to_string())
                    .bind(id)
                    .bind(&current)
                    .bind(to)
                    .bind(reason)
                    .execute(conn)
                    .await
                    .map(|done| done.rows_affected()))?;
                return Ok(Some(current));
            }
        }
    }

    /// [`Self::transition_with`] on PostgreSQL: the read, the compare-and-set
    /// and the history row in one statement (one round trip instead of three).
    /// `prev` reads the state in the statement's snapshot; the `UPDATE` moves
    /// the row only if it is still in that state (a concurrent writer's
    /// commit makes READ COMMITTED re-check `t.state = prev.state` against
    /// the new row, which then fails, and we go again); the history row is
    /// written from what the `UPDATE` returned, so only for a real move.
    async fn transition_in_one_statement(
        &mut self,
        entity: Entity,
        id: &str,
        to: &str,
        error: Option<&str>,
        extra: Option<Extra<'_>>,
        reason: &str,
    ) -> Result<Option<String>, StoreError> {
        let table = table(entity);
        let times = time_columns(entity, to);
        let extra_sql = extra.map(|e| format!(", {} = $8", e.column())).unwrap_or_default();
        let sources: Vec<String> = states::sources(entity, to).iter().map(|s| s.to_string()).collect();
        let sql = self.sql(&format!(
            "WITH prev AS (SELECT state FROM {table} WHERE id = $4), \
             moved AS (UPDATE {table} t SET state = $1, error = COALESCE($2, t.error), {times}{extra_sql} \
                 FROM prev WHERE t.id = $4 AND t.state = prev.state AND prev.state = ANY($5) AND prev.state <> $1 \
                 RETURNING prev.state AS from_state), \
             history AS (INSERT INTO transitions (entity_kind, entity_id, from_state, to_state, at, reason) \
                 SELECT $6, $4, from_state, $1, NOW_MS, $7 FROM moved) \
             SELECT (SELECT state FROM prev), (SELECT from_state FROM moved)"
        ));
        let TxConn::Postgres(t) = &mut self.conn else { unreachable!("PostgreSQL only") };
        loop {
            let now = now_ms();
            let query = sqlx::query_as::<_, (Option<String>, Option<String>)>(AssertSqlSafe(sql.0.clone()))
                .bind(to)
                .bind(error)
                .bind(now)
                .bind(id)
                .bind(&sources)
                .bind(entity.to_string())
                .bind(reason);
            let query = match extra {
                None => query,
                Some(Extra::SupervisorPid(pid)) => query.bind(pid),
                Some(Extra::AcpSessionId(value) | Extra::StopReason(value) | Extra::ErrorCode(value)) => query.bind(value),
            };
            let (current, moved_from) = query.fetch_one(&mut **t).await?;
            match (current, moved_from) {
                (None, _) => return Err(StoreError::NotFound { entity, id: id.to_string() }),
                (Some(_), Some(from)) => return Ok(Some(from)),
                (Some(current), None) if current == to => return Ok(None),
                (Some(current), None) if !states::sources(entity, to).contains(&current.as_str()) => {
                    return Err(IllegalTransition { entity, id: id.to_string(), current, to: to.to_string() }.into());
                }
                // Moved by a concurrent writer between the read and the update: read again.
                (Some(_), None) => {}
            }
        }
    }

    /// Commits; if a step was enqueued, wakes runners (see the module doc).
    pub async fn commit(self) -> Result<(), StoreError> {
        match self.conn {
            TxConn::Sqlite(t) => t.commit().await?,
            TxConn::Postgres(t) => t.commit().await?,
        }
        for recorded in &self.completes {
            recorded.store(true, std::sync::atomic::Ordering::Release);
        }
        if self.enqueued > 0 {
            bump(&self.signals.claimable);
            bump(&self.signals.enqueued);
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        match self.conn {
            TxConn::Sqlite(t) => t.rollback().await?,
            TxConn::Postgres(t) => t.rollback().await?,
        }
        Ok(())
    }
}

impl Store {
    pub(super) fn now_sql(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => SQLITE_NOW,
            Backend::Postgres(_) => PG_NOW,
        }
    }

    pub(super) fn sql(&self, template: &str) -> AssertSqlSafe<String> {
        // Audited: the only substitution is a constant clock expression.
        AssertSqlSafe(template.replace("NOW_MS", self.now_sql()))
    }

    fn signals(&self) -> Arc<Signals> {
        let key = match &self.backend {
            Backend::Sqlite(pool) => format!("sqlite:{}", pool.connect_options().get_filename().display()),
            Backend::Postgres(pool) => {
                let o = pool.connect_options();
                format!("postgres://{}:{}/{}", o.get_host(), o.get_port(), o.get_database().unwrap_or_default())
            }
        };
        signals_for(key)
    }

    /// The PostgreSQL pool, for LISTEN; `None` on SQLite.
    pub(crate) fn pg_pool(&self) -> Option<sqlx::PgPool> {
        match &self.backend {
            Backend::Postgres(pool) => Some(pool.clone()),
            Backend::Sqlite(_) => None,
        }
    }

    /// Changes whenever a step may have become claimable in this process
    /// (an enqueue committed, a step finished, a notification arrived).
    pub fn outbox_wakeups(&self) -> watch::Receiver<u64> {
        self.signals().claimable.subscribe()
    }

    /// Changes whenever a step was enqueued in this process.
    pub fn outbox_enqueued(&self) -> watch::Receiver<u64> {
        self.signals().enqueued.subscribe()
    }

    /// Changes whenever this process records the end of a run.
    pub fn runs_ended(&self) -> watch::Receiver<u64> {
        self.signals().runs_ended.subscribe()
    }

    pub(super) fn run_ended(&self) {
        bump(&self.signals().runs_ended);
    }

    /// Wakes this process's runners on this database.
    pub fn wake_outbox(&self) {
        bump(&self.signals().claimable);
    }

    /// Tells every control plane listening on this PostgreSQL database that
    /// steps were enqueued (one NOTIFY on the outbox channel, in a statement
    /// of its own). Does nothing on SQLite.
    pub async fn notify_outbox(&self) -> Result<(), StoreError> {
        if let Backend::Postgres(pool) = &self.backend {
            sqlx::query("SELECT pg_notify($1, $2)").bind(CHANNEL).bind(notifier_id()).execute(pool).await?;
        }
        Ok(())
    }

    /// SQLite: waits for this process's writer turn (see `Signals`); a
    /// statement that writes holds it until it is done. Never take it while
    /// holding a [`Tx`], which has it already.
    pub(super) async fn writer(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match &self.backend {
            Backend::Sqlite(_) => Some(self.signals().sqlite_writer.clone().lock_owned().await),
            Backend::Postgres(_) => None,
        }
    }

    /// Opens a transaction (see the module doc).
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let (conn, writer) = match &self.backend {
            Backend::Sqlite(pool) => {
                let writer = self.writer().await;
                (TxConn::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?), writer)
            }
            Backend::Postgres(pool) => (TxConn::Postgres(pool.begin().await?), None),
        };
        Ok(Tx { conn, enqueued: 0, signals: self.signals(), _writer: writer, completes: Vec::new() })
    }

    /// Runs `f` in a transaction: committed if it returns `Ok`, rolled back
    /// if it returns `Err` (or panics).
    pub async fn transaction<T, E, F>(&self, f: F) -> Result<T, E>
    where
        E: From<StoreError>,
        F: AsyncFnOnce(&mut Tx) -> Result<T, E>,
    {
        let mut tx = self.begin().await?;
        let value = f(&mut tx).await?;
        tx.commit().await?;
        Ok(value)
    }

    /// Enqueues one step in a transaction of its own.
    pub async fn enqueue(&self, step: NewStep<'_>) -> Result<OutboxRow, StoreError> {
        let mut tx = self.begin().await?;
        let row = tx.enqueue(step).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Moves `entity` `id` to `to` and enqueues `step`, atomically: both are
    /// written or neither is. An illegal transition enqueues nothing.
    pub async fn transition_and_enqueue(
        &self,
        entity: Entity,
        id: &str,
        to: &str,
        reason: &str,
        step: NewStep<'_>,
    ) -> Result<OutboxRow, StoreError> {
        let mut tx = self.begin().await?;
        tx.transition(entity, id, to, None, reason).await?;
        let row = tx.enqueue(step).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Leases up to `limit` due steps to `owner` for `lease`, oldest first,
    /// at most one per entity and none behind an open older step of its
    /// entity. Each claimed row's epoch and attempts go up by one.
    pub async fn claim(&self, owner: &str, limit: u32, lease: Duration) -> Result<Vec<OutboxRow>, StoreError> {
        const DUE: &str = "SELECT o.id FROM outbox o \
             WHERE o.state = 'pending' AND o.available_at <= NOW_MS \
             AND NOT EXISTS (SELECT 1 FROM outbox p \
                 WHERE p.entity_kind = o.entity_kind AND p.entity_id = o.entity_id \
                 AND p.id < o.id AND p.state IN ('pending', 'leased')) \
             ORDER BY o.available_at, o.id LIMIT $2";
        const LEASE: &str = "state = 'leased', lease_owner = $1, lease_epoch = lease_epoch + 1, \
             attempts = attempts + 1, lease_expires_at = NOW_MS + $3";
        let (limit, lease) = (i64::from(limit), millis(lease));
        let mut rows: Vec<OutboxRow> = match &self.backend {
            // One autocommit statement at READ COMMITTED: rows another claimer
            // holds are skipped, not waited for; a row it claimed and committed
            // meanwhile fails the re-check of `state = 'pending'`.
            Backend::Postgres(pool) => {
                let sql = self.sql(&format!(
                    "WITH due AS ({DUE} FOR UPDATE OF o SKIP LOCKED) \
                     UPDATE outbox SET {LEASE} FROM due WHERE outbox.id = due.id RETURNING outbox.*"
                ));
                sqlx::query_as(sql).bind(owner).bind(limit).bind(lease).fetch_all(pool).await?
            }
            // One writer at a time: the subquery is evaluated once, before any
            // row changes, inside a transaction that holds the write lock.
            Backend::Sqlite(_) => {
                let sql = self.sql(&format!("UPDATE outbox SET {LEASE} WHERE id IN ({DUE}) RETURNING *"));
                let mut tx = self.begin().await?;
                let rows = with_tx!(tx, |conn| sqlx::query_as(sql).bind(owner).bind(limit).bind(lease).fetch_all(conn).await)?;
                tx.commit().await?;
                rows
            }
        };
        rows.sort_by_key(|r| (r.available_at, r.id));
        Ok(rows)
    }

    /// Marks a leased step done with its handler's `result`.
    pub async fn complete(&self, id: i64, epoch: i64, result: &Value) -> Result<(), OutboxError> {
        let sql = self.sql(
            "UPDATE outbox SET state = 'done', result = $3, completed_at = NOW_MS, lease_expires_at = NULL \
             WHERE id = $1 AND lease_epoch = $2 AND state = 'leased'",
        );
        let _writer = self.writer().await;
        let updated = with_pool!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(epoch)
            .bind(result)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        fenced(updated, id, epoch)
    }

    /// [`Self::complete`] in one transaction with `writes` (see
    /// [`StepContext::complete_with`](crate::workflow::StepContext::complete_with)):
    /// a lease taken over rolls them back.
    pub async fn complete_with(&self, id: i64, epoch: i64, result: &Value, writes: &CompletionWriteFn) -> Result<(), OutboxError> {
        let mut tx = self.begin().await?;
        writes(&mut tx).await?;
        let updated = tx.mark_done(id, epoch, result).await?;
        fenced(updated, id, epoch)?;
        Ok(tx.commit().await?)
    }

    /// Keeps a leased step's lease for `lease` from now (a heartbeat).
    pub async fn extend_lease(&self, id: i64, epoch: i64, lease: Duration) -> Result<(), OutboxError> {
        let sql = self.sql(
            "UPDATE outbox SET lease_expires_at = NOW_MS + $3 WHERE id = $1 AND lease_epoch = $2 AND state = 'leased'",
        );
        let _writer = self.writer().await;
        let updated = with_pool!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(epoch)
            .bind(millis(lease))
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        fenced(updated, id, epoch)
    }

    /// Gives a leased step back unfinished (a runner shutting down): pending
    /// again at once, and the attempt does not count.
    pub async fn release(&self, id: i64, epoch: i64, reason: &str) -> Result<(), OutboxError> {
        let sql = self.sql(
            "UPDATE outbox SET state = 'pending', attempts = attempts - 1, available_at = NOW_MS, \
             lease_expires_at = NULL, last_error = $3 \
             WHERE id = $1 AND lease_epoch = $2 AND state = 'leased'",
        );
        let _writer = self.writer().await;
        let updated = with_pool!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(epoch)
            .bind(reason)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))?;
        fenced(updated, id, epoch)?;
        self.wake_outbox();
        Ok(())
    }

    /// Records a leased step's failure. With `retry_in` and attempts left it
    /// is pending again from `retry_in` on; otherwise it is failed for good.
    /// `error` is kept as `last_error` either way.
    pub async fn fail(&self, id: i64, epoch: i64, error: &str, retry_in: Option<Duration>) -> Result<Failed, OutboxError> {
        let retry = "($3 >= 0 AND attempts < max_attempts)";
        let sql = self.sql(&format!(
            "UPDATE outbox SET \
             state = CASE WHEN {retry} THEN 'pending' ELSE 'failed' END, \
             available_at = CASE WHEN {retry} THEN NOW_MS + $3 ELSE available_at END, \
             completed_at = CASE WHEN {retry} THEN NULL ELSE NOW_MS END, \
             last_error = $4, lease_expires_at = NULL \
             WHERE id = $1 AND lease_epoch = $2 AND state = 'leased' \
             RETURNING state, available_at"
        ));
        let retry_ms = retry_in.map(millis).unwrap_or(-1);
        let _writer = self.writer().await;
        let row: Option<(String, i64)> =
            with_pool!(self, |pool| sqlx::query_as(sql).bind(id).bind(epoch).bind(retry_ms).bind(error).fetch_optional(pool).await)?;
        match row {
            None => Err(OutboxError::StaleLease { id, epoch }),
            Some((state, available_at)) if state == step_state::PENDING => Ok(Failed::Retry { available_at }),
            Some(_) => Ok(Failed::Final),
        }
    }

    /// Gives back every step `owner` holds, at once: a control plane that
    /// restarts under the same owner name calls this before it claims, so the
    /// steps its previous process was running when it died need not wait for
    /// their leases to expire. The attempt counts (it started); the next claim
    /// bumps the epoch, so the dead process's calls are fenced. Returns how many.
    pub async fn release_leases_of(&self, owner: &str) -> Result<u64, StoreError> {
        let sql = self.sql(
            "UPDATE outbox SET state = 'pending', available_at = NOW_MS, lease_expires_at = NULL, \
             last_error = 'the runner ' || lease_owner || ' restarted while running this step' \
             WHERE state = 'leased' AND lease_owner = $1",
        );
        let _writer = self.writer().await;
        let released = with_pool!(self, |pool| sqlx::query(sql).bind(owner).execute(pool).await.map(|done| done.rows_affected()))?;
        if released > 0 {
            self.wake_outbox();
        }
        Ok(released)
    }

    /// Whether `entity` has a step not yet finished (pending or leased).
    pub async fn has_open_steps(&self, entity_kind: &str, entity_id: &str) -> Result<bool, StoreError> {
        let sql = "SELECT COUNT(*) FROM outbox WHERE entity_kind = $1 AND entity_id = $2 AND state IN ('pending', 'leased')";
        let n: i64 = with_pool!(self, |pool| sqlx::query_scalar(sql).bind(entity_kind).bind(entity_id).fetch_one(pool).await)?;
        Ok(n > 0)
    }

    /// Returns steps whose lease expired to pending (failed, if that was
    /// their last attempt). Their epoch was bumped when they were claimed, so
    /// the worker that lost them is already fenced. Returns how many.
    pub async fn reap_expired_leases(&self) -> Result<u64, StoreError> {
        let out_of_attempts = "attempts >= max_attempts";
        let sql = self.sql(&format!(
            "UPDATE outbox SET \
             state = CASE WHEN {out_of_attempts} THEN 'failed' ELSE 'pending' END, \
             completed_at = CASE WHEN {out_of_attempts} THEN NOW_MS ELSE NULL END, \
             available_at = NOW_MS, lease_expires_at = NULL, \
             last_error = 'lease of ' || COALESCE(lease_owner, '?') || ' expired' \
             WHERE state = 'leased' AND lease_expires_at < NOW_MS"
        ));
        let _writer = self.writer().await;
        let reaped = with_pool!(self, |pool| sqlx::query(sql).execute(pool).await.map(|done| done.rows_affected()))?;
        if reaped > 0 {
            self.wake_outbox();
        }
        Ok(reaped)
    }

    /// Deletes done steps finished more than `retention` ago, and transition
    /// history older than `history_retention`. Failed steps stay for
    /// inspection. Returns (steps, transitions) deleted.
    pub async fn prune_outbox(&self, retention: Duration, history_retention: Duration) -> Result<(u64, u64), StoreError> {
        let steps = self.sql(
            "DELETE FROM outbox WHERE id IN \
             (SELECT id FROM outbox WHERE state = 'done' AND completed_at < NOW_MS - $1 LIMIT $2)",
        )
        .0;
        let history = self.sql("DELETE FROM transitions WHERE id IN (SELECT id FROM transitions WHERE at < NOW_MS - $1 LIMIT $2)").0;
        let mut deleted = (0, 0);
        for (sql, retention, total) in [(steps, retention, &mut deleted.0), (history, history_retention, &mut deleted.1)] {
            loop {
                let n = with_pool!(self, |pool| sqlx::query(AssertSqlSafe(sql.clone()))
                    .bind(millis(retention))
                    .bind(PRUNE_BATCH)
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected()))?;
                *total += n;
                if n < PRUNE_BATCH as u64 {
                    break;
                }
            }
        }
        Ok(deleted)
    }

    pub async fn get_step(&self, id: i64) -> Result<Option<OutboxRow>, StoreError> {
        let sql = "SELECT * FROM outbox WHERE id = $1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(id).fetch_optional(pool).await)?)
    }

    pub async fn get_step_by_key(&self, idempotency_key: &str) -> Result<Option<OutboxRow>, StoreError> {
        let sql = "SELECT * FROM outbox WHERE idempotency_key = $1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(idempotency_key).fetch_optional(pool).await)?)
    }

    /// An entity's steps, in order.
    pub async fn steps_of_entity(&self, entity_kind: &str, entity_id: &str) -> Result<Vec<OutboxRow>, StoreError> {
        let sql = "SELECT * FROM outbox WHERE entity_kind = $1 AND entity_id = $2 ORDER BY id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(entity_kind).bind(entity_id).fetch_all(pool).await)?)
    }

    /// How many steps are in `state`.
    pub async fn count_steps(&self, state: &str) -> Result<i64, StoreError> {
        let sql = "SELECT COUNT(*) FROM outbox WHERE state = $1";
        Ok(with_pool!(self, |pool| sqlx::query_scalar(sql).bind(state).fetch_one(pool).await)?)
    }

    /// An entity's recorded transitions, oldest first.
    pub async fn transitions_of(&self, entity_kind: &str, entity_id: &str) -> Result<Vec<TransitionRow>, StoreError> {
        let sql = "SELECT * FROM transitions WHERE entity_kind = $1 AND entity_id = $2 ORDER BY id";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(entity_kind).bind(entity_id).fetch_all(pool).await)?)
    }
}
