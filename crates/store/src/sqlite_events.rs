//! The SQLite event log's writer: a thread of its own with a `rusqlite` connection and
//! prepared statements, so appending a run's events costs microseconds each.
//!
//! Why not sqlx, as for every other write: sqlx runs each SQLite connection on a worker
//! thread and sends it every statement over a channel, so a batch (`BEGIN`, the runs'
//! update, the insert, `COMMIT`) was four hand-offs there and back, and the multi-row insert
//! was a new statement text, parsed and planned again, for every batch size. Event appends
//! are most of what a run writes (about 50 per run), so those hand-offs and parses were
//! most of the event log's cost. Here the group-commit loop ([`crate::group_commit`]) runs
//! on this writer's thread: one wake-up per batch, then cached statements stepped in place.
//!
//! SQLite admits one writer at a time, and the store's other writes go through sqlx's one
//! writing connection (see `sqlite`). Two connections that both write would meet
//! `SQLITE_BUSY` and sleep in the busy handler; so this writer holds that connection (takes
//! it from its pool of one) while it writes a batch, and other writes wait their turn in
//! the pool's queue as they did before. Persist-before-deliver and each run's seq order are
//! the group commit's, unchanged: a caller hears back only after the commit.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};
use sqlx::SqlitePool;
use tokio::runtime::Handle;

use crate::group_commit::{not_owned, runs_of, BlockingBatchSink, NewEvent};
use crate::records::{StoreError, StoreResult};

/// How long a write waits for another process holding the database (`apex admin`, say)
/// before it fails; within this process writers never meet (see the module doc).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Appends events with its own connection while holding the store's writing connection.
pub(crate) struct SqliteEventSink {
    connection: Connection,
    /// The store's writing pool (one connection): holding its connection is holding the
    /// right to write, so no two connections of this process write at once.
    write_turn: SqlitePool,
    /// The runtime the store was opened on, to wait for `write_turn` from this thread.
    runtime: Handle,
}

impl SqliteEventSink {
    /// Opens the database at `path` (already created and migrated by the store) for
    /// appending events. `autocheckpoint_pages` as the store's writing connection.
    pub(crate) fn open(
        path: &Path,
        write_turn: SqlitePool,
        autocheckpoint_pages: &str,
    ) -> StoreResult<Self> {
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite_error)?;
        connection
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(sqlite_error)?;
        // The store's settings (WAL is a property of the file, set when it was created).
        connection
            .execute_batch(&format!(
                "PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
                 PRAGMA wal_autocheckpoint = {autocheckpoint_pages};"
            ))
            .map_err(sqlite_error)?;
        Ok(Self {
            connection,
            write_turn,
            runtime: Handle::current(),
        })
    }

    /// The batch in one transaction (see [`crate::group_commit::BatchSink::write_batch`]).
    fn write(&mut self, events: &[NewEvent]) -> rusqlite::Result<Vec<StoreResult<()>>> {
        let runs = runs_of(events);
        let now = events.iter().map(|e| e.now_ms).max().unwrap_or(0);
        let tx = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // The (run, owner) pairs whose events may be written.
        let mut owned = HashSet::with_capacity(runs.len());
        {
            // Checks the owner and sets last_seq; as every event does, refreshes a claimed
            // run's heartbeat.
            let mut update = tx.prepare_cached(
                "UPDATE runs SET last_seq = ?3, heartbeat_at = CASE \
                 WHEN instance_id IS NULL THEN heartbeat_at ELSE ?4 END \
                 WHERE id = ?1 AND user_id = ?2",
            )?;
            for (run, owner, seq) in &runs {
                if update.execute(params![run.to_string(), owner.to_string(), seq, now])? == 1 {
                    owned.insert((*run, *owner));
                }
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO run_events (run_id, seq, event, created_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
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
        }
        tx.commit()?;
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
}

impl BlockingBatchSink for SqliteEventSink {
    fn write_batch(&mut self, events: &[NewEvent]) -> StoreResult<Vec<StoreResult<()>>> {
        // Entered so that the lease, when dropped, can hand the connection back to its pool.
        let _runtime = self.runtime.enter();
        let turn = self.runtime.block_on(self.write_turn.acquire())?;
        let written = self.write(events).map_err(sqlite_error);
        drop(turn);
        written
    }
}

/// A `rusqlite` error as the store's: like sqlx's errors on the other writes, the
/// database's failure (a duplicate seq included: the emitter never reuses a written one).
fn sqlite_error(err: rusqlite::Error) -> StoreError {
    StoreError::Sqlite(err.to_string())
}
