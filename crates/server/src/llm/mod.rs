//! LLM access behind one trait with streaming output.
//!
//! Providers are shared infrastructure: immutable configuration plus an internally
//! synchronised client, no per-user state. Requests carry everything per-user.
//!
//! - [`local`]: the embedded model (SmolLM2-135M-Instruct on candle), the default;
//! - [`openai`]: any OpenAI-compatible chat-completions server;
//! - [`template::TemplateWriter`]: the deterministic fallback that writes the answer from the
//!   agents' structured results; agents switch to it when the configured provider fails.
//!
//! [`build_provider`] turns the settings into the configured provider; what each request
//! used is recorded by `usage::llm_calls`, above this module.

pub mod local;
pub mod openai;
pub mod stop;
pub mod template;

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::ids::UserId;
use crate::settings::{LlmProviderKind, Settings};

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A JSON schema the answer must follow (structured output).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseSchema {
    /// `[a-zA-Z0-9_-]`, as OpenAI requires.
    pub name: String,
    pub schema: Value,
}

#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub messages: Vec<ChatMessage>,
    /// Structured facts the answer must be built from (the agents' results).
    pub facts: Value,
    pub max_tokens: u32,
    /// Overrides the provider's default temperature.
    pub temperature: Option<f32>,
    /// Ask for structured output following this schema, where the provider supports it.
    pub schema: Option<ResponseSchema>,
    /// Texts that end the answer; the text from the first of them on is never shown.
    pub stop: Vec<String>,
    /// Repetition controls for providers that decode themselves (the local model).
    pub repetition: Repetition,
    /// Filled in by the provider with the tokens it processed; read by the caller once the
    /// answer has ended (see [`TokenMeter`]).
    pub tokens: TokenMeter,
    /// The user the answer is for: a provider that queues requests (the local model) takes
    /// waiting ones in turn per user, so one user's many requests cannot hold back
    /// another's. `None` for work on no user's behalf (benchmarks, evaluations).
    pub user: Option<UserId>,
    /// Longest this request may wait for a provider that queues requests (the local model)
    /// to start on it; past it the provider answers [`LlmError::Busy`] and the caller
    /// writes without the model, so nobody waits minutes behind other users. `None`: it
    /// waits its turn (direct completions).
    pub max_queue_wait: Option<std::time::Duration>,
}

/// How a self-decoding provider keeps an answer from repeating itself; see
/// [`local::sampling`]. `OFF` leaves the model's distribution untouched (what the
/// OpenAI-compatible API serves); the agents ask for [`Repetition::AGENT`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Repetition {
    /// Above 1.0, logits of tokens generated within the last `window` tokens are penalised.
    pub penalty: f32,
    pub window: usize,
    /// From 2 up, no n-gram of this many tokens is generated twice.
    pub no_repeat_ngram: usize,
}

impl Repetition {
    pub const OFF: Repetition = Repetition {
        penalty: 1.0,
        window: 0,
        no_repeat_ngram: 0,
    };
    /// llama.cpp's long-standing default penalty (1.1 over the last 64 tokens) and no
    /// 4-token n-gram twice: measured on the evaluation (docs/quality.md), this stops the
    /// embedded model's loops without garbling model names, which repeat legitimately.
    pub const AGENT: Repetition = Repetition {
        penalty: 1.1,
        window: 64,
        no_repeat_ngram: 4,
    };
}

/// Token counts of one request as the provider reports them: the local engine counts its
/// own, OpenAI-compatible servers send a `usage` object, the template writer uses none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl TokenUsage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Where a provider reports a request's [`TokenUsage`]. The stream it returns outlives the
/// `stream()` call, so the counts cannot be a return value; the caller keeps a clone of the
/// meter and reads it after the stream ends. Each request makes its own meter: it is never
/// shared between requests, let alone users.
#[derive(Debug, Clone, Default)]
pub struct TokenMeter(Arc<std::sync::Mutex<TokenUsage>>);

impl TokenMeter {
    /// Adds to the counts (a request may report in parts).
    pub fn add(&self, usage: TokenUsage) {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        counts.prompt_tokens += usage.prompt_tokens;
        counts.completion_tokens += usage.completion_tokens;
    }

