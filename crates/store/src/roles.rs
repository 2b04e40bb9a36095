//! What a store does, one trait per role, and [`Store`], all of them at once.
//!
//! Account methods ([`Accounts`]) establish identity; every method on a user's data takes
//! the owning [`UserId`] and filters every query by it (the server's `UserStore` passes the
//! authenticated user's), so another user's row is indistinguishable from a missing one.
//! Through `dyn Store` every method is callable as it is; on a concrete store, a role's
//! methods need its trait in scope ([`crate::prelude`]).

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;

use crate::ids::{RunId, ThreadId, UserId};
use crate::records::{
    AlertRecord, AlertRuleRecord, ApiKeyRecord, BudgetCharge, BudgetRecord, DeliveryNext,
    DueDelivery, ImportOutcome, ImportPlan, MemberUsageTotals, MessageRecord, PriceOverrideRecord,
    PriceVersionTotals, QueueEntry, RedeemedTicket, RefreshRotation, RegenerateOutcome,
    RegenerateSubmission, ReserveOutcome, RunAftermath, RunApproval, RunRecord, RunSubmission,
    SessionEndReason, SessionRecord, StoreResult, StoredEvent, StoredUsageRow, SubmitOutcome,
    TeamMemberRecord, TeamMembership, ThreadRecord, TicketRecord, UsageDayTotals, UsageFilter,
    UsageRow, UsageTotals, UserRecord, WebhookAttemptRecord, WebhookDeliveryRecord, WebhookRecord,
};
use crate::rollups::{Rollup, Sketches};
use apex_protocol::threads::{MultitaskStrategy, RunStatus};

/// Everything Apex persists: every role at once. Implemented for every type that has all
/// the roles, so a store only implements the roles.
pub trait Store:
    Accounts + Threads + Runs + QueueSignals + EventLog + Usage + Budgets + Teams + Alerts + Cluster
{
}

impl<
        T: Accounts
            + Threads
            + Runs
            + QueueSignals
            + EventLog
            + Usage
            + Budgets
            + Teams
            + Alerts
            + Cluster,
    > Store for T
{
}

