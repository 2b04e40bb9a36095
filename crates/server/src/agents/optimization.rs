//! Optimization: `pricing_lookup` and `savings_simulator` over the user's own rows.
//!
//! Four strategies, each projected to a month (window savings × 30 / window days):
//! - **model routing**: calls with short prompts (< 600 tokens) and short answers
//!   (< 150 tokens) on a model that has a cheaper same-provider sibling move to it;
//! - **prompt caching**: workloads averaging ≥ 1,500 prompt tokens are assumed to share
//!   60% of their prompt as a cacheable prefix, billed at the provider's cached discount;
//!   the prompt tokens already served from the cache (as gateway, OpenTelemetry and export
//!   rows report them) are taken off first, so a workload that caches its prefix already
//!   is not told to;
//! - **batching**: workloads whose name marks them offline (nightly, batch, weekly,
//!   backfill, eval, report) move to the provider's batch API discount;
//! - **output caps**: workloads averaging ≥ 400 completion tokens are capped at their own
//!   75th percentile (at least 256); tokens past the cap are saved.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{total_savings, Agent, AgentContext, AgentError, Opportunity, RunState, DAY_MS};
use crate::store::rollups::{self, Rollup, Sketches};
use crate::store::{
    CompletionRank, OutputCap, RepricingRate, SavingsQuery, SavingsTotals, StoreResult, UsageTotals,
};
use crate::usage::pricing::PricingTable;
use crate::usage::{window_start_ms, ReadWindow, DEFAULT_WINDOW_DAYS};
use crate::user_store::UserStore;

pub struct OptimizationAgent;

const CACHING_MIN_AVG_PROMPT: f64 = 1500.0;
const CACHEABLE_SHARE: f64 = 0.6;
const CAP_MIN_AVG_COMPLETION: f64 = 400.0;
/// No workload is capped below this many completion tokens.
const MIN_CAP: i64 = 256;
const OFFLINE_MARKERS: &[&str] = &["nightly", "batch", "weekly", "backfill", "eval", "report"];

