//! Every query of the store, written once for both engines.
//!
//! Compiled twice, as the module `shared` of [`crate::sqlite`] and of [`crate::postgres`]
//! (the crate's `shared_sql!`), against that engine's sqlx types and store (`Shell`: pools
//! `reads` and `writes`, one pool on PostgreSQL, and the event writer `events`). Not one
//! impl generic over `sqlx::Database`: executing queries generically needs higher-ranked
//! bounds (`for<'c> &'c mut DB::Connection: Executor<'c>`, one per bound type) on every
//! impl, which rustc then fails to prove inside `async_trait`'s boxed futures.
//!
//! The SQL is portable; every spot where the engines differ asks
//! [`Backend`](crate::Backend) (`ENGINE`). SQLite serialises every write on one connection;
//! PostgreSQL runs writers in parallel, made safe by row locks, single-statement updates
//! and `SKIP LOCKED`.

use std::collections::HashSet;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{query_scalar, QueryBuilder, Row};

use super::{Db, Shell, ENGINE};
use crate::columns::{
    decode_message, decode_run, ended_run_sql, parse_stored_id, Columns, LATEST_MESSAGES_SQL,
    MESSAGE_COLUMNS, RUN_COLUMNS, RUN_FIELDS,
};
use crate::group_commit::{check_append, NewEvent};
use crate::run_sql::{
    run_messages_pattern, status_times, submitted, supersede_sql, QueuedRun, SubmitCheck,
    DELETE_RUN_MESSAGES, INSERT_MESSAGE, INSERT_QUEUED_RUN, INSERT_THREAD, SET_RUN_STATUS,
    UNFINISHED_RUNS,
};
use crate::ids::{RunId, ThreadId, UserId};
use crate::records::{
    parse_json_column, ApiKeyRecord, MessageRecord, QueueEntry, RedeemedTicket, RefreshRotation,
    RegenerateOutcome, RegenerateSubmission, RunAftermath, RunApproval, RunRecord, RunSubmission,
    SessionEndReason, SessionRecord, StoreError, StoreResult, StoredEvent,
    SubmitOutcome, ThreadRecord, TicketRecord, UserRecord,
};
use crate::roles::{Accounts, Cluster, EventLog, Runs, Threads};
use apex_protocol::events::{AgentEvent, LogIds};
use apex_protocol::threads::{MultitaskStrategy, RunStatus};

// The Usage role's SQL, compiled with this module for each engine.
#[allow(clippy::duplicate_mod)]
#[path = "usage_sql.rs"]
mod usage_sql;

// The usage rollups' SQL (used by the Usage role's), likewise.
#[allow(clippy::duplicate_mod)]
#[path = "rollups_sql.rs"]
pub(crate) mod rollups_sql;

// The Budgets role's SQL, likewise.
#[allow(clippy::duplicate_mod)]
#[path = "budgets_sql.rs"]
mod budgets_sql;

// The Teams role's SQL, likewise.
#[allow(clippy::duplicate_mod)]
#[path = "teams_sql.rs"]
mod teams_sql;

// The Alerts role's SQL, likewise.
#[allow(clippy::duplicate_mod)]
#[path = "alerts_sql.rs"]
mod alerts_sql;

type DbRow = <Db as sqlx::Database>::Row;

/// An sqlx row (of this engine) as the decoders of [`crate::columns`] read it.
pub(super) struct SqlxColumns<'r>(pub(super) &'r DbRow);

impl Columns for SqlxColumns<'_> {
    fn int(&self, i: usize) -> StoreResult<i64> {
        Ok(self.0.try_get(i)?)
    }
    fn optional_int(&self, i: usize) -> StoreResult<Option<i64>> {
        Ok(self.0.try_get(i)?)
    }
    fn real(&self, i: usize) -> StoreResult<f64> {
        Ok(self.0.try_get(i)?)
    }
    fn text(&self, i: usize) -> StoreResult<&str> {
        Ok(self.0.try_get(i)?)
    }
    fn optional_text(&self, i: usize) -> StoreResult<Option<&str>> {
        Ok(self.0.try_get(i)?)
    }
}

fn decode_all<T>(rows: &[DbRow], decode: fn(&DbRow) -> StoreResult<T>) -> StoreResult<Vec<T>> {
    rows.iter().map(decode).collect()
}

fn user_from_row(row: &DbRow) -> StoreResult<UserRecord> {
    Ok(UserRecord {
        id: parse_stored_id(row.try_get("id")?, UserId::parse)?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        password_hash: row.try_get("password_hash")?,
        created_at_ms: row.try_get("created_at")?,
    })
}

fn thread_from_row(row: &DbRow) -> StoreResult<ThreadRecord> {
    Ok(ThreadRecord {
        id: parse_stored_id(row.try_get("id")?, ThreadId::parse)?,
        title: row.try_get("title")?,
        metadata: parse_json_column(row.try_get("metadata")?)?,
        created_at_ms: row.try_get("created_at")?,
        updated_at_ms: row.try_get("updated_at")?,
        message_count: row.try_get("message_count")?,
    })
}

/// A row selected as [`MESSAGE_COLUMNS`].
fn message_from_row(row: &DbRow) -> StoreResult<MessageRecord> {
    decode_message(&SqlxColumns(row))
}

/// A row selected as [`RUN_COLUMNS`].
fn run_from_row(row: &DbRow) -> StoreResult<RunRecord> {
    decode_run(&SqlxColumns(row), 0)
}

const THREAD_COLUMNS: &str = "t.id, t.title, t.metadata, t.created_at, t.updated_at, \
     (SELECT COUNT(*) FROM messages m WHERE m.thread_id = t.id) AS message_count";

/// A run's columns plus what the queue needs to execute it again (`attempts` is an INTEGER,
/// 32 bits on PostgreSQL, 64 on SQLite: read as 64 on both); the run's from column
/// [`QUEUE_RUN_AT`].
const QUEUE_COLUMNS: &str = "user_id, input, request_id, CAST(attempts AS BIGINT) AS attempts, \
     instance_id, CAST(approval_required AS BIGINT) AS approval_required, approval, \
     approval_expires_at, approval_decision, \
     id, thread_id, status, created_at, started_at, finished_at, error, last_seq";

