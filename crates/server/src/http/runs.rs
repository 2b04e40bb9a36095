//! `/api/threads/{id}/runs` and `/api/runs/*`: start, inspect, stop, replay.

use std::sync::Arc;

use apex_protocol::error::codes;
use apex_protocol::events::AgentEvent;
use apex_protocol::threads::{Run, RunAccepted, RunEventsPage, RunStatus, StartRunRequest};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::threads::thread_id;
use super::{ApiJson, ApiQuery};
use crate::auth::AuthUser;
use crate::clock::ms_to_rfc3339;
use crate::error::ApiError;
use crate::ids::{RequestId, RunId};
use crate::runs::{start_run, stop_run, StartRunError, StopOutcome};
use crate::state::AppState;
use crate::store::UserStore;

/// Longest accepted user message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 16_000;

pub fn validate_message(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("message must not be empty".into());
    }
    if text.chars().count() > MAX_MESSAGE_CHARS {
        return Err(format!(
            "message must be at most {MAX_MESSAGE_CHARS} characters"
        ));
    }
    // PostgreSQL cannot store U+0000 in text; refuse it on every engine alike.
    if text.contains('\0') {
        return Err("message must not contain NUL characters".into());
    }
    Ok(text.to_string())
}

fn run_id(raw: &str) -> Result<RunId, ApiError> {
    RunId::parse(raw).map_err(|_| ApiError::not_found("run"))
}

pub async fn start(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<StartRunRequest>,
) -> Result<(StatusCode, Json<RunAccepted>), ApiError> {
    let text = validate_message(&body.message).map_err(ApiError::validation)?;
    let thread = thread_id(&id)?;
    match start_run(&state, &user, thread, text, RequestId::generate()).await {
        Ok(started) => Ok((
            StatusCode::ACCEPTED,
            Json(RunAccepted {
                run_id: started.run_id.to_string(),
                thread_id: started.thread_id.to_string(),
                status: RunStatus::Queued,
            }),
        )),
        Err(StartRunError::ThreadNotFound) => Err(ApiError::not_found("thread")),
        Err(StartRunError::ShuttingDown) => Err(ApiError::client(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::SHUTTING_DOWN,
            "the server is shutting down; retry later",
        )),
        Err(StartRunError::Store(err)) => Err(err.into()),
    }
}

pub async fn get_one(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Run>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let run = store
        .get_run(run_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::not_found("run"))?;
    Ok(Json(Run {
        id: run.id.to_string(),
        thread_id: run.thread_id.to_string(),
        status: run.status,
        created_at: ms_to_rfc3339(run.created_at_ms),
        started_at: run.started_at_ms.map(ms_to_rfc3339),
        finished_at: run.finished_at_ms.map(ms_to_rfc3339),
        error: run.error,
        last_seq: run.last_seq,
    }))
}

pub async fn cancel(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RunAccepted>), ApiError> {
    let id = run_id(&id)?;
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    match stop_run(&state, &user, id).await? {
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

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    #[serde(default)]
    pub after_seq: u64,
    pub limit: Option<i64>,
}

pub async fn events(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Json<RunEventsPage>, ApiError> {
    let id = run_id(&id)?;
    let limit = query.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::validation("limit must be 1..=10000"));
    }
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    store
        .get_run(id)
        .await?
        .ok_or_else(|| ApiError::not_found("run"))?;
    let stored = store.list_events(id, query.after_seq, limit).await?;
    let events = stored
        .iter()
        .map(|e| serde_json::from_str::<AgentEvent>(&e.json))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("stored event is not valid: {e}")))?;
    Ok(Json(RunEventsPage {
        run_id: id.to_string(),
        events,
    }))
}
