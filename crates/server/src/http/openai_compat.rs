//! The OpenAI-compatible API, so existing OpenAI clients and SDKs can use Apex:
//! `GET /v1/models` and `POST /v1/chat/completions`, streaming and not, authenticated with
//! the user's own bearer token (the SDK's `api_key`).
//!
//! - Model `apex` runs the full agent pipeline for that user, exactly as a WebSocket
//!   `user_message` would (a new thread titled after the question, the same per-user limits,
//!   the same persisted events): the question is the last `user` message, the answer is the
//!   run's final response, streamed as it is written.
//! - The embedded local model, when it is the configured provider, is offered under its own
//!   name and answers the messages directly. Its token use is recorded in the user's usage
//!   data like every other LLM request Apex makes for them. Besides the message rate, a
//!   user may have at most `max_completions_per_user` direct completions in progress (a
//!   stream holds its place until it ends or its client goes away): the model's sequences
//!   are shared by every user's runs, and one user's long streams must not hold them all.
//!
//! Errors keep Apex's one error shape, `{"error": {"code", "message"}}`, which OpenAI's
//! clients read as an API error with that message.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use apex_protocol::error::{codes, ErrorBody};
use apex_protocol::events::{AgentEvent, EventKind};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, PayloadTooLarge, Unauthenticated, UnsupportedMediaType, ValidationFailed,
};
use super::ApiJson;
use crate::auth::AuthenticatedUser;
use crate::budgets::{self, CallBound, Reservation};
use crate::error::ApiError;
use crate::events::follow::{follow_run, RunEvent};
use crate::ids::RequestId;
use crate::llm::{ChatMessage, LlmRequest, TokenUsage};
use crate::run::Steering;
use crate::state::AppState;
use crate::usage::llm_calls::{self, LlmCall};
use crate::user_store::UserStore;

/// The model name that runs the agent pipeline.
pub const PIPELINE_MODEL: &str = "apex";
/// Most messages one request may carry.
const MAX_MESSAGES: usize = 64;
/// Longest prompt accepted for the local model, in characters over all messages (its
/// context is 8,192 tokens; the engine also stops at the context's end).
const MAX_PROMPT_CHARS: usize = 24_000;
/// `max_tokens` when the client sends none, and the most it may ask for.
const DEFAULT_MAX_TOKENS: u32 = 256;
const MAX_TOKENS_LIMIT: u32 = 2_048;

/// The part of OpenAI's chat-completion request Apex reads; other fields are ignored.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct ChatCompletionRequest {
    /// `apex` (the agent pipeline) or a model `GET /v1/models` lists.
    #[schema(example = "apex")]
    model: String,
    /// At most 64; model `apex` answers the last `user` message.
    messages: Vec<CompatMessage>,
    /// Server-sent `chat.completion.chunk` events, ending with `data: [DONE]`.
    #[serde(default)]
    stream: bool,
    /// Local model only: 1 to 2,048, default 256.
    max_tokens: Option<u32>,
    /// The newer name of `max_tokens`.
    max_completion_tokens: Option<u32>,
    /// Local model only: 0 to 2.
    temperature: Option<f32>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct CompatMessage {
    /// `system`, `user` or `assistant`.
    #[schema(example = "user")]
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
}

/// A message's content: a string, or a list of parts of which the text parts count.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

impl CompatMessage {
    fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(MessageContent::Text(text)) => Ok(text.clone()),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(part_text)) => text.push_str(part_text),
                        (kind, _) => {
                            return Err(ApiError::validation(format!(
                                "content parts of type {kind:?} are not supported; send text"
                            )))
                        }
                    }
                }
                Ok(text)
            }
        }
    }
}

/// The local model's name when it is the configured provider (then it is offered directly).
fn local_model(state: &AppState) -> Option<&str> {
    (state.infra.llm.name() == "local").then(|| state.infra.llm.model_name())
}

fn now_secs() -> i64 {
    crate::clock::now_ms() / 1000
}