/// Where [`RUN_COLUMNS`] start in [`QUEUE_COLUMNS`].
const QUEUE_RUN_AT: usize = 9;

fn queue_entry_from_row(row: &DbRow) -> StoreResult<QueueEntry> {
    let attempts: i64 = row.try_get("attempts")?;
    Ok(QueueEntry {
        owner: parse_stored_id(row.try_get("user_id")?, UserId::parse)?,
        run: decode_run(&SqlxColumns(row), QUEUE_RUN_AT)?,
        input: row.try_get("input")?,
        request_id: row.try_get("request_id")?,
        // Out of range only if corrupt: such a run counts as out of attempts.
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        instance: row.try_get("instance_id")?,
        approval: approval_from_row(row)?,
    })
}

fn approval_from_row(row: &DbRow) -> StoreResult<RunApproval> {
    let required: i64 = row.try_get("approval_required")?;
    let json = |column: &str| -> StoreResult<Option<Value>> {
        let raw: Option<String> = row.try_get(column)?;
        raw.as_deref().map(parse_json_column).transpose()
    };
    Ok(RunApproval {
        required: required != 0,
        pending: json("approval")?,
        expires_at_ms: row.try_get("approval_expires_at")?,
        decision: json("approval_decision")?,
    })
}

/// Every queued, unclaimed run with its `turn` in the fair order of the queue: the number
/// of runs its owner has executing (on any instance) plus its place among the owner's
/// queued runs (1 for the oldest). Claiming in order of `turn`, then age, is the same as
/// always taking the oldest queued run of the user with the fewest runs executing (counting
/// the ones claimed before it): a user's second queued run ranks behind every other user's
/// first, so one user's many runs never keep another's waiting for more than one turn.
/// Computed without row locks (PostgreSQL allows no `FOR UPDATE` with window functions);
/// the claim locks the runs it takes, and skips any another claimer has taken meanwhile.
/// Runs held back by an unfinished earlier run of their thread ([`free_to_start`]) are
/// not in it: they neither get claimed nor take a turn from their owner's other runs.
const FAIR_QUEUE: &str = concat!(
    "SELECT q.id, \
         ROW_NUMBER() OVER (PARTITION BY q.user_id ORDER BY q.created_at, q.id) \
         + COALESCE(busy.executing, 0) AS turn \
     FROM runs q LEFT JOIN (SELECT user_id, COUNT(*) AS executing FROM runs \
                            WHERE status = 'running' GROUP BY user_id) busy \
          ON busy.user_id = q.user_id \
     WHERE q.status = 'queued' AND q.instance_id IS NULL AND ",
    free_to_start!()
);

/// [`INSERT_THREAD`] with `thread` of `owner` bound.
fn bind_thread<'q>(
    query: sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>>,
    owner: UserId,
    thread: &'q ThreadRecord,
) -> sqlx::query::Query<'q, Db, <Db as sqlx::Database>::Arguments<'q>> {
    query
        .bind(thread.id.to_string())
        .bind(owner.to_string())
        .bind(&thread.title)
        .bind(thread.metadata.to_string())
        .bind(thread.created_at_ms)
        .bind(thread.updated_at_ms)
}

/// Appends `message` to a thread of `owner` inside `tx`; `false` if the thread is not theirs.
async fn insert_message_in(
    tx: &mut sqlx::Transaction<'_, Db>,
    owner: UserId,
    message: &MessageRecord,
) -> StoreResult<bool> {
    if !ENGINE.touches_thread_on_insert() {
        // Touching the thread first checks that it is `owner`'s and (on PostgreSQL) locks
        // its row until commit, so concurrent appends to one thread take their positions
        // one at a time: each INSERT's snapshot sees the messages committed before it got
        // the lock.
        let touched =
            sqlx::query("UPDATE threads SET updated_at = $1 WHERE id = $2 AND user_id = $3")
                .bind(message.created_at_ms)
                .bind(message.thread_id.to_string())
                .bind(owner.to_string())
                .execute(&mut **tx)
                .await?;
        if touched.rows_affected() == 0 {
            return Ok(false);
        }
    }
    insert_message_on(&mut **tx, owner, message).await
}

