//! The price book: which price costs a usage row, and the arithmetic of that cost.
//!
//! Every cost Apex computes goes through here, and every row it costs keeps the version
//! of the price used (`UsageRow::price_version`), so a later price (a new snapshot, a
//! user's negotiated rate) never rewrites a stored cost, and `GET /api/usage/explain`
//! can show `tokens × rate` for each class long after.
//!
//! - The built-in snapshot ([`PriceBook::builtin`]) is compiled in: the list prices of
//!   [`PricingTable`] with their cache rules, the earlier prices of models whose price
//!   changed, and models billed per request. Entries are never edited in place: a price
//!   change is a new entry with its effective date, so a version always means one thing.
//! - A user's overrides (negotiated rates, `POST /api/pricebook`) are stored per user and
//!   win over the built-in price from their effective date on ([`UserPrices`]).
//!
//! Rates are whole pico-dollars (1e-12 USD) per token or per request, and costs are
//! summed as integers, so a cost is exact and the same tokens always cost the same
//! micro-dollars, whether one row is explained or a thousand summed.

use apex_protocol::prices::{CostLine, PriceEntry as PriceEntryView, PriceOverrideInput};

use super::pricing::{cache_write_multiplier, names_model, PricingTable};
use crate::clock::ms_to_rfc3339;
use crate::store::{PriceOverrideRecord, UsageRow};

/// The name of the built-in snapshot, reported by `GET /api/pricebook`.
pub const SNAPSHOT: &str = "2026-12";

/// The price of Apex's embedded model: nothing per token. Rows of the pipeline's own
/// requests to it name this version.
pub const LOCAL_PRICE_VERSION: &str = "builtin:apex/local";

/// Pico-dollars per USD.
const PICO_PER_USD: f64 = 1e12;
/// Pico-dollars per token for a price of one USD per million tokens.
const PICO_PER_TOKEN_PER_USD_MTOK: f64 = 1e6;

/// Rates of one price, in pico-dollars per token (`request_fee`: per request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    pub input: i64,
    pub cached_input: i64,
    pub cache_write: i64,
    pub output: i64,
    pub reasoning: i64,
    pub request_fee: i64,
}

/// Pico-dollars per token of a rate in USD per million tokens (six decimals kept).
pub fn rate_of_usd_per_mtok(usd_per_mtok: f64) -> i64 {
    (usd_per_mtok * PICO_PER_TOKEN_PER_USD_MTOK).round() as i64
}

/// Pico-dollars of an amount in USD (a request fee).
pub fn pico_of_usd(usd: f64) -> i64 {
    (usd * PICO_PER_USD).round() as i64
}

/// Whether a price entry is built in or a user's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Builtin,
    Override { note: Option<String> },
}

/// One price: a model's rates from a date on.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceEntry {
    pub version: String,
    pub origin: Origin,
    pub provider: String,
    /// Lowercase, as matched by [`names_model`].
    pub model: String,
    /// From when the entry applies; 0 for the beginning.
    pub effective_from_ms: i64,
    pub rates: Rates,
    /// Off every rate for the provider's batch API (0.0 – 1.0), built-in entries only.
    pub batch_discount: f64,
}

impl PriceEntry {
    /// The entry for batch-API requests: every rate less the batch discount, as its own
    /// version (`…+batch`).
    pub fn batch(&self) -> PriceEntry {
        let keep = 1.0 - self.batch_discount;
        let scale = |rate: i64| (rate as f64 * keep).round() as i64;
        let r = self.rates;
        PriceEntry {
            version: format!("{}{BATCH_SUFFIX}", self.version),
            rates: Rates {
                input: scale(r.input),
                cached_input: scale(r.cached_input),
                cache_write: scale(r.cache_write),
                output: scale(r.output),
                reasoning: scale(r.reasoning),
                request_fee: scale(r.request_fee),
            },
            batch_discount: 0.0,
            ..self.clone()
        }
    }

