//! `OpenAiClient`: any OpenAI-compatible chat-completions server as an [`LlmProvider`].
//!
//! Works with OpenAI, vLLM, Ollama, llama.cpp's server and LM Studio: `POST
//! {base_url}/chat/completions` with `stream: true`, read as server-sent events
//! (`data: {chunk}` lines, `data: [DONE]` at the end). A request with a
//! [`ResponseSchema`](super::ResponseSchema) asks for JSON-schema structured output
//! (`response_format: {type: "json_schema"}`); callers still validate what comes back.
//!
//! Robustness: a connect timeout, a timeout for the response to start and between two
//! chunks, retries with exponential backoff (or the server's `Retry-After`) on 429, 5xx and
//! connection failures before any text was streamed, and errors mapped to [`LlmError`]
//! variants (which become `LLM_FAILED` agent errors with a clear message). The API key is a
//! [`Secret`](crate::settings::Secret): sent as a bearer token, never logged or shown.
//!
//! Shared infrastructure: one connection pool, immutable settings, no per-user state.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{LlmError, LlmProvider, LlmRequest, TextStream, TokenMeter, TokenUsage};
use crate::settings::OpenAiSettings;

pub struct OpenAiClient {
    http: reqwest::Client,
    settings: OpenAiSettings,
    url: String,
}

impl std::fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("url", &self.url)
            .field("model", &self.settings.model)
            .finish_non_exhaustive()
    }
}

/// Longest `Retry-After` honoured, so a hostile or confused server cannot park a run.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

impl OpenAiClient {
    pub fn new(settings: OpenAiSettings) -> Result<Self, LlmError> {
        let base = settings.base_url.trim_end_matches('/');
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(LlmError::Config(format!(
                "the OpenAI base URL must start with http:// or https://, got {base:?}"
            )));
        }
        let url = format!("{base}/chat/completions");
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.timeout)
            .user_agent(concat!("apex/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LlmError::Config(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            settings,
            url,
        })
    }

    pub fn model(&self) -> &str {
        &self.settings.model
    }

    fn body(&self, request: &LlmRequest, stream: bool) -> Value {
        let messages: Vec<Value> = request
            .messages
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect();
        let mut body = json!({
            "model": self.settings.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "stream": stream,
        });
        if stream {
            // Ask for the token counts in a last chunk (OpenAI, vLLM, llama.cpp, Ollama).
            body["stream_options"] = json!({"include_usage": true});
        }
        if let Some(t) = request.temperature {
            body["temperature"] = json!(t);
        }
        if !request.stop.is_empty() {
            // OpenAI takes at most four; [`crate::llm::stop::stop_at`] applies them all anyway.
            body["stop"] = json!(request.stop.iter().take(4).collect::<Vec<_>>());
        }
        if let (Some(schema), true) = (&request.schema, self.settings.structured_output) {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": schema.name, "schema": schema.schema, "strict": true},
            });
        }
        body
    }

    /// Sends `body`, retrying on 429, 5xx and connection failures. Returns a 2xx response.
    async fn send(
        &self,
        body: &Value,
        cancel: &CancellationToken,
    ) -> Result<reqwest::Response, LlmError> {
        let mut attempt = 0u32;
        loop {
            let mut builder = self.http.post(&self.url).json(body);
            if let Some(key) = &self.settings.api_key {
                builder = builder.bearer_auth(key.expose());
            }
            // The whole wait for the response head is bounded, not only each read.
            let sent = tokio::select! {
                _ = cancel.cancelled() => return Err(LlmError::Cancelled),
                sent = tokio::time::timeout(self.settings.timeout, builder.send()) => sent,
            };
            let (error, retry_after) = match sent {
                Err(_) => (
                    LlmError::Timeout(format!(
                        "no response within {} s",
                        self.settings.timeout.as_secs_f32()
                    )),
                    None,
                ),
                Ok(Err(err)) if err.is_timeout() => (LlmError::Timeout(err.to_string()), None),
                Ok(Err(err)) => (
                    LlmError::Unavailable(format!(
                        "could not reach the provider: {}",
                        without_url(&err)
                    )),
                    None,
                ),
                Ok(Ok(response)) if response.status().is_success() => return Ok(response),
                Ok(Ok(response)) => {
                    let status = response.status();
                    let retry_after = retry_after(&response);
                    let detail = error_detail(response).await;
                    let error = match status.as_u16() {
                        401 | 403 => {
                            return Err(LlmError::Auth(format!(
                                "the provider refused the API key ({status}): {detail}"
                            )))
                        }
                        429 => LlmError::RateLimited(format!("{status}: {detail}")),
                        500..=599 => LlmError::Unavailable(format!("{status}: {detail}")),
                        _ => {
                            return Err(LlmError::Provider(format!(
                                "the provider rejected the request ({status}): {detail}"
                            )))
                        }
                    };
                    (error, retry_after)
                }
            };
            if attempt >= self.settings.max_retries {
                return Err(error);
            }
            let backoff = self
                .settings
                .retry_backoff
                .saturating_mul(2u32.saturating_pow(attempt));
            let delay = retry_after.unwrap_or(backoff).min(MAX_RETRY_AFTER);
            attempt += 1;
            tracing::warn!(
                attempt,
                delay_ms = delay.as_millis() as u64,
                error = %error,
                "LLM request failed; retrying"
            );
            tokio::select! {
                _ = cancel.cancelled() => return Err(LlmError::Cancelled),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// A non-streaming completion; returns the message content.
    pub async fn complete(
        &self,
        request: &LlmRequest,
        cancel: &CancellationToken,
    ) -> Result<String, LlmError> {
        let response = self.send(&self.body(request, false), cancel).await?;
        let body: Value = tokio::select! {
            _ = cancel.cancelled() => return Err(LlmError::Cancelled),
            body = response.json() => body.map_err(|e| LlmError::InvalidResponse(format!("reading the completion: {}", without_url(&e))))?,
        };
        if let Some(usage) = usage_of(&body) {
            request.tokens.add(usage);
        }
        body["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| {
                LlmError::InvalidResponse("the completion has no message content".into())
            })
    }
}

/// The error text without the URL (which may carry credentials in its user-info part).
fn without_url(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    if let Some(url) = err.url() {
        text = text.replace(url.as_str(), "<provider>");
    }
    text
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(MAX_RETRY_AFTER.as_secs_f64())))
}

