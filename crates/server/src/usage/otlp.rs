//! OpenTelemetry ingestion: OTLP trace batches (protobuf or JSON) read into usage rows.
//!
//! Applications already instrumented with OpenTelemetry's GenAI semantic conventions send
//! their spans to `POST /otlp/v1/traces`. A span is an LLM call when it carries
//! `gen_ai.provider.name` (or the older `gen_ai.system`) or a `gen_ai.usage.*` count; other
//! spans are ignored, not rejected. Each call becomes one usage row of the key's owner
//! (whatever user the span names), source `otlp`, keyed by its trace and span id so a batch
//! sent twice (exporters retry) is stored once.
//!
//! Token classes follow the conventions: `gen_ai.usage.input_tokens` includes cached input
//! (`gen_ai.usage.cache_read.input_tokens`) and cache writes
//! (`gen_ai.usage.cache_creation.input_tokens`); when an instrumentation counted them
//! apart (its cached count exceeds its input count, as Anthropic's API reports them) they
//! are added up, so a cached token is never counted twice nor lost. Reasoning tokens are
//! part of the output tokens.
//!
//! The messages are declared here with prost's derive, only the fields Apex reads, with
//! the field numbers of opentelemetry-proto's `trace.proto` and `common.proto` (unknown
//! fields are skipped by the decoder). The JSON form follows OTLP/JSON: lowerCamelCase
//! keys, hex trace and span ids, 64-bit integers as strings or numbers.

use std::collections::HashMap;

use serde::Deserialize;

use super::import::{MAX_COST_USD, MAX_TOKENS};
use super::price_book::UserPrices;
use super::stored_label as label;
use crate::store::UsageRow;

/// The source name of rows from spans.
pub const SOURCE: &str = "otlp";

/// `opentelemetry.proto.collector.trace.v1.ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<Span>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Span {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub name: String,
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(string, tag = "2")]
    pub message: String,
    /// 0 unset, 1 ok, 2 error.
    #[prost(int32, tag = "3")]
    pub code: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

/// `AnyValue` without its array, key-value list and bytes forms, which no attribute Apex
/// reads takes (the decoder skips them).
#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    #[prost(oneof = "Value", tags = "1, 2, 3, 4")]
    pub value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(string, tag = "1")]
    String(String),
    #[prost(bool, tag = "2")]
    Bool(bool),
    #[prost(int64, tag = "3")]
    Int(i64),
    #[prost(double, tag = "4")]
    Double(f64),
}

/// `ExportTraceServiceResponse`: empty when every span was taken.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceResponse {
    #[prost(message, optional, tag = "1")]
    pub partial_success: Option<ExportTracePartialSuccess>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTracePartialSuccess {
    #[prost(int64, tag = "1")]
    pub rejected_spans: i64,
    #[prost(string, tag = "2")]
    pub error_message: String,
}

/// `google.rpc.Status`, the body of OTLP/HTTP's error answers in protobuf.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

/// Decodes a protobuf batch.
pub fn decode_protobuf(body: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    <ExportTraceServiceRequest as prost::Message>::decode(body)
        .map_err(|e| format!("not an OTLP protobuf trace export: {e}"))
}

/// Decodes an OTLP/JSON batch into the same messages as protobuf.
pub fn decode_json(body: &[u8]) -> Result<ExportTraceServiceRequest, String> {
    let request: json::Request =
        serde_json::from_slice(body).map_err(|e| format!("not an OTLP/JSON trace export: {e}"))?;
    request.into_message()
}

/// The serde forms of OTLP/JSON.
mod json {
    use serde::Deserialize;

    use super::{
        AnyValue, ExportTraceServiceRequest, KeyValue, Resource, ResourceSpans, ScopeSpans, Span,
        Status, Value,
    };

    /// A 64-bit integer, which OTLP/JSON writes as a string (and some senders as a number).
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum Int {
        Number(i64),
        Text(String),
    }

