-- Audit records: one row per state-changing API call (every method but GET
-- and HEAD), whatever its outcome: who asked (the caller's declared actor and
-- its address), what (method, path, the entity the path names), when, and
-- how it ended (status, problem code). Pruned by age. Kept column for column
-- equal to migrations/sqlite/0006_audit.sql.

CREATE TABLE audit_records (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT,
    peer        TEXT,
    method      TEXT NOT NULL,
    path        TEXT NOT NULL,
    entity_kind TEXT,
    entity_id   TEXT,
    status      BIGINT NOT NULL,
    code        TEXT,
    duration_us BIGINT NOT NULL
);
CREATE INDEX audit_records_by_age ON audit_records(at);
CREATE INDEX audit_records_by_entity ON audit_records(entity_kind, entity_id, id);
