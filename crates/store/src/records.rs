//! The rows the store reads and writes, as Rust types, and its error: the same from every
//! engine. Timestamps are Unix milliseconds, as the columns store them.

use serde_json::Value;

use crate::ids::{MessageId, RunId, ThreadId, UserId};
use apex_protocol::threads::{MultitaskStrategy, RunStatus};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row with the same unique key (a user's email) exists.
    #[error("already exists")]
    Conflict,
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A failure of one of SQLite's own connections: the writer thread
    /// (`sqlite_writer`), the reader threads (`sqlite_reads`).
    #[error("SQLite: {0}")]
    Sqlite(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        StoreError::Sqlite(err.to_string())
    }
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

/// A login session: the family of refresh tokens rotated from one login. Access tokens and
/// tickets name it; ending it ends them all.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub id: String,
    pub user_id: UserId,
    pub created_at_ms: i64,
    /// The absolute end of the session; rotation never extends it.
    pub expires_at_ms: i64,
    pub last_used_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    /// What the client said it was at login, if anything.
    pub user_agent: Option<String>,
}

impl SessionRecord {
    /// Not ended and not past its absolute lifetime at `now_ms`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.ended_at_ms.is_none() && self.expires_at_ms > now_ms
    }
}

/// An API key as stored: everything but the key itself, of which only a digest is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRecord {
    pub id: String,
    /// The user the key acts as: the one who made it.
    pub user_id: UserId,
    pub name: String,
    /// The key's first characters, to tell keys apart in a list.
    pub prefix: String,
    pub scopes: Vec<String>,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub last_used_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

impl ApiKeyRecord {
    /// Not revoked and not expired at `now_ms`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|end| end > now_ms)
    }
}

/// Why a session ended (stored with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEndReason {
    Logout,
    LogoutAll,
    Revoked,
    /// A spent refresh token of the session was presented again: someone holds a copy.
    RefreshReuse,
}

impl SessionEndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionEndReason::Logout => "logout",
            SessionEndReason::LogoutAll => "logout_all",
            SessionEndReason::Revoked => "revoked",
            SessionEndReason::RefreshReuse => "refresh_reuse",
        }
    }
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq)]
pub enum RefreshRotation {
    /// The token was live and its session active: it is spent and `new_jti` issued in its
    /// place (expiring no later than the session).
    Rotated { session: SessionRecord },
    /// The token had been spent already: the session is ended (reuse detection).
    Reused { session_id: String },
    /// Unknown, expired, another user's, or its session had ended.
    Invalid,
}

/// A WebSocket ticket as stored (its id is a digest of what the client holds).
#[derive(Debug, Clone)]
pub struct TicketRecord {
    pub id: String,
    pub user_id: UserId,
    pub session_id: String,
    pub expires_at_ms: i64,
    /// When the access token that bought the ticket expires: sockets opened with the ticket
    /// end then.
    pub access_expires_at_ms: i64,
    /// How many sockets the ticket may open (1 for a single-use ticket).
    pub max_uses: u32,
}

/// A ticket that opened a socket: whose, and for how long.
#[derive(Debug, Clone, PartialEq)]
pub struct RedeemedTicket {
    pub user_id: UserId,
    pub session_id: String,
    pub access_expires_at_ms: i64,
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
    /// For an answer that was regenerated: the run answering its question again.
    pub superseded_by: Option<RunId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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

/// One stored event of a run's log, as its wire JSON (exactly what was delivered: the log
/// keeps a shorter form, see `AgentEvent::to_log_json`, which reading rebuilds).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: u64,
    pub json: String,
}

/// One row of the user's AI usage: one request, or a provider export's bucket of many.
///
/// Token classes nest: `cached_tokens` and `cache_write_tokens` are part of
/// `prompt_tokens`, `reasoning_tokens` part of `completion_tokens` (OpenAI's convention;
/// sources that count them apart, like Anthropic's, are added up on the way in), so a
/// total of prompt tokens never counts a cached token twice.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub provider: String,
    pub model: String,
    pub workload: String,
    pub ts_ms: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// For one request its latency; for a bucket (`requests > 1`) 0, unknown.
    pub latency_ms: i64,
    pub status: String,
    pub cost_usd: f64,
    /// Requests the row stands for: 1, or a bucket's count.
    pub requests: i64,
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub reasoning_tokens: i64,
    /// Where the row came from: `upload`, `demo`, `apex`, `otlp`, `gateway`, or an export
    /// format's name.
    pub source: String,
    /// The source's own id for the row; a row whose `(source, source_ref)` the user
    /// already has is not stored again.
    pub source_ref: Option<String>,
    /// The price entry `cost_usd` was computed with (see the server's
    /// `usage::price_book`); `None` when the source sent the cost itself.
    pub price_version: Option<String>,
}