    impl Int {
        fn value(&self) -> Result<i64, String> {
            match self {
                Int::Number(n) => Ok(*n),
                Int::Text(t) => t
                    .trim()
                    .parse()
                    .map_err(|_| format!("{t:?} is not an integer")),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub(super) struct Request {
        #[serde(default, alias = "resource_spans")]
        resource_spans: Vec<JsonResourceSpans>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct JsonResourceSpans {
        #[serde(default)]
        resource: Option<JsonResource>,
        #[serde(default, alias = "scope_spans")]
        scope_spans: Vec<JsonScopeSpans>,
    }

    #[derive(Deserialize)]
    struct JsonResource {
        #[serde(default)]
        attributes: Vec<JsonKeyValue>,
    }

    #[derive(Deserialize)]
    struct JsonScopeSpans {
        #[serde(default)]
        spans: Vec<JsonSpan>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct JsonSpan {
        #[serde(default, alias = "trace_id")]
        trace_id: String,
        #[serde(default, alias = "span_id")]
        span_id: String,
        #[serde(default)]
        name: String,
        #[serde(default, alias = "start_time_unix_nano")]
        start_time_unix_nano: Option<Int>,
        #[serde(default, alias = "end_time_unix_nano")]
        end_time_unix_nano: Option<Int>,
        #[serde(default)]
        attributes: Vec<JsonKeyValue>,
        #[serde(default)]
        status: Option<JsonStatus>,
    }

    #[derive(Deserialize)]
    struct JsonStatus {
        #[serde(default)]
        message: String,
        #[serde(default)]
        code: Option<serde_json::Value>,
    }

    #[derive(Deserialize)]
    struct JsonKeyValue {
        key: String,
        #[serde(default)]
        value: Option<JsonAnyValue>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct JsonAnyValue {
        #[serde(default, alias = "string_value")]
        string_value: Option<String>,
        #[serde(default, alias = "bool_value")]
        bool_value: Option<bool>,
        #[serde(default, alias = "int_value")]
        int_value: Option<Int>,
        #[serde(default, alias = "double_value")]
        double_value: Option<f64>,
    }

    fn hex(raw: &str, what: &str) -> Result<Vec<u8>, String> {
        let raw = raw.trim();
        if !raw.len().is_multiple_of(2) || !raw.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{what} must be hex"));
        }
        (0..raw.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&raw[i..i + 2], 16).map_err(|e| e.to_string()))
            .collect()
    }

    fn attributes(list: Vec<JsonKeyValue>) -> Result<Vec<KeyValue>, String> {
        list.into_iter()
            .map(|kv| {
                let value = match kv.value {
                    None => None,
                    Some(v) => {
                        let value = if let Some(s) = v.string_value {
                            Some(Value::String(s))
                        } else if let Some(b) = v.bool_value {
                            Some(Value::Bool(b))
                        } else if let Some(i) = v.int_value {
                            Some(Value::Int(i.value()?))
                        } else {
                            v.double_value.map(Value::Double)
                        };
                        Some(AnyValue { value })
                    }
                };
                Ok(KeyValue { key: kv.key, value })
            })
            .collect()
    }

    fn nanos(value: Option<Int>) -> Result<u64, String> {
        match value {
            None => Ok(0),
            Some(v) => u64::try_from(v.value()?).map_err(|_| "times must not be negative".into()),
        }
    }

    impl Request {
        pub(super) fn into_message(self) -> Result<ExportTraceServiceRequest, String> {
            let mut resource_spans = Vec::with_capacity(self.resource_spans.len());
            for rs in self.resource_spans {
                let resource = match rs.resource {
                    Some(r) => Some(Resource {
                        attributes: attributes(r.attributes)?,
                    }),
                    None => None,
                };
                let mut scope_spans = Vec::with_capacity(rs.scope_spans.len());
                for ss in rs.scope_spans {
                    let mut spans = Vec::with_capacity(ss.spans.len());
                    for span in ss.spans {
                        let status = span.status.map(|s| Status {
                            message: s.message,
                            code: match s.code {
                                Some(serde_json::Value::Number(n)) => {
                                    n.as_i64().unwrap_or(0) as i32
                                }
                                Some(serde_json::Value::String(name)) => match name.as_str() {
                                    "STATUS_CODE_OK" => 1,
                                    "STATUS_CODE_ERROR" => 2,
                                    _ => 0,
                                },
                                _ => 0,
                            },
                        });
                        spans.push(Span {
                            trace_id: hex(&span.trace_id, "traceId")?,
                            span_id: hex(&span.span_id, "spanId")?,
                            name: span.name,
                            start_time_unix_nano: nanos(span.start_time_unix_nano)?,
                            end_time_unix_nano: nanos(span.end_time_unix_nano)?,
                            attributes: attributes(span.attributes)?,
                            status,
                        });
                    }
                    scope_spans.push(ScopeSpans { spans });
                }
                resource_spans.push(ResourceSpans {
                    resource,
                    scope_spans,
                });
            }
            Ok(ExportTraceServiceRequest { resource_spans })
        }
    }
}

/// The rows of a batch, and what was rejected.
#[derive(Debug, Default)]
pub struct SpanRows {
    pub rows: Vec<UsageRow>,
    /// GenAI spans that could not be used.
    pub rejected: i64,
    /// Why, for the first few rejected spans (OTLP's `error_message`).
    pub reasons: Vec<String>,
}

/// How many reasons the answer lists.
const MAX_REASONS: usize = 5;

/// The usage rows of a batch's GenAI spans.
pub fn rows_of(request: &ExportTraceServiceRequest, prices: &UserPrices<'_>) -> SpanRows {
    let mut out = SpanRows::default();
    for rs in &request.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| attribute_map(&r.attributes))
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                let attrs = attribute_map(&span.attributes);
                if !is_gen_ai(&attrs) {
                    continue;
                }
                match span_row(span, &attrs, &resource, prices) {
                    Ok(row) => out.rows.push(row),
                    Err(reason) => {
                        out.rejected += 1;
                        if out.reasons.len() < MAX_REASONS {
                            out.reasons.push(format!("span {:?}: {reason}", span.name));
                        }
                    }
                }
            }
        }
    }
    out
}