/// The INSERT of [`insert_message_in`]: `false` when the thread is not `owner`'s. Where the
/// insert touches the thread itself (`Backend::touches_thread_on_insert`) it is the whole
/// append, and needs no transaction of its own.
async fn insert_message_on<'c>(
    executor: impl sqlx::Executor<'c, Database = Db>,
    owner: UserId,
    message: &MessageRecord,
) -> StoreResult<bool> {
    let inserted = sqlx::query(INSERT_MESSAGE)
    .bind(message.id.to_string())
    .bind(&message.role)
    .bind(&message.content)
    .bind(message.metadata.to_string())
    .bind(message.created_at_ms)
    .bind(message.thread_id.to_string())
    .bind(owner.to_string())
    .execute(executor)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Deletes the messages of `run` (its user message and any answer) from its thread, inside
/// `tx` (see [`DELETE_RUN_MESSAGES`]).
async fn delete_messages_of_run(
    tx: &mut sqlx::Transaction<'_, Db>,
    owner: UserId,
    run: &RunRecord,
) -> StoreResult<()> {
    sqlx::query(DELETE_RUN_MESSAGES)
    .bind(run.thread_id.to_string())
    .bind(owner.to_string())
    .bind(run_messages_pattern(run.id))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl Shell {
    /// Removes `owner`'s rolled-back, ended run `run`: its messages, events and row, in one
    /// transaction.
    async fn remove_rolled_back(&self, owner: UserId, run: &RunRecord) -> StoreResult<()> {
        let mut tx = self.writes.begin().await?;
        delete_messages_of_run(&mut tx, owner, run).await?;
        // Events first: the engines' foreign keys are not relied on to cascade.
        sqlx::query("DELETE FROM run_events WHERE run_id = $1")
            .bind(run.id.to_string())
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM runs WHERE id = $1 AND user_id = $2")
            .bind(run.id.to_string())
            .bind(owner.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The user whose `column` holds `key`.
    async fn user_where(&self, column: &str, key: &str) -> StoreResult<Option<UserRecord>> {
        let sql = format!(
            "SELECT id, email, name, password_hash, created_at FROM users WHERE {column} = $1"
        );
        let row = sqlx::query(&sql).bind(key).fetch_optional(&self.reads).await?;
        row.as_ref().map(user_from_row).transpose()
    }
}

#[async_trait]
impl Accounts for Shell {
    async fn create_user(&self, user: &UserRecord) -> StoreResult<()> {
        let result = sqlx::query(
            "INSERT INTO users (id, email, name, password_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
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
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Err(StoreError::Conflict),
            Err(err) => Err(err.into()),
        }
    }
    async fn find_user_by_email(&self, email: &str) -> StoreResult<Option<UserRecord>> {
        if ENGINE.unstorable(email) {
            return Ok(None);
        }
        self.user_where("email", email).await
    }
    async fn get_user(&self, id: UserId) -> StoreResult<Option<UserRecord>> {
        self.user_where("id", &id.to_string()).await
    }
    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh_jti: &str,
        refresh_expires_at_ms: i64,
    ) -> StoreResult<()> {
        let mut tx = self.writes.begin().await?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, created_at, expires_at, last_used_at, user_agent) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&session.id)
        .bind(session.user_id.to_string())
        .bind(session.created_at_ms)
        .bind(session.expires_at_ms)
        .bind(session.last_used_at_ms)
        .bind(&session.user_agent)
        .execute(&mut *tx)
        .await?;
        insert_refresh_token(
            &mut tx,
            refresh_jti,
            &session.id,
            session.user_id,
            refresh_expires_at_ms.min(session.expires_at_ms),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
    async fn get_session(&self, id: &str) -> StoreResult<Option<SessionRecord>> {
        if ENGINE.unstorable(id) {
            return Ok(None);
        }
        let row = sqlx::query(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.reads)
            .await?;
        row.as_ref().map(session_from_row).transpose()
    }
    async fn rotate_refresh_token(
        &self,
        jti: &str,
        user: UserId,
        new_jti: &str,
        new_expires_at_ms: i64,
        now_ms: i64,
    ) -> StoreResult<RefreshRotation> {
        if ENGINE.unstorable(jti) {
            return Ok(RefreshRotation::Invalid);
        }
        let mut tx = self.writes.begin().await?;
        // Spending is one statement: two concurrent refreshes with the same token cannot both
        // win (on PostgreSQL the second UPDATE waits for the first, re-checks
        // `revoked_at IS NULL` on the committed row and matches nothing, so it is reuse).
        let spent: Option<String> = query_scalar(
            "UPDATE refresh_tokens SET revoked_at = $1 \
             WHERE jti = $2 AND user_id = $3 AND revoked_at IS NULL AND expires_at > $1 \
             RETURNING session_id",
        )
        .bind(now_ms)
        .bind(jti)
        .bind(user.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(session_id) = spent else {
            // Not live: a spent token of this user presented again means a copy exists
            // somewhere. End its session, so neither copy is worth anything.
            let reused: Option<String> = query_scalar(
                "SELECT session_id FROM refresh_tokens \
                 WHERE jti = $1 AND user_id = $2 AND revoked_at IS NOT NULL",
            )
            .bind(jti)
            .bind(user.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            let outcome = match reused {
                Some(session_id) => {
                    end_session_rows(&mut tx, &session_id, SessionEndReason::RefreshReuse, now_ms)
                        .await?;
                    RefreshRotation::Reused { session_id }
                }
                None => RefreshRotation::Invalid,
            };
            tx.commit().await?;
            return Ok(outcome);
        };
        let row = sqlx::query(&format!(
            "UPDATE sessions SET last_used_at = $1 \
             WHERE id = $2 AND ended_at IS NULL AND expires_at > $1 \
             RETURNING {SESSION_COLUMNS}"
        ))
        .bind(now_ms)
        .bind(&session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(session) = row.as_ref().map(session_from_row).transpose()? else {
            // The session ended (or outlived its lifetime): the token is spent for nothing.
            tx.commit().await?;
            return Ok(RefreshRotation::Invalid);
        };
        insert_refresh_token(
            &mut tx,
            new_jti,
            &session.id,
            user,
            new_expires_at_ms.min(session.expires_at_ms),
        )
        .await?;
        tx.commit().await?;
        Ok(RefreshRotation::Rotated { session })
    }
    async fn end_session(
        &self,
        owner: UserId,
        id: &str,
        reason: SessionEndReason,
        now_ms: i64,
    ) -> StoreResult<bool> {
        if ENGINE.unstorable(id) {
            return Ok(false);
        }
        let result = sqlx::query(
            "UPDATE sessions SET ended_at = $1, ended_reason = $2 \
             WHERE id = $3 AND user_id = $4 AND ended_at IS NULL",
        )
        .bind(now_ms)
        .bind(reason.as_str())
        .bind(id)
        .bind(owner.to_string())
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }
    async fn end_all_sessions(
        &self,
        owner: UserId,
        reason: SessionEndReason,
        now_ms: i64,
    ) -> StoreResult<Vec<String>> {
        let ids: Vec<String> = query_scalar(
            "UPDATE sessions SET ended_at = $1, ended_reason = $2 \
             WHERE user_id = $3 AND ended_at IS NULL RETURNING id",
        )
        .bind(now_ms)
        .bind(reason.as_str())
        .bind(owner.to_string())
        .fetch_all(&self.writes)
        .await?;
        Ok(ids)
    }
    async fn list_sessions(&self, owner: UserId, now_ms: i64) -> StoreResult<Vec<SessionRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions \
             WHERE user_id = $1 AND ended_at IS NULL AND expires_at > $2 \
             ORDER BY created_at DESC, id"
        ))
        .bind(owner.to_string())
        .bind(now_ms)
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, session_from_row)
    }
    async fn inactive_sessions(&self, ids: &[String], now_ms: i64) -> StoreResult<Vec<String>> {
        let mut inactive = Vec::new();
        // Bounded IN lists: both engines cap bound parameters per statement.
        for chunk in ids.chunks(500) {
            let mut query = QueryBuilder::<Db>::new(
                "SELECT id FROM sessions WHERE ended_at IS NULL AND expires_at > ",
            );
            query.push_bind(now_ms).push(" AND id IN (");
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(id.as_str());
            }
            query.push(") UNION ALL SELECT id FROM api_keys WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ");
            query.push_bind(now_ms).push(") AND id IN (");
            let mut list = query.separated(", ");
            for id in chunk {
                list.push_bind(id.as_str());
            }
            query.push(")");
            let active: HashSet<String> = query
                .build_query_scalar::<String>()
                .fetch_all(&self.reads)
                .await?
                .into_iter()
                .collect();
            inactive.extend(chunk.iter().filter(|id| !active.contains(*id)).cloned());
        }
        Ok(inactive)
    }
    async fn insert_ticket(&self, ticket: &TicketRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO ws_tickets \
             (id, user_id, session_id, expires_at, access_expires_at, max_uses) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&ticket.id)
        .bind(ticket.user_id.to_string())
        .bind(&ticket.session_id)
        .bind(ticket.expires_at_ms)
        .bind(ticket.access_expires_at_ms)
        .bind(i64::from(ticket.max_uses))
        .execute(&self.writes)
        .await?;
        Ok(())
    }
    async fn redeem_ticket(
        &self,
        ticket_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<RedeemedTicket>> {
        if ENGINE.unstorable(ticket_id) {
            return Ok(None);
        }
        // One statement, as for refresh tokens: concurrent redemptions cannot exceed
        // `max_uses`, and a ticket of an ended session opens nothing.
        let row = sqlx::query(
            "UPDATE ws_tickets SET uses = uses + 1 \
             WHERE id = $2 AND expires_at > $1 AND access_expires_at > $1 AND uses < max_uses \
             AND session_id IN (SELECT id FROM sessions \
                                WHERE ended_at IS NULL AND expires_at > $1) \
             RETURNING user_id, session_id, access_expires_at",
        )
        .bind(now_ms)
        .bind(ticket_id)
        .fetch_optional(&self.writes)
        .await?;
        row.map(|row| {
            Ok(RedeemedTicket {
                user_id: parse_stored_id(row.try_get("user_id")?, UserId::parse)?,
                session_id: row.try_get("session_id")?,
                access_expires_at_ms: row.try_get("access_expires_at")?,
            })
        })
        .transpose()
    }
    async fn prune_sessions(&self, now_ms: i64, sessions_before_ms: i64) -> StoreResult<u64> {
        let mut tx = self.writes.begin().await?;
        let mut removed = 0;
        for (sql, cutoff) in [
            ("DELETE FROM ws_tickets WHERE expires_at <= $1", now_ms),
            ("DELETE FROM refresh_tokens WHERE expires_at <= $1", now_ms),
            // Their remaining tokens and tickets go with them (ON DELETE CASCADE).
            (
                "DELETE FROM sessions WHERE ended_at < $1 OR expires_at < $1",
                sessions_before_ms,
            ),
        ] {
            removed += sqlx::query(sql)
                .bind(cutoff)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        tx.commit().await?;
        Ok(removed)
    }
    async fn create_api_key(&self, key: &ApiKeyRecord, secret_hash: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, user_id, name, prefix, secret_hash, scopes, created_at, \
                                   expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&key.id)
        .bind(key.user_id.to_string())
        .bind(&key.name)
        .bind(&key.prefix)
        .bind(secret_hash)
        .bind(key.scopes.join(" "))
        .bind(key.created_at_ms)
        .bind(key.expires_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(())
    }
    async fn list_api_keys(&self, owner: UserId, now_ms: i64) -> StoreResult<Vec<ApiKeyRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > $2) ORDER BY created_at DESC, id"
        ))
        .bind(owner.to_string())
        .bind(now_ms)
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, api_key_from_row)
    }
    async fn find_api_key(&self, secret_hash: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE secret_hash = $1"
        ))
        .bind(secret_hash)
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(api_key_from_row).transpose()
    }
    async fn revoke_api_key(&self, owner: UserId, id: &str, now_ms: i64) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND user_id = $3 \
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1)",
        )
        .bind(now_ms)
        .bind(id)
        .bind(owner.to_string())
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }
    async fn touch_api_key(&self, id: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 \
             AND (last_used_at IS NULL OR last_used_at < $3)",
        )
        .bind(now_ms)
        .bind(id)
        .bind(now_ms - 60_000)
        .execute(&self.writes)
        .await?;
        Ok(())
    }
    async fn require_approval_setting(&self, user: UserId) -> StoreResult<Option<bool>> {
        let value: Option<i64> = query_scalar(
            "SELECT CAST(require_approval AS BIGINT) FROM users WHERE id = $1",
        )
        .bind(user.to_string())
        .fetch_optional(&self.reads)
        .await?;
        Ok(value.map(|v| v != 0))
    }
    async fn set_require_approval_setting(&self, user: UserId, value: bool) -> StoreResult<bool> {
        let result = sqlx::query("UPDATE users SET require_approval = $1 WHERE id = $2")
            .bind(i32::from(value))
            .bind(user.to_string())
            .execute(&self.writes)
            .await?;
        Ok(result.rows_affected() == 1)
    }
}

