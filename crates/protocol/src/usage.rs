//! A user's AI usage data: the rows they upload (or demo data) and the summary of them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One LLM call of the user's own workloads, as uploaded to `POST /api/usage/events`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageEventInput {
    pub provider: String,
    pub model: String,
    /// The feature or job that made the call ("support-bot", "nightly-summaries"...).
    pub workload: String,
    /// RFC 3339 timestamp of the call.
    pub timestamp: String,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub latency_ms: i64,
    /// `ok` or `error`; defaults to `ok`.
    #[serde(default)]
    pub status: Option<String>,
    /// Cost in USD; computed from the built-in pricing table when absent.
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageImportResult {
    pub inserted: u64,
}

/// `GET /api/usage/summary?days=N`: aggregates over the user's own rows in the window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageSummary {
    pub days: u32,
    /// RFC 3339 start of the window (inclusive).
    pub window_start: String,
    pub total_requests: i64,
    pub error_requests: i64,
    pub total_prompt_tokens: i64,
    pub total_completion_tokens: i64,
    pub total_cost_usd: f64,
    pub latency_ms: LatencyPercentiles,
    /// Sorted by cost, highest first.
    pub by_model: Vec<ModelUsage>,
    /// Sorted by cost, highest first.
    pub by_workload: Vec<WorkloadUsage>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct LatencyPercentiles {
    pub p50: i64,
    pub p95: i64,
    pub p99: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ModelUsage {
    pub provider: String,
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct WorkloadUsage {
    pub workload: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_usd: f64,
    pub avg_prompt_tokens: f64,
    pub avg_completion_tokens: f64,
}

/// `GET /api/usage/daily?days=N`: the user's own spend per UTC day and model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DailyUsage {
    pub days: u32,
    /// Sorted by date, then model; a day without rows for a model has no entry.
    pub series: Vec<DailyModelUsage>,
}

/// One model's usage on one UTC day.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DailyModelUsage {
    /// `YYYY-MM-DD`, UTC.
    pub date: String,
    pub model: String,
    /// Rounded to whole micro-dollars.
    pub cost_usd: f64,
    pub requests: i64,
}
