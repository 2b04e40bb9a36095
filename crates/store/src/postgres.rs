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

use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres};

use crate::engine::Backend;
use crate::group_commit::EventWriter;
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
