//! Per-user rollups of the usage rows: what the analysis of a run reads instead of the rows.
//!
//! Why: a run's analysis asked the database for six aggregates over the user's window, and
//! each one rescanned the window's rows (about 1,800 for a month of demo data, tens of
//! thousands for a busy gateway user). The figures only need sums per day and two
//! distributions, so the store keeps a [`Group`] per (UTC day, provider, model, workload,
//! source) as the rows arrive: requests, errors, tokens by class, cost, the latest row's
//! time, the same sums over the *short* requests (fewer than [`SHORT_PROMPT_TOKENS`] prompt
//! and [`SHORT_COMPLETION_TOKENS`] completion tokens a request, which the routing
//! simulation reprices), and two sketches: single requests per latency [`bucket`], and per
//! bucket of completion tokens per request the single requests ranked (for a workload's
//! cap) and all requests with their tokens (for what a cap would cut). A month of a user's
//! usage is a few rows per day, whatever the number of requests.
//!
//! This module owns the engine-independent part: folding rows into a [`Rollup`], merging,
//! the sketches' stored form, and reading figures off a rollup. `rollups_sql` (a child of
//! `shared`) stores what rows add or take away in the same transaction as the rows, so
//! rollups and rows never disagree, and reads a window: whole days from the rollups, the
//! partial days at its edges from the rows themselves, folded with the same code.
//!
//! Sums (requests, tokens, counts, dates) are exact. Money is a `DOUBLE PRECISION` added
//! as rows arrive; it is reported to the micro-dollar. Percentiles are read off the
//! sketches: exact below [`EXACT_BELOW`], and within [`SKETCH_RELATIVE_ERROR`] above.

use std::collections::{BTreeMap, HashMap};

use crate::records::{
    CompletionRank, SavingsQuery, SavingsTotals, UsageDayTotals, UsageRow, UsageTotals,
};

/// Requests with fewer prompt tokens than this (per request) are short enough to route to
/// a model's cheaper alternative.
pub const SHORT_PROMPT_TOKENS: i64 = 600;
/// ...and fewer completion tokens than this.
pub const SHORT_COMPLETION_TOKENS: i64 = 150;

/// Values below this have a bucket of their own (their percentile is exact).
pub const EXACT_BELOW: i64 = 128;
/// Ratio of a bucket's upper to lower bound above [`EXACT_BELOW`].
const GAMMA: f64 = 1.02;
/// The largest relative difference between a value and its bucket's [`representative`]: half
/// a bucket's width (under 1%), plus rounding to a whole number.
pub const SKETCH_RELATIVE_ERROR: f64 = 0.015;

const DAY_MS: i64 = 24 * 3600 * 1000;

/// The UTC day of the instant `ts_ms`: days since 1970-01-01, also before it.
pub fn day_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(DAY_MS)
}

/// The sketch bucket of `value` (negative values count as 0).
pub fn bucket(value: i64) -> i64 {
    if value < EXACT_BELOW {
        return value.max(0);
    }
    let steps = ((value as f64) / (EXACT_BELOW as f64)).ln() / GAMMA.ln();
    EXACT_BELOW + steps.floor() as i64
}

/// The value a bucket stands for: itself below [`EXACT_BELOW`], else the middle of its
/// bounds (so within [`SKETCH_RELATIVE_ERROR`] of every value in it).
pub fn representative(bucket: i64) -> i64 {
    if bucket < EXACT_BELOW {
        return bucket;
    }
    let lower = EXACT_BELOW as f64 * GAMMA.powf((bucket - EXACT_BELOW) as f64);
    (lower * (1.0 + GAMMA) / 2.0).round() as i64
}

/// The key of a [`Group`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub day: i64,
    pub provider: String,
    pub model: String,
    pub workload: String,
    pub source: String,
}

/// The sums of a (day, provider, model, workload, source).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    /// Usage rows folded in (a bucket row of a provider export is one row).
    pub rows: i64,
    pub requests: i64,
    /// Requests whose status is not `ok`.
    pub errors: i64,
    /// Requests with a latency of their own (rows of one request).
    pub timed_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_usd: f64,
    /// When the latest row is dated.
    pub last_ts_ms: i64,
    /// The same sums over the short rows (see [`is_short`]).
    pub short_requests: i64,
    pub short_prompt_tokens: i64,
    pub short_completion_tokens: i64,
    pub short_cost_usd: f64,
    /// Single requests per latency bucket.
    pub latency: Sketch<i64>,
    /// Per bucket of completion tokens per request (rows of no request are left out).
    pub completion: Sketch<CompletionBucket>,
}

