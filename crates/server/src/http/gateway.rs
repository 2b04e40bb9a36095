//! The gateway's HTTP side: a chat completion for an upstream model (from
//! `openai_compat::chat_completions`) and `POST /v1/embeddings`, forwarded with
//! [`crate::gateway`] and recorded as the caller's usage. See that module for the rules.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use apex_protocol::auth::ApiKeyScope;
use apex_protocol::error::{codes, ErrorBody};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, PayloadTooLarge, Unauthenticated, UnsupportedMediaType,
};
use super::ApiJson;
use crate::auth::AuthenticatedUser;
use apex_protocol::error::ErrorCode;

use crate::budgets::{self, CallBound, Reservation};
use crate::error::ApiError;
use crate::gateway::{
    prompt_chars, usage_row, CallUsage, FinishedCall, Route, StreamWatch, DEFAULT_WORKLOAD,
};
use crate::state::AppState;
use crate::store::PriceOverrideRecord;
use crate::user_store::UserStore;

/// The header that names the workload of a call.
pub const WORKLOAD_HEADER: &str = "x-apex-workload";

/// Keys need the `gateway` scope to reach an upstream (a login reaches everything).
pub fn check_gateway_scope(user: &AuthenticatedUser) -> Result<(), ApiError> {
    match user.api_key_scopes() {
        Some(scopes) if !scopes.contains(&ApiKeyScope::Gateway) => Err(ApiError::coded(
            ErrorCode::InsufficientScope,
            "this API key lacks the gateway scope",
        )),
        _ => Ok(()),
    }
}

fn workload(headers: &HeaderMap) -> String {
    headers
        .get(WORKLOAD_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .unwrap_or(DEFAULT_WORKLOAD)
        .chars()
        .take(200)
        .collect()
}

/// One call through the gateway, from the moment it is sent: what its usage row needs
/// besides the usage itself.
struct GatewayCall {
    state: AppState,
    user: AuthenticatedUser,
    upstream: String,
    requested_model: String,
    workload: String,
    /// Characters of the request's messages or input (see [`prompt_chars`]).
    prompt_chars: usize,
    started: Instant,
    /// The user's negotiated rates, read once for the call: its bound and its cost.
    overrides: Vec<PriceOverrideRecord>,
    /// What the call holds on the user's budgets, settled when it ends.
    reservation: Option<Reservation>,
}

impl GatewayCall {
    /// Records the finished call in the user's usage, costed with their prices. A failed
    /// write is logged, not returned: the call itself went through.
    async fn finish(self, usage: CallUsage, succeeded: bool) {
        let store = UserStore::for_user(Arc::clone(&self.state.infra.store), &self.user);
        let row = usage_row(
            FinishedCall {
                upstream: &self.upstream,
                requested_model: &self.requested_model,
                workload: &self.workload,
                usage,
                prompt_chars: self.prompt_chars,
                started: self.started,
                succeeded,
                now_ms: crate::clock::now_ms(),
            },
            &self.state.infra.price_book.for_user(&self.overrides),
        );
        if let Some(reservation) = self.reservation {
            let used = CallBound::used(row.cost_usd, row.prompt_tokens, row.completion_tokens);
            let warnings = reservation.settle(&store, used).await;
            budgets::publish_warnings(self.state.infra.bus.as_ref(), self.user.user_id(), warnings);
        }
        if let Err(err) = store.insert_usage(&[row]).await {
            tracing::warn!(error = %err, "could not record a gateway call's usage");
        }
        metrics::counter!("apex_gateway_calls_total").increment(1);
    }
}

/// The most completion tokens a request allows (`max_completion_tokens`, or the older
/// `max_tokens`), if it says.
fn max_output(body: &Value) -> Option<i64> {
    ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_i64))
}

fn upstream_unreachable(name: &str, err: reqwest::Error) -> ApiError {
    // The upstream's URL is configuration, not a secret, but the error may quote it with
    // credentials; say which upstream, not how.
    tracing::warn!(upstream = name, error = %err.without_url(), "gateway upstream unreachable");
    ApiError::coded(
        ErrorCode::UpstreamUnavailable,
        format!("the upstream {name:?} could not be reached"),
    )
}

