//! Storage: the `Store` trait, its records, and the user-scoped handle agents use.
//!
//! Two kinds of methods live on [`Store`]:
//! - account methods (users, tokens, tickets), which establish identity;
//! - user-data methods, which all take the owning [`UserId`] and filter every query by it.
//!
//! Application code does not call the user-data methods with a free-standing id: it goes
//! through [`UserStore`], which can only be made from an authenticated user or a run's
//! context, and passes that user's id to every call. A thread, run or message of another
//! user is therefore indistinguishable from one that does not exist.
//!
//! Implementations: [`sqlite::SqliteStore`] (embedded default) and
//! [`postgres::PostgresStore`] (several instances on one database), with the same semantics
//! and the same schema shape (BIGINT millisecond timestamps, TEXT ids, JSON as TEXT).
//! [`open`] picks one from the database URL. Run events are appended through
//! [`group_commit`], which batches the events of all runs into few transactions.

pub mod group_commit;
pub mod postgres;
pub mod sqlite;
mod usage_sql;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::ids::{MessageId, RunId, ThreadId, UserId};
use crate::settings::DatabasePool;
use apex_protocol::threads::RunStatus;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("already exists")]
    Conflict,
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migration(#[from] sqlx::migrate::MigrateError),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone)]
pub struct UserRecord {
    pub id: UserId,
    pub email: String,
    pub name: Option<String>,
    pub password_hash: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct ThreadRecord {
    pub id: ThreadId,
    pub title: String,
    pub metadata: Value,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub message_count: i64,
}

#[derive(Debug, Clone)]
pub struct MessageRecord {
    pub id: MessageId,
    pub thread_id: ThreadId,
    pub role: String,
    pub content: String,
    pub metadata: Value,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: RunId,
    pub thread_id: ThreadId,
    pub status: RunStatus,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    pub error: Option<String>,
    pub last_seq: u64,
}

/// One stored event of a run's log, as JSON text (exactly what was delivered).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub json: String,
}

/// One row of the user's AI usage.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub provider: String,
    pub model: String,
    pub workload: String,
    pub ts_ms: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub latency_ms: i64,
    pub status: String,
    pub cost_usd: f64,
}

/// A user's message and the run that will answer it, as [`Store::submit_run`] stores them.
#[derive(Debug, Clone)]
pub struct RunSubmission<'a> {
    pub message: &'a MessageRecord,
    /// `status` must be `queued`; the run's input is the message's content.
    pub run: &'a RunRecord,
    /// The request that submitted the run, for the executing instance's logs.
    pub request_id: &'a str,
    /// The owner's limit of queued and running runs (the new one included).
    pub max_unfinished: usize,
    /// Claim the run for this instance in the same transaction (`running`, first attempt,
    /// heartbeat now) instead of leaving it `queued`: the submitting instance has room and
    /// starts it at once, saving a claim round trip before the first event. Not done while
    /// other runs wait in the queue, which would let a new run overtake them.
    pub claim_by: Option<&'a str>,
}

/// Whether any run waits in the queue for an instance, as column `waiting` (both engines;
/// the partial index `runs_queue` answers it). A submission is not claimed at once while
/// this holds, so it cannot overtake the waiting runs.
const RUNS_WAITING: &str =
    "SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'queued' AND instance_id IS NULL) AS waiting";

/// What [`Store::submit_run`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    Queued,
    /// Stored and claimed for [`RunSubmission::claim_by`]: the submitter starts it.
    Claimed,
    /// The thread does not exist or is not the owner's.
    ThreadNotFound,
    /// The thread already has a queued or running run.
    ThreadBusy,
    /// The owner already has `max_unfinished` queued or running runs.
    TooManyRuns,
}

/// A run as the queue sees it: claimed by an instance, or found stale by a sweeper.
#[derive(Debug, Clone)]
pub struct QueueEntry {
    pub owner: UserId,
    pub run: RunRecord,
    /// The message the run answers; `None` for a run stored before the queue existed,
    /// which cannot be executed again.
    pub input: Option<String>,
    pub request_id: Option<String>,
    /// How many times an instance has claimed the run (this claim included).
    pub attempts: u32,
    /// The instance that claimed it.
    pub instance: Option<String>,
}

