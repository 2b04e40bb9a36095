//! The usage figures computed by the database (summary, daily series, savings simulation)
//! against the same figures computed row by row in Rust, the way the server did before it
//! grouped in SQL. Runs on SQLite in `api` and on PostgreSQL in `api_postgres`.
//!
//! Counts, tokens, latencies, dates and the workloads named are compared exactly. Money is
//! compared to one unit of its rounding (a micro-dollar, a cent for savings): the database
//! adds the costs in another order than the rows' (and SQLite with compensated summation),
//! and list-price costs often add up to exactly half a micro-dollar, so the last bits of
//! the sum decide which way it rounds; neither order is the more exact one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use apex_protocol::usage::{DailyModelUsage, LatencyPercentiles};
use apex_server::agents::optimization::{gather, simulate};
use apex_server::agents::Opportunity;
use apex_server::auth::{AuthLifetimes, Authenticator, PasswordHasher};
use apex_server::settings::{PasswordHashing, Secret};
use apex_server::store::UsageRow;
use apex_server::usage::pricing::{cost_at, PricingTable};
use apex_server::usage::{daily_for, summary_for};
use apex_server::user_store::UserStore;

use crate::helpers::test_database;

const DAY_MS: i64 = 24 * 3600 * 1000;
/// 2025-11-20T13:00:00Z.
const NOW: i64 = 1_763_643_600_000;

fn row(model: &str, workload: &str, ts_ms: i64, tokens: (i64, i64), cost_usd: f64) -> UsageRow {
    UsageRow {
        provider: "openai".into(),
        model: model.into(),
        workload: workload.into(),
        ts_ms,
        prompt_tokens: tokens.0,
        completion_tokens: tokens.1,
        latency_ms: 100 + tokens.1,
        status: if tokens.1 % 7 == 0 { "error" } else { "ok" }.into(),
        cost_usd,
        ..UsageRow::default()
    }
}

