-- Approval of the action plan (`require_approval`, see the server's `run::approval`).
-- `approval_required`: the run pauses after its actions agent (1) or not (0); a message
-- that does not say takes the user's `require_approval` setting.
-- `approval`: set when the run pauses: the JSON of the request for approval (its id, the
-- proposed plan) and of everything the agents before the pause produced, so the run
-- continues after the answer, on any instance, without running them again.
-- `approval_expires_at`: unanswered by then, the run ends `timed_out`.
-- `approval_decision`: the user's answer (JSON), set once; a run that has one continues.
-- A run waiting for its answer has status `awaiting_approval`, no instance and no
-- heartbeat: it holds no execution slot anywhere, and it is unfinished (its thread's later
-- runs wait behind it, and double-texting treats it like a running run).
ALTER TABLE runs ADD COLUMN approval_required INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN approval TEXT;
ALTER TABLE runs ADD COLUMN approval_expires_at BIGINT;
ALTER TABLE runs ADD COLUMN approval_decision TEXT;
ALTER TABLE users ADD COLUMN require_approval INTEGER NOT NULL DEFAULT 0;
-- The expiry sweep.
CREATE INDEX runs_awaiting_approval ON runs(approval_expires_at) WHERE status = 'awaiting_approval';
-- A thread's unfinished runs now include the ones awaiting approval.
DROP INDEX runs_thread_unfinished;
CREATE INDEX runs_thread_unfinished ON runs(thread_id, thread_position) WHERE status IN ('queued', 'running', 'awaiting_approval');