/// The provider's error message (`{"error": {"message": ...}}`), shortened.
async fn error_detail(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(text);
    let mut message: String = message.chars().take(300).collect();
    if message.is_empty() {
        message = "no detail".into();
    }
    message
}

/// Splits a server-sent-event byte stream into `data:` payloads.
#[derive(Default)]
struct SseParser {
    buffer: Vec<u8>,
}

impl SseParser {
    /// Adds bytes; returns the complete `data:` payloads they finished.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(newline) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=newline).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(data) = line.strip_prefix("data:") {
                out.push(data.trim_start().to_string());
            }
        }
        out
    }
}

/// What one streamed chunk means.
enum Chunk {
    Text(String),
    Nothing,
    /// The answer is complete (`finish_reason`); a chunk with the token counts may follow.
    Finished,
    Done,
}

/// The `usage` object of a completion or of a streamed chunk.
fn usage_of(value: &Value) -> Option<TokenUsage> {
    let usage = value.get("usage")?;
    Some(TokenUsage {
        prompt_tokens: usage["prompt_tokens"].as_u64()?,
        completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
    })
}

/// How long to wait after `finish_reason` for the chunk with the token counts: servers
/// that send none would otherwise hold the answer open until the stall timeout.
const USAGE_GRACE: Duration = Duration::from_secs(2);