const SESSION_COLUMNS: &str =
    "id, user_id, created_at, expires_at, last_used_at, ended_at, user_agent";

const API_KEY_COLUMNS: &str = "id, user_id, name, prefix, scopes, created_at, expires_at, \
     last_used_at, revoked_at";

fn api_key_from_row(row: &DbRow) -> StoreResult<ApiKeyRecord> {
    let scopes: String = row.try_get("scopes")?;
    Ok(ApiKeyRecord {
        id: row.try_get("id")?,
        user_id: parse_stored_id(row.try_get("user_id")?, UserId::parse)?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        scopes: scopes.split_whitespace().map(str::to_string).collect(),
        created_at_ms: row.try_get("created_at")?,
        expires_at_ms: row.try_get("expires_at")?,
        last_used_at_ms: row.try_get("last_used_at")?,
        revoked_at_ms: row.try_get("revoked_at")?,
    })
}

fn session_from_row(row: &DbRow) -> StoreResult<SessionRecord> {
    Ok(SessionRecord {
        id: row.try_get("id")?,
        user_id: parse_stored_id(row.try_get("user_id")?, UserId::parse)?,
        created_at_ms: row.try_get("created_at")?,
        expires_at_ms: row.try_get("expires_at")?,
        last_used_at_ms: row.try_get("last_used_at")?,
        ended_at_ms: row.try_get("ended_at")?,
        user_agent: row.try_get("user_agent")?,
    })
}

