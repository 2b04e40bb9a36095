//! `SqliteStore`: the embedded storage backend (one file in the data folder).
//!
//! WAL journal so readers never block the writer, `synchronous=NORMAL` (durable at
//! checkpoints, never corrupt), foreign keys on. Migrations in `migrations/sqlite` run at
//! open.
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

use std::collections::HashSet;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};
use sqlx::{QueryBuilder, Row, Sqlite, SqlitePool};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::group_commit::{not_owned, runs_of, BatchSink, EventWriter, NewEvent};
use super::{
    parse_json_column, MessageRecord, QueueEntry, RunRecord, RunSubmission, Store, StoreError,
    StoreResult, StoredEvent, SubmitOutcome, ThreadRecord, UsageRow, UserRecord,
};
use super::{usage_sql, CompletionRank, SavingsQuery, SavingsTotals, UsageDayTotals, UsageTotals};
use crate::ids::{MessageId, RunId, ThreadId, UserId};
use crate::settings::DatabasePool;
use apex_protocol::threads::RunStatus;

/// How often the background checkpoint copies committed WAL pages into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(500);

/// The writer's automatic checkpoint threshold in pages (4 KiB each): only reached if the
/// background checkpoint falls behind, so the WAL cannot grow without bound.
const WRITER_AUTOCHECKPOINT_PAGES: &str = "16384";

pub struct SqliteStore {
    /// Read-only work: WAL lets these read while the writer writes.
    reads: SqlitePool,
    /// The one connection that writes (see the module doc for why only one).
    writes: SqlitePool,
    /// Appends run events in batches (see [`super::group_commit`]), on `writes`.
    events: EventWriter,
    /// Stops the background checkpoint when the store is dropped.
    _checkpoints: DropGuard,
}

/// SQLite's SQL for [`group_commit`](super::group_commit).
struct SqliteEvents {
    pool: SqlitePool,
}

