//! Ending a run, and stopping one wherever it is.
//!
//! Every run ends through [`end_run`], whoever ends it: the supervisor (completed, failed,
//! stopped, timed out, interrupted by shutdown), a stop for a run still waiting in the
//! queue ([`Runs::stop`]), or a survivor ending the run of an instance that died
//! ([`interrupt_run`]). So every ending has the same shape: an `error` event if the run did
//! not complete, its stored status, then exactly one terminal event, which is last.
//!
//! A stop reaches the run wherever it is: executing here (its cancellation token, through
//! the registry, which checks the owner), still queued or parked for approval (ended in the database, unless an
//! instance claims it first), or executing on another instance (checked against the store,
//! then sent over the bus; that instance's registry checks the owner again).
//!
//! A newer message on the thread stops runs the same way ([`Runs::supersede`], for
//! `interrupt` and `rollback`). The stop itself carries no reason across instances: the
//! submitting transaction marks the run `superseded` in the store, and whoever ends it
//! reads the mark ([`StopReason::of`]) to end it `interrupted` (or `cancelled`). After the
//! terminal event, [`settle`] removes a rolled-back run and wakes the dispatcher for the
//! next run of the thread.

use std::sync::Arc;

use apex_protocol::error::agent_codes;
use apex_protocol::events::{EventBody, SUPERVISOR};
use apex_protocol::threads::{MultitaskStrategy, RunStatus};
use serde_json::Value;

use super::Runs;
use crate::auth::AuthenticatedUser;
use crate::clock::now_ms;
use crate::context::UserExecutionContext;
use crate::events::{EmitError, EventBus, UserEmitter};
use crate::ids::{RunId, UserId};
use crate::store::{RunRecord, Store, StoreError};
use crate::user_store::UserStore;

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

/// How a run ended, as its last events and stored status say.
pub(super) struct Ending {
    pub status: RunStatus,
    /// The error code and the message the user is told; `None` for a completed run.
    pub error: Option<(String, String)>,
    /// The answer (empty unless completed).
    pub answer: String,
    /// The run's report (`null` when no agent produced one).
    pub report: Value,
    pub duration_ms: u64,
}

impl Ending {
    /// A run that ended without its agents having produced anything.
    pub(super) fn bare(status: RunStatus, code: &str, message: &str) -> Self {
        Self {
            status,
            error: Some((code.into(), message.into())),
            answer: String::new(),
            report: Value::Null,
            duration_ms: 0,
        }
    }
}

/// How [`end_run`] stores the run's status.
pub(super) enum StatusWrite<'a> {
    /// Store it; if that fails, write no terminal event and return the error (the run
    /// stays unfinished, so a later sweep tries again).
    Store(&'a UserStore),
    /// Store it; if that fails, log and still end the run for its watchers (the
    /// supervisor's case: a client must see its run end).
    BestEffort(&'a UserStore),
    /// The caller already stored it (conditionally, as its claim on the run).
    AlreadyStored,
}

/// Ends a run: its `error` event (unless it completed), its status, then the terminal
/// event. `on_stored` runs once the status is stored, before the terminal event goes out.
pub(super) async fn end_run(
    emitter: &UserEmitter,
    status_write: StatusWrite<'_>,
    ending: Ending,
    on_stored: impl FnOnce(),
) -> Result<(), StoreError> {
    let run_id = emitter.run_id();
    if let Some((code, message)) = &ending.error {
        // Best effort: the terminal event follows and carries the message too.
        let _ = emitter
            .emit(
                SUPERVISOR,
                EventBody::RunError {
                    error_code: code.clone(),
                    error_message: message.clone(),
                },
            )
            .await;
    }
    // Every event of the run is stored before its status is: a reader that sees the run
    // ended finds all its events but the terminal one. Best effort, as the `error` event:
    // the terminal event follows whatever happened to them.
    let _ = emitter.flush().await;
    let error_text = ending
        .error
        .as_ref()
        .map(|(code, message)| format!("{code}: {message}"));
    let store_status = |store: &'_ UserStore| {
        let store = store.clone();
        let error_text = error_text.clone();
        async move {
            store
                .set_run_status(run_id, ending.status, error_text.as_deref(), now_ms())
                .await
        }
    };
    let store = match status_write {
        StatusWrite::Store(store) => {
            store_status(store).await?;
            Some(store)
        }
        StatusWrite::BestEffort(store) => {
            if let Err(err) = store_status(store).await {
                tracing::error!(%run_id, error = %err, "could not store the run's final status");
            }
            Some(store)
        }
        StatusWrite::AlreadyStored => None,
    };
    if ending.status != RunStatus::Completed {
        if let Some(store) = store {
            restore_superseded(store, run_id).await;
        }
    }
    on_stored();
    let terminal = EventBody::RunFinished {
        status: ending.status,
        final_response: ending.answer,
        result: ending.report,
        execution_time_ms: ending.duration_ms,
        error: ending.error.map(|(_, message)| message),
    };
    match emitter.emit_terminal(SUPERVISOR, terminal).await {
        Ok(_) => Ok(()),
        Err(EmitError::Storage(err)) => Err(err),
        Err(other) => Err(StoreError::Corrupt(other.to_string())),
    }
}