/// Totals of a user's usage rows that share a provider, model and workload.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageTotals {
    pub provider: String,
    pub model: String,
    pub workload: String,
    pub requests: i64,
    /// Rows whose status is not `ok`.
    pub errors: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

/// A user's requests and spend on one model during one UTC day.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageDayTotals {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    pub model: String,
    pub requests: i64,
    pub cost_usd: f64,
}

/// A wanted rank (1-based) among one workload's rows ordered by completion tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRank {
    pub workload: String,
    pub rank: i64,
}

/// The rates (USD per million tokens) a model's short requests would be billed at on its
/// cheaper alternative.
#[derive(Debug, Clone, PartialEq)]
pub struct RepricingRate {
    pub model: String,
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

/// An output cap (completion tokens) considered for one workload.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputCap {
    pub workload: String,
    pub cap: i64,
}

/// What [`Store::usage_savings`] measures on each row of the window:
/// - routing: rows with fewer than `short_prompt` prompt and `short_completion` completion
///   tokens on a model of `rates`, whose cost minus their cost at those rates is positive;
/// - output caps: rows of a workload of `caps` with more completion tokens than its cap.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SavingsQuery {
    pub short_prompt: i64,
    pub short_completion: i64,
    pub rates: Vec<RepricingRate>,
    pub caps: Vec<OutputCap>,
}

/// [`SavingsQuery`]'s figures for one (workload, model).
#[derive(Debug, Clone, PartialEq)]
pub struct SavingsTotals {
    pub workload: String,
    pub model: String,
    /// Short rows whose repricing saves money, and the sum of those savings.
    pub routed_requests: i64,
    pub routing_savings_usd: f64,
    /// Rows over the workload's cap, and the sum of their tokens past it.
    pub capped_requests: i64,
    pub tokens_over_cap: i64,
}

