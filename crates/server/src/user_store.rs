//! `UserStore`: a store handle bound to one user.
//!
//! It can only be created from an [`AuthenticatedUser`] or a [`UserExecutionContext`], and it
//! passes that user's id to every call, so code holding it cannot read or write another
//! user's rows even by mistake.

use std::sync::Arc;

use serde_json::Value;

use crate::auth::AuthenticatedUser;
use crate::context::UserExecutionContext;
use crate::ids::{RunId, ThreadId, UserId};
use crate::store::rollups::{Rollup, Sketches};
use crate::store::{
    AlertRecord, AlertRuleRecord, BudgetCharge, BudgetRecord, ImportOutcome, ImportPlan,
    MessageRecord, PriceOverrideRecord, PriceVersionTotals, RegenerateOutcome,
    RegenerateSubmission, ReserveOutcome, RunAftermath, RunApproval, RunRecord, RunSubmission,
    Store, StoreResult, StoredEvent, StoredUsageRow, SubmitOutcome, TeamMembership, ThreadRecord,
    UsageDayTotals, UsageFilter, UsageRow, UsageTotals, WebhookAttemptRecord,
    WebhookDeliveryRecord, WebhookRecord,
};
use apex_protocol::threads::{MultitaskStrategy, RunStatus};

#[derive(Clone)]
pub struct UserStore {
    store: Arc<dyn Store>,
    owner: UserId,
}

impl UserStore {
    pub fn for_user(store: Arc<dyn Store>, user: &AuthenticatedUser) -> Self {
        Self {
            store,
            owner: user.user_id(),
        }
    }

    pub fn for_context(store: Arc<dyn Store>, ctx: &UserExecutionContext) -> Self {
        Self {
            store,
            owner: ctx.user_id(),
        }
    }

    pub fn owner(&self) -> UserId {
        self.owner
    }