/// A run that ends without an answer leaves the answers it was to replace current (see
/// [`super::regenerate`]); before the terminal event, so a client reloading the thread
/// on it sees them so. Best effort: a failure only leaves them marked superseded.
pub(super) async fn restore_superseded(store: &UserStore, run_id: RunId) {
    if let Err(err) = store.restore_superseded(run_id).await {
        tracing::error!(%run_id, error = %err, "could not restore the answers a run was to replace");
    }
}

/// Why a run was stopped before its end: it decides the status and the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StopReason {
    /// `stop_agent` or `POST /api/runs/{id}/cancel`.
    User,
    /// A newer message on the thread, with `interrupt` or `rollback`.
    Superseded(MultitaskStrategy),
}

impl StopReason {
    /// The reason a stopped run of `store` ends with: a newer message's if it superseded
    /// the run (read from the store, since the stop may have come from another instance),
    /// else the user's.
    pub(super) async fn of(store: &UserStore, run: RunId) -> StopReason {
        match store.run_superseded(run).await {
            Ok(Some(strategy)) => StopReason::Superseded(strategy),
            Ok(None) => StopReason::User,
            Err(err) => {
                tracing::warn!(run_id = %run, error = %err, "could not read why the run was stopped");
                StopReason::User
            }
        }
    }

    /// The status, error code and message a run stopped for this reason ends with.
    pub(super) fn ending(self) -> (RunStatus, &'static str, &'static str) {
        match self {
            StopReason::Superseded(MultitaskStrategy::Interrupt) => (
                RunStatus::Interrupted,
                agent_codes::INTERRUPTED,
                "a newer message on the thread interrupted the run",
            ),
            StopReason::Superseded(MultitaskStrategy::Rollback) => (
                RunStatus::Cancelled,
                agent_codes::CANCELLED,
                "a newer message on the thread rolled the run back",
            ),
            StopReason::User | StopReason::Superseded(_) => (
                RunStatus::Cancelled,
                agent_codes::CANCELLED,
                "the run was stopped",
            ),
        }
    }
}

/// After a run's terminal event: removes the run if a newer message rolled it back, and
/// returns whether a queued run of its thread now waits (to be claimed at once rather than
/// at the next poll).
pub(super) async fn settle(store: &UserStore, run: RunId) -> bool {
    match store.settle_ended_run(run).await {
        Ok(aftermath) => {
            if aftermath.removed {
                tracing::info!(%run, "rolled-back run removed");
            }
            aftermath.successor_waiting
        }
        Err(err) => {
            // The next dispatcher poll still finds a waiting run; a rollback's leftovers stay.
            tracing::error!(%run, error = %err, "could not settle an ended run");
            true
        }
    }
}

/// Ends a run whose executing process is gone: an `error` event, status `interrupted`,
/// and the terminal event, through the normal emitter (persisted, then published), with
/// seqs continuing the stored log.
pub async fn interrupt_run(
    store: &Arc<dyn Store>,
    bus: &Arc<dyn EventBus>,
    owner: UserId,
    run: &RunRecord,
) -> Result<(), StoreError> {
    let ctx = UserExecutionContext::for_recovery(owner, run.thread_id, run.id);
    let emitter = UserEmitter::resuming(&ctx, Arc::clone(store), Arc::clone(bus), run.last_seq);
    let user_store = UserStore::for_context(Arc::clone(store), &ctx);
    let ending = Ending::bare(
        RunStatus::Interrupted,
        agent_codes::INTERRUPTED,
        "the server stopped during the run",
    );
    end_run(&emitter, StatusWrite::Store(&user_store), ending, || {}).await?;
    // A successor it held back is claimed at the next dispatcher poll.
    settle(&user_store, run.id).await;
    Ok(())
}

