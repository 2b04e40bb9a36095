//! SQLite's writer thread: one thread with a `rusqlite` connection that commits, in one
//! transaction per batch, the writes every run makes: its events (group commit, as
//! [`crate::group_commit`] describes) and its own rows (the submission, the answer, the
//! status; `sqlite_run_writes`).
//!
//! Why not sqlx, as for the store's other writes: sqlx runs each SQLite connection on a
//! worker thread and sends it every statement over a channel, so a transaction of five
//! statements was seven hand-offs there and back; and every commit writes each page it
//! touched to the WAL again (4 KiB apiece, checksummed), so three commits per run of a few
//! rows each cost more than the rows. Profiles showed sqlx's writing thread at a fifth of
//! the server's CPU, most of it those hand-offs and page writes. Here a batch is one
//! wake-up of this thread and one commit for everything queued meanwhile, with cached
//! statements stepped in place.
//!
//! Each write of a batch runs in a savepoint of its own, so one write's failure or refusal
//! (undone by rolling back its savepoint) never touches another's; the batch's events
//! likewise, and if they fail together they are written again one by one. Every caller
//! hears back only after the commit: persist-before-deliver and each run's seq order are
//! the group commit's, unchanged. If the commit itself fails, every write of the batch
//! fails with it and nothing of it is stored.
//!
//! SQLite admits one writer at a time, and the store's other writes go through sqlx's one
//! writing connection (see `sqlite`). Two connections that both write would meet
//! `SQLITE_BUSY` and sleep in the busy handler; so this writer holds that connection (takes
//! it from its pool of one) while it writes a batch, and other writes wait their turn in
//! the pool's queue as they did before.

use std::any::Any;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, Transaction, TransactionBehavior};
use sqlx::SqlitePool;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use crate::group_commit::{
    append_result, appends as each_append, by_append, not_owned, runs_of, NewEvent,
    EVENT_BATCH_METRIC,
};
use crate::records::{StoreError, StoreResult};

/// How long a write waits for another process holding the database (`apex admin`, say)
/// before it fails; within this process writers never meet (see the module doc).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Most jobs committed in one transaction (SQLite allows 32,766 bound parameters per
/// statement; every statement here binds a handful).
const MAX_BATCH: usize = 512;

/// Jobs waiting for the writer; past this, callers wait (backpressure).
const QUEUE: usize = 4096;

/// Checks a run's owner and sets its `last_seq`; as every event does, refreshes a claimed
/// run's heartbeat. Binds the run, the owner, the seq and now.
pub(crate) const UPDATE_LAST_SEQ: &str = "UPDATE runs SET last_seq = ?3, heartbeat_at = CASE \
     WHEN instance_id IS NULL THEN heartbeat_at ELSE ?4 END \
     WHERE id = ?1 AND user_id = ?2";

/// One event of a run's log: binds the run, the seq, the stored event and now.
pub(crate) const INSERT_EVENT: &str =
    "INSERT INTO run_events (run_id, seq, event, created_at) VALUES (?1, ?2, ?3, ?4)";

/// What a write returns to its caller, type-erased on its way through the queue.
type Value = Box<dyn Any + Send>;

/// A write's statements, run in a savepoint: `Ok((true, value))` keeps them, `Ok((false,
/// value))` undoes them (a refusal, say) and still answers `value`; an error undoes them.
type Work = Box<dyn FnOnce(&Connection) -> StoreResult<(bool, Value)> + Send>;

/// One job for the writer thread.
enum Job {
    /// Events to append to their run's log, all or none (see `group_commit`).
    Events {
        events: Vec<NewEvent>,
        done: oneshot::Sender<StoreResult<()>>,
    },
    /// Any other write (see `sqlite_run_writes`).
    Write {
        work: Work,
        done: oneshot::Sender<StoreResult<Value>>,
    },
}

/// Whether a write's statements stay: what a write returns to [`SqliteWriter::write`].
pub(crate) enum Change<R> {
    /// Keep what the write did and answer `R`.
    Keep(R),
    /// Undo what the write did (a refusal found after its first statements) and answer `R`.
    Undo(R),
}

/// The handle through which the store writes on the writer thread; the thread ends when
/// this is dropped.
pub(crate) struct SqliteWriter {
    queue: mpsc::Sender<Job>,
}

