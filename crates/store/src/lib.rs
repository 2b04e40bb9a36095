//! Everything Apex persists, on SQLite (the embedded default) or PostgreSQL (several
//! instances on one database), behind one trait object.
//!
//! Module map (what `records` and `roles` hold is re-exported at the root):
//! - `records`: the rows as Rust types, [`StoreError`] and [`StoreResult`].
//! - `roles`: what a store does, one trait per role ([`Accounts`], [`Threads`], [`Runs`],
//!   [`QueueSignals`], [`EventLog`], [`Usage`], [`Budgets`], `Teams`, [`Alerts`],
//!   [`Cluster`]); [`Store`] is all of them,
//!   what the server holds as `Arc<dyn Store>`; [`prelude`] brings them into scope.
//! - `engine`: [`Backend`], the engine a URL selects, and where the engines' SQL differs.
//! - `shared`: every query, written once and compiled for each engine (`shared_sql!`).
//! - [`sqlite`], [`postgres`]: the engine shells: connections, migrations and what only one
//!   engine has (SQLite's single writer and its checkpoints; PostgreSQL's `LISTEN`/`NOTIFY`).
//! - `group_commit`: appends the run events of all runs in few transactions.
//! - `sqlite_writer`: SQLite's writer thread, with its own connection and prepared
//!   statements, committing the writes every run makes (its events, its submission, its
//!   answer and status; `sqlite_run_writes`) for many runs at once, taking its turn on the
//!   store's writing connection.
//! - `sqlite_reads`: SQLite's reader threads, each with a read-only connection of its own,
//!   for the reads every run makes (the usage window, the thread's latest messages, the
//!   names in the user's usage, the ended run).
//! - `run_sql`: the SQL of the writes every run makes and a submission's decisions, for
//!   both drivers (sqlx's, the writer thread's).
//! - `columns`: decoding rows by position for sqlx's rows and the reader threads' alike,
//!   and the queries both run.
//! - [`rollups`]: per-user rollups of the usage rows (sums per day, latency and completion
//!   sketches), what the usage figures are read from; `rollups_sql` stores and reads them
//!   and `usage_sql` computes the figures (children of `shared`); `window` plans a window
//!   read (which days from the rollups, which rows at its edges) for either driver.
//! - [`ids`]: validated id newtypes.
//!
//! [`open`] picks the engine from the database URL and applies pending migrations; the
//! schema of each engine is in `migrations/{sqlite,postgres}`.

#![forbid(unsafe_code)]

/// Compiles `shared.rs` (every query) as the module `shared` of the calling engine shell,
/// against the items defined here; both shells load the one file (`duplicate_mod`).
macro_rules! shared_sql {
    (db: $db:ty, engine: $engine:expr, store: $store:ty) => {
        type Db = $db;
        const ENGINE: $crate::Backend = $engine;
        type Shell = $store;
        #[allow(clippy::duplicate_mod)]
        #[path = "shared.rs"]
        mod shared;
    };
}

// First: its macros (`unfinished!` and the queue's) are used by the modules after it.
#[macro_use]
mod run_sql;
mod columns;
mod engine;
mod group_commit;
pub mod ids;
pub mod postgres;
mod records;
mod roles;
pub mod rollups;
pub mod sqlite;
mod sqlite_reads;
mod sqlite_run_writes;
mod sqlite_writer;
mod window;

use std::sync::Arc;
use std::time::Duration;

pub use engine::Backend;
pub use group_commit::{EVENT_BATCH_METRIC, MAX_EVENTS_PER_APPEND};
pub use records::*;
pub use roles::{
    Accounts, Alerts, Budgets, Cluster, EventLog, QueueSignals, Runs, Store, Threads, Usage,
};

/// The role traits, for `use apex_store::prelude::*` where store methods are called.
pub mod prelude {
    pub use crate::roles::{
        Accounts, Alerts, Budgets, Cluster, EventLog, QueueSignals, Runs, Store, Teams, Threads,
        Usage,
    };
}

/// Connection-pool limits of the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabasePool {
    /// Most connections one instance holds open. With several instances on one PostgreSQL,
    /// keep `instances x max_connections` under the server's `max_connections` (100 by
    /// default).
    pub max_connections: u32,
    /// How long a query waits for a free connection before it fails (and the request
    /// answers 500, readiness 503) instead of hanging.
    pub acquire_timeout: Duration,
}

impl Default for DatabasePool {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// Opens the store `url` selects (see [`Backend::from_url`]) and applies pending migrations.
pub async fn open(url: &str, pool: &DatabasePool) -> StoreResult<Arc<dyn Store>> {
    Ok(match Backend::from_url(url) {
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::open_with(url, pool).await?),
        Backend::Postgres => Arc::new(postgres::PostgresStore::open(url, pool).await?),
    })
}
