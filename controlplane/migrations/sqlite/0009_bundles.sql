-- Agent bundles each node was given: an archive (by URL and, when the
-- registry gave one, its sha256) that a sandbox on the node mounted. The
-- node keeps its own content-addressed cache; this is the control plane's
-- account of it, for listing and for a later cache GC. Kept column for
-- column equal to migrations/postgres/0009_bundles.sql.

CREATE TABLE bundles (
    node_id       TEXT NOT NULL,
    archive_url   TEXT NOT NULL,
    -- '' when the registry gave no digest (the node then hashes what it fetched)
    sha256        TEXT NOT NULL,
    uses          INTEGER NOT NULL,
    first_used_at INTEGER NOT NULL,
    last_used_at  INTEGER NOT NULL,
    PRIMARY KEY (node_id, archive_url, sha256)
);
