-- Idempotency keys of API requests (the `Idempotency-Key` header): a run
-- remembers the key its prompt came with, a session the key of its create,
-- each with a digest of the request, so that a client retrying a request
-- whose answer it never got (a timeout, a 503 after the write) gets the
-- first answer instead of a second run or session, and a key reused for a
-- different request is refused. Kept column for column equal to
-- migrations/postgres/0005_idempotency_keys.sql.

ALTER TABLE runs ADD COLUMN idempotency_key TEXT;
ALTER TABLE runs ADD COLUMN request_digest TEXT;
-- A key names one prompt of one session.
CREATE UNIQUE INDEX runs_by_idempotency_key ON runs(session_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

ALTER TABLE sessions ADD COLUMN idempotency_key TEXT;
ALTER TABLE sessions ADD COLUMN request_digest TEXT;
CREATE UNIQUE INDEX sessions_by_idempotency_key ON sessions(idempotency_key) WHERE idempotency_key IS NOT NULL;
