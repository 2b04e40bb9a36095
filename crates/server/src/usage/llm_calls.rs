//! Recording what LLM requests used: Prometheus metrics by provider, and the user's own
//! usage data.
//!
//! Apex analyses its users' AI usage, so its own LLM use is recorded the same way: one row
//! per request in the requesting user's usage data (provider `apex`, the model, the agent or
//! endpoint as the workload), which a user can then ask Apex about like any other usage.
//! Requests whose provider counted no tokens (the template writer) add no row. The
//! pipeline's rows are written when its run ends ([`crate::agents::AgentContext`]), so a
//! run's analysis never includes the run's own requests; `/v1` requests are written at once.

use std::time::Duration;

use super::price_book::{PriceBook, LOCAL_PRICE_VERSION};
use crate::llm::{LlmProvider, TokenUsage};
use crate::store::UsageRow;
use crate::user_store::UserStore;

/// One finished LLM request.
pub struct LlmCall<'a> {
    pub provider: &'a dyn LlmProvider,
    /// What asked: `apex/<agent>` for the pipeline, `apex/v1` for the OpenAI-compatible API.
    pub workload: &'a str,
    pub usage: TokenUsage,
    pub elapsed: Duration,
    pub succeeded: bool,
}

/// The usage row for `call`, or `None` when it counted no tokens. A hosted model's row is
/// costed by [`store_rows`], with the user's prices; the embedded model's costs nothing.
pub fn usage_row(call: &LlmCall<'_>, now_ms: i64) -> Option<UsageRow> {
    if call.usage.total() == 0 {
        return None;
    }
    let model = call.provider.model_name();
    let local = call.provider.name() == "local";
    Some(UsageRow {
        provider: "apex".into(),
        model: model.to_string(),
        workload: call.workload.to_string(),
        ts_ms: now_ms,
        prompt_tokens: i64::try_from(call.usage.prompt_tokens).unwrap_or(i64::MAX),
        completion_tokens: i64::try_from(call.usage.completion_tokens).unwrap_or(i64::MAX),
        latency_ms: i64::try_from(call.elapsed.as_millis()).unwrap_or(i64::MAX),
        status: if call.succeeded { "ok" } else { "error" }.into(),
        cost_usd: 0.0,
        price_version: local.then(|| LOCAL_PRICE_VERSION.to_string()),
        source: "apex".into(),
        ..UsageRow::default()
    })
}

/// Costs `rows` (those not costed yet: hosted models') with the user's prices and stores
/// them. A model the price book does not know costs 0, with no price version. A failed
/// write is logged, not returned: the answer matters more than its bookkeeping.
pub async fn store_rows(store: &UserStore, book: &PriceBook, mut rows: Vec<UsageRow>) {
    if rows.iter().any(|r| r.price_version.is_none()) {
        let overrides = match store.price_overrides().await {
            Ok(overrides) => overrides,
            Err(err) => {
                tracing::warn!(error = %err, "could not read the user's prices; list prices used");
                Vec::new()
            }
        };
        let prices = book.for_user(&overrides);
        for row in rows.iter_mut().filter(|r| r.price_version.is_none()) {
            // A model without a price keeps cost 0: the tokens are still worth recording.
            let _ = prices.price_row(row, false);
        }
    }
    if let Err(err) = store.insert_usage(&rows).await {
        tracing::warn!(error = %err, "could not record LLM token usage");
    }
}

/// Counts `call` in the metrics (tokens and latency by provider).
pub fn count(call: &LlmCall<'_>) {
    crate::telemetry::llm_request(
        call.provider.name(),
        call.elapsed,
        call.usage.prompt_tokens,
        call.usage.completion_tokens,
    );
}

/// Records `call` in the metrics and in the user's usage data.
pub async fn record(store: &UserStore, book: &PriceBook, call: LlmCall<'_>) {
    count(&call);
    if let Some(row) = usage_row(&call, crate::clock::now_ms()) {
        store_rows(store, book, vec![row]).await;
    }
}
