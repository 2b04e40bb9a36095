-- Double-texting (`multitask_strategy`): a thread may hold several unfinished runs, which
-- execute one at a time in `thread_position` order (1, 2, ... per thread, given by the
-- submitting transaction, which is serialised per user): the claim skips a queued run
-- while an earlier run of its thread is unfinished. NULL: a run from before this
-- migration, ordered first.
-- `superseded`: a newer message asked to end this run (`interrupt` or `rollback`); the
-- supervisor reads it to end the stopped run `interrupted`, and a `rollback` run is
-- deleted (message, events, row) once its terminal event is out.
ALTER TABLE runs ADD COLUMN thread_position BIGINT;
ALTER TABLE runs ADD COLUMN superseded TEXT;
-- The claim's and the submission's look at a thread's unfinished runs.
CREATE INDEX runs_thread_unfinished ON runs(thread_id, thread_position) WHERE status IN ('queued', 'running');
