//! Provider exports: the files the usage tools people already have produce, read into
//! usage rows.
//!
//! - `openai-usage`: a page (or an array of pages) of OpenAI's organization Usage API for
//!   completions (`GET /v1/organization/usage/completions`, best with `group_by=model`):
//!   buckets of a time range, each result a model's requests and tokens in it.
//! - `anthropic-usage`: a page (or pages) of Anthropic's usage report for messages
//!   (`GET /v1/organizations/usage_report/messages`, best with `group_by[]=model`). It
//!   counts tokens, not requests: its rows have `requests` 0 (unknown).
//! - `litellm-spend`: LiteLLM's spend logs (`GET /spend/logs`), one entry per request,
//!   with LiteLLM's own `spend` as the cost.
//!
//! Every row keeps the source's own id for it (a bucket's start, model, project and key;
//! a request's id), so importing the same file twice stores it once. A row Apex cannot
//! use (a bucket without a model, a model no price is known for, a count out of range) is
//! skipped and reported with the reason; the rest of the file is imported. A file that is
//! not the format it says it is is refused whole.

use apex_protocol::usage::ImportSkip;
use serde::Deserialize;
use serde_json::Value;

use super::import::{MAX_COST_USD, MAX_TOKENS};
use super::price_book::UserPrices;
use super::stored_label as label;
use crate::clock::parse_rfc3339_ms;
use crate::store::UsageRow;

/// The export formats `POST /api/usage/events?format=` and `apex usage import --format`
/// read, besides Apex's own CSV and JSON rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    OpenAiUsage,
    AnthropicUsage,
    LiteLlmSpend,
}

impl ExportFormat {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "openai-usage" => Some(Self::OpenAiUsage),
            "anthropic-usage" => Some(Self::AnthropicUsage),
            "litellm-spend" => Some(Self::LiteLlmSpend),
            _ => None,
        }
    }

    /// The name, also the `source` of the rows it gives.
    pub fn name(self) -> &'static str {
        match self {
            Self::OpenAiUsage => "openai-usage",
            Self::AnthropicUsage => "anthropic-usage",
            Self::LiteLlmSpend => "litellm-spend",
        }
    }
}

/// The rows of an export, and the entries that were skipped.
#[derive(Debug, Default)]
pub struct ExportRows {
    pub rows: Vec<UsageRow>,
    pub skipped: Vec<ImportSkip>,
}

impl ExportRows {
    fn skip(&mut self, index: usize, reason: impl Into<String>) {
        self.skipped.push(ImportSkip {
            index,
            reason: reason.into(),
        });
    }
}

/// Reads `body` as `format`. `Err` when the file is not that format at all.
pub fn read_export(
    format: ExportFormat,
    body: &[u8],
    prices: &UserPrices<'_>,
) -> Result<ExportRows, String> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| format!("a {} export is JSON: {e}", format.name()))?;
    match format {
        ExportFormat::OpenAiUsage => read_openai(value, prices),
        ExportFormat::AnthropicUsage => read_anthropic(value, prices),
        ExportFormat::LiteLlmSpend => read_litellm(value),
    }
}

/// A page, or an array of pages (several pages of a paginated export, concatenated).
fn pages<T: serde::de::DeserializeOwned>(value: Value, format: &str) -> Result<Vec<T>, String> {
    let pages = match value {
        Value::Array(pages) => pages,
        page => vec![page],
    };
    pages
        .into_iter()
        .enumerate()
        .map(|(i, page)| {
            serde_json::from_value(page)
                .map_err(|e| format!("page {i} is not an {format} page: {e}"))
        })
        .collect()
}

/// A token count of an export, checked against the bounds every row has.
fn count(value: i64, name: &str) -> Result<i64, String> {
    if (0..=MAX_TOKENS).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{name} must be between 0 and {MAX_TOKENS}"))
    }
}

#[derive(Deserialize)]
struct OpenAiPage {
    data: Vec<OpenAiBucket>,
}

#[derive(Deserialize)]
struct OpenAiBucket {
    start_time: i64,
    #[serde(default)]
    results: Vec<OpenAiResult>,
}

