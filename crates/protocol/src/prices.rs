//! The price book and the explanation of costs: `GET /api/pricebook`,
//! `POST /api/pricebook` (a user's negotiated rates), `GET /api/usage/rows` and
//! `GET /api/usage/explain`.
//!
//! Rates are USD per million tokens (and USD per request for a request fee), with at most
//! six decimals: Apex keeps them as whole pico-dollars per token, so every cost is exact
//! arithmetic, and a cost in micro-dollars (`cost_micro_usd`) is a rounded integer that
//! two computations of the same tokens always agree on.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One price: a model's rates from a date on, built in or the user's own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PriceEntry {
    /// What a usage row names as its `price_version`: `builtin:<provider>/<model>` (or
    /// with `@<date>` for a later price of the same model), `override:<id>`; `+batch`
    /// at the end for the batch-API price derived from it.
    pub version: String,
    /// `builtin` or `override`.
    pub origin: String,
    pub provider: String,
    pub model: String,
    /// From when the price applies (RFC 3339); a row is costed with the latest price
    /// effective at its timestamp. `null`: from the beginning.
    pub effective_from: Option<String>,
    pub input_usd_per_mtok: f64,
    pub cached_input_usd_per_mtok: f64,
    pub cache_write_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    pub reasoning_usd_per_mtok: f64,
    pub request_fee_usd: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// `GET /api/pricebook`: every price that can cost the caller's rows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PriceBook {
    /// The built-in snapshot compiled into this server ("2026-12").
    pub snapshot: String,
    /// The caller's overrides first (newest first), then the built-in entries.
    pub entries: Vec<PriceEntry>,
}

/// One negotiated rate, as sent to `POST /api/pricebook`. Classes left out are derived:
/// cached input and cache writes at the input rate, reasoning at the output rate, no
/// request fee.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PriceOverrideInput {
    /// Defaults to the built-in provider of `model`, or `custom`.
    #[serde(default)]
    pub provider: Option<String>,
    pub model: String,
    /// RFC 3339 date or time; defaults to now. Rows dated before it keep the earlier price.
    #[serde(default)]
    pub effective_from: Option<String>,
    pub input_usd_per_mtok: f64,
    pub output_usd_per_mtok: f64,
    #[serde(default)]
    pub cached_input_usd_per_mtok: Option<f64>,
    #[serde(default)]
    pub cache_write_usd_per_mtok: Option<f64>,
    #[serde(default)]
    pub reasoning_usd_per_mtok: Option<f64>,
    #[serde(default)]
    pub request_fee_usd: Option<f64>,
    #[serde(default)]
    pub note: Option<String>,
}

/// The body of `POST /api/pricebook` (`apex pricebook import`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PriceOverrideImport {
    pub prices: Vec<PriceOverrideInput>,
}

/// What `POST /api/pricebook` stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PriceOverrideResult {
    pub imported: u64,
    pub entries: Vec<PriceEntry>,
}

/// One stored usage row, as `GET /api/usage/rows` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageRowView {
    /// For `GET /api/usage/explain?row=`.
    pub id: i64,
    pub timestamp: String,
    pub provider: String,
    pub model: String,
    pub workload: String,
    pub source: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub cache_write_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub latency_ms: i64,
    pub status: String,
    pub cost_usd: f64,
    /// The price the cost was computed with; `null` when the source sent the cost.
    pub price_version: Option<String>,
}

/// A page of `GET /api/usage/rows`, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageRowsPage {
    pub rows: Vec<UsageRowView>,
    /// Pass as `before` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_before: Option<i64>,
}

/// One term of a cost: `quantity × rate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CostLine {
    /// `input` (prompt tokens neither read from nor written to the cache),
    /// `cached_input`, `cache_write`, `output` (completion tokens other than reasoning),
    /// `reasoning`, or `requests` (the per-request fee).
    pub class: String,
    /// Tokens, or requests for `requests`.
    pub quantity: i64,
    /// USD per million tokens, or per request for `requests`.
    pub rate_usd: f64,
    pub cost_usd: f64,
    /// `quantity × rate` in micro-dollars, rounded half away from zero.
    pub cost_micro_usd: i64,
}

/// The rows of one price version within what is explained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PriceGroup {
    /// `null`: rows whose cost the source sent (an upload's `cost_usd`, a span's
    /// `gen_ai.usage.cost`); Apex did not compute it and shows no arithmetic.
    pub price_version: Option<String>,
    /// The entry the version names (`null` for sent costs).
    pub price: Option<PriceEntry>,
    pub rows: i64,
    pub requests: i64,
    pub lines: Vec<CostLine>,
    /// Sum of the lines (for sent costs: the stored sum).
    pub computed_cost_usd: f64,
    pub computed_cost_micro_usd: i64,
    /// Sum of the rows' stored costs.
    pub stored_cost_usd: f64,
}

/// `GET /api/usage/explain`: how the cost of one row, or of a cell of the summary, was
/// computed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageExplanation {
    /// The row explained, when one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row: Option<UsageRowView>,
    pub groups: Vec<PriceGroup>,
    pub rows: i64,
    pub requests: i64,
    pub computed_cost_usd: f64,
    pub computed_cost_micro_usd: i64,
    pub stored_cost_usd: f64,
}
