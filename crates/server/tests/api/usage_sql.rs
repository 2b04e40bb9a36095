//! The usage figures the store computes from its rollups (summary, daily series, savings
//! simulation) against the same figures computed row by row in Rust, the way the server did
//! before it kept rollups. Runs on SQLite in `api` and on PostgreSQL in `api_postgres`.
//!
//! Counts, tokens, dates and the workloads named are compared exactly. Percentiles come
//! from sketches: each must lie within the sketch's stated error of the exact one, and the
//! output caps are computed row by row on the sketched values. Money is compared to one
//! unit of its rounding (a micro-dollar, a cent for savings): the rollups add the costs in
//! another order than the rows', and list-price costs often add up to exactly half a
//! micro-dollar, so the last bits of the sum decide which way it rounds; neither order is
//! the more exact one.
//!
//! The rollups themselves are checked against the rows after random sequences of inserts,
//! duplicate inserts, imports, refused imports and undone imports.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use apex_protocol::usage::{DailyModelUsage, LatencyPercentiles};
use apex_server::agents::optimization::{gather, gather_from, simulate};
use apex_server::agents::Opportunity;
use apex_server::store::{
    CompletionRank, ImportPlan, OutputCap, RepricingRate, SavingsQuery, UsageRow,
};
use apex_server::usage::pricing::{cost_at, PricingTable};
use apex_server::usage::{daily_for, summary_and_window, summary_for};
use apex_server::user_store::UserStore;
use apex_store::rollups::{self, bucket, representative, Rollup, Sketches, SKETCH_RELATIVE_ERROR};

use crate::helpers::{authenticator, test_database};

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

/// The value a sketch shows for `value`.
fn sketched(value: i64) -> i64 {
    representative(bucket(value))
}