type Attributes<'a> = HashMap<&'a str, &'a Value>;

fn attribute_map(list: &[KeyValue]) -> Attributes<'_> {
    list.iter()
        .filter_map(|kv| Some((kv.key.as_str(), kv.value.as_ref()?.value.as_ref()?)))
        .collect()
}

fn is_gen_ai(attrs: &Attributes<'_>) -> bool {
    attrs.contains_key("gen_ai.provider.name")
        || attrs.contains_key("gen_ai.system")
        || attrs.keys().any(|k| k.starts_with("gen_ai.usage."))
}

fn text<'a>(attrs: &Attributes<'a>, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| match attrs.get(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim()),
        _ => None,
    })
}

/// The first of `keys` present, as a token count (ints, or doubles and strings holding
/// whole numbers, as some SDKs write them).
fn tokens(attrs: &Attributes<'_>, keys: &[&str]) -> Result<i64, String> {
    for key in keys {
        let value = match attrs.get(key) {
            None => continue,
            Some(Value::Int(i)) => Some(*i),
            Some(Value::Double(d)) if d.fract() == 0.0 && d.abs() < 1e15 => Some(*d as i64),
            Some(Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        return match value {
            Some(n) if (0..=MAX_TOKENS).contains(&n) => Ok(n),
            _ => Err(format!(
                "{key} must be a whole number from 0 to {MAX_TOKENS}"
            )),
        };
    }
    Ok(0)
}

fn span_row(
    span: &Span,
    attrs: &Attributes<'_>,
    resource: &Attributes<'_>,
    prices: &UserPrices<'_>,
) -> Result<UsageRow, String> {
    if span.trace_id.len() != 16 || span.span_id.len() != 8 {
        return Err("a span needs a 16-byte trace id and an 8-byte span id".into());
    }
    let model = text(attrs, &["gen_ai.response.model", "gen_ai.request.model"])
        .map(label)
        .ok_or("no gen_ai.response.model or gen_ai.request.model")?;
    let provider = text(attrs, &["gen_ai.provider.name", "gen_ai.system"])
        .map(label)
        .unwrap_or_else(|| "unknown".into());
    let input = tokens(
        attrs,
        &["gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"],
    )?;
    let output = tokens(
        attrs,
        &[
            "gen_ai.usage.output_tokens",
            "gen_ai.usage.completion_tokens",
        ],
    )?;
    let cached = tokens(
        attrs,
        &[
            "gen_ai.usage.cache_read.input_tokens",
            "gen_ai.usage.cache_read_input_tokens",
            "gen_ai.usage.input_tokens.cached",
        ],
    )?;
    let written = tokens(
        attrs,
        &[
            "gen_ai.usage.cache_creation.input_tokens",
            "gen_ai.usage.cache_creation_input_tokens",
            "gen_ai.usage.input_tokens.cache_write",
        ],
    )?;
    let reasoning = tokens(
        attrs,
        &[
            "gen_ai.usage.reasoning.output_tokens",
            "gen_ai.usage.output_tokens.reasoning",
            "gen_ai.usage.reasoning_tokens",
        ],
    )?;
    // The conventions count cache reads and writes within the input; an instrumentation
    // that counted them apart (more cached than input) has them added.
    let prompt = if cached + written > input {
        input + cached + written
    } else {
        input
    };
    let completion = output.max(reasoning);
    let sent_cost = match attrs.get("gen_ai.usage.cost") {
        Some(Value::Double(cost)) if cost.is_finite() && (0.0..=MAX_COST_USD).contains(cost) => {
            Some(*cost)
        }
        Some(_) => return Err(format!("gen_ai.usage.cost must be 0 to {MAX_COST_USD}")),
        None => None,
    };
    let workload = text(attrs, &["apex.workload"])
        .or_else(|| text(resource, &["apex.workload", "service.name"]))
        .map(label)
        .unwrap_or_else(|| SOURCE.into());
    let start_ms = i64::try_from(span.start_time_unix_nano / 1_000_000)
        .map_err(|_| "start time out of range")?;
    let latency_ms = span
        .end_time_unix_nano
        .saturating_sub(span.start_time_unix_nano)
        / 1_000_000;
    let failed =
        span.status.as_ref().is_some_and(|s| s.code == 2) || attrs.contains_key("error.type");
    let mut row = UsageRow {
        provider,
        model,
        workload,
        ts_ms: start_ms,
        prompt_tokens: prompt.min(MAX_TOKENS),
        completion_tokens: completion,
        latency_ms: i64::try_from(latency_ms)
            .unwrap_or(MAX_TOKENS)
            .min(MAX_TOKENS),
        status: if failed { "error" } else { "ok" }.into(),
        cached_tokens: cached.min(prompt),
        cache_write_tokens: written.min(prompt - cached.min(prompt)),
        reasoning_tokens: reasoning,
        source: SOURCE.into(),
        source_ref: Some(format!(
            "{}-{}",
            hex_of(&span.trace_id),
            hex_of(&span.span_id)
        )),
        ..UsageRow::default()
    };
    match sent_cost {
        Some(cost) => row.cost_usd = cost,
        None => prices
            .price_row(&mut row, false)
            .map_err(|reason| format!("{reason}; send gen_ai.usage.cost"))?,
    }
    if row.cost_usd > MAX_COST_USD {
        return Err(format!("costs more than {MAX_COST_USD} USD"));
    }
    Ok(row)
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `ExportTraceServiceResponse` as OTLP/JSON.
#[derive(Debug, serde::Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JsonResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_success: Option<JsonPartialSuccess>,
}

#[derive(Debug, serde::Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JsonPartialSuccess {
    /// A string, as OTLP/JSON writes 64-bit integers.
    pub rejected_spans: String,
    pub error_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::price_book::PriceBook;
    use crate::usage::pricing::PricingTable;

    fn builtin() -> PriceBook {
        PriceBook::builtin(&PricingTable::builtin())
    }
    use prost::Message as _;
    use serde_json::json;

    fn kv(key: &str, value: Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
        }
    }

    fn batch(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", Value::String("support-bot".into()))],
                }),
                scope_spans: vec![ScopeSpans { spans }],
            }],
        }
    }

    fn chat_span(span_id: u8, attrs: Vec<KeyValue>) -> Span {
        Span {
            trace_id: vec![7; 16],
            span_id: vec![span_id; 8],
            name: "chat gpt-4o".into(),
            start_time_unix_nano: 1_790_000_000_000_000_000,
            end_time_unix_nano: 1_790_000_000_850_000_000,
            attributes: attrs,
            status: None,
        }
    }

    #[test]
    fn a_gen_ai_span_is_a_row_with_its_cached_tokens_priced_once() {
        let request = batch(vec![
            chat_span(
                1,
                vec![
                    kv("gen_ai.provider.name", Value::String("openai".into())),
                    kv("gen_ai.request.model", Value::String("gpt-4o".into())),
                    kv(
                        "gen_ai.response.model",
                        Value::String("gpt-4o-2024-08-06".into()),
                    ),
                    kv("gen_ai.usage.input_tokens", Value::Int(1_000_000)),
                    kv("gen_ai.usage.cache_read.input_tokens", Value::Int(400_000)),
                    kv("gen_ai.usage.output_tokens", Value::Int(100_000)),
                ],
            ),
            // Not an LLM call: ignored, not rejected.
            chat_span(2, vec![kv("http.method", Value::String("GET".into()))]),
        ]);
        // Through the wire format and back.
        let decoded = decode_protobuf(&request.encode_to_vec()).unwrap();
        let out = rows_of(&decoded, &builtin().for_user(&[]));
        assert_eq!((out.rows.len(), out.rejected), (1, 0));
        let row = &out.rows[0];
        assert_eq!(row.model, "gpt-4o-2024-08-06");
        assert_eq!(row.workload, "support-bot");
        assert_eq!(row.latency_ms, 850);
        assert_eq!((row.prompt_tokens, row.cached_tokens), (1_000_000, 400_000));
        assert_eq!((row.cost_usd * 1e6).round() as i64, 3_000_000);
        assert_eq!(
            row.source_ref.as_deref(),
            Some("07070707070707070707070707070707-0101010101010101")
        );
    }

    #[test]
    fn spans_that_cannot_be_used_are_counted_with_a_reason() {
        let request = batch(vec![
            chat_span(
                1,
                vec![
                    kv("gen_ai.system", Value::String("openai".into())),
                    kv("gen_ai.usage.input_tokens", Value::Int(5)),
                ],
            ),
            chat_span(
                2,
                vec![
                    kv("gen_ai.system", Value::String("acme".into())),
                    kv("gen_ai.request.model", Value::String("acme-1".into())),
                    kv("gen_ai.usage.input_tokens", Value::Int(-5)),
                ],
            ),
        ]);
        let out = rows_of(&request, &builtin().for_user(&[]));
        assert_eq!((out.rows.len(), out.rejected), (0, 2));
        assert!(out.reasons[0].contains("model"), "{:?}", out.reasons);
        assert!(out.reasons[1].contains("input_tokens"), "{:?}", out.reasons);
    }

    #[test]
    fn otlp_json_reads_like_protobuf() {
        let body = json!({"resourceSpans": [{
            "resource": {"attributes": [{"key": "service.name",
                                         "value": {"stringValue": "support-bot"}}]},
            "scopeSpans": [{"scope": {"name": "x"}, "spans": [{
                "traceId": "07070707070707070707070707070707",
                "spanId": "0101010101010101",
                "name": "chat gpt-4o", "kind": 3,
                "startTimeUnixNano": "1790000000000000000",
                "endTimeUnixNano": "1790000000850000000",
                "attributes": [
                    {"key": "gen_ai.provider.name", "value": {"stringValue": "openai"}},
                    {"key": "gen_ai.response.model", "value": {"stringValue": "gpt-4o-2024-08-06"}},
                    {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "1000000"}},
                    {"key": "gen_ai.usage.cache_read.input_tokens", "value": {"intValue": 400000}},
                    {"key": "gen_ai.usage.output_tokens", "value": {"intValue": "100000"}}
                ],
                "status": {"code": 2, "message": "boom"}
            }]}]
        }]});
        let decoded = decode_json(body.to_string().as_bytes()).unwrap();
        let out = rows_of(&decoded, &builtin().for_user(&[]));
        let row = &out.rows[0];
        assert_eq!(row.status, "error");
        assert_eq!((row.cost_usd * 1e6).round() as i64, 3_000_000);
        assert_eq!(
            row.source_ref.as_deref(),
            Some("07070707070707070707070707070707-0101010101010101")
        );
        assert!(decode_json(
            b"{\"resourceSpans\": [{\"scopeSpans\": [{\"spans\": [{\"traceId\": \"zz\"}]}]}]}"
        )
        .is_err());
        assert!(decode_protobuf(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn cache_counts_reported_apart_from_the_input_are_added_to_it() {
        let request = batch(vec![chat_span(
            1,
            vec![
                kv("gen_ai.system", Value::String("anthropic".into())),
                kv(
                    "gen_ai.request.model",
                    Value::String("claude-3-5-sonnet".into()),
                ),
                kv("gen_ai.usage.input_tokens", Value::Int(400_000)),
                kv("gen_ai.usage.cache_read_input_tokens", Value::Int(500_000)),
                kv(
                    "gen_ai.usage.cache_creation_input_tokens",
                    Value::Int(100_000),
                ),
                kv("gen_ai.usage.output_tokens", Value::Int(0)),
            ],
        )]);
        let out = rows_of(&request, &builtin().for_user(&[]));
        let row = &out.rows[0];
        assert_eq!(row.prompt_tokens, 1_000_000);
        assert_eq!((row.cost_usd * 1e6).round() as i64, 1_725_000);
    }
}
