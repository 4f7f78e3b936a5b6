//! Durable control state: containers, sessions and runs.
//!
//! - [`states`]: the state machines every write goes through.
//! - [`Store`]: the embedded SQLite backend (a file under the state dir), the
//!   default of `agentd up`. The PostgreSQL backend joins it behind the same
//!   methods (see HACKING.md).
//!
//! Token-by-token output never passes through here: it lives in the node's
//! per-session event logs.

pub mod states;

use std::path::Path;
use std::str::FromStr;

use serde::Serialize;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{FromRow, SqlitePool};

use states::{Entity, IllegalTransition};

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
    #[error("store unavailable: {0}")]
    Db(#[from] sqlx::Error),
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
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
    pub created_at: i64,
    pub updated_at: i64,
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
    pub created_at: i64,
    pub completed_at: Option<i64>,
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

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

fn table(entity: Entity) -> &'static str {
    match entity {
        Entity::Container => "containers",
        Entity::Session => "sessions",
        Entity::Run => "runs",
    }
}

impl Store {
    /// Opens (creating) the SQLite store at `path` and migrates it.
    pub async fn open_sqlite(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(std::time::Duration::from_secs(5));
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(Self { pool })
    }

    pub async fn insert_container(&self, id: &str, node_id: &str, profile_json: &str) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query("INSERT INTO containers (id, node_id, state, profile_json, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(id)
            .bind(node_id)
            .bind(states::container::PROVISIONING)
            .bind(profile_json)
            .bind(now)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn insert_session(&self, s: NewSession<'_>) -> Result<(), StoreError> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO sessions (id, container_id, agent_id, agent_version, agent_instance_id, state, working_dir, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.id)
        .bind(s.container_id)
        .bind(s.agent_id)
        .bind(s.agent_version)
        .bind(s.agent_instance_id)
        .bind(states::session::CREATING)
        .bind(s.working_dir)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Starts a run; refused while the session has another one running.
    pub async fn insert_run(&self, id: &str, session_id: &str) -> Result<(), StoreError> {
        let inserted = sqlx::query("INSERT INTO runs (id, session_id, state, created_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(session_id)
            .bind(states::run::RUNNING)
            .bind(now_ms())
            .execute(&self.pool)
            .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::RunActive { session_id: session_id.to_string() })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves `entity` `id` to `to`, setting `column` to `value` too when given.
    /// Repeating a transition that already happened is harmless.
    async fn transition(
        &self,
        entity: Entity,
        id: &str,
        to: &str,
        error: Option<&str>,
        extra: Option<(&'static str, &str)>,
    ) -> Result<(), StoreError> {
        let from = states::sources(entity, to);
        let allowed = from.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ");
        let time_column = if entity == Entity::Run { "completed_at" } else { "updated_at" };
        let extra_sql = extra.map(|(c, _)| format!(", {c} = ?")).unwrap_or_default();
        let sql = format!(
            "UPDATE {} SET state = ?, error = COALESCE(?, error), {time_column} = ?{extra_sql} WHERE id = ? AND state IN ({allowed})",
            table(entity)
        );
        // Audited: the SQL is built from constant table, column and state names only.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(to).bind(error).bind(now_ms());
        if let Some((_, value)) = extra {
            query = query.bind(value);
        }
        let updated = query.bind(id).execute(&self.pool).await?.rows_affected();
        if updated == 1 {
            return Ok(());
        }
        let current: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT state FROM {} WHERE id = ?", table(entity))))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        match current {
            None => Err(StoreError::NotFound { entity, id: id.to_string() }),
            Some(current) if current == to => Ok(()),
            Some(current) => Err(IllegalTransition { entity, id: id.to_string(), current, to: to.to_string() }.into()),
        }
    }

    pub async fn container_ready(&self, id: &str, supervisor_pid: i32) -> Result<(), StoreError> {
        self.transition(Entity::Container, id, states::container::READY, None, Some(("supervisor_pid", &supervisor_pid.to_string())))
            .await
    }

    pub async fn container_failed(&self, id: &str, error: &str) -> Result<(), StoreError> {
        self.transition(Entity::Container, id, states::container::FAILED, Some(error), None).await
    }

    pub async fn container_deleted(&self, id: &str) -> Result<(), StoreError> {
        self.transition(Entity::Container, id, states::container::DELETED, None, None).await
    }

    pub async fn session_ready(&self, id: &str, acp_session_id: &str) -> Result<(), StoreError> {
        self.transition(Entity::Session, id, states::session::READY, None, Some(("acp_session_id", acp_session_id))).await
    }

    pub async fn session_failed(&self, id: &str, error: &str) -> Result<(), StoreError> {
        self.transition(Entity::Session, id, states::session::FAILED, Some(error), None).await
    }

    pub async fn session_closed(&self, id: &str) -> Result<(), StoreError> {
        self.transition(Entity::Session, id, states::session::CLOSED, None, None).await
    }

    pub async fn run_completed(&self, id: &str, stop_reason: &str) -> Result<(), StoreError> {
        let to = if stop_reason == "cancelled" { states::run::CANCELLED } else { states::run::COMPLETED };
        self.transition(Entity::Run, id, to, None, Some(("stop_reason", stop_reason))).await
    }

    pub async fn run_failed(&self, id: &str, error: &str) -> Result<(), StoreError> {
        self.transition(Entity::Run, id, states::run::FAILED, Some(error), None).await
    }

    pub async fn get_container(&self, id: &str) -> Result<ContainerRow, StoreError> {
        sqlx::query_as("SELECT * FROM containers WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound { entity: Entity::Container, id: id.to_string() })
    }

    pub async fn get_session(&self, id: &str) -> Result<SessionRow, StoreError> {
        sqlx::query_as("SELECT * FROM sessions WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound { entity: Entity::Session, id: id.to_string() })
    }

    pub async fn list_sessions(&self) -> Result<Vec<SessionRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM sessions ORDER BY created_at DESC").fetch_all(&self.pool).await?)
    }

    pub async fn sessions_in_state(&self, state: &str) -> Result<Vec<SessionRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM sessions WHERE state = ?").bind(state).fetch_all(&self.pool).await?)
    }

    pub async fn sessions_of_container(&self, container_id: &str) -> Result<Vec<SessionRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM sessions WHERE container_id = ?").bind(container_id).fetch_all(&self.pool).await?)
    }

    pub async fn containers_in_state(&self, state: &str) -> Result<Vec<ContainerRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM containers WHERE state = ?").bind(state).fetch_all(&self.pool).await?)
    }

    pub async fn runs_of_session(&self, session_id: &str) -> Result<Vec<RunRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM runs WHERE session_id = ? ORDER BY created_at, id")
            .bind(session_id)
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn running_runs_of_session(&self, session_id: &str) -> Result<Vec<RunRow>, StoreError> {
        Ok(sqlx::query_as("SELECT * FROM runs WHERE session_id = ? AND state = ?")
            .bind(session_id)
            .bind(states::run::RUNNING)
            .fetch_all(&self.pool)
            .await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("agentd.db")).await.unwrap();
        (dir, store)
    }

    async fn session(store: &Store) {
        store.insert_container("ctr_1", "local", "{}").await.unwrap();
        store
            .insert_session(NewSession {
                id: "ses_1",
                container_id: "ctr_1",
                agent_id: "echo",
                agent_version: "1",
                agent_instance_id: "agi_1",
                working_dir: "/workspace",
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn transitions_are_enforced_and_repeats_are_harmless() {
        let (_dir, store) = store().await;
        session(&store).await;
        store.container_ready("ctr_1", 42).await.unwrap();
        store.container_ready("ctr_1", 42).await.unwrap();
        assert_eq!(store.get_container("ctr_1").await.unwrap().supervisor_pid, Some(42));
        store.container_deleted("ctr_1").await.unwrap();
        match store.container_ready("ctr_1", 42).await {
            Err(StoreError::Illegal(e)) => {
                assert_eq!(e.current, "deleted");
                assert_eq!(e.to_string(), "container ctr_1 is deleted; it cannot become ready");
            }
            other => panic!("expected an illegal transition, got {other:?}"),
        }
        assert!(matches!(store.session_ready("ses_nope", "x").await, Err(StoreError::NotFound { .. })));
    }

    #[tokio::test]
    async fn one_running_run_per_session() {
        let (_dir, store) = store().await;
        session(&store).await;
        store.insert_run("run_1", "ses_1").await.unwrap();
        assert!(matches!(store.insert_run("run_2", "ses_1").await, Err(StoreError::RunActive { .. })));
        store.run_completed("run_1", "cancelled").await.unwrap();
        let runs = store.runs_of_session("ses_1").await.unwrap();
        assert_eq!((runs[0].state.as_str(), runs[0].stop_reason.as_deref()), ("cancelled", Some("cancelled")));
        store.insert_run("run_2", "ses_1").await.unwrap();
        assert!(matches!(store.run_failed("run_1", "late").await, Err(StoreError::Illegal(_))));
    }
}