#[derive(Deserialize)]
struct OpenAiResult {
    #[serde(default)]
    input_tokens: i64,
    #[serde(default)]
    output_tokens: i64,
    #[serde(default)]
    input_cached_tokens: i64,
    #[serde(default)]
    num_model_requests: i64,
    model: Option<String>,
    project_id: Option<String>,
    api_key_id: Option<String>,
    user_id: Option<String>,
    batch: Option<bool>,
}

fn read_openai(value: Value, prices: &UserPrices<'_>) -> Result<ExportRows, String> {
    let mut out = ExportRows::default();
    let mut index = 0;
    for page in pages::<OpenAiPage>(value, "OpenAI usage")? {
        for bucket in page.data {
            for result in bucket.results {
                let i = index;
                index += 1;
                match openai_row(bucket.start_time, &result, prices) {
                    Ok(Some(row)) => out.rows.push(row),
                    Ok(None) => {}
                    Err(reason) => out.skip(i, reason),
                }
            }
        }
    }
    Ok(out)
}

/// The row of one result of a bucket; `None` for a result with nothing in it.
fn openai_row(
    start_time: i64,
    result: &OpenAiResult,
    prices: &UserPrices<'_>,
) -> Result<Option<UsageRow>, String> {
    let requests = count(result.num_model_requests, "num_model_requests")?;
    let prompt = count(result.input_tokens, "input_tokens")?;
    let completion = count(result.output_tokens, "output_tokens")?;
    // OpenAI counts cached tokens within input_tokens, as Apex does.
    let cached = count(result.input_cached_tokens, "input_cached_tokens")?.min(prompt);
    if requests == 0 && prompt == 0 && completion == 0 {
        return Ok(None);
    }
    let model = result
        .model
        .as_deref()
        .map(label)
        .filter(|m| !m.is_empty())
        .ok_or("no model: export with group_by=model")?;
    let batch = result.batch.unwrap_or(false);
    let project = result.project_id.as_deref().map(label);
    let key = result.api_key_id.as_deref().map(label);
    let user = result.user_id.as_deref().map(label);
    let ts_ms = start_time
        .checked_mul(1000)
        .ok_or("start_time is out of range")?;
    let mut row = UsageRow {
        // The price book's provider for the model (an OpenAI export may hold others').
        provider: String::new(),
        workload: project
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "openai".into()),
        ts_ms,
        prompt_tokens: prompt,
        completion_tokens: completion,
        requests,
        cached_tokens: cached,
        source: ExportFormat::OpenAiUsage.name().into(),
        source_ref: Some(format!(
            "{start_time}|{model}|{}|{}|{}|{batch}",
            project.unwrap_or_default(),
            key.unwrap_or_default(),
            user.unwrap_or_default()
        )),
        model,
        ..UsageRow::default()
    };
    priced(&mut row, prices, batch)?;
    Ok(Some(row))
}

/// Costs an export's row with the user's price book; `Err` (the entry is skipped) for a
/// model without a price or a cost past the maximum a row may have.
fn priced(row: &mut UsageRow, prices: &UserPrices<'_>, batch: bool) -> Result<(), String> {
    prices.price_row(row, batch)?;
    if row.cost_usd > MAX_COST_USD {
        return Err(format!("costs more than {MAX_COST_USD} USD"));
    }
    Ok(())
}

#[derive(Deserialize)]
struct AnthropicPage {
    data: Vec<AnthropicBucket>,
}

#[derive(Deserialize)]
struct AnthropicBucket {
    starting_at: String,
    #[serde(default)]
    results: Vec<AnthropicResult>,
}

#[derive(Deserialize)]
struct AnthropicResult {
    #[serde(default)]
    uncached_input_tokens: i64,
    #[serde(default)]
    cache_read_input_tokens: i64,
    #[serde(default)]
    cache_creation: AnthropicCacheCreation,
    #[serde(default)]
    output_tokens: i64,
    model: Option<String>,
    workspace_id: Option<String>,
    api_key_id: Option<String>,
    service_tier: Option<String>,
    context_window: Option<String>,
}

#[derive(Deserialize, Default)]
struct AnthropicCacheCreation {
    #[serde(default)]
    ephemeral_1h_input_tokens: i64,
    #[serde(default)]
    ephemeral_5m_input_tokens: i64,
}

