//! The usage summary: totals, by model, by workload, latency percentiles.

use std::collections::HashMap;

use apex_protocol::usage::{LatencyPercentiles, ModelUsage, UsageSummary, WorkloadUsage};

use crate::clock::ms_to_rfc3339;
use crate::store::{StoreResult, UsageRow, UserStore};

pub const DEFAULT_WINDOW_DAYS: u32 = 30;
pub const MAX_WINDOW_DAYS: u32 = 365;

/// Summary of the store handle's user over the last `days` days before `now_ms`.
pub async fn summary_for(store: &UserStore, days: u32, now_ms: i64) -> StoreResult<UsageSummary> {
    Ok(UsageWindow::load(store, days, now_ms).await?.summary())
}

/// The user's usage rows from the start of a `days`-day window ending at `now_ms`, read
/// once. A run reads them once and both summarises them (data agent) and simulates savings
/// on them (optimization agent), instead of reading thousands of rows twice.
#[derive(Debug, Clone)]
pub struct UsageWindow {
    pub days: u32,
    pub now_ms: i64,
    pub start_ms: i64,
    /// Oldest first; includes rows dated after `now_ms` (the summary leaves them out).
    rows: Vec<UsageRow>,
}

impl UsageWindow {
    pub async fn load(store: &UserStore, days: u32, now_ms: i64) -> StoreResult<Self> {
        let start_ms = window_start_ms(days, now_ms);
        let mut rows = store.usage_rows_since(start_ms).await?;
        // The store returns them by time already (a stable sort of sorted rows is one
        // linear pass); this keeps the slices below exact whatever the engine does.
        rows.sort_by_key(|r| r.ts_ms);
        Ok(Self {
            days,
            now_ms,
            start_ms,
            rows,
        })
    }

    /// The summary [`summary_for`] gives.
    pub fn summary(&self) -> UsageSummary {
        // Rows dated in the future (clock skew in an upload) are not counted yet.
        let until = self.rows.partition_point(|r| r.ts_ms <= self.now_ms);
        summarize(&self.rows[..until], self.days, self.start_ms)
    }

    /// The rows dated at or after `since_ms` (which should not precede the window's start).
    pub fn rows_since(&self, since_ms: i64) -> &[UsageRow] {
        &self.rows[self.rows.partition_point(|r| r.ts_ms < since_ms)..]
    }
}

/// Start of a `days`-day window ending at `now_ms`: `days` × 24 h earlier (inclusive).
pub(crate) fn window_start_ms(days: u32, now_ms: i64) -> i64 {
    now_ms - i64::from(days) * 24 * 3600 * 1000
}

/// Money is reported in whole micro-dollars so that sums compare exactly everywhere.
pub(crate) fn round_usd(value: f64) -> f64 {
    (value * 1_000_000.0).round() / 1_000_000.0
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn summarize(rows: &[UsageRow], days: u32, window_start_ms: i64) -> UsageSummary {
    let mut by_model: HashMap<(&str, &str), ModelUsage> = HashMap::new();
    let mut by_workload: HashMap<&str, WorkloadUsage> = HashMap::new();
    let mut latencies = Vec::with_capacity(rows.len());
    let (mut prompt, mut completion, mut cost, mut errors) = (0i64, 0i64, 0f64, 0i64);
    for row in rows {
        prompt += row.prompt_tokens;
        completion += row.completion_tokens;
        cost += row.cost_usd;
        if row.status != "ok" {
            errors += 1;
        }
        latencies.push(row.latency_ms);
        let m = by_model
            .entry((row.provider.as_str(), row.model.as_str()))
            .or_insert_with(|| ModelUsage {
                provider: row.provider.clone(),
                model: row.model.clone(),
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_usd: 0.0,
            });
        m.requests += 1;
        m.prompt_tokens += row.prompt_tokens;
        m.completion_tokens += row.completion_tokens;
        m.cost_usd += row.cost_usd;
        let w = by_workload
            .entry(row.workload.as_str())
            .or_insert_with(|| WorkloadUsage {
                workload: row.workload.clone(),
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_usd: 0.0,
                avg_prompt_tokens: 0.0,
                avg_completion_tokens: 0.0,
            });
        w.requests += 1;
        w.prompt_tokens += row.prompt_tokens;
        w.completion_tokens += row.completion_tokens;
        w.cost_usd += row.cost_usd;
    }
    latencies.sort_unstable();

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
            w.avg_prompt_tokens = (w.prompt_tokens as f64 / w.requests as f64).round();
            w.avg_completion_tokens = (w.completion_tokens as f64 / w.requests as f64).round();
            w
        })
        .collect();
    by_workload.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then(a.workload.cmp(&b.workload))
    });

    UsageSummary {
        days,
        window_start: ms_to_rfc3339(window_start_ms),
        total_requests: rows.len() as i64,
        error_requests: errors,
        total_prompt_tokens: prompt,
        total_completion_tokens: completion,
        total_cost_usd: round_usd(cost),
        latency_ms: LatencyPercentiles {
            p50: percentile(&latencies, 50.0),
            p95: percentile(&latencies, 95.0),
            p99: percentile(&latencies, 99.0),
        },
        by_model,
        by_workload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(model: &str, workload: &str, cost: f64, latency: i64) -> UsageRow {
        UsageRow {
            provider: "openai".into(),
            model: model.into(),
            workload: workload.into(),
            ts_ms: 0,
            prompt_tokens: 100,
            completion_tokens: 10,
            latency_ms: latency,
            status: "ok".into(),
            cost_usd: cost,
        }
    }

    #[test]
    fn groups_and_orders_by_cost() {
        let rows = vec![
            row("gpt-4o", "a", 1.0, 100),
            row("gpt-4o-mini", "b", 0.25, 200),
            row("gpt-4o", "b", 2.0, 300),
        ];
        let s = summarize(&rows, 30, 0);
        assert_eq!(s.total_requests, 3);
        assert_eq!(s.total_cost_usd, 3.25);
        assert_eq!(s.by_model[0].model, "gpt-4o");
        assert_eq!(s.by_model[0].cost_usd, 3.0);
        assert_eq!(s.by_workload[0].workload, "b");
        assert_eq!(s.latency_ms.p50, 200);
        assert_eq!(s.latency_ms.p99, 300);
    }

    #[test]
    fn empty_usage_is_all_zero() {
        let s = summarize(&[], 7, 0);
        assert_eq!(s.total_requests, 0);
        assert_eq!(s.latency_ms, LatencyPercentiles::default());
    }
}
