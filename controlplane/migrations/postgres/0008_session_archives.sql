-- Session archives: a closed session's event log, copied from its node
-- before the session or its sandbox goes, so that its events outlive the
-- sandbox (GET /v1/sessions/{id}/events serves them). One JSON object per
-- line: {"seq", "kind", "run_id", "ts_ms", "data"}. Kept column for column
-- equal to migrations/sqlite/0008_session_archives.sql.

CREATE TABLE session_archives (
    session_id  TEXT PRIMARY KEY REFERENCES sessions(id),
    events      TEXT NOT NULL,
    event_count BIGINT NOT NULL,
    last_seq    BIGINT NOT NULL,
    -- Events before this seq were dropped to keep the archive under its cap.
    first_seq   BIGINT NOT NULL,
    archived_at BIGINT NOT NULL
);