/// The models this user may name in `/v1/chat/completions`, in OpenAI's list shape.
#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "openai_models",
    tag = "openai",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "OpenAI's model list: `apex`, and the local model when it is the configured provider",
            body = Object,
            example = json!({"object": "list", "data": [{"id": "apex", "object": "model", "created": 1764000000, "owned_by": "apex"}]})),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
    )
)]
pub async fn models(State(state): State<AppState>, AuthUser(_user): AuthUser) -> Json<Value> {
    let created = now_secs();
    let mut data = vec![json!({
        "id": PIPELINE_MODEL, "object": "model", "created": created, "owned_by": "apex",
    })];
    if let Some(name) = local_model(&state) {
        data.push(json!({"id": name, "object": "model", "created": created, "owned_by": "apex"}));
    }
    Json(json!({"object": "list", "data": data}))
}

/// OpenAI's chat completions: model `apex` runs the agent pipeline on the question, the
/// local model answers the messages directly; streaming or not. Any other model goes to
/// its upstream through the gateway (keys with the `gateway` scope; `X-Apex-Workload`
/// names the workload the call is counted under).
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    operation_id = "openai_chat_completions",
    tag = "openai",
    security(("bearer_jwt" = [])),
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A `chat.completion` object, or with `stream: true` server-sent \
            `chat.completion.chunk` events ending with `data: [DONE]` (an error mid-stream \
            arrives as an `{\"error\": ...}` chunk)",
            content(
                (Object = "application/json", example = json!({"id": "chatcmpl-…", "object": "chat.completion", "created": 1764000000, "model": "apex",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "…"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})),
                (String = "text/event-stream"),
            )),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "A model `/v1/models` does not list (code: `model_not_found`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 429, description = "Too many messages (code: `rate_limited`, with a `Retry-After` header), \
            too many runs (model `apex`, code: `too_many_runs`), or too many direct completions in progress \
            (the local model, code: `too_many_completions`)", body = ErrorBody),
        (status = 500, response = Internal),
        (status = 502, description = "Model `apex`: the run ended other than `completed` (code: `run_failed`)", body = ErrorBody),
        (status = 503, description = "The local model could not answer, or the server is shutting down (code: `llm_unavailable` or `shutting_down`)", body = ErrorBody),
    )
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: axum::http::HeaderMap,
    ApiJson(raw): ApiJson<Value>,
) -> Result<Response, ApiError> {
    let model = raw.get("model").and_then(Value::as_str).unwrap_or("");
    if model != PIPELINE_MODEL && local_model(&state) != Some(model) {
        // Not Apex's own: the gateway forwards it, as sent, to the model's upstream.
        let gateway = Arc::clone(&state.gateway);
        if let Some(route) = gateway.route(model, &state.infra.pricing) {
            return super::gateway::forward(
                state.clone(),
                user,
                &headers,
                route,
                "chat/completions",
                raw,
            )
            .await;
        }
    }
    let body: ChatCompletionRequest =
        serde_json::from_value(raw).map_err(|e| ApiError::validation(e.to_string()))?;
    if let Some(scopes) = user.api_key_scopes() {
        if !scopes.contains(&apex_protocol::auth::ApiKeyScope::Chat) {
            return Err(ApiError::coded(
                apex_protocol::error::ErrorCode::InsufficientScope,
                "this API key lacks the chat scope",
            ));
        }
    }
    if body.messages.is_empty() {
        return Err(ApiError::validation("messages must not be empty"));
    }
    if body.messages.len() > MAX_MESSAGES {
        return Err(ApiError::validation(format!(
            "at most {MAX_MESSAGES} messages per request"
        )));
    }
    if body.model == PIPELINE_MODEL {
        return pipeline(state, user, body).await;
    }
    if local_model(&state) == Some(body.model.as_str()) {
        return direct(state, user, body).await;
    }
    Err(ApiError::client(
        StatusCode::NOT_FOUND,
        codes::MODEL_NOT_FOUND,
        format!(
            "unknown model {:?}; GET /v1/models lists the models you can use",
            body.model
        ),
    ))
}

// ---- model `apex`: the agent pipeline ----

