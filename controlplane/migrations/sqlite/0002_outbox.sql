-- The transactional outbox the workflow runner drains, and the history of
-- state transitions made through it. Times are milliseconds since the Unix
-- epoch, read from the database's clock. Kept column for column equal to
-- migrations/postgres/0002_outbox.sql.

CREATE TABLE outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Steps of one entity run one at a time, in id order.
    entity_kind      TEXT NOT NULL,
    entity_id        TEXT NOT NULL,
    -- The step: which handler runs it.
    kind             TEXT NOT NULL,
    payload          TEXT NOT NULL,
    -- Enqueueing a key twice is a no-op; handlers pass it on to the node.
    idempotency_key  TEXT NOT NULL UNIQUE,
    -- pending | leased | done | failed
    state            TEXT NOT NULL,
    -- Claims so far (an attempt counts when it starts).
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    -- Not claimable before this (retry backoff, delayed steps).
    available_at     INTEGER NOT NULL,
    lease_owner      TEXT,
    -- Bumped by every claim; a completion names the epoch it was claimed at.
    lease_epoch      INTEGER NOT NULL DEFAULT 0,
    lease_expires_at INTEGER,
    last_error       TEXT,
    result           TEXT,
    created_at       INTEGER NOT NULL,
    completed_at     INTEGER
);
-- The claim path: due pending rows, oldest first.
CREATE INDEX outbox_due ON outbox(available_at, id) WHERE state = 'pending';
-- Per-entity ordering: is an older step of this entity still open?
CREATE INDEX outbox_open_by_entity ON outbox(entity_kind, entity_id, id) WHERE state IN ('pending', 'leased');
-- The reaper: leases by expiry.
CREATE INDEX outbox_leases ON outbox(lease_expires_at) WHERE state = 'leased';
-- Pruning: finished rows by age.
CREATE INDEX outbox_done ON outbox(completed_at) WHERE state = 'done';

CREATE TABLE transitions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    entity_kind TEXT NOT NULL,
    entity_id   TEXT NOT NULL,
    from_state  TEXT NOT NULL,
    to_state    TEXT NOT NULL,
    at          INTEGER NOT NULL,
    reason      TEXT
);
CREATE INDEX transitions_by_entity ON transitions(entity_kind, entity_id, id);
CREATE INDEX transitions_by_age ON transitions(at);
