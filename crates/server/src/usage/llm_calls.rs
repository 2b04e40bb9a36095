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

use super::pricing::PricingTable;
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

/// The usage row for `call`, or `None` when it counted no tokens.
pub fn usage_row(pricing: &PricingTable, call: &LlmCall<'_>, now_ms: i64) -> Option<UsageRow> {
    if call.usage.total() == 0 {
        return None;
    }
    let model = call.provider.model_name();
    let prompt_tokens = i64::try_from(call.usage.prompt_tokens).unwrap_or(i64::MAX);
    let completion_tokens = i64::try_from(call.usage.completion_tokens).unwrap_or(i64::MAX);
    // The embedded model costs nothing per token; a hosted model costs its list price.
    let cost_usd = match call.provider.name() {
        "local" => 0.0,
        _ => pricing
            .cost(model, prompt_tokens, completion_tokens)
            .unwrap_or(0.0),
    };
    Some(UsageRow {
        provider: "apex".into(),
        model: model.to_string(),
        workload: call.workload.to_string(),
        ts_ms: now_ms,
        prompt_tokens,
        completion_tokens,
        latency_ms: i64::try_from(call.elapsed.as_millis()).unwrap_or(i64::MAX),
        status: if call.succeeded { "ok" } else { "error" }.into(),
        cost_usd,
        source: "apex".into(),
        ..UsageRow::default()
    })
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

/// Records `call` in the metrics and in the user's usage data. A failed write is logged,
/// not returned: the answer matters more than its bookkeeping.
pub async fn record(store: &UserStore, pricing: &PricingTable, call: LlmCall<'_>) {
    count(&call);
    let Some(row) = usage_row(pricing, &call, crate::clock::now_ms()) else {
        return;
    };
    if let Err(err) = store.insert_usage(&[row]).await {
        tracing::warn!(error = %err, workload = call.workload, "could not record LLM token usage");
    }
}