    pub fn get(&self) -> TokenUsage {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LlmRequest {
    pub fn new(messages: Vec<ChatMessage>, facts: Value, max_tokens: u32) -> Self {
        Self {
            messages,
            facts,
            max_tokens,
            temperature: None,
            schema: None,
            stop: Vec::new(),
            repetition: Repetition::OFF,
            tokens: TokenMeter::default(),
            user: None,
            max_queue_wait: None,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    #[error("the request was cancelled")]
    Cancelled,
    #[error("the LLM provider failed: {0}")]
    Provider(String),
    #[error("the LLM provider timed out: {0}")]
    Timeout(String),
    #[error("the LLM provider is rate limiting: {0}")]
    RateLimited(String),
    #[error("the LLM provider is unavailable: {0}")]
    Unavailable(String),
    #[error("the LLM provider rejected the credentials: {0}")]
    Auth(String),
    #[error("the LLM provider sent an invalid response: {0}")]
    InvalidResponse(String),
    #[error("the LLM provider is misconfigured: {0}")]
    Config(String),
    #[error("the model's answer was rejected: {0}")]
    Rejected(String),
    /// One of the user's budgets has no room for the request (see `crate::budgets`).
    #[error("{0}")]
    OverBudget(String),
    /// The model would not start on the request within its `max_queue_wait`.
    #[error("{0}")]
    Busy(String),
}

impl LlmError {
    /// A short, stable reason for logs and `agent_thinking` notes.
    pub fn reason(&self) -> &'static str {
        match self {
            LlmError::Cancelled => "cancelled",
            LlmError::Provider(_) => "provider_error",
            LlmError::Timeout(_) => "timeout",
            LlmError::RateLimited(_) => "rate_limited",
            LlmError::Unavailable(_) => "unavailable",
            LlmError::Auth(_) => "auth_failed",
            LlmError::InvalidResponse(_) => "invalid_response",
            LlmError::Config(_) => "misconfigured",
            LlmError::Rejected(_) => "answer_rejected",
            LlmError::OverBudget(_) => "budget_exceeded",
            LlmError::Busy(_) => "model_busy",
        }
    }
}

/// Text chunks as the provider produces them.
pub type TextStream = Pin<Box<dyn Stream<Item = Result<String, LlmError>> + Send>>;

#[async_trait]
pub trait LlmProvider: Send + Sync + 'static {
    /// Provider name for logs and metrics ("template", "local", "openai").
    fn name(&self) -> &str;
    /// The model that answers (recorded with the token usage); the provider name for
    /// providers without models.
    fn model_name(&self) -> &str {
        self.name()
    }
    /// Starts generating; the stream ends early with `Cancelled` once `cancel` fires.
    async fn stream(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<TextStream, LlmError>;
    /// Picks one of `options` as the answer to `messages` (a constrained choice: whatever
    /// the model does, the result is one of the options, or `None` when it gives none).
    /// The default asks for a one-field JSON object whose value must be one of the options;
    /// the local model overrides it by scoring each option's likelihood.
    /// `user` is whom the choice is for (see [`LlmRequest::user`]).
    async fn choose(
        &self,
        messages: Vec<ChatMessage>,
        options: Vec<String>,
        tokens: TokenMeter,
        user: Option<UserId>,
        cancel: CancellationToken,
    ) -> Result<Option<usize>, LlmError> {
        let mut request = LlmRequest::new(messages, Value::Null, 16);
        request.tokens = tokens;
        request.user = user;
        request.temperature = Some(0.0);
        request.schema = Some(ResponseSchema {
            name: "choice".into(),
            schema: serde_json::json!({
                "type": "object",
                "properties": {"answer": {"type": "string", "enum": options}},
                "required": ["answer"],
                "additionalProperties": false,
            }),
        });
        let text = self.complete_structured(request, cancel).await?;
        Ok(parse_choice(&text, &options))
    }
    /// Whether `request.schema` is enforced by the provider (JSON-schema structured output).
    fn supports_structured_output(&self) -> bool {
        false
    }
    /// The whole answer at once, for structured output (`request.schema`). The default
    /// collects the stream; providers with a native JSON mode override it.
    async fn complete_structured(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<String, LlmError> {
        let mut stream = self.stream(request, cancel).await?;
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            text.push_str(&chunk?);
        }
        Ok(text)
    }
}

/// The option a free-text or JSON answer names: `{"answer": "cost"}` or a bare `cost`.
pub fn parse_choice(text: &str, options: &[String]) -> Option<usize> {
    let answer = serde_json::from_str::<Value>(text.trim())
        .ok()
        .and_then(|v| v["answer"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string())
        .to_lowercase();
    let answer = answer.trim_matches(|c: char| !c.is_alphanumeric());
    options.iter().position(|o| o.eq_ignore_ascii_case(answer))
}

/// Builds the configured provider. The local model is loaded (blocking; it runs on a
/// blocking thread) and fails with a message naming the fetch script if its file is missing.
pub async fn build_provider(settings: &Settings) -> anyhow::Result<Arc<dyn LlmProvider>> {
    match settings.llm_provider {
        LlmProviderKind::Template => Ok(Arc::new(template::TemplateWriter::new(
            settings.template_stream_delay,
        ))),
        LlmProviderKind::OpenAi => Ok(Arc::new(openai::OpenAiClient::new(
            settings.openai.clone(),
        )?)),
        LlmProviderKind::Local => {
            let path = settings.local_model_path();
            if !path.is_file() {
                let fetch = if settings.local_model.path.is_some() {
                    format!("APEX_MODEL_PATH={} scripts/fetch-model.sh", path.display())
                } else {
                    "scripts/fetch-model.sh".to_string()
                };
                anyhow::bail!(
                    "the local model file {} is missing. Fetch it once for this machine with \
                     `{fetch}` (or start with `scripts/serve.sh`, which does it), or choose \
                     another provider with --llm-provider template|openai",
                    path.display(),
                );
            }
            let local = &settings.local_model;
            let options = local::LocalOptions {
                engine: local::EngineConfig {
                    threads: local.threads.max(1),
                    queue_capacity: local.queue_capacity.max(1),
                    max_active_per_thread: local.max_active_per_thread.max(1),
                },
                sampling: local::SamplingConfig {
                    temperature: local.temperature,
                    top_p: local.top_p,
                },
                seed: local.seed,
            };
            let started = std::time::Instant::now();
            let provider =
                tokio::task::spawn_blocking(move || local::LocalProvider::load(&path, options))
                    .await??;
            tracing::info!(
                model = %provider.model().name,
                threads = local.threads.max(1),
                load_ms = started.elapsed().as_millis() as u64,
                "local model ready"
            );
            Ok(Arc::new(provider))
        }
    }
}