impl SqliteWriter {
    /// Opens the database at `path` (already created and migrated by the store) and starts
    /// the writer thread. `autocheckpoint_pages` as the store's writing connection.
    pub(crate) fn start(
        path: &Path,
        write_turn: SqlitePool,
        autocheckpoint_pages: &str,
    ) -> StoreResult<Self> {
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(BUSY_TIMEOUT)?;
        // The store's settings (WAL is a property of the file, set when it was created).
        // `temp_store = MEMORY` keeps the savepoints' statement journals in memory: on
        // disk, every batch that touched more than 64 KiB of pages created, wrote, closed
        // and unlinked a temporary file.
        connection.execute_batch(&format!(
            "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; \
             PRAGMA wal_autocheckpoint = {autocheckpoint_pages};"
        ))?;
        let mut thread = WriterThread {
            connection,
            write_turn,
            runtime: Handle::current(),
        };
        let (queue, incoming) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("apex-sqlite-write".to_owned())
            .spawn(move || thread.run(incoming))
            .map_err(|e| StoreError::Sqlite(format!("starting the writer thread: {e}")))?;
        Ok(Self { queue })
    }

    /// Appends `events` (one run's, as [`check_append`](crate::group_commit::check_append) checks them) and waits until they
    /// are committed, or refused, together.
    pub(crate) async fn append(&self, events: Vec<NewEvent>) -> StoreResult<()> {
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Job::Events { events, done })
            .await
            .map_err(|_| stopped())?;
        outcome.await.map_err(|_| stopped())?
    }

    /// Runs `work` on the writer thread in the next batch and waits until its batch is
    /// committed: its answer, or the error that undid it (or the batch).
    pub(crate) async fn write<R: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> StoreResult<Change<R>> + Send + 'static,
    ) -> StoreResult<R> {
        let work: Work = Box::new(move |connection| {
            Ok(match work(connection)? {
                Change::Keep(value) => (true, Box::new(value) as Value),
                Change::Undo(value) => (false, Box::new(value) as Value),
            })
        });
        let (done, outcome) = oneshot::channel();
        self.queue
            .send(Job::Write { work, done })
            .await
            .map_err(|_| stopped())?;
        let value = outcome.await.map_err(|_| stopped())??;
        value
            .downcast::<R>()
            .map(|value| *value)
            .map_err(|_| StoreError::Corrupt("a write answered with the wrong type".into()))
    }
}

fn stopped() -> StoreError {
    StoreError::Sqlite(
        "the writer thread did not answer (it stopped, or this write's batch panicked)".into(),
    )
}

/// The writer thread's state.
struct WriterThread {
    connection: Connection,
    /// The store's writing pool (one connection): holding its connection is holding the
    /// right to write, so no two connections of this process write at once.
    write_turn: SqlitePool,
    /// The runtime the store was opened on, to wait for `write_turn` from this thread.
    runtime: Handle,
}

/// A batch's jobs, split by kind, each with its caller.
#[derive(Default)]
struct Batch {
    /// The events of every append, in order.
    events: Vec<NewEvent>,
    /// Each append's number of events, in order.
    appends: Vec<usize>,
    event_callers: Vec<oneshot::Sender<StoreResult<()>>>,
    writes: Vec<(Work, oneshot::Sender<StoreResult<Value>>)>,
}

impl WriterThread {
    /// Writes batches until the store (the last sender) is dropped.
    fn run(&mut self, mut incoming: mpsc::Receiver<Job>) {
        let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = incoming.blocking_recv() {
            jobs.push(first);
            while jobs.len() < MAX_BATCH {
                match incoming.try_recv() {
                    Ok(next) => jobs.push(next),
                    Err(_) => break,
                }
            }
            let mut batch = Batch::default();
            for job in jobs.drain(..) {
                match job {
                    Job::Events { events, done } => {
                        batch.appends.push(events.len());
                        batch.events.extend(events);
                        batch.event_callers.push(done);
                    }
                    Job::Write { work, done } => batch.writes.push((work, done)),
                }
            }
            // A write that panics fails its batch (its transaction rolls back as it unwinds,
            // and the callers' answers are dropped: they hear that the writer stopped), not
            // the thread: the batches after it are written as usual.
            if std::panic::catch_unwind(AssertUnwindSafe(|| self.commit(batch))).is_err() {
                tracing::error!("a batch of the SQLite writer panicked; it was rolled back");
            }
        }
    }

