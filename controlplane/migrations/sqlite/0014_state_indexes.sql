-- The metrics' gauges count live containers and sessions by state at each
-- scrape: an index on state keeps that to the live rows, however many
-- deleted and closed ones history holds. Kept equal to
-- migrations/postgres/0014_state_indexes.sql.

CREATE INDEX containers_by_state ON containers(state);
CREATE INDEX sessions_by_state ON sessions(state);