    /// The entry as the API shows it.
    pub fn view(&self) -> PriceEntryView {
        let per_mtok = |rate: i64| rate as f64 / PICO_PER_TOKEN_PER_USD_MTOK;
        let r = self.rates;
        let (origin, note) = match &self.origin {
            Origin::Builtin => ("builtin", None),
            Origin::Override { note } => ("override", note.clone()),
        };
        PriceEntryView {
            version: self.version.clone(),
            origin: origin.into(),
            provider: self.provider.clone(),
            model: self.model.clone(),
            effective_from: (self.effective_from_ms > 0)
                .then(|| ms_to_rfc3339(self.effective_from_ms)),
            input_usd_per_mtok: per_mtok(r.input),
            cached_input_usd_per_mtok: per_mtok(r.cached_input),
            cache_write_usd_per_mtok: per_mtok(r.cache_write),
            output_usd_per_mtok: per_mtok(r.output),
            reasoning_usd_per_mtok: per_mtok(r.reasoning),
            request_fee_usd: r.request_fee as f64 / PICO_PER_USD,
            note,
        }
    }
}

const BATCH_SUFFIX: &str = "+batch";

/// A row's quantities by billing class. Prompt and completion tokens include the
/// classes nested in them (cached and cache-write tokens, reasoning tokens), as in a
/// usage row; [`cost`] splits them so no token is billed twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quantities {
    pub requests: i64,
    pub prompt: i64,
    pub cached: i64,
    pub cache_write: i64,
    pub completion: i64,
    pub reasoning: i64,
}

impl Quantities {
    pub fn of_row(row: &UsageRow) -> Self {
        Self {
            requests: row.requests,
            prompt: row.prompt_tokens,
            cached: row.cached_tokens,
            cache_write: row.cache_write_tokens,
            completion: row.completion_tokens,
            reasoning: row.reasoning_tokens,
        }
    }
}

/// One term of a cost, in pico-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    pub class: &'static str,
    pub quantity: i64,
    pub rate: i64,
    pub pico: i128,
}

/// A cost and its terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Costing {
    pub terms: Vec<Term>,
    pub pico: i128,
}

impl Costing {
    pub fn usd(&self) -> f64 {
        self.pico as f64 / PICO_PER_USD
    }

    /// Micro-dollars, rounded half away from zero.
    pub fn micro_usd(&self) -> i64 {
        micro_of_pico(self.pico)
    }

    /// The terms as the API shows them; classes with nothing to bill are left out, and
    /// so is the request fee of a price that has none.
    pub fn lines(&self) -> Vec<CostLine> {
        self.terms
            .iter()
            .filter(|t| t.quantity != 0 && !(t.class == "requests" && t.rate == 0))
            .map(|t| CostLine {
                class: t.class.into(),
                quantity: t.quantity,
                rate_usd: if t.class == "requests" {
                    t.rate as f64 / PICO_PER_USD
                } else {
                    t.rate as f64 / PICO_PER_TOKEN_PER_USD_MTOK
                },
                cost_usd: t.pico as f64 / PICO_PER_USD,
                cost_micro_usd: micro_of_pico(t.pico),
            })
            .collect()
    }
}

pub fn micro_of_pico(pico: i128) -> i64 {
    let micro = (pico.abs() + 500_000) / 1_000_000;
    i64::try_from(if pico < 0 { -micro } else { micro }).unwrap_or(i64::MAX)
}

/// The cost of `q` at `rates`. Cached and cache-write tokens are taken out of the prompt
/// (and each clamped to what is left of it), reasoning tokens out of the completion, so a
/// token is billed once, in its own class.
pub fn cost(rates: &Rates, q: &Quantities) -> Costing {
    let prompt = q.prompt.max(0);
    let cached = q.cached.clamp(0, prompt);
    let cache_write = q.cache_write.clamp(0, prompt - cached);
    let completion = q.completion.max(0);
    let reasoning = q.reasoning.clamp(0, completion);
    let term = |class, quantity: i64, rate: i64| Term {
        class,
        quantity,
        rate,
        pico: i128::from(quantity) * i128::from(rate),
    };
    let terms = vec![
        term("input", prompt - cached - cache_write, rates.input),
        term("cached_input", cached, rates.cached_input),
        term("cache_write", cache_write, rates.cache_write),
        term("output", completion - reasoning, rates.output),
        term("reasoning", reasoning, rates.reasoning),
        term("requests", q.requests.max(0), rates.request_fee),
    ];
    let pico = terms.iter().map(|t| t.pico).sum();
    Costing { terms, pico }
}