async fn insert_refresh_token(
    tx: &mut sqlx::Transaction<'_, Db>,
    jti: &str,
    session_id: &str,
    user: UserId,
    expires_at_ms: i64,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens (jti, session_id, user_id, expires_at) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(jti)
    .bind(session_id)
    .bind(user.to_string())
    .bind(expires_at_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn end_session_rows(
    tx: &mut sqlx::Transaction<'_, Db>,
    session_id: &str,
    reason: SessionEndReason,
    now_ms: i64,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE sessions SET ended_at = $1, ended_reason = $2 WHERE id = $3 AND ended_at IS NULL",
    )
    .bind(now_ms)
    .bind(reason.as_str())
    .bind(session_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[async_trait]
impl Threads for Shell {
    async fn create_thread(&self, owner: UserId, thread: &ThreadRecord) -> StoreResult<()> {
        bind_thread(sqlx::query(INSERT_THREAD), owner, thread)
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
        // A negative offset counts as zero (SQLite's reading; PostgreSQL rejects it).
        let rows = sqlx::query(&format!(
            "SELECT {THREAD_COLUMNS} FROM threads t WHERE t.user_id = $1 \
             ORDER BY t.updated_at DESC, t.id LIMIT $2 OFFSET $3"
        ))
        .bind(owner.to_string())
        .bind(ENGINE.limit(limit))
        .bind(offset.max(0))
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, thread_from_row)
    }
    async fn get_thread(&self, owner: UserId, id: ThreadId) -> StoreResult<Option<ThreadRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {THREAD_COLUMNS} FROM threads t WHERE t.id = $1 AND t.user_id = $2"
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
            "UPDATE threads SET title = $1, metadata = $2, updated_at = $3 \
             WHERE id = $4 AND user_id = $5",
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
        let result = sqlx::query("DELETE FROM threads WHERE id = $1 AND user_id = $2")
            .bind(id.to_string())
            .bind(owner.to_string())
            .execute(&self.writes)
            .await?;
        Ok(result.rows_affected() == 1)
    }
    async fn insert_message(&self, owner: UserId, message: &MessageRecord) -> StoreResult<bool> {
        if let Some(writer) = self.writer() {
            return writer.insert_message(owner, message.clone()).await;
        }
        if ENGINE.touches_thread_on_insert() {
            return insert_message_on(&self.writes, owner, message).await;
        }
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
            &format!("SELECT {MESSAGE_COLUMNS} FROM messages \
             WHERE thread_id = $1 AND user_id = $2 ORDER BY position LIMIT $3 OFFSET $4"),
        )
        .bind(thread.to_string())
        .bind(owner.to_string())
        .bind(ENGINE.limit(limit))
        .bind(offset.max(0))
        .fetch_all(&self.reads)
        .await?;
        let total: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM messages WHERE thread_id = $1 AND user_id = $2")
                .bind(thread.to_string())
                .bind(owner.to_string())
                .fetch_one(&self.reads)
                .await?
                .try_get("n")?;
        Ok((decode_all(&rows, message_from_row)?, total))
    }
    async fn latest_messages(
        &self,
        owner: UserId,
        thread: ThreadId,
        limit: i64,
    ) -> StoreResult<Vec<MessageRecord>> {
        let mut messages = match self.readers() {
            Some(readers) => readers.latest_messages(owner, thread, limit.max(0)).await?,
            None => {
                let rows = sqlx::query(LATEST_MESSAGES_SQL)
                    .bind(thread.to_string())
                    .bind(owner.to_string())
                    .bind(limit.max(0))
                    .fetch_all(&self.reads)
                    .await?;
                decode_all(&rows, message_from_row)?
            }
        };
        messages.reverse();
        Ok(messages)
    }
}

