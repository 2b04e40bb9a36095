//! Optimization: `pricing_lookup` and `savings_simulator` over the user's own rows.
//!
//! Four strategies, each projected to a month (window savings × 30 / window days):
//! - **model routing**: calls with short prompts (< 600 tokens) and short answers
//!   (< 150 tokens) on a model that has a cheaper same-provider sibling move to it;
//! - **prompt caching**: workloads averaging ≥ 1,500 prompt tokens are assumed to share
//!   60% of their prompt as a cacheable prefix, billed at the provider's cached discount;
//! - **batching**: workloads whose name marks them offline (nightly, batch, weekly,
//!   backfill, eval, report) move to the provider's batch API discount;
//! - **output caps**: workloads averaging ≥ 400 completion tokens are capped at their own
//!   75th percentile (at least 256); tokens past the cap are saved.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{Agent, AgentContext, AgentError, Opportunity, RunState};
use crate::store::UsageRow;
use crate::usage::pricing::{cost_at, PricingTable};
use crate::usage::DEFAULT_WINDOW_DAYS;

pub struct OptimizationAgent;

const SHORT_PROMPT: i64 = 600;
const SHORT_COMPLETION: i64 = 150;
const CACHING_MIN_AVG_PROMPT: f64 = 1500.0;
const CACHEABLE_SHARE: f64 = 0.6;
const CAP_MIN_AVG_COMPLETION: f64 = 400.0;
const OFFLINE_MARKERS: &[&str] = &["nightly", "batch", "weekly", "backfill", "eval", "report"];

