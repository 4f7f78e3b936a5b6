-- Runs show their workflow: queued, dispatching, streaming, then completed,
-- cancelled or failed (was: running until the end). A run that was running
-- had been handed to its node. One active run per session, as before. Kept
-- equal to migrations/postgres/0010_run_states.sql.

UPDATE runs SET state = 'streaming' WHERE state = 'running';
DROP INDEX runs_one_active;
CREATE UNIQUE INDEX runs_one_active ON runs(session_id) WHERE state IN ('queued', 'dispatching', 'streaming');
