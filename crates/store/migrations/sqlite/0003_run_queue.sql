-- The run queue (see src/queue.rs): a message creates its run `queued` with no instance;
-- an instance with room claims it (status `running`, `instance_id` set, `attempts` + 1)
-- and executes it. `input` and `request_id` are what a claiming instance needs to build
-- the run; `heartbeat_at` is refreshed by the executing instance for every run it still
-- runs, so a survivor can tell a run whose instance died and queue it again (or end it
-- `interrupted` once `attempts` reaches the configured maximum).
-- NULL `input`: a run from before this migration; it can be ended but not re-run.
ALTER TABLE runs ADD COLUMN input TEXT;
ALTER TABLE runs ADD COLUMN request_id TEXT;
ALTER TABLE runs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN heartbeat_at BIGINT;
-- Claiming takes the oldest unclaimed runs first.
CREATE INDEX runs_queue ON runs(created_at, id) WHERE status = 'queued' AND instance_id IS NULL;
-- The sweeper looks for claimed, unfinished runs with a stale heartbeat.
CREATE INDEX runs_claimed ON runs(heartbeat_at) WHERE status IN ('queued', 'running') AND instance_id IS NOT NULL;
