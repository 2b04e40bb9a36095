//! Submitting, stopping and ending runs, and the registry of the runs executing here.
//!
//! [`start_run`] stores the user's message and queues the run answering it, in one
//! transaction that also enforces the user's limits (concurrent runs, one run per thread)
//! in the database, so they hold across instances. If this instance has room (a
//! [`RunReservation`] in [`ActiveRuns`]) and no run waits in the queue, the same
//! transaction claims the run and it starts at once; otherwise it wakes this instance's
//! dispatcher ([`crate::queue`]), which claims it when it can. Either way the run executes
//! detached from the socket or request that asked for it: closing the socket does not stop
//! it.
//! [`ActiveRuns`] maps a run executing in this process to its owner and cancellation token
//! so that `stop_agent` from any of the owner's connections reaches it, and no one else's
//! does. A stop for a run still waiting in the queue ends it in the database; one for a
//! run executing on another instance is checked against the store (the run must be the
//! caller's and unfinished) and sent over the bus, and the executing instance cancels it
//! through its own `ActiveRuns`, which checks the owner again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use apex_protocol::error::agent_codes;
use apex_protocol::events::{EventBody, SUPERVISOR};
use apex_protocol::threads::RunStatus;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::auth::AuthenticatedUser;
use crate::clock::now_ms;
use crate::context::UserExecutionContext;
use crate::events::UserEmitter;
use crate::ids::{MessageId, RequestId, RunId, ThreadId, UserId};
use crate::state::AppState;
use crate::store::{
    MessageRecord, QueueEntry, RunRecord, RunSubmission, Store, StoreError, SubmitOutcome,
    UserStore,
};

struct ActiveRun {
    owner: UserId,
    thread: ThreadId,
    cancel: CancellationToken,
    /// Start order, to find a user's most recent run.
    started: u64,
    /// The run has decided its outcome and is only writing its last events: it no longer
    /// counts against limits and can no longer be stopped.
    finishing: bool,
}

#[derive(Default)]
pub struct ActiveRuns {
    inner: Mutex<Registry>,
    /// Signalled whenever a run leaves, so a dispatcher at capacity can claim again.
    pub(crate) freed: tokio::sync::Notify,
}

#[derive(Default)]
struct Registry {
    /// A start counter, for "most recent".
    started: u64,
    /// The runs executing in this process.
    runs: HashMap<RunId, ActiveRun>,
    /// Places held by [`RunReservation`]s: runs being submitted that this instance will
    /// start itself. Counted in [`ActiveRuns::len`] so that concurrent submissions and the
    /// dispatcher together never start more than the instance's limit.
    reserved: usize,
}

/// Answer to a stop request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// Cancellation was requested; the run ends with `status: cancelled`.
    Stopping,
    /// The run exists but already ended with this status.
    AlreadyFinished(RunStatus),
    /// No run of this user has that id.
    NotFound,
}

