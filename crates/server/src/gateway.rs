//! The LLM gateway: `/v1/chat/completions` and `/v1/embeddings` forwarded to configured
//! OpenAI-compatible upstreams, each call recorded as a usage row of the caller.
//!
//! An application points its OpenAI client at Apex's `/v1` with an API key of scope
//! `gateway`; the model name picks the upstream (`openai/gpt-4o` names it; a bare
//! `gpt-4o` goes to the upstream named like the model's provider in the pricing table, or
//! to the only upstream there is). The request body is passed on as sent, except for the
//! model's upstream name and, when streaming, `stream_options.include_usage` (so the
//! upstream reports the tokens of a stream); the response comes back as the upstream sent
//! it, status and body, a stream chunk by chunk. The model `apex` and the local model are
//! not upstreams: `http::openai_compat` answers them itself.
//!
//! Every call becomes one usage row of the key's user (source `gateway`): the upstream's
//! name as provider, the model it answered with, the workload from `X-Apex-Workload`
//! (else `gateway`), prompt, cached, completion and reasoning tokens from the upstream's
//! usage block, the latency to the last byte, `error` for a refused or broken call, and
//! the list-price cost. A stream that ends without a usage block (the upstream or the
//! client went away) is recorded with what was sent: its content chunks counted as
//! completion tokens, the prompt estimated at four characters a token.
//!
//! Shared infrastructure: the upstream table is immutable and the HTTP client internally
//! synchronised; nothing here holds a user's state between calls.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::settings::{GatewaySettings, GatewayUpstream};
use crate::store::UsageRow;
use crate::usage::price_book::UserPrices;
use crate::usage::pricing::PricingTable;
use crate::usage::stored_label;

/// The source name of the rows of gateway calls.
pub const SOURCE: &str = "gateway";
/// The workload of a call that names none.
pub const DEFAULT_WORKLOAD: &str = "gateway";

/// The upstreams and the client that reaches them.
pub struct Gateway {
    upstreams: Vec<GatewayUpstream>,
    http: reqwest::Client,
}

/// Where a model goes: the upstream and the model's name there.
pub struct Route<'a> {
    pub upstream: &'a GatewayUpstream,
    pub model: String,
}

