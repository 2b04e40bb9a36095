//! `/api/threads*`: a user's conversations and their messages, always read and written
//! through a `UserStore` bound to the caller.

use std::sync::Arc;

use apex_protocol::error::ErrorBody;
use apex_protocol::threads::{CreateThreadRequest, MessagesPage, Thread, UpdateThreadRequest};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{Map, Value};

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, NotFound, PayloadTooLarge, RateLimited, Unauthenticated,
    UnsupportedMediaType, ValidationFailed,
};
use super::{ApiJson, ApiQuery, Page};
use crate::auth::AuthenticatedUser;
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::ids::ThreadId;
use crate::state::AppState;
use crate::store::ThreadRecord;
use crate::user_store::UserStore;
use crate::views::{message_view, thread_view};

pub const MAX_TITLE_CHARS: usize = 200;
const DEFAULT_TITLE: &str = "New conversation";

fn store(state: &AppState, user: &AuthenticatedUser) -> UserStore {
    UserStore::for_user(Arc::clone(&state.infra.store), user)
}

/// A thread id from a path: malformed ids are simply "not found".
pub fn thread_id(raw: &str) -> Result<ThreadId, ApiError> {
    ThreadId::parse(raw).map_err(|_| ApiError::not_found("thread"))
}

fn validate_title(title: &str) -> Result<String, ApiError> {
    let title = title.trim();
    if title.chars().count() > MAX_TITLE_CHARS {
        return Err(ApiError::validation(format!(
            "title must be at most {MAX_TITLE_CHARS} characters"
        )));
    }
    // PostgreSQL cannot store U+0000 in text; refuse it on every engine alike.
    if title.contains('\0') {
        return Err(ApiError::validation(
            "title must not contain NUL characters",
        ));
    }
    Ok(if title.is_empty() {
        DEFAULT_TITLE.to_string()
    } else {
        title.to_string()
    })
}

fn validate_metadata(metadata: Option<Value>) -> Result<Map<String, Value>, ApiError> {
    match metadata {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) if Value::Object(map.clone()).to_string().len() <= 16 * 1024 => {
            Ok(map)
        }
        Some(Value::Object(_)) => Err(ApiError::validation("metadata must be at most 16 KiB")),
        Some(_) => Err(ApiError::validation("metadata must be a JSON object")),
    }
}

/// Creates a thread for `user`, titled from `title` (or a default).
pub async fn create_thread(
    store: &UserStore,
    title: &str,
    metadata: Map<String, Value>,
) -> Result<ThreadRecord, ApiError> {
    let now = now_ms();
    let record = ThreadRecord {
        id: ThreadId::generate(),
        title: validate_title(title)?,
        metadata: Value::Object(metadata),
        created_at_ms: now,
        updated_at_ms: now,
        message_count: 0,
    };
    store.create_thread(&record).await?;
    Ok(record)
}

