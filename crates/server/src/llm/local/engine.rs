//! The inference engine: dedicated OS threads fed by a bounded queue.
//!
//! Model inference is CPU-bound for tens of milliseconds per token, so it never runs on the
//! async runtime's workers. [`Engine::start`] spawns `threads` OS threads (`apex-llm-N`);
//! requests reach them through one bounded queue (a full queue makes `submit` wait, which
//! is the server's back-pressure). The queue is a [`FairQueue`] keyed by the user each
//! request serves: a thread with room takes the waiting requests round-robin across users,
//! so one user's many requests cannot keep another's waiting behind all of them.
//!
//! Each thread keeps a set of active requests (up to `max_active_per_thread`) and advances
//! all of them together, one forward pass per step ("continuous batching"): every decoding
//! request gets its next token, prefilling requests share a budget of prompt tokens, and a
//! request taken from the queue joins at the next step, so nobody waits for a batch to end.
//! Decoding on a CPU is bound by reading the weights, which a batched pass reads once for
//! all of them (see [`super::transformer`]). Every request has its own KV cache.
//!
//! Generated text goes back through an unbounded channel per request (its size is bounded
//! by `max_tokens`), so a slow reader never stalls the thread. A request ends when it
//! finishes, its cancellation token fires, or its reader goes away.
//!
//! The engine holds no per-user state between requests; dropping it closes the queue and
//! the threads exit once their active sequences finish.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::fair_queue::FairQueue;
use super::model::{LocalModel, Sequence};
use super::sampling::{Sampler, SamplingConfig};
use super::tokenizer::StreamDecoder;
use crate::llm::LlmError;

/// Prompt tokens processed per step across all prefilling requests, so long prompts do not
/// stall the answers being streamed (each step also carries one token per decoding request).
const PREFILL_PER_STEP: usize = 64;

/// Engine sizing.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Inference threads.
    pub threads: usize,
    /// Requests waiting for a thread before `submit` waits.
    pub queue_capacity: usize,
    /// Requests one thread advances together (one forward pass per step).
    pub max_active_per_thread: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            queue_capacity: 64,
            max_active_per_thread: 16,
        }
    }
}

/// What the engine reports when a request ends.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// From admission to the first generated token (prompt processing).
    pub prefill_seconds: f64,
    /// From the first generated token to the end.
    pub decode_seconds: f64,
}

/// One chunk of a request's output.
#[derive(Debug)]
pub enum Output {
    /// A thread took the request: it is no longer waiting (always the first output of a
    /// request that passed the checks).
    Started,
    Text(String),
    /// For a scoring job: the log-probabilities of its candidate tokens as the next token.
    Scores(Vec<f32>),
    /// The request ended normally (stop token, `max_tokens` or the context is full).
    Done(GenerationStats),
    Failed(LlmError),
}

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: u32,
    pub sampling: SamplingConfig,
    pub repetition: crate::llm::Repetition,
    /// The user the job serves: waiting jobs are taken in turn per user.
    pub user: Option<crate::ids::UserId>,
    /// A scoring job: instead of generating, report how likely each of these tokens is to
    /// come next after the prompt ([`Output::Scores`]), then end.
    pub score: Option<Vec<u32>>,
    pub seed: u64,
    pub cancel: CancellationToken,
    pub output: mpsc::UnboundedSender<Output>,
}

pub struct Engine {
    waiting: Arc<Waiting>,
    model: Arc<LocalModel>,
}

/// The requests no thread has taken yet, shared by `submit` and the threads.
struct Waiting {
    queue: Mutex<Lanes>,
    /// Signalled when a request is queued or the engine stops.
    ready: Condvar,
    /// One permit per place in the queue: `submit` waits for one (the back-pressure), and
    /// a queued job holds it until a thread takes the job.
    places: Arc<Semaphore>,
}

struct Lanes {
    jobs: FairQueue<Option<crate::ids::UserId>, Queued>,
    /// The engine was dropped: threads leave once nothing is waiting.
    closed: bool,
}

struct Queued {
    job: Job,
    _place: OwnedSemaphorePermit,
}

