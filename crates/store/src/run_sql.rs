//! The SQL of the writes every run makes (its submission, its answer, its status), and the
//! decisions a submission takes between its statements: run through sqlx by `shared`
//! (both engines) and through `rusqlite` by SQLite's writer thread (`sqlite_run_writes`),
//! written once here so the two cannot drift apart.
//!
//! Also the macros for the statuses and the queue's order that `shared`'s other queries
//! use (loaded first by the crate root, so every module after it sees them).

use apex_protocol::threads::{MultitaskStrategy, RunStatus};

use crate::columns::RUN_COLUMNS;
use crate::ids::{RunId, UserId};
use crate::records::{MessageRecord, RunRecord, SubmitOutcome};

/// The statuses of an unfinished run: queued, executing, or parked for its user's approval
/// (which holds no instance but still holds its thread). The partial index
/// `runs_thread_unfinished` has the same list (migration 0009).
macro_rules! unfinished {
    () => {
        "('queued', 'running', 'awaiting_approval')"
    };
}

/// The condition (on the queued run `q`) that no earlier run of its thread is unfinished:
/// a thread's runs execute one at a time, in the order they were submitted
/// (`thread_position`, see migration 0007). A running (or parked) run of the thread always
/// holds the others back (whatever its position: a run from before the column existed has
/// none).
/// Part of the claim itself, so it holds across instances: a run is never claimed while
/// its predecessor is still queued or executing anywhere.
macro_rules! free_to_start {
    () => {
        concat!(
            "NOT EXISTS (SELECT 1 FROM runs e WHERE e.thread_id = q.thread_id AND e.id <> q.id \
             AND e.status IN ",
            unfinished!(),
            " AND (e.status <> 'queued' \
              OR COALESCE(e.thread_position, 0) < COALESCE(q.thread_position, 0)))"
        )
    };
}

/// Whether any run waits in the queue for an instance (the partial index `runs_queue`
/// answers it). A submission is not claimed at once while this holds, so it cannot
/// overtake the waiting runs.
macro_rules! runs_waiting {
    () => {
        concat!(
            "SELECT EXISTS (SELECT 1 FROM runs q WHERE q.status = 'queued' \
             AND q.instance_id IS NULL AND ",
            free_to_start!(),
            ")"
        )
    };
}

/// A user's unfinished runs, how many of them are on thread `$1` (user `$2`), and whether
/// runs wait in the queue (`runs_waiting!`): one statement where a submission asked two.
pub(crate) const UNFINISHED_RUNS: &str = concat!(
    "SELECT COUNT(*), \
            CAST(COALESCE(SUM(CASE WHEN thread_id = $1 THEN 1 ELSE 0 END), 0) AS BIGINT), \
            (",
    runs_waiting!(),
    ") FROM runs WHERE user_id = $2 AND status IN ",
    unfinished!()
);

/// A submitted run, queued or claimed, at the end of its thread's runs. Its place among
/// them: submissions of one user are serialised (and a thread has one user), so positions
/// are unique and in submission order. `$12` asks for approval of the plan; NULL takes the
/// user's setting.
pub(crate) const INSERT_QUEUED_RUN: &str =
    "INSERT INTO runs (id, user_id, thread_id, status, created_at, input, request_id, \
                       instance_id, heartbeat_at, attempts, started_at, thread_position, \
                       approval_required) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, \
             (SELECT COALESCE(MAX(thread_position), 0) + 1 FROM runs WHERE thread_id = $3), \
             COALESCE($12, (SELECT require_approval FROM users WHERE id = $2))) \
     RETURNING CAST(approval_required AS BIGINT)";

/// A new thread: binds its id, owner, title, metadata and times.
pub(crate) const INSERT_THREAD: &str =
    "INSERT INTO threads (id, user_id, title, metadata, created_at, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6)";

/// A message appended to a thread of its owner: binds the message's id, role, content,
/// metadata and time, then the thread and the owner; inserts nothing when the thread is
/// not the owner's. Its position keeps messages in insertion order even when two share a
/// millisecond. (On SQLite a trigger touches the thread; see
/// `Backend::touches_thread_on_insert`.)
pub(crate) const INSERT_MESSAGE: &str = "INSERT INTO messages \
         (id, thread_id, user_id, role, content, metadata, created_at, position) \
     SELECT $1, t.id, t.user_id, $2, $3, $4, $5, \
            (SELECT COALESCE(MAX(position), 0) + 1 FROM messages WHERE thread_id = t.id) \
     FROM threads t WHERE t.id = $6 AND t.user_id = $7";

/// A run's new status: binds the status, the error (kept if NULL), the start and end
/// times (each kept once set; see [`status_times`]), the run and the owner.
pub(crate) const SET_RUN_STATUS: &str =
    "UPDATE runs SET status = $1, error = COALESCE($2, error), \
     started_at = COALESCE(started_at, $3), finished_at = COALESCE($4, finished_at) \
     WHERE id = $5 AND user_id = $6";

/// The start and end times [`SET_RUN_STATUS`] binds for `status` set at `now_ms`.
pub(crate) fn status_times(status: RunStatus, now_ms: i64) -> (Option<i64>, Option<i64>) {
    match status {
        RunStatus::Running => (Some(now_ms), None),
        s if s.is_terminal() => (None, Some(now_ms)),
        _ => (None, None),
    }
}

