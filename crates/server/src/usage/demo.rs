//! Demo usage data: 30 days of plausible LLM calls for a new account.
//!
//! Deterministic from the user id (same id, same rows) and different between users, so the
//! golden path shows each person numbers of their own and tests can tell users apart by them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::price_book::PriceBook;
use crate::ids::UserId;
use crate::store::UsageRow;

struct WorkloadTemplate {
    name: &'static str,
    models: &'static [(&'static str, &'static str)],
    prompt_tokens: (i64, i64),
    completion_tokens: (i64, i64),
    calls_per_day: (u32, u32),
}

const WORKLOADS: &[WorkloadTemplate] = &[
    WorkloadTemplate {
        name: "support-chat",
        models: &[("openai", "gpt-4o"), ("anthropic", "claude-3-5-sonnet")],
        prompt_tokens: (400, 1600),
        completion_tokens: (120, 400),
        calls_per_day: (8, 20),
    },
    WorkloadTemplate {
        name: "email-classifier",
        models: &[("openai", "gpt-4o"), ("openai", "gpt-4.1")],
        prompt_tokens: (150, 450),
        completion_tokens: (5, 30),
        calls_per_day: (10, 25),
    },
    WorkloadTemplate {
        name: "rag-assistant",
        models: &[
            ("anthropic", "claude-3-5-sonnet"),
            ("google", "gemini-1.5-pro"),
        ],
        prompt_tokens: (2500, 6000),
        completion_tokens: (200, 600),
        calls_per_day: (5, 15),
    },
    WorkloadTemplate {
        name: "nightly-doc-summaries",
        models: &[("openai", "gpt-4o"), ("anthropic", "claude-3-5-haiku")],
        prompt_tokens: (2000, 5000),
        completion_tokens: (300, 900),
        calls_per_day: (6, 14),
    },
    WorkloadTemplate {
        name: "code-review",
        models: &[("openai", "gpt-4.1"), ("anthropic", "claude-3-7-sonnet")],
        prompt_tokens: (1500, 4000),
        completion_tokens: (600, 2400),
        calls_per_day: (3, 10),
    },
    WorkloadTemplate {
        name: "search-rerank",
        models: &[("openai", "gpt-4o-mini"), ("google", "gemini-1.5-flash")],
        prompt_tokens: (600, 1400),
        completion_tokens: (20, 80),
        calls_per_day: (10, 30),
    },
];

/// The workload names demo data draws from (each user gets four of them).
pub fn workload_names() -> Vec<String> {
    WORKLOADS.iter().map(|w| w.name.to_string()).collect()
}

const DAY_MS: i64 = 24 * 3600 * 1000;

fn seed_for(user: UserId) -> u64 {
    let bytes = user.as_uuid().into_bytes();
    let (a, b) = bytes.split_at(8);
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(a);
    lo.copy_from_slice(b);
    u64::from_le_bytes(hi) ^ u64::from_le_bytes(lo).rotate_left(17)
}

/// Rows of the 30 days before `now_ms`. The oldest start an hour inside the window, so a
/// 30-day summary taken within the hour after registration counts every row.
pub fn generate(user: UserId, now_ms: i64, book: &PriceBook) -> Vec<UsageRow> {
    // A new account has no rates of its own: list prices.
    let prices = book.for_user(&[]);
    let mut rng = ChaCha8Rng::seed_from_u64(seed_for(user));
    // Each user runs four of the six workload kinds, each on one of its candidate models,
    // with a volume scale of their own.
    let mut chosen: Vec<&WorkloadTemplate> = WORKLOADS.iter().collect();
    while chosen.len() > 4 {
        let drop = rng.gen_range(0..chosen.len());
        chosen.remove(drop);
    }
    let scale: f64 = rng.gen_range(0.6..1.6);
    let start = now_ms - 30 * DAY_MS + 3600 * 1000;
    let mut rows = Vec::new();
    for workload in chosen {
        let (provider, model) = workload.models[rng.gen_range(0..workload.models.len())];
        let base_latency =
            if model.contains("mini") || model.contains("flash") || model.contains("haiku") {
                350
            } else {
                900
            };
        for day in 0..30 {
            let (lo, hi) = workload.calls_per_day;
            let calls = ((rng.gen_range(lo..=hi) as f64) * scale).round() as u32;
            for _ in 0..calls {
                let ts_ms = start + day * DAY_MS + rng.gen_range(0..DAY_MS - 3600 * 1000);
                let prompt_tokens =
                    rng.gen_range(workload.prompt_tokens.0..=workload.prompt_tokens.1);
                let completion_tokens =
                    rng.gen_range(workload.completion_tokens.0..=workload.completion_tokens.1);
                let latency_ms = base_latency + completion_tokens * rng.gen_range(8..20) / 2;
                let status = if rng.gen_bool(0.02) { "error" } else { "ok" };
                let mut row = UsageRow {
                    provider: provider.to_string(),
                    model: model.to_string(),
                    workload: workload.name.to_string(),
                    ts_ms: ts_ms.min(now_ms),
                    prompt_tokens,
                    completion_tokens,
                    latency_ms,
                    status: status.to_string(),
                    source: "demo".into(),
                    ..UsageRow::default()
                };
                // Every demo model is in the snapshot.
                let _ = prices.price_row(&mut row, false);
                rows.push(row);
            }
        }
    }
    rows.sort_by_key(|r| r.ts_ms);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_user_same_rows_different_users_different_rows() {
        let pricing = PriceBook::builtin(&crate::usage::pricing::PricingTable::builtin());
        let user = UserId::generate();
        let now = 1_790_000_000_000;
        let a = generate(user, now, &pricing);
        let b = generate(user, now, &pricing);
        assert_eq!(a, b);
        assert!(a.len() > 300, "a month of usage, got {}", a.len());
        let other = generate(UserId::generate(), now, &pricing);
        assert_ne!(a, other);
        assert!(a
            .iter()
            .all(|r| r.ts_ms > now - 30 * DAY_MS && r.ts_ms <= now));
        assert!(a
            .iter()
            .all(|r| r.cost_usd > 0.0 && r.price_version.is_some()));
    }
}
