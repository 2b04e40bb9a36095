//! Group commit for run event logs: one writer per store, many events per transaction.
//!
//! Why: a run emits ~80–100 events and each must be durable before it is delivered
//! ("persist then publish"). A transaction per event (`BEGIN`, `UPDATE runs SET last_seq`,
//! `INSERT`, `COMMIT`) costs four round trips (to SQLite's worker thread, or PostgreSQL's
//! server) per event; under many concurrent users that dominated the CPU spent per run.
//!
//! How: [`EventLog::append_events`](crate::EventLog::append_events) hands a run's events
//! (one or several, consecutive) to this module's writer task over a bounded channel and
//! waits for the outcome. The writer takes whatever has queued up (at most [`MAX_APPENDS`]
//! appends), writes it with [`BatchSink::write_batch`] (one transaction: one `UPDATE runs
//! ... RETURNING` that checks ownership and sets `last_seq` once per run, one multi-row
//! `INSERT`), and only after the commit answers each caller. So:
//! - an event is never acknowledged, and so never published, before it is committed;
//! - seq order per run is kept: a run's emitter hands over its next events only once the
//!   previous ones are acknowledged, so a run has at most one append in flight;
//! - batching adds no delay when idle: a lone append is written at once, and appends batch
//!   up only while a previous transaction is committing;
//! - an append is all or nothing: its events belong to one run and one owner, so they are
//!   refused together, and a failed transaction fails all of them;
//! - one append cannot fail another: if a batch transaction fails (a duplicate seq, a
//!   deadlock, a busy database), it is rolled back and its appends are written one by one,
//!   each with exactly the result it would have had on its own.

use std::collections::HashMap;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use crate::ids::{RunId, UserId};
use crate::records::{StoreError, StoreResult};

/// Most appends written in one transaction. With at most [`MAX_EVENTS_PER_APPEND`] events
/// each, a batch binds at most 4 × 64 × 64 = 16,384 parameters (four per event, three per
/// run), well within PostgreSQL's 65,535 and SQLite's 32,766.
const MAX_APPENDS: usize = 64;

/// Most events in one append; [`EventLog::append_events`](crate::EventLog::append_events)
/// refuses more (emitters hand over far fewer, see the server's `UserEmitter`).
pub const MAX_EVENTS_PER_APPEND: usize = 64;

/// Appends waiting for the writer; past this, emitters wait (backpressure).
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

/// One caller's append: consecutive events of one run, written all or none.
struct Pending {
    events: Vec<NewEvent>,
    done: oneshot::Sender<StoreResult<()>>,
}

/// Checks an append before it is queued: some events, not too many, all of one run and
/// owner (what makes it all or nothing, see the module doc).
pub(crate) fn check_append(events: &[NewEvent]) -> StoreResult<()> {
    let Some(first) = events.first() else {
        return Err(StoreError::Corrupt("an append of no events".into()));
    };
    if events.len() > MAX_EVENTS_PER_APPEND {
        return Err(StoreError::Corrupt(format!(
            "an append of {} events (at most {MAX_EVENTS_PER_APPEND})",
            events.len()
        )));
    }
    if events
        .iter()
        .any(|e| e.run != first.run || e.owner != first.owner)
    {
        return Err(StoreError::Corrupt(
            "an append with events of several runs".into(),
        ));
    }
    Ok(())
}

/// Each append's result from its events' results (`lengths`: each append's number of
/// events, in order): see [`append_result`].
pub(crate) fn by_append(lengths: &[usize], results: Vec<StoreResult<()>>) -> Vec<StoreResult<()>> {
    let mut results = results.into_iter();
    lengths
        .iter()
        // Every one of the append's results is taken: none is left for the next append.
        .map(|&n| append_result(results.by_ref().take(n)))
        .collect()
}

/// One append's result from its events' results: its first error, or `Ok`. An append's
/// events share run and owner, so they are refused together; the first error speaks for
/// all of them. Takes every result it is given.
pub(crate) fn append_result(results: impl IntoIterator<Item = StoreResult<()>>) -> StoreResult<()> {
    let mut outcome = Ok(());
    for result in results {
        if outcome.is_ok() {
            outcome = result;
        }
    }
    outcome
}

