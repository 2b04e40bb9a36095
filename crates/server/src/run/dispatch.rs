//! The run queue: runs are rows in the database, and every instance's dispatcher claims
//! them while it has room.
//!
//! A message creates its run `queued` with no instance ([`super::submit`]), or, when the
//! receiving instance has room and nothing else waits in the queue, already claimed by
//! that instance in the same transaction, which then starts it at once with
//! [`Runs::start`] (one commit fewer before the first event). Each process runs one
//! [`Runs::dispatch`] loop that claims queued runs, up to `max_runs_per_instance`
//! executing at once, in fair order: the oldest queued run of the user with the fewest runs
//! executing goes first (so one user's many queued runs cannot hold another's back), and
//! starts each with a fresh `AgentInstanceFactory` built from a context made of the run's
//! stored ids (the claim is one statement: `FOR UPDATE SKIP LOCKED` on PostgreSQL,
//! SQLite's single writer on the embedded store, so exactly one instance gets each run).
//! The claim skips a run while an earlier run of its thread is unfinished on any instance
//! (double-texting: a thread's runs execute one at a time, in submission order); the end
//! of a run wakes its instance's dispatcher when a run of its thread waits.
//! A dispatcher wakes when:
//! - this process queued a run ([`Runs::wake_dispatcher`]): the common case is that the
//!   instance that received the message runs it, without a round trip to anyone else;
//! - another process announced queued runs (PostgreSQL `NOTIFY`, sent when an instance is
//!   full or a sweeper queued a dead instance's run again);
//! - one of its own runs ended while it was full;
//! - `queue_poll_interval` passed (a safety net for a missed notification).

use std::sync::Arc;
use std::time::Duration;

use super::approval::Resumption;
use super::ending::interrupt_run;
use super::execute::{execute, Execution, HandBack, Parking};
use super::registry::RunReservation;
use super::Runs;
use crate::agents::AgentInstanceFactory;
use crate::clock::now_ms;
use crate::context::UserExecutionContext;
use crate::ids::RequestId;
use crate::store::{QueueEntry, StoreResult};

/// Most runs claimed in one statement; a dispatcher with more room claims again at once.
const CLAIM_BATCH: usize = 32;

/// After a failed claim (database unreachable), wait this long before the next try.
const CLAIM_RETRY: Duration = Duration::from_millis(500);

impl Runs {
    /// A run was queued (by this process, or requeued by its sweep): claim it, or, if
    /// full, tell the other instances.
    pub(super) fn wake_dispatcher(&self) {
        self.shared.wake.notify_one();
    }

    /// Claims and starts queued runs until the server starts draining. Spawned once per
    /// process by the server.
    pub async fn dispatch(self) {
        let shared = &self.shared;
        let draining = shared.lifecycle.draining.clone();
        let max_runs = shared.settings.max_runs_per_instance;
        if let Err(err) = shared
            .infra
            .store
            .watch_queue_announcements(Arc::clone(&shared.wake))
            .await
        {
            // Polling still finds the runs, only later.
            tracing::warn!(error = %err, "cannot listen for queued runs; polling only");
        }
        loop {
            if draining.is_cancelled() {
                return;
            }
            let room = max_runs.saturating_sub(shared.registry.len());
            if room > 0 {
                let want = room.min(CLAIM_BATCH);
                match self.claim_and_start(want).await {
                    // A full batch: more may be waiting, and there may be room for them.
                    Ok(started) if started == want && started < room => continue,
                    Ok(started) if started == room => self.announce().await,
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
                _ = shared.wake.notified() => {
                    // Woken while full: what was queued here can be run by an instance
                    // with room.
                    if full && shared.registry.len() >= max_runs {
                        self.announce().await;
                    }
                }
                _ = shared.registry.freed.notified(), if full => {}
                _ = tokio::time::sleep(shared.settings.queue_poll_interval) => {}
            }
        }
    }

    /// Tells the other instances' dispatchers that runs are waiting.
    pub(super) async fn announce(&self) {
        if let Err(err) = self.shared.infra.store.announce_queued_runs().await {
            tracing::warn!(error = %err, "could not announce queued runs");
        }
    }

    /// Claims up to `limit` runs and starts them. Returns how many it claimed.
    async fn claim_and_start(&self, limit: usize) -> StoreResult<usize> {
        let claimed = self
            .shared
            .infra
            .store
            .claim_queued_runs(&self.shared.instance_id, limit, now_ms())
            .await?;
        let count = claimed.len();
        for entry in claimed {
            self.start(entry, None).await;
        }
        Ok(count)
    }

    /// Starts one claimed run on its own task: one the dispatcher claimed, or one claimed
    /// when it was submitted, whose place in the registry `reservation` held.
    pub(super) async fn start(&self, entry: QueueEntry, reservation: Option<RunReservation>) {
        let shared = &self.shared;
        let QueueEntry {
            owner,
            run,
            input,
            request_id,
            attempts,
            approval,
            ..
        } = entry;
        let resumption = match Resumption::of(&approval) {
            Ok(resumption) => Some(resumption),
            Err(err) => {
                tracing::error!(run_id = %run.id, error = %err, "the run's approval state is unreadable");
                None
            }
        };
        let (Some(input), Some(resumption)) = (input, resumption) else {
            // Stored before the queue kept the message with its run, or with an approval
            // state that cannot be read: it cannot be run.
            if let Err(err) =
                interrupt_run(&shared.infra.store, &shared.infra.bus, owner, &run).await
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
            shared.settings.run_timeout,
            shared.settings.agent_timeout,
        );
        let slot =
            shared
                .registry
                .register(run.id, owner, run.thread_id, ctx.cancellation().clone());
        // The slot holds the place now.
        drop(reservation);
        let instance =
            AgentInstanceFactory::new(ctx, Arc::clone(&shared.infra)).build(input, run.last_seq);
        let execution = Execution {
            instance,
            slot,
            shutdown: shared.lifecycle.interrupt_runs.clone(),
            attempt: attempts.max(1),
            max_attempts: shared.settings.run_max_attempts.max(attempts),
            hand_back: shared.settings.several_instances.then(|| HandBack {
                store: Arc::clone(&shared.infra.store),
                instance: shared.instance_id.clone(),
            }),
            wake: Arc::clone(&shared.wake),
            resumption,
            parking: Parking {
                store: Arc::clone(&shared.infra.store),
                instance: shared.instance_id.clone(),
                timeout: shared.settings.approval_timeout,
            },
        };
        crate::telemetry::run_started();
        let span = tracing::info_span!("run", run_id = %run.id, %request_id, attempt = attempts);
        tokio::spawn(tracing::Instrument::instrument(execute(execution), span));
    }
}