impl Default for UsageRow {
    /// One successful request of an upload, with nothing counted yet.
    fn default() -> Self {
        Self {
            provider: String::new(),
            model: String::new(),
            workload: String::new(),
            ts_ms: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            latency_ms: 0,
            status: "ok".into(),
            cost_usd: 0.0,
            requests: 1,
            cached_tokens: 0,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
            source: "upload".into(),
            source_ref: None,
            price_version: None,
        }
    }
}

/// How [`crate::Usage::import_usage`] writes one upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportPlan {
    /// Most usage rows the user may have stored once the import is in.
    pub quota: u64,
    /// Rows written per transaction (each transaction holds SQLite's one writer).
    pub chunk_rows: usize,
    /// When the import starts, so that an import a crash left unfinished can be found.
    pub now_ms: i64,
}

/// What became of an import: all of it is stored, or none of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    /// Every row is stored.
    Stored(u64),
    /// Storing the rows would leave the user with more than `quota` rows (`stored` is what
    /// they had); nothing of the import was kept.
    OverQuota { stored: u64, quota: u64 },
}

/// A user's message and the run that will answer it, as [`crate::Runs::submit_run`] stores
/// them.
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
    /// A thread to create for the message (which names it) in the same transaction: it is
    /// stored only if the run is accepted, so refused messages leave no threads behind.
    pub new_thread: Option<&'a ThreadRecord>,
    /// What to do if the thread already has unfinished runs (see [`SubmitOutcome`]).
    pub strategy: MultitaskStrategy,
    /// Whether the run pauses for approval of its plan; `None`: the owner's setting.
    pub require_approval: Option<bool>,
}

/// What [`crate::Runs::submit_run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Stored and queued (behind the thread's unfinished runs, if it has any).
    Queued,
    /// Stored and queued behind the thread's unfinished runs, which the submission
    /// (`interrupt` or `rollback`) marked `superseded`: the caller stops each of them.
    /// They do not count against `max_unfinished`: they are ending.
    Superseding(Vec<RunRecord>),
    /// Stored and claimed for [`RunSubmission::claim_by`]: the submitter starts it
    /// (pausing for approval of its plan if `approval_required`).
    Claimed { approval_required: bool },
    /// The thread does not exist or is not the owner's.
    ThreadNotFound,
    /// The thread already has a queued or running run and the strategy is `reject`.
    ThreadBusy,
    /// The owner already has `max_unfinished` queued or running runs.
    TooManyRuns,
}

/// A run answering a thread's last question again, as [`crate::Runs::regenerate_run`]
/// stores it (see [`RunSubmission`] for the limits and the claim).
#[derive(Debug, Clone)]
pub struct RegenerateSubmission<'a> {
    /// `status` must be `queued`; its thread is the one whose answer is regenerated, and
    /// its input becomes the thread's last user message.
    pub run: &'a RunRecord,
    pub request_id: &'a str,
    pub max_unfinished: usize,
    pub claim_by: Option<&'a str>,
}

/// What [`crate::Runs::regenerate_run`] did.
#[derive(Debug, Clone)]
pub enum RegenerateOutcome {
    /// The run is stored (claimed for `claim_by` if `claimed`) to answer `question` again;
    /// the answers after it are marked superseded by the run.
    Stored {
        question: MessageRecord,
        claimed: bool,
        /// The user's setting asks for approval of the plan.
        approval_required: bool,
    },
    /// The thread does not exist or is not the owner's.
    ThreadNotFound,
    /// The thread has no user message to answer again.
    NoQuestion,
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
    /// Whether it pauses for approval of its plan, and where that stands.
    pub approval: RunApproval,
}