impl Gateway {
    pub fn new(settings: &GatewaySettings) -> anyhow::Result<Self> {
        for upstream in &settings.upstreams {
            let base = upstream.base_url.trim_end_matches('/');
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                anyhow::bail!(
                    "gateway upstream {:?}: the base URL must start with http:// or https://",
                    upstream.name
                );
            }
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(settings.timeout)
            .user_agent(concat!("apex-gateway/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            upstreams: settings.upstreams.clone(),
            http,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    pub fn upstreams(&self) -> &[GatewayUpstream] {
        &self.upstreams
    }

    /// The upstream `model` goes to, if any.
    pub fn route(&self, model: &str, pricing: &PricingTable) -> Option<Route<'_>> {
        if let Some((prefix, rest)) = model.split_once('/') {
            if let Some(upstream) = self.upstreams.iter().find(|u| u.name == prefix) {
                return Some(Route {
                    upstream,
                    model: rest.to_string(),
                });
            }
        }
        let by_provider = pricing
            .lookup(model)
            .and_then(|price| self.upstreams.iter().find(|u| u.name == price.provider));
        let upstream = match by_provider {
            Some(upstream) => upstream,
            None if self.upstreams.len() == 1 => &self.upstreams[0],
            None => return None,
        };
        Some(Route {
            upstream,
            model: model.to_string(),
        })
    }

    /// Sends `body` to `path` (`chat/completions`, `embeddings`) of the route's upstream.
    pub async fn send(
        &self,
        route: &Route<'_>,
        path: &str,
        body: &Value,
    ) -> reqwest::Result<reqwest::Response> {
        let url = format!("{}/{path}", route.upstream.base_url.trim_end_matches('/'));
        let mut request = self.http.post(url).json(body);
        if let Some(key) = &route.upstream.api_key {
            request = request.bearer_auth(key.expose());
        }
        request.send().await
    }
}

/// What one call used, as read from the upstream's usage block (or estimated).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallUsage {
    /// The model the upstream says answered.
    pub model: Option<String>,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    /// Whether the upstream reported the usage (false: estimated from what was sent).
    pub reported: bool,
}

impl CallUsage {
    /// Reads OpenAI's `usage` block (chat completions and embeddings) of `body`.
    pub fn read(&mut self, body: &Value) {
        if let Some(model) = body.get("model").and_then(Value::as_str) {
            self.model = Some(model.to_string());
        }
        let Some(usage) = body.get("usage").filter(|u| u.is_object()) else {
            return;
        };
        let count = |v: Option<&Value>| v.and_then(Value::as_i64).unwrap_or(0).max(0);
        self.prompt_tokens = count(usage.get("prompt_tokens"));
        self.completion_tokens = count(usage.get("completion_tokens"));
        self.cached_tokens =
            count(usage.pointer("/prompt_tokens_details/cached_tokens")).min(self.prompt_tokens);
        self.reasoning_tokens = count(usage.pointer("/completion_tokens_details/reasoning_tokens"))
            .min(self.completion_tokens);
        self.reported = true;
    }
}

/// Reads a server-sent event stream as it passes: the usage block of its last chunk, and
/// how many content chunks went by (the estimate when no usage block comes).
#[derive(Debug, Default)]
pub struct StreamWatch {
    pending: Vec<u8>,
    pub usage: CallUsage,
    pub content_chunks: i64,
    pub done: bool,
}

impl StreamWatch {
    /// Looks at the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.line(&line);
        }
        // A line longer than any chunk an upstream sends is not one to read.
        if self.pending.len() > 1 << 20 {
            self.pending.clear();
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Ok(line) = std::str::from_utf8(line) else {
            return;
        };
        let Some(data) = line.trim_end().strip_prefix("data:") else {
            return;
        };
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else {
            return;
        };
        let has_content = chunk
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
            .is_some_and(|c| !c.is_empty());
        if has_content {
            self.content_chunks += 1;
        }
        self.usage.read(&chunk);
    }
}

/// What the gateway knows of a finished call, for its usage row.
pub struct FinishedCall<'a> {
    pub upstream: &'a str,
    pub requested_model: &'a str,
    pub workload: &'a str,
    pub usage: CallUsage,
    /// Characters of the request's messages or input: the prompt estimate when the
    /// upstream reported no usage.
    pub prompt_chars: usize,
    pub started: Instant,
    pub succeeded: bool,
    pub now_ms: i64,
}

/// The usage row of a call, costed with the caller's prices (a model without a price
/// costs 0 and names no price version: the tokens are still worth recording).
pub fn usage_row(call: FinishedCall<'_>, prices: &UserPrices<'_>) -> UsageRow {
    let mut usage = call.usage;
    if !usage.reported {
        // Nothing reported (a cut stream, a refused call): what was sent.
        usage.prompt_tokens = i64::try_from(call.prompt_chars.div_ceil(4)).unwrap_or(i64::MAX);
        usage.completion_tokens = usage.completion_tokens.max(0);
    }
    let model = usage
        .model
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| call.requested_model.to_string());
    let mut row = UsageRow {
        provider: stored_label(call.upstream),
        model: stored_label(&model),
        workload: stored_label(call.workload),
        ts_ms: call.now_ms,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        latency_ms: i64::try_from(call.started.elapsed().as_millis()).unwrap_or(i64::MAX),
        status: if call.succeeded { "ok" } else { "error" }.into(),
        cached_tokens: usage.cached_tokens,
        reasoning_tokens: usage.reasoning_tokens,
        source: SOURCE.into(),
        ..UsageRow::default()
    };
    let _ = prices.price_row(&mut row, false);
    row
}

