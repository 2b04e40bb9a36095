//! The writes every run makes, on SQLite's writer thread (`sqlite_writer`): its
//! submission, its answer and its status changes. Each is one job in the writer's next
//! batch, committed with the other runs' writes and events of that batch.
//!
//! The SQL and a submission's decisions are `run_sql`'s, which `shared` runs through sqlx
//! on PostgreSQL (and on SQLite for nothing else); the unit tests here hold the two to the
//! same results.

use rusqlite::{params, Connection};

use crate::columns::decode_run;
use crate::ids::{RunId, UserId};
use crate::records::{
    MessageRecord, RunRecord, RunSubmission, StoreResult, SubmitOutcome, ThreadRecord,
};
use crate::run_sql::{
    run_messages_pattern, status_times, submitted, supersede_sql, QueuedRun, SubmitCheck,
    DELETE_RUN_MESSAGES, INSERT_MESSAGE, INSERT_QUEUED_RUN, INSERT_THREAD, SET_RUN_STATUS,
    UNFINISHED_RUNS,
};
use crate::sqlite_reads::SqliteColumns;
use crate::sqlite_writer::{Change, SqliteWriter};
use apex_protocol::threads::{MultitaskStrategy, RunStatus};

/// A [`RunSubmission`] owned, to travel to the writer thread.
pub(crate) struct OwnedSubmission {
    message: MessageRecord,
    run: RunRecord,
    request_id: String,
    max_unfinished: usize,
    claim_by: Option<String>,
    new_thread: Option<ThreadRecord>,
    strategy: MultitaskStrategy,
    require_approval: Option<bool>,
}

impl From<&RunSubmission<'_>> for OwnedSubmission {
    fn from(submission: &RunSubmission<'_>) -> Self {
        Self {
            message: submission.message.clone(),
            run: submission.run.clone(),
            request_id: submission.request_id.to_owned(),
            max_unfinished: submission.max_unfinished,
            claim_by: submission.claim_by.map(str::to_owned),
            new_thread: submission.new_thread.cloned(),
            strategy: submission.strategy,
            require_approval: submission.require_approval,
        }
    }
}

impl SqliteWriter {
    /// Appends `message` to a thread of `owner`; `false` if the thread is not theirs.
    pub(crate) async fn insert_message(
        &self,
        owner: UserId,
        message: MessageRecord,
    ) -> StoreResult<bool> {
        self.write(move |connection| Ok(Change::Keep(insert_message(connection, owner, &message)?)))
            .await
    }

    /// Sets the status of `owner`'s run `id` (see `Runs::set_run_status`).
    pub(crate) async fn set_run_status(
        &self,
        owner: UserId,
        id: RunId,
        status: RunStatus,
        error: Option<String>,
        now_ms: i64,
    ) -> StoreResult<()> {
        self.write(move |connection| {
            let (started, finished) = status_times(status, now_ms);
            connection.prepare_cached(SET_RUN_STATUS)?.execute(params![
                status.as_str(),
                error,
                started,
                finished,
                id.to_string(),
                owner.to_string()
            ])?;
            Ok(Change::Keep(()))
        })
        .await
    }

    /// Stores `submission` of `owner` as `Runs::submit_run` does: one user's submissions
    /// are serialised by the one writer, so its limit check sees every committed run.
    pub(crate) async fn submit_run(
        &self,
        owner: UserId,
        submission: OwnedSubmission,
    ) -> StoreResult<SubmitOutcome> {
        self.write(move |connection| submit(connection, owner, &submission))
            .await
    }
}

/// [`INSERT_MESSAGE`]: `false` when the thread is not `owner`'s.
fn insert_message(
    connection: &Connection,
    owner: UserId,
    message: &MessageRecord,
) -> StoreResult<bool> {
    let inserted = connection.prepare_cached(INSERT_MESSAGE)?.execute(params![
        message.id.to_string(),
        message.role,
        message.content,
        message.metadata.to_string(),
        message.created_at_ms,
        message.thread_id.to_string(),
        owner.to_string()
    ])?;
    Ok(inserted == 1)
}

/// The statements of a submission, in the order and with the decisions of `shared`'s
/// `submit_run`; a refusal undoes what came before it.
fn submit(
    connection: &Connection,
    owner: UserId,
    submission: &OwnedSubmission,
) -> StoreResult<Change<SubmitOutcome>> {
    let (message, run) = (&submission.message, &submission.run);
    // A new thread is created here, not before: a refused message undoes it.
    if let Some(thread) = &submission.new_thread {
        connection.prepare_cached(INSERT_THREAD)?.execute(params![
            thread.id.to_string(),
            owner.to_string(),
            thread.title,
            thread.metadata.to_string(),
            thread.created_at_ms,
            thread.updated_at_ms
        ])?;
    }
    if !insert_message(connection, owner, message)? {
        return Ok(Change::Undo(SubmitOutcome::ThreadNotFound));
    }
    let (unfinished, on_thread, waiting) = connection.prepare_cached(UNFINISHED_RUNS)?.query_row(
        params![run.thread_id.to_string(), owner.to_string()],
        |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, bool>(2)?,
            ))
        },
    )?;
    let check = SubmitCheck {
        unfinished,
        on_thread,
        waiting,
        strategy: submission.strategy,
    };
    if check.thread_busy() {
        return Ok(Change::Undo(SubmitOutcome::ThreadBusy));
    }
    let superseded = if check.supersedes() {
        let mut supersede = connection.prepare_cached(&supersede_sql())?;
        let mut rows = supersede.query(params![
            check.strategy.as_str(),
            run.thread_id.to_string(),
            owner.to_string()
        ])?;
        let mut superseded: Vec<RunRecord> = Vec::new();
        while let Some(row) = rows.next()? {
            superseded.push(decode_run(&SqliteColumns(row), 0)?);
        }
        superseded
    } else {
        Vec::new()
    };
    if check.too_many_runs(superseded.len(), submission.max_unfinished) {
        return Ok(Change::Undo(SubmitOutcome::TooManyRuns));
    }
    if check.deletes_superseded_messages() {
        let mut delete = connection.prepare_cached(DELETE_RUN_MESSAGES)?;
        for gone in &superseded {
            delete.execute(params![
                gone.thread_id.to_string(),
                owner.to_string(),
                run_messages_pattern(gone.id)
            ])?;
        }
    }
    let claim_by = check.claim_by(submission.claim_by.as_deref());
    let queued = QueuedRun::new(
        owner,
        run,
        message,
        &submission.request_id,
        claim_by,
        submission.require_approval,
    );
    let approval_required: i64 = connection.prepare_cached(INSERT_QUEUED_RUN)?.query_row(
        params![
            queued.id,
            queued.owner,
            queued.thread,
            queued.status,
            queued.created_at_ms,
            queued.input,
            queued.request_id,
            queued.instance,
            queued.heartbeat_at_ms,
            queued.attempts,
            queued.started_at_ms,
            queued.require_approval
        ],
        |row| row.get(0),
    )?;
    Ok(Change::Keep(submitted(
        claim_by.is_some(),
        approval_required,
        superseded,
    )))
}