/// Rows that exercise the edges: future rows, rows just outside the window, a dated model
/// name, an unknown model, short rows whose uploaded cost is below the alternative's,
/// one model under two providers, a one-row workload long enough to be capped.
fn edge_rows() -> Vec<UsageRow> {
    let mut rows = vec![
        row("gpt-4o", "chat", NOW + 5_000, (100, 10), 0.5),
        row("gpt-4o", "chat", NOW - 30 * DAY_MS - 1, (100, 10), 0.25),
        row("gpt-4o", "chat", NOW - 30 * DAY_MS, (100, 10), 0.125),
        row(
            "GPT-4o-2024-08-06",
            "classifier",
            NOW - DAY_MS,
            (300, 20),
            0.01,
        ),
        row("gpt-4o", "classifier", NOW - DAY_MS, (300, 20), 0.0),
        row(
            "my-own-model",
            "classifier",
            NOW - 2 * DAY_MS,
            (300, 20),
            3.0,
        ),
        row(
            "gpt-4o",
            "long-answers",
            NOW - 3 * DAY_MS,
            (2000, 5000),
            1.0,
        ),
        row(
            "gpt-4o-mini",
            "weekly-report",
            NOW - 4 * DAY_MS,
            (1600, 700),
            0.3,
        ),
    ];
    let mut other_provider = row("gpt-4o", "chat", NOW - 5 * DAY_MS, (50, 5), 0.2);
    other_provider.provider = "azure".into();
    rows.push(other_provider);
    rows
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round_usd(value: f64) -> f64 {
    (value * 1_000_000.0).round() / 1_000_000.0
}

fn round_cents(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// (requests, errors, prompt, completion, cost) per model, per workload, and in total,
/// plus the latency percentiles, of the rows in `[since, until]`.
#[allow(clippy::type_complexity)]
fn reference_summary(
    rows: &[UsageRow],
    since: i64,
    until: i64,
) -> (
    BTreeMap<(String, String), (i64, i64, i64, f64)>,
    BTreeMap<String, (i64, i64, i64, f64)>,
    (i64, i64, i64, i64, f64),
    LatencyPercentiles,
) {
    let rows: Vec<&UsageRow> = rows
        .iter()
        .filter(|r| r.ts_ms >= since && r.ts_ms <= until)
        .collect();
    let mut by_model: BTreeMap<(String, String), (i64, i64, i64, f64)> = BTreeMap::new();
    let mut by_workload: BTreeMap<String, (i64, i64, i64, f64)> = BTreeMap::new();
    let mut total = (0, 0, 0, 0, 0.0);
    let mut latencies = Vec::new();
    for r in &rows {
        for entry in [
            by_model
                .entry((r.provider.clone(), r.model.clone()))
                .or_default(),
            by_workload.entry(r.workload.clone()).or_default(),
        ] {
            entry.0 += 1;
            entry.1 += r.prompt_tokens;
            entry.2 += r.completion_tokens;
            entry.3 += r.cost_usd;
        }
        total.0 += 1;
        total.1 += i64::from(r.status != "ok");
        total.2 += r.prompt_tokens;
        total.3 += r.completion_tokens;
        total.4 += r.cost_usd;
        latencies.push(r.latency_ms);
    }
    latencies.sort_unstable();
    let latency = LatencyPercentiles {
        p50: percentile(&latencies, 50.0),
        p95: percentile(&latencies, 95.0),
        p99: percentile(&latencies, 99.0),
    };
    (by_model, by_workload, total, latency)
}

fn reference_daily(rows: &[UsageRow], since: i64, until: i64) -> Vec<DailyModelUsage> {
    let mut groups: BTreeMap<(String, String), (f64, i64)> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.ts_ms >= since && r.ts_ms <= until) {
        let date = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(r.ts_ms)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string();
        let entry = groups.entry((date, r.model.clone())).or_default();
        entry.0 += r.cost_usd;
        entry.1 += 1;
    }
    groups
        .into_iter()
        .map(|((date, model), (cost, requests))| DailyModelUsage {
            date,
            model,
            cost_usd: round_usd(cost),
            requests,
        })
        .collect()
}

/// The savings simulation as it ran on loaded rows: (strategy, workloads, monthly USD).
fn reference_simulation(
    rows: &[UsageRow],
    since: i64,
    days: u32,
    pricing: &PricingTable,
) -> Vec<(String, Vec<String>, f64)> {
    let monthly = 30.0 / f64::from(days.max(1));
    let mut by_workload: BTreeMap<&str, Vec<&UsageRow>> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.ts_ms >= since) {
        by_workload
            .entry(row.workload.as_str())
            .or_default()
            .push(row);
    }
    let mut routing = (0.0, BTreeSet::new());
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
        let offline = ["nightly", "batch", "weekly", "backfill", "eval", "report"]
            .iter()
            .any(|m| workload.contains(m));
        for row in rows {
            let Some(price) = pricing.lookup(&row.model) else {
                continue;
            };
            if row.prompt_tokens < 600 && row.completion_tokens < 150 {
                if let Some(alt) = price.cheaper_alternative.and_then(|m| pricing.lookup(m)) {
                    let saved =
                        row.cost_usd - cost_at(alt, row.prompt_tokens, row.completion_tokens);
                    if saved > 0.0 {
                        routing.0 += saved;
                        routing.1.insert(workload.to_string());
                    }
                }
            }
            if avg_prompt >= 1500.0 && price.cached_input_discount > 0.0 {
                caching.0 += row.prompt_tokens as f64
                    * 0.6
                    * price.input_per_mtok
                    * price.cached_input_discount
                    / 1_000_000.0;
                caching.1.insert(workload.to_string());
            }
            if offline && price.batch_discount > 0.0 {
                batching.0 += row.cost_usd * price.batch_discount;
                batching.1.insert(workload.to_string());
            }
            if avg_completion >= 400.0 && row.completion_tokens > cap {
                capping.0 +=
                    (row.completion_tokens - cap) as f64 * price.output_per_mtok / 1_000_000.0;
                capping.1.insert(format!("{workload} (cap {cap} tokens)"));
            }
        }
    }
    let mut found: Vec<(String, Vec<String>, f64)> = [
        ("model_routing", routing),
        ("prompt_caching", caching),
        ("batching", batching),
        ("output_caps", capping),
    ]
    .into_iter()
    .map(|(s, (saved, set))| {
        (
            s.to_string(),
            set.into_iter().collect(),
            round_cents(saved * monthly),
        )
    })
    .filter(|(_, _, usd)| *usd > 0.0)
    .collect();
    found.sort_by(|a, b| b.2.total_cmp(&a.2));
    found
}

/// `a` and `b` differ by at most one `unit` (rounding of a sum; see the module docs).
fn close(a: f64, b: f64, unit: f64) -> bool {
    (a - b).abs() <= unit * 1.000_001
}

/// Same keys, same integers, money within one micro-dollar.
fn assert_same<K: std::fmt::Debug + Ord>(
    got: BTreeMap<K, (i64, i64, i64, f64)>,
    want: BTreeMap<K, (i64, i64, i64, f64)>,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for ((key, g), w) in got.iter().zip(want.values()) {
        assert_eq!((g.0, g.1, g.2), (w.0, w.1, w.2), "{key:?}");
        assert!(close(g.3, w.3, 1e-6), "{key:?}: {} against {}", g.3, w.3);
    }
}

fn strategies(found: &[Opportunity]) -> Vec<(String, Vec<String>, f64)> {
    found
        .iter()
        .map(|o| {
            (
                o.strategy.clone(),
                o.workloads.clone(),
                o.monthly_savings_usd,
            )
        })
        .collect()
}

