//! The runs executing in this process: who owns each, how to cancel it, and how many
//! places are taken.
//!
//! [`ActiveRuns`] maps a run executing here to its owner and cancellation token, so that a
//! stop from any of the owner's connections reaches it and no one else's does. It is the
//! one map keyed by run in the process: it holds only cancellation handles, each tagged
//! with its owner and removed when the run's task ends ([`RunSlot`]'s drop, even by
//! panic). Places are also held for runs being submitted here ([`RunReservation`]), so
//! that concurrent submissions and the dispatcher together never start more than the
//! instance's limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::ids::{RunId, ThreadId, UserId};

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
    pub(super) freed: tokio::sync::Notify,
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