#[async_trait]
impl BatchSink for SqliteEvents {
    async fn write_one(&self, event: &NewEvent) -> StoreResult<()> {
        let mut tx = self.pool.begin().await?;
        // An event is also a claimed run's proof of life (as on PostgreSQL).
        let updated = sqlx::query(
            "UPDATE runs SET last_seq = ?, \
             heartbeat_at = CASE WHEN instance_id IS NULL THEN heartbeat_at ELSE ? END \
             WHERE id = ? AND user_id = ?",
        )
        .bind(event.seq)
        .bind(event.now_ms)
        .bind(event.run.to_string())
        .bind(event.owner.to_string())
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(not_owned(event));
        }
        sqlx::query("INSERT INTO run_events (run_id, seq, event, created_at) VALUES (?, ?, ?, ?)")
            .bind(event.run.to_string())
            .bind(event.seq)
            .bind(&event.json)
            .bind(event.now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn write_batch(&self, events: &[NewEvent]) -> StoreResult<Vec<StoreResult<()>>> {
        let runs = runs_of(events);
        let mut tx = self.pool.begin().await?;
        // One statement checks every run's owner and sets its last_seq; the runs it returns
        // are the ones whose events may be written.
        let mut update: QueryBuilder<Sqlite> =
            QueryBuilder::new("WITH v(run_id, user_id, seq) AS (");
        update.push_values(&runs, |mut b, (run, owner, seq)| {
            b.push_bind(run.to_string())
                .push_bind(owner.to_string())
                .push_bind(*seq);
        });
        let now = events.iter().map(|e| e.now_ms).max().unwrap_or(0);
        update.push(
            ") UPDATE runs SET last_seq = v.seq, heartbeat_at = CASE \
             WHEN runs.instance_id IS NULL THEN runs.heartbeat_at ELSE ",
        );
        update.push_bind(now);
        update.push(
            " END FROM v WHERE runs.id = v.run_id AND runs.user_id = v.user_id \
             RETURNING runs.id, runs.user_id",
        );
        let owned: HashSet<(String, String)> = update
            .build()
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| Ok((row.try_get("id")?, row.try_get("user_id")?)))
            .collect::<Result<_, sqlx::Error>>()?;
        let keys: Vec<(String, String)> = events
            .iter()
            .map(|e| (e.run.to_string(), e.owner.to_string()))
            .collect();
        let accepted: Vec<(&NewEvent, &str)> = events
            .iter()
            .zip(&keys)
            .filter(|(_, key)| owned.contains(*key))
            .map(|(e, (run, _))| (e, run.as_str()))
            .collect();
        if !accepted.is_empty() {
            let mut insert: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO run_events (run_id, seq, event, created_at) ");
            insert.push_values(&accepted, |mut b, (event, run)| {
                b.push_bind(*run)
                    .push_bind(event.seq)
                    .push_bind(event.json.as_str())
                    .push_bind(event.now_ms);
            });
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(events
            .iter()
            .zip(&keys)
            .map(|(e, key)| {
                if owned.contains(key) {
                    Ok(())
                } else {
                    Err(not_owned(e))
                }
            })
            .collect())
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` with the default pool and applies
    /// migrations.
    pub async fn open(url: &str) -> StoreResult<Self> {
        Self::open_with(url, &DatabasePool::default()).await
    }

    /// Like [`SqliteStore::open`] with the given pool limits.
    pub async fn open_with(url: &str, pool: &DatabasePool) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        // Created first: it creates the file and applies the migrations.
        let writes = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(
                options
                    .clone()
                    .pragma("wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES),
            )
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writes).await?;
        let reads = SqlitePoolOptions::new()
            .max_connections(pool.max_connections)
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await?;
        let checkpoints = CancellationToken::new();
        let checkpoint_connection = options.pragma("wal_autocheckpoint", "0").connect().await?;
        tokio::spawn(checkpoint_loop(checkpoint_connection, checkpoints.clone()));
        let events = EventWriter::start(SqliteEvents {
            pool: writes.clone(),
        });
        Ok(Self {
            reads,
            writes,
            events,
            _checkpoints: checkpoints.drop_guard(),
        })
    }
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

fn unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

fn parse_stored_id<T>(
    raw: &str,
    parse: fn(&str) -> Result<T, crate::ids::IdError>,
) -> StoreResult<T> {
    parse(raw).map_err(|e| StoreError::Corrupt(format!("id {raw:?}: {e}")))
}

fn user_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<UserRecord> {
    Ok(UserRecord {
        id: parse_stored_id(row.try_get("id")?, UserId::parse)?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        password_hash: row.try_get("password_hash")?,
        created_at_ms: row.try_get("created_at")?,
    })
}

fn thread_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<ThreadRecord> {
    Ok(ThreadRecord {
        id: parse_stored_id(row.try_get("id")?, ThreadId::parse)?,
        title: row.try_get("title")?,
        metadata: parse_json_column(row.try_get("metadata")?)?,
        created_at_ms: row.try_get("created_at")?,
        updated_at_ms: row.try_get("updated_at")?,
        message_count: row.try_get("message_count")?,
    })
}

fn message_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<MessageRecord> {
    Ok(MessageRecord {
        id: parse_stored_id(row.try_get("id")?, MessageId::parse)?,
        thread_id: parse_stored_id(row.try_get("thread_id")?, ThreadId::parse)?,
        role: row.try_get("role")?,
        content: row.try_get("content")?,
        metadata: parse_json_column(row.try_get("metadata")?)?,
        created_at_ms: row.try_get("created_at")?,
    })
}

fn run_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<RunRecord> {
    let status: String = row.try_get("status")?;
    let last_seq: i64 = row.try_get("last_seq")?;
    Ok(RunRecord {
        id: parse_stored_id(row.try_get("id")?, RunId::parse)?,
        thread_id: parse_stored_id(row.try_get("thread_id")?, ThreadId::parse)?,
        status: RunStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("run status {status:?}")))?,
        created_at_ms: row.try_get("created_at")?,
        started_at_ms: row.try_get("started_at")?,
        finished_at_ms: row.try_get("finished_at")?,
        error: row.try_get("error")?,
        last_seq: u64::try_from(last_seq).unwrap_or(0),
    })
}

const THREAD_COLUMNS: &str = "t.id, t.title, t.metadata, t.created_at, t.updated_at, \
     (SELECT COUNT(*) FROM messages m WHERE m.thread_id = t.id) AS message_count";

const RUN_COLUMNS: &str =
    "id, thread_id, status, created_at, started_at, finished_at, error, last_seq";

/// A run's columns plus what the queue needs to execute it again.
const QUEUE_COLUMNS: &str = "user_id, input, request_id, attempts, instance_id, \
     id, thread_id, status, created_at, started_at, finished_at, error, last_seq";

fn queue_entry_from_row(row: &sqlx::sqlite::SqliteRow) -> StoreResult<QueueEntry> {
    let attempts: i64 = row.try_get("attempts")?;
    Ok(QueueEntry {
        owner: parse_stored_id(row.try_get("user_id")?, UserId::parse)?,
        run: run_from_row(row)?,
        input: row.try_get("input")?,
        request_id: row.try_get("request_id")?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        instance: row.try_get("instance_id")?,
    })
}

/// Whether any run waits in the queue for an instance ([`super::RUNS_WAITING`]).
async fn runs_waiting(tx: &mut sqlx::Transaction<'_, Sqlite>) -> StoreResult<bool> {
    let row = sqlx::query(super::RUNS_WAITING)
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.try_get("waiting")?)
}

/// Appends `message` to a thread of `owner` inside `tx`; `false` if the thread is not
/// theirs. Its first statement writes, so it takes the database's write lock.
async fn insert_message_in(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    owner: UserId,
    message: &MessageRecord,
) -> StoreResult<bool> {
    // The INSERT ... SELECT only matches a thread of `owner`; the position keeps
    // messages in insertion order even when two share a millisecond.
    let result = sqlx::query(
        "INSERT INTO messages (id, thread_id, user_id, role, content, metadata, created_at, position) \
         SELECT ?, t.id, t.user_id, ?, ?, ?, ?, \
                (SELECT COALESCE(MAX(position), 0) + 1 FROM messages WHERE thread_id = t.id) \
         FROM threads t WHERE t.id = ? AND t.user_id = ?",
    )
    .bind(message.id.to_string())
    .bind(&message.role)
    .bind(&message.content)
    .bind(message.metadata.to_string())
    .bind(message.created_at_ms)
    .bind(message.thread_id.to_string())
    .bind(owner.to_string())
    .execute(&mut **tx)
    .await?;
    if result.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query("UPDATE threads SET updated_at = ? WHERE id = ? AND user_id = ?")
        .bind(message.created_at_ms)
        .bind(message.thread_id.to_string())
        .bind(owner.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(true)
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(&self, user: &UserRecord) -> StoreResult<()> {
        let result = sqlx::query(
            "INSERT INTO users (id, email, name, password_hash, created_at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(user.id.to_string())
        .bind(&user.email)
        .bind(&user.name)
        .bind(&user.password_hash)
        .bind(user.created_at_ms)
        .execute(&self.writes)
        .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) if unique_violation(&err) => Err(StoreError::Conflict),
            Err(err) => Err(err.into()),
        }
    }

    async fn find_user_by_email(&self, email: &str) -> StoreResult<Option<UserRecord>> {
        let row = sqlx::query(
            "SELECT id, email, name, password_hash, created_at FROM users WHERE email = ?",
        )
        .bind(email)
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn get_user(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        let row = sqlx::query(
            "SELECT id, email, name, password_hash, created_at FROM users WHERE id = ?",
        )
        .bind(id.to_string())
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn insert_refresh_token(
        &self,
        jti: &str,
        user: UserId,
        access_jti: &str,
        expires_at_ms: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO refresh_tokens (jti, user_id, access_jti, expires_at) VALUES (?, ?, ?, ?)",
        )
        .bind(jti)
        .bind(user.to_string())
        .bind(access_jti)
        .bind(expires_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn consume_refresh_token(
        &self,
        jti: &str,
        user: UserId,
        now_ms: i64,
    ) -> StoreResult<bool> {
        // One statement: two concurrent refreshes with the same token cannot both win.
        let result = sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = ? \
             WHERE jti = ? AND user_id = ? AND revoked_at IS NULL AND expires_at > ?",
        )
        .bind(now_ms)
        .bind(jti)
        .bind(user.to_string())
        .bind(now_ms)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn revoke_session(
        &self,
        access_jti: &str,
        access_expires_at_ms: i64,
        now_ms: i64,
    ) -> StoreResult<()> {
        let mut tx = self.writes.begin().await?;
        sqlx::query(
            "INSERT INTO revoked_access_tokens (jti, expires_at) VALUES (?, ?) \
             ON CONFLICT (jti) DO NOTHING",
        )
        .bind(access_jti)
        .bind(access_expires_at_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = ? WHERE access_jti = ? AND revoked_at IS NULL",
        )
        .bind(now_ms)
        .bind(access_jti)
        .execute(&mut *tx)
        .await?;
        // Housekeeping: expired revocations are useless, since the token is rejected anyway.
        sqlx::query("DELETE FROM revoked_access_tokens WHERE expires_at < ?")
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn is_access_token_revoked(&self, jti: &str) -> StoreResult<bool> {
        let row = sqlx::query("SELECT 1 FROM revoked_access_tokens WHERE jti = ?")
            .bind(jti)
            .fetch_optional(&self.reads)
            .await?;
        Ok(row.is_some())
    }

    async fn insert_ticket(
        &self,
        ticket_id: &str,
        user: UserId,
        expires_at_ms: i64,
        single_use: bool,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO ws_tickets (id, user_id, expires_at, single_use) VALUES (?, ?, ?, ?)",
        )
        .bind(ticket_id)
        .bind(user.to_string())
        .bind(expires_at_ms)
        .bind(single_use)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn redeem_ticket(&self, ticket_id: &str, now_ms: i64) -> StoreResult<Option<UserId>> {
        let row = sqlx::query(
            "UPDATE ws_tickets SET used_at = ? \
             WHERE id = ? AND expires_at > ? AND (single_use = 0 OR used_at IS NULL) \
             RETURNING user_id",
        )
        .bind(now_ms)
        .bind(ticket_id)
        .bind(now_ms)
        .fetch_optional(&self.writes)
        .await?;
        match row {
            Some(row) => Ok(Some(parse_stored_id(
                row.try_get("user_id")?,
                UserId::parse,
            )?)),
            None => Ok(None),
        }
    }

    async fn create_thread(&self, owner: UserId, thread: &ThreadRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO threads (id, user_id, title, metadata, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(thread.id.to_string())
        .bind(owner.to_string())
        .bind(&thread.title)
        .bind(thread.metadata.to_string())
        .bind(thread.created_at_ms)
        .bind(thread.updated_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn list_threads(
        &self,
        owner: UserId,
        limit: i64,
        offset: i64,
    ) -> StoreResult<Vec<ThreadRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {THREAD_COLUMNS} FROM threads t WHERE t.user_id = ? \
             ORDER BY t.updated_at DESC, t.id LIMIT ? OFFSET ?"
        ))
        .bind(owner.to_string())
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(thread_from_row).collect()
    }

    async fn get_thread(&self, owner: UserId, id: ThreadId) -> StoreResult<Option<ThreadRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {THREAD_COLUMNS} FROM threads t WHERE t.id = ? AND t.user_id = ?"
        ))
        .bind(id.to_string())
        .bind(owner.to_string())
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(thread_from_row).transpose()
    }

    async fn update_thread(
        &self,
        owner: UserId,
        id: ThreadId,
        title: &str,
        metadata: &Value,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE threads SET title = ?, metadata = ?, updated_at = ? WHERE id = ? AND user_id = ?",
        )
        .bind(title)
        .bind(metadata.to_string())
        .bind(now_ms)
        .bind(id.to_string())
        .bind(owner.to_string())
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn delete_thread(&self, owner: UserId, id: ThreadId) -> StoreResult<bool> {
        let result = sqlx::query("DELETE FROM threads WHERE id = ? AND user_id = ?")
            .bind(id.to_string())
            .bind(owner.to_string())
            .execute(&self.writes)
            .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn insert_message(&self, owner: UserId, message: &MessageRecord) -> StoreResult<bool> {
        let mut tx = self.writes.begin().await?;
        if !insert_message_in(&mut tx, owner, message).await? {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn list_messages(
        &self,
        owner: UserId,
        thread: ThreadId,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<MessageRecord>, i64)> {
        let rows = sqlx::query(
            "SELECT id, thread_id, role, content, metadata, created_at FROM messages \
             WHERE thread_id = ? AND user_id = ? ORDER BY position LIMIT ? OFFSET ?",
        )
        .bind(thread.to_string())
        .bind(owner.to_string())
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.reads)
        .await?;
        let total: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM messages WHERE thread_id = ? AND user_id = ?")
                .bind(thread.to_string())
                .bind(owner.to_string())
                .fetch_one(&self.reads)
                .await?
                .try_get("n")?;
        let messages = rows
            .iter()
            .map(message_from_row)
            .collect::<StoreResult<_>>()?;
        Ok((messages, total))
    }

    async fn create_run_on(
        &self,
        owner: UserId,
        run: &RunRecord,
        instance: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO runs (id, user_id, thread_id, status, created_at, instance_id) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(run.id.to_string())
        .bind(owner.to_string())
        .bind(run.thread_id.to_string())
        .bind(run.status.as_str())
        .bind(run.created_at_ms)
        .bind(instance)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn recent_runs(
        &self,
        owner: UserId,
        finished_since_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<RunRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE user_id = ? \
             AND (status IN ('queued', 'running') OR finished_at >= ?) \
             ORDER BY created_at DESC, id LIMIT ?"
        ))
        .bind(owner.to_string())
        .bind(finished_since_ms)
        .bind(limit.max(0))
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn get_run(&self, owner: UserId, id: RunId) -> StoreResult<Option<RunRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE id = ? AND user_id = ?"
        ))
        .bind(id.to_string())
        .bind(owner.to_string())
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn set_run_status(
        &self,
        owner: UserId,
        id: RunId,
        status: RunStatus,
        error: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<()> {
        let (started, finished) = match status {
            RunStatus::Running => (Some(now_ms), None),
            s if s.is_terminal() => (None, Some(now_ms)),
            _ => (None, None),
        };
        sqlx::query(
            "UPDATE runs SET status = ?, error = COALESCE(?, error), \
             started_at = COALESCE(started_at, ?), finished_at = COALESCE(?, finished_at) \
             WHERE id = ? AND user_id = ?",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(started)
        .bind(finished)
        .bind(id.to_string())
        .bind(owner.to_string())
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn append_event(
        &self,
        owner: UserId,
        run: RunId,
        seq: u64,
        json: &str,
        now_ms: i64,
    ) -> StoreResult<()> {
        let seq = i64::try_from(seq).map_err(|_| StoreError::Corrupt("seq overflow".into()))?;
        self.events
            .append(NewEvent {
                owner,
                run,
                seq,
                json: json.to_string(),
                now_ms,
            })
            .await
    }

    async fn list_events(
        &self,
        owner: UserId,
        run: RunId,
        after_seq: u64,
        limit: i64,
    ) -> StoreResult<Vec<StoredEvent>> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT e.seq, e.event FROM run_events e JOIN runs r ON r.id = e.run_id \
             WHERE e.run_id = ? AND r.user_id = ? AND e.seq > ? ORDER BY e.seq LIMIT ?",
        )
        .bind(run.to_string())
        .bind(owner.to_string())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|row| {
                let seq: i64 = row.try_get("seq")?;
                Ok(StoredEvent {
                    seq: u64::try_from(seq).unwrap_or(0),
                    json: row.try_get("event")?,
                })
            })
            .collect()
    }

    async fn insert_usage(&self, owner: UserId, rows: &[UsageRow]) -> StoreResult<u64> {
        let mut tx = self.writes.begin().await?;
        let mut inserted = 0;
        // SQLite allows 32766 bound parameters; 11 per row.
        for chunk in rows.chunks(500) {
            let mut builder: QueryBuilder<Sqlite> = QueryBuilder::new(
                "INSERT INTO workload_events (user_id, provider, model, workload, ts, \
                 prompt_tokens, completion_tokens, latency_ms, status, cost_usd) ",
            );
            builder.push_values(chunk, |mut b, row| {
                b.push_bind(owner.to_string())
                    .push_bind(&row.provider)
                    .push_bind(&row.model)
                    .push_bind(&row.workload)
                    .push_bind(row.ts_ms)
                    .push_bind(row.prompt_tokens)
                    .push_bind(row.completion_tokens)
                    .push_bind(row.latency_ms)
                    .push_bind(&row.status)
                    .push_bind(row.cost_usd);
            });
            inserted += builder.build().execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn usage_rows_since(&self, owner: UserId, since_ms: i64) -> StoreResult<Vec<UsageRow>> {
        let rows = sqlx::query(
            "SELECT provider, model, workload, ts, prompt_tokens, completion_tokens, latency_ms, \
             status, cost_usd FROM workload_events WHERE user_id = ? AND ts >= ? ORDER BY ts, id",
        )
        .bind(owner.to_string())
        .bind(since_ms)
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(UsageRow {
                    provider: row.try_get("provider")?,
                    model: row.try_get("model")?,
                    workload: row.try_get("workload")?,
                    ts_ms: row.try_get("ts")?,
                    prompt_tokens: row.try_get("prompt_tokens")?,
                    completion_tokens: row.try_get("completion_tokens")?,
                    latency_ms: row.try_get("latency_ms")?,
                    status: row.try_get("status")?,
                    cost_usd: row.try_get("cost_usd")?,
                })
            })
            .collect()
    }

    async fn usage_totals(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageTotals>> {
        let rows =
            usage_sql::totals::<Sqlite>(usage_sql::Engine::Sqlite, owner, since_ms, until_ms)
                .build()
                .fetch_all(&self.reads)
                .await?;
        rows.iter().map(usage_sql::totals_from_row).collect()
    }

    async fn usage_latency_at_ranks(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        ranks: &[i64],
    ) -> StoreResult<Vec<(i64, i64)>> {
        if ranks.is_empty() {
            return Ok(Vec::new());
        }
        let rows = usage_sql::latency_at_ranks::<Sqlite>(owner, since_ms, until_ms, ranks)
            .build()
            .fetch_all(&self.reads)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    async fn usage_daily(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageDayTotals>> {
        let rows = usage_sql::daily::<Sqlite>(usage_sql::Engine::Sqlite, owner, since_ms, until_ms)
            .build()
            .fetch_all(&self.reads)
            .await?;
        rows.iter().map(usage_sql::daily_from_row).collect()
    }

    async fn usage_completion_at_ranks(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        wanted: &[CompletionRank],
    ) -> StoreResult<Vec<(String, i64)>> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let rows = usage_sql::completion_at_ranks::<Sqlite>(owner, since_ms, until_ms, wanted)
            .build()
            .fetch_all(&self.reads)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    async fn usage_savings(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        query: &SavingsQuery,
    ) -> StoreResult<Vec<SavingsTotals>> {
        if query.rates.is_empty() && query.caps.is_empty() {
            return Ok(Vec::new());
        }
        let rows = usage_sql::savings::<Sqlite>(
            usage_sql::Engine::Sqlite,
            owner,
            since_ms,
            until_ms,
            query,
        )
        .build()
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(usage_sql::savings_from_row).collect()
    }

    async fn prune_events(&self, finished_before_ms: i64) -> StoreResult<u64> {
        let result = sqlx::query(
            "DELETE FROM run_events WHERE run_id IN \
             (SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < ?)",
        )
        .bind(finished_before_ms)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected())
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reads).await?;
        Ok(())
    }

    async fn heartbeat_instance(&self, instance: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO instances (id, heartbeat_at) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
        )
        .bind(instance)
        .bind(now_ms)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn remove_instances(
        &self,
        instance: Option<&str>,
        stale_before_ms: i64,
    ) -> StoreResult<()> {
        sqlx::query("DELETE FROM instances WHERE id = ? OR heartbeat_at < ?")
            .bind(instance)
            .bind(stale_before_ms)
            .execute(&self.writes)
            .await?;
        Ok(())
    }

    async fn claim_run(&self, run: RunId, from: Option<&str>, to: &str) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE runs SET instance_id = ? WHERE id = ? \
             AND status IN ('queued', 'running') AND instance_id IS ?",
        )
        .bind(to)
        .bind(run.to_string())
        .bind(from)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn submit_run(
        &self,
        owner: UserId,
        submission: &RunSubmission<'_>,
    ) -> StoreResult<SubmitOutcome> {
        let (message, run) = (submission.message, submission.run);
        let mut tx = self.writes.begin().await?;
        // A write first: SQLite takes the database's write lock for the whole transaction
        // here, so the limit check below sees every committed run and no other submission
        // can commit between the check and the insert.
        if !insert_message_in(&mut tx, owner, message).await? {
            return Ok(SubmitOutcome::ThreadNotFound);
        }
        let row = sqlx::query(
            "SELECT COUNT(*) AS unfinished, COALESCE(SUM(thread_id = ?), 0) AS on_thread \
             FROM runs WHERE user_id = ? AND status IN ('queued', 'running')",
        )
        .bind(run.thread_id.to_string())
        .bind(owner.to_string())
        .fetch_one(&mut *tx)
        .await?;
        let (unfinished, on_thread): (i64, i64) =
            (row.try_get("unfinished")?, row.try_get("on_thread")?);
        if on_thread > 0 {
            return Ok(SubmitOutcome::ThreadBusy);
        }
        if usize::try_from(unfinished).unwrap_or(usize::MAX) >= submission.max_unfinished {
            return Ok(SubmitOutcome::TooManyRuns);
        }
        // Claimed at submission (as `claim_queued_runs` would leave it) unless runs are
        // waiting: those go first.
        let claim_by = match submission.claim_by {
            Some(instance) if !runs_waiting(&mut tx).await? => Some(instance),
            _ => None,
        };
        let claimed = claim_by.is_some();
        sqlx::query(
            "INSERT INTO runs (id, user_id, thread_id, status, created_at, input, request_id, \
                               instance_id, heartbeat_at, attempts, started_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(run.id.to_string())
        .bind(owner.to_string())
        .bind(run.thread_id.to_string())
        .bind(if claimed { "running" } else { "queued" })
        .bind(run.created_at_ms)
        .bind(&message.content)
        .bind(submission.request_id)
        .bind(claim_by)
        .bind(claimed.then_some(run.created_at_ms))
        .bind(i64::from(claimed))
        .bind(claimed.then_some(run.created_at_ms))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(if claimed {
            SubmitOutcome::Claimed
        } else {
            SubmitOutcome::Queued
        })
    }

    async fn claim_queued_runs(
        &self,
        instance: &str,
        limit: usize,
        now_ms: i64,
    ) -> StoreResult<Vec<QueueEntry>> {
        // One statement, and SQLite has one writer: two claimers cannot take one run.
        let rows = sqlx::query(&format!(
            "UPDATE runs SET status = 'running', instance_id = ?, heartbeat_at = ?, \
                 attempts = attempts + 1, started_at = COALESCE(started_at, ?) \
             WHERE id IN (SELECT id FROM runs WHERE status = 'queued' AND instance_id IS NULL \
                          ORDER BY created_at, id LIMIT ?) \
             RETURNING {QUEUE_COLUMNS}"
        ))
        .bind(instance)
        .bind(now_ms)
        .bind(now_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.writes)
        .await?;
        let mut claimed = rows
            .iter()
            .map(queue_entry_from_row)
            .collect::<StoreResult<Vec<_>>>()?;
        // RETURNING does not follow the subquery's order.
        claimed.sort_by(|a, b| {
            (a.run.created_at_ms, a.run.id.to_string())
                .cmp(&(b.run.created_at_ms, b.run.id.to_string()))
        });
        Ok(claimed)
    }

    async fn finish_unclaimed_run(
        &self,
        owner: UserId,
        run: RunId,
        status: RunStatus,
        error: &str,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE runs SET status = ?, error = ?, finished_at = ? \
             WHERE id = ? AND user_id = ? AND status = 'queued' AND instance_id IS NULL",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(now_ms)
        .bind(run.to_string())
        .bind(owner.to_string())
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    async fn heartbeat_runs(&self, instance: &str, runs: &[RunId], now_ms: i64) -> StoreResult<()> {
        if runs.is_empty() {
            return Ok(());
        }
        let mut update: QueryBuilder<Sqlite> = QueryBuilder::new("UPDATE runs SET heartbeat_at = ");
        update.push_bind(now_ms);
        update.push(" WHERE instance_id = ");
        update.push_bind(instance);
        update.push(" AND id IN (");
        let mut ids = update.separated(", ");
        for run in runs {
            ids.push_bind(run.to_string());
        }
        update.push(")");
        update.build().execute(&self.writes).await?;
        Ok(())
    }

    async fn stale_runs(&self, stale_before_ms: i64) -> StoreResult<Vec<QueueEntry>> {
        let rows = sqlx::query(&format!(
            "SELECT {QUEUE_COLUMNS} FROM runs \
             WHERE status IN ('queued', 'running') \
             AND (status = 'running' OR instance_id IS NOT NULL) \
             AND COALESCE(heartbeat_at, started_at, created_at) < ? \
             ORDER BY created_at, id"
        ))
        .bind(stale_before_ms)
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(queue_entry_from_row).collect()
    }

    async fn requeue_run(&self, run: RunId, from: Option<&str>) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE runs SET status = 'queued', instance_id = NULL, heartbeat_at = NULL \
             WHERE id = ? AND status IN ('queued', 'running') AND instance_id IS ? \
             AND input IS NOT NULL",
        )
        .bind(run.to_string())
        .bind(from)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Committed events reach the database file itself (not only the WAL) without any
    /// commit having to checkpoint: the writer's automatic threshold (64 MiB) is far above
    /// what is written here, so only the background checkpoint can have copied them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_background_checkpoint_copies_the_wal_into_the_database_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("apex.db");
        let store = SqliteStore::open(&format!("sqlite://{}", path.display()))
            .await
            .expect("open");
        let owner = UserId::generate();
        store
            .create_user(&UserRecord {
                id: owner,
                email: "c@example.com".into(),
                name: None,
                password_hash: "hash".into(),
                created_at_ms: 0,
            })
            .await
            .expect("user");
        let thread = ThreadId::generate();
        store
            .create_thread(
                owner,
                &ThreadRecord {
                    id: thread,
                    title: "t".into(),
                    metadata: serde_json::json!({}),
                    created_at_ms: 0,
                    updated_at_ms: 0,
                    message_count: 0,
                },
            )
            .await
            .expect("thread");
        let run = RunId::generate();
        store
            .create_run_on(
                owner,
                &RunRecord {
                    id: run,
                    thread_id: thread,
                    status: RunStatus::Running,
                    created_at_ms: 0,
                    started_at_ms: Some(0),
                    finished_at_ms: None,
                    error: None,
                    last_seq: 0,
                },
                None,
            )
            .await
            .expect("run");
        let before = std::fs::metadata(&path).expect("db file").len();
        let body = "x".repeat(4096);
        for seq in 1..=512 {
            store
                .append_event(
                    owner,
                    run,
                    seq,
                    &format!("{{\"pad\":\"{body}\"}}"),
                    seq as i64,
                )
                .await
                .expect("append");
        }
        // 512 events of 4 KiB: at least 2 MiB must land in the file.
        let wanted = before + 2 * 1024 * 1024;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let size = std::fs::metadata(&path).expect("db file").len();
            if size >= wanted {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the database file stayed at {size} bytes (from {before}); nothing was checkpointed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            store
                .list_events(owner, run, 0, 1000)
                .await
                .expect("list")
                .len(),
            512
        );
    }
}
