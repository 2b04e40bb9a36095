//! `LocalProvider`: the [`LlmProvider`] backed by the in-process model.
//!
//! It turns a request's messages into a ChatML prompt, queues it on the [`Engine`] and
//! hands back the generated text as a [`TextStream`] while it is produced. Shared
//! infrastructure: it holds the engine and default sampling settings, no per-user state.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::chatml::encode_chat;
use super::engine::{Engine, EngineConfig, GenerationStats, Job, Output};
use super::model::{LocalModel, ModelError};
use super::sampling::SamplingConfig;
use crate::llm::{LlmError, LlmProvider, LlmRequest, TextStream, TokenUsage};

/// How the local provider runs.
#[derive(Debug, Clone, Default)]
pub struct LocalOptions {
    pub engine: EngineConfig,
    pub sampling: SamplingConfig,
    /// Seed for sampling when the temperature is above zero; `None` draws one per request.
    pub seed: Option<u64>,
}

pub struct LocalProvider {
    engine: Engine,
    options: LocalOptions,
}

impl LocalProvider {
    /// Loads the model at `path` (requantizing it once where this CPU needs it) and starts
    /// the inference threads.
    /// Blocking: call it off the async runtime (`spawn_blocking`) or at start-up.
    pub fn load(path: &Path, options: LocalOptions) -> Result<Self, ModelError> {
        let model = Arc::new(LocalModel::load(path)?);
        let engine = Engine::start(model, options.engine).map_err(|e| ModelError::Load {
            path: path.to_path_buf(),
            message: format!("starting the inference threads: {e}"),
        })?;
        Ok(Self { engine, options })
    }

    pub fn model(&self) -> &LocalModel {
        self.engine.model()
    }

