-- Nodes and their heartbeats: the control plane probes each node it
-- schedules onto and records when it last answered (the database's clock,
-- ms since the epoch). A node silent for longer than the heartbeat timeout
-- is `lost`, and what ran on it is failed with that reason. Kept column for
-- column equal to migrations/sqlite/0004_nodes.sql.

CREATE TABLE nodes (
    id                TEXT PRIMARY KEY,
    -- alive | lost
    state             TEXT NOT NULL,
    last_heartbeat_at BIGINT NOT NULL,
    error             TEXT,
    updated_at        BIGINT NOT NULL
);
CREATE INDEX containers_by_node ON containers(node_id, state);