/// A run's approval of its action plan, as stored (see migration 0009). The store keeps
/// the JSON the server gives it and does not look inside.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunApproval {
    /// The run pauses after its actions agent.
    pub required: bool,
    /// Set when it pauses: the request for approval and what the run had produced.
    pub pending: Option<Value>,
    /// Unanswered by then, the run ends `timed_out`.
    pub expires_at_ms: Option<i64>,
    /// The user's answer; a run that has one continues from `pending`.
    pub decision: Option<Value>,
}

/// A stored usage row with its id, for listing rows and explaining one.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredUsageRow {
    pub id: i64,
    pub row: UsageRow,
}

/// Which of a user's usage rows a query looks at: those dated in `[since_ms, until_ms]`
/// and matching every field that is set (a cell of the usage summary).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UsageFilter {
    pub since_ms: i64,
    pub until_ms: i64,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub workload: Option<String>,
    pub source: Option<String>,
}

/// Token counts by class and stored cost of a user's rows costed with one price version
/// (`None`: costs sent by the source).
#[derive(Debug, Clone, PartialEq)]
pub struct PriceVersionTotals {
    pub price_version: Option<String>,
    pub rows: i64,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_usd: f64,
}

/// One of a user's price overrides (negotiated rates). Rates are pico-dollars (1e-12 USD)
/// per token, and per request for `request_fee`; every class is set (the server fills the
/// ones a file leaves out from the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceOverrideRecord {
    pub id: String,
    pub provider: String,
    pub model: String,
    pub effective_from_ms: i64,
    pub input_rate: i64,
    pub cached_input_rate: i64,
    pub cache_write_rate: i64,
    pub output_rate: i64,
    pub reasoning_rate: i64,
    pub request_fee: i64,
    pub note: Option<String>,
    pub created_at_ms: i64,
}

/// Totals of a user's usage rows that share a provider, model and workload.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageTotals {
    pub provider: String,
    pub model: String,
    pub workload: String,
    pub requests: i64,
    /// Requests whose status is not `ok`.
    pub errors: i64,
    /// Requests with a latency of their own (rows of one request, not buckets): the
    /// population of the latency percentiles.
    pub timed_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_usd: f64,
    /// Where the rows came from (see [`UsageRow::source`]).
    pub source: String,
    /// When the group's latest row is dated.
    pub last_ts_ms: i64,
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

/// What [`crate::rollups::savings_of`] measures in a window:
/// - routing: the short requests (fewer than [`crate::rollups::SHORT_PROMPT_TOKENS`] prompt
///   and [`crate::rollups::SHORT_COMPLETION_TOKENS`] completion tokens each) of a
///   (workload, model) whose model is in `rates`, when repricing them at those rates saves;
/// - output caps: requests of a workload of `caps` with more completion tokens than its cap.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SavingsQuery {
    pub rates: Vec<RepricingRate>,
    pub caps: Vec<OutputCap>,
}

/// [`SavingsQuery`]'s figures for one (workload, model).
#[derive(Debug, Clone, PartialEq)]
pub struct SavingsTotals {
    pub workload: String,
    pub model: String,
    /// Short requests whose repricing saves money, and what it saves.
    pub routed_requests: i64,
    pub routing_savings_usd: f64,
    /// Rows over the workload's cap, and the sum of their tokens past it.
    pub capped_requests: i64,
    pub tokens_over_cap: i64,
}

/// A JSON column's text as a value; text that is not JSON is corrupt data, not a bug.
pub(crate) fn parse_json_column(raw: &str) -> StoreResult<Value> {
    serde_json::from_str(raw).map_err(|e| StoreError::Corrupt(format!("json column: {e}")))
}

/// What happened once a run ended ([`crate::Runs::settle_ended_run`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunAftermath {
    /// The run was superseded with `rollback`: its messages, events and row are gone.
    pub removed: bool,
    /// A queued run of the same thread now waits to be claimed.
    pub successor_waiting: bool,
}

/// A spending cap of one user (see the server's `budgets` module). Exactly one of the two
/// limits is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetRecord {
    pub id: String,
    /// `user`, `key` or `model`.
    pub scope: String,
    /// The key's id for `key`, the model's name for `model`.
    pub scope_id: Option<String>,
    pub limit_micro_usd: Option<i64>,
    pub limit_tokens: Option<i64>,
    /// `day`, `week`, `month` or `rolling_days`.
    pub period: String,
    /// For `rolling_days`.
    pub days: Option<i64>,
    /// IANA name of the time zone whose midnights start its periods (`UTC`, `Europe/Paris`).
    pub timezone: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// What a call may use of one budget: `amount` (the budget's unit) is reserved in
