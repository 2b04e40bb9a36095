//! The background task of alerts: takes the ticks that are due and sends the webhook
//! messages that are due, on every instance, each taken by exactly one.
//!
//! A tick is taken by moving the rule's `next_tick_at` from the due time read to the
//! first slot after now (compare-and-set): of several instances that read the same due
//! rule, one moves it and evaluates; the others find it moved. Ticks missed while every
//! instance was down are one due tick on return. What a tick raises is recorded at most
//! once per rule and period (a unique key), then explained by a run of the rule's owner
//! (submitted through the one road for runs, [`Runs::submit`]), shown on their sockets
//! and queued for their webhooks.
//!
//! Taken ticks are not retried: an instance that dies between taking a tick and recording
//! what it found (milliseconds) loses that tick, and the next one evaluates again. Spend
//! alerts look at the whole period, so the next tick raises what the lost one would have.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::evaluate::{evaluate, Finding};
use super::webhooks::Deliverer;
use super::{alert_view, Rule};
use crate::agents::Infrastructure;
use crate::auth::AuthenticatedUser;
use crate::clock::{now_ms, now_rfc3339};
use crate::events::BusEvent;
use crate::ids::RequestId;
use crate::run::submit::Steering;
use crate::run::Runs;
use crate::settings::WebhookSettings;
use crate::store::{AlertRecord, AlertRuleRecord, WebhookDeliveryRecord};
use crate::telemetry;
use crate::user_store::UserStore;

/// At most this many due rules are taken per pass.
const BATCH: i64 = 64;

/// Evaluates due rules and delivers webhook messages. Shared infrastructure: it holds no
/// user's data between ticks; each tick builds the rule owner's [`UserStore`].
pub struct Alerting {
    infra: Arc<Infrastructure>,
    runs: Runs,
    deliverer: Arc<Deliverer>,
    /// How often the queues are read without being woken.
    poll: Duration,
    /// Woken when a rule is made here, so its first tick need not wait for the next poll.
    wake_ticks: Notify,
    /// Woken when this instance queues a webhook message.
    wake_deliveries: Notify,
}

