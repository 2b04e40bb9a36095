//! Several instances on one database: heartbeats, and ending the runs of dead instances.
//!
//! A run executes on the instance that started it; that instance's id is stored on the run
//! (`runs.instance_id`). With a bus configured (`bus_url`), every instance records a
//! heartbeat in `instances` every `instance_heartbeat`, and on the same tick sweeps: an
//! unfinished run whose instance has been silent for `instance_stale_after` (killed,
//! crashed, cut off) is claimed by exactly one surviving instance (a conditional
//! `UPDATE`, so two sweepers never both write), which ends it the way a restart ends the
//! runs of a crashed single instance ([`crate::runs::interrupt_run`]): an `error` event,
//! status `interrupted` and the terminal event, persisted and published through the
//! normal emitter, with seqs continuing the stored log. A client that reconnects anywhere
//! and resumes therefore always reaches a terminal event.
//!
//! Without a bus there is one instance, and `recover_unfinished_runs` at start does the
//! same for everything left unfinished, at once.

use std::time::Duration;

use crate::clock::now_ms;
use crate::state::AppState;
use crate::store::StoreResult;

/// Instances silent for this many stale periods are forgotten (their runs were ended
/// long before).
const FORGET_AFTER_STALE_PERIODS: u32 = 20;

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Heartbeat and sweep every `instance_heartbeat` until the sockets close at shutdown
/// (runs may still be finishing during the grace period, so the heartbeat goes on).
pub async fn upkeep(state: AppState) {
    let closing = state.infra.lifecycle.close_sockets.clone();
    let period = state.settings.instance_heartbeat;
    loop {
        if let Err(err) = tick(&state).await {
            tracing::error!(error = %err, "instance heartbeat or sweep failed");
        }
        tokio::select! {
            _ = closing.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// One heartbeat and one sweep. Returns how many orphaned runs this instance ended.
pub async fn tick(state: &AppState) -> StoreResult<usize> {
    let store = &state.infra.store;
    let me = state.infra.instance_id.as_str();
    let now = now_ms();
    store.heartbeat_instance(me, now).await?;
    let stale_before = now - millis(state.settings.instance_stale_after);
    let mut ended = 0;
    for (owner, run, instance) in store.orphaned_runs(me, stale_before).await? {
        if !store.claim_run(run.id, instance.as_deref(), me).await? {
            continue; // another instance took it, or it finished meanwhile
        }
        // Re-read: the log may have grown between the sweep query and the claim.
        let Some(run) = store.get_run(owner, run.id).await? else {
            continue;
        };
        tracing::warn!(run_id = %run.id, "ending a run whose instance stopped responding");
        crate::runs::interrupt_run(store, &state.infra.bus, owner, &run).await?;
        ended += 1;
    }
    let forget_before =
        now - millis(state.settings.instance_stale_after * FORGET_AFTER_STALE_PERIODS);
    store.remove_instances(None, forget_before).await?;
    Ok(ended)
}

/// At graceful shutdown: this instance is gone (its runs have ended by now).
pub async fn leave(state: &AppState) {
    let me = Some(state.infra.instance_id.as_str());
    if let Err(err) = state.infra.store.remove_instances(me, i64::MIN).await {
        tracing::warn!(error = %err, "could not remove this instance's heartbeat");
    }
}