fn read_anthropic(value: Value, prices: &UserPrices<'_>) -> Result<ExportRows, String> {
    let mut out = ExportRows::default();
    let mut index = 0;
    for page in pages::<AnthropicPage>(value, "Anthropic usage report")? {
        for bucket in page.data {
            for result in bucket.results {
                let i = index;
                index += 1;
                match anthropic_row(&bucket.starting_at, &result, prices) {
                    Ok(Some(row)) => out.rows.push(row),
                    Ok(None) => {}
                    Err(reason) => out.skip(i, reason),
                }
            }
        }
    }
    Ok(out)
}

fn anthropic_row(
    starting_at: &str,
    result: &AnthropicResult,
    prices: &UserPrices<'_>,
) -> Result<Option<UsageRow>, String> {
    let uncached = count(result.uncached_input_tokens, "uncached_input_tokens")?;
    let cached = count(result.cache_read_input_tokens, "cache_read_input_tokens")?;
    let written = count(
        result
            .cache_creation
            .ephemeral_1h_input_tokens
            .saturating_add(result.cache_creation.ephemeral_5m_input_tokens),
        "cache_creation",
    )?;
    let completion = count(result.output_tokens, "output_tokens")?;
    // Anthropic counts the three kinds of input apart; Apex's prompt tokens hold them all.
    let prompt = count(uncached + cached + written, "input tokens")?;
    if prompt == 0 && completion == 0 {
        return Ok(None);
    }
    let ts_ms = parse_rfc3339_ms(starting_at.trim()).ok_or("starting_at must be RFC 3339")?;
    let model = result
        .model
        .as_deref()
        .map(label)
        .filter(|m| !m.is_empty())
        .ok_or("no model: export with group_by[]=model")?;
    let workspace = result.workspace_id.as_deref().map(label);
    let key = result.api_key_id.as_deref().map(label);
    let mut row = UsageRow {
        provider: String::new(),
        workload: workspace
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "anthropic".into()),
        ts_ms,
        prompt_tokens: prompt,
        completion_tokens: completion,
        // The report counts tokens, not requests.
        requests: 0,
        cached_tokens: cached,
        cache_write_tokens: written,
        source: ExportFormat::AnthropicUsage.name().into(),
        source_ref: Some(format!(
            "{ts_ms}|{model}|{}|{}|{}|{}",
            workspace.unwrap_or_default(),
            key.unwrap_or_default(),
            result
                .service_tier
                .as_deref()
                .map(label)
                .unwrap_or_default(),
            result
                .context_window
                .as_deref()
                .map(label)
                .unwrap_or_default()
        )),
        model,
        ..UsageRow::default()
    };
    priced(&mut row, prices, false)?;
    Ok(Some(row))
}

/// LiteLLM's spend log: an array of entries, or `{"data": [...]}` as some of its
/// endpoints page them.
fn read_litellm(value: Value) -> Result<ExportRows, String> {
    let entries = match value {
        Value::Array(entries) => entries,
        Value::Object(mut page) => match page.remove("data") {
            Some(Value::Array(entries)) => entries,
            _ => return Err("a LiteLLM spend log is an array of spend entries".into()),
        },
        _ => return Err("a LiteLLM spend log is an array of spend entries".into()),
    };
    let mut out = ExportRows::default();
    for (index, entry) in entries.iter().enumerate() {
        match litellm_row(entry) {
            Ok(row) => out.rows.push(row),
            Err(reason) => out.skip(index, reason),
        }
    }
    Ok(out)
}