/// The caller's threads, most recently updated first.
#[utoipa::path(
    get,
    path = "/api/threads",
    operation_id = "list_threads",
    tag = "threads",
    security(("bearer_jwt" = [])),
    params(Page),
    responses(
        (status = 200, description = "The caller's threads", body = Vec<Thread>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<Vec<Thread>>, ApiError> {
    let (limit, offset) = page.bounds()?;
    let threads = store(&state, &user).list_threads(limit, offset).await?;
    Ok(Json(threads.into_iter().map(thread_view).collect()))
}

/// Creates a thread.
#[utoipa::path(
    post,
    path = "/api/threads",
    operation_id = "create_thread",
    tag = "threads",
    security(("bearer_jwt" = [])),
    request_body = CreateThreadRequest,
    responses(
        (status = 201, description = "The new thread", body = Thread),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<CreateThreadRequest>,
) -> Result<(StatusCode, Json<Thread>), ApiError> {
    state
        .limits
        .check_thread_creation(user.user_id())
        .await
        .map_err(|wait| ApiError::throttled(crate::limits::Throttled::ThreadCreation, wait))?;
    let metadata = validate_metadata(body.metadata)?;
    let record = create_thread(
        &store(&state, &user),
        body.title.as_deref().unwrap_or(""),
        metadata,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(thread_view(record))))
}

/// One of the caller's threads.
#[utoipa::path(
    get,
    path = "/api/threads/{id}",
    operation_id = "get_thread",
    tag = "threads",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Thread id")),
    responses(
        (status = 200, description = "The thread", body = Thread),
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
) -> Result<Json<Thread>, ApiError> {
    let record = store(&state, &user)
        .get_thread(thread_id(&id)?)
        .await?
        .ok_or_else(|| ApiError::not_found("thread"))?;
    Ok(Json(thread_view(record)))
}

/// Renames a thread and/or merges its metadata.
#[utoipa::path(
    patch,
    path = "/api/threads/{id}",
    operation_id = "update_thread",
    tag = "threads",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Thread id")),
    request_body = UpdateThreadRequest,
    responses(
        (status = 200, description = "The updated thread", body = Thread),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<UpdateThreadRequest>,
) -> Result<Json<Thread>, ApiError> {
    let id = thread_id(&id)?;
    let store = store(&state, &user);
    let current = store
        .get_thread(id)
        .await?
        .ok_or_else(|| ApiError::not_found("thread"))?;
    let title = match body.title.as_deref() {
        Some(title) => validate_title(title)?,
        None => current.title,
    };
    // Metadata merges key by key; a null value removes the key.
    let mut metadata = match current.metadata {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    if let Some(patch) = body.metadata {
        let Value::Object(patch) = patch else {
            return Err(ApiError::validation("metadata must be a JSON object"));
        };
        for (key, value) in patch {
            if value.is_null() {
                metadata.remove(&key);
            } else {
                metadata.insert(key, value);
            }
        }
    }
    let metadata = Value::Object(validate_metadata(Some(Value::Object(metadata)))?);
    if !store.update_thread(id, &title, &metadata, now_ms()).await? {
        return Err(ApiError::not_found("thread"));
    }
    let record = store
        .get_thread(id)
        .await?
        .ok_or_else(|| ApiError::not_found("thread"))?;
    Ok(Json(thread_view(record)))
}

/// The same as `PATCH` (absent fields are left alone), for clients that send `PUT`.
#[utoipa::path(
    put,
    path = "/api/threads/{id}",
    operation_id = "put_thread",
    tag = "threads",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Thread id")),
    request_body = UpdateThreadRequest,
    responses(
        (status = 200, description = "The updated thread", body = Thread),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn put(
    state: State<AppState>,
    user: AuthUser,
    id: Path<String>,
    body: ApiJson<UpdateThreadRequest>,
) -> Result<Json<Thread>, ApiError> {
    update(state, user, id, body).await
}

/// Deletes a thread with its messages, runs and events; a run in progress ends cancelled.
#[utoipa::path(
    delete,
    path = "/api/threads/{id}",
    operation_id = "delete_thread",
    tag = "threads",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Thread id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 500, response = Internal),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = thread_id(&id)?;
    // A run on the thread ends as cancelled rather than failing on its vanished rows.
    state.runs.cancel_thread(user.user_id(), id);
    let store = store(&state, &user);
    if state.settings.bus_url.is_some() {
        // Several instances: the thread's run may execute on another one.
        for run in crate::run::submit::unfinished_runs_of(&store).await? {
            if run.thread_id == id && !state.runs.is_active(user.user_id(), run.id) {
                state.infra.bus.request_stop(user.user_id(), run.id);
            }
        }
    }
    if store.delete_thread(id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("thread"))
    }
}

/// A thread's messages, oldest first.
#[utoipa::path(
    get,
    path = "/api/threads/{id}/messages",
    operation_id = "list_messages",
    tag = "threads",
    security(("bearer_jwt" = [])),
    params(("id" = String, Path, description = "Thread id"), Page),
    responses(
        (status = 200, description = "A page of messages", body = MessagesPage),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn messages(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<MessagesPage>, ApiError> {
    let (limit, offset) = page.bounds()?;
    let id = thread_id(&id)?;
    let store = store(&state, &user);
    store
        .get_thread(id)
        .await?
        .ok_or_else(|| ApiError::not_found("thread"))?;
    let (messages, total) = store.list_messages(id, limit, offset).await?;
    Ok(Json(MessagesPage {
        thread_id: id.to_string(),
        messages: messages.into_iter().map(message_view).collect(),
        total,
        limit,
        offset,
    }))
}