/// Marks a thread's unfinished runs superseded by a new submission: binds the strategy,
/// the thread and the owner; returns the marked runs as [`RUN_COLUMNS`].
pub(crate) fn supersede_sql() -> String {
    format!(
        "UPDATE runs SET superseded = $1 \
         WHERE thread_id = $2 AND user_id = $3 AND status IN {} \
         RETURNING {RUN_COLUMNS}",
        unfinished!()
    )
}

/// Deletes a run's messages (its user message and any answer) from its thread: binds the
/// thread, the owner and [`run_messages_pattern`]. Messages name their run only in their
/// metadata (`{"run_id": ...}`, written by the server as compact JSON), so they are
/// matched there, among the thread's messages only.
pub(crate) const DELETE_RUN_MESSAGES: &str =
    "DELETE FROM messages WHERE thread_id = $1 AND user_id = $2 \
     AND metadata LIKE $3 ESCAPE '\\'";

/// The LIKE pattern of [`DELETE_RUN_MESSAGES`] for `run`. (`_` is a LIKE wildcard: escaped;
/// a run id is a UUID, with no wildcard in it.)
pub(crate) fn run_messages_pattern(run: RunId) -> String {
    format!("%\"run\\_id\":\"{run}\"%")
}

/// A submission's decisions, taken between its statements from what
/// [`UNFINISHED_RUNS`] answered: `unfinished` runs of the owner, `on_thread` of them on
/// the message's thread, and whether runs `waiting` in the queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SubmitCheck {
    pub(crate) unfinished: i64,
    pub(crate) on_thread: i64,
    pub(crate) waiting: bool,
    pub(crate) strategy: MultitaskStrategy,
}

impl SubmitCheck {
    /// The thread is busy and the strategy says refuse.
    pub(crate) fn thread_busy(self) -> bool {
        self.on_thread > 0 && self.strategy == MultitaskStrategy::Reject
    }

    /// The thread's unfinished runs are to be marked superseded (`supersede_sql`).
    /// Interrupt and rollback mark them in the submission's transaction: the ones the
    /// UPDATE returns are the ones still unfinished now, whatever finished meanwhile; a
    /// refusal after it rolls the mark back.
    pub(crate) fn supersedes(self) -> bool {
        self.on_thread > 0 && self.strategy.ends_previous()
    }

    /// The owner is at `max_unfinished` runs. Superseded runs are ending and do not count;
    /// queued ones (enqueue) do.
    pub(crate) fn too_many_runs(self, superseded: usize, max_unfinished: usize) -> bool {
        let counted = usize::try_from(self.unfinished)
            .unwrap_or(usize::MAX)
            .saturating_sub(superseded);
        counted >= max_unfinished
    }

    /// The superseded runs' messages leave the thread now (rollback); their runs, events
    /// and any answer go once they have ended (`settle_ended_run`).
    pub(crate) fn deletes_superseded_messages(self) -> bool {
        self.strategy == MultitaskStrategy::Rollback
    }

    /// The instance that claims the run at submission (as `claim_queued_runs` would leave
    /// it), if one asked and no runs are waiting (those go first) and the thread has no
    /// unfinished run (which the claim waits for).
    pub(crate) fn claim_by(self, asked: Option<&str>) -> Option<&str> {
        asked.filter(|_| self.on_thread == 0 && !self.waiting)
    }
}

/// The values [`INSERT_QUEUED_RUN`] binds, in its order.
pub(crate) struct QueuedRun<'a> {
    pub(crate) id: String,
    pub(crate) owner: String,
    pub(crate) thread: String,
    pub(crate) status: &'static str,
    pub(crate) created_at_ms: i64,
    pub(crate) input: &'a str,
    pub(crate) request_id: &'a str,
    pub(crate) instance: Option<&'a str>,
    pub(crate) heartbeat_at_ms: Option<i64>,
    pub(crate) attempts: i32,
    pub(crate) started_at_ms: Option<i64>,
    pub(crate) require_approval: Option<i32>,
}

impl<'a> QueuedRun<'a> {
    /// `run` of `owner`, its input `message`, claimed by `claim_by` if any.
    pub(crate) fn new(
        owner: UserId,
        run: &RunRecord,
        message: &'a MessageRecord,
        request_id: &'a str,
        claim_by: Option<&'a str>,
        require_approval: Option<bool>,
    ) -> Self {
        let claimed = claim_by.is_some();
        Self {
            id: run.id.to_string(),
            owner: owner.to_string(),
            thread: run.thread_id.to_string(),
            status: if claimed { "running" } else { "queued" },
            created_at_ms: run.created_at_ms,
            input: &message.content,
            request_id,
            instance: claim_by,
            heartbeat_at_ms: claimed.then_some(run.created_at_ms),
            attempts: i32::from(claimed),
            started_at_ms: claimed.then_some(run.created_at_ms),
            require_approval: require_approval.map(i32::from),
        }
    }
}

/// What a stored submission answers: claimed (with whether its plan awaits approval, as
/// [`INSERT_QUEUED_RUN`] returned), superseding runs, or queued.
pub(crate) fn submitted(
    claimed: bool,
    approval_required: i64,
    superseded: Vec<RunRecord>,
) -> SubmitOutcome {
    if claimed {
        SubmitOutcome::Claimed {
            approval_required: approval_required != 0,
        }
    } else if !superseded.is_empty() {
        SubmitOutcome::Superseding(superseded)
    } else {
        SubmitOutcome::Queued
    }
}
