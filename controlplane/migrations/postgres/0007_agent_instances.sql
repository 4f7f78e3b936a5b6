-- Agent instances: each agent process line a supervisor runs (restarts keep
-- the instance), as the control plane last observed it: when it started,
-- and at each node check. Sessions name theirs (sessions.agent_instance_id).
-- States: see store/states.rs (agent_instance). Kept column for column
-- equal to migrations/sqlite/0007_agent_instances.sql.

CREATE TABLE agent_instances (
    id            TEXT PRIMARY KEY,
    container_id  TEXT NOT NULL REFERENCES containers(id),
    agent_id      TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    state         TEXT NOT NULL,
    restarts      BIGINT NOT NULL DEFAULT 0,
    -- pid inside the sandbox's pid namespace, while it runs
    pid           BIGINT,
    error         TEXT,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX agent_instances_by_container ON agent_instances(container_id);
