//! The daily series: spend and requests per UTC day and model, for the usage chart.
//!
//! Same window as the summary (`days` × 24 h before now, rows dated in the future left
//! out), read through the caller's `UserStore`, so only their own rows are counted. The
//! database groups the rows by day and model ([`crate::store::Store::usage_daily`]).

use std::collections::BTreeMap;

use apex_protocol::usage::{DailyModelUsage, DailyUsage};
use chrono::{DateTime, Utc};

use super::summary::{round_usd, window_start_ms};
use crate::store::{StoreResult, UsageDayTotals};
use crate::user_store::UserStore;

const DAY_MS: i64 = 24 * 3600 * 1000;

/// The daily series of the store handle's user over the last `days` days before `now_ms`.
pub async fn daily_for(store: &UserStore, days: u32, now_ms: i64) -> StoreResult<DailyUsage> {
    let days_totals = store
        .usage_daily(window_start_ms(days, now_ms), now_ms)
        .await?;
    Ok(DailyUsage {
        days,
        series: group_daily(&days_totals),
    })
}

/// `YYYY-MM-DD` of a day counted from 1970-01-01, in UTC.
fn utc_date(day: i64) -> String {
    day.checked_mul(DAY_MS)
        .and_then(DateTime::<Utc>::from_timestamp_millis)
        .unwrap_or(DateTime::UNIX_EPOCH)
        .format("%Y-%m-%d")
        .to_string()
}

/// Sorts per-(day, model) totals by date then model, with costs rounded to micro-dollars.
/// Totals of one date and model are merged (days out of the calendar's range all read
/// 1970-01-01, as their rows' instants did).
pub fn group_daily(totals: &[UsageDayTotals]) -> Vec<DailyModelUsage> {
    let mut groups: BTreeMap<(String, &str), (f64, i64)> = BTreeMap::new();
    for day in totals {
        let entry = groups
            .entry((utc_date(day.day), day.model.as_str()))
            .or_insert((0.0, 0));
        entry.0 += day.cost_usd;
        entry.1 += day.requests;
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

    /// 2025-11-20.
    const NOV_20: i64 = 1_763_596_800_000 / DAY_MS;

    fn day(model: &str, day: i64, requests: i64, cost: f64) -> UsageDayTotals {
        UsageDayTotals {
            day,
            model: model.into(),
            requests,
            cost_usd: cost,
        }
    }

    #[test]
    fn orders_by_utc_day_and_model() {
        let totals = vec![
            day("gpt-4o", NOV_20 + 1, 1, 0.1),
            day("gpt-4o-mini", NOV_20, 1, 0.000_000_4),
            day("gpt-4o", NOV_20, 2, 0.5),
            day("claude-3-haiku", NOV_20 + 1, 1, 1.0),
        ];
        let series = group_daily(&totals);
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
    fn no_rows_give_an_empty_series_and_days_before_1970_have_their_date() {
        assert!(group_daily(&[]).is_empty());
        assert_eq!(group_daily(&[day("m", -1, 1, 1.0)])[0].date, "1969-12-31");
    }
}
