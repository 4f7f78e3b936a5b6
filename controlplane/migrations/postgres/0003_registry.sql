-- The agent registry: the entries of the last registry file or URL synced,
-- one row per agent. A sync replaces them all in one transaction.
CREATE TABLE registry_agents (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,
    description TEXT NOT NULL,
    -- The entry as the registry gave it (ACP registry or agentd shape).
    entry_json  TEXT NOT NULL,
    -- The file or URL it came from.
    source      TEXT NOT NULL,
    synced_at   BIGINT NOT NULL
);
