//! The usage summary: totals, by model, by workload, latency percentiles.
//!
//! One read of the window's rollups (see [`crate::store::Store::usage_window`]) gives the
//! totals and the latency sketch the percentiles are read from; the usage rows themselves
//! are only read for the window's partial edge days, which is what keeps a run's CPU low
//! with thousands of usage rows per user.

use std::collections::HashMap;

use apex_protocol::usage::{
    LatencyPercentiles, ModelUsage, SourceUsage, UsageSummary, WorkloadUsage,
};

use crate::clock::ms_to_rfc3339;
use crate::store::rollups::{self, Rollup, Sketches};
use crate::store::{StoreResult, UsageTotals};
use crate::user_store::UserStore;

pub const DEFAULT_WINDOW_DAYS: u32 = 30;
pub const MAX_WINDOW_DAYS: u32 = 365;

/// The percentiles the summary reports, in the order of [`LatencyPercentiles`]'s fields.
const PERCENTILES: [f64; 3] = [50.0, 95.0, 99.0];

/// A window of the user's usage as a run read it once: the rollup of the rows dated in
/// `[since_ms, until_ms]` with both sketches. The data agent summarises it and leaves it in
/// the run's state, and the optimization agent simulates on it
/// (`agents::optimization::gather_from`) instead of reading the window again: reading the
/// rollups is most of a run's database work.
#[derive(Debug, Clone)]
pub struct ReadWindow {
    pub since_ms: i64,
    pub until_ms: i64,
    pub rollup: Rollup,
    /// The rows dated after `until_ms` (future-dated ones), from the same read, when the
    /// rollups settled them (see [`crate::store::Store::usage_window_and_after`]).
    pub after: Option<Rollup>,
}

/// Summary of the store handle's user over the last `days` days before `now_ms`. Rows
/// dated after `now_ms` (clock skew in an upload) are not counted yet.
pub async fn summary_for(store: &UserStore, days: u32, now_ms: i64) -> StoreResult<UsageSummary> {
    let start_ms = window_start_ms(days, now_ms);
    let sketches = Sketches {
        latency: true,
        ..Sketches::default()
    };
    let window = store.usage_window(start_ms, now_ms, sketches).await?;
    Ok(summary_of(&window, days, start_ms))
}

/// [`summary_for`], and the window it was computed from, read with both sketches so that it
/// serves the savings simulation too.
pub async fn summary_and_window(
    store: &UserStore,
    days: u32,
    now_ms: i64,
) -> StoreResult<(UsageSummary, ReadWindow)> {
    let start_ms = window_start_ms(days, now_ms);
    let sketches = Sketches {
        latency: true,
        completion: true,
    };
    let (rollup, after) = store
        .usage_window_and_after(start_ms, now_ms, sketches)
        .await?;
    let summary = summary_of(&rollup, days, start_ms);
    let window = ReadWindow {
        since_ms: start_ms,
        until_ms: now_ms,
        rollup,
        after,
    };
    Ok((summary, window))
}

/// The summary of a `days`-day window starting at `start_ms`, read as `window` (with its
/// latency sketches).
fn summary_of(window: &Rollup, days: u32, start_ms: i64) -> UsageSummary {
    let totals = rollups::totals(window);
    // Percentiles rank the requests that have a latency of their own.
    let count: i64 = totals.iter().map(|t| t.timed_requests).sum();
    let mut latency = LatencyPercentiles::default();
    if count > 0 {
        let ranks = PERCENTILES.map(|p| percentile_rank(count, p));
        let found = rollups::latency_at_ranks(window, &ranks);
        let at = |rank: i64| {
            found
                .iter()
                .find(|(r, _)| *r == rank)
                .map_or(0, |(_, latency)| *latency)
        };
        latency = LatencyPercentiles {
            p50: at(ranks[0]),
            p95: at(ranks[1]),
            p99: at(ranks[2]),
        };
    }
    summarize(&totals, latency, days, start_ms)
}

/// Start of a `days`-day window ending at `now_ms`: `days` × 24 h earlier (inclusive).
pub fn window_start_ms(days: u32, now_ms: i64) -> i64 {
    now_ms - i64::from(days) * 24 * 3600 * 1000
}

/// The largest amount of money a figure reports, in USD. Imports bound each row (see
/// `import::MAX_COST_USD`), but rows stored before that bound, or a sum the database
/// computed past the largest double, must still give a finite figure: JSON has no
/// infinity (serde writes `null`), and an agent reading `null` reported "$0.00".
pub(crate) const MAX_REPORTED_USD: f64 = 1e15;

