//! SQLite's reader threads: a few threads, each owning a read-only `rusqlite` connection,
//! that run a whole read (every statement of it, in one read transaction) per hand-off.
//!
//! Why: through sqlx, each statement of a read is a hand-off to its connection's worker
//! thread and back, and every value of every row is copied into an owned value before the
//! caller decodes it. The usage window every run reads (a hundred or more rollup rows of 21
//! columns, then the rows of a partial edge day) was the largest single item of a run's
//! CPU, much of it those copies. Here the read runs where the rows are, decoding straight
//! from SQLite's buffers with the same decoders as sqlx's rows ([`crate::window`]), and its
//! statements see one snapshot.
//!
//! Here too the other reads each run makes: the thread's latest messages and the names in
//! the user's usage (triage reads both), and the run's row once it has ended.
//!
//! Only reads come here: every write keeps the store's one writing connection (see
//! `sqlite`). WAL lets these read while it writes; a read sees what was committed before it
//! began, as on the sqlx readers.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, params_from_iter, Connection, OpenFlags, Row, Transaction};
use tokio::sync::oneshot;

use crate::columns::{
    decode_message, decode_run, decode_usage_row, ended_run_sql, usage_names_sql, Columns,
    LATEST_MESSAGES_SQL, ROW_COLUMNS, RUN_FIELDS,
};
use crate::engine::Backend;
use crate::ids::{RunId, ThreadId, UserId};
use crate::records::{MessageRecord, RunRecord, StoreError, StoreResult, UsageRow};
use crate::rollups::{Rollup, Sketches};
use crate::window::{decode_group, WindowRead};

/// How long a read waits for another process holding the database (a checkpoint that
/// resets the WAL, say) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// A read to run on a reader thread's connection.
type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// The reader threads; they stop when this is dropped (their queue closes).
pub(crate) struct SqliteReaders {
    jobs: flume::Sender<Job>,
}

