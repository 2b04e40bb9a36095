//! The run queue: runs are rows in the database, and every instance's dispatcher claims
//! them while it has room.
//!
//! A message creates its run `queued` with no instance ([`crate::runs::start_run`]), or,
//! when the receiving instance has room and nothing else waits in the queue, already
//! claimed by that instance in the same transaction, which then starts it at once with
//! [`start`] (one commit fewer before the first event). Each process runs one [`dispatch`]
//! loop that claims the oldest queued runs, up to
//! `max_runs_per_instance` executing at once, and starts each with a fresh
//! `AgentInstanceFactory` built from a context made of the run's stored ids (the claim is
//! one statement: `FOR UPDATE SKIP LOCKED` on PostgreSQL, SQLite's single writer on the
//! embedded store, so exactly one instance gets each run). A dispatcher wakes when:
//! - this process queued a run ([`RunQueue::submitted`]): the common case is that the
//!   instance that received the message runs it, without a round trip to anyone else;
//! - another process announced queued runs (PostgreSQL `NOTIFY`, sent when an instance is
//!   full or a sweeper queued a dead instance's run again);
//! - one of its own runs ended while it was full;
//! - `queue_poll_interval` passed (a safety net for a missed notification).
//!
//! Recovery ([`recover_run`]) is the other half: a claimed run whose heartbeat went stale
//! (its instance died; see [`crate::cluster`], or at start-up for a single instance) is
//! queued again while it has attempts left (`run_max_attempts`), and its next attempt
//! starts from the beginning, continuing the same event log; after the last attempt it is
//! ended `interrupted` with its terminal event. With several instances, a run still going
//! when its instance's shutdown grace period ends is handed back the same way by the
//! supervisor itself (`agents::HandBack`), without waiting to go stale.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::agents::{supervisor, AgentInstanceFactory, RunStart};
use crate::clock::now_ms;
use crate::context::UserExecutionContext;
use crate::events::EventBus;
use crate::ids::RequestId;
use crate::state::AppState;
use crate::store::{QueueEntry, Store, StoreResult};

/// Most runs claimed in one statement; a dispatcher with more room claims again at once.
const CLAIM_BATCH: usize = 32;

/// After a failed claim (database unreachable), wait this long before the next try.
const CLAIM_RETRY: Duration = Duration::from_millis(500);

/// Wakes this process's dispatcher. Holds no run and no user data: only the signal.
#[derive(Debug, Default)]
pub struct RunQueue {
    wake: Arc<Notify>,
}

impl RunQueue {
    /// A run was queued by this process: claim it (or, if full, tell the others).
    pub fn submitted(&self) {
        self.wake.notify_one();
    }
}

/// What became of a stale run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Back in the queue for another attempt.
    Requeued,
    /// Out of attempts (or stored before the queue existed): ended `interrupted`.
    Interrupted,
    /// Another instance dealt with it first, or it finished meanwhile.
    Skipped,
}

/// Claims and starts queued runs until the server starts draining. Spawned once per
/// process by [`crate::serve`].
pub async fn dispatch(state: AppState) {
    let draining = state.infra.lifecycle.draining.clone();
    let wake = Arc::clone(&state.queue.wake);
    if let Err(err) = state
        .infra
        .store
        .watch_queue_announcements(Arc::clone(&wake))
        .await
    {
        // Polling still finds the runs, only later.
        tracing::warn!(error = %err, "cannot listen for queued runs; polling only");
    }
    loop {
        if draining.is_cancelled() {
            return;
        }
        let room = state
            .settings
            .max_runs_per_instance
            .saturating_sub(state.runs.len());
        if room > 0 {
            let want = room.min(CLAIM_BATCH);
            match claim_and_start(&state, want).await {
                // A full batch: more may be waiting, and there may be room for them.
                Ok(started) if started == want && started < room => continue,
                Ok(started) if started == room => announce(&state).await,
                Ok(_) => {}
                Err(err) => {
                    tracing::error!(error = %err, "claiming queued runs failed");
                    tokio::time::sleep(CLAIM_RETRY).await;
                    continue;
                }
            }
        }
        let full = room == 0;
        tokio::select! {
            _ = draining.cancelled() => return,
            _ = wake.notified() => {
                // Woken while full: what was queued here can be run by an instance with room.
                if full && state.runs.len() >= state.settings.max_runs_per_instance {
                    announce(&state).await;
                }
            }
            _ = state.runs.freed.notified(), if full => {}
            _ = tokio::time::sleep(state.settings.queue_poll_interval) => {}
        }
    }
}

/// Tells the other instances' dispatchers that runs are waiting.
async fn announce(state: &AppState) {
    if let Err(err) = state.infra.store.announce_queued_runs().await {
        tracing::warn!(error = %err, "could not announce queued runs");
    }
}

