//! LLM access behind one trait with streaming output.
//!
//! Providers are shared infrastructure: immutable configuration plus an internally
//! synchronised client, no per-user state. Requests carry everything per-user.
//! Today there is one provider, [`template::TemplateWriter`], a deterministic fallback that
//! writes the answer from the agents' structured results; real model providers plug in here.

pub mod template;

use std::pin::Pin;

use async_trait::async_trait;
use futures_util::Stream;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct LlmRequest {
    pub messages: Vec<ChatMessage>,
    /// Structured facts the answer must be built from (the agents' results).
    pub facts: Value,
    pub max_tokens: u32,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    #[error("the request was cancelled")]
    Cancelled,
    #[error("the provider failed: {0}")]
    Provider(String),
}

/// Text chunks as the provider produces them.
pub type TextStream = Pin<Box<dyn Stream<Item = Result<String, LlmError>> + Send>>;

#[async_trait]
pub trait LlmProvider: Send + Sync + 'static {
    /// Provider name for logs and metrics ("template", "openai"...).
    fn name(&self) -> &str;
    /// Starts generating; the stream ends early with `Cancelled` once `cancel` fires.
    async fn stream(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<TextStream, LlmError>;
}