/// Each append's events, in order (`lengths` as for [`by_append`]): how a failed batch is
/// written again, append by append.
pub(crate) fn appends<'a>(
    events: &'a [NewEvent],
    lengths: &'a [usize],
) -> impl Iterator<Item = &'a [NewEvent]> + 'a {
    let mut start = 0;
    lengths.iter().map(move |&n| {
        let append = &events[start..start + n];
        start += n;
        append
    })
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

    /// Appends `events` (one run's, as [`check_append`] checks them) and waits until they
    /// are committed, or refused, together.
    pub(crate) async fn append(&self, events: Vec<NewEvent>) -> StoreResult<()> {
        let (done, outcome) = oneshot::channel();
        let gone = || StoreError::Corrupt("the event writer has stopped".into());
        self.queue
            .send(Pending { events, done })
            .await
            .map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
}

async fn write_loop(mut incoming: mpsc::Receiver<Pending>, sink: impl BatchSink) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_APPENDS);
    while incoming.recv_many(&mut batch, MAX_APPENDS).await > 0 {
        let (events, lengths, callers) = split(&mut batch);
        let results = write(&sink, &events, &lengths).await;
        metrics::histogram!(EVENT_BATCH_METRIC).record(events.len() as f64);
        for (done, result) in callers.into_iter().zip(results) {
            // The caller may have gone (its task was cancelled); the events are written anyway.
            let _ = done.send(result);
        }
    }
}

/// A caller waiting for its append.
type Caller = oneshot::Sender<StoreResult<()>>;

/// Empties `batch` into its events, each append's number of events and, in the same order,
/// the callers waiting for them (moved, not copied: an event's JSON is a kilobyte or more).
fn split(batch: &mut Vec<Pending>) -> (Vec<NewEvent>, Vec<usize>, Vec<Caller>) {
    let mut events = Vec::with_capacity(batch.iter().map(|p| p.events.len()).sum());
    let mut lengths = Vec::with_capacity(batch.len());
    let mut callers = Vec::with_capacity(batch.len());
    for pending in batch.drain(..) {
        lengths.push(pending.events.len());
        events.extend(pending.events);
        callers.push(pending.done);
    }
    (events, lengths, callers)
}

/// Writes the batch in one transaction, or if that fails, each append on its own so that
/// one append cannot fail another. One result per append.
async fn write(
    sink: &impl BatchSink,
    events: &[NewEvent],
    lengths: &[usize],
) -> Vec<StoreResult<()>> {
    match sink.write_batch(events).await {
        Ok(results) => by_append(lengths, results),
        Err(err) if lengths.len() == 1 => vec![Err(err)],
        Err(err) => {
            tracing::debug!(error = %err, appends = lengths.len(), "batch failed; writing its appends one by one");
            let mut results = Vec::with_capacity(lengths.len());
            for append in appends(events, lengths) {
                results.push(sink.write_batch(append).await.and_then(append_result));
            }
            results
        }
    }
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
    fn an_append_takes_its_first_events_error_and_is_checked_for_one_run() {
        let refused = || Err(StoreError::Corrupt("refused".into()));
        let results = by_append(
            &[2, 1, 3],
            vec![Ok(()), Ok(()), refused(), Ok(()), refused(), refused()],
        );
        assert!(results[0].is_ok());
        assert!(results[1].is_err());
        assert!(results[2].is_err(), "one refused event refuses its append");
        assert_eq!(results.len(), 3);

        let (a, b) = (RunId::generate(), RunId::generate());
        let alice = UserId::generate();
        assert!(check_append(&[event(a, alice, 1), event(a, alice, 2)]).is_ok());
        assert!(check_append(&[]).is_err());
        assert!(check_append(&[event(a, alice, 1), event(b, alice, 2)]).is_err());
        assert!(check_append(&[event(a, alice, 1), event(a, UserId::generate(), 2)]).is_err());
        let too_many: Vec<_> = (0..=MAX_EVENTS_PER_APPEND as i64)
            .map(|s| event(a, alice, s))
            .collect();
        assert!(check_append(&too_many).is_err());
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
