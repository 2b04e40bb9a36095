//! The [`Alerts`] role's SQL. A child of `shared.rs`, compiled with it for each engine.
//!
//! Ticks and deliveries are taken by compare-and-set: an `UPDATE ... WHERE` the value the
//! taker read, so of several instances reading the same due row exactly one moves it on
//! (the others' UPDATE matches no row). No lock is held while a tick is evaluated or a
//! webhook is called.

use async_trait::async_trait;
use sqlx::Row;

use super::{decode_all, parse_stored_id, DbRow, Shell};
use crate::ids::UserId;
use crate::records::{
    parse_json_column, AlertRecord, AlertRuleRecord, DeliveryNext, DueDelivery, StoreResult,
    WebhookAttemptRecord, WebhookDeliveryRecord, WebhookRecord,
};
use crate::roles::Alerts;

const RULE_COLUMNS: &str = "id, user_id, team_id, kind, params, every, at_hour, timezone, \
     next_tick_at, last_tick_at, ticks, created_at";

fn decode_rule(row: &DbRow) -> StoreResult<AlertRuleRecord> {
    Ok(AlertRuleRecord {
        id: row.try_get(0)?,
        user_id: parse_stored_id(row.try_get(1)?, UserId::parse)?,
        team_id: row.try_get(2)?,
        kind: row.try_get(3)?,
        params: parse_json_column(row.try_get(4)?)?,
        every: row.try_get(5)?,
        at_hour: row.try_get(6)?,
        timezone: row.try_get(7)?,
        next_tick_at_ms: row.try_get(8)?,
        last_tick_at_ms: row.try_get(9)?,
        ticks: row.try_get(10)?,
        created_at_ms: row.try_get(11)?,
    })
}

const ALERT_COLUMNS: &str = "id, rule_id, kind, period_key, title, detail, value, threshold, \
     run_id, thread_id, created_at";

fn decode_alert(row: &DbRow) -> StoreResult<AlertRecord> {
    Ok(AlertRecord {
        id: row.try_get(0)?,
        rule_id: row.try_get(1)?,
        kind: row.try_get(2)?,
        period_key: row.try_get(3)?,
        title: row.try_get(4)?,
        detail: row.try_get(5)?,
        value: row.try_get(6)?,
        threshold: row.try_get(7)?,
        run_id: row.try_get(8)?,
        thread_id: row.try_get(9)?,
        created_at_ms: row.try_get(10)?,
    })
}

fn decode_webhook(row: &DbRow) -> StoreResult<WebhookRecord> {
    Ok(WebhookRecord {
        id: row.try_get(0)?,
        url: row.try_get(1)?,
        secret: row.try_get(2)?,
        description: row.try_get(3)?,
        created_at_ms: row.try_get(4)?,
    })
}

/// Columns of a delivery, `d` the delivery row.
const DELIVERY_COLUMNS: &str = "d.id, d.webhook_id, d.event_type, d.payload, d.status, \
     d.attempts, d.schedule_start, d.next_attempt_at, d.created_at, d.delivered_at";

fn decode_delivery(row: &DbRow) -> StoreResult<WebhookDeliveryRecord> {
    Ok(WebhookDeliveryRecord {
        id: row.try_get(0)?,
        webhook_id: row.try_get(1)?,
        event_type: row.try_get(2)?,
        payload: row.try_get(3)?,
        status: row.try_get(4)?,
        attempts: row.try_get(5)?,
        schedule_start: row.try_get(6)?,
        next_attempt_at_ms: row.try_get(7)?,
        created_at_ms: row.try_get(8)?,
        delivered_at_ms: row.try_get(9)?,
    })
}

fn decode_due(row: &DbRow) -> StoreResult<DueDelivery> {
    Ok(DueDelivery {
        delivery: decode_delivery(row)?,
        owner: parse_stored_id(row.try_get(10)?, UserId::parse)?,
        url: row.try_get(11)?,
        secret: row.try_get(12)?,
    })
}

fn decode_attempt(row: &DbRow) -> StoreResult<WebhookAttemptRecord> {
    Ok(WebhookAttemptRecord {
        attempt: row.try_get(0)?,
        at_ms: row.try_get(1)?,
        status_code: row.try_get(2)?,
        error: row.try_get(3)?,
        duration_ms: row.try_get(4)?,
    })
}

