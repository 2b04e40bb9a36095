//! `TemplateWriter`: the deterministic fallback provider.
//!
//! It is not a language model: it streams the text the agents composed from the figures
//! they computed ([`crate::agents::answer`]: the answer with every slot in its template
//! wording), so answers are exact, reproducible and need no model. Text is streamed in
//! small chunks with a short delay, like a model would.

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{LlmError, LlmProvider, LlmRequest, TextStream};

pub struct TemplateWriter {
    chunk_delay: Duration,
}

impl TemplateWriter {
    pub fn new(chunk_delay: Duration) -> Self {
        Self { chunk_delay }
    }
}

/// The text the template writer streams: the request's facts when they are a string (the
/// reporting agent's composed answer, see [`crate::agents::answer`]), else a note that it
/// writes no free text.
fn text_of(facts: &Value) -> String {
    match facts.as_str() {
        Some(text) => text.to_string(),
        None => "The template writer only writes Apex's own answers from computed figures;                  configure a language model (--llm-provider local or openai) for free text."
            .to_string(),
    }
}

/// Splits text into chunks of a few words, keeping every character (spaces, newlines).
fn chunks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut words = 0;
    for c in text.chars() {
        current.push(c);
        if c == ' ' || c == '\n' {
            words += 1;
            if words == 4 || c == '\n' {
                out.push(std::mem::take(&mut current));
                words = 0;
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[async_trait]
impl LlmProvider for TemplateWriter {
    fn name(&self) -> &str {
        "template"
    }

    async fn stream(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<TextStream, LlmError> {
        let parts = chunks(&text_of(&request.facts));
        let delay = self.chunk_delay;
        let stream = futures_util::stream::unfold(
            (parts.into_iter(), cancel, true),
            move |(mut parts, cancel, first)| async move {
                let part = parts.next()?;
                if !first && !delay.is_zero() {
                    tokio::select! {
                        _ = cancel.cancelled() => return Some((Err(LlmError::Cancelled), (parts, cancel, false))),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                if cancel.is_cancelled() {
                    return Some((Err(LlmError::Cancelled), (parts, cancel, false)));
                }
                Some((Ok(part), (parts, cancel, false)))
            },
        );
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_the_text_intact() {
        let text = "one two three four five\nsix  seven";
        assert_eq!(chunks(text).concat(), text);
    }

    #[test]
    fn streams_the_composed_text() {
        assert_eq!(
            text_of(&Value::String("You spent $1.00.".into())),
            "You spent $1.00."
        );
        assert!(text_of(&Value::Null).contains("--llm-provider"));
    }
}