/// Forwards `body` to `path` of the route's upstream and answers with what it answered.
pub async fn forward(
    state: AppState,
    user: AuthenticatedUser,
    headers: &HeaderMap,
    route: Route<'_>,
    path: &str,
    mut body: Value,
) -> Result<Response, ApiError> {
    check_gateway_scope(&user)?;
    let requested_model = route.model.clone();
    body["model"] = Value::String(route.model.clone());
    let streaming = body.get("stream").and_then(Value::as_bool) == Some(true);
    if streaming {
        // Ask for the usage block of the stream: without it a stream's tokens are unknown.
        let options = body.as_object_mut().and_then(|b| {
            b.entry("stream_options")
                .or_insert_with(|| json!({}))
                .as_object_mut()
        });
        if let Some(options) = options {
            options.insert("include_usage".into(), Value::Bool(true));
        }
    }
    let prompt_chars = prompt_chars(&body);
    // Before it goes out, the call's most is reserved on the user's budgets (a refusal
    // sends nothing upstream).
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let overrides = store.price_overrides().await?;
    let reservation = {
        let prices = state.infra.price_book.for_user(&overrides);
        let now = crate::clock::now_ms();
        let bound = CallBound::of_call(&prices, &route.model, now, prompt_chars, max_output(&body));
        budgets::reserve(&store, user.api_key_id(), &route.model, bound, now).await?
    };
    let call = GatewayCall {
        state: state.clone(),
        user,
        upstream: route.upstream.name.clone(),
        requested_model,
        workload: workload(headers),
        prompt_chars,
        started: Instant::now(),
        overrides,
        reservation,
    };
    let response = match state.gateway.send(&route, path, &body).await {
        Ok(response) => response,
        Err(err) => {
            let upstream = call.upstream.clone();
            call.finish(CallUsage::default(), false).await;
            return Err(upstream_unreachable(&upstream, err));
        }
    };
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    let is_stream = status.is_success()
        && content_type
            .to_str()
            .is_ok_and(|t| t.starts_with("text/event-stream"));

    if !is_stream {
        // One body: read it whole, record its usage, pass it on as it came.
        let bytes = match response.bytes().await {
            Ok(bytes) => bytes,
            Err(err) => return Err(upstream_unreachable(&call.upstream, err)),
        };
        let mut usage = CallUsage::default();
        if let Ok(parsed) = serde_json::from_slice::<Value>(&bytes) {
            usage.read(&parsed);
        }
        call.finish(usage, status.is_success()).await;
        let mut out = Response::new(Body::from(bytes));
        *out.status_mut() = status;
        out.headers_mut().insert(header::CONTENT_TYPE, content_type);
        return Ok(out);
    }

    // A stream: pass each chunk on as it comes, watch it for the usage block, and record
    // the call when it ends, whether it finished, the upstream broke off or the client
    // went away (the stream is dropped then, and the recorder with it).
    let recorder = StreamRecorder {
        call: Some(call),
        watch: StreamWatch::default(),
        failed: false,
    };
    let upstream_stream = response.bytes_stream();
    let stream = futures_util::stream::unfold(
        (upstream_stream, Some(recorder)),
        |(mut upstream_stream, mut recorder)| async move {
            let rec = recorder.as_mut()?;
            match upstream_stream.next().await {
                Some(Ok(bytes)) => {
                    rec.watch.feed(&bytes);
                    Some((Ok::<_, Infallible>(bytes), (upstream_stream, recorder)))
                }
                Some(Err(err)) => {
                    tracing::warn!(upstream = rec.upstream(), error = %err.without_url(), "gateway stream broke off");
                    rec.failed = true;
                    drop(recorder.take());
                    None
                }
                None => {
                    drop(recorder.take());
                    None
                }
            }
        },
    );
    let mut out = Response::new(Body::from_stream(stream));
    *out.status_mut() = status;
    out.headers_mut().insert(header::CONTENT_TYPE, content_type);
    out.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(out)
}

/// Records a streamed call when dropped: at its end, or when its client goes away.
struct StreamRecorder {
    /// Taken when the call is recorded.
    call: Option<GatewayCall>,
    watch: StreamWatch,
    failed: bool,
}

impl StreamRecorder {
    fn upstream(&self) -> &str {
        self.call.as_ref().map_or("", |c| c.upstream.as_str())
    }
}

impl Drop for StreamRecorder {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        let mut usage = std::mem::take(&mut self.watch.usage);
        if !usage.reported {
            usage.completion_tokens = self.watch.content_chunks;
        }
        let succeeded = !self.failed && self.watch.done;
        // Drop cannot wait: the write goes on in its own task.
        tokio::spawn(call.finish(usage, succeeded));
    }
}

/// OpenAI's embeddings, forwarded to the upstream of the model (gateway keys only).
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    operation_id = "openai_embeddings",
    tag = "openai",
    security(("bearer_jwt" = [])),
    request_body(content = Object, description = "OpenAI's embeddings request, passed on as sent"),
    params(("X-Apex-Workload" = Option<String>, Header, description = "The workload the call is counted under (default `gateway`)")),
    responses(
        (status = 200, description = "The upstream's answer, as it sent it; its usage is recorded as yours", body = Object),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the `gateway` scope (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No upstream serves the model (code: `model_not_found`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 502, description = "The upstream could not be reached (code: `upstream_unavailable`); an upstream's own error status and body are passed on as they came", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn embeddings(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    check_gateway_scope(&user)?;
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::validation("model is required"))?
        .to_string();
    let gateway = Arc::clone(&state.gateway);
    let Some(route) = gateway.route(&model, &state.infra.pricing) else {
        return Err(no_upstream(&model));
    };
    forward(state.clone(), user, &headers, route, "embeddings", body).await
}

/// 404 for a model no upstream serves.
pub fn no_upstream(model: &str) -> ApiError {
    ApiError::client(
        StatusCode::NOT_FOUND,
        codes::MODEL_NOT_FOUND,
        format!("unknown model {model:?}; GET /v1/models lists the models you can use"),
    )
}