impl Alerting {
    pub fn new(
        infra: Arc<Infrastructure>,
        runs: Runs,
        poll: Duration,
        webhooks: WebhookSettings,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            deliverer: Arc::new(Deliverer::new(Arc::clone(&infra.store), webhooks)?),
            infra,
            runs,
            poll,
            wake_ticks: Notify::new(),
            wake_deliveries: Notify::new(),
        })
    }

    /// Tells the tasks that a tick or a message may be due now.
    pub fn wake(&self) {
        self.wake_ticks.notify_one();
        self.wake_deliveries.notify_one();
    }

    /// Takes due ticks and sends due messages until `draining`: two loops, so a slow
    /// webhook receiver never delays a tick.
    pub async fn run(self: Arc<Self>, draining: CancellationToken) {
        let ticks = async {
            loop {
                self.take_due_ticks().await;
                tokio::select! {
                    _ = draining.cancelled() => return,
                    _ = self.wake_ticks.notified() => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
            }
        };
        let deliveries = async {
            loop {
                self.deliverer.deliver_due().await;
                tokio::select! {
                    _ = draining.cancelled() => return,
                    _ = self.wake_deliveries.notified() => {}
                    _ = tokio::time::sleep(self.poll) => {}
                }
            }
        };
        tokio::join!(ticks, deliveries);
    }

    /// Takes and evaluates every rule due now. How many ticks this instance took.
    pub async fn take_due_ticks(&self) -> usize {
        let now = now_ms();
        let due = match self.infra.store.due_alert_rules(now, BATCH).await {
            Ok(due) => due,
            Err(err) => {
                tracing::error!(error = %err, "reading due alert rules failed");
                return 0;
            }
        };
        let mut taken = 0;
        for record in due {
            let Some(rule) = Rule::from_record(&record) else {
                tracing::warn!(rule = %record.id, "an alert rule this version cannot read");
                continue;
            };
            let next = rule.schedule.next_after(now);
            match self
                .infra
                .store
                .claim_alert_tick(&record.id, record.next_tick_at_ms, next, now)
                .await
            {
                Ok(true) => {}
                Ok(false) => continue, // another instance took it
                Err(err) => {
                    tracing::error!(error = %err, "taking an alert tick failed");
                    continue;
                }
            }
            taken += 1;
            metrics::counter!(telemetry::ALERT_TICKS, "kind" => rule.kind.name()).increment(1);
            if let Err(err) = self.tick(&record, &rule, now).await {
                tracing::error!(error = %err, rule = %record.id, "evaluating an alert rule failed");
            }
        }
        taken
    }

    /// Evaluates one taken tick and raises what it found.
    async fn tick(&self, record: &AlertRuleRecord, rule: &Rule, now: i64) -> anyhow::Result<()> {
        let owner = AuthenticatedUser::for_schedule(record.user_id, &record.id);
        let store = UserStore::for_user(Arc::clone(&self.infra.store), &owner);
        let Some(finding) = evaluate(
            rule,
            &store,
            self.infra.store.as_ref(),
            record.next_tick_at_ms,
            now,
        )
        .await?
        else {
            return Ok(());
        };
        self.raise(&owner, &store, rule, finding, now).await
    }

    /// Records `finding` (once per rule and period), starts the run that explains it, and
    /// tells the owner's sockets and webhooks.
    async fn raise(
        &self,
        owner: &AuthenticatedUser,
        store: &UserStore,
        rule: &Rule,
        finding: Finding,
        now: i64,
    ) -> anyhow::Result<()> {
        let mut alert = AlertRecord {
            id: format!("alert_{}", uuid::Uuid::new_v4().simple()),
            rule_id: rule.id.clone(),
            kind: rule.kind.name().into(),
            period_key: finding.period_key,
            title: finding.title,
            detail: finding.detail,
            value: finding.value,
            threshold: finding.threshold,
            run_id: None,
            thread_id: None,
            created_at_ms: now,
        };
        if !store.record_alert(&alert).await? {
            return Ok(()); // raised already in this period
        }
        metrics::counter!(telemetry::ALERTS_RAISED, "kind" => rule.kind.name()).increment(1);
        if rule.explain {
            match self
                .runs
                .submit(
                    owner,
                    None,
                    &finding.question,
                    Steering::unattended(),
                    RequestId::generate(),
                )
                .await
            {
                Ok(run) => {
                    store
                        .set_alert_run(&alert.id, run.run_id, run.thread_id)
                        .await?;
                    alert.run_id = Some(run.run_id.to_string());
                    alert.thread_id = Some(run.thread_id.to_string());
                }
                // The alert stands without its explanation (the user is at their run
                // limit, or the server is stopping).
                Err(err) => {
                    tracing::warn!(error = %err, rule = %rule.id, "could not start the run explaining an alert");
                }
            }
        }
        let view = alert_view(&alert);
        let mut frame = serde_json::to_value(&view)?;
        frame["type"] = json!("alert");
        self.infra.bus.publish(Arc::new(BusEvent::notice(
            owner.user_id(),
            frame.to_string(),
        )));
        let event_type = match rule.kind {
            super::Kind::Report { .. } => "report.started",
            _ => "alert.fired",
        };
        let payload =
            json!({ "type": event_type, "timestamp": now_rfc3339(), "data": view }).to_string();
        let deliveries: Vec<_> = store
            .list_webhooks()
            .await?
            .into_iter()
            .map(|hook| WebhookDeliveryRecord {
                id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
                webhook_id: hook.id,
                event_type: event_type.into(),
                payload: payload.clone(),
                status: "pending".into(),
                attempts: 0,
                schedule_start: 0,
                next_attempt_at_ms: now,
                created_at_ms: now,
                delivered_at_ms: None,
            })
            .collect();
        if !deliveries.is_empty() {
            store.enqueue_deliveries(&deliveries).await?;
            self.wake_deliveries.notify_one();
        }
        Ok(())
    }
}