    /// Generates a completion and also reports token counts (used by benchmarks and tests).
    pub async fn generate(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<(String, GenerationStats), LlmError> {
        let meter = request.tokens.clone();
        let mut receiver = self.submit(request, cancel).await?;
        let mut text = String::new();
        while let Some(output) = receiver.recv().await {
            match output {
                Output::Text(chunk) => text.push_str(&chunk),
                Output::Scores(_) | Output::Started => {}
                Output::Done(stats) => {
                    meter.add(TokenUsage {
                        prompt_tokens: u64::from(stats.prompt_tokens),
                        completion_tokens: u64::from(stats.completion_tokens),
                    });
                    return Ok((text, stats));
                }
                Output::Failed(err) => return Err(err),
            }
        }
        Err(LlmError::Provider("the local model stopped".into()))
    }

    async fn submit(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<mpsc::UnboundedReceiver<Output>, LlmError> {
        Ok(self.submit_counted(request, None, cancel).await?.0)
    }

    /// Queues the request; also returns the prompt's length in tokens. With a
    /// `max_queue_wait`, returns once a thread took it, or [`LlmError::Busy`] (the request
    /// withdrawn) when none did in time.
    async fn submit_counted(
        &self,
        request: LlmRequest,
        score: Option<Vec<u32>>,
        cancel: CancellationToken,
    ) -> Result<(mpsc::UnboundedReceiver<Output>, u64), LlmError> {
        let prompt = encode_chat(&self.model().tokenizer, &request.messages);
        let prompt_tokens = prompt.len() as u64;
        let (output, mut receiver) = mpsc::unbounded_channel();
        let seed = self
            .options
            .seed
            .unwrap_or_else(|| rand::rngs::OsRng.next_u64());
        // The job's own token: withdrawing it after a long wait leaves the caller's alone.
        let job_cancel = cancel.child_token();
        let queued = self.engine.submit(Job {
            prompt,
            max_tokens: request.max_tokens.max(1),
            sampling: match request.temperature {
                Some(temperature) => SamplingConfig {
                    temperature,
                    ..self.options.sampling
                },
                None => self.options.sampling,
            },
            repetition: request.repetition,
            user: request.user,
            score,
            seed,
            cancel: job_cancel.clone(),
            output,
        });
        let Some(wait) = request.max_queue_wait else {
            queued.await?;
            return Ok((receiver, prompt_tokens));
        };
        // Waiting for a place in the queue counts as waiting too.
        let started = async {
            queued.await?;
            match receiver.recv().await {
                Some(Output::Started) => Ok(()),
                Some(Output::Failed(err)) => Err(err),
                Some(_) | None => Err(LlmError::Provider("the local model stopped".into())),
            }
        };
        match tokio::time::timeout(wait, started).await {
            Ok(Ok(())) => Ok((receiver, prompt_tokens)),
            Ok(Err(err)) => Err(err),
            Err(_) => {
                job_cancel.cancel();
                metrics::counter!(crate::telemetry::LLM_BUSY).increment(1);
                Err(LlmError::Busy(format!(
                    "the local model did not start on it within {} s",
                    wait.as_secs_f64()
                )))
            }
        }
    }
}

/// The token that starts each option at the beginning of the answer, if the options
/// start with distinct tokens (else the model cannot tell them apart by one step).
fn first_tokens(tokenizer: &super::tokenizer::Tokenizer, options: &[String]) -> Option<Vec<u32>> {
    let firsts: Vec<u32> = options
        .iter()
        .map(|o| tokenizer.encode(o, false).first().copied())
        .collect::<Option<_>>()?;
    let mut distinct = firsts.clone();
    distinct.sort_unstable();
    distinct.dedup();
    (distinct.len() == firsts.len()).then_some(firsts)
}

#[async_trait]
impl LlmProvider for LocalProvider {
    /// Scores each option's first token as the first token of the answer (one forward pass
    /// over the prompt) and picks the likeliest: a constrained choice that cannot produce
    /// anything but an option.
    async fn choose(
        &self,
        messages: Vec<crate::llm::ChatMessage>,
        options: Vec<String>,
        tokens: crate::llm::TokenMeter,
        user: Option<crate::ids::UserId>,
        cancel: CancellationToken,
    ) -> Result<Option<usize>, LlmError> {
        let Some(candidates) = first_tokens(&self.model().tokenizer, &options) else {
            return Ok(None);
        };
        let mut request = LlmRequest::new(messages, serde_json::Value::Null, 1);
        request.tokens = tokens.clone();
        request.user = user;
        let (mut receiver, prompt_tokens) = self
            .submit_counted(request, Some(candidates), cancel)
            .await?;
        tokens.add(TokenUsage {
            prompt_tokens,
            completion_tokens: 0,
        });
        let mut best = None;
        while let Some(output) = receiver.recv().await {
            match output {
                Output::Scores(scores) => {
                    best = scores
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.is_finite())
                        .max_by(|a, b| a.1.total_cmp(b.1))
                        .map(|(i, _)| i);
                }
                Output::Text(_) | Output::Started => {}
                Output::Done(_) => return Ok(best),
                Output::Failed(err) => return Err(err),
            }
        }
        Err(LlmError::Provider("the local model stopped".into()))
    }

    fn name(&self) -> &str {
        "local"
    }

    fn model_name(&self) -> &str {
        &self.model().name
    }

    async fn stream(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<TextStream, LlmError> {
        let meter = request.tokens.clone();
        let stops = request.stop.clone();
        let (receiver, prompt_tokens) = self.submit_counted(request, None, cancel).await?;
        // Counted as it goes, so a reader that stops early (a rejected answer, a
        // cancelled run) still gets what was really spent: the whole prompt, and one token
        // per text piece (the engine emits one per generated token, or fewer when it holds
        // bytes of an incomplete character back). `Done` settles the exact count.
        meter.add(TokenUsage {
            prompt_tokens,
            completion_tokens: 0,
        });
        let stream =
            futures_util::stream::unfold((receiver, 0u64), move |(mut receiver, counted)| {
                let meter = meter.clone();
                async move {
                    match receiver.recv().await? {
                        Output::Text(text) => {
                            meter.add(TokenUsage {
                                prompt_tokens: 0,
                                completion_tokens: 1,
                            });
                            Some((Ok(text), (receiver, counted + 1)))
                        }
                        Output::Done(stats) => {
                            let exact = u64::from(stats.completion_tokens);
                            meter.add(TokenUsage {
                                prompt_tokens: 0,
                                completion_tokens: exact.saturating_sub(counted),
                            });
                            None
                        }
                        Output::Failed(err) => Some((Err(err), (receiver, counted))),
                        // Only scoring jobs report scores; this one generates. `Started`
                        // says a thread took it: nothing to show.
                        Output::Scores(_) | Output::Started => {
                            Some((Ok(String::new()), (receiver, counted)))
                        }
                    }
                }
            });
        // Dropping the receiver when a stop sequence appears ends the generation too.
        Ok(crate::llm::stop::stop_at(Box::pin(stream), stops))
    }
}