impl Waiting {
    fn lanes(&self) -> MutexGuard<'_, Lanes> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next job in fair order, waiting for one; `None` once the engine stopped and
    /// nothing is left.
    fn next_blocking(&self) -> Option<Job> {
        let mut lanes = self.lanes();
        loop {
            if let Some(queued) = lanes.jobs.pop() {
                return Some(queued.job);
            }
            if lanes.closed {
                return None;
            }
            lanes = self.ready.wait(lanes).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The next job in fair order, if one is waiting.
    fn try_next(&self) -> Option<Job> {
        self.lanes().jobs.pop().map(|queued| queued.job)
    }
}

impl Engine {
    /// Starts the inference threads over `model`.
    pub fn start(model: Arc<LocalModel>, config: EngineConfig) -> std::io::Result<Self> {
        let waiting = Arc::new(Waiting {
            queue: Mutex::new(Lanes {
                jobs: FairQueue::default(),
                closed: false,
            }),
            ready: Condvar::new(),
            places: Arc::new(Semaphore::new(config.queue_capacity.max(1))),
        });
        for index in 0..config.threads.max(1) {
            let worker = Worker {
                model: Arc::clone(&model),
                waiting: Arc::clone(&waiting),
                max_active: config.max_active_per_thread.max(1),
                active: Vec::new(),
            };
            std::thread::Builder::new()
                .name(format!("apex-llm-{index}"))
                .spawn(move || worker.run())?;
        }
        Ok(Self { waiting, model })
    }

    pub fn model(&self) -> &LocalModel {
        &self.model
    }

    /// Queues a request, waiting while the queue is full.
    pub async fn submit(&self, job: Job) -> Result<(), LlmError> {
        let cancel = job.cancel.clone();
        let places = Arc::clone(&self.waiting.places);
        let place = tokio::select! {
            _ = cancel.cancelled() => return Err(LlmError::Cancelled),
            place = places.acquire_owned() => place
                .map_err(|_| LlmError::Provider("the local model stopped".into()))?,
        };
        {
            let mut lanes = self.waiting.lanes();
            if lanes.closed {
                return Err(LlmError::Provider("the local model stopped".into()));
            }
            // Counted before a thread can take it (and count it out) in `admit`.
            metrics::gauge!(crate::telemetry::LLM_QUEUE).increment(1.0);
            lanes.jobs.push(job.user, Queued { job, _place: place });
        }
        self.waiting.ready.notify_one();
        Ok(())
    }
}

impl Drop for Engine {
    /// Closes the queue: the threads finish what they have, then exit.
    fn drop(&mut self) {
        self.waiting.lanes().closed = true;
        self.waiting.places.close();
        self.waiting.ready.notify_all();
    }
}

/// A request being generated.
struct Active {
    job: Job,
    sequence: Sequence,
    sampler: Sampler,
    decoder: StreamDecoder,
    /// Prompt tokens not yet processed.
    prefill_at: usize,
    last_token: u32,
    generated: u32,
    started: Instant,
    first_token: Option<Instant>,
}

enum Step {
    Continue,
    Finished,
}

struct Worker {
    model: Arc<LocalModel>,
    waiting: Arc<Waiting>,
    max_active: usize,
    active: Vec<Active>,
}

impl Worker {
    fn run(mut self) {
        // candle hands element-wise operations and f32 products to rayon. Called from a
        // thread outside any rayon pool, each one is sent to the global pool's worker and
        // this thread sleeps until it is done: two context switches per operation, about a
        // sixth of a batched step. Made the only thread of its own pool, this thread runs
        // them inline. The pool lives as long as the loop.
        let _inline_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .use_current_thread()
            .build()
            .map_err(|err| tracing::warn!(error = %err, "rayon work will be handed off"));
        loop {
            if self.active.is_empty() {
                // Idle: wait for work.
                match self.waiting.next_blocking() {
                    Some(job) => self.admit(job),
                    None => return,
                }
            }
            // Take more work while there is room, without waiting for it.
            while self.active.len() < self.max_active {
                match self.waiting.try_next() {
                    Some(job) => self.admit(job),
                    None => break,
                }
            }
            self.step_all();
        }
    }

    fn admit(&mut self, job: Job) {
        metrics::gauge!(crate::telemetry::LLM_QUEUE).decrement(1.0);
        let limit = self.model.context_length;
        if job.prompt.is_empty() || job.prompt.len() >= limit {
            let _ = job.output.send(Output::Failed(LlmError::Provider(format!(
                "the prompt has {} tokens; the local model takes 1 to {}",
                job.prompt.len(),
                limit - 1
            ))));
            return;
        }
        metrics::gauge!(crate::telemetry::LLM_ACTIVE).increment(1.0);
        let _ = job.output.send(Output::Started);
        self.active.push(Active {
            sequence: self.model.sequence(),
            sampler: Sampler::new(job.sampling, job.repetition, job.seed),
            decoder: StreamDecoder::default(),
            prefill_at: 0,
            last_token: 0,
            generated: 0,
            started: Instant::now(),
            first_token: None,
            job,
        });
    }

    /// One step for every active request, in one pass over the weights: each decoding
    /// request feeds its last token, and prefilling requests feed prompt chunks (oldest
    /// first) up to [`PREFILL_PER_STEP`] tokens in all, so prompts never stall the
    /// streams of the others for long.
    fn step_all(&mut self) {
        // Requests whose caller left or cancelled end here, before any work for them.
        let mut index = 0;
        while index < self.active.len() {
            let active = &self.active[index];
            let gone = if active.job.cancel.is_cancelled() {
                let _ = active.job.output.send(Output::Failed(LlmError::Cancelled));
                true
            } else {
                active.job.output.is_closed()
            };
            if gone {
                self.remove(index);
            } else {
                index += 1;
            }
        }
        // What each request feeds this step (`None`: it waits for room in the prefill).
        let mut prefill_room = PREFILL_PER_STEP;
        let spans: Vec<Option<(usize, usize)>> = self
            .active
            .iter()
            .map(|active| {
                let prompt_len = active.job.prompt.len();
                if active.prefill_at >= prompt_len {
                    return Some((0, 0));
                }
                if prefill_room == 0 {
                    return None;
                }
                let end = (active.prefill_at + prefill_room).min(prompt_len);
                prefill_room -= end - active.prefill_at;
                Some((active.prefill_at, end))
            })
            .collect();
        let mut batch: Vec<(usize, &mut Sequence, &[u32])> = Vec::new();
        for (index, (active, span)) in self.active.iter_mut().zip(&spans).enumerate() {
            let Some((start, end)) = *span else { continue };
            let tokens: &[u32] = if start == end {
                std::slice::from_ref(&active.last_token)
            } else {
                &active.job.prompt[start..end]
            };
            batch.push((index, &mut active.sequence, tokens));
        }
        if batch.is_empty() {
            return;
        }
        let members: Vec<usize> = batch.iter().map(|(index, _, _)| *index).collect();
        let mut pairs: Vec<(&mut Sequence, &[u32])> = batch
            .into_iter()
            .map(|(_, seq, tokens)| (seq, tokens))
            .collect();
        metrics::histogram!(crate::telemetry::LLM_BATCH).record(pairs.len() as f64);
        let result = self.model.forward(&mut pairs);
        drop(pairs);
        let logits = match result {
            Ok(logits) => logits,
            Err(err) => {
                // One pass failed for all of them: each is told, none is left hanging.
                for &index in members.iter().rev() {
                    fail(&mut self.active[index], err.to_string());
                    self.remove(index);
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (&index, logits) in members.iter().zip(logits) {
            let active = &mut self.active[index];
            if let Some((start, end)) = spans[index] {
                if start != end {
                    active.prefill_at = end;
                    if end < active.job.prompt.len() {
                        continue;
                    }
                }
            }
            if let Step::Finished = self.after_pass(index, logits) {
                finished.push(index);
            }
        }
        for index in finished.into_iter().rev() {
            self.remove(index);
        }
    }

    /// Ends an active request's place on this thread (preserving the others' order, which
    /// is who gets prefill room first).
    fn remove(&mut self, index: usize) {
        self.active.remove(index);
        metrics::gauge!(crate::telemetry::LLM_ACTIVE).decrement(1.0);
    }

    /// What a request does with the logits of its last token: score, or sample and stream.
    fn after_pass(&mut self, index: usize, mut logits: Vec<f32>) -> Step {
        let model = Arc::clone(&self.model);
        let active = &mut self.active[index];
        if let Some(candidates) = &active.job.score {
            let scores = log_probabilities(&logits, candidates);
            let _ = active.job.output.send(Output::Scores(scores));
            return finish(active);
        }
        let token = active.sampler.sample(&mut logits);
        active.first_token.get_or_insert_with(Instant::now);
        if model.stop_ids.contains(&token) {
            return finish(active);
        }
        active.last_token = token;
        active.generated += 1;
        let text = active.decoder.push(&model.tokenizer, token);
        if !text.is_empty() && active.job.output.send(Output::Text(text)).is_err() {
            return Step::Finished;
        }
        if active.generated >= active.job.max_tokens
            || active.sequence.position() + 1 >= model.context_length
        {
            return finish(active);
        }
        Step::Continue
    }
}

/// `log p(token)` under the softmax of `logits`, for each candidate (−∞ for an id out of
/// range).
fn log_probabilities(logits: &[f32], candidates: &[u32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|v| (v - max).exp()).sum();
    let log_norm = max + sum.ln();
    candidates
        .iter()
        .map(|id| {
            logits
                .get(*id as usize)
                .map_or(f32::NEG_INFINITY, |v| v - log_norm)
        })
        .collect()
}

fn fail(active: &mut Active, message: String) -> Step {
    tracing::error!(error = %message, "local model inference failed");
    let _ = active
        .job
        .output
        .send(Output::Failed(LlmError::Provider(message)));
    Step::Finished
}

fn finish(active: &mut Active) -> Step {
    let rest = active.decoder.finish();
    if !rest.is_empty() {
        let _ = active.job.output.send(Output::Text(rest));
    }
    let now = Instant::now();
    let first = active.first_token.unwrap_or(now);
    let stats = GenerationStats {
        prompt_tokens: active.job.prompt.len() as u32,
        completion_tokens: active.generated,
        prefill_seconds: first.duration_since(active.started).as_secs_f64(),
        decode_seconds: now.duration_since(first).as_secs_f64(),
    };
    tracing::debug!(
        prompt_tokens = stats.prompt_tokens,
        completion_tokens = stats.completion_tokens,
        prefill_seconds = stats.prefill_seconds,
        decode_seconds = stats.decode_seconds,
        "local generation finished"
    );
    let _ = active.job.output.send(Output::Done(stats));
    Step::Finished
}