    pub async fn create_thread(&self, thread: &ThreadRecord) -> StoreResult<()> {
        self.store.create_thread(self.owner, thread).await
    }
    pub async fn list_threads(&self, limit: i64, offset: i64) -> StoreResult<Vec<ThreadRecord>> {
        self.store.list_threads(self.owner, limit, offset).await
    }
    pub async fn get_thread(&self, id: ThreadId) -> StoreResult<Option<ThreadRecord>> {
        self.store.get_thread(self.owner, id).await
    }
    pub async fn update_thread(
        &self,
        id: ThreadId,
        title: &str,
        metadata: &Value,
        now_ms: i64,
    ) -> StoreResult<bool> {
        self.store
            .update_thread(self.owner, id, title, metadata, now_ms)
            .await
    }
    pub async fn delete_thread(&self, id: ThreadId) -> StoreResult<bool> {
        self.store.delete_thread(self.owner, id).await
    }
    pub async fn insert_message(&self, message: &MessageRecord) -> StoreResult<bool> {
        self.store.insert_message(self.owner, message).await
    }
    pub async fn list_messages(
        &self,
        thread: ThreadId,
        limit: i64,
        offset: i64,
    ) -> StoreResult<(Vec<MessageRecord>, i64)> {
        self.store
            .list_messages(self.owner, thread, limit, offset)
            .await
    }
    /// The thread's newest `limit` messages, oldest first.
    pub async fn latest_messages(
        &self,
        thread: ThreadId,
        limit: i64,
    ) -> StoreResult<Vec<MessageRecord>> {
        self.store.latest_messages(self.owner, thread, limit).await
    }
    pub async fn create_run(&self, run: &RunRecord) -> StoreResult<()> {
        self.store.create_run(self.owner, run).await
    }
    /// Stores the user's message and queues its run, within the user's limits.
    pub async fn submit_run(&self, submission: &RunSubmission<'_>) -> StoreResult<SubmitOutcome> {
        self.store.submit_run(self.owner, submission).await
    }
    /// Queues a run answering the thread's last user message again and marks the answers
    /// after it superseded, within the user's limits.
    pub async fn regenerate_run(
        &self,
        submission: &RegenerateSubmission<'_>,
    ) -> StoreResult<RegenerateOutcome> {
        self.store.regenerate_run(self.owner, submission).await
    }
    /// Clears the superseded mark `run` put on this user's answers.
    pub async fn restore_superseded(&self, run: RunId) -> StoreResult<u64> {
        self.store.restore_superseded(self.owner, run).await
    }
    /// Unfinished runs plus those finished at or after `finished_since_ms`, newest first.
    pub async fn recent_runs(
        &self,
        finished_since_ms: i64,
        limit: i64,
    ) -> StoreResult<Vec<RunRecord>> {
        self.store
            .recent_runs(self.owner, finished_since_ms, limit)
            .await
    }
    pub async fn get_run(&self, id: RunId) -> StoreResult<Option<RunRecord>> {
        self.store.get_run(self.owner, id).await
    }
    /// The run with where its approval stands.
    pub async fn run_approval(&self, id: RunId) -> StoreResult<Option<(RunRecord, RunApproval)>> {
        self.store.run_approval(self.owner, id).await
    }
    /// Records the user's answer to the run's request for approval (see
    /// [`crate::store::Runs::decide_approval`]).
    pub async fn decide_approval(
        &self,
        id: RunId,
        decision: &Value,
        now_ms: i64,
    ) -> StoreResult<bool> {
        self.store
            .decide_approval(self.owner, id, decision, now_ms)
            .await
    }
    /// Whether the user's runs wait for approval unless a message says otherwise.
    pub async fn require_approval_setting(&self) -> StoreResult<bool> {
        Ok(self
            .store
            .require_approval_setting(self.owner)
            .await?
            .unwrap_or(false))
    }
    pub async fn set_require_approval_setting(&self, value: bool) -> StoreResult<bool> {
        self.store
            .set_require_approval_setting(self.owner, value)
            .await
    }
    /// The strategy of the newer message that superseded the run, if one did.
    pub async fn run_superseded(&self, id: RunId) -> StoreResult<Option<MultitaskStrategy>> {
        self.store.run_superseded(self.owner, id).await
    }
    /// After the run's terminal event: removes it if rolled back; whether a run of its
    /// thread now waits in the queue.
    pub async fn settle_ended_run(&self, id: RunId) -> StoreResult<RunAftermath> {
        self.store.settle_ended_run(self.owner, id).await
    }
    pub async fn set_run_status(
        &self,
        id: RunId,
        status: RunStatus,
        error: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<()> {
        self.store
            .set_run_status(self.owner, id, status, error, now_ms)
            .await
    }
    pub async fn append_events(
        &self,
        run: RunId,
        events: Vec<(u64, String)>,
        now_ms: i64,
    ) -> StoreResult<()> {
        self.store
            .append_events(self.owner, run, events, now_ms)
            .await
    }
    pub async fn list_events(
        &self,
        run: RunId,
        after_seq: u64,
        limit: i64,
    ) -> StoreResult<Vec<StoredEvent>> {
        self.store
            .list_events(self.owner, run, after_seq, limit)
            .await
    }
    pub async fn insert_usage(&self, rows: &[UsageRow]) -> StoreResult<u64> {
        self.store.insert_usage(self.owner, rows).await
    }
    /// See [`Store::import_usage`]: chunked, all or nothing, within the quota.
    pub async fn import_usage(
        &self,
        rows: &[UsageRow],
        plan: &ImportPlan,
    ) -> StoreResult<ImportOutcome> {
        self.store.import_usage(self.owner, rows, plan).await
    }
    /// See [`Store::count_usage`]: what the import quota counts.
    pub async fn count_usage(&self) -> StoreResult<u64> {
        self.store.count_usage(self.owner).await
    }
    pub async fn usage_rows_since(&self, since_ms: i64) -> StoreResult<Vec<UsageRow>> {
        self.store.usage_rows_since(self.owner, since_ms).await
    }
    /// See [`Store::usage_window`]: the window folded once, for several figures.
    pub async fn usage_window(
        &self,
        since_ms: i64,
        until_ms: i64,
        sketches: Sketches,
    ) -> StoreResult<Rollup> {
        self.store
            .usage_window(self.owner, since_ms, until_ms, sketches)
            .await
    }
    /// See [`Store::usage_window_and_after`].
    pub async fn usage_window_and_after(
        &self,
        since_ms: i64,
        until_ms: i64,
        sketches: Sketches,
    ) -> StoreResult<(Rollup, Option<Rollup>)> {
        self.store
            .usage_window_and_after(self.owner, since_ms, until_ms, sketches)
            .await
    }
    /// See [`Store::usage_names`].
    pub async fn usage_names(&self, since_ms: i64) -> StoreResult<Vec<(String, String, f64)>> {
        self.store.usage_names(self.owner, since_ms).await
    }
    /// See [`Store::usage_totals`].
    pub async fn usage_totals(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageTotals>> {
        self.store
            .usage_totals(self.owner, since_ms, until_ms)
            .await
    }
    /// See [`Store::usage_daily`].
    pub async fn usage_daily(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageDayTotals>> {
        self.store.usage_daily(self.owner, since_ms, until_ms).await
    }
    /// See [`Store::usage_row`].
    pub async fn usage_row(&self, id: i64) -> StoreResult<Option<StoredUsageRow>> {
        self.store.usage_row(self.owner, id).await
    }
    /// See [`Store::usage_rows_page`].
    pub async fn usage_rows_page(
        &self,
        filter: &UsageFilter,
        before_id: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<StoredUsageRow>> {
        self.store
            .usage_rows_page(self.owner, filter, before_id, limit)
            .await
    }
    /// See [`Store::usage_by_price_version`].
    pub async fn usage_by_price_version(
        &self,
        filter: &UsageFilter,
    ) -> StoreResult<Vec<PriceVersionTotals>> {
        self.store.usage_by_price_version(self.owner, filter).await
    }
    /// See [`Store::add_price_overrides`].
    pub async fn add_price_overrides(&self, entries: &[PriceOverrideRecord]) -> StoreResult<()> {
        self.store.add_price_overrides(self.owner, entries).await
    }
    /// See [`Store::price_overrides`].
    pub async fn price_overrides(&self) -> StoreResult<Vec<PriceOverrideRecord>> {
        self.store.price_overrides(self.owner).await
    }
    /// See [`Store::create_budget`].
    pub async fn create_budget(&self, budget: &BudgetRecord) -> StoreResult<()> {
        self.store.create_budget(self.owner, budget).await
    }
    /// See [`Store::list_budgets`].
    pub async fn list_budgets(&self) -> StoreResult<Vec<BudgetRecord>> {
        self.store.list_budgets(self.owner).await
    }
    /// See [`Store::update_budget`].
    pub async fn update_budget(&self, budget: &BudgetRecord) -> StoreResult<bool> {
        self.store.update_budget(self.owner, budget).await
    }
    /// See [`Store::delete_budget`].
    pub async fn delete_budget(&self, id: &str) -> StoreResult<bool> {
        self.store.delete_budget(self.owner, id).await
    }
    /// What one of the user's budgets has spent in `[start_ms, end_ms)` (see
    /// [`Store::budget_spent`]); the caller took `id` from [`Self::list_budgets`].
    pub async fn budget_spent(
        &self,
        id: &str,
        start_ms: i64,
        end_ms: i64,
        now_ms: i64,
    ) -> StoreResult<i64> {
        self.store.budget_spent(id, start_ms, end_ms, now_ms).await
    }
    /// See [`Store::reserve_budgets`]: only the user's own budgets are charged.
    pub async fn reserve_budgets(
        &self,
        charges: &[BudgetCharge],
        now_ms: i64,
        expires_at_ms: i64,
    ) -> StoreResult<ReserveOutcome> {
        self.store
            .reserve_budgets(self.owner, charges, now_ms, expires_at_ms)
            .await
    }
    /// See [`Store::settle_reservations`].
    pub async fn settle_reservations(&self, settlements: &[(String, i64)]) -> StoreResult<()> {
        self.store.settle_reservations(settlements).await
    }
    /// See [`Store::claim_budget_notice`] (the caller took `id` from
    /// [`Self::list_budgets`]).
    pub async fn claim_budget_notice(
        &self,
        id: &str,
        period_start_ms: i64,
        threshold: i64,
    ) -> StoreResult<bool> {
        self.store
            .claim_budget_notice(id, period_start_ms, threshold)
            .await
    }
    /// See [`Store::create_team`]: this user is its owner.
    pub async fn create_team(&self, id: &str, name: &str, now_ms: i64) -> StoreResult<()> {
        self.store.create_team(self.owner, id, name, now_ms).await
    }
    /// See [`Store::teams_of`].
    pub async fn teams(&self) -> StoreResult<Vec<TeamMembership>> {
        self.store.teams_of(self.owner).await
    }
    /// This user's membership of team `id` (see [`Store::team_membership`]): every team
    /// route starts here, so a stranger's team answers like a missing one.
    pub async fn team_membership(&self, id: &str) -> StoreResult<Option<TeamMembership>> {
        self.store.team_membership(self.owner, id).await
    }
    /// See [`Store::redeem_team_invite`]: this user joins.
    pub async fn redeem_team_invite(
        &self,
        token_hash: &str,
        now_ms: i64,
    ) -> StoreResult<Option<String>> {
        self.store
            .redeem_team_invite(token_hash, self.owner, now_ms)
            .await
    }
    /// See [`Store::budgets_holding`].
    pub async fn budgets_holding(&self) -> StoreResult<Vec<BudgetRecord>> {
        self.store.budgets_holding(self.owner).await
    }
    /// See [`Store::create_alert_rule`]: the rule is this user's, whatever `rule.user_id`.
    pub async fn create_alert_rule(&self, rule: &AlertRuleRecord) -> StoreResult<()> {
        let mut rule = rule.clone();
        rule.user_id = self.owner;
        self.store.create_alert_rule(&rule).await
    }
    /// See [`Store::list_alert_rules`].
    pub async fn list_alert_rules(&self) -> StoreResult<Vec<AlertRuleRecord>> {
        self.store.list_alert_rules(self.owner).await
    }
    /// See [`Store::delete_alert_rule`].
    pub async fn delete_alert_rule(&self, id: &str) -> StoreResult<bool> {
        self.store.delete_alert_rule(self.owner, id).await
    }
    /// See [`Store::record_alert`].
    pub async fn record_alert(&self, alert: &AlertRecord) -> StoreResult<bool> {
        self.store.record_alert(self.owner, alert).await
    }
    /// See [`Store::set_alert_run`].
    pub async fn set_alert_run(&self, id: &str, run: RunId, thread: ThreadId) -> StoreResult<()> {
        self.store
            .set_alert_run(self.owner, id, &run.to_string(), &thread.to_string())
            .await
    }
    /// See [`Store::list_alerts`].
    pub async fn list_alerts(&self, limit: i64, offset: i64) -> StoreResult<Vec<AlertRecord>> {
        self.store.list_alerts(self.owner, limit, offset).await
    }
    /// See [`Store::create_webhook`].
    pub async fn create_webhook(&self, hook: &WebhookRecord) -> StoreResult<()> {
        self.store.create_webhook(self.owner, hook).await
    }
    /// See [`Store::list_webhooks`].
    pub async fn list_webhooks(&self) -> StoreResult<Vec<WebhookRecord>> {
        self.store.list_webhooks(self.owner).await
    }
    /// See [`Store::delete_webhook`].
    pub async fn delete_webhook(&self, id: &str) -> StoreResult<bool> {
        self.store.delete_webhook(self.owner, id).await
    }
    /// See [`Store::enqueue_deliveries`].
    pub async fn enqueue_deliveries(
        &self,
        deliveries: &[WebhookDeliveryRecord],
    ) -> StoreResult<()> {
        self.store.enqueue_deliveries(self.owner, deliveries).await
    }
    /// See [`Store::list_deliveries`].
    pub async fn list_deliveries(
        &self,
        webhook_id: &str,
        limit: i64,
        offset: i64,
    ) -> StoreResult<Vec<WebhookDeliveryRecord>> {
        self.store
            .list_deliveries(self.owner, webhook_id, limit, offset)
            .await
    }
    /// See [`Store::get_delivery`].
    pub async fn get_delivery(
        &self,
        webhook_id: &str,
        id: &str,
    ) -> StoreResult<Option<WebhookDeliveryRecord>> {
        self.store.get_delivery(self.owner, webhook_id, id).await
    }
    /// See [`Store::delivery_attempts`].
    pub async fn delivery_attempts(&self, id: &str) -> StoreResult<Vec<WebhookAttemptRecord>> {
        self.store.delivery_attempts(self.owner, id).await
    }
    /// See [`Store::redeliver`].
    pub async fn redeliver(&self, id: &str, now_ms: i64) -> StoreResult<bool> {
        self.store.redeliver(self.owner, id, now_ms).await
    }
}