/// A sketch: a value per bucket, by bucket. A sorted vector rather than a map: a window
/// read parses a hundred or more groups' sketches of a dozen buckets each, stored in
/// bucket order, so each is built by appending, and most are only read in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sketch<V>(Vec<(i64, V)>);

impl<V> Default for Sketch<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V: Default> Sketch<V> {
    /// The value of `bucket`, added (as the default) if the sketch has none.
    pub fn entry(&mut self, bucket: i64) -> &mut V {
        // Buckets usually arrive in order: the last one, or a new one past it.
        let at = match self.0.last() {
            Some((last, _)) if *last == bucket => self.0.len() - 1,
            Some((last, _)) if *last > bucket => {
                match self.0.binary_search_by_key(&bucket, |(b, _)| *b) {
                    Ok(at) => at,
                    Err(at) => {
                        self.0.insert(at, (bucket, V::default()));
                        at
                    }
                }
            }
            _ => {
                self.0.push((bucket, V::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[at].1
    }

    /// Sets `bucket`'s value.
    pub fn insert(&mut self, bucket: i64, value: V) {
        *self.entry(bucket) = value;
    }
}

impl<V> Sketch<V> {
    /// Takes `bucket` out.
    pub fn remove(&mut self, bucket: i64) {
        if let Ok(at) = self.0.binary_search_by_key(&bucket, |(b, _)| *b) {
            self.0.remove(at);
        }
    }

    /// (bucket, value) by bucket.
    pub fn iter(&self) -> impl Iterator<Item = (&i64, &V)> {
        self.0.iter().map(|(bucket, value)| (bucket, value))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}

impl<'a, V> IntoIterator for &'a Sketch<V> {
    type Item = (&'a i64, &'a V);
    type IntoIter =
        std::iter::Map<std::slice::Iter<'a, (i64, V)>, fn(&'a (i64, V)) -> (&'a i64, &'a V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(bucket, value)| (bucket, value))
    }
}

/// A completion sketch's bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompletionBucket {
    /// Single requests in it: the population a workload's cap is ranked in.
    pub ranked: i64,
    /// Requests of every row in it (a bucket row by its tokens per request).
    pub requests: i64,
    pub completion_tokens: i64,
}

/// Folded usage rows of one user: whole days from the store, or rows folded in memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollup {
    pub groups: BTreeMap<GroupKey, Group>,
}

/// Whether `row` is short: its tokens per request are under both thresholds. The test is
/// on the row's totals, so a bucket row of `n` requests is judged by its average.
pub fn is_short(row: &UsageRow) -> bool {
    row.prompt_tokens < row.requests.saturating_mul(SHORT_PROMPT_TOKENS)
        && row.completion_tokens < row.requests.saturating_mul(SHORT_COMPLETION_TOKENS)
}

impl Rollup {
    /// The rollup of `rows`.
    pub fn of<'a>(rows: impl IntoIterator<Item = &'a UsageRow>) -> Self {
        let mut rollup = Self::default();
        for row in rows {
            rollup.add(row);
        }
        rollup
    }