#[async_trait]
impl Runs for Shell {
    async fn create_run_on(
        &self,
        owner: UserId,
        run: &RunRecord,
        instance: Option<&str>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO runs (id, user_id, thread_id, status, created_at, instance_id) \
             VALUES ($1, $2, $3, $4, $5, $6)",
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
            "SELECT {RUN_COLUMNS} FROM runs WHERE user_id = $1 \
             AND (status IN {} OR finished_at >= $2) \
             ORDER BY created_at DESC, id LIMIT $3",
            unfinished!()
        ))
        .bind(owner.to_string())
        .bind(finished_since_ms)
        .bind(limit.max(0))
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, run_from_row)
    }
    async fn get_run(&self, owner: UserId, id: RunId) -> StoreResult<Option<RunRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND user_id = $2"
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
        if let Some(writer) = self.writer() {
            return writer
                .set_run_status(owner, id, status, error.map(str::to_owned), now_ms)
                .await;
        }
        let (started, finished) = status_times(status, now_ms);
        sqlx::query(SET_RUN_STATUS)
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
    async fn submit_run(
        &self,
        owner: UserId,
        submission: &RunSubmission<'_>,
    ) -> StoreResult<SubmitOutcome> {
        if let Some(writer) = self.writer() {
            return writer.submit_run(owner, submission.into()).await;
        }
        let (message, run) = (submission.message, submission.run);
        let mut tx = self.writes.begin().await?;
        // One user's submissions take turns until commit (see `serialise_user`), so the limit
        // check below sees every committed run and none can commit between check and insert.
        if let Some(serialise) = ENGINE.serialise_user() {
            sqlx::query(serialise)
                .bind(owner.to_string())
                .execute(&mut *tx)
                .await?;
        }
        // A new thread is created here, not before: a refused message rolls it back.
        if let Some(thread) = submission.new_thread {
            bind_thread(sqlx::query(INSERT_THREAD), owner, thread)
                .execute(&mut *tx)
                .await?;
        }
        if !insert_message_in(&mut tx, owner, message).await? {
            return Ok(SubmitOutcome::ThreadNotFound);
        }
        let (unfinished, on_thread, waiting): (i64, i64, bool) = sqlx::query_as(UNFINISHED_RUNS)
            .bind(run.thread_id.to_string())
            .bind(owner.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let check = SubmitCheck {
            unfinished,
            on_thread,
            waiting,
            strategy: submission.strategy,
        };
        if check.thread_busy() {
            return Ok(SubmitOutcome::ThreadBusy);
        }
        let superseded = if check.supersedes() {
            let rows = sqlx::query(&supersede_sql())
                .bind(check.strategy.as_str())
                .bind(run.thread_id.to_string())
                .bind(owner.to_string())
                .fetch_all(&mut *tx)
                .await?;
            decode_all(&rows, run_from_row)?
        } else {
            Vec::new()
        };
        if check.too_many_runs(superseded.len(), submission.max_unfinished) {
            return Ok(SubmitOutcome::TooManyRuns);
        }
        if check.deletes_superseded_messages() {
            for gone in &superseded {
                delete_messages_of_run(&mut tx, owner, gone).await?;
            }
        }
        let claim_by = check.claim_by(submission.claim_by);
        let queued = QueuedRun::new(
            owner,
            run,
            message,
            submission.request_id,
            claim_by,
            submission.require_approval,
        );
        let approval_required: i64 = query_scalar(INSERT_QUEUED_RUN)
            .bind(queued.id)
            .bind(queued.owner)
            .bind(queued.thread)
            .bind(queued.status)
            .bind(queued.created_at_ms)
            .bind(queued.input)
            .bind(queued.request_id)
            .bind(queued.instance)
            .bind(queued.heartbeat_at_ms)
            .bind(queued.attempts)
            .bind(queued.started_at_ms)
            .bind(queued.require_approval)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(submitted(claim_by.is_some(), approval_required, superseded))
    }
    async fn regenerate_run(
        &self,
        owner: UserId,
        submission: &RegenerateSubmission<'_>,
    ) -> StoreResult<RegenerateOutcome> {
        let run = submission.run;
        let mut tx = self.writes.begin().await?;
        // The same turn-taking as `submit_run`: the limits below are exact.
        if let Some(serialise) = ENGINE.serialise_user() {
            sqlx::query(serialise)
                .bind(owner.to_string())
                .execute(&mut *tx)
                .await?;
        }
        // Checks the owner and (on PostgreSQL) locks the thread until commit, so a message
        // appended meanwhile cannot slip between the question read below and the marking.
        let touched =
            sqlx::query("UPDATE threads SET updated_at = $1 WHERE id = $2 AND user_id = $3")
                .bind(run.created_at_ms)
                .bind(run.thread_id.to_string())
                .bind(owner.to_string())
                .execute(&mut *tx)
                .await?;
        if touched.rows_affected() == 0 {
            return Ok(RegenerateOutcome::ThreadNotFound);
        }
        let (unfinished, on_thread, waiting): (i64, i64, bool) = sqlx::query_as(UNFINISHED_RUNS)
        .bind(run.thread_id.to_string())
        .bind(owner.to_string())
        .fetch_one(&mut *tx)
        .await?;
        if on_thread > 0 {
            return Ok(RegenerateOutcome::ThreadBusy);
        }
        let question = sqlx::query(&format!(
            "SELECT {MESSAGE_COLUMNS}, position FROM messages \
             WHERE thread_id = $1 AND user_id = $2 AND role = 'user' \
             ORDER BY position DESC LIMIT 1"
        ))
        .bind(run.thread_id.to_string())
        .bind(owner.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = question else {
            return Ok(RegenerateOutcome::NoQuestion);
        };
        let question = message_from_row(&row)?;
        let position: i64 = row.try_get("position")?;
        if usize::try_from(unfinished).unwrap_or(usize::MAX) >= submission.max_unfinished {
            return Ok(RegenerateOutcome::TooManyRuns);
        }
        let claim_by = match submission.claim_by {
            Some(instance) if !waiting => Some(instance),
            _ => None,
        };
        let claimed = claim_by.is_some();
        // Its place among the thread's runs, as for a message (see `submit_run`): a message
        // sent while it runs queues behind it.
        let approval_required: i64 = query_scalar(INSERT_QUEUED_RUN)
        .bind(run.id.to_string())
        .bind(owner.to_string())
        .bind(run.thread_id.to_string())
        .bind(if claimed { "running" } else { "queued" })
        .bind(run.created_at_ms)
        .bind(&question.content)
        .bind(submission.request_id)
        .bind(claim_by)
        .bind(claimed.then_some(run.created_at_ms))
        .bind(i32::from(claimed))
        .bind(claimed.then_some(run.created_at_ms))
        // A regeneration follows the user's setting.
        .bind(None::<i32>)
        .fetch_one(&mut *tx)
        .await?;
        // Answers superseded before keep the run that superseded them.
        sqlx::query(
            "UPDATE messages SET superseded_by = $1 \
             WHERE thread_id = $2 AND user_id = $3 AND role = 'assistant' \
             AND position > $4 AND superseded_by IS NULL",
        )
        .bind(run.id.to_string())
        .bind(run.thread_id.to_string())
        .bind(owner.to_string())
        .bind(position)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RegenerateOutcome::Stored {
            question,
            claimed,
            approval_required: approval_required != 0,
        })
    }
    async fn restore_superseded(&self, owner: UserId, run: RunId) -> StoreResult<u64> {
        let result = sqlx::query(
            "UPDATE messages SET superseded_by = NULL WHERE superseded_by = $1 AND user_id = $2",
        )
        .bind(run.to_string())
        .bind(owner.to_string())
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected())
    }
    async fn claim_queued_runs(
        &self,
        instance: &str,
        limit: usize,
        now_ms: i64,
    ) -> StoreResult<Vec<QueueEntry>> {
        // One statement. Two claimers cannot take one run: SQLite has one writer, and
        // PostgreSQL's claimers skip the rows another is taking (see `skip_locked_of`).
        // The order is the fair share (see `FAIR_QUEUE`), not first come: one user's many
        // queued runs cannot hold another user's run back.
        let rows = sqlx::query(&format!(
            "UPDATE runs SET status = 'running', instance_id = $1, heartbeat_at = $2, \
                 attempts = attempts + 1, started_at = COALESCE(started_at, $2) \
             WHERE id IN (SELECT r.id FROM runs r JOIN ({FAIR_QUEUE}) fair ON fair.id = r.id \
                          WHERE r.status = 'queued' AND r.instance_id IS NULL \
                          ORDER BY fair.turn, r.created_at, r.id LIMIT $3{}) \
             RETURNING {QUEUE_COLUMNS}",
            ENGINE.skip_locked_of("r")
        ))
        .bind(instance)
        .bind(now_ms)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.writes)
        .await?;
        let mut claimed = decode_all(&rows, queue_entry_from_row)?;
        // RETURNING does not follow the subquery's order.
        claimed.sort_by_key(|entry| (entry.run.created_at_ms, entry.run.id.to_string()));
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
            "UPDATE runs SET status = $1, error = $2, finished_at = $3 \
             WHERE id = $4 AND user_id = $5 AND status IN ('queued', 'awaiting_approval') \
             AND instance_id IS NULL",
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
        // PostgreSQL passes over a row the event writer holds instead of waiting for it.
        // Waiting would stall that writer behind this statement (and, taking rows in another
        // order than the writer's id order, could deadlock with it); a run whose row is busy
        // is writing events, and every event refreshes its heartbeat anyway.
        let mut update: QueryBuilder<Db> = QueryBuilder::new("UPDATE runs SET heartbeat_at = ");
        update.push_bind(now_ms);
        update.push(" WHERE id IN (SELECT id FROM runs WHERE instance_id = ");
        update.push_bind(instance);
        update.push(" AND id IN (");
        let mut ids = update.separated(", ");
        for run in runs {
            ids.push_bind(run.to_string());
        }
        update.push(format!("){})", ENGINE.skip_locked()));
        update.build().execute(&self.writes).await?;
        Ok(())
    }
    async fn stale_runs(&self, stale_before_ms: i64) -> StoreResult<Vec<QueueEntry>> {
        let rows = sqlx::query(&format!(
            "SELECT {QUEUE_COLUMNS} FROM runs \
             WHERE status IN ('queued', 'running') \
             AND (status = 'running' OR instance_id IS NOT NULL) \
             AND COALESCE(heartbeat_at, started_at, created_at) < $1 \
             ORDER BY created_at, id"
        ))
        .bind(stale_before_ms)
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, queue_entry_from_row)
    }
    async fn requeue_run(&self, run: RunId, from: Option<&str>) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE runs SET status = 'queued', instance_id = NULL, heartbeat_at = NULL \
             WHERE id = $1 AND status IN ('queued', 'running') \
             AND instance_id IS NOT DISTINCT FROM $2 AND input IS NOT NULL",
        )
        .bind(run.to_string())
        .bind(from)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }
    async fn run_superseded(
        &self,
        owner: UserId,
        run: RunId,
    ) -> StoreResult<Option<MultitaskStrategy>> {
        let marked: Option<Option<String>> =
            query_scalar("SELECT superseded FROM runs WHERE id = $1 AND user_id = $2")
                .bind(run.to_string())
                .bind(owner.to_string())
                .fetch_optional(&self.reads)
                .await?;
        Ok(marked.flatten().as_deref().and_then(MultitaskStrategy::parse))
    }
    async fn settle_ended_run(&self, owner: UserId, run: RunId) -> StoreResult<RunAftermath> {
        // Reads only, in the common case: every run's end comes through here, and on SQLite
        // a write transaction would queue behind the one writer for nothing. One read: the
        // run, and whether a run of its thread is waiting for it to end (its removal below,
        // if rolled back, cannot change that: it removes an ended run).
        let ended = match self.readers() {
            Some(readers) => readers.ended_run(owner, run).await?,
            None => {
                let row = sqlx::query(&ended_run_sql())
                    .bind(run.to_string())
                    .bind(owner.to_string())
                    .fetch_optional(&self.reads)
                    .await?;
                match row {
                    Some(row) => Some((
                        run_from_row(&row)?,
                        row.try_get::<Option<String>, _>(RUN_FIELDS)?,
                        row.try_get::<bool, _>(RUN_FIELDS + 1)?,
                    )),
                    None => None,
                }
            }
        };
        let Some((record, superseded, successor_waiting)) = ended else {
            // Gone already, or not ended (then this is not the moment).
            return Ok(RunAftermath::default());
        };
        let removed = superseded.as_deref() == Some(MultitaskStrategy::Rollback.as_str());
        if removed {
            self.remove_rolled_back(owner, &record).await?;
        }
        Ok(RunAftermath {
            removed,
            successor_waiting,
        })
    }
    async fn sweep_rolled_back_runs(&self, ended_before_ms: i64) -> StoreResult<u64> {
        let rows = sqlx::query(&format!(
            "SELECT user_id, {RUN_COLUMNS} FROM runs WHERE superseded = $1 \
             AND status NOT IN {} AND finished_at < $2 ORDER BY finished_at LIMIT 1000",
            unfinished!()
        ))
        .bind(MultitaskStrategy::Rollback.as_str())
        .bind(ended_before_ms)
        .fetch_all(&self.reads)
        .await?;
        let mut removed = 0;
        for row in &rows {
            let owner = parse_stored_id(row.try_get("user_id")?, UserId::parse)?;
            self.remove_rolled_back(owner, &decode_run(&SqlxColumns(row), 1)?).await?;
            removed += 1;
        }
        Ok(removed)
    }
    async fn run_approval(
        &self,
        owner: UserId,
        run: RunId,
    ) -> StoreResult<Option<(RunRecord, RunApproval)>> {
        let row = sqlx::query(&format!(
            "SELECT {QUEUE_COLUMNS} FROM runs WHERE id = $1 AND user_id = $2"
        ))
        .bind(run.to_string())
        .bind(owner.to_string())
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref()
            .map(|row| {
                let run = decode_run(&SqlxColumns(row), QUEUE_RUN_AT)?;
                Ok((run, approval_from_row(row)?))
            })
            .transpose()
    }
    async fn request_approval(
        &self,
        run: RunId,
        instance: &str,
        pending: &Value,
        expires_at_ms: i64,
    ) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE runs SET approval = $1, approval_expires_at = $2 \
             WHERE id = $3 AND status = 'running' AND instance_id = $4 AND approval IS NULL",
        )
        .bind(pending.to_string())
        .bind(expires_at_ms)
        .bind(run.to_string())
        .bind(instance)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }
    async fn park_for_approval(&self, run: RunId, instance: &str) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE runs SET status = 'awaiting_approval', instance_id = NULL, \
                 heartbeat_at = NULL \
             WHERE id = $1 AND status = 'running' AND instance_id = $2 \
             AND approval IS NOT NULL AND approval_decision IS NULL",
        )
        .bind(run.to_string())
        .bind(instance)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }
    async fn decide_approval(
        &self,
        owner: UserId,
        run: RunId,
        decision: &Value,
        now_ms: i64,
    ) -> StoreResult<bool> {
        // Every SET expression reads the row as it was: a parked run is queued again, as a
        // first attempt (its start after the pause is no retry); a run still parking (on
        // its instance, between recording the request and parking) only gets the answer,
        // which its instance reads when it tries to park.
        let result = sqlx::query(
            "UPDATE runs SET approval_decision = $1, \
                 status = CASE WHEN status = 'awaiting_approval' THEN 'queued' ELSE status END, \
                 attempts = CASE WHEN status = 'awaiting_approval' THEN 0 ELSE attempts END \
             WHERE id = $2 AND user_id = $3 AND status IN ('running', 'awaiting_approval') \
             AND approval IS NOT NULL AND approval_decision IS NULL \
             AND approval_expires_at > $4",
        )
        .bind(decision.to_string())
        .bind(run.to_string())
        .bind(owner.to_string())
        .bind(now_ms)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }
    async fn expire_approvals(&self, now_ms: i64, error: &str) -> StoreResult<Vec<QueueEntry>> {
        let rows = sqlx::query(&format!(
            "UPDATE runs SET status = 'timed_out', error = $1, finished_at = $2 \
             WHERE status = 'awaiting_approval' AND approval_expires_at <= $2 \
             RETURNING {QUEUE_COLUMNS}"
        ))
        .bind(error)
        .bind(now_ms)
        .fetch_all(&self.writes)
        .await?;
        decode_all(&rows, queue_entry_from_row)
    }
}

