//! `SqliteStore`: the embedded engine (one file in the data folder), a shell around the
//! shared SQL (`shared.rs`) that owns its connections.
//!
//! WAL journal so readers never block the writer, `synchronous=NORMAL` (durable at
//! checkpoints, never corrupt), foreign keys on; `migrations/sqlite` run at open.
//!
//! Two pools: readers, and exactly one connection that writes. SQLite admits one writer at
//! a time; when two connections both want to write, the loser gets `SQLITE_BUSY` and its
//! busy handler *sleeps* in steps of 1, 2, 5 ... up to 100 ms before it looks again. Under
//! load (the event writer commits back to back) that put tens of milliseconds on ordinary
//! writes such as queueing a run. With one writing connection, writers wait in the pool's
//! FIFO queue instead and go the moment the previous write ends. The busy timeout stays as
//! a safety net for another process opening the same file (e.g. `apex admin`).
//!
//! Checkpoints (copying the WAL back into the database file, which is when SQLite syncs to
//! disk) run on their own connection every [`CHECKPOINT_INTERVAL`], not inside a writer's
//! commit: SQLite's automatic checkpoint would otherwise make one commit in every ~1,000
//! pages wait for a disk sync. The writer keeps a large automatic threshold as a backstop.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, Sqlite, SqlitePool};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::engine::Backend;
use crate::records::StoreResult;
use crate::roles::QueueSignals;
use crate::sqlite_reads::SqliteReaders;
use crate::sqlite_writer::SqliteWriter;
use crate::DatabasePool;

shared_sql!(db: Sqlite, engine: Backend::Sqlite, store: SqliteStore);

/// How often the background checkpoint copies committed WAL pages into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// The writer's automatic checkpoint threshold in pages (4 KiB each): only reached if the
/// background checkpoint falls behind, so the WAL cannot grow without bound.
const WRITER_AUTOCHECKPOINT_PAGES: &str = "16384";

