//! Alerts, scheduled reports and webhooks: `/api/alerts/rules`, `/api/alerts`,
//! `/api/webhooks` and its delivery log, and the `alert` notice on the WebSocket.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A new alert rule or scheduled report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AlertRuleInput {
    /// `spend_over` (spend in the current `period` reached `threshold_usd`),
    /// `spend_change` (the last day's spend is `percent` above the average day of the
    /// `baseline_days` before it), `budget_forecast` (at its current pace, budget
    /// `budget_id` runs out before its period ends) or `report` (a pipeline run that
    /// writes a cost report, at each tick).
    pub kind: String,
    /// Watch a team's usage (its owner or an admin only) instead of the caller's own.
    #[serde(default)]
    pub team_id: Option<String>,
    /// How often it is evaluated: `hour`, `day` (default) or `week` (Mondays).
    #[serde(default)]
    pub every: Option<String>,
    /// Hour (0–23, default 9) of a daily or weekly tick, in `timezone`.
    #[serde(default)]
    pub at_hour: Option<u32>,
    /// IANA time zone of the schedule and the periods; default `UTC`.
    #[serde(default)]
    pub timezone: Option<String>,
    /// `spend_over`: the threshold in USD.
    #[serde(default)]
    pub threshold_usd: Option<f64>,
    /// `spend_over`: `day`, `week` or `month` (default).
    #[serde(default)]
    pub period: Option<String>,
    /// `spend_change`: how far above the baseline, in percent (default 50).
    #[serde(default)]
    pub percent: Option<f64>,
    /// `spend_change`: days of the trailing baseline (default 7, at most 90).
    #[serde(default)]
    pub baseline_days: Option<u32>,
    /// `budget_forecast`: the budget watched (one of the caller's).
    #[serde(default)]
    pub budget_id: Option<String>,
    /// `report`: what the report run is asked (default: a weekly cost report).
    #[serde(default)]
    pub message: Option<String>,
    /// Start a run that explains each alert (default true; always for `report`).
    #[serde(default)]
    pub explain: Option<bool>,
}

/// An alert rule as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AlertRule {
    pub id: String,
    pub kind: String,
    pub team_id: Option<String>,
    pub every: String,
    pub at_hour: u32,
    pub timezone: String,
    /// The kind's settings as given (threshold, percent, budget id, message, explain).
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// RFC 3339: when it is next evaluated.
    pub next_tick_at: String,
    pub last_tick_at: Option<String>,
    pub ticks: i64,
    pub created_at: String,
}

/// What a rule raised, or a report it started. Also the `alert` notice on the WebSocket
/// (with `"type": "alert"`) and the `data` of the `alert.fired` / `report.started`
/// webhook messages.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Alert {
    pub id: String,
    pub rule_id: String,
    pub kind: String,
    /// The period it belongs to: a rule raises at most one alert per period.
    pub period: String,
    pub title: String,
    pub detail: String,
    /// What was measured (USD or percent) and the rule's threshold.
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    /// The run that explains it (or the report's run), and its thread.
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
    pub created_at: String,
}

/// A new webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct WebhookInput {
    /// `https://` (or `http://`) URL that receives a POST per message.
    pub url: String,
    #[serde(default)]
    pub description: Option<String>,
}

/// A webhook. `secret` (`whsec_...`, the Standard Webhooks signing secret) is shown only
/// in the answer to its creation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub created_at: String,
}

/// One attempt to deliver a message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct WebhookAttempt {
    pub attempt: i64,
    pub at: String,
    /// The receiver's HTTP status; absent when no response came (see `error`).
    pub status_code: Option<i64>,
    pub error: Option<String>,
    pub duration_ms: i64,
}

/// One message to a webhook and how its delivery went: the delivery log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct WebhookDelivery {
    /// Also the `webhook-id` header of every attempt: one logical message.
    pub id: String,
    pub webhook_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed` (retries spent; redeliver to try again).
    pub status: String,
    pub attempts: i64,
    /// RFC 3339: the next attempt, while pending.
    pub next_attempt_at: Option<String>,
    pub created_at: String,
    pub delivered_at: Option<String>,
    /// The body sent.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub attempt_log: Vec<WebhookAttempt>,
}