    /// Folds one row in.
    pub fn add(&mut self, row: &UsageRow) {
        let day = day_of(row.ts_ms);
        let key = GroupKey {
            day,
            provider: row.provider.clone(),
            model: row.model.clone(),
            workload: row.workload.clone(),
            source: row.source.clone(),
        };
        let single = row.requests == 1;
        let fresh = Group {
            last_ts_ms: row.ts_ms,
            ..Group::default()
        };
        let group = self.groups.entry(key).or_insert(fresh);
        group.rows += 1;
        group.requests += row.requests;
        if row.status != "ok" {
            group.errors += row.requests;
        }
        group.timed_requests += i64::from(single);
        group.prompt_tokens += row.prompt_tokens;
        group.completion_tokens += row.completion_tokens;
        group.cached_tokens += row.cached_tokens;
        group.reasoning_tokens += row.reasoning_tokens;
        group.cost_usd += row.cost_usd;
        group.last_ts_ms = group.last_ts_ms.max(row.ts_ms);
        if is_short(row) {
            group.short_requests += row.requests;
            group.short_prompt_tokens += row.prompt_tokens;
            group.short_completion_tokens += row.completion_tokens;
            group.short_cost_usd += row.cost_usd;
        }
        if single {
            *group.latency.entry(bucket(row.latency_ms)) += 1;
        }
        // A row of no request (Anthropic's report counts none) has no tokens per request:
        // it is neither ranked nor ever over a cap.
        if row.requests > 0 {
            let b = group
                .completion
                .entry(bucket(row.completion_tokens / row.requests));
            b.ranked += i64::from(single);
            b.requests += row.requests;
            b.completion_tokens += row.completion_tokens;
        }
    }

    /// Adds `other`'s figures to these (rollups of disjoint rows).
    pub fn merge(&mut self, other: Rollup) {
        for (key, g) in other.groups {
            match self.groups.get_mut(&key) {
                None => {
                    self.groups.insert(key, g);
                }
                Some(mine) => mine.absorb(&g, 1),
            }
        }
    }

    /// The latency sketch over every group: single requests per bucket, by bucket.
    pub fn latency_sketch(&self) -> BTreeMap<i64, i64> {
        let mut entries: Vec<(i64, i64)> = self
            .groups
            .values()
            .flat_map(|g| g.latency.iter().map(|(bucket, count)| (*bucket, *count)))
            .collect();
        summed_by_key(&mut entries)
    }

    /// The completion sketch of each workload over every group: ranked single requests per
    /// bucket.
    pub fn completion_ranked(&self) -> BTreeMap<&str, BTreeMap<i64, i64>> {
        // Entries per workload first (a handful of workloads), so the sorting compares
        // buckets, not workload names.
        let mut per_workload: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
        for (key, g) in &self.groups {
            let entries = per_workload.entry(key.workload.as_str()).or_default();
            entries.extend(
                g.completion
                    .iter()
                    .filter(|(_, b)| b.ranked > 0)
                    .map(|(bucket, b)| (*bucket, b.ranked)),
            );
        }
        per_workload
            .into_iter()
            .filter(|(_, entries)| !entries.is_empty())
            .map(|(workload, mut entries)| (workload, summed_by_key(&mut entries)))
            .collect()
    }
}

/// `entries` summed per key, as a map. Sorting once and building the map from its sorted
/// entries is cheaper than an insert per entry: a month's window has a thousand or more
/// (group, bucket) entries.
fn summed_by_key<K: Ord + Copy>(entries: &mut [(K, i64)]) -> BTreeMap<K, i64> {
    entries.sort_unstable_by_key(|a| a.0);
    let mut summed: Vec<(K, i64)> = Vec::with_capacity(entries.len());
    for &(key, value) in entries.iter() {
        match summed.last_mut() {
            Some((last, total)) if *last == key => *total += value,
            _ => summed.push((key, value)),
        }
    }
    summed.into_iter().collect()
}

impl Group {
    /// Adds `other`'s sums to these (`sign` 1), or takes them away (`sign` -1): what rows
    /// add when they are stored, and take away when they are deleted. Taking rows away
    /// cannot lower the latest time; the store recomputes it from the rows left.
    pub fn absorb(&mut self, other: &Group, sign: i64) {
        self.rows += sign * other.rows;
        self.requests += sign * other.requests;
        self.errors += sign * other.errors;
        self.timed_requests += sign * other.timed_requests;
        self.prompt_tokens += sign * other.prompt_tokens;
        self.completion_tokens += sign * other.completion_tokens;
        self.cached_tokens += sign * other.cached_tokens;
        self.reasoning_tokens += sign * other.reasoning_tokens;
        self.cost_usd += sign as f64 * other.cost_usd;
        if sign > 0 {
            self.last_ts_ms = self.last_ts_ms.max(other.last_ts_ms);
        }
        self.short_requests += sign * other.short_requests;
        self.short_prompt_tokens += sign * other.short_prompt_tokens;
        self.short_completion_tokens += sign * other.short_completion_tokens;
        self.short_cost_usd += sign as f64 * other.short_cost_usd;
        for (bucket, count) in &other.latency {
            let mine = self.latency.entry(*bucket);
            *mine += sign * count;
            if *mine == 0 {
                self.latency.remove(*bucket);
            }
        }
        for (bucket, b) in &other.completion {
            let mine = self.completion.entry(*bucket);
            mine.ranked += sign * b.ranked;
            mine.requests += sign * b.requests;
            mine.completion_tokens += sign * b.completion_tokens;
            if *mine == CompletionBucket::default() {
                self.completion.remove(*bucket);
            }
        }
    }

