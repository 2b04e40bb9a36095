//! Validation of uploaded usage rows (JSON array or CSV), all-or-nothing.
//!
//! A batch with one bad row is rejected whole with the row's index and the reason, so a
//! half-imported file can never skew a user's numbers. Every value is bounded (text
//! length, tokens, latency, cost), so that sums over a user's rows stay finite and exact;
//! the per-user quota on stored rows is the store's (`Usage::import_usage`).

use apex_protocol::usage::UsageEventInput;

use super::price_book::UserPrices;
use crate::clock::parse_rfc3339_ms;
use crate::store::UsageRow;

/// Most rows accepted in one upload.
pub const MAX_ROWS_PER_UPLOAD: usize = 50_000;
/// Largest token count (and latency, in ms) of one row: 10^8. Far above any real request,
/// and small enough that a user's sums stay exact in an `i64` (and in SQLite's `SUM`, which
/// fails on overflow) even at the row quota.
pub const MAX_TOKENS: i64 = 100_000_000;
/// Largest cost of one row, in USD. Bounded so that sums of a user's rows stay finite
/// (an unbounded `1.7e308` made the summary's totals `null`) and exact to the micro-dollar.
pub const MAX_COST_USD: f64 = 1_000_000.0;
const MAX_TEXT: usize = 200;
/// Rows stored per transaction: on SQLite each transaction holds the one writer, and other
/// users' writes wait for it, so a 50,000-row upload is written in 50 short ones (a few ms
/// each) rather than one long one. The store keeps the upload all or nothing regardless.
pub const IMPORT_CHUNK_ROWS: usize = 1_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ImportError {
    #[error("row {index}: {reason}")]
    Row { index: usize, reason: String },
    #[error("{0}")]
    Batch(String),
}

fn row_error(index: usize, reason: impl Into<String>) -> ImportError {
    ImportError::Row {
        index,
        reason: reason.into(),
    }
}

fn text_field(index: usize, name: &str, value: &str) -> Result<String, ImportError> {
    let value = value.trim();
    if value.is_empty() || value.chars().count() > MAX_TEXT {
        return Err(row_error(
            index,
            format!("{name} must be 1 to {MAX_TEXT} characters"),
        ));
    }
    // PostgreSQL cannot store U+0000 in text; refuse it on every engine alike.
    if value.contains('\0') {
        return Err(row_error(
            index,
            format!("{name} must not contain NUL characters"),
        ));
    }
    Ok(value.to_string())
}

fn count_field(index: usize, name: &str, value: i64) -> Result<i64, ImportError> {
    if !(0..=MAX_TOKENS).contains(&value) {
        return Err(row_error(
            index,
            format!("{name} must be between 0 and {MAX_TOKENS}"),
        ));
    }
    Ok(value)
}

pub fn validate(
    inputs: Vec<UsageEventInput>,
    prices: &UserPrices<'_>,
) -> Result<Vec<UsageRow>, ImportError> {
    if inputs.is_empty() {
        return Err(ImportError::Batch("no rows to import".into()));
    }
    if inputs.len() > MAX_ROWS_PER_UPLOAD {
        return Err(ImportError::Batch(format!(
            "at most {MAX_ROWS_PER_UPLOAD} rows per upload"
        )));
    }
    inputs
        .into_iter()
        .enumerate()
        .map(|(index, input)| {
            let model = text_field(index, "model", &input.model)?;
            let prompt_tokens = count_field(index, "prompt_tokens", input.prompt_tokens)?;
            let completion_tokens =
                count_field(index, "completion_tokens", input.completion_tokens)?;
            let cached_tokens =
                count_field(index, "cached_tokens", input.cached_tokens.unwrap_or(0))?;
            if cached_tokens > prompt_tokens {
                return Err(row_error(
                    index,
                    "cached_tokens are part of prompt_tokens and cannot exceed them",
                ));
            }
            let reasoning_tokens = count_field(
                index,
                "reasoning_tokens",
                input.reasoning_tokens.unwrap_or(0),
            )?;
            if reasoning_tokens > completion_tokens {
                return Err(row_error(
                    index,
                    "reasoning_tokens are part of completion_tokens and cannot exceed them",
                ));
            }
            let source_ref = match input.id.as_deref() {
                None => None,
                Some(id) => Some(text_field(index, "id", id)?),
            };
            let status = match input.status.as_deref().map(str::trim) {
                None | Some("") | Some("ok") | Some("success") => "ok",
                Some("error") | Some("failed") => "error",
                Some(other) => {
                    return Err(row_error(
                        index,
                        format!("status {other:?} is not one of ok, error"),
                    ))
                }
            };
            let mut row = UsageRow {
                provider: text_field(index, "provider", &input.provider)?,
                workload: text_field(index, "workload", &input.workload)?,
                ts_ms: parse_rfc3339_ms(input.timestamp.trim())
                    .ok_or_else(|| row_error(index, "timestamp must be RFC 3339"))?,
                prompt_tokens,
                completion_tokens,
                latency_ms: count_field(index, "latency_ms", input.latency_ms)?,
                status: status.to_string(),
                model,
                cached_tokens,
                reasoning_tokens,
                source_ref,
                ..UsageRow::default()
            };
            match input.cost_usd {
                Some(cost) => row.cost_usd = cost,
                None => prices
                    .price_row(&mut row, false)
                    .map_err(|reason| row_error(index, format!("{reason}; send cost_usd")))?,
            }
            // Also a computed cost: a user's negotiated rates are bounded, not their sums.
            if !(row.cost_usd.is_finite() && (0.0..=MAX_COST_USD).contains(&row.cost_usd)) {
                return Err(row_error(
                    index,
                    format!("cost_usd must be a number from 0 to {MAX_COST_USD}"),
                ));
            }
            Ok(row)
        })
        .collect()
}