impl SqliteReaders {
    /// Starts `threads` readers of the database at `path` (already created and migrated).
    pub(crate) fn open(path: &Path, threads: usize) -> StoreResult<Self> {
        let (jobs, queue) = flume::unbounded::<Job>();
        for i in 0..threads.max(1) {
            let mut connection = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            connection.busy_timeout(BUSY_TIMEOUT)?;
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("apex-sqlite-read-{i}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv() {
                        // A read that panics fails its caller (its answer is dropped), not
                        // the thread: the others' reads go on.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut connection)));
                    }
                })
                .map_err(|err| StoreError::Sqlite(format!("starting a reader thread: {err}")))?;
        }
        Ok(Self { jobs })
    }

    /// Runs `read` in a read transaction on the next free reader thread.
    async fn read<R: Send + 'static>(
        &self,
        read: impl FnOnce(&Transaction<'_>) -> StoreResult<R> + Send + 'static,
    ) -> StoreResult<R> {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            let result = connection
                .transaction()
                .map_err(StoreError::from)
                .and_then(|tx| read(&tx));
            let _ = answer.send(result);
        });
        let stopped = || StoreError::Sqlite("the reader threads have stopped".into());
        self.jobs.send(job).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }

    /// `owner`'s (model, workload, spend) from the day `since_day` (see `Usage::usage_names`).
    pub(crate) async fn usage_names(
        &self,
        owner: UserId,
        since_day: i64,
    ) -> StoreResult<Vec<(String, String, f64)>> {
        self.read(move |tx| {
            let mut names = tx.prepare_cached(&usage_names_sql(Backend::Sqlite))?;
            let mut selected = names.query(params![owner.to_string(), since_day])?;
            let mut out = Vec::new();
            while let Some(row) = selected.next()? {
                out.push((row.get(0)?, row.get(1)?, row.get(2)?));
            }
            Ok(out)
        })
        .await
    }

    /// The `limit` latest messages of `owner`'s `thread`, newest first.
    pub(crate) async fn latest_messages(
        &self,
        owner: UserId,
        thread: ThreadId,
        limit: i64,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.read(move |tx| {
            let mut latest = tx.prepare_cached(LATEST_MESSAGES_SQL)?;
            let mut selected =
                latest.query(params![thread.to_string(), owner.to_string(), limit])?;
            let mut out = Vec::new();
            while let Some(row) = selected.next()? {
                out.push(decode_message(&SqliteColumns(row))?);
            }
            Ok(out)
        })
        .await
    }

    /// `owner`'s `run` if it has ended, with how it was superseded (if it was) and whether
    /// a queued run of its thread waits for it (see `Runs::settle_ended_run`).
    pub(crate) async fn ended_run(
        &self,
        owner: UserId,
        run: RunId,
    ) -> StoreResult<Option<(RunRecord, Option<String>, bool)>> {
        self.read(move |tx| {
            let mut ended = tx.prepare_cached(&ended_run_sql())?;
            let mut selected = ended.query(params![run.to_string(), owner.to_string()])?;
            let Some(row) = selected.next()? else {
                return Ok(None);
            };
            let record = decode_run(&SqliteColumns(row), 0)?;
            Ok(Some((
                record,
                row.get(RUN_FIELDS)?,
                row.get(RUN_FIELDS + 1)?,
            )))
        })
        .await
    }

    /// `owner`'s rollup of the rows dated in `[since, until]`, and with `after` the rollup
    /// of the rows after it when the rollups settle it (see [`WindowRead`]): the same as
    /// `rollups_sql::read_window_and_after`, on a reader thread.
    pub(crate) async fn window(
        &self,
        owner: UserId,
        since: i64,
        until: i64,
        sketches: Sketches,
        after: bool,
    ) -> StoreResult<(Rollup, Option<Rollup>)> {
        let Some(mut read) = WindowRead::new(since, until, sketches, after) else {
            return Ok((Rollup::default(), None));
        };
        self.read(move |tx| {
            let owner = owner.to_string();
            let (first_day, last_day) = read.days();
            let sql = format!(
                "SELECT day, provider, model, workload, source, {} FROM usage_rollups \
                 WHERE user_id = ?1 AND day >= ?2{}",
                read.group_columns(),
                if last_day.is_some() {
                    " AND day <= ?3"
                } else {
                    ""
                }
            );
            let mut groups = tx.prepare_cached(&sql)?;
            let mut selected = match last_day {
                Some(last_day) => groups.query(params![owner, first_day, last_day])?,
                None => groups.query(params![owner, first_day])?,
            };
            while let Some(row) = selected.next()? {
                let (key, group) = decode_group(&SqliteColumns(row))?;
                read.add_group(key, group);
            }
            drop(selected);
            let unsettled = read.unsettled();
            let mut rows: Vec<UsageRow> = Vec::new();
            if !unsettled.is_empty() {
                let ranges = vec!["(ts >= ? AND ts <= ?)"; unsettled.len()].join(" OR ");
                let mut edge = tx.prepare_cached(&format!(
                    "SELECT {ROW_COLUMNS} FROM workload_events WHERE user_id = ? AND ({ranges}) \
                     ORDER BY ts, id"
                ))?;
                let bounds = unsettled.iter().flat_map(|(from, to)| [*from, *to]);
                let values = std::iter::once(rusqlite::types::Value::Text(owner))
                    .chain(bounds.map(rusqlite::types::Value::Integer));
                let mut selected = edge.query(params_from_iter(values))?;
                while let Some(row) = selected.next()? {
                    rows.push(decode_usage_row(&SqliteColumns(row))?.row);
                }
            }
            Ok(read.finish(&rows))
        })
        .await
    }
}

/// A `rusqlite` row as the window's decoders read it.
pub(crate) struct SqliteColumns<'r, 's>(pub(crate) &'r Row<'s>);

impl Columns for SqliteColumns<'_, '_> {
    fn int(&self, i: usize) -> StoreResult<i64> {
        Ok(self.0.get(i)?)
    }
    fn optional_int(&self, i: usize) -> StoreResult<Option<i64>> {
        Ok(self.0.get(i)?)
    }
    fn real(&self, i: usize) -> StoreResult<f64> {
        Ok(self.0.get(i)?)
    }
    fn text(&self, i: usize) -> StoreResult<&str> {
        self.0.get_ref(i)?.as_str().map_err(|err| not_text(i, err))
    }
    fn optional_text(&self, i: usize) -> StoreResult<Option<&str>> {
        self.0
            .get_ref(i)?
            .as_str_or_null()
            .map_err(|err| not_text(i, err))
    }
}

/// The error of a column that should hold text and does not.
fn not_text(column: usize, err: rusqlite::types::FromSqlError) -> StoreError {
    StoreError::Corrupt(format!("column {column} is not text: {err}"))
}
