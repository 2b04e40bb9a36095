//! How a cost was computed: the arithmetic behind one usage row, or behind a cell of the
//! usage summary (its rows grouped by the price version they were costed with), for
//! `GET /api/usage/explain`.
//!
//! A cell's rows are summed per class by the database and multiplied by the version's
//! rates here. Rates and costs are integers (see [`super::price_book`]), so the product of
//! summed tokens equals the sum of the rows' own costs exactly; `stored_cost_usd` is the
//! stored costs summed by the database, for comparison.

use apex_protocol::prices::{PriceGroup, UsageExplanation, UsageRowView};

use super::price_book::{cost, micro_of_pico, Quantities, UserPrices};
use crate::clock::ms_to_rfc3339;
use crate::store::{PriceVersionTotals, StoreResult, StoredUsageRow, UsageFilter};
use crate::user_store::UserStore;

/// A stored row as the API shows it.
pub fn row_view(stored: &StoredUsageRow) -> UsageRowView {
    let r = &stored.row;
    UsageRowView {
        id: stored.id,
        timestamp: ms_to_rfc3339(r.ts_ms),
        provider: r.provider.clone(),
        model: r.model.clone(),
        workload: r.workload.clone(),
        source: r.source.clone(),
        requests: r.requests,
        prompt_tokens: r.prompt_tokens,
        cached_tokens: r.cached_tokens,
        cache_write_tokens: r.cache_write_tokens,
        completion_tokens: r.completion_tokens,
        reasoning_tokens: r.reasoning_tokens,
        latency_ms: r.latency_ms,
        status: r.status.clone(),
        cost_usd: r.cost_usd,
        price_version: r.price_version.clone(),
    }
}

/// The arithmetic of one group of rows costed with `version`.
fn group(
    prices: &UserPrices<'_>,
    version: Option<&str>,
    rows: i64,
    quantities: Quantities,
    stored_cost_usd: f64,
) -> (PriceGroup, i128) {
    let entry = version.and_then(|v| prices.entry_by_version(v));
    match entry {
        Some(entry) => {
            let costing = cost(&entry.rates, &quantities);
            let group = PriceGroup {
                price_version: version.map(str::to_string),
                price: Some(entry.view()),
                rows,
                requests: quantities.requests,
                lines: costing.lines(),
                computed_cost_usd: costing.usd(),
                computed_cost_micro_usd: costing.micro_usd(),
                stored_cost_usd,
            };
            (group, costing.pico)
        }
        // Costs the source sent (or, for a version this server does not know, costs it
        // cannot recompute): the stored figure is all there is.
        None => {
            let pico = (stored_cost_usd * 1e12).round() as i128;
            let group = PriceGroup {
                price_version: version.map(str::to_string),
                price: None,
                rows,
                requests: quantities.requests,
                lines: Vec::new(),
                computed_cost_usd: stored_cost_usd,
                computed_cost_micro_usd: micro_of_pico(pico),
                stored_cost_usd,
            };
            (group, pico)
        }
    }
}

fn explanation(row: Option<UsageRowView>, groups: Vec<(PriceGroup, i128)>) -> UsageExplanation {
    let pico: i128 = groups.iter().map(|(_, p)| p).sum();
    let groups: Vec<PriceGroup> = groups.into_iter().map(|(g, _)| g).collect();
    UsageExplanation {
        row,
        rows: groups.iter().map(|g| g.rows).sum(),
        requests: groups.iter().map(|g| g.requests).sum(),
        computed_cost_usd: pico as f64 / 1e12,
        computed_cost_micro_usd: micro_of_pico(pico),
        // From +0.0: a sum of no floats is -0.0 in Rust.
        stored_cost_usd: groups.iter().fold(0.0, |sum, g| sum + g.stored_cost_usd),
        groups,
    }
}

/// The arithmetic of one stored row.
pub fn explain_row(prices: &UserPrices<'_>, stored: &StoredUsageRow) -> UsageExplanation {
    let r = &stored.row;
    let group = group(
        prices,
        r.price_version.as_deref(),
        1,
        Quantities::of_row(r),
        r.cost_usd,
    );
    explanation(Some(row_view(stored)), vec![group])
}

/// The arithmetic of the rows `filter` selects, per price version.
pub async fn explain_cell(
    store: &UserStore,
    prices: &UserPrices<'_>,
    filter: &UsageFilter,
) -> StoreResult<UsageExplanation> {
    let totals = store.usage_by_price_version(filter).await?;
    let groups = totals
        .iter()
        .map(|t: &PriceVersionTotals| {
            group(
                prices,
                t.price_version.as_deref(),
                t.rows,
                Quantities {
                    requests: t.requests,
                    prompt: t.prompt_tokens,
                    cached: t.cached_tokens,
                    cache_write: t.cache_write_tokens,
                    completion: t.completion_tokens,
                    reasoning: t.reasoning_tokens,
                },
                t.cost_usd,
            )
        })
        .collect();
    Ok(explanation(None, groups))
}
