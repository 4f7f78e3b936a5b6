-- The fleet: nodes on other machines (their address, labels, capacity, the
-- certificate they joined with, an administrative state beside liveness),
-- the cluster CA and single-use join tokens (hashed), capacity reserved by
-- each container, the journal cursor of each node's watcher, and stable
-- error codes on what fails. Kept column for column equal to
-- migrations/sqlite/0011_fleet.sql.

-- "unix:/path" for a node on this host, "host:port" for one over mTLS.
ALTER TABLE nodes ADD COLUMN address TEXT NOT NULL DEFAULT '';
-- A JSON object of string labels.
ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE nodes ADD COLUMN version TEXT NOT NULL DEFAULT '';
-- What the node reported at its last probe (measured, or its flags).
ALTER TABLE nodes ADD COLUMN capacity_slots BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN capacity_memory BIGINT NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN capacity_cpus DOUBLE PRECISION NOT NULL DEFAULT 0;
-- Live usage at the last probe, JSON.
ALTER TABLE nodes ADD COLUMN usage TEXT NOT NULL DEFAULT '{}';
-- active | cordoned | draining | drained; liveness stays in state.
ALTER TABLE nodes ADD COLUMN admin TEXT NOT NULL DEFAULT 'active';
ALTER TABLE nodes ADD COLUMN drain_deadline BIGINT;
ALTER TABLE nodes ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0;
-- SHA-256 of the certificate issued at join; empty for a unix-socket node.
ALTER TABLE nodes ADD COLUMN cert_fingerprint TEXT NOT NULL DEFAULT '';
-- The control plane recording this node's journal, until when, and how far.
ALTER TABLE nodes ADD COLUMN watcher TEXT;
ALTER TABLE nodes ADD COLUMN watcher_until BIGINT;
ALTER TABLE nodes ADD COLUMN journal_id TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN journal_seq BIGINT NOT NULL DEFAULT 0;

CREATE TABLE cluster_ca (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    cert_pem   TEXT NOT NULL,
    key_pem    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- The secret is never stored: only its SHA-256.
CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY,
    secret_hash TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    node_id     TEXT
);

ALTER TABLE containers ADD COLUMN reserved_memory BIGINT NOT NULL DEFAULT 0;
ALTER TABLE containers ADD COLUMN reserved_cpus DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE containers ADD COLUMN error_code TEXT;
ALTER TABLE sessions ADD COLUMN error_code TEXT;
ALTER TABLE runs ADD COLUMN error_code TEXT;