    /// Commits `batch` while holding the write turn, then answers its callers.
    fn commit(&mut self, batch: Batch) {
        let Batch {
            events,
            appends,
            event_callers,
            writes,
        } = batch;
        let (works, write_callers): (Vec<Work>, Vec<_>) = writes.into_iter().unzip();
        // Entered so that the lease, when dropped, can hand the connection back to its pool.
        let _runtime = self.runtime.enter();
        let written = match self.runtime.block_on(self.write_turn.acquire()) {
            Ok(turn) => {
                let written = write_batch(&mut self.connection, &events, &appends, works);
                drop(turn);
                written
            }
            Err(err) => Err(err.into()),
        };
        if !events.is_empty() {
            metrics::histogram!(EVENT_BATCH_METRIC).record(events.len() as f64);
        }
        // A caller may have gone (its task was cancelled); its write stands anyway.
        match written {
            Ok((event_results, write_results)) => {
                for (done, result) in event_callers.into_iter().zip(event_results) {
                    let _ = done.send(result);
                }
                for (done, result) in write_callers.into_iter().zip(write_results) {
                    let _ = done.send(result);
                }
            }
            Err(err) => {
                // Every caller gets the error, as the text the store's errors show.
                let failed = || StoreError::Sqlite(format!("the batch's commit failed: {err}"));
                for done in event_callers {
                    let _ = done.send(Err(failed()));
                }
                for done in write_callers {
                    let _ = done.send(Err(failed()));
                }
            }
        }
    }
}

/// The results of a batch: one per append, one per write.
type Written = (Vec<StoreResult<()>>, Vec<StoreResult<Value>>);

/// The batch in one transaction: each write in a savepoint, then the events in one (or,
/// if they fail together, one savepoint per append). `appends`: each append's number of
/// events. `Err` if the transaction failed: nothing of the batch is stored.
fn write_batch(
    connection: &mut Connection,
    events: &[NewEvent],
    appends: &[usize],
    works: Vec<Work>,
) -> StoreResult<Written> {
    let mut tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut write_results = Vec::with_capacity(works.len());
    for work in works {
        write_results.push(in_savepoint(&mut tx, work)?);
    }
    let event_results = if events.is_empty() {
        Vec::new()
    } else {
        match in_savepoint(&mut tx, |c| Ok((true, append_events(c, events)?)))? {
            Ok(results) => by_append(appends, results),
            Err(err) if appends.len() > 1 => {
                tracing::debug!(error = %err, appends = appends.len(), "batch failed; writing its appends one by one");
                let mut results = Vec::with_capacity(appends.len());
                for append in each_append(events, appends) {
                    let written = in_savepoint(&mut tx, |c| Ok((true, append_events(c, append)?)))?;
                    results.push(written.and_then(append_result));
                }
                results
            }
            Err(err) => vec![Err(err)],
        }
    };
    tx.commit()?;
    Ok((event_results, write_results))
}

/// Runs `work` in a savepoint of `tx`: released if it keeps its change, rolled back if it
/// undoes it or fails. The outer `Err` is a savepoint that could not be opened, released or
/// rolled back: the transaction is then in no known state and the batch fails.
fn in_savepoint<R>(
    tx: &mut Transaction<'_>,
    work: impl FnOnce(&Connection) -> StoreResult<(bool, R)>,
) -> StoreResult<StoreResult<R>> {
    let mut savepoint = tx.savepoint()?;
    let outcome = work(&savepoint);
    match outcome {
        Ok((true, value)) => {
            savepoint.commit()?;
            Ok(Ok(value))
        }
        Ok((false, value)) => {
            savepoint.rollback()?;
            savepoint.finish()?;
            Ok(Ok(value))
        }
        Err(err) => {
            savepoint.rollback()?;
            savepoint.finish()?;
            Ok(Err(err))
        }
    }
}

/// Appends `events`: checks that each event's owner owns its run, sets the run's
/// `last_seq`, inserts the events. One result per event: an event for a run its owner does
/// not own is refused, the others are written.
fn append_events(
    connection: &Connection,
    events: &[NewEvent],
) -> StoreResult<Vec<StoreResult<()>>> {
    let runs = runs_of(events);
    let now = events.iter().map(|e| e.now_ms).max().unwrap_or(0);
    // The (run, owner) pairs whose events may be written.
    let mut owned = HashSet::with_capacity(runs.len());
    let mut update = connection.prepare_cached(UPDATE_LAST_SEQ)?;
    for (run, owner, seq) in &runs {
        if update.execute(params![run.to_string(), owner.to_string(), seq, now])? == 1 {
            owned.insert((*run, *owner));
        }
    }
    let mut insert = connection.prepare_cached(INSERT_EVENT)?;
    for event in events {
        if owned.contains(&(event.run, event.owner)) {
            insert.execute(params![
                event.run.to_string(),
                event.seq,
                event.json,
                event.now_ms
            ])?;
        }
    }
    Ok(events
        .iter()
        .map(|e| {
            owned
                .contains(&(e.run, e.owner))
                .then_some(())
                .ok_or_else(|| not_owned(e))
        })
        .collect())
}