/// The built-in snapshot. Immutable; shared by every request.
#[derive(Debug, Clone)]
pub struct PriceBook {
    entries: Vec<PriceEntry>,
}

/// A price of the snapshot that is not a current list price of [`PricingTable`]: an
/// earlier price of a model (in force until the table's price took over), or a model
/// billed per request. In USD per million tokens; `until` is the date the next price
/// took over.
struct ExtraPrice {
    provider: &'static str,
    model: &'static str,
    input: f64,
    cached_input: f64,
    output: f64,
    request_fee_usd: f64,
    /// For an earlier price: when the table's price took over (RFC 3339).
    until: Option<&'static str>,
}

const EXTRA_PRICES: &[ExtraPrice] = &[
    // gpt-4o pointed to gpt-4o-2024-05-13 ($5 / $15, no cache discount) until
    // 2024-10-02, then to gpt-4o-2024-08-06 ($2.50 / $10, cached input at half).
    ExtraPrice {
        provider: "openai",
        model: "gpt-4o",
        input: 5.0,
        cached_input: 5.0,
        output: 15.0,
        request_fee_usd: 0.0,
        until: Some("2024-10-02T00:00:00Z"),
    },
    // Perplexity's Sonar bills tokens and a fee per request ($5 per 1,000 requests at
    // low search context).
    ExtraPrice {
        provider: "perplexity",
        model: "sonar",
        input: 1.0,
        cached_input: 1.0,
        output: 1.0,
        request_fee_usd: 0.005,
        until: None,
    },
];

impl PriceBook {
    /// The snapshot: `table`'s list prices, in force from `EXTRA_PRICES`' dates where a
    /// model had an earlier price, and the extra prices.
    pub fn builtin(table: &PricingTable) -> Self {
        let mut entries = vec![PriceEntry {
            version: LOCAL_PRICE_VERSION.into(),
            origin: Origin::Builtin,
            provider: "apex".into(),
            // Not a model name anyone uploads: only rows that name the version find it.
            model: "(embedded model)".into(),
            effective_from_ms: 0,
            rates: Rates::default(),
            batch_discount: 0.0,
        }];
        for extra in EXTRA_PRICES {
            entries.push(PriceEntry {
                version: format!("builtin:{}/{}", extra.provider, extra.model),
                origin: Origin::Builtin,
                provider: extra.provider.into(),
                model: extra.model.into(),
                effective_from_ms: 0,
                rates: Rates {
                    input: rate_of_usd_per_mtok(extra.input),
                    cached_input: rate_of_usd_per_mtok(extra.cached_input),
                    cache_write: rate_of_usd_per_mtok(extra.input),
                    output: rate_of_usd_per_mtok(extra.output),
                    reasoning: rate_of_usd_per_mtok(extra.output),
                    request_fee: pico_of_usd(extra.request_fee_usd),
                },
                batch_discount: 0.0,
            });
        }
        for price in table.models() {
            let earlier = EXTRA_PRICES
                .iter()
                .find(|e| e.model == price.model && e.provider == price.provider);
            let since = earlier.and_then(|e| e.until);
            let effective_from_ms = since.and_then(crate::clock::parse_rfc3339_ms).unwrap_or(0);
            let version = match since {
                Some(date) => format!(
                    "builtin:{}/{}@{}",
                    price.provider,
                    price.model,
                    &date[..10.min(date.len())]
                ),
                None => format!("builtin:{}/{}", price.provider, price.model),
            };
            entries.push(PriceEntry {
                version,
                origin: Origin::Builtin,
                provider: price.provider.into(),
                model: price.model.into(),
                effective_from_ms,
                rates: Rates {
                    input: rate_of_usd_per_mtok(price.input_per_mtok),
                    cached_input: rate_of_usd_per_mtok(
                        price.input_per_mtok * (1.0 - price.cached_input_discount),
                    ),
                    cache_write: rate_of_usd_per_mtok(
                        price.input_per_mtok * cache_write_multiplier(price),
                    ),
                    output: rate_of_usd_per_mtok(price.output_per_mtok),
                    reasoning: rate_of_usd_per_mtok(price.output_per_mtok),
                    request_fee: 0,
                },
                batch_discount: price.batch_discount,
            });
        }
        Self { entries }
    }

