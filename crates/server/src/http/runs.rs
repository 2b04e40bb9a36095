//! `/api/threads/{id}/runs`, `/api/threads/{id}/regenerate` and `/api/runs/*`: start,
//! regenerate, inspect, stop and replay runs over REST (the WebSocket does the same with
//! frames); submission errors map to error codes through `ApiError`.

use std::sync::Arc;

use apex_protocol::approval::{ApprovalAccepted, ApprovalRequest};
use apex_protocol::error::{codes, ErrorBody};
use apex_protocol::events::AgentEvent;
use apex_protocol::threads::{Run, RunAccepted, RunEventsPage, RunStatus, StartRunRequest};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, NotFound, PayloadTooLarge, RateLimited, Unauthenticated,
    UnsupportedMediaType, ValidationFailed,
};
use super::threads::thread_id;
use super::{ApiJson, ApiQuery};
use crate::clock::ms_to_rfc3339;
use crate::error::ApiError;
use crate::events::log;
use crate::ids::{RequestId, RunId};
use crate::run::approval::pending_view;
use crate::run::{Steering, StopOutcome};
use crate::state::AppState;
use crate::user_store::UserStore;

fn run_id(raw: &str) -> Result<RunId, ApiError> {
    RunId::parse(raw).map_err(|_| ApiError::not_found("run"))
}

/// Stores the message and queues a run on the thread; its events go to the caller's
/// sockets and to `GET /api/runs/{id}/events`. If the thread's previous run is still
/// going, `multitask_strategy` says what happens (default `enqueue`: the run starts after
/// it).
#[utoipa::path(
    post,
    path = "/api/threads/{id}/runs",
    operation_id = "start_run",
    tag = "runs",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Thread id")),
    request_body = StartRunRequest,
    responses(
        (status = 202, description = "The run is queued", body = RunAccepted),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 409, description = "The thread has a run in progress and `multitask_strategy` is `reject` (code: `thread_busy`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, description = "The server is shutting down (code: `shutting_down`)", body = ErrorBody),
    )
)]
pub async fn start(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<StartRunRequest>,
) -> Result<(StatusCode, Json<RunAccepted>), ApiError> {
    let thread = thread_id(&id)?;
    let started = state
        .runs
        .submit(
            &user,
            Some(thread),
            &body.message,
            Steering {
                multitask_strategy: body.multitask_strategy,
                require_approval: body.require_approval,
            },
            RequestId::generate(),
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RunAccepted {
            run_id: started.run_id.to_string(),
            thread_id: started.thread_id.to_string(),
            status: RunStatus::Queued,
        }),
    ))
}

/// Starts a new run for the thread's last user message, storing no message: the answers
/// after that message stay in history, marked `superseded` (cleared again if the new run
/// ends without an answer).
#[utoipa::path(
    post,
    path = "/api/threads/{id}/regenerate",
    operation_id = "regenerate",
    tag = "runs",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Thread id")),
    responses(
        (status = 202, description = "The run is queued", body = RunAccepted),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 409, description = "The thread has a run in progress (code: `thread_busy`)", body = ErrorBody),
        (status = 422, description = "The thread has no user message yet (code: `validation_failed`)", body = ErrorBody),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, description = "The server is shutting down (code: `shutting_down`)", body = ErrorBody),
    )
)]
pub async fn regenerate(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RunAccepted>), ApiError> {
    let thread = thread_id(&id)?;
    let started = state
        .runs
        .regenerate(&user, thread, RequestId::generate())
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RunAccepted {
            run_id: started.run_id.to_string(),
            thread_id: started.thread_id.to_string(),
            status: RunStatus::Queued,
        }),
    ))
}

/// One of the caller's runs.
#[utoipa::path(
    get,
    path = "/api/runs/{id}",
    operation_id = "get_run",
    tag = "runs",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Run id")),
    responses(
        (status = 200, description = "The run", body = Run),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
    )
)]
pub async fn get_one(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let (run, approval) = store
        .run_approval(run_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::not_found("run"))?;
    // A request that ended unanswered (expired, stopped) is no longer pending.
    let pending = pending_view(&approval).filter(|_| !run.status.is_terminal());
    // Between the `approval_required` event and the parking that follows it, the row still
    // says `running`; the run is waiting for its user all the same.
    let status = match (&pending, run.status) {
        (Some(_), RunStatus::Running) => RunStatus::AwaitingApproval,
        (_, status) => status,
    };
    Ok(Json(Run {
        approval: pending,
        id: run.id.to_string(),
        thread_id: run.thread_id.to_string(),
        status,
        created_at: ms_to_rfc3339(run.created_at_ms),
        started_at: run.started_at_ms.map(ms_to_rfc3339),
        finished_at: run.finished_at_ms.map(ms_to_rfc3339),
        error: run.error,
        last_seq: run.last_seq,
    }))
}