fn round_cents(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

pub fn simulate(rows: &[UsageRow], days: u32, pricing: &PricingTable) -> Vec<Opportunity> {
    let monthly = 30.0 / f64::from(days.max(1));
    let mut by_workload: BTreeMap<&str, Vec<&UsageRow>> = BTreeMap::new();
    for row in rows {
        by_workload
            .entry(row.workload.as_str())
            .or_default()
            .push(row);
    }

    let mut routing = (0.0, BTreeSet::new(), BTreeSet::new());
    let mut caching = (0.0, BTreeSet::new());
    let mut batching = (0.0, BTreeSet::new());
    let mut capping = (0.0, BTreeSet::new());
    for (workload, rows) in &by_workload {
        let n = rows.len() as f64;
        let avg_prompt = rows.iter().map(|r| r.prompt_tokens).sum::<i64>() as f64 / n;
        let avg_completion = rows.iter().map(|r| r.completion_tokens).sum::<i64>() as f64 / n;
        let mut completions: Vec<i64> = rows.iter().map(|r| r.completion_tokens).collect();
        completions.sort_unstable();
        let cap = completions[(completions.len() * 3 / 4).min(completions.len() - 1)].max(256);
        let offline = OFFLINE_MARKERS.iter().any(|m| workload.contains(m));
        for row in rows {
            let Some(price) = pricing.lookup(&row.model) else {
                continue;
            };
            if row.prompt_tokens < SHORT_PROMPT && row.completion_tokens < SHORT_COMPLETION {
                if let Some(alt) = price.cheaper_alternative.and_then(|m| pricing.lookup(m)) {
                    let saved =
                        row.cost_usd - cost_at(alt, row.prompt_tokens, row.completion_tokens);
                    if saved > 0.0 {
                        routing.0 += saved;
                        routing.1.insert(workload.to_string());
                        routing.2.insert(format!("{} → {}", price.model, alt.model));
                    }
                }
            }
            if avg_prompt >= CACHING_MIN_AVG_PROMPT && price.cached_input_discount > 0.0 {
                caching.0 += row.prompt_tokens as f64
                    * CACHEABLE_SHARE
                    * price.input_per_mtok
                    * price.cached_input_discount
                    / 1_000_000.0;
                caching.1.insert(workload.to_string());
            }
            if offline && price.batch_discount > 0.0 {
                batching.0 += row.cost_usd * price.batch_discount;
                batching.1.insert(workload.to_string());
            }
            if avg_completion >= CAP_MIN_AVG_COMPLETION && row.completion_tokens > cap {
                capping.0 +=
                    (row.completion_tokens - cap) as f64 * price.output_per_mtok / 1_000_000.0;
                capping.1.insert(format!("{workload} (cap {cap} tokens)"));
            }
        }
    }

    let join = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>().join(", ");
    let mut found = Vec::new();
    let mut push = |strategy: &str,
                    title: &str,
                    description: String,
                    workloads: &BTreeSet<String>,
                    saved: f64,
                    effort: &str| {
        let monthly_savings_usd = round_cents(saved * monthly);
        if monthly_savings_usd > 0.0 {
            found.push(Opportunity {
                strategy: strategy.into(),
                title: title.into(),
                description,
                workloads: workloads.iter().cloned().collect(),
                monthly_savings_usd,
                effort: effort.into(),
            });
        }
    };
    push(
        "model_routing",
        "Route short requests to a cheaper model",
        format!(
            "Short prompts with short answers can use a smaller sibling model ({}).",
            join(&routing.2)
        ),
        &routing.1,
        routing.0,
        "medium",
    );
    push(
        "prompt_caching",
        "Enable prompt caching for long shared prompts",
        format!(
            "{} send long prompts; caching their shared prefix bills it at the cached rate.",
            join(&caching.1)
        ),
        &caching.1,
        caching.0,
        "low",
    );
    push(
        "batching",
        "Move offline workloads to the batch API",
        format!(
            "{} do not need an immediate answer; batch pricing halves their cost.",
            join(&batching.1)
        ),
        &batching.1,
        batching.0,
        "medium",
    );
    push(
        "output_caps",
        "Cap output length",
        format!(
            "Long answers in {} can be capped with max_tokens.",
            join(&capping.1)
        ),
        &capping.1,
        capping.0,
        "low",
    );
    found.sort_by(|a, b| b.monthly_savings_usd.total_cmp(&a.monthly_savings_usd));
    found
}

#[async_trait]
impl Agent for OptimizationAgent {
    fn name(&self) -> &'static str {
        "optimization"
    }

    async fn run(&self, cx: &AgentContext, state: &mut RunState) -> Result<Value, AgentError> {
        let days = state
            .triage
            .as_ref()
            .map_or(DEFAULT_WINDOW_DAYS, |t| t.days);
        let models: Vec<String> = state
            .usage
            .as_ref()
            .map(|u| u.by_model.iter().map(|m| m.model.clone()).collect())
            .unwrap_or_default();
        cx.think(
            self.name(),
            "Looking up list prices for the models you use",
            1,
            3,
        )
        .await?;
        let prices = cx
            .tool(
                self.name(),
                "pricing_lookup",
                json!({ "models": models }),
                || async {
                    Ok::<_, String>(
                        models
                            .iter()
                            .map(|m| match cx.pricing.lookup(m) {
                                Some(p) => json!({
                                    "model": m,
                                    "input_per_mtok": p.input_per_mtok,
                                    "output_per_mtok": p.output_per_mtok,
                                    "cheaper_alternative": p.cheaper_alternative,
                                }),
                                None => json!({ "model": m, "known": false }),
                            })
                            .collect::<Vec<_>>(),
                    )
                },
            )
            .await?;
        cx.think(
            self.name(),
            "Simulating routing, caching, batching and output caps on your traffic",
            2,
            3,
        )
        .await?;
        let since = cx.now_ms() - i64::from(days) * 24 * 3600 * 1000;
        let strategies = ["model_routing", "prompt_caching", "batching", "output_caps"];
        let opportunities = cx
            .tool(
                self.name(),
                "savings_simulator",
                json!({ "days": days, "strategies": strategies }),
                || async {
                    // The rows the data agent read for the same window, if it did.
                    if let Some(window) = state
                        .usage_window
                        .as_ref()
                        .filter(|w| w.days == days && w.start_ms <= since)
                    {
                        return Ok(simulate(window.rows_since(since), days, &cx.pricing));
                    }
                    let rows = cx
                        .store
                        .usage_rows_since(since)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(simulate(&rows, days, &cx.pricing))
                },
            )
            .await?;
        let total: f64 = opportunities.iter().map(|o| o.monthly_savings_usd).sum();
        cx.think(
            self.name(),
            format!(
                "Found {} opportunities worth about ${:.2}/month",
                opportunities.len(),
                total
            ),
            3,
            3,
        )
        .await?;
        state.opportunities = opportunities;
        Ok(json!({
            "opportunities": state.opportunities.len(),
            "monthly_savings_usd": round_cents(total),
            "prices": prices.len(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, workload: &str, prompt: i64, completion: i64) -> UsageRow {
        let pricing = PricingTable::builtin();
        UsageRow {
            provider: "openai".into(),
            model: model.into(),
            workload: workload.into(),
            ts_ms: 0,
            prompt_tokens: prompt,
            completion_tokens: completion,
            latency_ms: 100,
            status: "ok".into(),
            cost_usd: pricing.cost(model, prompt, completion).unwrap(),
        }
    }

    #[test]
    fn routing_savings_are_the_price_difference_projected_to_a_month() {
        let pricing = PricingTable::builtin();
        // 15 days of 1,000,000 short-request tokens on gpt-4o.
        let rows: Vec<_> = (0..1000)
            .map(|_| row("gpt-4o", "classifier", 500, 100))
            .collect();
        let found = simulate(&rows, 15, &pricing);
        let routing = found
            .iter()
            .find(|o| o.strategy == "model_routing")
            .unwrap();
        let per_call = pricing.cost("gpt-4o", 500, 100).unwrap()
            - pricing.cost("gpt-4o-mini", 500, 100).unwrap();
        assert_eq!(
            routing.monthly_savings_usd,
            round_cents(per_call * 1000.0 * 2.0)
        );
        assert!(found.iter().all(|o| o.strategy != "batching"));
    }

    #[test]
    fn offline_and_long_workloads_get_batching_caching_and_caps() {
        let pricing = PricingTable::builtin();
        let rows: Vec<_> = (0..100)
            .map(|i| row("gpt-4o", "nightly-summaries", 3000, 300 + i * 10))
            .collect();
        let strategies: Vec<_> = simulate(&rows, 30, &pricing)
            .into_iter()
            .map(|o| o.strategy)
            .collect();
        assert!(strategies.contains(&"batching".to_string()));
        assert!(strategies.contains(&"prompt_caching".to_string()));
        assert!(strategies.contains(&"output_caps".to_string()));
        assert!(simulate(&[], 30, &pricing).is_empty());
    }
}