    /// The latency sketch as stored: `bucket:count` pairs by bucket, comma-separated.
    pub fn latency_text(&self) -> String {
        let pairs: Vec<String> = self
            .latency
            .iter()
            .map(|(bucket, count)| format!("{bucket}:{count}"))
            .collect();
        pairs.join(",")
    }

    /// The completion sketch as stored: `bucket:ranked:requests:tokens` by bucket.
    pub fn completion_text(&self) -> String {
        let entries: Vec<String> = self
            .completion
            .iter()
            .map(|(bucket, b)| {
                format!(
                    "{bucket}:{}:{}:{}",
                    b.ranked, b.requests, b.completion_tokens
                )
            })
            .collect();
        entries.join(",")
    }

    /// Reads the stored sketches back (see [`Group::latency_text`]); `None` when either is
    /// not in that form (corrupt data). Each sketch's room is reserved once and its text
    /// read in one pass ([`read_entries`]): a window read parses one entry per (group,
    /// bucket).
    pub fn read_sketches(&mut self, latency: &str, completion: &str) -> Option<()> {
        self.latency.0.reserve(entry_count(latency));
        read_entries(latency, |[bucket, count]| {
            self.latency.insert(bucket, count)
        })?;
        self.completion.0.reserve(entry_count(completion));
        read_entries(
            completion,
            |[bucket, ranked, requests, completion_tokens]| {
                let b = CompletionBucket {
                    ranked,
                    requests,
                    completion_tokens,
                };
                self.completion.insert(bucket, b);
            },
        )
    }
}

/// How many entries a stored sketch holds at most (its commas and one), to reserve for.
fn entry_count(text: &str) -> usize {
    if text.is_empty() {
        0
    } else {
        text.bytes().filter(|&b| b == b',').count() + 1
    }
}

/// Hands each entry of a stored sketch, `N` integers joined by `:`, entries joined by `,`
/// (empty entries skipped), to `each`; `None` at the first entry not in that form.
///
/// A window read parses one entry per (group, bucket), a thousand or more per run, so this
/// walks the bytes once instead of splitting twice and parsing each piece.
fn read_entries<const N: usize>(text: &str, mut each: impl FnMut([i64; N])) -> Option<()> {
    let mut bytes = text.as_bytes();
    while !bytes.is_empty() {
        if bytes[0] == b',' {
            bytes = &bytes[1..];
            continue;
        }
        let mut entry = [0i64; N];
        for (i, slot) in entry.iter_mut().enumerate() {
            let (value, rest) = read_integer(bytes)?;
            *slot = value;
            bytes = match (rest.first(), i + 1 == N) {
                (Some(b':'), false) => &rest[1..],
                (None, true) => rest,
                (Some(b','), true) => &rest[1..],
                _ => return None,
            };
        }
        each(entry);
    }
    Some(())
}

/// The decimal integer at the start of `bytes` (an optional sign, then digits, as `i64`'s
/// `FromStr` reads it) and what follows it; `None` when there is none or it overflows.
fn read_integer(bytes: &[u8]) -> Option<(i64, &[u8])> {
    let (negative, digits) = match bytes.first() {
        Some(b'-') => (true, &bytes[1..]),
        Some(b'+') => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    if end == 0 {
        return None;
    }
    let mut value: i64 = 0;
    for &d in &digits[..end] {
        let d = i64::from(d - b'0');
        // Accumulated negatively when negative, so that i64::MIN reads back.
        value = value
            .checked_mul(10)?
            .checked_add(if negative { -d } else { d })?;
    }
    Some((value, &digits[end..]))
}

/// The representative value at the 1-based `rank` of a sketch (bucket → count), or `None`
/// past its last value.
pub fn value_at_rank(sketch: &BTreeMap<i64, i64>, rank: i64) -> Option<i64> {
    let mut seen = 0;
    for (bucket, count) in sketch {
        seen += count;
        if seen >= rank {
            return Some(representative(*bucket));
        }
    }
    None
}

/// Which sketches a window read decodes (each is text to parse per group; the totals and
/// the daily series need neither).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sketches {
    pub latency: bool,
    pub completion: bool,
}

