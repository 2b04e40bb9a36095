//! `PostgresStore`: the engine for running several Apex instances on one database, a shell
//! around the shared SQL (`shared.rs`).
//!
//! It owns the PostgreSQL side of the store: the connection pool, the schema in
//! `migrations/postgres`, and what only PostgreSQL has (queue announcements with
//! `LISTEN`/`NOTIFY`, the heartbeat of claimed runs with an array). Chosen when the database
//! URL starts with `postgres://` or `postgresql://` (see [`crate::open`]); SQLite stays the
//! default.
//!
//! The queries are SQLite's, the same text (see `shared.rs`): the same owner filter on
//! every user-data statement, the same conflict handling, the same return values, and
//! transactions in the same places. What differs is how concurrency is made safe, because
//! PostgreSQL runs writers in parallel where SQLite serialises them (the spots are
//! `engine.rs`'s):
//! - single-statement state changes stay single statements (`consume_refresh_token`,
//!   `redeem_ticket ... RETURNING`): under READ COMMITTED a second concurrent UPDATE waits for
//!   the first, re-checks its `WHERE` on the new row version and matches nothing, so a token
//!   or single-use ticket is spent exactly once;
//! - `insert_message` locks the thread row (its `UPDATE threads` comes first) before it
//!   computes the next position, so concurrent appends to one thread queue up instead of
//!   taking the same position (a UNIQUE index backs this up);
//! - `append_event` likewise locks the run row before inserting; a batch of events (see
//!   `group_commit`) locks its runs in id order (`SELECT ... FOR UPDATE`), so two
//!   instances' writers cannot deadlock;
//! - `submit_run` takes a transaction-scoped advisory lock per user before counting the
//!   user's unfinished runs, so the per-user run limits are exact across instances;
//! - `claim_queued_runs` picks rows with `FOR UPDATE SKIP LOCKED`: concurrent claimers on
//!   any instance skip each other's rows instead of waiting, and never share a run;
//! - the expired-revocation housekeeping of `revoke_session` deletes with
//!   `FOR UPDATE SKIP LOCKED`, so concurrent logouts never wait on or deadlock with each other.
//!
//! One difference of the engines is papered over: PostgreSQL text cannot hold U+0000. A
//! lookup by a key holding it finds nothing, as on SQLite, instead of failing; input
//! validation refuses such text before it reaches a write.
//!
//! Migrations are embedded at compile time and applied at open (`PostgresStore::migrate`:
//! `apex migrate`, and every start); sqlx serialises concurrent migrators with an advisory
//! lock, so several instances may start at once. Queries are runtime (`sqlx::query`) so the
//! build needs no database.

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres};

use crate::engine::Backend;
use crate::group_commit::EventWriter;
use crate::ids::RunId;
use crate::records::StoreResult;
use crate::roles::QueueSignals;
use crate::DatabasePool;

// Deliberately also the child of `sqlite`: the one copy of the SQL, compiled for each engine.
#[allow(clippy::duplicate_mod)]
#[path = "shared.rs"]
mod shared;

// What the shared SQL is compiled against (see `shared.rs`).
type Db = Postgres;
const ENGINE: Backend = Backend::Postgres;
type Shell = PostgresStore;
/// PostgreSQL's `runs.attempts` is an INTEGER: 32 bits.
type Attempts = i32;

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
    /// Connects to the database at `url` without touching the schema.
    async fn connect(url: &str, pool: &DatabasePool) -> StoreResult<Self> {
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
        Ok(Self {
            reads: pool.clone(),
            events: shared::event_writer(pool.clone()),
            writes: pool,
        })
    }

    /// Connects and applies pending migrations: what the server does at start.
    pub(crate) async fn open(url: &str, pool: &DatabasePool) -> StoreResult<Self> {
        let store = Self::connect(url, pool).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Applies the migrations in `migrations/postgres` that have not run yet.
    async fn migrate(&self) -> StoreResult<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.writes)
            .await?;
        Ok(())
    }
}

/// The `NOTIFY` channel that wakes dispatchers when runs are queued. Channels are per
/// database, not per schema: deployments sharing a database wake each other's dispatchers
/// for nothing, which costs one empty claim.
const QUEUE_CHANNEL: &str = "apex_run_queue";

/// The heartbeat of `runs` claimed by `instance` (see [`crate::Runs::heartbeat_runs`]).
async fn heartbeat_claimed(
    pool: &PgPool,
    instance: &str,
    runs: &[RunId],
    now_ms: i64,
) -> StoreResult<()> {
    let ids: Vec<String> = runs.iter().map(ToString::to_string).collect();
    // SKIP LOCKED: a row the event writer holds is passed over instead of waited for.
    // Waiting would stall that writer behind this statement (and, taking rows in
    // another order than the writer's id order, could deadlock with it); a run whose
    // row is busy is writing events, and every event refreshes its heartbeat anyway.
    sqlx::query(
        "UPDATE runs SET heartbeat_at = $1 WHERE id IN \
         (SELECT id FROM runs WHERE instance_id = $2 AND id = ANY($3) FOR UPDATE SKIP LOCKED)",
    )
    .bind(now_ms)
    .bind(instance)
    .bind(&ids)
    .execute(pool)
    .await?;
    Ok(())
}

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