fn parse_chunk(data: &str, tokens: &TokenMeter) -> Result<Chunk, LlmError> {
    if data == "[DONE]" {
        return Ok(Chunk::Done);
    }
    let value: Value = serde_json::from_str(data)
        .map_err(|e| LlmError::InvalidResponse(format!("a streamed chunk is not JSON: {e}")))?;
    if let Some(message) = value["error"]["message"].as_str() {
        return Err(LlmError::Provider(format!(
            "the provider failed mid-answer: {message}"
        )));
    }
    if let Some(usage) = usage_of(&value) {
        tokens.add(usage);
    }
    let choice = &value["choices"][0];
    let text = choice["delta"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !text.is_empty() {
        return Ok(Chunk::Text(text));
    }
    if choice["finish_reason"].is_string() {
        return Ok(Chunk::Finished);
    }
    Ok(Chunk::Nothing)
}

#[async_trait]
impl LlmProvider for OpenAiClient {
    fn name(&self) -> &str {
        "openai"
    }

    fn model_name(&self) -> &str {
        &self.settings.model
    }

    async fn stream(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<TextStream, LlmError> {
        let response = self.send(&self.body(&request, true), &cancel).await?;
        let stops = request.stop.clone();
        let chunk_timeout = self.settings.timeout;
        let bytes = response.bytes_stream();
        struct State<S> {
            bytes: S,
            parser: SseParser,
            pending: std::collections::VecDeque<String>,
            cancel: CancellationToken,
            tokens: TokenMeter,
            /// `finish_reason` arrived: only the usage chunk and `[DONE]` may follow.
            finished: bool,
            done: bool,
        }
        let state = State {
            bytes: Box::pin(bytes),
            parser: SseParser::default(),
            pending: Default::default(),
            cancel,
            tokens: request.tokens.clone(),
            finished: false,
            done: false,
        };
        let stream = futures_util::stream::unfold(state, move |mut state| async move {
            loop {
                if state.done {
                    return None;
                }
                if let Some(data) = state.pending.pop_front() {
                    match parse_chunk(&data, &state.tokens) {
                        Ok(Chunk::Text(text)) => return Some((Ok(text), state)),
                        Ok(Chunk::Nothing) => continue,
                        Ok(Chunk::Finished) => {
                            state.finished = true;
                            continue;
                        }
                        Ok(Chunk::Done) => return None,
                        Err(err) => {
                            state.done = true;
                            return Some((Err(err), state));
                        }
                    }
                }
                let next = tokio::select! {
                    _ = state.cancel.cancelled() => {
                        state.done = true;
                        return Some((Err(LlmError::Cancelled), state));
                    }
                    next = tokio::time::timeout(
                        if state.finished { USAGE_GRACE } else { chunk_timeout },
                        state.bytes.next(),
                    ) => next,
                };
                match next {
                    // The answer was complete; the server just sent no usage or `[DONE]`.
                    Err(_) if state.finished => return None,
                    Err(_) => {
                        state.done = true;
                        let err = LlmError::Timeout(format!(
                            "the stream stalled for {} s",
                            chunk_timeout.as_secs_f32()
                        ));
                        return Some((Err(err), state));
                    }
                    // The connection closed without `[DONE]`: what arrived is the answer.
                    Ok(None) => return None,
                    Ok(Some(Err(err))) => {
                        state.done = true;
                        let err = if err.is_timeout() {
                            LlmError::Timeout(without_url(&err))
                        } else {
                            LlmError::Unavailable(format!(
                                "the stream broke: {}",
                                without_url(&err)
                            ))
                        };
                        return Some((Err(err), state));
                    }
                    Ok(Some(Ok(bytes))) => {
                        let parsed = state.parser.push(&bytes);
                        state.pending.extend(parsed);
                    }
                }
            }
        });
        Ok(crate::llm::stop::stop_at(Box::pin(stream), stops))
    }

    fn supports_structured_output(&self) -> bool {
        self.settings.structured_output
    }

    async fn complete_structured(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<String, LlmError> {
        self.complete(&request, &cancel).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_parser_handles_split_lines() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"data: {\"a\"").is_empty());
        assert_eq!(
            parser.push(b":1}\r\n\r\n: comment\ndata: [DONE]\n"),
            vec!["{\"a\":1}".to_string(), "[DONE]".to_string()]
        );
    }

    #[test]
    fn chunks_map_to_text_and_end() {
        let meter = TokenMeter::default();
        let text = r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        assert!(matches!(parse_chunk(text, &meter), Ok(Chunk::Text(t)) if t == "Hi"));
        let stop = r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#;
        assert!(matches!(parse_chunk(stop, &meter), Ok(Chunk::Finished)));
        assert_eq!(meter.get(), TokenUsage::default());
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
        assert!(matches!(parse_chunk(usage, &meter), Ok(Chunk::Nothing)));
        assert_eq!(
            meter.get(),
            TokenUsage {
                prompt_tokens: 12,
                completion_tokens: 5
            }
        );
        assert!(matches!(parse_chunk("[DONE]", &meter), Ok(Chunk::Done)));
        assert!(parse_chunk("not json", &meter).is_err());
    }

    #[test]
    fn the_key_never_shows_in_debug() {
        let settings = OpenAiSettings {
            api_key: Some(crate::settings::Secret::new("sk-very-secret")),
            ..OpenAiSettings::default()
        };
        let client = OpenAiClient::new(settings).unwrap();
        assert!(!format!("{client:?}").contains("sk-very-secret"));
    }
}