/// The SQLite engine: its pools and background work; its SQL is `shared.rs`.
pub struct SqliteStore {
    /// Read-only work: WAL lets these read while the writer writes.
    reads: SqlitePool,
    /// The one connection that writes (see the module doc for why only one).
    writes: SqlitePool,
    /// The writer thread: run events and each run's own rows, many runs' per commit, on a
    /// connection of its own that takes its turn on `writes` (see `sqlite_writer`).
    events: SqliteWriter,
    /// Threads with connections of their own for the read every run makes, the usage
    /// window (see `sqlite_reads`).
    readers: SqliteReaders,
    /// Stops the background checkpoint when the store is dropped.
    _checkpoints: DropGuard,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` with the default pool and applies
    /// migrations.
    pub async fn open(url: &str) -> StoreResult<Self> {
        Self::open_with(url, &DatabasePool::default()).await
    }

    /// Like [`SqliteStore::open`] with the given pool limits.
    pub(crate) async fn open_with(url: &str, pool: &DatabasePool) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        // Created first: it creates the file and applies the migrations.
        let writes = SqlitePoolOptions::new()
            .max_connections(1)
            // A local file does not drop its connection: no ping before each write.
            .test_before_acquire(false)
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES),
            )
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writes).await?;
        shared::rollups_sql::backfill(&writes).await?;
        let reads = SqlitePoolOptions::new()
            .max_connections(pool.max_connections)
            // As for `writes`: a ping before each read was a third hand-off to the
            // connection's thread per read (sqlx already pings when a connection returns).
            .test_before_acquire(false)
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await?;
        let checkpoints = CancellationToken::new();
        let events = SqliteWriter::start(
            options.get_filename(),
            writes.clone(),
            WRITER_AUTOCHECKPOINT_PAGES,
        )?;
        let readers = SqliteReaders::open(options.get_filename(), reader_threads())?;
        let checkpoint_connection = options.pragma("wal_autocheckpoint", "0").connect().await?;
        tokio::spawn(checkpoint_loop(checkpoint_connection, checkpoints.clone()));
        Ok(Self {
            reads,
            writes,
            events,
            readers,
            _checkpoints: checkpoints.drop_guard(),
        })
    }
}

impl SqliteStore {
    /// The reader threads, for the reads every run makes (see `sqlite_reads`).
    fn readers(&self) -> Option<&SqliteReaders> {
        Some(&self.readers)
    }

    /// The writer thread, for the writes every run makes (see `sqlite_writer`).
    fn writer(&self) -> Option<&SqliteWriter> {
        Some(&self.events)
    }
}

/// Reader threads: one per core, at most four (a window read is well under a millisecond;
/// more threads than cores would only queue behind the runtime's).
fn reader_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(4))
}

/// Copies committed WAL pages into the database file every [`CHECKPOINT_INTERVAL`] until
/// `stop`. `PASSIVE` never waits for readers or the writer: what it cannot copy now it
/// copies next time.
async fn checkpoint_loop(mut connection: SqliteConnection, stop: CancellationToken) {
    let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(err) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut connection)
            .await
        {
            // The writer's automatic checkpoint is the backstop meanwhile.
            tracing::warn!(error = %err, "SQLite background checkpoint failed");
        }
    }
    let _ = connection.close().await;
}

// One process is all there is: no announcements to others (the no-op defaults).
impl QueueSignals for SqliteStore {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::UserId;
    use crate::records::{UsageRow, UserRecord};
    use crate::roles::{Accounts, Usage};
    use crate::rollups::Sketches;

    const DAY_MS: i64 = 24 * 3600 * 1000;

    /// A new store in a temporary folder (kept while the folder lives) with one user.
    async fn store_with_user() -> (tempfile::TempDir, SqliteStore, UserId) {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("apex.db").display());
        let store = SqliteStore::open(&url).await.expect("open");
        let owner = UserId::generate();
        store
            .create_user(&UserRecord {
                id: owner,
                email: "owner@example.com".into(),
                name: None,
                password_hash: "hash".into(),
                created_at_ms: 0,
            })
            .await
            .expect("user");
        (dir, store, owner)
    }

    /// The plan's lines that read a whole table: a `SCAN` of anything but a constant row
    /// or a subquery's result, or a `SEARCH` without an index (SQLite's plan for
    /// `MAX(x) ... WHERE` on an unindexed column).
    fn full_scans(connection: &rusqlite::Connection, sql: &str) -> Vec<String> {
        let mut plan = connection
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap_or_else(|e| panic!("{e}: {sql}"));
        let mut rows = plan.raw_query();
        let mut scans = Vec::new();
        while let Some(row) = rows.next().expect("plan row") {
            let detail: String = row.get(3).expect("plan detail");
            let scan = detail.starts_with("SCAN ")
                && !detail.contains("CONSTANT ROW")
                && !detail.contains("SUBQUERY");
            let unindexed_search = detail.starts_with("SEARCH ") && !detail.contains(" USING ");
            if scan || unindexed_search {
                scans.push(detail);
            }
        }
        scans
    }

    /// Every statement a run makes on the writer and reader threads finds its rows through
    /// an index: none reads a table that grows with every run, message or usage row (a
    /// submission used to scan all of `runs` to number its run within its thread).
    #[tokio::test]
    async fn the_statements_every_run_makes_read_no_whole_table() {
        use crate::columns::{ended_run_sql, usage_names_sql, LATEST_MESSAGES_SQL};
        use crate::run_sql::{
            supersede_sql, DELETE_RUN_MESSAGES, INSERT_MESSAGE, INSERT_QUEUED_RUN, INSERT_THREAD,
            SET_RUN_STATUS, UNFINISHED_RUNS,
        };
        use crate::sqlite_writer::{INSERT_EVENT, UPDATE_LAST_SEQ};

        let (dir, _store, _owner) = store_with_user().await;
        let connection = rusqlite::Connection::open(dir.path().join("apex.db")).expect("open");
        let statements = [
            INSERT_THREAD.to_owned(),
            INSERT_MESSAGE.to_owned(),
            UNFINISHED_RUNS.to_owned(),
            supersede_sql(),
            DELETE_RUN_MESSAGES.to_owned(),
            INSERT_QUEUED_RUN.to_owned(),
            SET_RUN_STATUS.to_owned(),
            UPDATE_LAST_SEQ.to_owned(),
            INSERT_EVENT.to_owned(),
            LATEST_MESSAGES_SQL.to_owned(),
            ended_run_sql(),
            usage_names_sql(Backend::Sqlite),
        ];
        for sql in &statements {
            assert_eq!(full_scans(&connection, sql), Vec::<String>::new(), "{sql}");
        }
    }

    /// The reader threads' window is the sqlx read's, for windows that start and end
    /// anywhere in a day, with and without what follows and each sketch; their names in the
    /// usage too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_reader_threads_read_a_window_as_the_sqlx_read_does() {
        let (_dir, store, owner) = store_with_user().await;
        // Rows every 7 hours and a bit over ten days, two models, with a source_ref on
        // every third (an optional text column).
        let start = 100 * DAY_MS;
        let rows: Vec<UsageRow> = (0..36)
            .map(|i| UsageRow {
                provider: "openai".into(),
                model: if i % 2 == 0 { "gpt-4o" } else { "gpt-4o-mini" }.into(),
                workload: "chat".into(),
                ts_ms: start + i * 7 * 3600 * 1000 + i * 13,
                prompt_tokens: 100 + i * 37,
                completion_tokens: 20 + i * 11,
                latency_ms: 200 + i * 29,
                cost_usd: 0.001 * i as f64,
                source_ref: (i % 3 == 0).then(|| format!("r{i}")),
                ..UsageRow::default()
            })
            .collect();
        store.insert_usage(owner, &rows).await.expect("rows");
        let instants = [
            start - DAY_MS,
            start,
            start + 5 * 3600 * 1000,
            start + 3 * DAY_MS - 1,
            start + 4 * DAY_MS + 17,
            start + 10 * DAY_MS + 9 * 3600 * 1000,
            start + 20 * DAY_MS,
        ];
        let sketch_choices = [
            Sketches::default(),
            Sketches {
                latency: true,
                completion: true,
            },
        ];
        let mut compared = 0;
        for &since in &instants {
            for &until in &instants {
                for sketches in sketch_choices {
                    for after in [false, true] {
                        let threads = store
                            .readers
                            .window(owner, since, until, sketches, after)
                            .await
                            .expect("reader threads");
                        let sqlx = shared::rollups_sql::read_window_and_after(
                            &store.reads,
                            owner,
                            since,
                            until,
                            sketches,
                            after,
                        )
                        .await
                        .expect("sqlx");
                        assert_eq!(threads, sqlx, "window {since}..={until}, after {after}");
                        compared += usize::from(!threads.0.groups.is_empty());
                    }
                }
            }
        }
        assert!(compared > 20, "only {compared} windows held rows");
        // The names and spend by model and workload, likewise.
        for &since in &instants {
            let day = crate::rollups::day_of(since);
            let threads = store.readers.usage_names(owner, day).await.expect("names");
            let sqlx: Vec<(String, String, f64)> =
                sqlx::query_as(&crate::columns::usage_names_sql(Backend::Sqlite))
                    .bind(owner.to_string())
                    .bind(day)
                    .fetch_all(&store.reads)
                    .await
                    .expect("sqlx names");
            assert_eq!(threads, sqlx, "names since day {day}");
        }
        let all = store.readers.usage_names(owner, 0).await.expect("names");
        assert_eq!(all.len(), 2, "{all:?}");
    }

    fn message_on(thread_id: crate::ids::ThreadId, content: &str) -> crate::records::MessageRecord {
        crate::records::MessageRecord {
            id: crate::ids::MessageId::generate(),
            thread_id,
            role: "user".into(),
            content: content.into(),
            metadata: serde_json::json!({}),
            created_at_ms: 1,
            superseded_by: None,
        }
    }

    fn new_thread() -> crate::records::ThreadRecord {
        crate::records::ThreadRecord {
            id: crate::ids::ThreadId::generate(),
            title: "t".into(),
            metadata: serde_json::json!({}),
            created_at_ms: 1,
            updated_at_ms: 1,
            message_count: 0,
        }
    }

    /// Writes committed in one batch of the writer thread stand or fall each on its own: a
    /// refused submission leaves neither its new thread nor its message, a failing insert
    /// fails alone, and the accepted submission and the events beside them are stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_batch_of_the_writer_keeps_each_write_apart() {
        use crate::records::{RunRecord, RunSubmission, SubmitOutcome};
        use crate::roles::{EventLog, Runs, Threads};
        use apex_protocol::threads::{MultitaskStrategy, RunStatus};
        use std::sync::Arc;

        let (_dir, store, owner) = store_with_user().await;
        let store = Arc::new(store);
        let existing = new_thread();
        store.create_thread(owner, &existing).await.expect("thread");
        let first = message_on(existing.id, "first");
        assert!(store.insert_message(owner, &first).await.expect("first"));

        let submit = |thread: crate::records::ThreadRecord, max_unfinished: usize| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let message = message_on(thread.id, "question");
                let run = RunRecord {
                    id: crate::ids::RunId::generate(),
                    thread_id: thread.id,
                    status: RunStatus::Queued,
                    created_at_ms: 1,
                    started_at_ms: None,
                    finished_at_ms: None,
                    error: None,
                    last_seq: 0,
                };
                let outcome = store
                    .submit_run(
                        owner,
                        &RunSubmission {
                            message: &message,
                            run: &run,
                            request_id: "r",
                            max_unfinished,
                            claim_by: None,
                            new_thread: Some(&thread),
                            strategy: MultitaskStrategy::Reject,
                            require_approval: None,
                        },
                    )
                    .await;
                (run.id, outcome)
            })
        };
        // Holding the write turn keeps the writer waiting after the first job it takes, so
        // the jobs sent meanwhile are committed together in the batch after it.
        let turn = store.writes.acquire().await.expect("write turn");
        let opener = submit(new_thread(), 10);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (refused_thread, accepted_thread) = (new_thread(), new_thread());
        let refused = submit(refused_thread.clone(), 0);
        let accepted = submit(accepted_thread.clone(), 10);
        let duplicate = {
            let store = Arc::clone(&store);
            let again = first.clone();
            tokio::spawn(async move { store.insert_message(owner, &again).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(turn);

        let (opener_run, opener) = opener.await.expect("task");
        assert_eq!(opener.expect("opener"), SubmitOutcome::Queued);
        let (_, refused) = refused.await.expect("task");
        assert_eq!(refused.expect("refused"), SubmitOutcome::TooManyRuns);
        let (accepted_run, accepted) = accepted.await.expect("task");
        assert_eq!(accepted.expect("accepted"), SubmitOutcome::Queued);
        let duplicate = duplicate.await.expect("task");
        assert!(
            duplicate.is_err(),
            "a second message with one id: {duplicate:?}"
        );

        assert!(store
            .get_thread(owner, refused_thread.id)
            .await
            .expect("read")
            .is_none());
        let (accepted_messages, total) = store
            .list_messages(owner, accepted_thread.id, 10, 0)
            .await
            .expect("read");
        assert_eq!((accepted_messages.len(), total), (1, 1));
        let (existing_messages, _) = store
            .list_messages(owner, existing.id, 10, 0)
            .await
            .expect("read");
        assert_eq!(existing_messages.len(), 1, "the duplicate was not stored");
        for run in [opener_run, accepted_run] {
            assert!(store.get_run(owner, run).await.expect("read").is_some());
        }

        // Events beside a failing write, in one batch, are stored; a run's status too.
        let turn = store.writes.acquire().await.expect("write turn");
        let blocker = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .set_run_status(owner, opener_run, RunStatus::Running, None, 2)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let events = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store.append_event(owner, accepted_run, 1, "{}", 3).await?;
                store.append_event(owner, accepted_run, 1, "{}", 3).await
            })
        };
        let again = {
            let store = Arc::clone(&store);
            let first = first.clone();
            tokio::spawn(async move { store.insert_message(owner, &first).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(turn);
        blocker.await.expect("task").expect("status");
        assert!(again.await.expect("task").is_err());
        assert!(
            events.await.expect("task").is_err(),
            "the second event with seq 1 is refused"
        );
        let stored = store
            .list_events(owner, accepted_run, 0, 100)
            .await
            .expect("events");
        assert_eq!(stored.len(), 1);
        let run = store.get_run(owner, opener_run).await.expect("read");
        assert_eq!(run.map(|r| r.status), Some(RunStatus::Running));
    }

    /// A write that panics fails alone: its batch rolls back, and the writer thread goes on
    /// to write the next ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_thread_outlives_a_write_that_panics() {
        use crate::roles::Threads;
        use crate::sqlite_writer::Change;

        let (_dir, store, owner) = store_with_user().await;
        let panicked = store
            .events
            .write(|_| -> StoreResult<Change<()>> { panic!("a bug in a write") })
            .await;
        assert!(panicked.is_err());
        let thread = new_thread();
        store.create_thread(owner, &thread).await.expect("thread");
        let message = message_on(thread.id, "after the panic");
        assert!(store.insert_message(owner, &message).await.expect("insert"));
    }
}