/// Everything Apex persists. See the module docs for the two kinds of methods.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- accounts and credentials ----
    async fn create_user(&self, user: &UserRecord) -> StoreResult<()>;
    async fn find_user_by_email(&self, email: &str) -> StoreResult<Option<UserRecord>>;
    async fn get_user(&self, id: UserId) -> StoreResult<Option<UserRecord>>;
    async fn insert_refresh_token(
        &self,
        jti: &str,
        user: UserId,
        access_jti: &str,
        expires_at_ms: i64,
    ) -> StoreResult<()>;
    /// Revokes an active refresh token; `false` if it was unknown, expired or already used.
    async fn consume_refresh_token(
        &self,
        jti: &str,
        user: UserId,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// Logout: revokes the access token and the refresh tokens issued with it.
    async fn revoke_session(
        &self,
        access_jti: &str,
        access_expires_at_ms: i64,
        now_ms: i64,
    ) -> StoreResult<()>;
    async fn is_access_token_revoked(&self, jti: &str) -> StoreResult<bool>;
    async fn insert_ticket(
        &self,
        ticket_id: &str,
        user: UserId,
        expires_at_ms: i64,
        single_use: bool,
    ) -> StoreResult<()>;
    /// The ticket's user if the ticket is known, unexpired and (if single-use) unused;
    /// marks single-use tickets used in the same statement.
    async fn redeem_ticket(&self, ticket_id: &str, now_ms: i64) -> StoreResult<Option<UserId>>;

    // ---- user data: every method is filtered by `owner` ----
    async fn create_thread(&self, owner: UserId, thread: &ThreadRecord) -> StoreResult<()>;
    async fn list_threads(
        &self,
        owner: UserId,
        limit: i64,
        offset: i64,
    ) -> StoreResult<Vec<ThreadRecord>>;
    async fn get_thread(&self, owner: UserId, id: ThreadId) -> StoreResult<Option<ThreadRecord>>;
    async fn update_thread(
        &self,
        owner: UserId,
        id: ThreadId,
        title: &str,
        metadata: &Value,
        now_ms: i64,
    ) -> StoreResult<bool>;
    async fn delete_thread(&self, owner: UserId, id: ThreadId) -> StoreResult<bool>;
    /// Appends a message to a thread of `owner`; `false` if the thread is not theirs.
    async fn insert_message(&self, owner: UserId, message: &MessageRecord) -> StoreResult<bool>;
    async fn list_messages(
        &self,
        owner: UserId,
        thread: ThreadId,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<MessageRecord>, i64)>;
    /// Creates a run, recording `instance` (see `apex_server::run::cluster`) as the one executing it.
    /// The server submits runs with [`Store::submit_run`]; this is for tools and tests.
    async fn create_run_on(
        &self,
        owner: UserId,
        run: &RunRecord,
        instance: Option<&str>,
    ) -> StoreResult<()>;
    /// Creates a run executed by no recorded instance.
    async fn create_run(&self, owner: UserId, run: &RunRecord) -> StoreResult<()> {
        self.create_run_on(owner, run, None).await
    }
    /// `owner`'s runs that are queued or running, plus those that finished at or after
    /// `finished_since_ms`, newest first, at most `limit`.
    async fn recent_runs(
        &self,
        owner: UserId,
        finished_since_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<RunRecord>>;
    async fn get_run(&self, owner: UserId, id: RunId) -> StoreResult<Option<RunRecord>>;
    async fn set_run_status(
        &self,
        owner: UserId,
        id: RunId,
        status: RunStatus,
        error: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<()>;
    /// Persists one event of a run's log; seqs are unique per run; a run an instance has
    /// claimed gets its heartbeat refreshed to `now_ms`. Returns once the event is
    /// committed. Both engines batch concurrent calls into one transaction (group commit,
    /// see [`group_commit`]), with the same result per event as one call alone.
    async fn append_event(
        &self,
        owner: UserId,
        run: RunId,
        seq: u64,
        json: &str,
        now_ms: i64,
    ) -> StoreResult<()>;
    async fn list_events(
        &self,
        owner: UserId,
        run: RunId,
        after_seq: u64,
        limit: i64,
    ) -> StoreResult<Vec<StoredEvent>>;
    async fn insert_usage(&self, owner: UserId, rows: &[UsageRow]) -> StoreResult<u64>;
    /// Every row of `owner` dated at or after `since_ms`, by time. The server's own figures
    /// come from the grouped queries below, which load no row.
    async fn usage_rows_since(&self, owner: UserId, since_ms: i64) -> StoreResult<Vec<UsageRow>>;
    /// Totals per (provider, model, workload) of `owner`'s usage rows dated in
    /// `[since_ms, until_ms]`, computed by the database (no row is loaded).
    async fn usage_totals(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageTotals>>;
    /// The latency of the rows at the given 1-based ranks when `owner`'s rows dated in
    /// `[since_ms, until_ms]` are ordered by latency, as (rank, latency) pairs; ranks past
    /// the last row have none.
    async fn usage_latency_at_ranks(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        ranks: &[i64],
    ) -> StoreResult<Vec<(i64, i64)>>;
    /// Requests and spend per (UTC day, model) of `owner`'s rows dated in
    /// `[since_ms, until_ms]`.
    async fn usage_daily(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageDayTotals>>;
    /// For each wanted (workload, rank), the completion tokens of the row at that rank of the
    /// workload's rows dated in `[since_ms, until_ms]`, ordered by completion tokens, as
    /// (workload, tokens); ranks past the last row have none.
    async fn usage_completion_at_ranks(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        wanted: &[CompletionRank],
    ) -> StoreResult<Vec<(String, i64)>>;
    /// Routing and output-cap figures per (workload, model) of `owner`'s rows dated in
    /// `[since_ms, until_ms]` (see [`SavingsQuery`]); groups with neither are left out.
    async fn usage_savings(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        query: &SavingsQuery,
    ) -> StoreResult<Vec<SavingsTotals>>;

    // ---- maintenance ----
    /// Retention: deletes the event logs of runs that finished before `finished_before_ms`.
    /// The runs and messages stay; only the step-by-step events go. Returns events deleted.
    async fn prune_events(&self, finished_before_ms: i64) -> StoreResult<u64>;
    /// Readiness probe: the database answers.
    async fn ping(&self) -> StoreResult<()>;
    // ---- several instances (see `apex_server::run::cluster`) ----
    /// Records that `instance` is alive at `now_ms`.
    async fn heartbeat_instance(&self, instance: &str, now_ms: i64) -> StoreResult<()>;
    /// Forgets `instance` (graceful shutdown), and instances silent since `stale_before_ms`.
    async fn remove_instances(
        &self,
        instance: Option<&str>,
        stale_before_ms: i64,
    ) -> StoreResult<()>;
    /// Moves an unfinished run from instance `from` to `to`; `false` if it finished or
    /// another instance took it first. Exactly one caller wins.
    async fn claim_run(&self, run: RunId, from: Option<&str>, to: &str) -> StoreResult<bool>;

    // ---- the run queue (see `apex_server::run::dispatch`) ----
    /// Stores the user's message and queues the run answering it (status `queued`, no
    /// instance), in one transaction, if the thread is `owner`'s, has no unfinished run,
    /// and `owner` has fewer than `max_unfinished` queued or running runs. A user's
    /// submissions are serialised, so the limits are exact across instances.
    async fn submit_run(
        &self,
        owner: UserId,
        submission: &RunSubmission<'_>,
    ) -> StoreResult<SubmitOutcome>;
    /// Claims up to `limit` of the oldest queued runs for `instance`: each becomes
    /// `running` on it with a fresh heartbeat and one more attempt. Concurrent claimers
    /// (any instance) never get the same run.
    async fn claim_queued_runs(
        &self,
        instance: &str,
        limit: usize,
        now_ms: i64,
    ) -> StoreResult<Vec<QueueEntry>>;
    /// Ends a run that is still queued and unclaimed with `status` (stop, or a thread
    /// going away); `false` if an instance claimed it or it finished meanwhile.
    async fn finish_unclaimed_run(
        &self,
        owner: UserId,
        run: RunId,
        status: RunStatus,
        error: &str,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// The executing instance's proof of life for each run it still executes. Never waits
    /// on a run's row: a run busy writing events is kept fresh by those events (on
    /// every appended event refreshes its claimed run's heartbeat, see `append_event`).
    async fn heartbeat_runs(&self, instance: &str, runs: &[RunId], now_ms: i64) -> StoreResult<()>;
    /// Unfinished runs an instance claimed whose heartbeat is older than
    /// `stale_before_ms` (their instance died or lost the run), oldest first.
    async fn stale_runs(&self, stale_before_ms: i64) -> StoreResult<Vec<QueueEntry>>;
    /// Tells the dispatchers of other processes that runs are waiting (PostgreSQL
    /// `NOTIFY`). A no-op where one process is all there is; dispatchers also poll.
    async fn announce_queued_runs(&self) -> StoreResult<()> {
        Ok(())
    }
    /// Starts calling `wake` whenever some process announces queued runs, for as long as
    /// the process lives. Engines without notifications between processes do nothing.
    async fn watch_queue_announcements(&self, wake: Arc<tokio::sync::Notify>) -> StoreResult<()> {
        let _ = wake;
        Ok(())
    }
    /// Puts a stale run of instance `from` back in the queue for another attempt; `false`
    /// if it finished or another sweeper moved it first. Exactly one caller wins.
    async fn requeue_run(&self, run: RunId, from: Option<&str>) -> StoreResult<bool>;
}

pub(crate) fn parse_json_column(raw: &str) -> StoreResult<Value> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("json column: {e}")))
}

/// The storage engine a database URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `postgres://` and `postgresql://` select PostgreSQL; anything else is SQLite.
    pub fn from_url(url: &str) -> Self {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
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
