//! Recovering runs whose instance stopped responding.
//!
//! A claimed run whose heartbeat went stale (its instance died; see [`super::cluster`],
//! or at start-up for a single instance) is queued again while it has attempts left
//! (`run_max_attempts`), and its next attempt starts from the beginning, continuing the
//! same event log; after the last attempt it is ended `interrupted` with its terminal
//! event ([`interrupt_run`]). With several instances, a run still going when its
//! instance's shutdown grace period ends is handed back the same way by the supervisor
//! itself ([`super::execute`]), without waiting to go stale.

use std::sync::Arc;

use super::ending::interrupt_run;
use super::Runs;
use crate::events::EventBus;
use crate::store::{QueueEntry, Store, StoreResult};

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
    interrupt_run(store, bus, entry.owner, &run).await?;
    Ok(Recovery::Interrupted)
}

impl Runs {
    /// Recovers every run in `stale` (see [`recover_run`]). Returns how many were queued
    /// again and how many ended `interrupted`.
    pub async fn recover(&self, stale: &[QueueEntry]) -> StoreResult<(usize, usize)> {
        let shared = &self.shared;
        let (mut requeued, mut interrupted) = (0, 0);
        for entry in stale {
            match recover_run(
                &shared.infra.store,
                &shared.infra.bus,
                &shared.instance_id,
                shared.settings.run_max_attempts,
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
    pub async fn recover_after_restart(&self) -> StoreResult<(usize, usize)> {
        let stale = self.shared.infra.store.stale_runs(i64::MAX).await?;
        self.recover(&stale).await
    }
}