/// Claims up to `limit` runs and starts them. Returns how many it claimed.
async fn claim_and_start(state: &AppState, limit: usize) -> StoreResult<usize> {
    let claimed = state
        .infra
        .store
        .claim_queued_runs(&state.infra.instance_id, limit, now_ms())
        .await?;
    let count = claimed.len();
    for entry in claimed {
        start(state, entry, None).await;
    }
    Ok(count)
}

/// Starts one claimed run on its own task: one the dispatcher claimed, or one claimed
/// when it was submitted, whose place in [`crate::runs::ActiveRuns`] `reservation` held.
pub(crate) async fn start(
    state: &AppState,
    entry: QueueEntry,
    reservation: Option<crate::runs::RunReservation>,
) {
    let QueueEntry {
        owner,
        run,
        input,
        request_id,
        attempts,
        ..
    } = entry;
    let Some(input) = input else {
        // Stored before the queue kept the message with its run: it cannot be run.
        if let Err(err) =
            crate::runs::interrupt_run(&state.infra.store, &state.infra.bus, owner, &run).await
        {
            tracing::error!(run_id = %run.id, error = %err, "could not end a run without input");
        }
        return;
    };
    let request_id = request_id
        .and_then(|raw| RequestId::parse(&raw).ok())
        .unwrap_or_else(RequestId::generate);
    let ctx = UserExecutionContext::for_queued_run(
        owner,
        run.thread_id,
        run.id,
        request_id,
        state.settings.run_timeout,
        state.settings.agent_timeout,
    );
    let slot = state
        .runs
        .register(run.id, owner, run.thread_id, ctx.cancellation().clone());
    // The slot holds the place now.
    drop(reservation);
    let instance = AgentInstanceFactory::new(ctx, Arc::clone(&state.infra)).build(
        input,
        slot,
        RunStart {
            last_seq: run.last_seq,
            attempt: attempts.max(1),
            max_attempts: state.settings.run_max_attempts.max(attempts),
        },
    );
    crate::telemetry::run_started();
    let span = tracing::info_span!("run", run_id = %run.id, %request_id, attempt = attempts);
    tokio::spawn(tracing::Instrument::instrument(
        supervisor::execute(instance),
        span,
    ));
}

/// Deals with a run whose instance stopped refreshing it: queue it again while it has
/// attempts left, otherwise end it `interrupted` (moving it to `me` first, so exactly one
/// survivor writes its last events).
pub async fn recover_run(
    store: &Arc<dyn Store>,
    bus: &Arc<dyn EventBus>,
    me: &str,
    max_attempts: u32,
    entry: &QueueEntry,
) -> StoreResult<Recovery> {
    let from = entry.instance.as_deref();
    if entry.input.is_some() && entry.attempts < max_attempts {
        if !store.requeue_run(entry.run.id, from).await? {
            return Ok(Recovery::Skipped);
        }
        crate::telemetry::run_requeued();
        tracing::warn!(
            run_id = %entry.run.id,
            attempts = entry.attempts,
            "queued a run again: its instance stopped responding"
        );
        return Ok(Recovery::Requeued);
    }
    if !store.claim_run(entry.run.id, from, me).await? {
        return Ok(Recovery::Skipped);
    }
    // Re-read: the log may have grown between the sweep query and the claim.
    let Some(run) = store.get_run(entry.owner, entry.run.id).await? else {
        return Ok(Recovery::Skipped);
    };
    tracing::warn!(run_id = %run.id, "ending a run whose instance stopped responding");
    crate::runs::interrupt_run(store, bus, entry.owner, &run).await?;
    Ok(Recovery::Interrupted)
}

/// Recovers every run in `stale` (see [`recover_run`]). Returns how many were queued
/// again and how many ended `interrupted`.
pub async fn recover_runs(state: &AppState, stale: &[QueueEntry]) -> StoreResult<(usize, usize)> {
    let (mut requeued, mut interrupted) = (0, 0);
    for entry in stale {
        match recover_run(
            &state.infra.store,
            &state.infra.bus,
            &state.infra.instance_id,
            state.settings.run_max_attempts,
            entry,
        )
        .await?
        {
            Recovery::Requeued => requeued += 1,
            Recovery::Interrupted => interrupted += 1,
            Recovery::Skipped => {}
        }
    }
    Ok((requeued, interrupted))
}

/// At start-up of a single instance: every run a previous process had claimed and not
/// finished is recovered at once (that process is gone). Runs still queued stay queued
/// and are executed by the dispatcher. Returns how many were queued again and how many
/// ended `interrupted`.
pub async fn recover_after_restart(state: &AppState) -> StoreResult<(usize, usize)> {
    let stale = state.infra.store.stale_runs(i64::MAX).await?;
    recover_runs(state, &stale).await
}