/// `bucket_ms` if what the budget used and has reserved in `[window_start_ms, window_end_ms)` plus
/// `amount` stays within `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetCharge {
    pub budget_id: String,
    /// The reservation's id, for settling it.
    pub reservation_id: String,
    pub amount: i64,
    pub limit: i64,
    pub window_start_ms: i64,
    pub window_end_ms: i64,
    /// Start of the quarter hour the call is counted in.
    pub bucket_ms: i64,
}

/// What [`crate::Budgets::reserve_budgets`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// Every charge is reserved.
    Reserved,
    /// Nothing is reserved: this budget has `spent` (used and reserved) of its limit, and
    /// the charge would go past it.
    Exceeded { budget_id: String, spent: i64 },
}

/// A team and the role in it of the user who asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamMembership {
    pub team_id: String,
    pub name: String,
    pub created_at_ms: i64,
    /// `owner`, `admin` or `member`.
    pub role: String,
    pub members: i64,
}

/// A member of a team, as the team's members see them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamMemberRecord {
    pub user_id: String,
    pub email: String,
    pub name: Option<String>,
    pub role: String,
    pub joined_at_ms: i64,
}

/// One member's usage totals in a window: aggregates only.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberUsageTotals {
    pub user_id: String,
    pub email: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

/// An alert rule or scheduled report of one user (see the server's `alerts` module).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRuleRecord {
    pub id: String,
    /// Whose rule it is: the alerts go to them.
    pub user_id: UserId,
    /// The team whose usage it watches (its owner's or an admin's rule); `None`: the user's.
    pub team_id: Option<String>,
    /// `spend_over`, `spend_change`, `budget_forecast` or `report`.
    pub kind: String,
    /// The kind's settings (threshold, percent, budget id, ...), as JSON.
    pub params: Value,
    /// `hour`, `day` or `week`.
    pub every: String,
    /// Hour of the day (0–23) a daily or weekly tick falls on, in `timezone`.
    pub at_hour: i64,
    /// IANA time zone of the schedule and of the rule's periods.
    pub timezone: String,
    /// When the rule is next evaluated (unix ms).
    pub next_tick_at_ms: i64,
    pub last_tick_at_ms: Option<i64>,
    /// How many ticks have been taken.
    pub ticks: i64,
    pub created_at_ms: i64,
}

/// What a rule raised (or a report it started), once per rule and period.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRecord {
    pub id: String,
    pub rule_id: String,
    pub kind: String,
    /// The period it belongs to (a rule raises at most one alert per key).
    pub period_key: String,
    pub title: String,
    pub detail: String,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    /// The run that explains it (or the report's run).
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
    pub created_at_ms: i64,
}

/// A user's webhook (Standard Webhooks). `secret` is `whsec_` and base64: what signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookRecord {
    pub id: String,
    pub url: String,
    pub secret: String,
    pub description: String,
    pub created_at_ms: i64,
}

/// One message to one webhook, with the state of its delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDeliveryRecord {
    /// Also the `webhook-id` header of every attempt.
    pub id: String,
    pub webhook_id: String,
    pub event_type: String,
    /// The exact body sent (and signed).
    pub payload: String,
    /// `pending`, `delivered` or `failed`.
    pub status: String,
    pub attempts: i64,
    /// Attempts made before the last redelivery: the retry schedule counts from here.
    pub schedule_start: i64,
    pub next_attempt_at_ms: i64,
    pub created_at_ms: i64,
    pub delivered_at_ms: Option<i64>,
}

/// A delivery that is due, with where it goes and what signs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueDelivery {
    pub delivery: WebhookDeliveryRecord,
    pub owner: UserId,
    pub url: String,
    pub secret: String,
}

/// One attempt to deliver, as the delivery log shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttemptRecord {
    pub attempt: i64,
    pub at_ms: i64,
    /// The receiver's HTTP status; `None` when no response came.
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub duration_ms: i64,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryNext {
    /// The receiver answered 2xx at this time.
    Delivered(i64),
    /// Try again at this time.
    RetryAt(i64),
    /// The retries are spent.
    Failed,
}