async fn pipeline(
    state: AppState,
    user: AuthenticatedUser,
    body: ChatCompletionRequest,
) -> Result<Response, ApiError> {
    let question = match body.messages.iter().rev().find(|m| m.role == "user") {
        Some(message) => message.text()?,
        None => return Err(ApiError::validation("no user message to answer")),
    };
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let started = state
        .runs
        // Always a new thread: no earlier run to double-text.
        .submit(
            &user,
            None,
            &question,
            // A completion cannot answer a request for approval.
            Steering::unattended(),
            RequestId::generate(),
        )
        .await?;
    let run = store
        .get_run(started.run_id)
        .await?
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("a started run is not stored")))?;
    let id = format!("chatcmpl-{}", started.run_id);
    let events = follow_run(
        state.infra.bus.as_ref(),
        &user,
        store,
        run,
        0,
        super::follow_limit(&state),
    );
    if body.stream {
        return Ok(stream_pipeline(id, events).into_response());
    }
    let mut events = events;
    let mut usage = TokenUsage::default();
    while let Some(event) = events.recv().await {
        let Ok(event) = serde_json::from_str::<AgentEvent>(&event.json) else {
            continue;
        };
        add_agent_tokens(&event, &mut usage);
        if event.is_terminal() {
            return match event.status() {
                Some("completed") => {
                    let answer = event.payload["final_response"].as_str().unwrap_or_default();
                    Ok(Json(completion(&id, PIPELINE_MODEL, answer, usage)).into_response())
                }
                _ => Err(run_failed(&event)),
            };
        }
    }
    Err(ApiError::Internal(anyhow::anyhow!(
        "the run's events ended before its terminal event"
    )))
}

/// Tokens an agent reported in its `agent_completed` result.
fn add_agent_tokens(event: &AgentEvent, usage: &mut TokenUsage) {
    if event.kind == EventKind::AgentCompleted && !event.is_terminal() {
        let result = &event.payload["result"];
        usage.prompt_tokens += result["prompt_tokens"].as_u64().unwrap_or(0);
        usage.completion_tokens += result["completion_tokens"].as_u64().unwrap_or(0);
    }
}

fn run_failed(terminal: &AgentEvent) -> ApiError {
    let status = terminal.status().unwrap_or("failed");
    let detail = terminal.payload["error"]
        .as_str()
        .map(|e| format!(": {e}"))
        .unwrap_or_default();
    ApiError::client(
        StatusCode::BAD_GATEWAY,
        codes::RUN_FAILED,
        format!("the run ended {status}{detail}"),
    )
}