/// `got` is `exact` as a sketch shows it: within the sketch's relative error.
fn sketch_close(got: i64, exact: i64) -> bool {
    (got - exact).abs() as f64 <= exact as f64 * SKETCH_RELATIVE_ERROR
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
        let mut completions: Vec<i64> =
            rows.iter().map(|r| sketched(r.completion_tokens)).collect();
        completions.sort_unstable();
        let cap = completions[(completions.len() * 3 / 4).min(completions.len() - 1)].max(256);
        let offline = ["nightly", "batch", "weekly", "backfill", "eval", "report"]
            .iter()
            .any(|m| workload.contains(m));
        // Short requests per model, repriced together: (prompt, completion, cost).
        let mut short: BTreeMap<&str, (i64, i64, f64)> = BTreeMap::new();
        for row in rows {
            if row.prompt_tokens < 600 && row.completion_tokens < 150 {
                let s = short.entry(row.model.as_str()).or_default();
                s.0 += row.prompt_tokens;
                s.1 += row.completion_tokens;
                s.2 += row.cost_usd;
            }
        }
        for (model, (prompt, completion, cost)) in short {
            let alt = pricing
                .lookup(model)
                .and_then(|p| p.cheaper_alternative)
                .and_then(|m| pricing.lookup(m));
            if let Some(alt) = alt {
                let saved = cost - cost_at(alt, prompt, completion);
                if saved > 0.0 {
                    routing.0 += saved;
                    routing.1.insert(workload.to_string());
                }
            }
        }
        // Tokens past the cap per model: the rollups judge a request by its sketched
        // completion tokens and count what it has past the cap.
        let mut over_cap: BTreeMap<&str, i64> = BTreeMap::new();
        for row in rows {
            let Some(price) = pricing.lookup(&row.model) else {
                continue;
            };
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
            if avg_completion >= 400.0 && sketched(row.completion_tokens) > cap {
                *over_cap.entry(row.model.as_str()).or_default() += row.completion_tokens - cap;
                capping.1.insert(format!("{workload} (cap {cap} tokens)"));
            }
        }
        for (model, over) in over_cap {
            if let Some(price) = pricing.lookup(model) {
                capping.0 += over.max(0) as f64 * price.output_per_mtok / 1_000_000.0;
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
    let auth = authenticator(&store);
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
        let (got, want) = (summary.latency_ms.clone(), latency);
        for (g, w) in [
            (got.p50, want.p50),
            (got.p95, want.p95),
            (got.p99, want.p99),
        ] {
            assert!(sketch_close(g, w), "{days} days: {got:?} against {want:?}");
        }
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

        // A run reads the window once: the data agent's summary and the simulation on the
        // same read (plus the rows dated after it, one of which `edge_rows` has) give the
        // figures of the separate reads.
        let (shared_summary, window) = summary_and_window(&users, days, NOW).await.unwrap();
        assert_eq!(shared_summary, summary, "{days} days");
        assert_eq!(window.since_ms, since);
        let shared = gather_from(&users, window, &pricing).await.unwrap();
        assert_eq!(shared.totals.len(), input.totals.len(), "{days} days");
        for (s, g) in shared.totals.iter().zip(&input.totals) {
            assert_eq!(
                (
                    &s.model,
                    &s.workload,
                    s.requests,
                    s.prompt_tokens,
                    s.completion_tokens
                ),
                (
                    &g.model,
                    &g.workload,
                    g.requests,
                    g.prompt_tokens,
                    g.completion_tokens
                ),
                "{days} days"
            );
            assert!(close(s.cost_usd, g.cost_usd, 1e-9), "{s:?} against {g:?}");
        }
        assert_eq!(shared.caps, input.caps, "{days} days");
        assert_eq!(
            strategies(&simulate(&shared, days, &pricing)),
            strategies(&simulate(&input, days, &pricing)),
            "{days} days"
        );
    }

    // The names a run recognises: the (model, workload) pairs of the whole days from the
    // one holding `since` on, with their spend, as the totals of those days give them.
    let since = NOW - 365 * DAY_MS;
    let names = users.usage_names(since).await.unwrap();
    let mut want: BTreeMap<(String, String), f64> = BTreeMap::new();
    for t in users
        .usage_totals(since.div_euclid(DAY_MS) * DAY_MS, i64::MAX)
        .await
        .unwrap()
    {
        *want.entry((t.model, t.workload)).or_default() += t.cost_usd;
    }
    assert_eq!(
        names
            .iter()
            .map(|(m, w, _)| (m.clone(), w.clone()))
            .collect::<Vec<_>>(),
        want.keys().cloned().collect::<Vec<_>>()
    );
    for ((_, _, spend), want) in names.iter().zip(want.values()) {
        assert!(close(*spend, *want, 1e-6), "{spend} against {want}");
    }
    assert!(users
        .usage_names(NOW + 2 * DAY_MS)
        .await
        .unwrap()
        .is_empty());

    // No rows in the window: everything is zero or empty.
    let summary = summary_for(&users, 1, NOW - 400 * DAY_MS).await.unwrap();
    assert_eq!(summary.total_requests, 0);
    assert_eq!(summary.latency_ms, LatencyPercentiles::default());
    let input = gather(&users, i64::MAX - 1, &pricing).await.unwrap();
    assert!(simulate(&input, 30, &pricing).is_empty());
}

/// A small deterministic generator (xorshift64*), so a failing sequence can be replayed.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> i64 {
        (self.next() % n) as i64
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len() as u64) as usize]
    }
}

/// A random row dated in the ten days before `NOW`, at any millisecond (so windows cut
/// days), sometimes a bucket of requests, sometimes one the source already sent.
fn random_row(dice: &mut Dice) -> UsageRow {
    let requests = match dice.below(10) {
        0 => 0,
        1 => 1 + dice.below(9),
        _ => 1,
    };
    let completion = dice.below(4000);
    UsageRow {
        provider: dice.pick(&["openai", "azure"]).into(),
        model: dice
            .pick(&["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet"])
            .into(),
        workload: dice.pick(&["chat", "rag", "nightly-eval"]).into(),
        ts_ms: NOW - dice.below(10 * DAY_MS as u64),
        prompt_tokens: dice.below(3000) * requests.max(1),
        completion_tokens: completion * requests.max(1),
        latency_ms: if requests == 1 { dice.below(30_000) } else { 0 },
        status: if dice.below(9) == 0 { "error" } else { "ok" }.into(),
        cost_usd: dice.below(2_000_000) as f64 / 1_000_000.0,
        requests,
        source: dice.pick(&["upload", "gateway"]).into(),
        source_ref: (dice.below(3) == 0).then(|| format!("ref-{}", dice.below(40))),
        ..UsageRow::default()
    }
}

