-- Containers (sandboxes), sessions on them, and runs (turns) of sessions.
-- Times are milliseconds since the Unix epoch. Kept column for column equal
-- to migrations/sqlite/0001_init.sql: the store reads both into the same rows.

CREATE TABLE containers (
    id             TEXT PRIMARY KEY,
    node_id        TEXT NOT NULL,
    state          TEXT NOT NULL,
    profile_json   TEXT NOT NULL,
    supervisor_pid BIGINT,
    error          TEXT,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

CREATE TABLE sessions (
    id                TEXT PRIMARY KEY,
    container_id      TEXT NOT NULL REFERENCES containers(id),
    agent_id          TEXT NOT NULL,
    agent_version     TEXT NOT NULL,
    agent_instance_id TEXT NOT NULL,
    acp_session_id    TEXT,
    state             TEXT NOT NULL,
    working_dir       TEXT NOT NULL,
    error             TEXT,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX sessions_by_container ON sessions(container_id);

CREATE TABLE runs (
    id           TEXT PRIMARY KEY,
    session_id   TEXT NOT NULL REFERENCES sessions(id),
    state        TEXT NOT NULL,
    stop_reason  TEXT,
    error        TEXT,
    created_at   BIGINT NOT NULL,
    completed_at BIGINT
);
CREATE INDEX runs_by_session ON runs(session_id, created_at);
-- At most one turn runs per session, whatever races the API sees: a second
-- concurrent insert waits for the first to commit, then fails with 23505.
CREATE UNIQUE INDEX runs_one_active ON runs(session_id) WHERE state = 'running';