fn litellm_row(entry: &Value) -> Result<UsageRow, String> {
    let text = |name: &str| entry.get(name).and_then(Value::as_str).map(label);
    let int = |name: &str| entry.get(name).and_then(Value::as_i64).unwrap_or(0);
    let request_id = text("request_id")
        .filter(|id| !id.is_empty())
        .ok_or("no request_id")?;
    let model = text("model").filter(|m| !m.is_empty()).ok_or("no model")?;
    let start = text("startTime")
        .as_deref()
        .and_then(parse_litellm_time)
        .ok_or("startTime must be a date and time")?;
    let end = text("endTime").as_deref().and_then(parse_litellm_time);
    let prompt = count(int("prompt_tokens"), "prompt_tokens")?;
    let completion = count(int("completion_tokens"), "completion_tokens")?;
    let details = entry
        .pointer("/metadata/additional_usage_values")
        .or_else(|| entry.pointer("/metadata/usage_object"));
    let detail = |path: &str| {
        details
            .and_then(|d| d.pointer(path))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    };
    let cached = count(
        detail("/prompt_tokens_details/cached_tokens"),
        "cached_tokens",
    )?
    .min(prompt);
    let reasoning = count(
        detail("/completion_tokens_details/reasoning_tokens"),
        "reasoning_tokens",
    )?
    .min(completion);
    let spend = entry
        .get("spend")
        .and_then(Value::as_f64)
        .ok_or("no spend")?;
    if !(spend.is_finite() && (0.0..=MAX_COST_USD).contains(&spend)) {
        return Err(format!("spend must be a number from 0 to {MAX_COST_USD}"));
    }
    let failed = matches!(
        text("status").as_deref(),
        Some("failure") | Some("error") | Some("failed")
    );
    // The workload: the first request tag, else the team, else the key's alias.
    let tag = entry
        .get("request_tags")
        .and_then(Value::as_array)
        .and_then(|tags| tags.iter().find_map(Value::as_str))
        .map(label);
    let workload = tag
        .or_else(|| text("team_id"))
        .or_else(|| {
            entry
                .pointer("/metadata/user_api_key_alias")
                .and_then(Value::as_str)
                .map(label)
        })
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "litellm".into());
    let provider = text("custom_llm_provider")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "litellm".into());
    Ok(UsageRow {
        provider,
        // LiteLLM names models "provider/model" at times; the model is the last part.
        model: model.rsplit('/').next().unwrap_or(&model).to_string(),
        workload,
        ts_ms: start,
        prompt_tokens: prompt,
        completion_tokens: completion,
        latency_ms: end.map_or(0, |end| (end - start).clamp(0, MAX_TOKENS)),
        status: if failed { "error" } else { "ok" }.into(),
        cost_usd: spend,
        cached_tokens: cached,
        reasoning_tokens: reasoning,
        source: ExportFormat::LiteLlmSpend.name().into(),
        source_ref: Some(request_id),
        ..UsageRow::default()
    })
}