/// Totals per (provider, model, workload, source) of `rows` dated in `[since, until]`:
/// requests, errors, timed requests, prompt, completion, latest time; and cost.
#[allow(clippy::type_complexity)]
fn reference_totals(
    rows: &[UsageRow],
    since: i64,
    until: i64,
) -> BTreeMap<(String, String, String, String), ([i64; 6], f64)> {
    let mut totals: BTreeMap<_, ([i64; 6], f64)> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.ts_ms >= since && r.ts_ms <= until) {
        let key = (
            r.provider.clone(),
            r.model.clone(),
            r.workload.clone(),
            r.source.clone(),
        );
        let (sums, cost) = totals
            .entry(key)
            .or_insert(([0, 0, 0, 0, 0, i64::MIN], 0.0));
        sums[0] += r.requests;
        sums[1] += if r.status == "ok" { 0 } else { r.requests };
        sums[2] += i64::from(r.requests == 1);
        sums[3] += r.prompt_tokens;
        sums[4] += r.completion_tokens;
        sums[5] = sums[5].max(r.ts_ms);
        *cost += r.cost_usd;
    }
    totals
}

/// Every figure the store reads off its rollups for `[since, until]` equals the figure
/// computed from `rows` (the user's stored rows): totals, the daily series, the value at
/// every latency rank and at every completion rank of each workload, and the savings.
async fn assert_rollups_match_rows(users: &UserStore, rows: &[UsageRow], since: i64, until: i64) {
    let got: BTreeMap<_, _> = users
        .usage_totals(since, until)
        .await
        .unwrap()
        .into_iter()
        .map(|t| {
            let sums = [
                t.requests,
                t.errors,
                t.timed_requests,
                t.prompt_tokens,
                t.completion_tokens,
                t.last_ts_ms,
            ];
            (
                (t.provider, t.model, t.workload, t.source),
                (sums, t.cost_usd),
            )
        })
        .collect();
    let want = reference_totals(rows, since, until);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "[{since}, {until}]"
    );
    for ((key, g), w) in got.iter().zip(want.values()) {
        assert_eq!(g.0, w.0, "{key:?} in [{since}, {until}]");
        assert!(close(g.1, w.1, 1e-6), "{key:?}: {} against {}", g.1, w.1);
    }

    let in_window = || rows.iter().filter(|r| r.ts_ms >= since && r.ts_ms <= until);
    let mut daily: BTreeMap<(i64, String), (i64, f64)> = BTreeMap::new();
    for r in in_window() {
        let day = daily
            .entry((r.ts_ms.div_euclid(DAY_MS), r.model.clone()))
            .or_default();
        day.0 += r.requests;
        day.1 += r.cost_usd;
    }
    let got = users.usage_daily(since, until).await.unwrap();
    assert_eq!(got.len(), daily.len());
    for (g, ((day, model), (requests, cost))) in got.iter().zip(&daily) {
        assert_eq!((g.day, &g.model, g.requests), (*day, model, *requests));
        assert!(close(g.cost_usd, *cost, 1e-6));
    }

    // Both sketches, read once, as the summary and the simulation read them.
    let sketches = Sketches {
        latency: true,
        completion: true,
    };
    let window = users.usage_window(since, until, sketches).await.unwrap();
    // The same read with the rows after the window: the same window and, where the
    // rollups settle it, what a read of the rows after `until` gives.
    let (same, after) = users
        .usage_window_and_after(since, until, sketches)
        .await
        .unwrap();
    assert_eq!(same, window, "[{since}, {until}]");
    if let Some(after) = after {
        let later = match until.checked_add(1) {
            Some(next) => users.usage_window(next, i64::MAX, sketches).await.unwrap(),
            None => Rollup::default(),
        };
        assert_eq!(after, later, "after {until}");
    }
    let mut latencies: Vec<i64> = in_window()
        .filter(|r| r.requests == 1)
        .map(|r| sketched(r.latency_ms))
        .collect();
    latencies.sort_unstable();
    let ranks: Vec<i64> = (1..=latencies.len() as i64 + 1).collect();
    let got = rollups::latency_at_ranks(&window, &ranks);
    let want: Vec<(i64, i64)> = latencies
        .iter()
        .enumerate()
        .map(|(i, l)| (i as i64 + 1, *l))
        .collect();
    assert_eq!(got, want, "latency ranks in [{since}, {until}]");

    for workload in ["chat", "rag", "nightly-eval"] {
        let mut tokens: Vec<i64> = in_window()
            .filter(|r| r.requests == 1 && r.workload == workload)
            .map(|r| sketched(r.completion_tokens))
            .collect();
        tokens.sort_unstable();
        let wanted: Vec<CompletionRank> = (1..=tokens.len() as i64 + 1)
            .map(|rank| CompletionRank {
                workload: workload.into(),
                rank,
            })
            .collect();
        let got = rollups::completion_at_ranks(&window, &wanted);
        let want: Vec<(String, i64)> = tokens.iter().map(|t| (workload.into(), *t)).collect();
        assert_eq!(
            got, want,
            "{workload} completion ranks in [{since}, {until}]"
        );
    }

    let query = SavingsQuery {
        rates: vec![RepricingRate {
            model: "gpt-4o".into(),
            input_per_mtok: 0.15,
            output_per_mtok: 0.6,
        }],
        caps: vec![OutputCap {
            workload: "rag".into(),
            cap: 1000,
        }],
    };
    let got = rollups::savings_of(&window, &query);
    let mut routed: BTreeMap<String, (i64, i64, i64, f64)> = BTreeMap::new();
    let mut capped: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for r in in_window() {
        if r.model == "gpt-4o"
            && r.prompt_tokens < r.requests * 600
            && r.completion_tokens < r.requests * 150
        {
            let s = routed.entry(r.workload.clone()).or_default();
            s.0 += r.requests;
            s.1 += r.prompt_tokens;
            s.2 += r.completion_tokens;
            s.3 += r.cost_usd;
        }
        if r.workload == "rag"
            && r.requests > 0
            && sketched(r.completion_tokens / r.requests) > 1000
        {
            let c = capped.entry(r.model.clone()).or_default();
            c.0 += r.requests;
            c.1 += r.completion_tokens - 1000 * r.requests;
        }
    }
    for s in &got {
        match routed.get(&s.workload).filter(|_| s.model == "gpt-4o") {
            Some((requests, prompt, completion, cost)) => {
                let saved = cost - (*prompt as f64 * 0.15 + *completion as f64 * 0.6) / 1e6;
                if saved > 0.0 {
                    assert_eq!(s.routed_requests, *requests);
                    assert!(close(s.routing_savings_usd, saved, 1e-6));
                } else {
                    assert_eq!(s.routed_requests, 0);
                }
            }
            None => assert_eq!(s.routed_requests, 0, "{s:?}"),
        }
        let (requests, over) = if s.workload == "rag" {
            capped.get(&s.model).copied().unwrap_or_default()
        } else {
            (0, 0)
        };
        assert_eq!(
            (s.capped_requests, s.tokens_over_cap),
            (requests, over.max(0)),
            "{s:?}"
        );
    }
    let capped_groups = capped.values().filter(|c| c.0 > 0).count();
    assert_eq!(
        got.iter().filter(|s| s.capped_requests > 0).count(),
        capped_groups
    );
}