impl ActiveRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds a place for a run this process is about to submit and start itself, if
    /// fewer than `limit` runs execute (or are reserved) here.
    pub fn try_reserve(self: &Arc<Self>, limit: usize) -> Option<RunReservation> {
        let mut guard = self.lock();
        if guard.runs.len() + guard.reserved >= limit {
            return None;
        }
        guard.reserved += 1;
        Some(RunReservation {
            runs: Arc::clone(self),
        })
    }

    /// Registers a run this process is about to execute. The returned slot removes it
    /// when dropped (when the run's task ends, even by panic).
    pub fn register(
        self: &Arc<Self>,
        run: RunId,
        owner: UserId,
        thread: ThreadId,
        cancel: CancellationToken,
    ) -> RunSlot {
        let mut guard = self.lock();
        guard.started += 1;
        let started = guard.started;
        guard.runs.insert(
            run,
            ActiveRun {
                owner,
                thread,
                cancel,
                started,
                finishing: false,
            },
        );
        RunSlot {
            runs: Arc::clone(self),
            run,
        }
    }

    /// The runs executing here, for their heartbeats.
    pub fn ids(&self) -> Vec<RunId> {
        self.lock().runs.keys().copied().collect()
    }

    /// Cancels every running run of `owner` on `thread` (before the thread is deleted).
    pub fn cancel_thread(&self, owner: UserId, thread: ThreadId) -> usize {
        let guard = self.lock();
        let mut cancelled = 0;
        for run in guard
            .runs
            .values()
            .filter(|r| r.owner == owner && r.thread == thread && !r.finishing)
        {
            run.cancel.cancel();
            cancelled += 1;
        }
        cancelled
    }

    fn mark_finishing(&self, run: RunId) {
        if let Some(active) = self.lock().runs.get_mut(&run) {
            active.finishing = true;
        }
    }

    fn remove(&self, run: RunId) {
        self.lock().runs.remove(&run);
        // A slot is free: a dispatcher waiting for room may claim again.
        self.freed.notify_one();
    }

    /// Cancels `run` if it is running and belongs to `owner`.
    pub fn cancel(&self, owner: UserId, run: RunId) -> bool {
        match self.lock().runs.get(&run) {
            Some(active) if active.owner == owner && !active.finishing => {
                active.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// The owner's most recently started run that is still executing.
    pub fn latest_for(&self, owner: UserId) -> Option<RunId> {
        self.lock()
            .runs
            .iter()
            .filter(|(_, r)| r.owner == owner && !r.finishing)
            .max_by_key(|(_, r)| r.started)
            .map(|(id, _)| *id)
    }

    pub fn is_active(&self, owner: UserId, run: RunId) -> bool {
        self.lock()
            .runs
            .get(&run)
            .is_some_and(|r| r.owner == owner && !r.finishing)
    }

    /// Runs whose task has not ended yet (finishing ones included), and places reserved
    /// for runs being submitted here.
    pub fn len(&self) -> usize {
        let guard = self.lock();
        guard.runs.len() + guard.reserved
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A run's registration in [`ActiveRuns`]. The supervisor marks the run finishing once
/// its outcome is stored (it can no longer be stopped, and is no longer "the latest
/// active run"); the entry itself goes when the task ends, even by panic.
pub struct RunSlot {
    runs: Arc<ActiveRuns>,
    run: RunId,
}

impl RunSlot {
    /// The run's outcome is stored: it can no longer be stopped and is no longer the
    /// owner's latest active run. (Its limits were counted in the database, where the
    /// stored outcome already released them.)
    pub fn mark_finishing(&self) {
        self.runs.mark_finishing(self.run);
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.runs.remove(self.run);
    }
}

/// A place held in [`ActiveRuns`] for a run being submitted. Given back when dropped:
/// after the run is registered (its slot then holds the place), or when the submission
/// failed.
pub struct RunReservation {
    runs: Arc<ActiveRuns>,
}

impl Drop for RunReservation {
    fn drop(&mut self) {
        self.runs.lock().reserved -= 1;
        self.runs.freed.notify_one();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartRunError {
    #[error("thread not found")]
    ThreadNotFound,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("too many runs at once")]
    TooManyRuns,
    #[error("the thread already has a run in progress")]
    ThreadBusy,
    #[error("rate limited")]
    RateLimited(std::time::Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone)]
pub struct StartedRun {
    pub run_id: RunId,
    pub thread_id: ThreadId,
    pub message_id: MessageId,
}

/// Stores `text` as the user's message in `thread` (which must be theirs) and starts a run,
/// within the user's limits: message rate, concurrent runs, one run per thread.
pub async fn start_run(
    state: &AppState,
    user: &AuthenticatedUser,
    thread: ThreadId,
    text: String,
    request_id: RequestId,
) -> Result<StartedRun, StartRunError> {
    if state.infra.lifecycle.draining.is_cancelled() {
        return Err(StartRunError::ShuttingDown);
    }
    let store = UserStore::for_user(Arc::clone(&state.infra.store), user);
    // Unknown or foreign threads are answered before limits are spent on them.
    if store.get_thread(thread).await?.is_none() {
        return Err(StartRunError::ThreadNotFound);
    }
    check_message_rate(state, user).await?;

    let run_id = RunId::generate();
    let now = now_ms();
    let message = MessageRecord {
        id: MessageId::generate(),
        thread_id: thread,
        role: "user".into(),
        content: text,
        metadata: json!({ "run_id": run_id.to_string() }),
        created_at_ms: now,
    };
    let run = RunRecord {
        id: run_id,
        thread_id: thread,
        status: RunStatus::Queued,
        created_at_ms: now,
        started_at_ms: None,
        finished_at_ms: None,
        error: None,
        last_seq: 0,
    };
    let request = request_id.to_string();
    // With room here, the run is claimed in the submitting transaction and started at once;
    // otherwise it waits in the queue for this or another instance's dispatcher.
    let reservation = state.runs.try_reserve(state.settings.max_runs_per_instance);
    let submission = RunSubmission {
        message: &message,
        run: &run,
        request_id: &request,
        max_unfinished: state.limits.settings.max_concurrent_runs_per_user,
        claim_by: reservation
            .as_ref()
            .map(|_| state.infra.instance_id.as_str()),
    };
    let claimed = match store.submit_run(&submission).await? {
        SubmitOutcome::Queued => false,
        SubmitOutcome::Claimed => true,
        SubmitOutcome::ThreadNotFound => return Err(StartRunError::ThreadNotFound),
        SubmitOutcome::ThreadBusy => {
            crate::telemetry::limit_rejected("thread_busy");
            return Err(StartRunError::ThreadBusy);
        }
        SubmitOutcome::TooManyRuns => {
            crate::telemetry::limit_rejected("too_many_runs");
            return Err(StartRunError::TooManyRuns);
        }
    };
    crate::telemetry::run_queued();
    match reservation.filter(|_| claimed) {
        Some(reservation) => {
            let entry = QueueEntry {
                owner: user.user_id(),
                run: RunRecord {
                    status: RunStatus::Running,
                    started_at_ms: Some(now),
                    ..run
                },
                input: Some(message.content.clone()),
                request_id: Some(request),
                attempts: 1,
                instance: Some(state.infra.instance_id.clone()),
            };
            crate::queue::start(state, entry, Some(reservation)).await;
        }
        None => state.queue.submitted(),
    }
    Ok(StartedRun {
        run_id,
        thread_id: thread,
        message_id: message.id,
    })
}

/// Spends one of `user`'s message-rate tokens (every message counts, whether it starts a
/// run or asks the model directly); counts a refusal in the metrics.
pub async fn check_message_rate(
    state: &AppState,
    user: &AuthenticatedUser,
) -> Result<(), StartRunError> {
    state
        .limits
        .check_message(user.user_id())
        .await
        .map_err(|wait| {
            crate::telemetry::limit_rejected("rate_limited");
            StartRunError::RateLimited(wait)
        })
}

/// The user's queued or running runs on every instance, newest first.
pub async fn unfinished_runs_of(store: &UserStore) -> Result<Vec<RunRecord>, StoreError> {
    // `finished_since` in the future: only unfinished runs qualify.
    store.recent_runs(i64::MAX, 1000).await
}

/// Stops a run of `user`: the run itself, or — without an id — their latest active run.
pub async fn stop_run(
    state: &AppState,
    user: &AuthenticatedUser,
    run: RunId,
) -> Result<StopOutcome, StoreError> {
    if state.runs.cancel(user.user_id(), run) {
        return Ok(StopOutcome::Stopping);
    }
    let store = UserStore::for_user(Arc::clone(&state.infra.store), user);
    Ok(match store.get_run(run).await? {
        None => StopOutcome::NotFound,
        Some(record) if record.status.is_terminal() => StopOutcome::AlreadyFinished(record.status),
        // Still waiting in the queue: end it there, unless an instance claims it first.
        Some(record)
            if record.status == RunStatus::Queued
                && end_unclaimed_run(state, user.user_id(), &record).await? =>
        {
            StopOutcome::Stopping
        }
        // Claimed by this process since the first look.
        Some(_) if state.runs.cancel(user.user_id(), run) => StopOutcome::Stopping,
        // The caller's run, unfinished, and not executing here: it runs on another
        // instance (which cancels it when it gets this request), or it is finishing.
        Some(_) => {
            if !state.infra.bus.request_stop(user.user_id(), run)
                && state.settings.bus_url.is_some()
            {
                tracing::warn!(run_id = %run, "the stop request could not be sent to the other instances");
            }
            StopOutcome::Stopping
        }
    })
}

/// Stops a run that is still queued and unclaimed: status `cancelled`, then its error
/// and terminal events, as if the supervisor had stopped it. `false` if an instance
/// claimed it (or it finished) in the meantime.
async fn end_unclaimed_run(
    state: &AppState,
    owner: UserId,
    run: &RunRecord,
) -> Result<bool, StoreError> {
    let message = "the run was stopped";
    let store = &state.infra.store;
    let error = format!("{}: {message}", agent_codes::CANCELLED);
    if !store
        .finish_unclaimed_run(owner, run.id, RunStatus::Cancelled, &error, now_ms())
        .await?
    {
        return Ok(false);
    }
    let ctx = UserExecutionContext::for_recovery(owner, run.thread_id, run.id);
    let emitter = UserEmitter::resuming(
        &ctx,
        Arc::clone(store),
        Arc::clone(&state.infra.bus),
        run.last_seq,
    );
    close_log(
        &emitter,
        RunStatus::Cancelled,
        agent_codes::CANCELLED,
        message,
    )
    .await?;
    Ok(true)
}

/// Writes the last two events of a run that ended without its supervisor: an `error`
/// event and the terminal event with `status`.
async fn close_log(
    emitter: &UserEmitter,
    status: RunStatus,
    code: &str,
    message: &str,
) -> Result<(), StoreError> {
    let _ = emitter
        .emit(
            SUPERVISOR,
            EventBody::RunError {
                error_code: code.into(),
                error_message: message.into(),
            },
        )
        .await;
    emitter
        .emit_terminal(
            SUPERVISOR,
            EventBody::RunFinished {
                status,
                final_response: String::new(),
                result: serde_json::Value::Null,
                execution_time_ms: 0,
                error: Some(message.into()),
            },
        )
        .await
        .map_err(|e| match e {
            crate::events::EmitError::Storage(s) => s,
            other => StoreError::Corrupt(other.to_string()),
        })?;
    Ok(())
}

/// Ends a run whose executing process is gone: an `error` event, status `interrupted`,
/// and the terminal event, through the normal emitter (persisted, then published), with
/// seqs continuing the stored log.
pub async fn interrupt_run(
    store: &Arc<dyn Store>,
    bus: &Arc<dyn crate::events::EventBus>,
    owner: UserId,
    run: &RunRecord,
) -> Result<(), StoreError> {
    let ctx = UserExecutionContext::for_recovery(owner, run.thread_id, run.id);
    let emitter = UserEmitter::resuming(&ctx, Arc::clone(store), Arc::clone(bus), run.last_seq);
    let user_store = UserStore::for_context(Arc::clone(store), &ctx);
    let message = "the server stopped during the run";
    user_store
        .set_run_status(
            run.id,
            RunStatus::Interrupted,
            Some(&format!("{}: {message}", agent_codes::INTERRUPTED)),
            now_ms(),
        )
        .await?;
    close_log(
        &emitter,
        RunStatus::Interrupted,
        agent_codes::INTERRUPTED,
        message,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reservations and registered runs share the instance's limit, and a reservation gives
    /// its place back when dropped (whether its run was registered or not).
    #[test]
    fn reservations_count_against_the_instance_limit() {
        let runs = Arc::new(ActiveRuns::default());
        let first = runs.try_reserve(2).expect("room for one");
        let slot = runs.register(
            RunId::generate(),
            UserId::generate(),
            ThreadId::generate(),
            CancellationToken::new(),
        );
        drop(first);
        assert_eq!(runs.len(), 1, "the slot now holds the reserved place");
        let second = runs.try_reserve(2).expect("room for a second");
        assert_eq!(runs.len(), 2);
        assert!(
            runs.try_reserve(2).is_none(),
            "full: one run and one reservation"
        );
        drop(second);
        assert_eq!(runs.len(), 1);
        drop(slot);
        assert!(runs.is_empty());
        assert!(runs.try_reserve(1).is_some());
    }
}
