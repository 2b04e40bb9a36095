//! Group commit for run event logs: one writer per store, many events per transaction.
//!
//! Why: a run emits ~80–100 events and each must be durable before it is delivered
//! ("persist then publish"). A transaction per event (`BEGIN`, `UPDATE runs SET last_seq`,
//! `INSERT`, `COMMIT`) costs four round trips (to SQLite's worker thread, or PostgreSQL's
//! server) per event; under many concurrent users that dominated the CPU spent per run.
//!
//! How: [`EventLog::append_event`](crate::EventLog::append_event) hands the event to this
//! module's writer task over a bounded channel and waits for the outcome. The writer takes
//! whatever has queued up (at most [`MAX_BATCH`] events), writes it with
//! [`BatchSink::write_batch`] (one transaction: one `UPDATE runs ... RETURNING` that checks
//! ownership and sets `last_seq` once per run, one multi-row `INSERT`), and only after the
//! commit answers each caller. So:
//! - an event is never acknowledged, and so never published, before it is committed;
//! - seq order per run is kept: the emitter holds its run's seq lock until its event is
//!   acknowledged, so a run has at most one event in flight;
//! - batching adds no delay when idle: a lone event is written at once, and events batch up
//!   only while a previous transaction is committing;
//! - one event cannot fail another: if a batch transaction fails (a duplicate seq, a
//!   deadlock, a busy database), it is rolled back and its events are written one by one,
//!   each with exactly the result it would have had on its own.

use std::collections::HashMap;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use crate::ids::{RunId, UserId};
use crate::records::{StoreError, StoreResult};

/// Most events written in one transaction (SQLite allows 32,766 bound parameters; a batch
/// binds four per event and three per run).
const MAX_BATCH: usize = 512;

/// Events waiting for the writer; past this, emitters wait (backpressure).
const QUEUE: usize = 4096;

/// The histogram of events per written batch, recorded here where batches are written;
/// the server describes it with its other metrics (`telemetry::EVENT_BATCH`).
pub const EVENT_BATCH_METRIC: &str = "apex_event_log_batch_size";

/// One event to append to a run's log.
#[derive(Debug, Clone)]
pub(crate) struct NewEvent {
    pub(crate) owner: UserId,
    pub(crate) run: RunId,
    pub(crate) seq: i64,
    pub(crate) json: String,
    pub(crate) now_ms: i64,
}

/// The rows one batch touches in `runs`: each (run, owner) once, with its highest seq.
pub(crate) fn runs_of(events: &[NewEvent]) -> Vec<(RunId, UserId, i64)> {
    let mut runs: Vec<(RunId, UserId, i64)> = Vec::new();
    let mut index: HashMap<(RunId, UserId), usize> = HashMap::new();
    for event in events {
        match index.get(&(event.run, event.owner)) {
            Some(&i) => runs[i].2 = runs[i].2.max(event.seq),
            None => {
                index.insert((event.run, event.owner), runs.len());
                runs.push((event.run, event.owner, event.seq));
            }
        }
    }
    runs
}

/// The error of an event for a run its owner does not own.
pub(crate) fn not_owned(event: &NewEvent) -> StoreError {
    StoreError::Corrupt(format!(
        "event for run {} that {} does not own",
        event.run, event.owner
    ))
}

/// An engine's SQL for appending events.
#[async_trait]
pub(crate) trait BatchSink: Send + Sync + 'static {
    /// Appends events in one transaction: checks that each event's owner owns its run, sets
    /// the run's `last_seq`, inserts the events. `Ok` holds one result per event (an event
    /// for a run its owner does not own is refused, the others are written); `Err` means
    /// the transaction was rolled back and nothing was written.
    async fn write_batch(&self, events: &[NewEvent]) -> StoreResult<Vec<StoreResult<()>>>;
}

struct Pending {
    event: NewEvent,
    done: oneshot::Sender<StoreResult<()>>,
}

/// The handle through which a store appends events; the writer task ends when it is dropped.
pub(crate) struct EventWriter {
    queue: mpsc::Sender<Pending>,
}

impl EventWriter {
    /// Starts the writer task on the current Tokio runtime.
    pub(crate) fn start(sink: impl BatchSink) -> Self {
        let (queue, incoming) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(incoming, sink));
        Self { queue }
    }

    /// Appends `event` and waits until it is committed (or refused).
    pub(crate) async fn append(&self, event: NewEvent) -> StoreResult<()> {
        let (done, outcome) = oneshot::channel();
        let gone = || StoreError::Corrupt("the event writer has stopped".into());
        self.queue
            .send(Pending { event, done })
            .await
            .map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
}

async fn write_loop(mut incoming: mpsc::Receiver<Pending>, sink: impl BatchSink) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while incoming.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (events, callers) = split(&mut batch);
        let results = write(&sink, &events).await;
        answer(callers, results);
    }
}

/// Empties `batch` into its events and, in the same order, the callers waiting for them
/// (moved, not copied: an event's JSON is a kilobyte or more).
fn split(batch: &mut Vec<Pending>) -> (Vec<NewEvent>, Vec<oneshot::Sender<StoreResult<()>>>) {
    batch.drain(..).map(|p| (p.event, p.done)).unzip()
}

/// Records the batch's size and gives each waiting caller its event's result.
fn answer(callers: Vec<oneshot::Sender<StoreResult<()>>>, results: Vec<StoreResult<()>>) {
    metrics::histogram!(EVENT_BATCH_METRIC).record(callers.len() as f64);
    for (done, result) in callers.into_iter().zip(results) {
        // The caller may have gone (its task was cancelled); the event is written anyway.
        let _ = done.send(result);
    }
}

/// Writes the batch in one transaction, or if that fails, each event on its own so that
/// one event cannot fail another.
async fn write(sink: &impl BatchSink, events: &[NewEvent]) -> Vec<StoreResult<()>> {
    if let Some(results) = settled(events, sink.write_batch(events).await) {
        return results;
    }
    let mut results = Vec::with_capacity(events.len());
    for event in events {
        results.extend(outcomes(
            sink.write_batch(std::slice::from_ref(event)).await,
        ));
    }
    results
}

/// The results of a batch's events after writing it whole, or `None` if it failed and had
/// several events: then each must be written on its own.
fn settled(
    events: &[NewEvent],
    written: StoreResult<Vec<StoreResult<()>>>,
) -> Option<Vec<StoreResult<()>>> {
    match written {
        Err(err) if events.len() > 1 => {
            tracing::debug!(error = %err, events = events.len(), "batch failed; writing its events one by one");
            None
        }
        written => Some(outcomes(written)),
    }
}

/// One result per event: a failed transaction fails each of its events.
fn outcomes(written: StoreResult<Vec<StoreResult<()>>>) -> Vec<StoreResult<()>> {
    written.unwrap_or_else(|err| vec![Err(err)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(run: RunId, owner: UserId, seq: i64) -> NewEvent {
        NewEvent {
            owner,
            run,
            seq,
            json: "{}".into(),
            now_ms: 0,
        }
    }

    #[test]
    fn runs_of_keeps_each_pair_once_with_its_highest_seq() {
        let (a, b) = (RunId::generate(), RunId::generate());
        let (alice, bob) = (UserId::generate(), UserId::generate());
        let runs = runs_of(&[
            event(a, alice, 3),
            event(b, alice, 1),
            event(a, alice, 5),
            event(a, bob, 2),
        ]);
        assert_eq!(runs, vec![(a, alice, 5), (b, alice, 1), (a, bob, 2)]);
    }
}