/// Money is reported in whole micro-dollars so that sums compare exactly everywhere; a
/// non-finite or out-of-range amount reads as the nearest bound (NaN, which only a sum of
/// infinities gives, as the upper one).
pub(crate) fn round_usd(value: f64) -> f64 {
    let value = if value.is_nan() {
        MAX_REPORTED_USD
    } else {
        value.clamp(-MAX_REPORTED_USD, MAX_REPORTED_USD)
    };
    (value * 1_000_000.0).round() / 1_000_000.0
}

/// Nearest-rank percentile: the 1-based rank, among `count` ≥ 1 sorted values, of the
/// `p`th percentile.
pub(crate) fn percentile_rank(count: i64, p: f64) -> i64 {
    let rank = ((p / 100.0) * count as f64).ceil() as i64;
    rank.clamp(1, count.max(1))
}

/// The summary of grouped totals (one entry per provider, model and workload) whose
/// latency percentiles are `latency`.
pub fn summarize(
    totals: &[UsageTotals],
    latency: LatencyPercentiles,
    days: u32,
    window_start_ms: i64,
) -> UsageSummary {
    let mut by_model: HashMap<(&str, &str), ModelUsage> = HashMap::new();
    let mut by_workload: HashMap<&str, WorkloadUsage> = HashMap::new();
    let mut by_source: HashMap<&str, (SourceUsage, i64)> = HashMap::new();
    let (mut requests, mut prompt, mut completion, mut cost, mut errors) =
        (0i64, 0i64, 0i64, 0f64, 0i64);
    let (mut cached, mut reasoning) = (0i64, 0i64);
    // Saturating: the counts come from the database, which bounds nothing.
    for group in totals {
        requests = requests.saturating_add(group.requests);
        prompt = prompt.saturating_add(group.prompt_tokens);
        completion = completion.saturating_add(group.completion_tokens);
        cost += group.cost_usd;
        errors = errors.saturating_add(group.errors);
        cached = cached.saturating_add(group.cached_tokens);
        reasoning = reasoning.saturating_add(group.reasoning_tokens);
        let (source, latest) = by_source.entry(group.source.as_str()).or_insert_with(|| {
            (
                SourceUsage {
                    source: group.source.clone(),
                    requests: 0,
                    cost_usd: 0.0,
                    latest: String::new(),
                },
                i64::MIN,
            )
        });
        source.requests = source.requests.saturating_add(group.requests);
        source.cost_usd += group.cost_usd;
        *latest = (*latest).max(group.last_ts_ms);
        let m = by_model
            .entry((group.provider.as_str(), group.model.as_str()))
            .or_insert_with(|| ModelUsage {
                provider: group.provider.clone(),
                model: group.model.clone(),
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
                cost_usd: 0.0,
            });
        m.requests = m.requests.saturating_add(group.requests);
        m.prompt_tokens = m.prompt_tokens.saturating_add(group.prompt_tokens);
        m.completion_tokens = m.completion_tokens.saturating_add(group.completion_tokens);
        m.cached_tokens = m.cached_tokens.saturating_add(group.cached_tokens);
        m.cost_usd += group.cost_usd;
        let w = by_workload
            .entry(group.workload.as_str())
            .or_insert_with(|| WorkloadUsage {
                workload: group.workload.clone(),
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
                cost_usd: 0.0,
                avg_prompt_tokens: 0.0,
                avg_completion_tokens: 0.0,
            });
        w.requests = w.requests.saturating_add(group.requests);
        w.prompt_tokens = w.prompt_tokens.saturating_add(group.prompt_tokens);
        w.completion_tokens = w.completion_tokens.saturating_add(group.completion_tokens);
        w.cached_tokens = w.cached_tokens.saturating_add(group.cached_tokens);
        w.cost_usd += group.cost_usd;
    }

    let mut by_model: Vec<ModelUsage> = by_model
        .into_values()
        .map(|mut m| {
            m.cost_usd = round_usd(m.cost_usd);
            m
        })
        .collect();
    by_model.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then(a.model.cmp(&b.model))
    });
    let mut by_workload: Vec<WorkloadUsage> = by_workload
        .into_values()
        .map(|mut w| {
            w.cost_usd = round_usd(w.cost_usd);
            // A workload known only from buckets that do not count requests has no average.
            let requests = w.requests.max(1) as f64;
            w.avg_prompt_tokens = (w.prompt_tokens as f64 / requests).round();
            w.avg_completion_tokens = (w.completion_tokens as f64 / requests).round();
            w
        })
        .collect();
    by_workload.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then(a.workload.cmp(&b.workload))
    });

    let mut by_source: Vec<SourceUsage> = by_source
        .into_values()
        .map(|(mut s, latest)| {
            s.cost_usd = round_usd(s.cost_usd);
            s.latest = ms_to_rfc3339(latest);
            s
        })
        .collect();
    by_source.sort_by(|a, b| a.source.cmp(&b.source));

    UsageSummary {
        days,
        window_start: ms_to_rfc3339(window_start_ms),
        total_requests: requests,
        error_requests: errors,
        total_prompt_tokens: prompt,
        total_completion_tokens: completion,
        total_cached_tokens: cached,
        total_reasoning_tokens: reasoning,
        total_cost_usd: round_usd(cost),
        latency_ms: latency,
        by_model,
        by_workload,
        by_source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(model: &str, workload: &str, requests: i64, cost: f64) -> UsageTotals {
        UsageTotals {
            provider: "openai".into(),
            model: model.into(),
            workload: workload.into(),
            requests,
            errors: 0,
            timed_requests: requests,
            prompt_tokens: 100 * requests,
            completion_tokens: 10 * requests,
            cached_tokens: 0,
            reasoning_tokens: 0,
            cost_usd: cost,
            source: "upload".into(),
            last_ts_ms: 0,
        }
    }

    #[test]
    fn groups_and_orders_by_cost() {
        let totals = vec![
            group("gpt-4o", "a", 1, 1.0),
            group("gpt-4o-mini", "b", 1, 0.25),
            group("gpt-4o", "b", 1, 2.0),
        ];
        let latency = LatencyPercentiles {
            p50: 200,
            p95: 300,
            p99: 300,
        };
        let s = summarize(&totals, latency.clone(), 30, 0);
        assert_eq!(s.total_requests, 3);
        assert_eq!(s.total_cost_usd, 3.25);
        assert_eq!(s.by_model[0].model, "gpt-4o");
        assert_eq!(s.by_model[0].cost_usd, 3.0);
        assert_eq!(s.by_model[0].requests, 2);
        assert_eq!(s.by_workload[0].workload, "b");
        assert_eq!(s.by_workload[0].avg_prompt_tokens, 100.0);
        assert_eq!(s.latency_ms, latency);
    }

    #[test]
    fn totals_stay_finite_whatever_the_stored_costs() {
        let mut huge = group("c", "w", 1, f64::INFINITY);
        huge.requests = i64::MAX;
        huge.prompt_tokens = i64::MAX;
        let totals = vec![
            group("a", "w", 1, 1.7e308),
            group("b", "w", 1, 1.7e308),
            huge,
        ];
        let s = summarize(&totals, LatencyPercentiles::default(), 30, 0);
        assert_eq!(s.total_cost_usd, MAX_REPORTED_USD);
        assert_eq!(s.total_requests, i64::MAX);
        assert_eq!(s.total_prompt_tokens, i64::MAX);
        assert!(s.by_model.iter().all(|m| m.cost_usd.is_finite()));
        assert_eq!(s.by_workload[0].cost_usd, MAX_REPORTED_USD);
        let json = serde_json::to_value(&s).unwrap();
        assert!(json["total_cost_usd"].is_number(), "{json}");
        assert_eq!(round_usd(f64::NAN), MAX_REPORTED_USD);
        assert_eq!(round_usd(1.25), 1.25);
    }

    #[test]
    fn empty_usage_is_all_zero() {
        let s = summarize(&[], LatencyPercentiles::default(), 7, 0);
        assert_eq!(s.total_requests, 0);
        assert_eq!(s.latency_ms, LatencyPercentiles::default());
    }

    #[test]
    fn percentile_ranks_are_nearest_rank() {
        assert_eq!(percentile_rank(3, 50.0), 2);
        assert_eq!(percentile_rank(3, 99.0), 3);
        assert_eq!(percentile_rank(1, 50.0), 1);
        assert_eq!(percentile_rank(20, 95.0), 19);
        assert_eq!(percentile_rank(1800, 99.0), 1782);
    }
}
