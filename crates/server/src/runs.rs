//! Starting and stopping runs.
//!
//! [`start_run`] stores the user's message, creates the run, builds a fresh
//! `AgentInstanceFactory` from a new context and spawns the run on its own task, detached
//! from the socket or request that asked for it: closing the socket does not stop it.
//! [`ActiveRuns`] maps a running run to its owner and cancellation token so that
//! `stop_agent` from any of the owner's connections reaches it, and no one else's does.
//! With several instances, a stop for a run executing elsewhere is checked against the
//! store (the run must be the caller's and unfinished) and then sent over the bus; the
//! executing instance cancels it through its own `ActiveRuns`, which checks the owner
//! again. The per-user concurrent-run limit then counts the user's unfinished runs in the
//! database, so it holds across instances.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use apex_protocol::error::agent_codes;
use apex_protocol::events::{EventBody, SUPERVISOR};
use apex_protocol::threads::RunStatus;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::agents::{supervisor, AgentInstanceFactory};
use crate::auth::AuthenticatedUser;
use crate::clock::now_ms;
use crate::context::UserExecutionContext;
use crate::events::UserEmitter;
use crate::ids::{MessageId, RequestId, RunId, ThreadId, UserId};
use crate::state::AppState;
use crate::store::{MessageRecord, RunRecord, Store, StoreError, UserStore};

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
    inner: Mutex<(u64, HashMap<RunId, ActiveRun>)>,
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

/// Why a run could not be reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveError {
    TooManyRuns,
    ThreadBusy,
}

