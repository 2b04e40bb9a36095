//! `/api/keys`: the caller's API keys (see `auth::api_keys`). Only a login manages keys:
//! no API key may make, list or revoke one.

use apex_protocol::auth::{ApiKeyInfo, CreateApiKeyRequest, CreatedApiKey};
use apex_protocol::error::ErrorBody;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, PayloadTooLarge, Unauthenticated, UnsupportedMediaType, ValidationFailed,
};
use super::ApiJson;
use crate::error::ApiError;
use crate::state::AppState;

/// Makes an API key for a program. The key is in this answer only: it is stored as a
/// digest. It acts as the caller, on the routes of its scopes only.
#[utoipa::path(
    post,
    path = "/api/keys",
    operation_id = "create_api_key",
    tag = "keys",
    security(("bearer_jwt" = [])),
    request_body = CreateApiKeyRequest,
    responses(
        (status = 201, description = "The key, shown this once", body = CreatedApiKey),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let created = state.auth.create_api_key(&user, &body).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// The caller's active keys, newest first (never the keys themselves).
#[utoipa::path(
    get,
    path = "/api/keys",
    operation_id = "list_api_keys",
    tag = "keys",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "The caller's active keys", body = Vec<ApiKeyInfo>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<ApiKeyInfo>>, ApiError> {
    Ok(Json(state.auth.list_api_keys(&user).await?))
}

/// Revokes one of the caller's keys: it stops working on every instance at once, and
/// streams opened with it end within a second. Another user's key answers like a missing
/// one.
#[utoipa::path(
    delete,
    path = "/api/keys/{key_id}",
    operation_id = "revoke_api_key",
    tag = "keys",
    security(("bearer_jwt" = [])),
    params(("key_id" = String, Path, description = "A key id from `GET /api/keys`")),
    responses(
        (status = 204, description = "The key is revoked"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such active key of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn revoke(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(key_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.auth.revoke_api_key(&user, &key_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("key"))
    }
}
