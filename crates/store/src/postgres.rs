//! `PostgresStore`: the engine for several Apex instances on one database, chosen when the
//! URL starts with `postgres://` or `postgresql://` (see [`crate::open`]).
//!
//! A shell around the shared SQL (`shared.rs`, SQLite's queries with the same semantics):
//! it owns the pool, the schema in `migrations/postgres`, and what only PostgreSQL has,
//! queue announcements with `LISTEN`/`NOTIFY`. Writers run in parallel here, so the shared
//! SQL makes them safe in ways SQLite's single writer does not need (each is said where it
//! is done): single-statement token and ticket updates, row locks in id order, a per-user
//! advisory lock around `submit_run`, and `FOR UPDATE SKIP LOCKED` where claimers,
//! heartbeats and logouts must not wait on each other.
//!
//! Migrations are applied at every open (and by `apex migrate`); sqlx serialises concurrent
//! migrators with an advisory lock, so several instances may start at once.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres, QueryBuilder};

use crate::engine::Backend;
use crate::group_commit::{not_owned, runs_of, BatchSink, EventWriter, NewEvent};
use crate::records::StoreResult;
use crate::roles::QueueSignals;
use crate::DatabasePool;

shared_sql!(db: Postgres, engine: Backend::Postgres, store: PostgresStore);

/// The PostgreSQL engine: its pool and notifications; its SQL is `shared.rs`.
pub struct PostgresStore {
    /// PostgreSQL runs readers and writers in parallel, so both are one pool (a clone is
    /// a handle to the same pool); the shared SQL names the two roles.
    reads: PgPool,
    writes: PgPool,
    /// Appends run events in batches (see `group_commit`).
    events: EventWriter,
}

impl PostgresStore {
    /// PostgreSQL reads on its pool, as it does everything (see `sqlite_reads` for why
    /// SQLite does not).
    fn readers(&self) -> Option<&crate::sqlite_reads::SqliteReaders> {
        None
    }

    /// PostgreSQL writes on its pool too (see `sqlite_writer` for why SQLite does not).
    fn writer(&self) -> Option<&crate::sqlite_writer::SqliteWriter> {
        None
    }

    /// Connects to the database at `url` and applies pending migrations.
    pub(crate) async fn open(url: &str, pool: &DatabasePool) -> StoreResult<Self> {
        let mut options = PgConnectOptions::from_str(url)?;
        if options.get_application_name().is_none() {
            options = options.application_name("apex");
        }
        // One plain connection first: the pool would retry a refused or rejected connection
        // until its acquire timeout and then report only "timed out"; this reports why.
        options.connect().await?.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(pool.max_connections)
            .acquire_timeout(pool.acquire_timeout)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        shared::rollups_sql::backfill(&pool).await?;
        Ok(Self {
            reads: pool.clone(),
            events: EventWriter::start(pool.clone()),
            writes: pool,
        })
    }
}

/// PostgreSQL's SQL for [`group_commit`](crate::group_commit): the writer task owns a handle
/// to the pool. (SQLite appends on its writer thread, `sqlite_writer`, to the same effect.)
#[async_trait]
impl BatchSink for PgPool {
    async fn write_batch(&self, events: &[NewEvent]) -> StoreResult<Vec<StoreResult<()>>> {
        let mut runs = runs_of(events);
        let mut tx = self.begin().await?;
        if runs.len() > 1 {
            // Writers run in parallel here: rows are locked in id order, so two writers (two
            // instances) cannot deadlock on runs they share. (Should it happen anyway, the
            // batch is retried event by event.) One run's row needs no order: the UPDATE
            // below locks it.
            runs.sort_by_key(|(run, owner, _)| (run.to_string(), owner.to_string()));
            let mut lock = QueryBuilder::<Postgres>::new("SELECT r.id FROM runs r JOIN (");
            lock.push_values(&runs, |mut b, (run, owner, _)| {
                b.push_bind(run.to_string()).push_bind(owner.to_string());
            });
            lock.push(
                ") AS v(run_id, user_id) ON r.id = v.run_id AND r.user_id = v.user_id \
                 ORDER BY r.id FOR UPDATE OF r",
            );
            lock.build().execute(&mut *tx).await?;
        }
        // One statement checks every run's owner and sets its last_seq (and, as every event
        // does, refreshes a claimed run's heartbeat); the runs it returns are the ones whose
        // events may be written.
        let mut update: QueryBuilder<Postgres> =
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
            .build_query_as()
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        let is_owned = |e: &NewEvent| owned.contains(&(e.run.to_string(), e.owner.to_string()));
        let accepted: Vec<&NewEvent> = events.iter().filter(|e| is_owned(e)).collect();
        if !accepted.is_empty() {
            let mut insert: QueryBuilder<Postgres> =
                QueryBuilder::new("INSERT INTO run_events (run_id, seq, event, created_at) ");
            insert.push_values(&accepted, |mut b, event| {
                b.push_bind(event.run.to_string())
                    .push_bind(event.seq)
                    .push_bind(event.json.as_str())
                    .push_bind(event.now_ms);
            });
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        let result = |e| is_owned(e).then_some(()).ok_or_else(|| not_owned(e));
        Ok(events.iter().map(result).collect())
    }
}

/// The `NOTIFY` channel that wakes dispatchers when runs are queued. Channels are per
/// database, not per schema: deployments sharing a database wake each other's dispatchers
/// for nothing, which costs one empty claim.
const QUEUE_CHANNEL: &str = "apex_run_queue";

#[async_trait]
impl QueueSignals for PostgresStore {
    async fn announce_queued_runs(&self) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(QUEUE_CHANNEL)
            .execute(&self.writes)
            .await?;
        Ok(())
    }

    async fn watch_queue_announcements(&self, wake: Arc<tokio::sync::Notify>) -> StoreResult<()> {
        let mut listener = PgListener::connect_with(&self.writes).await?;
        listener.listen(QUEUE_CHANNEL).await?;
        tokio::spawn(async move {
            loop {
                // `recv` reconnects by itself after a lost connection; notifications sent
                // while it was away are missed, which the dispatchers' polling covers.
                match listener.recv().await {
                    Ok(_) => wake.notify_one(),
                    Err(err) => {
                        tracing::warn!(error = %err, "listening for queued runs failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(())
    }
}