impl Runs {
    /// Stops a run of `user`, wherever it is (see the module docs).
    pub async fn stop(
        &self,
        user: &AuthenticatedUser,
        run: RunId,
    ) -> Result<StopOutcome, StoreError> {
        self.stop_for(user, run, StopReason::User).await
    }

    /// Stops `run`, which a newer message superseded with `strategy` (`interrupt` or
    /// `rollback`), wherever it is. The store already marks it, so the supervisor that
    /// ends it (here or on another instance) ends it for that reason.
    pub(super) async fn supersede(
        &self,
        user: &AuthenticatedUser,
        run: &RunRecord,
        strategy: MultitaskStrategy,
    ) -> Result<StopOutcome, StoreError> {
        self.stop_for(user, run.id, StopReason::Superseded(strategy))
            .await
    }

    async fn stop_for(
        &self,
        user: &AuthenticatedUser,
        run: RunId,
        reason: StopReason,
    ) -> Result<StopOutcome, StoreError> {
        let shared = &self.shared;
        if shared.registry.cancel(user.user_id(), run) {
            return Ok(StopOutcome::Stopping);
        }
        let store = UserStore::for_user(Arc::clone(&shared.infra.store), user);
        Ok(match store.get_run(run).await? {
            None => StopOutcome::NotFound,
            Some(record) if record.status.is_terminal() => {
                StopOutcome::AlreadyFinished(record.status)
            }
            // Still waiting in the queue, or parked for approval of its plan: end it there,
            // unless an instance claims it first.
            Some(record)
                if matches!(
                    record.status,
                    RunStatus::Queued | RunStatus::AwaitingApproval
                ) && self
                    .end_unclaimed_run(user.user_id(), &record, reason)
                    .await? =>
            {
                StopOutcome::Stopping
            }
            // Claimed by this process since the first look.
            Some(_) if shared.registry.cancel(user.user_id(), run) => StopOutcome::Stopping,
            // The caller's run, unfinished, and not executing here: it runs on another
            // instance (which cancels it when it gets this request), or it is finishing.
            Some(_) => {
                if !shared.infra.bus.request_stop(user.user_id(), run)
                    && shared.settings.several_instances
                {
                    tracing::warn!(run_id = %run, "the stop request could not be sent to the other instances");
                }
                StopOutcome::Stopping
            }
        })
    }

    /// Stops a run that is still queued and unclaimed (or parked for approval): status `cancelled`, then its error
    /// and terminal events, as if the supervisor had stopped it. `false` if an instance
    /// claimed it (or it finished) in the meantime.
    async fn end_unclaimed_run(
        &self,
        owner: UserId,
        run: &RunRecord,
        reason: StopReason,
    ) -> Result<bool, StoreError> {
        let infra = &self.shared.infra;
        let (status, code, message) = reason.ending();
        let ending = Ending::bare(status, code, message);
        let error = format!("{code}: {message}");
        // Storing the status is the claim: it succeeds only while the run is unclaimed.
        if !infra
            .store
            .finish_unclaimed_run(owner, run.id, status, &error, now_ms())
            .await?
        {
            return Ok(false);
        }
        let ctx = UserExecutionContext::for_recovery(owner, run.thread_id, run.id);
        restore_superseded(
            &UserStore::for_context(Arc::clone(&infra.store), &ctx),
            run.id,
        )
        .await;
        let emitter = UserEmitter::resuming(
            &ctx,
            Arc::clone(&infra.store),
            Arc::clone(&infra.bus),
            run.last_seq,
        );
        end_run(&emitter, StatusWrite::AlreadyStored, ending, || {}).await?;
        let user_store = UserStore::for_context(Arc::clone(&infra.store), &ctx);
        if settle(&user_store, run.id).await {
            self.wake_dispatcher();
        }
        Ok(true)
    }
}