#[tokio::test]
async fn rollups_equal_the_rows_after_any_sequence_of_inserts_and_imports() {
    let database = test_database().await;
    let store = apex_server::open_store(&database.settings())
        .await
        .expect("open the store");
    let auth = authenticator(&store);
    for seed in [7_u64, 1_234_567, 0x00c0_ffee] {
        let (_, user) = auth
            .register(
                &format!("rollups-{seed}@example.com"),
                "a long password",
                None,
                None,
            )
            .await
            .unwrap();
        let users = UserStore::for_user(Arc::clone(&store), &user);
        let mut dice = Dice(seed);
        for _ in 0..24 {
            let batch: Vec<UsageRow> = (0..1 + dice.below(40))
                .map(|_| random_row(&mut dice))
                .collect();
            match dice.below(4) {
                0 | 1 => {
                    users.insert_usage(&batch).await.unwrap();
                }
                2 => {
                    let plan = ImportPlan {
                        quota: 1_000_000,
                        chunk_rows: 1 + dice.below(15) as usize,
                        now_ms: NOW,
                    };
                    users.import_usage(&batch, &plan).await.unwrap();
                }
                _ => {
                    // Two imports at once against a quota only one of them fits: at least
                    // one finds it exceeded after its chunks and takes them out again.
                    let stored = users.count_usage().await.unwrap();
                    let plan = ImportPlan {
                        quota: stored + batch.len() as u64 + 2,
                        chunk_rows: 3,
                        now_ms: NOW,
                    };
                    let (a, b) = tokio::join!(
                        users.import_usage(&batch, &plan),
                        users.import_usage(&batch, &plan)
                    );
                    a.unwrap();
                    b.unwrap();
                }
            }
            let rows = users.usage_rows_since(i64::MIN).await.unwrap();
            // Whole days only (rollups alone), cut days (rollups and edge rows), one day's
            // part, and everything. No row is dated after NOW, so a window ending at NOW
            // takes its last day whole from the rollups, and one starting after NOW finds
            // its first day empty without reading rows (as a run's reads do).
            let day = NOW.div_euclid(DAY_MS);
            let cut = NOW - dice.below(3 * DAY_MS as u64);
            for (since, until) in [
                ((day - 6) * DAY_MS, (day - 1) * DAY_MS - 1),
                (NOW - 7 * DAY_MS + dice.below(DAY_MS as u64), cut),
                (cut - 3_600_000, cut),
                (NOW - 7 * DAY_MS + dice.below(DAY_MS as u64), NOW),
                (cut, i64::MAX),
                (NOW + 1, i64::MAX),
                (i64::MIN, i64::MAX),
            ] {
                assert_rollups_match_rows(&users, &rows, since, until).await;
            }
            // No row is dated after NOW: a window ending then knows it from the rollups.
            let (_, after) = users
                .usage_window_and_after(NOW - DAY_MS, NOW, Sketches::default())
                .await
                .unwrap();
            assert_eq!(after.map(|a| a.groups.len()), Some(0));
        }
    }
}