/// Answers a run's request for approval of its plan (`approval_required` event): approve
/// it, carry out an edited plan (some of the proposed steps, possibly reordered), or
/// reject it. The run continues (or, rejected, ends `completed`) on whichever instance has
/// room. Sending the same answer again changes nothing and is accepted again.
#[utoipa::path(
    post,
    path = "/api/runs/{id}/approval",
    operation_id = "answer_approval",
    tag = "runs",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Run id")),
    request_body = ApprovalRequest,
    responses(
        (status = 202, description = "The answer is stored", body = ApprovalAccepted),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 409, description = "The run is not waiting for this approval (code: `approval_not_pending`), it was answered otherwise (`approval_already_decided`), or the request expired (`approval_expired`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn approval(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ApprovalRequest>,
) -> Result<(StatusCode, Json<ApprovalAccepted>), ApiError> {
    let accepted = state.runs.decide(&user, run_id(&id)?, &body).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

/// Asks a running run to stop; it ends with a `cancelled` terminal event.
#[utoipa::path(
    post,
    path = "/api/runs/{id}/cancel",
    operation_id = "cancel_run",
    tag = "runs",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Run id")),
    responses(
        (status = 202, description = "Cancellation requested", body = RunAccepted),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 409, description = "The run already finished (code: `run_not_active`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RunAccepted>), ApiError> {
    let id = run_id(&id)?;
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    match state.runs.stop(&user, id).await? {
        StopOutcome::Stopping => {
            let run = store
                .get_run(id)
                .await?
                .ok_or_else(|| ApiError::not_found("run"))?;
            Ok((
                StatusCode::ACCEPTED,
                Json(RunAccepted {
                    run_id: id.to_string(),
                    thread_id: run.thread_id.to_string(),
                    status: run.status,
                }),
            ))
        }
        StopOutcome::AlreadyFinished(status) => Err(ApiError::client(
            StatusCode::CONFLICT,
            codes::RUN_NOT_ACTIVE,
            format!("run already finished with status {}", status.as_str()),
        )),
        StopOutcome::NotFound => Err(ApiError::not_found("run")),
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events with a higher seq (default 0: from the start).
    #[serde(default)]
    #[param(default = 0)]
    pub after_seq: u64,
    /// At most this many events (JSON only): 1 to 10,000, default 1,000.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<i64>,
}

/// A run's events: replayed as JSON, or streamed live as server-sent events.
///
/// The stored events after `after_seq` as JSON, or, with `Accept: text/event-stream`, as
/// server-sent events that continue live until the run's terminal event (`Last-Event-ID`
/// overrides `after_seq`).
#[utoipa::path(
    get,
    path = "/api/runs/{id}/events",
    operation_id = "run_events",
    tag = "runs",
    security(("bearer_jwt" = [])),
    params(
        ("id" = String, Path, description = "Run id"),
        EventsQuery,
        ("Accept" = Option<String>, Header, description = "`text/event-stream` for server-sent events"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume a stream after this seq (overrides `after_seq`)"),
    ),
    responses(
        (status = 200, description = "The stored events after `after_seq` (JSON), or a server-sent event stream \
            (`id` = seq, `event` = type, `data` = the event) that ends after the terminal event",
            content(
                (RunEventsPage = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 410, description = "Events after `after_seq` were removed by retention; reload the thread (code: `resume_gap`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 429, description = "A stream, and the user already has as many open connections (WebSockets and streams) as allowed (code: `too_many_connections`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let id = run_id(&id)?;
    let limit = query.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::validation("limit must be 1..=10000"));
    }
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let run = store
        .get_run(id)
        .await?
        .ok_or_else(|| ApiError::not_found("run"))?;
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let after_seq = match headers.get("last-event-id") {
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::validation("Last-Event-ID must be an event seq"))?,
        None => query.after_seq,
    };
    if log::has_gap(&store, &run, after_seq).await? {
        return Err(ApiError::client(
            StatusCode::GONE,
            codes::RESUME_GAP,
            format!(
                "events after {after_seq} are no longer kept (the run had {}); reload the thread",
                run.last_seq
            ),
        ));
    }
    if wants_stream {
        // A stream is held open like a WebSocket, and counts against the same cap.
        let Some(slot) = state.limits.open_connection(user.user_id()) else {
            crate::telemetry::limit_rejected("too_many_connections");
            return Err(ApiError::client(
                StatusCode::TOO_MANY_REQUESTS,
                codes::TOO_MANY_CONNECTIONS,
                "too many connections for this user",
            ));
        };
        let stream = super::run_stream::stream(&state, &user, store, run, after_seq, slot);
        return Ok(stream.into_response());
    }
    let stored = store.list_events(id, after_seq, limit).await?;
    let events = stored
        .iter()
        .map(|e| serde_json::from_str::<AgentEvent>(&e.json))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored event is not valid: {e}")))?;
    Ok(Json(RunEventsPage {
        run_id: id.to_string(),
        events,
    })
    .into_response())
}