/// Totals per (provider, model, workload, source) of `window`, in that order; each group's
/// days are added in date order, so a read of the same rows always gives the same sums.
pub fn totals(window: &Rollup) -> Vec<UsageTotals> {
    let mut totals: BTreeMap<(&str, &str, &str, &str), UsageTotals> = BTreeMap::new();
    for (key, g) in &window.groups {
        let total = totals
            .entry((&key.provider, &key.model, &key.workload, &key.source))
            .or_insert_with(|| UsageTotals {
                provider: key.provider.clone(),
                model: key.model.clone(),
                workload: key.workload.clone(),
                source: key.source.clone(),
                requests: 0,
                errors: 0,
                timed_requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
                reasoning_tokens: 0,
                cost_usd: 0.0,
                last_ts_ms: g.last_ts_ms,
            });
        total.requests += g.requests;
        total.errors += g.errors;
        total.timed_requests += g.timed_requests;
        total.prompt_tokens += g.prompt_tokens;
        total.completion_tokens += g.completion_tokens;
        total.cached_tokens += g.cached_tokens;
        total.reasoning_tokens += g.reasoning_tokens;
        total.cost_usd += g.cost_usd;
        total.last_ts_ms = total.last_ts_ms.max(g.last_ts_ms);
    }
    totals.into_values().collect()
}

/// Requests and spend per (UTC day, model) of `window`.
pub fn daily(window: &Rollup) -> Vec<UsageDayTotals> {
    let mut days: BTreeMap<(i64, &str), UsageDayTotals> = BTreeMap::new();
    for (key, g) in &window.groups {
        let day = days
            .entry((key.day, &key.model))
            .or_insert_with(|| UsageDayTotals {
                day: key.day,
                model: key.model.clone(),
                requests: 0,
                cost_usd: 0.0,
            });
        day.requests += g.requests;
        day.cost_usd += g.cost_usd;
    }
    days.into_values().collect()
}

/// The latency at each 1-based rank among `window`'s single requests ordered by latency,
/// as (rank, latency); ranks past the last request have none. Needs the latency sketches.
pub fn latency_at_ranks(window: &Rollup, ranks: &[i64]) -> Vec<(i64, i64)> {
    let sketch = window.latency_sketch();
    ranks
        .iter()
        .filter_map(|rank| Some((*rank, value_at_rank(&sketch, *rank)?)))
        .collect()
}

/// For each wanted (workload, rank), the completion tokens at that rank among the
/// workload's single requests, as (workload, tokens); ranks past the last request have
/// none. Needs the completion sketches.
pub fn completion_at_ranks(window: &Rollup, wanted: &[CompletionRank]) -> Vec<(String, i64)> {
    let sketches = window.completion_ranked();
    wanted
        .iter()
        .filter_map(|w| {
            let tokens = value_at_rank(sketches.get(w.workload.as_str())?, w.rank)?;
            Some((w.workload.clone(), tokens))
        })
        .collect()
}

