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
    /// Of `prompt_tokens`, those read from the provider's prompt cache.
    #[serde(default)]
    pub cached_tokens: Option<i64>,
    /// Of `completion_tokens`, those spent reasoning.
    #[serde(default)]
    pub reasoning_tokens: Option<i64>,
    /// Your own id for the row: a row whose id you uploaded before is skipped, so
    /// uploading the same file twice stores it once.
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageImportResult {
    pub inserted: u64,
    /// Rows not stored because the same row (by `id`, or by the source's own id) was
    /// stored before.
    #[serde(default)]
    pub duplicates: u64,
    /// Entries of a provider export that were not imported, and why (Apex's own CSV and
    /// JSON rows are all or nothing instead: one bad row refuses the upload).
    #[serde(default)]
    pub skipped: Vec<ImportSkip>,
}

/// An entry of an export that was not imported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ImportSkip {
    /// 0-based, counting the export's entries (a bucket's results, a log's requests) in
    /// file order.
    pub index: usize,
    pub reason: String,
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
    /// Of the prompt tokens, those served from a prompt cache.
    #[serde(default)]
    pub total_cached_tokens: i64,
    /// Of the completion tokens, those spent reasoning.
    #[serde(default)]
    pub total_reasoning_tokens: i64,
    pub total_cost_usd: f64,
    /// Over the requests with a latency of their own (a provider export's daily bucket
    /// has none).
    pub latency_ms: LatencyPercentiles,
    /// Sorted by cost, highest first.
    pub by_model: Vec<ModelUsage>,
    /// Sorted by cost, highest first.
    pub by_workload: Vec<WorkloadUsage>,
    /// Where the rows came from, sorted by source name.
    #[serde(default)]
    pub by_source: Vec<SourceUsage>,
}

/// The requests and spend of one source of usage data in the window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct SourceUsage {
    /// `upload`, `demo`, `apex` (Apex's own LLM calls), `otlp`, `gateway`, or an import
    /// format (`openai-usage`, `anthropic-usage`, `litellm-spend`).
    pub source: String,
    pub requests: i64,
    pub cost_usd: f64,
    /// RFC 3339 time of the source's latest row in the window.
    pub latest: String,
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
    #[serde(default)]
    pub cached_tokens: i64,
    pub cost_usd: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct WorkloadUsage {
    pub workload: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    /// Of `prompt_tokens`, those served from a prompt cache: with `prompt_tokens`, the
    /// workload's cache hit share.
    #[serde(default)]
    pub cached_tokens: i64,
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