fn stream_pipeline(
    id: String,
    events: tokio::sync::mpsc::Receiver<RunEvent>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    struct Pipe {
        id: String,
        events: tokio::sync::mpsc::Receiver<RunEvent>,
        usage: TokenUsage,
        started: bool,
        done: bool,
    }
    let pipe = Pipe {
        id,
        events,
        usage: TokenUsage::default(),
        started: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(pipe, |mut pipe| async move {
        if pipe.done {
            return None;
        }
        if !pipe.started {
            pipe.started = true;
            let first = chunk(
                &pipe.id,
                PIPELINE_MODEL,
                json!({"role": "assistant", "content": ""}),
                None,
            );
            return Some((vec![first], pipe));
        }
        loop {
            let Some(event) = pipe.events.recv().await else {
                pipe.done = true;
                let error = json!({"error": {"code": codes::INTERNAL,
                    "message": "the run's events ended before its terminal event"}});
                return Some((vec![error, Value::Null], pipe));
            };
            let Ok(event) = serde_json::from_str::<AgentEvent>(&event.json) else {
                continue;
            };
            add_agent_tokens(&event, &mut pipe.usage);
            if event.kind == EventKind::PartialResult {
                let content = event.payload["content"].as_str().unwrap_or_default();
                if content.is_empty() {
                    continue;
                }
                let piece = chunk(&pipe.id, PIPELINE_MODEL, json!({"content": content}), None);
                return Some((vec![piece], pipe));
            }
            if event.is_terminal() {
                pipe.done = true;
                let last = match event.status() {
                    Some("completed") => {
                        let mut last = chunk(&pipe.id, PIPELINE_MODEL, json!({}), Some("stop"));
                        last["usage"] = usage_json(pipe.usage);
                        last
                    }
                    _ => {
                        let err = run_failed(&event);
                        json!({"error": {"code": codes::RUN_FAILED, "message": err.to_string()}})
                    }
                };
                return Some((vec![last, Value::Null], pipe));
            }
        }
    });
    sse(stream)
}

// ---- the local model, directly ----

async fn direct(
    state: AppState,
    user: AuthenticatedUser,
    body: ChatCompletionRequest,
) -> Result<Response, ApiError> {
    let mut messages = Vec::with_capacity(body.messages.len());
    let mut chars = 0;
    for message in &body.messages {
        if !matches!(message.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::validation(format!(
                "message role {:?} is not one of system, user, assistant",
                message.role
            )));
        }
        let text = message.text()?;
        if text.contains('\0') {
            return Err(ApiError::validation(
                "messages must not contain NUL characters",
            ));
        }
        chars += text.chars().count();
        messages.push(ChatMessage {
            role: message.role.clone(),
            content: text,
        });
    }
    if chars > MAX_PROMPT_CHARS {
        return Err(ApiError::validation(format!(
            "the messages must be at most {MAX_PROMPT_CHARS} characters together"
        )));
    }
    let max_tokens = body
        .max_completion_tokens
        .or(body.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 || max_tokens > MAX_TOKENS_LIMIT {
        return Err(ApiError::validation(format!(
            "max_tokens must be between 1 and {MAX_TOKENS_LIMIT}"
        )));
    }
    if let Some(t) = body.temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(ApiError::validation("temperature must be between 0 and 2"));
        }
    }
    // Checked before the rate, so a refused request spends no message token. The slot is
    // held until the answer is complete: by this function for a whole answer, by the
    // response stream (which the server drops when the client goes away) for a stream.
    let Some(slot) = state.limits.start_completion(user.user_id()) else {
        crate::telemetry::limit_rejected("too_many_completions");
        return Err(ApiError::client(
            StatusCode::TOO_MANY_REQUESTS,
            codes::TOO_MANY_COMPLETIONS,
            format!(
                "at most {} completions at once; wait for one to finish",
                state.limits.settings.max_completions_per_user
            ),
        ));
    };
    // A direct request is a message like any other: the same per-user rate limit.
    state.runs.check_message_rate(&user).await?;
    let mut request = LlmRequest::new(messages, Value::Null, max_tokens);
    request.temperature = body.temperature;
    // The local engine takes waiting requests in turn per user.
    request.user = Some(user.user_id());
    let tokens = request.tokens.clone();
    let provider = Arc::clone(&state.infra.llm);
    let model = provider.model_name().to_string();
    // Token and model budgets hold the local model too (it costs nothing in USD).
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let budget = {
        let overrides = store.price_overrides().await?;
        let prices = state.infra.price_book.for_user(&overrides);
        let now = crate::clock::now_ms();
        let bound = CallBound::of_call(&prices, &model, now, chars, Some(i64::from(max_tokens)));
        BudgetSettle {
            reservation: budgets::reserve(&store, user.api_key_id(), &model, bound, now).await?,
            store: store.clone(),
            tokens: tokens.clone(),
            bus: Arc::clone(&state.infra.bus),
            user: user.user_id(),
        }
    };
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    // Generation stops when the client goes away: the response body owns this guard.
    let cancel = CancellationToken::new();
    let guard = cancel.clone().drop_guard();
    let started = Instant::now();
    let mut text_stream = provider
        .stream(request, cancel)
        .await
        .map_err(|e| llm_unavailable(&e))?;
    let record = move |succeeded: bool| {
        let state = state.clone();
        let provider = Arc::clone(&provider);
        let store = store.clone();
        let usage = tokens.get();
        async move {
            let call = LlmCall {
                provider: provider.as_ref(),
                workload: "apex/v1",
                usage,
                elapsed: started.elapsed(),
                succeeded,
            };
            llm_calls::record(&store, &state.infra.price_book, call).await;
            usage
        }
    };
    if !body.stream {
        let mut answer = String::new();
        while let Some(piece) = text_stream.next().await {
            match piece {
                Ok(piece) => answer.push_str(&piece),
                Err(err) => {
                    record(false).await;
                    return Err(llm_unavailable(&err));
                }
            }
        }
        let usage = record(true).await;
        drop(guard);
        drop(slot);
        drop(budget);
        return Ok(Json(completion(&id, &model, &answer, usage)).into_response());
    }
    struct Direct<S, R> {
        id: String,
        model: String,
        text: S,
        record: R,
        _guard: tokio_util::sync::DropGuard,
        /// The user's completion slot, freed when the stream ends or is dropped.
        _slot: crate::limits::SlotGuard,
        /// Settled when the stream ends or is dropped.
        _budget: BudgetSettle,
        started: bool,
        done: bool,
    }
    let direct = Direct {
        id,
        model,
        text: text_stream,
        record,
        _guard: guard,
        _slot: slot,
        _budget: budget,
        started: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(direct, |mut d| async move {
        if d.done {
            return None;
        }
        if !d.started {
            d.started = true;
            let first = chunk(
                &d.id,
                &d.model,
                json!({"role": "assistant", "content": ""}),
                None,
            );
            return Some((vec![first], d));
        }
        match d.text.next().await {
            Some(Ok(piece)) => {
                let piece = chunk(&d.id, &d.model, json!({"content": piece}), None);
                Some((vec![piece], d))
            }
            Some(Err(err)) => {
                d.done = true;
                (d.record)(false).await;
                let message = llm_unavailable(&err).to_string();
                let error = json!({"error": {"code": codes::LLM_UNAVAILABLE, "message": message}});
                Some((vec![error, Value::Null], d))
            }
            None => {
                d.done = true;
                let usage = (d.record)(true).await;
                let mut last = chunk(&d.id, &d.model, json!({}), Some("stop"));
                last["usage"] = usage_json(usage);
                Some((vec![last, Value::Null], d))
            }
        }
    });
    Ok(sse(stream).into_response())
}