    pub fn entries(&self) -> &[PriceEntry] {
        &self.entries
    }

    /// The book as seen by a user with `overrides` (their stored negotiated rates).
    pub fn for_user(&self, overrides: &[PriceOverrideRecord]) -> UserPrices<'_> {
        UserPrices {
            builtin: self,
            overrides: overrides.iter().map(override_entry).collect(),
        }
    }
}

/// The version a stored override is named by.
pub fn override_version(id: &str) -> String {
    format!("override:{id}")
}

fn override_entry(record: &PriceOverrideRecord) -> PriceEntry {
    PriceEntry {
        version: override_version(&record.id),
        origin: Origin::Override {
            note: record.note.clone(),
        },
        provider: record.provider.clone(),
        model: record.model.to_ascii_lowercase(),
        effective_from_ms: record.effective_from_ms,
        rates: Rates {
            input: record.input_rate,
            cached_input: record.cached_input_rate,
            cache_write: record.cache_write_rate,
            output: record.output_rate,
            reasoning: record.reasoning_rate,
            request_fee: record.request_fee,
        },
        batch_discount: 0.0,
    }
}

/// The price book of one user: their overrides over the built-in snapshot.
#[derive(Debug, Clone)]
pub struct UserPrices<'a> {
    builtin: &'a PriceBook,
    /// Oldest first, as stored.
    overrides: Vec<PriceEntry>,
}

/// The entry of `entries` for `model` at `ts_ms`: among the entries of the longest
/// matching model name, the latest effective at `ts_ms` (the later one of equal dates,
/// so a newer import wins); when none is in force yet, the earliest (a row dated before a
/// model's first price is costed at that first price).
fn pick<'e>(entries: &'e [PriceEntry], model: &str, ts_ms: i64) -> Option<&'e PriceEntry> {
    let wanted = model.trim().to_ascii_lowercase();
    let longest = entries
        .iter()
        .filter(|e| names_model(&e.model, &wanted))
        .map(|e| e.model.len())
        .max()?;
    let candidates = entries
        .iter()
        .filter(|e| e.model.len() == longest && names_model(&e.model, &wanted));
    let in_force = candidates
        .clone()
        .filter(|e| e.effective_from_ms <= ts_ms)
        .fold(None, |best: Option<&PriceEntry>, e| match best {
            Some(b) if b.effective_from_ms > e.effective_from_ms => Some(b),
            _ => Some(e),
        });
    in_force.or_else(|| candidates.min_by_key(|e| e.effective_from_ms))
}

impl UserPrices<'_> {
    /// The price of `model` for a row dated `ts_ms`: the user's override in force then,
    /// else the built-in price.
    pub fn entry_at(&self, model: &str, ts_ms: i64) -> Option<&PriceEntry> {
        let own = pick(&self.overrides, model, ts_ms).filter(|e| e.effective_from_ms <= ts_ms);
        own.or_else(|| pick(&self.builtin.entries, model, ts_ms))
    }

    /// The entry a stored row names (`price_version`), built-in or the user's.
    pub fn entry_by_version(&self, version: &str) -> Option<PriceEntry> {
        let (base, batch) = match version.strip_suffix(BATCH_SUFFIX) {
            Some(base) => (base, true),
            None => (version, false),
        };
        let entry = self
            .overrides
            .iter()
            .chain(&self.builtin.entries)
            .find(|e| e.version == base)?;
        Some(if batch { entry.batch() } else { entry.clone() })
    }

    /// Every entry, the user's (newest first) then the built-in ones.
    pub fn entries(&self) -> impl Iterator<Item = &PriceEntry> {
        self.overrides.iter().rev().chain(&self.builtin.entries)
    }

    /// Costs `row` with the price of its model at its time (the batch price when
    /// `batch`), setting `cost_usd`, `price_version` and, when the source did not say,
    /// `provider`. `Err` names the model when no price is known for it.
    pub fn price_row(&self, row: &mut UsageRow, batch: bool) -> Result<(), String> {
        let entry = self
            .entry_at(&row.model, row.ts_ms)
            .ok_or_else(|| format!("no price is known for model {:?}", row.model))?;
        let batched;
        let entry = if batch {
            batched = entry.batch();
            &batched
        } else {
            entry
        };
        row.cost_usd = cost(&entry.rates, &Quantities::of_row(row)).usd();
        row.price_version = Some(entry.version.clone());
        if row.provider.is_empty() {
            row.provider = entry.provider.clone();
        }
        Ok(())
    }
}

