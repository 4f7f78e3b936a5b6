-- Runs show their workflow: queued (the dispatch waits for a runner),
-- dispatching (handed to the node), streaming (the node took it: events
-- flow; `started_at`), then completed, cancelled or failed (was: running
-- until the end); `updated_at` is the last change. A run that was running
-- had been handed to its node. One active run per session, as before. Kept
-- equal to migrations/postgres/0010_run_states.sql.

ALTER TABLE runs ADD COLUMN started_at INTEGER;
ALTER TABLE runs ADD COLUMN updated_at INTEGER;
UPDATE runs SET updated_at = COALESCE(completed_at, created_at);
UPDATE runs SET state = 'streaming', started_at = created_at WHERE state = 'running';
DROP INDEX runs_one_active;
CREATE UNIQUE INDEX runs_one_active ON runs(session_id) WHERE state IN ('queued', 'dispatching', 'streaming');