/// Settles a direct completion's budget reservation to the tokens it used when dropped:
/// when the answer is complete, failed, or its client went away.
struct BudgetSettle {
    reservation: Option<Reservation>,
    store: UserStore,
    tokens: crate::llm::TokenMeter,
    /// For the warnings the settlement may raise.
    bus: Arc<dyn crate::events::EventBus>,
    user: crate::ids::UserId,
}

impl Drop for BudgetSettle {
    fn drop(&mut self) {
        let Some(reservation) = self.reservation.take() else {
            return;
        };
        let used = self.tokens.get();
        let tokens = i64::try_from(used.total()).unwrap_or(i64::MAX);
        let (store, bus, user) = (self.store.clone(), Arc::clone(&self.bus), self.user);
        // Drop cannot wait: the write goes on in its own task.
        tokio::spawn(async move {
            let used = CallBound {
                micro_usd: 0,
                tokens,
            };
            let warnings = reservation.settle(&store, used).await;
            budgets::publish_warnings(bus.as_ref(), user, warnings);
        });
    }
}

fn llm_unavailable(err: &crate::llm::LlmError) -> ApiError {
    tracing::warn!(error = %err, "the local model could not answer");
    ApiError::client(
        StatusCode::SERVICE_UNAVAILABLE,
        codes::LLM_UNAVAILABLE,
        format!("the model could not answer: {}", err.reason()),
    )
}

// ---- the wire format ----

fn usage_json(usage: TokenUsage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total(),
    })
}

fn completion(id: &str, model: &str, answer: &str, usage: TokenUsage) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer},
            "finish_reason": "stop",
        }],
        "usage": usage_json(usage),
    })
}

fn chunk(id: &str, model: &str, delta: Value, finish_reason: Option<&str>) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": now_secs(),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })
}

/// Server-sent events in OpenAI's framing: one `data:` line per chunk, `data: [DONE]` at
/// the end (a `Value::Null` in a batch stands for it).
fn sse(
    batches: impl futures_util::Stream<Item = Vec<Value>> + Send + 'static,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let events = batches.flat_map(|batch| {
        futures_util::stream::iter(batch.into_iter().map(|value| {
            Ok(match value {
                Value::Null => Event::default().data("[DONE]"),
                value => Event::default().data(value.to_string()),
            })
        }))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
