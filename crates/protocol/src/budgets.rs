//! Spending caps: `POST /api/budgets`, `GET /api/budgets`, `GET`/`PATCH`/`DELETE`
//! `/api/budgets/{id}`, and what a refused call is told (`budget_exceeded`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A new budget. Exactly one of `limit_usd` and `limit_tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BudgetInput {
    /// `user` (every LLM call of yours), `key` (calls made with the API key `scope_id`)
    /// or `model` (calls of the model `scope_id`, dated variants included).
    pub scope: String,
    #[serde(default)]
    pub scope_id: Option<String>,
    #[serde(default)]
    pub limit_usd: Option<f64>,
    #[serde(default)]
    pub limit_tokens: Option<i64>,
    /// `day`, `week` (from Monday), `month`, or `rolling_days` (the last `days` days,
    /// today included), from midnight in `timezone`.
    pub period: String,
    #[serde(default)]
    pub days: Option<u32>,
    /// IANA time zone (`Europe/Paris`); default `UTC`.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// A change to a budget: the fields given replace the budget's (a limit of the other
/// unit replaces the limit).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BudgetPatch {
    #[serde(default)]
    pub limit_usd: Option<f64>,
    #[serde(default)]
    pub limit_tokens: Option<i64>,
    #[serde(default)]
    pub period: Option<String>,
    #[serde(default)]
    pub days: Option<u32>,
    #[serde(default)]
    pub timezone: Option<String>,
}

/// A budget with what its current period has used.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Budget {
    pub id: String,
    pub scope: String,
    pub scope_id: Option<String>,
    pub limit_usd: Option<f64>,
    pub limit_tokens: Option<i64>,
    pub period: String,
    pub days: Option<u32>,
    pub timezone: String,
    /// Used and reserved by calls in progress, in the budget's unit: USD or tokens.
    pub spent: f64,
    /// `spent` as a share of the limit, 0–100 (or more when a call used more than it
    /// reserved).
    pub percent: f64,
    /// Start of the current period (RFC 3339).
    pub period_start: String,
    /// When the current period ends and what it used stops counting (RFC 3339; for a
    /// rolling window, when today's usage leaves it).
    pub resets_at: String,
    pub created_at: String,
}

/// `details` of a `budget_exceeded` error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BudgetExceededDetails {
    pub budget_id: String,
    /// `user`, `key` or `model`.
    pub scope: String,
    pub scope_id: Option<String>,
    /// `usd` or `tokens`.
    pub unit: String,
    pub limit: f64,
    /// Used and reserved in the period before this call.
    pub spent: f64,
    /// What this call could cost at most, which did not fit.
    pub requested: f64,
    pub resets_at: String,
}

/// `budget_warning` notice: a budget passed `threshold` percent of its limit in the
/// current period (sent once per period and threshold: 50, 80, 100).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BudgetWarning {
    pub budget_id: String,
    pub scope: String,
    pub scope_id: Option<String>,
    pub threshold: u32,
    pub unit: String,
    pub limit: f64,
    pub spent: f64,
    pub resets_at: String,
}