#[tokio::test]
async fn usage_figures_from_sql_match_the_row_by_row_computation() {
    let database = test_database().await;
    let store = apex_server::open_store(&database.settings())
        .await
        .expect("open the store");
    let auth = Authenticator::new(
        Arc::clone(&store),
        &Secret::new("a test secret of at least thirty-two characters"),
        PasswordHasher::new(PasswordHashing::Light),
        AuthLifetimes {
            access: Duration::from_secs(900),
            refresh: Duration::from_secs(3600),
            ticket: Duration::from_secs(60),
            session: Duration::from_secs(3600),
        },
    );
    let pricing = PricingTable::builtin();
    let book = apex_server::usage::price_book::PriceBook::builtin(&pricing);
    // Two users with different demo data; the second one's rows must not count for the first.
    let (_, user) = auth
        .register("figures@example.com", "a long password", None, None)
        .await
        .unwrap();
    let (_, other) = auth
        .register("other@example.com", "a long password", None, None)
        .await
        .unwrap();
    let users = UserStore::for_user(Arc::clone(&store), &user);
    let others = UserStore::for_user(Arc::clone(&store), &other);
    others
        .insert_usage(&apex_server::usage::demo::generate(
            other.user_id(),
            NOW,
            &book,
        ))
        .await
        .unwrap();
    let mut rows = apex_server::usage::demo::generate(user.user_id(), NOW, &book);
    rows.extend(edge_rows());
    users.insert_usage(&rows).await.unwrap();
    // Whatever registration may have added too.
    let rows = users.usage_rows_since(i64::MIN).await.unwrap();

    for days in [30, 7, 1] {
        let since = NOW - i64::from(days) * DAY_MS;
        let summary = summary_for(&users, days, NOW).await.unwrap();
        let (by_model, by_workload, total, latency) = reference_summary(&rows, since, NOW);
        assert_eq!(summary.total_requests, total.0, "{days} days");
        assert_eq!(summary.error_requests, total.1);
        assert_eq!(summary.total_prompt_tokens, total.2);
        assert_eq!(summary.total_completion_tokens, total.3);
        assert!(close(summary.total_cost_usd, round_usd(total.4), 1e-6));
        assert_eq!(summary.latency_ms, latency);
        let got: BTreeMap<(String, String), (i64, i64, i64, f64)> = summary
            .by_model
            .iter()
            .map(|m| {
                (
                    (m.provider.clone(), m.model.clone()),
                    (m.requests, m.prompt_tokens, m.completion_tokens, m.cost_usd),
                )
            })
            .collect();
        let want: BTreeMap<_, _> = by_model
            .into_iter()
            .map(|(k, v)| (k, (v.0, v.1, v.2, round_usd(v.3))))
            .collect();
        assert_same(got, want);
        let got: BTreeMap<String, (i64, i64, i64, f64)> = summary
            .by_workload
            .iter()
            .map(|w| {
                (
                    w.workload.clone(),
                    (w.requests, w.prompt_tokens, w.completion_tokens, w.cost_usd),
                )
            })
            .collect();
        let want: BTreeMap<_, _> = by_workload
            .into_iter()
            .map(|(k, v)| (k, (v.0, v.1, v.2, round_usd(v.3))))
            .collect();
        assert_same(got, want);

        let daily = daily_for(&users, days, NOW).await.unwrap();
        let want = reference_daily(&rows, since, NOW);
        assert_eq!(daily.series.len(), want.len());
        for (g, w) in daily.series.iter().zip(&want) {
            assert_eq!(
                (&g.date, &g.model, g.requests),
                (&w.date, &w.model, w.requests)
            );
            assert!(close(g.cost_usd, w.cost_usd, 1e-6), "{g:?} against {w:?}");
        }

        let input = gather(&users, since, &pricing).await.unwrap();
        let found = simulate(&input, days, &pricing);
        let mut got = strategies(&found);
        let mut want = reference_simulation(&rows, since, days, &pricing);
        // Ordered by strategy: two savings a cent apart may swap places.
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got.len(),
            want.len(),
            "{days} days: {got:?} against {want:?}"
        );
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((&g.0, &g.1), (&w.0, &w.1), "{days} days");
            assert!(close(g.2, w.2, 0.01), "{days} days: {g:?} against {w:?}");
        }
    }

    // No rows in the window: everything is zero or empty.
    let summary = summary_for(&users, 1, NOW - 400 * DAY_MS).await.unwrap();
    assert_eq!(summary.total_requests, 0);
    assert_eq!(summary.latency_ms, LatencyPercentiles::default());
    let input = gather(&users, i64::MAX - 1, &pricing).await.unwrap();
    assert!(simulate(&input, 30, &pricing).is_empty());
}