fn round_cents(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// What the simulation needs of the user's rows in its window, computed by the database:
/// totals per (provider, model, workload), the output cap considered for each workload that
/// qualifies for one, and the routing and cap figures per (workload, model).
#[derive(Debug, Clone, Default)]
pub struct SimulationInput {
    pub totals: Vec<UsageTotals>,
    pub caps: BTreeMap<String, i64>,
    pub savings: Vec<SavingsTotals>,
}

/// Requests, prompt and completion tokens of one workload.
#[derive(Debug, Clone, Copy, Default)]
struct WorkloadTotals {
    requests: i64,
    /// Requests stored one per row (not in a provider export's bucket): the rows a
    /// percentile can rank.
    timed: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
}

impl WorkloadTotals {
    /// Per request; 0 for a workload known only from buckets that do not count requests.
    fn avg_prompt(&self) -> f64 {
        per_request(self.prompt_tokens, self.requests)
    }
    fn avg_completion(&self) -> f64 {
        per_request(self.completion_tokens, self.requests)
    }
}

fn per_request(tokens: i64, requests: i64) -> f64 {
    if requests > 0 {
        tokens as f64 / requests as f64
    } else {
        0.0
    }
}

fn by_workload(totals: &[UsageTotals]) -> BTreeMap<&str, WorkloadTotals> {
    let mut workloads: BTreeMap<&str, WorkloadTotals> = BTreeMap::new();
    for group in totals {
        let w = workloads.entry(group.workload.as_str()).or_default();
        w.requests += group.requests;
        w.timed += group.timed_requests;
        w.prompt_tokens += group.prompt_tokens;
        w.completion_tokens += group.completion_tokens;
    }
    workloads
}

/// The 1-based rank of a workload's output cap among its `requests` rows ordered by
/// completion tokens: its 75th percentile, the value at index `len * 3 / 4` of the sorted
/// list (the last one for a single row).
fn cap_rank(requests: i64) -> i64 {
    (requests * 3 / 4).min(requests - 1) + 1
}

/// Gathers the simulation's input for the rows dated at or after `since_ms` (rows dated in
/// the future included) from one read of the window's rollups: totals, then the caps (the
/// 75th percentile of completion tokens of the few workloads that qualify, from the
/// completion sketches), then routing and capping, which depend on both, per (workload,
/// model).
pub async fn gather(
    store: &UserStore,
    since_ms: i64,
    pricing: &PricingTable,
) -> StoreResult<SimulationInput> {
    gather_between(store, since_ms, i64::MAX, pricing).await
}

/// [`gather`] for the rows dated in `[since_ms, until_ms]` only.
pub async fn gather_between(
    store: &UserStore,
    since_ms: i64,
    until_ms: i64,
    pricing: &PricingTable,
) -> StoreResult<SimulationInput> {
    let window = store
        .usage_window(since_ms, until_ms, COMPLETION_SKETCHES)
        .await?;
    Ok(input_of(&window, pricing))
}

/// [`gather`] for the rows dated at or after `read.since_ms`, from the window the data agent
/// already read and the rows dated after it (`read.until_ms`, its "now"): those from the
/// same read when it settled them (usually: no row of today is dated after now), otherwise
/// read now and folded in.
pub async fn gather_from(
    store: &UserStore,
    read: ReadWindow,
    pricing: &PricingTable,
) -> StoreResult<SimulationInput> {
    let mut window = read.rollup;
    match read.after {
        Some(after) => window.merge(after),
        None if read.until_ms < i64::MAX => window.merge(
            store
                .usage_window(read.until_ms + 1, i64::MAX, COMPLETION_SKETCHES)
                .await?,
        ),
        None => {}
    }
    Ok(input_of(&window, pricing))
}

/// What the simulation reads of a window: its sums and completion sketches.
const COMPLETION_SKETCHES: Sketches = Sketches {
    completion: true,
    latency: false,
};

/// The simulation's input from a window read with its completion sketches.
fn input_of(window: &Rollup, pricing: &PricingTable) -> SimulationInput {
    let totals = rollups::totals(window);
    let wanted: Vec<CompletionRank> = by_workload(&totals)
        .into_iter()
        .filter(|(_, w)| w.timed > 0 && w.avg_completion() >= CAP_MIN_AVG_COMPLETION)
        .map(|(workload, w)| CompletionRank {
            workload: workload.to_string(),
            rank: cap_rank(w.timed),
        })
        .collect();
    let caps: BTreeMap<String, i64> = rollups::completion_at_ranks(window, &wanted)
        .into_iter()
        .map(|(workload, tokens)| (workload, tokens.max(MIN_CAP)))
        .collect();
    let models: BTreeSet<&str> = totals.iter().map(|t| t.model.as_str()).collect();
    let rates = models
        .into_iter()
        .filter_map(|model| {
            let alt = pricing
                .lookup(model)?
                .cheaper_alternative
                .and_then(|m| pricing.lookup(m))?;
            Some(RepricingRate {
                model: model.to_string(),
                input_per_mtok: alt.input_per_mtok,
                output_per_mtok: alt.output_per_mtok,
            })
        })
        .collect();
    let query = SavingsQuery {
        rates,
        caps: caps
            .iter()
            .map(|(workload, cap)| OutputCap {
                workload: workload.clone(),
                cap: *cap,
            })
            .collect(),
    };
    let savings = rollups::savings_of(window, &query);
    SimulationInput {
        totals,
        caps,
        savings,
    }
}

pub fn simulate(input: &SimulationInput, days: u32, pricing: &PricingTable) -> Vec<Opportunity> {
    let monthly = 30.0 / f64::from(days.max(1));
    let workloads = by_workload(&input.totals);
    // Prompt tokens and cost per (workload, model), whatever the provider column says:
    // prices are looked up by model name.
    let mut groups: BTreeMap<(&str, &str), (i64, f64, i64)> = BTreeMap::new();
    for group in &input.totals {
        let g = groups
            .entry((group.workload.as_str(), group.model.as_str()))
            .or_default();
        g.0 += group.prompt_tokens;
        g.1 += group.cost_usd;
        g.2 += group.cached_tokens;
    }

    let mut routing = (0.0, BTreeSet::new(), BTreeSet::new());
    let mut caching = (0.0, BTreeSet::new());
    let mut batching = (0.0, BTreeSet::new());
    let mut capping = (0.0, BTreeSet::new());
    for ((workload, model), (prompt_tokens, cost, cached_tokens)) in &groups {
        let Some(price) = pricing.lookup(model) else {
            continue;
        };
        let Some(w) = workloads.get(workload) else {
            continue;
        };
        // The cacheable prefix not served from the cache yet.
        let uncached_prefix =
            (*prompt_tokens as f64 * CACHEABLE_SHARE - *cached_tokens as f64).max(0.0);
        if w.avg_prompt() >= CACHING_MIN_AVG_PROMPT
            && price.cached_input_discount > 0.0
            && uncached_prefix > 0.0
        {
            caching.0 +=
                uncached_prefix * price.input_per_mtok * price.cached_input_discount / 1_000_000.0;
            caching.1.insert(workload.to_string());
        }
        let offline = OFFLINE_MARKERS.iter().any(|m| workload.contains(m));
        if offline && price.batch_discount > 0.0 {
            batching.0 += cost * price.batch_discount;
            batching.1.insert(workload.to_string());
        }
    }
    for group in &input.savings {
        let Some(price) = pricing.lookup(&group.model) else {
            continue;
        };
        if group.routed_requests > 0 {
            if let Some(alt) = price.cheaper_alternative.and_then(|m| pricing.lookup(m)) {
                routing.0 += group.routing_savings_usd;
                routing.1.insert(group.workload.clone());
                routing.2.insert(format!("{} → {}", price.model, alt.model));
            }
        }
        let qualifies = workloads
            .get(group.workload.as_str())
            .is_some_and(|w| w.avg_completion() >= CAP_MIN_AVG_COMPLETION);
        if let Some(cap) = input.caps.get(&group.workload).filter(|_| qualifies) {
            if group.capped_requests > 0 {
                capping.0 += group.tokens_over_cap as f64 * price.output_per_mtok / 1_000_000.0;
                capping
                    .1
                    .insert(format!("{} (cap {cap} tokens)", group.workload));
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
        let (days, ends_days_ago) = state
            .triage
            .as_ref()
            .map_or((DEFAULT_WINDOW_DAYS, 0), |t| (t.days, t.ends_days_ago));
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
        // The window the data agent read, when it read one (not after a resume: the run's
        // stored state does not keep it). A window that ends now takes in the rows dated
        // after it too (an upload's clock ahead of ours); one that a follow-up moved back
        // ("the week before") is exactly that period, never the days since.
        let read = state.usage_window.take();
        let (since, until) = if ends_days_ago == 0 {
            (window_start_ms(days, cx.now_ms()), i64::MAX)
        } else {
            let until = cx.now_ms() - i64::from(ends_days_ago) * DAY_MS;
            (window_start_ms(days, until), until)
        };
        let strategies = ["model_routing", "prompt_caching", "batching", "output_caps"];
        let arguments = if ends_days_ago == 0 {
            json!({ "days": days, "strategies": strategies })
        } else {
            json!({ "days": days, "ends_days_ago": ends_days_ago, "strategies": strategies })
        };
        let opportunities = cx
            .tool(self.name(), "savings_simulator", arguments, || async {
                let input = match read {
                    Some(read) if ends_days_ago > 0 => Ok(input_of(&read.rollup, &cx.pricing)),
                    Some(read) => gather_from(&cx.store, read, &cx.pricing).await,
                    None => gather_between(&cx.store, since, until, &cx.pricing).await,
                }
                .map_err(|e| e.to_string())?;
                Ok::<_, String>(simulate(&input, days, &cx.pricing))
            })
            .await?;
        let total = total_savings(&opportunities);
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
    use crate::usage::pricing::cost_at;

    fn totals(model: &str, workload: &str, requests: i64, tokens: (i64, i64)) -> UsageTotals {
        let pricing = PricingTable::builtin();
        UsageTotals {
            provider: "openai".into(),
            model: model.into(),
            workload: workload.into(),
            requests,
            errors: 0,
            timed_requests: requests,
            prompt_tokens: tokens.0 * requests,
            completion_tokens: tokens.1 * requests,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: pricing.cost(model, tokens.0, tokens.1).unwrap() * requests as f64,
            source: "upload".into(),
            last_ts_ms: 0,
        }
    }

    #[test]
    fn routing_savings_are_the_price_difference_projected_to_a_month() {
        let pricing = PricingTable::builtin();
        // 15 days of 1,000 short requests on gpt-4o.
        let per_call = pricing.cost("gpt-4o", 500, 100).unwrap()
            - cost_at(pricing.lookup("gpt-4o-mini").unwrap(), 500, 100);
        let input = SimulationInput {
            totals: vec![totals("gpt-4o", "classifier", 1000, (500, 100))],
            caps: BTreeMap::new(),
            savings: vec![SavingsTotals {
                workload: "classifier".into(),
                model: "gpt-4o".into(),
                routed_requests: 1000,
                routing_savings_usd: per_call * 1000.0,
                capped_requests: 0,
                tokens_over_cap: 0,
            }],
        };
        let found = simulate(&input, 15, &pricing);
        let routing = found
            .iter()
            .find(|o| o.strategy == "model_routing")
            .unwrap();
        assert_eq!(
            routing.monthly_savings_usd,
            round_cents(per_call * 1000.0 * 2.0)
        );
        assert!(routing.description.contains("gpt-4o → gpt-4o-mini"));
        assert!(found.iter().all(|o| o.strategy != "batching"));
    }

    #[test]
    fn offline_and_long_workloads_get_batching_caching_and_caps() {
        let pricing = PricingTable::builtin();
        let input = SimulationInput {
            totals: vec![totals("gpt-4o", "nightly-summaries", 100, (3000, 800))],
            caps: BTreeMap::from([("nightly-summaries".to_string(), 1000)]),
            savings: vec![SavingsTotals {
                workload: "nightly-summaries".into(),
                model: "gpt-4o".into(),
                routed_requests: 0,
                routing_savings_usd: 0.0,
                capped_requests: 20,
                tokens_over_cap: 2000,
            }],
        };
        let found = simulate(&input, 30, &pricing);
        let strategies: Vec<_> = found.iter().map(|o| o.strategy.as_str()).collect();
        assert!(strategies.contains(&"batching"));
        assert!(strategies.contains(&"prompt_caching"));
        assert!(strategies.contains(&"output_caps"));
        let caps = found.iter().find(|o| o.strategy == "output_caps").unwrap();
        assert_eq!(caps.workloads, vec!["nightly-summaries (cap 1000 tokens)"]);
        assert!(simulate(&SimulationInput::default(), 30, &pricing).is_empty());
    }

    #[test]
    fn prompts_already_served_from_the_cache_are_not_counted_as_savings() {
        let pricing = PricingTable::builtin();
        let caching = |cached_share: f64| {
            let mut group = totals("gpt-4o", "rag", 1000, (3000, 100));
            group.cached_tokens = (group.prompt_tokens as f64 * cached_share) as i64;
            let input = SimulationInput {
                totals: vec![group],
                ..SimulationInput::default()
            };
            simulate(&input, 30, &pricing)
                .into_iter()
                .find(|o| o.strategy == "prompt_caching")
                .map(|o| o.monthly_savings_usd)
        };
        // 3M prompt tokens, 60% cacheable at half of $2.50: $2.25.
        assert_eq!(caching(0.0), Some(2.25));
        // A third of that cached already: the rest, 1.2M tokens, $1.50.
        assert_eq!(caching(0.2), Some(1.5));
        assert_eq!(caching(0.6), None, "the prefix is cached already");
    }

    #[test]
    fn the_cap_is_the_value_at_three_quarters_of_the_sorted_list() {
        // 0-based index len * 3 / 4, clamped to the last: ranks are one more.
        assert_eq!(cap_rank(1), 1);
        assert_eq!(cap_rank(4), 4);
        assert_eq!(cap_rank(100), 76);
    }
}