/// Most entries one `POST /api/pricebook` may hold.
pub const MAX_OVERRIDES_PER_IMPORT: usize = 1000;
/// The highest rate a negotiated price may have, in USD per million tokens.
pub const MAX_RATE_USD_PER_MTOK: f64 = 10_000.0;
/// The highest fee per request a negotiated price may have, in USD.
pub const MAX_REQUEST_FEE_USD: f64 = 100.0;

/// The records of a user's negotiated rates as sent, checked all or nothing; the message
/// names the entry (`prices[2]: ...`). Classes left out are derived (cached input and
/// cache writes at the input rate, reasoning at the output rate, no request fee); the
/// provider defaults to the built-in one of the model.
pub fn override_records(
    inputs: &[PriceOverrideInput],
    builtin: &PriceBook,
    now_ms: i64,
) -> Result<Vec<PriceOverrideRecord>, String> {
    if inputs.is_empty() {
        return Err("prices is empty".into());
    }
    if inputs.len() > MAX_OVERRIDES_PER_IMPORT {
        return Err(format!(
            "at most {MAX_OVERRIDES_PER_IMPORT} prices per import"
        ));
    }
    let list = builtin.for_user(&[]);
    inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let at = |reason: String| format!("prices[{i}]: {reason}");
            let text = |name: &str, value: &str| -> Result<String, String> {
                let value = value.trim();
                if value.is_empty() || value.chars().count() > 200 || value.contains('\0') {
                    return Err(at(format!("{name} must be 1 to 200 characters, no NUL")));
                }
                Ok(value.to_string())
            };
            let rate = |name: &str, value: f64| -> Result<i64, String> {
                if value.is_finite() && (0.0..=MAX_RATE_USD_PER_MTOK).contains(&value) {
                    Ok(rate_of_usd_per_mtok(value))
                } else {
                    Err(at(format!(
                        "{name} must be a number from 0 to {MAX_RATE_USD_PER_MTOK}"
                    )))
                }
            };
            let model = text("model", &input.model)?;
            let provider = match input.provider.as_deref() {
                Some(provider) => text("provider", provider)?,
                None => list
                    .entry_at(&model, now_ms)
                    .map_or_else(|| "custom".to_string(), |e| e.provider.clone()),
            };
            let effective_from_ms = match input.effective_from.as_deref().map(str::trim) {
                None | Some("") => now_ms,
                Some(raw) => parse_date_or_time(raw).ok_or_else(|| {
                    at("effective_from must be an RFC 3339 date (2026-01-01) or time".into())
                })?,
            };
            let input_rate = rate("input_usd_per_mtok", input.input_usd_per_mtok)?;
            let output_rate = rate("output_usd_per_mtok", input.output_usd_per_mtok)?;
            let or = |name: &str, value: Option<f64>, default: i64| match value {
                Some(value) => rate(name, value),
                None => Ok(default),
            };
            let request_fee = match input.request_fee_usd {
                None => 0,
                Some(fee) if fee.is_finite() && (0.0..=MAX_REQUEST_FEE_USD).contains(&fee) => {
                    pico_of_usd(fee)
                }
                Some(_) => {
                    return Err(at(format!(
                        "request_fee_usd must be a number from 0 to {MAX_REQUEST_FEE_USD}"
                    )))
                }
            };
            let note = match input.note.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(note) => Some(text("note", note)?),
            };
            Ok(PriceOverrideRecord {
                id: uuid::Uuid::new_v4().simple().to_string(),
                provider,
                model,
                effective_from_ms,
                input_rate,
                cached_input_rate: or(
                    "cached_input_usd_per_mtok",
                    input.cached_input_usd_per_mtok,
                    input_rate,
                )?,
                cache_write_rate: or(
                    "cache_write_usd_per_mtok",
                    input.cache_write_usd_per_mtok,
                    input_rate,
                )?,
                output_rate,
                reasoning_rate: or(
                    "reasoning_usd_per_mtok",
                    input.reasoning_usd_per_mtok,
                    output_rate,
                )?,
                request_fee,
                note,
                created_at_ms: now_ms,
            })
        })
        .collect()
}