/// Parses CSV with a header row naming the `UsageEventInput` fields.
pub fn parse_csv(body: &[u8]) -> Result<Vec<UsageEventInput>, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(body);
    let mut rows = Vec::new();
    for (index, record) in reader.deserialize::<UsageEventInput>().enumerate() {
        if index >= MAX_ROWS_PER_UPLOAD {
            return Err(ImportError::Batch(format!(
                "at most {MAX_ROWS_PER_UPLOAD} rows per upload"
            )));
        }
        rows.push(record.map_err(|e| row_error(index, format!("invalid CSV: {e}")))?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::price_book::PriceBook;
    use crate::usage::pricing::PricingTable;

    fn builtin() -> PriceBook {
        PriceBook::builtin(&PricingTable::builtin())
    }

    #[test]
    fn computes_missing_cost_and_rejects_unknown_models_without_cost() {
        let book = builtin();
        let pricing = book.for_user(&[]);
        let csv = "provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms,status,cost_usd\n\
                   openai,gpt-4o,chat,2026-11-01T10:00:00Z,1000000,0,500,ok,\n\
                   acme,acme-1,chat,2026-11-01T10:00:00Z,10,10,500,,0.5\n";
        let rows = validate(parse_csv(csv.as_bytes()).unwrap(), &pricing).unwrap();
        assert_eq!(rows[0].cost_usd, 2.5);
        assert_eq!(
            rows[0].price_version.as_deref(),
            Some("builtin:openai/gpt-4o@2024-10-02")
        );
        assert_eq!(rows[1].cost_usd, 0.5);
        assert_eq!(rows[1].price_version, None);

        let bad = "provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms\n\
                   acme,acme-1,chat,2026-11-01T10:00:00Z,10,10,500\n";
        let err = validate(parse_csv(bad.as_bytes()).unwrap(), &pricing).unwrap_err();
        assert!(matches!(err, ImportError::Row { index: 0, .. }));
    }

    #[test]
    fn rejects_negative_counts_and_bad_timestamps() {
        let book = builtin();
        let pricing = book.for_user(&[]);
        let input = UsageEventInput {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            workload: "w".into(),
            timestamp: "yesterday".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            latency_ms: 1,
            status: None,
            cost_usd: None,
            cached_tokens: None,
            reasoning_tokens: None,
            id: None,
        };
        assert!(validate(vec![input.clone()], &pricing).is_err());
        let negative = UsageEventInput {
            timestamp: "2026-11-01T10:00:00Z".into(),
            prompt_tokens: -5,
            ..input
        };
        assert!(validate(vec![negative], &pricing).is_err());
    }

    #[test]
    fn costs_must_be_finite_and_at_most_the_maximum() {
        let book = builtin();
        let pricing = book.for_user(&[]);
        let row = |cost: f64| UsageEventInput {
            provider: "acme".into(),
            model: "acme-1".into(),
            workload: "w".into(),
            timestamp: "2026-11-01T10:00:00Z".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            latency_ms: 1,
            status: None,
            cost_usd: Some(cost),
            cached_tokens: None,
            reasoning_tokens: None,
            id: None,
        };
        for bad in [
            1.7e308,
            f64::INFINITY,
            f64::NAN,
            -0.01,
            MAX_COST_USD * 1.000001,
        ] {
            let err = validate(vec![row(0.5), row(bad)], &pricing).unwrap_err();
            assert!(
                matches!(&err, ImportError::Row { index: 1, reason } if reason.contains("cost_usd")),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            validate(vec![row(MAX_COST_USD)], &pricing).unwrap()[0].cost_usd,
            MAX_COST_USD
        );
        let too_many = UsageEventInput {
            completion_tokens: MAX_TOKENS + 1,
            ..row(1.0)
        };
        let err = validate(vec![too_many], &pricing).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("row 0: completion_tokens must be between 0 and {MAX_TOKENS}")
        );
    }
}