#[async_trait]
impl Alerts for Shell {
    async fn create_alert_rule(&self, rule: &AlertRuleRecord) -> StoreResult<()> {
        sqlx::query(&format!(
            "INSERT INTO alert_rules ({RULE_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&rule.id)
        .bind(rule.user_id.to_string())
        .bind(&rule.team_id)
        .bind(&rule.kind)
        .bind(rule.params.to_string())
        .bind(&rule.every)
        .bind(rule.at_hour)
        .bind(&rule.timezone)
        .bind(rule.next_tick_at_ms)
        .bind(rule.last_tick_at_ms)
        .bind(rule.ticks)
        .bind(rule.created_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn list_alert_rules(&self, owner: UserId) -> StoreResult<Vec<AlertRuleRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RULE_COLUMNS} FROM alert_rules WHERE user_id = $1 ORDER BY created_at, id"
        ))
        .bind(owner.to_string())
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, decode_rule)
    }

    async fn delete_alert_rule(&self, owner: UserId, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM alert_rules WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(owner.to_string())
            .execute(&self.writes)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn due_alert_rules(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<AlertRuleRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RULE_COLUMNS} FROM alert_rules WHERE next_tick_at <= $1 \
             ORDER BY next_tick_at, id LIMIT $2"
        ))
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.writes)
        .await?;
        decode_all(&rows, decode_rule)
    }

    async fn claim_alert_tick(
        &self,
        id: &str,
        due_ms: i64,
        next_ms: i64,
        now_ms: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE alert_rules SET next_tick_at = $1, last_tick_at = $2, ticks = ticks + 1 \
             WHERE id = $3 AND next_tick_at = $4",
        )
        .bind(next_ms)
        .bind(now_ms)
        .bind(id)
        .bind(due_ms)
        .execute(&self.writes)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_alert(&self, owner: UserId, alert: &AlertRecord) -> StoreResult<bool> {
        let done = sqlx::query(&format!(
            "INSERT INTO alerts (user_id, {ALERT_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
             ON CONFLICT (rule_id, period_key) DO NOTHING"
        ))
        .bind(owner.to_string())
        .bind(&alert.id)
        .bind(&alert.rule_id)
        .bind(&alert.kind)
        .bind(&alert.period_key)
        .bind(&alert.title)
        .bind(&alert.detail)
        .bind(alert.value)
        .bind(alert.threshold)
        .bind(&alert.run_id)
        .bind(&alert.thread_id)
        .bind(alert.created_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn set_alert_run(
        &self,
        owner: UserId,
        id: &str,
        run_id: &str,
        thread_id: &str,
    ) -> StoreResult<()> {
        sqlx::query("UPDATE alerts SET run_id = $1, thread_id = $2 WHERE id = $3 AND user_id = $4")
            .bind(run_id)
            .bind(thread_id)
            .bind(id)
            .bind(owner.to_string())
            .execute(&self.writes)
            .await?;
        Ok(())
    }

    async fn list_alerts(
        &self,
        owner: UserId,
        limit: i64,
        offset: i64,
    ) -> StoreResult<Vec<AlertRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE user_id = $1 \
             ORDER BY created_at DESC, id DESC LIMIT $2 OFFSET $3"
        ))
        .bind(owner.to_string())
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, decode_alert)
    }

    async fn create_webhook(&self, owner: UserId, hook: &WebhookRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO webhooks (id, user_id, url, secret, description, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&hook.id)
        .bind(owner.to_string())
        .bind(&hook.url)
        .bind(&hook.secret)
        .bind(&hook.description)
        .bind(hook.created_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn list_webhooks(&self, owner: UserId) -> StoreResult<Vec<WebhookRecord>> {
        let rows = sqlx::query(
            "SELECT id, url, secret, description, created_at FROM webhooks \
             WHERE user_id = $1 ORDER BY created_at, id",
        )
        .bind(owner.to_string())
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, decode_webhook)
    }

    async fn delete_webhook(&self, owner: UserId, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM webhooks WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(owner.to_string())
            .execute(&self.writes)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn enqueue_deliveries(
        &self,
        owner: UserId,
        deliveries: &[WebhookDeliveryRecord],
    ) -> StoreResult<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let mut tx = self.writes.begin().await?;
        for d in deliveries {
            // Only into the owner's own webhooks: the SELECT finds none of another user's.
            sqlx::query(
                "INSERT INTO webhook_deliveries (id, webhook_id, user_id, event_type, payload, \
                 status, attempts, schedule_start, next_attempt_at, created_at, delivered_at) \
                 SELECT $1, w.id, w.user_id, $2, $3, $4, $5, $6, $7, $8, $9 \
                 FROM webhooks w WHERE w.id = $10 AND w.user_id = $11",
            )
            .bind(&d.id)
            .bind(&d.event_type)
            .bind(&d.payload)
            .bind(&d.status)
            .bind(d.attempts)
            .bind(d.schedule_start)
            .bind(d.next_attempt_at_ms)
            .bind(d.created_at_ms)
            .bind(d.delivered_at_ms)
            .bind(&d.webhook_id)
            .bind(owner.to_string())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn due_deliveries(&self, now_ms: i64, limit: i64) -> StoreResult<Vec<DueDelivery>> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS}, w.user_id, w.url, w.secret \
             FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id \
             WHERE d.status = 'pending' AND d.next_attempt_at <= $1 \
             ORDER BY d.next_attempt_at, d.id LIMIT $2"
        ))
        .bind(now_ms)
        .bind(limit)
        .fetch_all(&self.writes)
        .await?;
        decode_all(&rows, decode_due)
    }

    async fn claim_delivery(
        &self,
        id: &str,
        seen_ms: i64,
        lease_until_ms: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET next_attempt_at = $1, attempts = attempts + 1 \
             WHERE id = $2 AND status = 'pending' AND next_attempt_at = $3",
        )
        .bind(lease_until_ms)
        .bind(id)
        .bind(seen_ms)
        .execute(&self.writes)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn finish_delivery_attempt(
        &self,
        id: &str,
        attempt: &WebhookAttemptRecord,
        next: DeliveryNext,
    ) -> StoreResult<()> {
        let mut tx = self.writes.begin().await?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_id, attempt, at, status_code, error, \
             duration_ms) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (delivery_id, attempt) DO NOTHING",
        )
        .bind(id)
        .bind(attempt.attempt)
        .bind(attempt.at_ms)
        .bind(attempt.status_code)
        .bind(&attempt.error)
        .bind(attempt.duration_ms)
        .execute(&mut *tx)
        .await?;
        let (status, next_at, delivered_at) = match next {
            DeliveryNext::Delivered(at) => ("delivered", at, Some(at)),
            DeliveryNext::RetryAt(at) => ("pending", at, None),
            DeliveryNext::Failed => ("failed", attempt.at_ms, None),
        };
        // Only the attempt this caller took moves the delivery on (a redelivery meanwhile
        // started a new schedule, which stays).
        sqlx::query(
            "UPDATE webhook_deliveries SET status = $1, next_attempt_at = $2, \
             delivered_at = COALESCE($3, delivered_at) WHERE id = $4 AND attempts = $5",
        )
        .bind(status)
        .bind(next_at)
        .bind(delivered_at)
        .bind(id)
        .bind(attempt.attempt)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_deliveries(
        &self,
        owner: UserId,
        webhook_id: &str,
        limit: i64,
        offset: i64,
    ) -> StoreResult<Vec<WebhookDeliveryRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d \
             WHERE d.webhook_id = $1 AND d.user_id = $2 \
             ORDER BY d.created_at DESC, d.id DESC LIMIT $3 OFFSET $4"
        ))
        .bind(webhook_id)
        .bind(owner.to_string())
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, decode_delivery)
    }

    async fn get_delivery(
        &self,
        owner: UserId,
        webhook_id: &str,
        id: &str,
    ) -> StoreResult<Option<WebhookDeliveryRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d \
             WHERE d.id = $1 AND d.webhook_id = $2 AND d.user_id = $3"
        ))
        .bind(id)
        .bind(webhook_id)
        .bind(owner.to_string())
        .fetch_optional(&self.reads)
        .await?;
        row.as_ref().map(decode_delivery).transpose()
    }

    async fn delivery_attempts(
        &self,
        owner: UserId,
        id: &str,
    ) -> StoreResult<Vec<WebhookAttemptRecord>> {
        let rows = sqlx::query(
            "SELECT a.attempt, a.at, a.status_code, a.error, a.duration_ms \
             FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id \
             WHERE a.delivery_id = $1 AND d.user_id = $2 ORDER BY a.attempt",
        )
        .bind(id)
        .bind(owner.to_string())
        .fetch_all(&self.reads)
        .await?;
        decode_all(&rows, decode_attempt)
    }

    async fn redeliver(&self, owner: UserId, id: &str, now_ms: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', next_attempt_at = $1, \
             schedule_start = attempts WHERE id = $2 AND user_id = $3",
        )
        .bind(now_ms)
        .bind(id)
        .bind(owner.to_string())
        .execute(&self.writes)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
