//! Several instances on one database: heartbeats, and recovering the runs of dead instances.
//!
//! A run executes on the instance that claimed it from the queue ([`super::dispatch`]);
//! that instance's id is stored on the run (`runs.instance_id`). With a bus configured
//! (`bus_url`), every instance, every `instance_heartbeat`, refreshes the heartbeat of each
//! run it executes (`runs.heartbeat_at`) and records its own (`instances`), then sweeps: a
//! claimed, unfinished run whose heartbeat is older than `instance_stale_after` (its
//! instance was killed, crashed or cut off) is recovered by exactly one survivor
//! ([`super::recovery`]: conditional `UPDATE`s, so two sweepers never both act): queued
//! again while it has attempts left, so an instance with room runs it again from the
//! start, continuing its event log; otherwise ended the way a restart ends the runs of a
//! crashed single instance: an `error` event, status `interrupted` and the terminal event.
//! A client that reconnects anywhere and resumes therefore always reaches a terminal event.
//!
//! Without a bus there is one instance, and [`Runs::recover_after_restart`] does the same
//! at start for everything the previous process left unfinished.

use std::time::Duration;

use super::Runs;
use crate::clock::now_ms;
use crate::store::StoreResult;

/// Instances silent for this many stale periods are forgotten (their runs were ended
/// long before).
const FORGET_AFTER_STALE_PERIODS: u32 = 20;

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Runs {
    /// Heartbeat and sweep every `instance_heartbeat` until the sockets close at shutdown
    /// (runs may still be finishing during the grace period, so the heartbeat goes on).
    pub async fn upkeep(self) {
        let closing = self.shared.lifecycle.close_sockets.clone();
        let period = self.shared.settings.instance_heartbeat;
        loop {
            if let Err(err) = self.tick().await {
                tracing::error!(error = %err, "instance heartbeat or sweep failed");
            }
            tokio::select! {
                _ = closing.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }

    /// One heartbeat and one sweep. Returns how many orphaned runs this instance recovered
    /// (queued again or ended).
    pub async fn tick(&self) -> StoreResult<usize> {
        let shared = &self.shared;
        let store = &shared.infra.store;
        let me = shared.instance_id.as_str();
        let stale_after = shared.settings.instance_stale_after;
        let now = now_ms();
        store.heartbeat_instance(me, now).await?;
        store
            .heartbeat_runs(me, &shared.registry.ids(), now)
            .await?;
        let stale = store.stale_runs(now - millis(stale_after)).await?;
        let (requeued, interrupted) = self.recover(&stale).await?;
        if requeued > 0 {
            // Any instance with room may take them, this one included.
            self.wake_dispatcher();
            store.announce_queued_runs().await?;
        }
        let forget_before = now - millis(stale_after * FORGET_AFTER_STALE_PERIODS);
        store.remove_instances(None, forget_before).await?;
        Ok(requeued + interrupted)
    }

    /// At graceful shutdown: this instance is gone (its runs have ended by now).
    pub async fn leave(&self) {
        let me = Some(self.shared.instance_id.as_str());
        if let Err(err) = self.shared.infra.store.remove_instances(me, i64::MIN).await {
            tracing::warn!(error = %err, "could not remove this instance's heartbeat");
        }
    }
}
