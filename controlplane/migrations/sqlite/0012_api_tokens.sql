-- Bearer tokens of the HTTP API. Only a token's SHA-256 is stored: the token
-- itself is shown once, when it is made. Scopes: read, write, admin. Times
-- are the database's clock, ms since the epoch. Kept equal to
-- migrations/postgres/0012_api_tokens.sql.

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL DEFAULT '',
    scope        TEXT NOT NULL,
    secret_hash  TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER
);

-- The token a call was made with (its id: never the token).
ALTER TABLE audit_records ADD COLUMN token_id TEXT;