/// Characters of a chat request's messages (text content) or an embedding request's input.
pub fn prompt_chars(body: &Value) -> usize {
    fn text_len(value: &Value) -> usize {
        match value {
            Value::String(s) => s.chars().count(),
            Value::Array(items) => items.iter().map(text_len).sum(),
            Value::Object(map) => map
                .iter()
                .filter(|(k, _)| k.as_str() == "content" || k.as_str() == "text")
                .map(|(_, v)| text_len(v))
                .sum(),
            _ => 0,
        }
    }
    body.get("messages")
        .or_else(|| body.get("input"))
        .map_or(0, text_len)
}

/// The gateway of `settings`, shared by every request.
#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gateway(names: &[&str]) -> Gateway {
        Gateway::new(&GatewaySettings {
            upstreams: names
                .iter()
                .map(|n| GatewayUpstream {
                    name: n.to_string(),
                    base_url: format!("http://127.0.0.1:9/{n}"),
                    api_key: None,
                })
                .collect(),
            ..GatewaySettings::default()
        })
        .unwrap()
    }

    #[test]
    fn a_model_goes_to_the_upstream_it_names_or_its_providers() {
        let pricing = PricingTable::builtin();
        let two = gateway(&["openai", "anthropic"]);
        let route = two.route("anthropic/claude-3-5-haiku", &pricing).unwrap();
        assert_eq!(
            (route.upstream.name.as_str(), route.model.as_str()),
            ("anthropic", "claude-3-5-haiku")
        );
        let route = two.route("gpt-4o-mini", &pricing).unwrap();
        assert_eq!(
            (route.upstream.name.as_str(), route.model.as_str()),
            ("openai", "gpt-4o-mini")
        );
        assert!(two.route("llama-unknown", &pricing).is_none());
        let one = gateway(&["vllm"]);
        assert_eq!(
            one.route("llama-unknown", &pricing).unwrap().upstream.name,
            "vllm"
        );
        assert!(gateway(&[]).route("gpt-4o", &pricing).is_none());
    }

    #[test]
    fn a_stream_gives_its_usage_block_or_its_chunk_count() {
        let mut watch = StreamWatch::default();
        let stream = concat!(
            "data: {\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n",
            "\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,",
            "\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\ndata: [DONE]\n\n"
        );
        // Split mid-line, as the network does.
        for piece in stream.as_bytes().chunks(7) {
            watch.feed(piece);
        }
        assert!(watch.done);
        assert_eq!(watch.content_chunks, 2);
        assert_eq!(
            (
                watch.usage.prompt_tokens,
                watch.usage.cached_tokens,
                watch.usage.completion_tokens
            ),
            (12, 4, 2)
        );
        assert_eq!(watch.usage.model.as_deref(), Some("gpt-4o-2024-08-06"));
    }

    #[test]
    fn a_call_without_reported_usage_is_recorded_with_what_was_sent() {
        let book = crate::usage::price_book::PriceBook::builtin(&PricingTable::builtin());
        let pricing = book.for_user(&[]);
        let body =
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "12345678"}]});
        let row = usage_row(
            FinishedCall {
                upstream: "openai",
                requested_model: "gpt-4o",
                workload: "w",
                usage: CallUsage {
                    completion_tokens: 3,
                    ..CallUsage::default()
                },
                prompt_chars: prompt_chars(&body),
                started: Instant::now(),
                succeeded: false,
                // 2026-11-01: today's gpt-4o price.
                now_ms: 1_793_491_200_000,
            },
            &pricing,
        );
        assert_eq!((row.prompt_tokens, row.completion_tokens), (2, 3));
        assert_eq!(row.status, "error");
        assert_eq!(row.source, "gateway");
        assert!(row.cost_usd > 0.0);
        assert_eq!(
            row.price_version.as_deref(),
            Some("builtin:openai/gpt-4o@2024-10-02")
        );
    }
}
