-- Usage imports are written in chunks of rows, one transaction each, so that a large
-- upload never holds the writer for long. Every row of an import carries its id, and
-- the import is listed in `usage_imports` while it is in progress: a failed import's
-- rows are deleted by that id, and an import a crash left half-written is found there
-- and removed (see `Usage::import_usage` and `Usage::sweep_abandoned_imports`).
ALTER TABLE workload_events ADD COLUMN import_id TEXT COLLATE "C";
CREATE INDEX workload_events_import ON workload_events(import_id) WHERE import_id IS NOT NULL;

CREATE TABLE usage_imports (
    id         TEXT COLLATE "C" PRIMARY KEY,
    user_id    TEXT COLLATE "C" NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    started_at BIGINT NOT NULL
);
CREATE INDEX usage_imports_started ON usage_imports(started_at);