/// Routing and output-cap figures per (workload, model) of `window` (see [`SavingsQuery`]);
/// groups with neither are left out. Needs the completion sketches.
///
/// Routing reprices a (workload, model)'s short requests together at the cheaper model's
/// rates and counts them when that saves money. A cap counts the requests whose bucket of
/// completion tokens per request stands above the workload's cap, and the tokens past it.
pub fn savings_of(window: &Rollup, query: &SavingsQuery) -> Vec<SavingsTotals> {
    let rates: BTreeMap<&str, (f64, f64)> = query
        .rates
        .iter()
        .map(|r| (r.model.as_str(), (r.input_per_mtok, r.output_per_mtok)))
        .collect();
    let caps: BTreeMap<&str, i64> = query
        .caps
        .iter()
        .map(|c| (c.workload.as_str(), c.cap))
        .collect();
    // Short requests, prompt and completion tokens and cost per (workload, model).
    let mut short: BTreeMap<(&str, &str), (i64, i64, i64, f64)> = BTreeMap::new();
    for (key, g) in &window.groups {
        if g.short_requests > 0 && rates.contains_key(key.model.as_str()) {
            let s = short
                .entry((key.workload.as_str(), key.model.as_str()))
                .or_default();
            s.0 += g.short_requests;
            s.1 += g.short_prompt_tokens;
            s.2 += g.short_completion_tokens;
            s.3 += g.short_cost_usd;
        }
    }
    let mut found: BTreeMap<(&str, &str), SavingsTotals> = BTreeMap::new();
    let entry = |workload: &str, model: &str| -> SavingsTotals {
        SavingsTotals {
            workload: workload.to_string(),
            model: model.to_string(),
            routed_requests: 0,
            routing_savings_usd: 0.0,
            capped_requests: 0,
            tokens_over_cap: 0,
        }
    };
    for ((workload, model), (requests, prompt, completion, cost)) in short {
        let (input, output) = rates[model];
        let saved = cost - (prompt as f64 * input + completion as f64 * output) / 1_000_000.0;
        if saved > 0.0 {
            let totals = found
                .entry((workload, model))
                .or_insert_with(|| entry(workload, model));
            totals.routed_requests = requests;
            totals.routing_savings_usd = saved;
        }
    }
    for (key, g) in &window.groups {
        let Some(&cap) = caps.get(key.workload.as_str()) else {
            continue;
        };
        for (bucket, b) in &g.completion {
            if representative(*bucket) <= cap {
                continue;
            }
            let totals = found
                .entry((key.workload.as_str(), key.model.as_str()))
                .or_insert_with(|| entry(&key.workload, &key.model));
            totals.capped_requests += b.requests;
            totals.tokens_over_cap += b.completion_tokens - cap * b.requests;
        }
    }
    // A bucket straddling the cap may hold requests just under it; summed over the whole
    // group the tokens past the cap cannot be negative.
    for totals in found.values_mut() {
        totals.tokens_over_cap = totals.tokens_over_cap.max(0);
    }
    found.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_values_are_exact_and_large_ones_within_the_stated_error() {
        for value in 0..EXACT_BELOW {
            assert_eq!(representative(bucket(value)), value);
        }
        let mut value = EXACT_BELOW;
        while value < 100_000_000 {
            let shown = representative(bucket(value));
            let error = (shown - value).abs() as f64 / value as f64;
            assert!(
                error <= SKETCH_RELATIVE_ERROR,
                "{value} shown as {shown} ({error})"
            );
            value += 1 + value / 997;
        }
    }

    #[test]
    fn buckets_keep_the_order_of_values() {
        let mut last = bucket(0);
        for value in 1..2_000_000 {
            let b = bucket(value);
            assert!(b >= last, "bucket({value}) = {b} < {last}");
            last = b;
        }
    }

    #[test]
    fn days_are_floors_also_before_1970() {
        assert_eq!(day_of(0), 0);
        assert_eq!(day_of(DAY_MS - 1), 0);
        assert_eq!(day_of(-1), -1);
        assert_eq!(day_of(-DAY_MS), -1);
    }

    #[test]
    fn a_rollup_of_two_halves_is_the_rollup_of_the_whole() {
        let rows: Vec<UsageRow> = (0..40)
            .map(|i| UsageRow {
                provider: "openai".into(),
                model: if i % 3 == 0 { "gpt-4o" } else { "gpt-4o-mini" }.into(),
                workload: if i % 2 == 0 { "chat" } else { "rag" }.into(),
                ts_ms: i * 7_200_000,
                prompt_tokens: 100 + i * 31,
                completion_tokens: 20 + i * 13,
                latency_ms: 50 + i * 97,
                status: if i % 5 == 0 { "error" } else { "ok" }.into(),
                cost_usd: 0.25 * i as f64,
                requests: if i % 7 == 0 { 3 } else { 1 },
                ..UsageRow::default()
            })
            .collect();
        let whole = Rollup::of(&rows);
        let mut halves = Rollup::of(&rows[..17]);
        halves.merge(Rollup::of(&rows[17..]));
        assert_eq!(halves, whole);
        let requests: i64 = whole.groups.values().map(|g| g.requests).sum();
        assert_eq!(requests, rows.iter().map(|r| r.requests).sum::<i64>());
        let ranked: i64 = whole.latency_sketch().values().sum();
        assert_eq!(
            ranked,
            rows.iter().filter(|r| r.requests == 1).count() as i64
        );
    }

    #[test]
    fn a_sketch_keeps_its_buckets_in_order_whatever_order_they_come_in() {
        let mut sketch = Sketch::<i64>::default();
        let mut model = BTreeMap::new();
        // In order, repeated, before the first, between two, and taken out again.
        for (bucket, add) in [
            (5, 1),
            (9, 2),
            (9, 1),
            (2, 4),
            (7, 1),
            (5, 3),
            (12, 1),
            (0, 2),
        ] {
            *sketch.entry(bucket) += add;
            *model.entry(bucket).or_insert(0) += add;
        }
        sketch.remove(7);
        model.remove(&7);
        sketch.remove(100);
        let read: Vec<(i64, i64)> = sketch.iter().map(|(b, v)| (*b, *v)).collect();
        let expected: Vec<(i64, i64)> = model.into_iter().collect();
        assert_eq!(read, expected);
        sketch.clear();
        assert!(sketch.is_empty());
    }

    #[test]
    fn sketches_read_back_as_stored() {
        let rows: Vec<UsageRow> = (0..30)
            .map(|i| UsageRow {
                latency_ms: i * 311,
                completion_tokens: i * i * 17,
                requests: 1 + i % 2,
                ..UsageRow::default()
            })
            .collect();
        let rollup = Rollup::of(&rows);
        let group = rollup.groups.values().next().unwrap();
        let mut read = Group::default();
        read.read_sketches(&group.latency_text(), &group.completion_text())
            .unwrap();
        assert_eq!(read.latency, group.latency);
        assert_eq!(read.completion, group.completion);
        assert!(Group::default().read_sketches("1:2:3", "").is_none());
        assert!(Group::default().read_sketches("x:1", "").is_none());
        // Taking the rows away again leaves nothing.
        let mut emptied = group.clone();
        emptied.absorb(group, -1);
        assert!(emptied.latency.is_empty() && emptied.completion.is_empty());
        assert_eq!(emptied.rows, 0);
    }

    /// The byte-wise reader takes exactly what splitting and `i64::from_str` take.
    #[test]
    fn stored_entries_read_as_split_and_parsed() {
        fn by_splitting(text: &str) -> Option<Vec<[i64; 2]>> {
            let mut out = Vec::new();
            for entry in text.split(',').filter(|e| !e.is_empty()) {
                let mut parts = entry.split(':');
                let a = parts.next()?.parse().ok()?;
                let b = parts.next()?.parse().ok()?;
                if parts.next().is_some() {
                    return None;
                }
                out.push([a, b]);
            }
            Some(out)
        }
        let texts = [
            "",
            ",",
            "1:2",
            "1:2,,3:4,",
            ",5:6",
            "-7:+8",
            "9223372036854775807:-9223372036854775808",
            "9223372036854775808:1",
            "1:-9223372036854775809",
            "1:2:3",
            "1:",
            ":1",
            "1",
            "1:2;3:4",
            " 1:2",
            "1:2 ",
            "-:1",
            "1:2,x",
        ];
        for text in texts {
            let mut read = Vec::new();
            let outcome = read_entries(text, |entry: [i64; 2]| read.push(entry));
            assert_eq!(outcome.map(|()| read), by_splitting(text), "{text:?}");
        }
    }

    #[test]
    fn ranks_read_the_bucket_holding_them() {
        let sketch: BTreeMap<i64, i64> = [(3, 2), (10, 1), (bucket(1000), 4)].into();
        assert_eq!(value_at_rank(&sketch, 1), Some(3));
        assert_eq!(value_at_rank(&sketch, 2), Some(3));
        assert_eq!(value_at_rank(&sketch, 3), Some(10));
        assert_eq!(
            value_at_rank(&sketch, 7),
            Some(representative(bucket(1000)))
        );
        assert_eq!(value_at_rank(&sketch, 8), None);
    }
}