/// Users, sessions, refresh tokens and WebSocket tickets: what establishes identity. The only role whose methods take no owner.
#[async_trait]
pub trait Accounts: Send + Sync {
    async fn create_user(&self, user: &UserRecord) -> StoreResult<()>;
    async fn find_user_by_email(&self, email: &str) -> StoreResult<Option<UserRecord>>;
    async fn get_user(&self, id: UserId) -> StoreResult<Option<UserRecord>>;
    /// Starts a session with its first refresh token (`refresh_expires_at_ms` is capped at
    /// the session's end).
    async fn create_session(
        &self,
        session: &SessionRecord,
        refresh_jti: &str,
        refresh_expires_at_ms: i64,
    ) -> StoreResult<()>;
    async fn get_session(&self, id: &str) -> StoreResult<Option<SessionRecord>>;
    /// Spends the refresh token `jti` of `user` and issues `new_jti` in the same session, in
    /// one transaction; a token presented after it was spent ends its session.
    async fn rotate_refresh_token(
        &self,
        jti: &str,
        user: UserId,
        new_jti: &str,
        new_expires_at_ms: i64,
        now_ms: i64,
    ) -> StoreResult<RefreshRotation>;
    /// Ends one session of `owner`; `false` if it is not theirs, unknown or already ended.
    async fn end_session(
        &self,
        owner: UserId,
        id: &str,
        reason: SessionEndReason,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// Ends every active session of `owner`; returns their ids.
    async fn end_all_sessions(
        &self,
        owner: UserId,
        reason: SessionEndReason,
        now_ms: i64,
    ) -> StoreResult<Vec<String>>;
    /// The active sessions of `owner`, newest first.
    async fn list_sessions(&self, owner: UserId, now_ms: i64) -> StoreResult<Vec<SessionRecord>>;
    /// Which of `ids` are no longer active at `now_ms` (ended, past their lifetime, or gone).
    /// An id may also name an API key (a stream opened with one): revoked or expired keys
    /// are inactive too.
    async fn inactive_sessions(&self, ids: &[String], now_ms: i64) -> StoreResult<Vec<String>>;
    async fn insert_ticket(&self, ticket: &TicketRecord) -> StoreResult<()>;
    /// Uses the ticket once if it is known, unexpired, has uses left and its session is
    /// active, in one statement (concurrent redemptions cannot exceed `max_uses`).
    async fn redeem_ticket(
        &self,
        ticket_id: &str,
        now_ms: i64,
    ) -> StoreResult<Option<RedeemedTicket>>;
    /// Deletes expired tickets and refresh tokens, and sessions that ended or expired before
    /// `sessions_before_ms` (with their tokens). Returns how many rows went.
    async fn prune_sessions(&self, now_ms: i64, sessions_before_ms: i64) -> StoreResult<u64>;
    /// Stores a new API key of `key.user_id` with the digest of its secret.
    async fn create_api_key(&self, key: &ApiKeyRecord, secret_hash: &str) -> StoreResult<()>;
    /// `owner`'s keys that are active at `now_ms`, newest first.
    async fn list_api_keys(&self, owner: UserId, now_ms: i64) -> StoreResult<Vec<ApiKeyRecord>>;
    /// The key whose secret has this digest, whatever its state.
    async fn find_api_key(&self, secret_hash: &str) -> StoreResult<Option<ApiKeyRecord>>;
    /// Revokes `owner`'s active key `id`; `false` if it is not theirs, unknown or not active.
    async fn revoke_api_key(&self, owner: UserId, id: &str, now_ms: i64) -> StoreResult<bool>;
    /// Records that key `id` was used at `now_ms`, at most once a minute (a write per
    /// request would be a write per request).
    async fn touch_api_key(&self, id: &str, now_ms: i64) -> StoreResult<()>;
    /// Whether `user`'s runs wait for approval of their plan unless a message says
    /// otherwise; `None` for an unknown user.
    async fn require_approval_setting(&self, user: UserId) -> StoreResult<Option<bool>>;
    /// Sets that default; `false` for an unknown user.
    async fn set_require_approval_setting(&self, user: UserId, value: bool) -> StoreResult<bool>;
}

/// A user's threads and the messages in them; every method is filtered by `owner`.
#[async_trait]
pub trait Threads: Send + Sync {
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
    /// The newest `limit` messages of a thread of `owner`, oldest first, in one read (a
    /// run's context: [`Threads::list_messages`] needs the count first to page from the
    /// end).
    async fn latest_messages(
        &self,
        owner: UserId,
        thread: ThreadId,
        limit: i64,
    ) -> StoreResult<Vec<MessageRecord>>;
}

/// Runs and the run queue: submitting, claiming, heartbeats, recovery (see the server's
/// `queue` module; waking other processes is [`QueueSignals`]). Methods with an `owner` are
/// filtered by it; the queue's own methods work across users, for the instances that
/// execute runs.
#[async_trait]
pub trait Runs: Send + Sync {
    /// Creates a run, recording `instance` (see the server's `cluster` module) as the one
    /// executing it. The server submits runs with [`Runs::submit_run`]; this is for tools
    /// and tests.
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
    /// Stores the user's message and queues the run answering it (status `queued`, no
    /// instance), in one transaction, if the thread is `owner`'s, has no unfinished run,
    /// and `owner` has fewer than `max_unfinished` queued or running runs. A user's
    /// submissions are serialised, so the limits are exact across instances.
    async fn submit_run(
        &self,
        owner: UserId,
        submission: &RunSubmission<'_>,
    ) -> StoreResult<SubmitOutcome>;
    /// Queues a run answering the last user message of `submission.run`'s thread again,
    /// within the same limits as [`Runs::submit_run`] and in one transaction that also
    /// marks the thread's answers after that message (not yet superseded) as superseded by
    /// the run. No message is stored.
    async fn regenerate_run(
        &self,
        owner: UserId,
        submission: &RegenerateSubmission<'_>,
    ) -> StoreResult<RegenerateOutcome>;
    /// Clears the superseded mark `run` put on `owner`'s answers: a regeneration that
    /// ended without an answer leaves the earlier one current.
    async fn restore_superseded(&self, owner: UserId, run: RunId) -> StoreResult<u64>;
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
    /// Puts a stale run of instance `from` back in the queue for another attempt; `false`
    /// if it finished or another sweeper moved it first. Exactly one caller wins.
    async fn requeue_run(&self, run: RunId, from: Option<&str>) -> StoreResult<bool>;
    /// The strategy of the newer message that superseded `owner`'s run `run` (marked by
    /// [`Runs::submit_run`]), if one did: a stopped run ends `interrupted` for `interrupt`.
    async fn run_superseded(
        &self,
        owner: UserId,
        run: RunId,
    ) -> StoreResult<Option<MultitaskStrategy>>;
    /// Called once `owner`'s run `run` has ended (its terminal event is stored): removes
    /// it (its messages, events and row) if a newer message rolled it back, and tells
    /// whether a queued run of its thread now waits for a dispatcher.
    async fn settle_ended_run(&self, owner: UserId, run: RunId) -> StoreResult<RunAftermath>;
    /// Removes the runs a newer message rolled back that ended before `ended_before_ms`
    /// and are still there (their process stopped between their terminal event and
    /// [`Runs::settle_ended_run`]), as that would have. Returns how many.
    async fn sweep_rolled_back_runs(&self, ended_before_ms: i64) -> StoreResult<u64>;
    /// `owner`'s run `run` with its approval state.
    async fn run_approval(
        &self,
        owner: UserId,
        run: RunId,
    ) -> StoreResult<Option<(RunRecord, RunApproval)>>;
    /// Records the request for approval of a run that `instance` executes (still
    /// `running`): `pending` and its expiry. `false` if the run is no longer this
    /// instance's, or already has one.
    async fn request_approval(
        &self,
        run: RunId,
        instance: &str,
        pending: &Value,
        expires_at_ms: i64,
    ) -> StoreResult<bool>;
    /// Parks a run `instance` executes, whose request for approval is recorded and not
    /// yet answered: status `awaiting_approval`, no instance, no heartbeat. `false` if it
    /// was answered meanwhile (the caller continues it) or is no longer this instance's.
    async fn park_for_approval(&self, run: RunId, instance: &str) -> StoreResult<bool>;
    /// Records `owner`'s answer to the unanswered, unexpired request for approval of
    /// `run`: a parked run goes back to the queue (first attempt again), one still
    /// parking keeps going on its instance. `false` if there is no such request.
    async fn decide_approval(
        &self,
        owner: UserId,
        run: RunId,
        decision: &Value,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// Ends every parked run whose request expired at or before `now_ms` with
    /// `timed_out` and `error`, and returns them; concurrent callers never both get one.
    async fn expire_approvals(&self, now_ms: i64, error: &str) -> StoreResult<Vec<QueueEntry>>;
}

/// How processes wake each other's queue dispatchers: a submitting instance announces
/// queued runs, and every dispatcher claims at once instead of at its next poll.
#[async_trait]
pub trait QueueSignals: Send + Sync {
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
}

/// Each run's log of events, persisted before they are delivered.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Persists one event of a run's log, as [`Self::append_events`] with one event.
    async fn append_event(
        &self,
        owner: UserId,
        run: RunId,
        seq: u64,
        json: &str,
        now_ms: i64,
    ) -> StoreResult<()> {
        self.append_events(owner, run, vec![(seq, json.to_owned())], now_ms)
            .await
    }
    /// Persists consecutive events `(seq, json)` of a run's log, all or none: seqs are
    /// unique per run; a run an instance has claimed gets its heartbeat refreshed to
    /// `now_ms`. Returns once they are committed. Both engines batch concurrent calls into
    /// one transaction (group commit, see `group_commit`), with the same result per call as
    /// the call alone. `json` is the event's log form (`AgentEvent::to_log_json`); any
    /// other text is kept as it is. At most [`MAX_EVENTS_PER_APPEND`] events; none is an
    /// error.
    ///
    /// [`MAX_EVENTS_PER_APPEND`]: crate::MAX_EVENTS_PER_APPEND
    async fn append_events(
        &self,
        owner: UserId,
        run: RunId,
        events: Vec<(u64, String)>,
        now_ms: i64,
    ) -> StoreResult<()>;
    /// The run's events after `after_seq`, in seq order, each as its wire JSON.
    async fn list_events(
        &self,
        owner: UserId,
        run: RunId,
        after_seq: u64,
        limit: i64,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Retention: deletes the event logs of runs that finished before `finished_before_ms`.
    /// The runs and messages stay; only the step-by-step events go. Returns events deleted.
    async fn prune_events(&self, finished_before_ms: i64) -> StoreResult<u64>;
}

/// A user's AI usage rows and the figures the database computes from them; every method is
/// filtered by `owner`.
#[async_trait]
pub trait Usage: Send + Sync {
    async fn insert_usage(&self, owner: UserId, rows: &[UsageRow]) -> StoreResult<u64>;
    /// Stores an upload of `owner`'s rows in chunks of `plan.chunk_rows`, one transaction
    /// each, so that other users' writes get the writer between chunks. All or nothing: the
    /// rows carry the import's id, and if a chunk fails, or the quota check after the last
    /// one fails (two imports of one user at once), the chunks already written are deleted
    /// again. A crash between chunks leaves the import listed as unfinished, for
    /// [`Usage::sweep_abandoned_imports`]. Refused whole, with nothing written, when
    /// `owner` would have more than `plan.quota` rows.
    async fn import_usage(
        &self,
        owner: UserId,
        rows: &[UsageRow],
        plan: &ImportPlan,
    ) -> StoreResult<ImportOutcome>;
    /// How many usage rows `owner` has stored (what the import quota counts).
    async fn count_usage(&self, owner: UserId) -> StoreResult<u64>;
    /// Deletes the rows of imports started before `started_before_ms` that never finished
    /// (the process stopped between two chunks). Returns the rows deleted.
    async fn sweep_abandoned_imports(&self, started_before_ms: i64) -> StoreResult<u64>;
    /// Every row of `owner` dated at or after `since_ms`, by time. The server's own figures
    /// come from the queries below, which read the rollups (see [`crate::rollups`]).
    async fn usage_rows_since(&self, owner: UserId, since_ms: i64) -> StoreResult<Vec<UsageRow>>;
    /// `owner`'s usage rows dated in `[since_ms, until_ms]`, folded: the window's whole
    /// days from the rollups, its partial edge days from the rows, with the `sketches`
    /// asked for. The figures below are functions of it (see [`crate::rollups`]); read it
    /// once where several are needed.
    async fn usage_window(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        sketches: Sketches,
    ) -> StoreResult<Rollup>;
    /// [`Usage::usage_window`], and from the same read the rollup of `owner`'s rows dated
    /// after `until_ms` (future-dated ones), when the rollups settle it without reading
    /// rows; `None` when rows of `until_ms`'s day are dated after it (read those with
    /// `usage_window(owner, until_ms + 1, i64::MAX, ..)`).
    async fn usage_window_and_after(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        sketches: Sketches,
    ) -> StoreResult<(Rollup, Option<Rollup>)>;
    /// Totals per (provider, model, workload, source) of `owner`'s usage rows dated in
    /// `[since_ms, until_ms]`: the window's whole days from the rollups, its partial edge
    /// days from the rows.
    async fn usage_totals(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageTotals>>;
    /// The (model, workload) pairs of `owner`'s usage on the UTC days from the one holding
    /// `since_ms` on (that whole day, and rows dated in the future, included), each with its
    /// spend, by name: what a run needs to recognise the user's own names in a question,
    /// from the rollups alone (a window's exact edges would need its edge days' rows).
    async fn usage_names(
        &self,
        owner: UserId,
        since_ms: i64,
    ) -> StoreResult<Vec<(String, String, f64)>>;
    /// Requests and spend per (UTC day, model) of `owner`'s rows dated in
    /// `[since_ms, until_ms]`.
    async fn usage_daily(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageDayTotals>>;
    /// `owner`'s row `id`, if it is theirs.
    async fn usage_row(&self, owner: UserId, id: i64) -> StoreResult<Option<StoredUsageRow>>;
    /// `owner`'s rows matching `filter`, newest first, at most `limit`, only those with an
    /// id below `before_id` when it is set (the next page).
    async fn usage_rows_page(
        &self,
        owner: UserId,
        filter: &UsageFilter,
        before_id: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<StoredUsageRow>>;
    /// Tokens by class and stored cost of `owner`'s rows matching `filter`, per price
    /// version, ordered by version (rows with the source's own cost first).
    async fn usage_by_price_version(
        &self,
        owner: UserId,
        filter: &UsageFilter,
    ) -> StoreResult<Vec<PriceVersionTotals>>;
    /// Adds price overrides of `owner`, all or none.
    async fn add_price_overrides(
        &self,
        owner: UserId,
        entries: &[PriceOverrideRecord],
    ) -> StoreResult<()>;
    /// Every price override of `owner`, oldest first.
    async fn price_overrides(&self, owner: UserId) -> StoreResult<Vec<PriceOverrideRecord>>;
}

/// Spending caps and what counts against them (see the server's `budgets` module).
/// Reservations are exact under concurrency, on one instance or many: a call is admitted
/// only if every budget it falls under has room for what it may cost at most.
#[async_trait]
pub trait Budgets: Send + Sync {
    async fn create_budget(&self, owner: UserId, budget: &BudgetRecord) -> StoreResult<()>;
    /// `owner`'s budgets, oldest first.
    async fn list_budgets(&self, owner: UserId) -> StoreResult<Vec<BudgetRecord>>;
    /// Replaces `owner`'s budget `budget.id`; false if there is none.
    async fn update_budget(&self, owner: UserId, budget: &BudgetRecord) -> StoreResult<bool>;
    /// Deletes `owner`'s budget `id` with what counted against it; false if there is none.
    async fn delete_budget(&self, owner: UserId, id: &str) -> StoreResult<bool>;
    /// What budget `id` used and has reserved (unexpired at `now_ms`) in
    /// `[start_ms, end_ms)`.
    async fn budget_spent(
        &self,
        id: &str,
        start_ms: i64,
        end_ms: i64,
        now_ms: i64,
    ) -> StoreResult<i64>;
    /// Reserves every charge of `owner`'s call, or none: in one transaction that holds
    /// each budget (in id order) until commit, so concurrent calls, on any instance, see
    /// each other's reservations. Reservations stop counting at `expires_at_ms`.
    async fn reserve_budgets(
        &self,
        owner: UserId,
        charges: &[BudgetCharge],
        now_ms: i64,
        expires_at_ms: i64,
    ) -> StoreResult<ReserveOutcome>;
    /// Settles reservations: each `(reservation id, used)` is removed, and `used` added
    /// to its budget's usage in the reservation's quarter hour. A reservation already gone (expired and swept, or its budget
    /// deleted) is skipped.
    async fn settle_reservations(&self, settlements: &[(String, i64)]) -> StoreResult<()>;
    /// Records that the warning at `threshold` percent of budget `id` was sent for the
    /// period starting at `period_start_ms`; false if it was already.
    async fn claim_budget_notice(
        &self,
        id: &str,
        period_start_ms: i64,
        threshold: i64,
    ) -> StoreResult<bool>;
}

/// Teams: membership and roles, single-use invites, and members' usage as aggregates.
#[async_trait]
pub trait Teams: Send + Sync {
    /// Makes a team with `owner` as its owner.
    async fn create_team(
        &self,
        owner: UserId,
        id: &str,
        name: &str,
        now_ms: i64,
    ) -> StoreResult<()>;
    /// The teams `user` belongs to, with their role, oldest first.
    async fn teams_of(&self, user: UserId) -> StoreResult<Vec<TeamMembership>>;
    /// `user`'s membership of team `id`, if any.
    async fn team_membership(&self, user: UserId, id: &str) -> StoreResult<Option<TeamMembership>>;
    /// The members of team `id`, by join time.
    async fn team_members(&self, id: &str) -> StoreResult<Vec<TeamMemberRecord>>;
    /// Stores an invite to team `id` with `role`, by its token's digest.
    async fn create_team_invite(
        &self,
        id: &str,
        token_hash: &str,
        role: &str,
        created_by: UserId,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> StoreResult<()>;
    /// Uses the invite `token_hash` (once, before it expires) for `user`: they join its
    /// team with its role (a member already keeps their role). The team's id, or `None`.
    async fn redeem_team_invite(
        &self,
        token_hash: &str,
        user: UserId,
        now_ms: i64,
    ) -> StoreResult<Option<String>>;
    /// Sets `user`'s role in team `id`; false if they are not in it.
    async fn set_team_role(&self, id: &str, user: UserId, role: &str) -> StoreResult<bool>;
    /// Removes `user` from team `id`; false if they were not in it.
    async fn remove_team_member(&self, id: &str, user: UserId) -> StoreResult<bool>;
    /// Every member's usage totals in `[since_ms, until_ms]`, by email.
    async fn team_usage(
        &self,
        id: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<MemberUsageTotals>>;
    /// Every budget that holds `user`'s calls, in one statement: their own (oldest first),
    /// then those of the teams they belong to that others set (scope `team`).
    async fn budgets_holding(&self, user: UserId) -> StoreResult<Vec<BudgetRecord>>;
}

/// Alert rules and scheduled reports, what they raised, and webhook deliveries (see the
/// server's `alerts` module). Ticks and deliveries are taken by compare-and-set, so with
/// several instances on one database each is taken by exactly one.
#[async_trait]
pub trait Alerts: Send + Sync {
    async fn create_alert_rule(&self, rule: &AlertRuleRecord) -> StoreResult<()>;
    /// `owner`'s rules, oldest first.
    async fn list_alert_rules(&self, owner: UserId) -> StoreResult<Vec<AlertRuleRecord>>;
    /// Deletes `owner`'s rule `id` with its alerts; false if there is none.
    async fn delete_alert_rule(&self, owner: UserId, id: &str) -> StoreResult<bool>;
    /// Every user's rules due at `now_ms` (at most `limit`, most overdue first).
    async fn due_alert_rules(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<AlertRuleRecord>>;
    /// Takes the tick of rule `id` due at `due_ms`: moves its next tick to `next_ms` if
    /// it still is `due_ms`. True for exactly one caller, on any instance.
    async fn claim_alert_tick(
        &self,
        id: &str,
        due_ms: i64,
        next_ms: i64,
        now_ms: i64,
    ) -> StoreResult<bool>;
    /// Records what a rule of `owner` raised; false if the rule already raised one for
    /// `alert.period_key` (nothing is written then).
    async fn record_alert(&self, owner: UserId, alert: &AlertRecord) -> StoreResult<bool>;
    /// Links `owner`'s alert `id` to the run that explains it.
    async fn set_alert_run(
        &self,
        owner: UserId,
        id: &str,
        run_id: &str,
        thread_id: &str,
    ) -> StoreResult<()>;
    /// `owner`'s alerts, newest first: `limit` of them after skipping `offset`.
    async fn list_alerts(
        &self,
        owner: UserId,
        limit: i64,
        offset: i64,
    ) -> StoreResult<Vec<AlertRecord>>;
    async fn create_webhook(&self, owner: UserId, hook: &WebhookRecord) -> StoreResult<()>;
    /// `owner`'s webhooks, oldest first.
    async fn list_webhooks(&self, owner: UserId) -> StoreResult<Vec<WebhookRecord>>;
    /// Deletes `owner`'s webhook `id` with its deliveries; false if there is none.
    async fn delete_webhook(&self, owner: UserId, id: &str) -> StoreResult<bool>;
    /// Queues messages to `owner`'s webhooks (each names its webhook).
    async fn enqueue_deliveries(
        &self,
        owner: UserId,
        deliveries: &[WebhookDeliveryRecord],
    ) -> StoreResult<()>;
    /// Pending deliveries of every user due at `now_ms` (at most `limit`, oldest first).
    async fn due_deliveries(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<DueDelivery>>;
    /// Takes delivery `id` for one attempt: if it is still pending and due at `seen_ms`,
    /// counts the attempt and leases it until `lease_until_ms`. True for one caller.
    async fn claim_delivery(
        &self,
        id: &str,
        seen_ms: i64,
        lease_until_ms: i64,
    ) -> StoreResult<bool>;
    /// Logs an attempt of delivery `id` and moves it on to `next`, in one transaction.
    async fn finish_delivery_attempt(
        &self,
        id: &str,
        attempt: &WebhookAttemptRecord,
        next: DeliveryNext,
    ) -> StoreResult<()>;
    /// The deliveries of `owner`'s webhook `webhook_id`, newest first: `limit` of them
    /// after skipping `offset`.
    async fn list_deliveries(
        &self,
        owner: UserId,
        webhook_id: &str,
        limit: i64,
        offset: i64,
    ) -> StoreResult<Vec<WebhookDeliveryRecord>>;
    /// `owner`'s delivery `id` of webhook `webhook_id`, if any.
    async fn get_delivery(
        &self,
        owner: UserId,
        webhook_id: &str,
        id: &str,
    ) -> StoreResult<Option<WebhookDeliveryRecord>>;
    /// The attempts of `owner`'s delivery `id`, first first.
    async fn delivery_attempts(
        &self,
        owner: UserId,
        id: &str,
    ) -> StoreResult<Vec<WebhookAttemptRecord>>;
    /// Sends `owner`'s delivery `id` again, same message id, with a fresh retry schedule
    /// starting at `now_ms`; false if there is none.
    async fn redeliver(&self, owner: UserId, id: &str, now_ms: i64) -> StoreResult<bool>;
}

/// What the instances sharing one database coordinate through (see the server's `cluster`
/// module), and the readiness probe.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Readiness probe: the database answers.
    async fn ping(&self) -> StoreResult<()>;
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
}
