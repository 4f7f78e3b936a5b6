-- Containers made on their own (POST /v1/containers) hold at most
-- `capacity` sessions (NULL: no limit); containers and sessions carry
-- labels (a JSON object of strings) that listings filter on; listings page
-- by (created_at, id). Kept equal to migrations/sqlite/0013_labels_capacity.sql.

ALTER TABLE containers ADD COLUMN capacity BIGINT;
ALTER TABLE containers ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE sessions ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
CREATE INDEX containers_by_age ON containers(created_at, id);
CREATE INDEX sessions_by_age ON sessions(created_at, id);