/// Runs `sql` on the test database directly, as an older version of Apex left it.
async fn execute_raw(url: &str, sql: &str) {
    if url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::SqlitePool::connect(url).await.unwrap();
        sqlx::raw_sql(sql).execute(&pool).await.unwrap();
        pool.close().await;
    }
}

#[tokio::test]
async fn rows_stored_before_the_rollups_existed_are_folded_once_at_the_next_open() {
    let database = test_database().await;
    let settings = database.settings();
    let store = apex_server::open_store(&settings).await.unwrap();
    let (_, user) = authenticator(&store)
        .register("backfill@example.com", "a long password", None, None)
        .await
        .unwrap();
    let mut dice = Dice(99);
    let rows: Vec<UsageRow> = (0..300).map(|_| random_row(&mut dice)).collect();
    let users = UserStore::for_user(Arc::clone(&store), &user);
    users.insert_usage(&rows).await.unwrap();
    drop(users);
    drop(store);
    // The state migration 0016 finds: rows, no rollups, the backfill marker.
    let url = settings.database_url();
    execute_raw(
        url.expose(),
        "DELETE FROM usage_rollups; INSERT INTO usage_rollup_backfill (id) VALUES (1);",
    )
    .await;
    // Two instances opening at once fold the rows once between them.
    let (a, b) = tokio::join!(
        apex_server::open_store(&settings),
        apex_server::open_store(&settings)
    );
    let (store, _other) = (a.unwrap(), b.unwrap());
    let users = UserStore::for_user(Arc::clone(&store), &user);
    let stored = users.usage_rows_since(i64::MIN).await.unwrap();
    assert_eq!(
        stored.len(),
        rows.iter().filter(|r| r.source_ref.is_none()).count() + {
            let refs: BTreeSet<_> = rows
                .iter()
                .filter_map(|r| r.source_ref.as_ref().map(|s| (&r.source, s)))
                .collect();
            refs.len()
        }
    );
    assert_rollups_match_rows(&users, &stored, i64::MIN, i64::MAX).await;
    let day = NOW.div_euclid(DAY_MS);
    assert_rollups_match_rows(&users, &stored, (day - 8) * DAY_MS, day * DAY_MS - 1).await;
}