#[async_trait]
impl EventLog for Shell {
    async fn append_events(
        &self,
        owner: UserId,
        run: RunId,
        events: Vec<(u64, String)>,
        now_ms: i64,
    ) -> StoreResult<()> {
        let events = events
            .into_iter()
            .map(|(seq, json)| {
                let seq =
                    i64::try_from(seq).map_err(|_| StoreError::Corrupt("seq overflow".into()))?;
                Ok(NewEvent {
                    owner,
                    run,
                    seq,
                    json,
                    now_ms,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        check_append(&events)?;
        self.events.append(events).await
    }
    async fn list_events(
        &self,
        owner: UserId,
        run: RunId,
        after_seq: u64,
        limit: i64,
    ) -> StoreResult<Vec<StoredEvent>> {
        let after = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let (run_id, user_id) = (run.to_string(), owner.to_string());
        let rows = sqlx::query(
            "SELECT e.seq, e.event, r.thread_id FROM run_events e JOIN runs r ON r.id = e.run_id \
             WHERE e.run_id = $1 AND r.user_id = $2 AND e.seq > $3 ORDER BY e.seq LIMIT $4",
        )
        .bind(&run_id)
        .bind(&user_id)
        .bind(after)
        .bind(ENGINE.limit(limit))
        .fetch_all(&self.reads)
        .await?;
        let logged = decode_all(&rows, |row| {
            let seq = u64::try_from(row.try_get::<i64, _>("seq")?).unwrap_or(0);
            Ok((seq, row.try_get::<String, _>("event")?, row.try_get::<String, _>("thread_id")?))
        })?;
        Ok(logged
            .into_iter()
            .map(|(seq, event, thread_id)| {
                let ids = LogIds {
                    run_id: &run_id,
                    thread_id: &thread_id,
                    user_id: &user_id,
                };
                let json = AgentEvent::wire_json_from_log(event, seq, ids);
                StoredEvent { seq, json }
            })
            .collect())
    }
    async fn prune_events(&self, finished_before_ms: i64) -> StoreResult<u64> {
        let result = sqlx::query(
            "DELETE FROM run_events WHERE run_id IN \
             (SELECT id FROM runs WHERE finished_at IS NOT NULL AND finished_at < $1)",
        )
        .bind(finished_before_ms)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected())
    }
}

#[async_trait]
impl Cluster for Shell {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.reads).await?;
        Ok(())
    }
    async fn heartbeat_instance(&self, instance: &str, now_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO instances (id, heartbeat_at) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
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
        sqlx::query("DELETE FROM instances WHERE id = $1 OR heartbeat_at < $2")
            .bind(instance)
            .bind(stale_before_ms)
            .execute(&self.writes)
            .await?;
        Ok(())
    }
    async fn claim_run(&self, run: RunId, from: Option<&str>, to: &str) -> StoreResult<bool> {
        let result = sqlx::query(
            "UPDATE runs SET instance_id = $1 WHERE id = $2 \
             AND status IN ('queued', 'running') AND instance_id IS NOT DISTINCT FROM $3",
        )
        .bind(to)
        .bind(run.to_string())
        .bind(from)
        .execute(&self.writes)
        .await?;
        Ok(result.rows_affected() == 1)
    }
}