/// Unix milliseconds of an RFC 3339 time, or of midnight UTC of a date (`2026-01-01`).
fn parse_date_or_time(raw: &str) -> Option<i64> {
    crate::clock::parse_rfc3339_ms(raw).or_else(|| {
        chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc().timestamp_millis())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::parse_rfc3339_ms;

    fn book() -> PriceBook {
        PriceBook::builtin(&PricingTable::builtin())
    }

    fn row(model: &str, ts: &str, q: Quantities) -> UsageRow {
        UsageRow {
            model: model.into(),
            ts_ms: parse_rfc3339_ms(ts).unwrap(),
            requests: q.requests,
            prompt_tokens: q.prompt,
            cached_tokens: q.cached,
            cache_write_tokens: q.cache_write,
            completion_tokens: q.completion,
            reasoning_tokens: q.reasoning,
            ..UsageRow::default()
        }
    }

    fn micro(book: &UserPrices<'_>, model: &str, ts: &str, q: Quantities) -> (i64, String) {
        let mut r = row(model, ts, q);
        book.price_row(&mut r, false).unwrap();
        let version = r.price_version.clone().unwrap();
        let entry = book.entry_by_version(&version).unwrap();
        let costing = cost(&entry.rates, &Quantities::of_row(&r));
        // What is stored is what the explanation recomputes.
        assert_eq!(r.cost_usd, costing.usd());
        (costing.micro_usd(), version)
    }

    const NOW: &str = "2026-11-20T10:00:00Z";

    fn q(
        prompt: i64,
        cached: i64,
        cache_write: i64,
        completion: i64,
        reasoning: i64,
    ) -> Quantities {
        Quantities {
            requests: 1,
            prompt,
            cached,
            cache_write,
            completion,
            reasoning,
        }
    }

    #[test]
    fn golden_costs_per_token_class() {
        let book = book();
        let prices = book.for_user(&[]);
        // gpt-4o, $2.50 in, $1.25 cached, $10 out. 1,234 prompt tokens: 1,234 × 2.5 µ$ =
        // 3,085 µ$; 567 completion tokens × 10 µ$ = 5,670 µ$.
        assert_eq!(
            micro(&prices, "gpt-4o", NOW, q(1234, 0, 0, 567, 0)),
            (8_755, "builtin:openai/gpt-4o@2024-10-02".into())
        );
        // Cached tokens are part of the prompt and billed once, at the cached rate:
        // 1,000 uncached × 2.5 + 1,000 cached × 1.25 = 3,750 µ$ (not 5,000 + 1,250).
        assert_eq!(
            micro(&prices, "gpt-4o", NOW, q(2000, 1000, 0, 0, 0)).0,
            3_750
        );
        // Reasoning tokens are part of the completion and billed as output: o3-mini
        // $4.40 out; 1,000 completion tokens of which 800 reasoning = 4,400 µ$, not 7,920.
        assert_eq!(
            micro(&prices, "o3-mini", NOW, q(0, 0, 0, 1000, 800)).0,
            4_400
        );
        // Anthropic cache writes at 1.25× input, reads at 10%: claude-3-5-sonnet $3 in.
        // 10,000 prompt = 6,000 input (18,000 µ$) + 3,000 read (900 µ$) + 1,000 written
        // (3,750 µ$); 2,000 output × 15 µ$ = 30,000 µ$. Total 52,650 µ$.
        assert_eq!(
            micro(
                &prices,
                "claude-3-5-sonnet-20241022",
                NOW,
                q(10_000, 3000, 1000, 2000, 0)
            )
            .0,
            52_650
        );
        // A per-request fee: sonar, $1 / $1 and $0.005 a request; one request of 1,000 in
        // and 500 out = 1,000 + 500 + 5,000 µ$.
        assert_eq!(micro(&prices, "sonar", NOW, q(1000, 0, 0, 500, 0)).0, 6_500);
        // Sub-micro-dollar rates stay exact: gemini-1.5-flash $0.075 in, 7 tokens =
        // 0.525 µ$, rounds to 1 µ$; 6 tokens = 0.45 µ$, rounds to 0.
        assert_eq!(
            micro(&prices, "gemini-1.5-flash", NOW, q(7, 0, 0, 0, 0)).0,
            1
        );
        assert_eq!(
            micro(&prices, "gemini-1.5-flash", NOW, q(6, 0, 0, 0, 0)).0,
            0
        );
    }

    #[test]
    fn a_row_is_costed_with_the_price_in_force_at_its_time() {
        let book = book();
        let prices = book.for_user(&[]);
        // Before 2024-10-02 gpt-4o was $5 / $15 with no cache discount.
        assert_eq!(
            micro(
                &prices,
                "gpt-4o",
                "2024-09-01T00:00:00Z",
                q(1000, 500, 0, 1000, 0)
            ),
            (20_000, "builtin:openai/gpt-4o".into())
        );
        assert_eq!(
            micro(
                &prices,
                "gpt-4o",
                "2024-10-02T00:00:00Z",
                q(1000, 500, 0, 1000, 0)
            ),
            (11_875, "builtin:openai/gpt-4o@2024-10-02".into())
        );
        // gpt-4o-mini is its own model, not gpt-4o.
        assert_eq!(
            micro(
                &prices,
                "gpt-4o-mini",
                "2024-09-01T00:00:00Z",
                q(1000, 0, 0, 0, 0)
            )
            .1,
            "builtin:openai/gpt-4o-mini"
        );
    }

    fn negotiated(
        id: &str,
        model: &str,
        from: &str,
        input: f64,
        output: f64,
    ) -> PriceOverrideRecord {
        PriceOverrideRecord {
            id: id.into(),
            provider: "openai".into(),
            model: model.into(),
            effective_from_ms: parse_rfc3339_ms(from).unwrap(),
            input_rate: rate_of_usd_per_mtok(input),
            cached_input_rate: rate_of_usd_per_mtok(input / 2.0),
            cache_write_rate: rate_of_usd_per_mtok(input),
            output_rate: rate_of_usd_per_mtok(output),
            reasoning_rate: rate_of_usd_per_mtok(output),
            request_fee: 0,
            note: Some("contract".into()),
            created_at_ms: 0,
        }
    }

    #[test]
    fn overrides_win_from_their_date_on_and_the_newest_import_wins_a_tie() {
        let book = book();
        let overrides = [
            negotiated("a", "gpt-4o", "2026-01-01T00:00:00Z", 2.0, 8.0),
            negotiated("b", "gpt-4o", "2026-06-01T00:00:00Z", 1.0, 4.0),
            negotiated("c", "gpt-4o", "2026-06-01T00:00:00Z", 1.5, 6.0),
        ];
        let prices = book.for_user(&overrides);
        let one = q(1_000_000, 0, 0, 0, 0);
        assert_eq!(
            micro(&prices, "gpt-4o", "2025-12-31T23:59:59Z", one),
            (2_500_000, "builtin:openai/gpt-4o@2024-10-02".into())
        );
        assert_eq!(
            micro(&prices, "gpt-4o", "2026-03-01T00:00:00Z", one),
            (2_000_000, "override:a".into())
        );
        assert_eq!(
            micro(&prices, "gpt-4o-2024-08-06", NOW, one),
            (1_500_000, "override:c".into())
        );
        // Another model keeps its built-in price.
        assert_eq!(
            micro(&prices, "gpt-4o-mini", NOW, one).1,
            "builtin:openai/gpt-4o-mini"
        );
        // A superseded override still explains the rows costed with it.
        assert_eq!(
            prices.entry_by_version("override:b").unwrap().rates.input,
            1_000_000
        );
    }

    #[test]
    fn batch_prices_are_their_own_version() {
        let book = book();
        let prices = book.for_user(&[]);
        let mut r = row("gpt-4o-mini", NOW, q(1_000_000, 0, 0, 1_000_000, 0));
        prices.price_row(&mut r, true).unwrap();
        assert_eq!(
            r.price_version.as_deref(),
            Some("builtin:openai/gpt-4o-mini+batch")
        );
        // $0.15 + $0.60, halved.
        assert_eq!((r.cost_usd * 1e6).round() as i64, 375_000);
        let entry = prices
            .entry_by_version("builtin:openai/gpt-4o-mini+batch")
            .unwrap();
        assert_eq!(
            cost(&entry.rates, &Quantities::of_row(&r)).micro_usd(),
            375_000
        );
    }

    #[test]
    fn an_unknown_model_has_no_price() {
        let book = book();
        let mut r = row("my-finetune", NOW, q(10, 0, 0, 10, 0));
        assert!(book.for_user(&[]).price_row(&mut r, false).is_err());
        assert_eq!(r.price_version, None);
    }

    #[test]
    fn summed_rows_cost_what_their_summed_tokens_cost() {
        // The explanation of a summary cell multiplies summed tokens by the rate; the
        // integers make that equal to the sum of the rows' costs, exactly.
        let book = book();
        let prices = book.for_user(&[]);
        let entry = prices.entry_at("gemini-1.5-flash", 0).unwrap();
        let mut total = 0i128;
        let mut summed = Quantities::default();
        for i in 1..=1000 {
            let quantities = q(i * 7, i, 0, i * 3, 0);
            total += cost(&entry.rates, &quantities).pico;
            summed.requests += 1;
            summed.prompt += quantities.prompt;
            summed.cached += quantities.cached;
            summed.completion += quantities.completion;
        }
        assert_eq!(cost(&entry.rates, &summed).pico, total);
    }

    fn input(model: &str) -> PriceOverrideInput {
        PriceOverrideInput {
            provider: None,
            model: model.into(),
            effective_from: Some("2026-01-01".into()),
            input_usd_per_mtok: 2.0,
            output_usd_per_mtok: 8.0,
            cached_input_usd_per_mtok: Some(0.5),
            cache_write_usd_per_mtok: None,
            reasoning_usd_per_mtok: None,
            request_fee_usd: None,
            note: Some(" contract 2026 ".into()),
        }
    }

    #[test]
    fn negotiated_rates_are_checked_and_the_missing_classes_derived() {
        let book = book();
        let records = override_records(&[input("gpt-4o")], &book, 5).unwrap();
        let r = &records[0];
        assert_eq!(r.provider, "openai");
        assert_eq!(
            r.effective_from_ms,
            parse_rfc3339_ms("2026-01-01T00:00:00Z").unwrap()
        );
        assert_eq!(
            (r.input_rate, r.cached_input_rate, r.cache_write_rate),
            (2_000_000, 500_000, 2_000_000)
        );
        assert_eq!(
            (r.output_rate, r.reasoning_rate, r.request_fee),
            (8_000_000, 8_000_000, 0)
        );
        assert_eq!(r.note.as_deref(), Some("contract 2026"));
        assert_eq!(
            override_records(&[input("acme-1")], &book, 5).unwrap()[0].provider,
            "custom"
        );

        for (bad, field) in [
            (
                PriceOverrideInput {
                    input_usd_per_mtok: -1.0,
                    ..input("m")
                },
                "input_usd_per_mtok",
            ),
            (
                PriceOverrideInput {
                    output_usd_per_mtok: f64::NAN,
                    ..input("m")
                },
                "output_usd_per_mtok",
            ),
            (
                PriceOverrideInput {
                    cached_input_usd_per_mtok: Some(1e9),
                    ..input("m")
                },
                "cached_input_usd_per_mtok",
            ),
            (
                PriceOverrideInput {
                    request_fee_usd: Some(101.0),
                    ..input("m")
                },
                "request_fee_usd",
            ),
            (
                PriceOverrideInput {
                    effective_from: Some("soon".into()),
                    ..input("m")
                },
                "effective_from",
            ),
            (
                PriceOverrideInput {
                    model: " ".into(),
                    ..input("m")
                },
                "model",
            ),
        ] {
            let err = override_records(&[input("gpt-4o"), bad], &book, 5).unwrap_err();
            assert!(
                err.starts_with("prices[1]: ") && err.contains(field),
                "{err}"
            );
        }
        assert!(override_records(&[], &book, 5).is_err());
    }
}