impl ActiveRuns {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<RunId, ActiveRun>)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the owner's limits and registers the run, atomically: two messages arriving
    /// together cannot both take the last slot.
    fn try_reserve(
        &self,
        run: RunId,
        owner: UserId,
        thread: ThreadId,
        cancel: CancellationToken,
        max_per_user: usize,
    ) -> Result<(), ReserveError> {
        let mut guard = self.lock();
        let mine = guard
            .1
            .values()
            .filter(|r| r.owner == owner && !r.finishing);
        let mut running = 0;
        for existing in mine {
            if existing.thread == thread {
                return Err(ReserveError::ThreadBusy);
            }
            running += 1;
        }
        if running >= max_per_user {
            return Err(ReserveError::TooManyRuns);
        }
        guard.0 += 1;
        let started = guard.0;
        guard.1.insert(
            run,
            ActiveRun {
                owner,
                thread,
                cancel,
                started,
                finishing: false,
            },
        );
        Ok(())
    }

    /// Cancels every running run of `owner` on `thread` (before the thread is deleted).
    pub fn cancel_thread(&self, owner: UserId, thread: ThreadId) -> usize {
        let guard = self.lock();
        let mut cancelled = 0;
        for run in guard
            .1
            .values()
            .filter(|r| r.owner == owner && r.thread == thread && !r.finishing)
        {
            run.cancel.cancel();
            cancelled += 1;
        }
        cancelled
    }

    fn mark_finishing(&self, run: RunId) {
        if let Some(active) = self.lock().1.get_mut(&run) {
            active.finishing = true;
        }
    }

    fn remove(&self, run: RunId) {
        self.lock().1.remove(&run);
    }

    /// Cancels `run` if it is running and belongs to `owner`.
    pub fn cancel(&self, owner: UserId, run: RunId) -> bool {
        match self.lock().1.get(&run) {
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
            .1
            .iter()
            .filter(|(_, r)| r.owner == owner && !r.finishing)
            .max_by_key(|(_, r)| r.started)
            .map(|(id, _)| *id)
    }

    pub fn is_active(&self, owner: UserId, run: RunId) -> bool {
        self.lock()
            .1
            .get(&run)
            .is_some_and(|r| r.owner == owner && !r.finishing)
    }

    /// Runs whose task has not ended yet (finishing ones included).
    pub fn len(&self) -> usize {
        self.lock().1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A run's registration in [`ActiveRuns`]. The supervisor releases the run's limits
/// before its terminal event goes out (so a client that sees the end can start the next
/// run on the same thread at once); the entry itself goes when the task ends, even by panic.
pub struct RunSlot {
    runs: Arc<ActiveRuns>,
    run: RunId,
}

impl RunSlot {
    pub fn release_limits(&self) {
        self.runs.mark_finishing(self.run);
    }
}

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.runs.remove(self.run);
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
    state
        .limits
        .check_message(user.user_id())
        .await
        .map_err(|wait| {
            crate::telemetry::limit_rejected("rate_limited");
            StartRunError::RateLimited(wait)
        })?;

    let run_id = RunId::generate();
    let ctx = UserExecutionContext::new(
        user,
        thread,
        run_id,
        request_id,
        state.settings.run_timeout,
        state.settings.agent_timeout,
    );
    state
        .runs
        .try_reserve(
            run_id,
            user.user_id(),
            thread,
            ctx.cancellation().clone(),
            state.limits.settings.max_concurrent_runs_per_user,
        )
        .map_err(|e| match e {
            ReserveError::TooManyRuns => {
                crate::telemetry::limit_rejected("too_many_runs");
                StartRunError::TooManyRuns
            }
            ReserveError::ThreadBusy => {
                crate::telemetry::limit_rejected("thread_busy");
                StartRunError::ThreadBusy
            }
        })?;
    // From here on the slot is ours; dropping it (on any early return) frees it.
    let slot = RunSlot {
        runs: Arc::clone(&state.runs),
        run: run_id,
    };

    if state.settings.bus_url.is_some() {
        // Several instances: this process only knows its own runs; the database knows
        // all of them. (Two starts on two instances at the same moment can both pass;
        // the limit is exact per instance and approximate across them.)
        let unfinished = unfinished_runs_of(&store).await?;
        if unfinished.iter().any(|r| r.thread_id == thread) {
            crate::telemetry::limit_rejected("thread_busy");
            return Err(StartRunError::ThreadBusy);
        }
        if unfinished.len() >= state.limits.settings.max_concurrent_runs_per_user {
            crate::telemetry::limit_rejected("too_many_runs");
            return Err(StartRunError::TooManyRuns);
        }
    }

    let now = now_ms();
    let message = MessageRecord {
        id: MessageId::generate(),
        thread_id: thread,
        role: "user".into(),
        content: text.clone(),
        metadata: json!({ "run_id": run_id.to_string() }),
        created_at_ms: now,
    };
    if !store.insert_message(&message).await? {
        return Err(StartRunError::ThreadNotFound);
    }
    store
        .create_run_on(
            &RunRecord {
                id: run_id,
                thread_id: thread,
                status: RunStatus::Queued,
                created_at_ms: now,
                started_at_ms: None,
                finished_at_ms: None,
                error: None,
                last_seq: 0,
            },
            &state.infra.instance_id,
        )
        .await?;

    let instance = AgentInstanceFactory::new(ctx, Arc::clone(&state.infra)).build(text, slot);
    crate::telemetry::run_started();
    let span = tracing::info_span!("run", %run_id, %request_id);
    tokio::spawn(tracing::Instrument::instrument(
        supervisor::execute(instance),
        span,
    ));
    Ok(StartedRun {
        run_id,
        thread_id: thread,
        message_id: message.id,
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

/// At start-up: runs a previous process left unfinished (crash or kill) are marked
/// `interrupted` and get their terminal event, so every run's log ends properly. Only
/// with a single instance: with several, [`crate::cluster`] does this for the runs of
/// instances that stopped sending heartbeats.
pub async fn recover_unfinished_runs(
    store: &Arc<dyn Store>,
    bus: &Arc<dyn crate::events::EventBus>,
) -> Result<usize, StoreError> {
    let unfinished = store.unfinished_runs().await?;
    let count = unfinished.len();
    for (owner, run) in unfinished {
        interrupt_run(store, bus, owner, &run).await?;
    }
    Ok(count)
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
    let message = "the server stopped during the run".to_string();
    let _ = emitter
        .emit(
            SUPERVISOR,
            EventBody::RunError {
                error_code: agent_codes::INTERRUPTED.into(),
                error_message: message.clone(),
            },
        )
        .await;
    user_store
        .set_run_status(
            run.id,
            RunStatus::Interrupted,
            Some(&format!("INTERRUPTED: {message}")),
            now_ms(),
        )
        .await?;
    emitter
        .emit_terminal(
            SUPERVISOR,
            EventBody::RunFinished {
                status: RunStatus::Interrupted,
                final_response: String::new(),
                result: serde_json::Value::Null,
                execution_time_ms: 0,
                error: Some(message),
            },
        )
        .await
        .map_err(|e| match e {
            crate::events::EmitError::Storage(s) => s,
            other => StoreError::Corrupt(other.to_string()),
        })?;
    Ok(())
}
