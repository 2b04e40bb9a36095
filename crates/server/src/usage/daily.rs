//! The daily series: spend and requests per UTC day and model, for the usage chart.
//!
//! Same window as the summary (`days` × 24 h before now, rows dated in the future left
//! out), read through the caller's `UserStore`, so only their own rows are counted.

use std::collections::BTreeMap;

use apex_protocol::usage::{DailyModelUsage, DailyUsage};
use chrono::{DateTime, Utc};

use super::summary::{round_usd, window_start_ms};
use crate::store::{StoreResult, UsageRow, UserStore};

/// The daily series of the store handle's user over the last `days` days before `now_ms`.
pub async fn daily_for(store: &UserStore, days: u32, now_ms: i64) -> StoreResult<DailyUsage> {
    let rows = store
        .usage_rows_since(window_start_ms(days, now_ms))
        .await?;
    Ok(DailyUsage {
        days,
        series: group_daily(&rows, now_ms),
    })
}

/// `YYYY-MM-DD` of a unix-milliseconds instant, in UTC.
fn utc_date(ts_ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ts_ms)
        .unwrap_or(DateTime::UNIX_EPOCH)
        .format("%Y-%m-%d")
        .to_string()
}

/// Groups rows by (UTC date, model), sorted by date then model; rows after `now_ms` are
/// left out. Costs are summed, then rounded to micro-dollars.
pub fn group_daily(rows: &[UsageRow], now_ms: i64) -> Vec<DailyModelUsage> {
    let mut groups: BTreeMap<(String, &str), (f64, i64)> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.ts_ms <= now_ms) {
        let entry = groups
            .entry((utc_date(row.ts_ms), row.model.as_str()))
            .or_insert((0.0, 0));
        entry.0 += row.cost_usd;
        entry.1 += 1;
    }
    groups
        .into_iter()
        .map(|((date, model), (cost, requests))| DailyModelUsage {
            date,
            model: model.to_string(),
            cost_usd: round_usd(cost),
            requests,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 24 * 3600 * 1000;
    /// 2025-11-20T00:00:00Z.
    const NOV_20: i64 = 1_763_596_800_000;

    fn row(model: &str, ts_ms: i64, cost: f64) -> UsageRow {
        UsageRow {
            provider: "openai".into(),
            model: model.into(),
            workload: "chat".into(),
            ts_ms,
            prompt_tokens: 10,
            completion_tokens: 1,
            latency_ms: 100,
            status: "ok".into(),
            cost_usd: cost,
        }
    }

    #[test]
    fn groups_by_utc_day_and_model_in_order() {
        let rows = vec![
            row("gpt-4o", NOV_20 + DAY_MS + 5, 0.1),
            row("gpt-4o-mini", NOV_20 + 10, 0.000_000_4),
            row("gpt-4o", NOV_20 + DAY_MS - 1, 0.2),
            row("gpt-4o", NOV_20, 0.3),
            row("claude-3-haiku", NOV_20 + DAY_MS + 7, 1.0),
        ];
        let series = group_daily(&rows, NOV_20 + 2 * DAY_MS);
        let got: Vec<(&str, &str, f64, i64)> = series
            .iter()
            .map(|d| (d.date.as_str(), d.model.as_str(), d.cost_usd, d.requests))
            .collect();
        assert_eq!(
            got,
            vec![
                ("2025-11-20", "gpt-4o", 0.5, 2),
                ("2025-11-20", "gpt-4o-mini", 0.0, 1),
                ("2025-11-21", "claude-3-haiku", 1.0, 1),
                ("2025-11-21", "gpt-4o", 0.1, 1),
            ]
        );
    }

    #[test]
    fn future_rows_are_left_out_and_no_rows_give_an_empty_series() {
        assert!(group_daily(&[], NOV_20).is_empty());
        let series = group_daily(&[row("gpt-4o", NOV_20 + 1, 1.0)], NOV_20);
        assert!(series.is_empty());
    }
}