/// LiteLLM writes times as RFC 3339, or without a zone (UTC) as Python prints them.
fn parse_litellm_time(raw: &str) -> Option<i64> {
    let raw = raw.trim();
    parse_rfc3339_ms(raw).or_else(|| {
        chrono::NaiveDateTime::parse_from_str(raw, "%Y-%m-%dT%H:%M:%S%.f")
            .or_else(|_| chrono::NaiveDateTime::parse_from_str(raw, "%Y-%m-%d %H:%M:%S%.f"))
            .ok()
            .map(|t| t.and_utc().timestamp_millis())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::price_book::PriceBook;
    use crate::usage::pricing::PricingTable;

    fn builtin() -> PriceBook {
        PriceBook::builtin(&PricingTable::builtin())
    }
    use serde_json::json;

    fn micro(usd: f64) -> i64 {
        (usd * 1e6).round() as i64
    }

    #[test]
    fn an_openai_bucket_is_one_row_of_its_requests_with_cached_tokens_priced_once() {
        let page = json!({"object": "page", "has_more": false, "next_page": null, "data": [
        {"object": "bucket", "start_time": 1_730_419_200, "end_time": 1_730_505_600,
         "results": [
            {"object": "organization.usage.completions.result", "input_tokens": 1_000_000,
             "output_tokens": 100_000, "input_cached_tokens": 400_000,
             "num_model_requests": 250, "model": "gpt-4o-2024-08-06",
             "project_id": "proj_support", "api_key_id": null, "user_id": null,
             "batch": false},
            {"object": "organization.usage.completions.result", "input_tokens": 10,
             "output_tokens": 1, "input_cached_tokens": 0, "num_model_requests": 1,
             "model": null, "project_id": null, "api_key_id": null, "user_id": null,
             "batch": null},
            {"object": "organization.usage.completions.result", "input_tokens": 0,
             "output_tokens": 0, "input_cached_tokens": 0, "num_model_requests": 0,
             "model": "gpt-4o", "batch": false}
         ]}]});
        let read = read_export(
            ExportFormat::OpenAiUsage,
            page.to_string().as_bytes(),
            &builtin().for_user(&[]),
        )
        .unwrap();
        assert_eq!(read.rows.len(), 1);
        let row = &read.rows[0];
        assert_eq!(row.requests, 250);
        assert_eq!(row.workload, "proj_support");
        assert_eq!(row.ts_ms, 1_730_419_200_000);
        assert_eq!(row.cached_tokens, 400_000);
        // 600k × $2.50 + 400k × $1.25 + 100k × $10 = 1.5 + 0.5 + 1.0
        assert_eq!(micro(row.cost_usd), 3_000_000);
        assert_eq!(read.skipped.len(), 1);
        assert_eq!(read.skipped[0].index, 1);
        assert!(read.skipped[0].reason.contains("group_by=model"));
    }

    #[test]
    fn an_anthropic_report_adds_its_input_kinds_up_and_prices_each() {
        let page = json!({"has_more": false, "next_page": null, "data": [
            {"starting_at": "2026-11-01T00:00:00Z", "ending_at": "2026-11-02T00:00:00Z",
             "results": [{"uncached_input_tokens": 400_000, "cache_read_input_tokens": 500_000,
                          "cache_creation": {"ephemeral_1h_input_tokens": 0,
                                             "ephemeral_5m_input_tokens": 100_000},
                          "output_tokens": 0, "server_tool_use": {"web_search_requests": 0},
                          "api_key_id": null, "workspace_id": "wrkspc_research",
                          "model": "claude-3-5-sonnet-20241022", "service_tier": "standard",
                          "context_window": "0-200k"}]}]});
        let read = read_export(
            ExportFormat::AnthropicUsage,
            page.to_string().as_bytes(),
            &builtin().for_user(&[]),
        )
        .unwrap();
        let row = &read.rows[0];
        assert_eq!(row.prompt_tokens, 1_000_000);
        assert_eq!(
            (row.cached_tokens, row.cache_write_tokens),
            (500_000, 100_000)
        );
        assert_eq!(row.requests, 0, "the report does not count requests");
        assert_eq!(micro(row.cost_usd), 1_725_000);
        assert_eq!(row.workload, "wrkspc_research");
    }

    #[test]
    fn a_litellm_log_is_one_row_per_request_at_its_spend() {
        let log = json!([
            {"request_id": "chatcmpl-1", "call_type": "acompletion", "spend": 0.00125,
             "prompt_tokens": 300, "completion_tokens": 50, "total_tokens": 350,
             "startTime": "2026-11-03T10:00:00.000000", "endTime": "2026-11-03T10:00:01.250000",
             "model": "openai/gpt-4o-mini", "custom_llm_provider": "openai",
             "request_tags": ["support-bot"], "status": "success",
             "metadata": {"additional_usage_values": {
                 "prompt_tokens_details": {"cached_tokens": 100},
                 "completion_tokens_details": {"reasoning_tokens": 20}}}},
            {"request_id": "chatcmpl-2", "spend": 0.1, "model": "gpt-4o",
             "startTime": "not a time"}
        ]);
        let read = read_export(
            ExportFormat::LiteLlmSpend,
            log.to_string().as_bytes(),
            &builtin().for_user(&[]),
        )
        .unwrap();
        let row = &read.rows[0];
        assert_eq!(row.model, "gpt-4o-mini");
        assert_eq!(row.workload, "support-bot");
        assert_eq!(row.latency_ms, 1250);
        assert_eq!((row.cached_tokens, row.reasoning_tokens), (100, 20));
        assert_eq!(row.cost_usd, 0.00125);
        assert_eq!(row.source_ref.as_deref(), Some("chatcmpl-1"));
        assert_eq!(read.skipped[0].index, 1);
        assert!(read.skipped[0].reason.contains("startTime"));
    }

    #[test]
    fn a_file_of_another_shape_is_refused_whole() {
        let book = builtin();
        let pricing = book.for_user(&[]);
        for format in [
            ExportFormat::OpenAiUsage,
            ExportFormat::AnthropicUsage,
            ExportFormat::LiteLlmSpend,
        ] {
            assert!(read_export(format, b"{\"nope\": 1}", &pricing).is_err());
            assert!(read_export(format, b"provider,model\n", &pricing).is_err());
        }
    }
}
