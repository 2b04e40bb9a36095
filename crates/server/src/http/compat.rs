//! Routes that clients of the original Python system call, in the shapes they expect.
//!
//! The original web client is served unchanged: these routes add its extra entry points
//! on top of protocol v1 without changing any v1 shape. See "Clients of the original
//! system" in `docs/protocol.md`.

use apex_protocol::auth::LoginRequest;
use apex_protocol::auth::TokenPair;
use apex_protocol::error::ErrorBody;
use apex_protocol::threads::{MultitaskStrategy, RunStatus};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, NotFound, PayloadTooLarge, RateLimited, Unauthenticated,
    UnsupportedMediaType, ValidationFailed,
};
use super::threads::thread_id;
use super::{ApiJson, ClientAddress, ClientLabel};
use crate::auth::{bearer_token, is_dev_account, AuthError};
use crate::error::ApiError;
use crate::ids::RequestId;
use crate::limits::Throttled;
use crate::run::Steering;
use crate::state::AppState;

/// Body of `POST /auth/validate-token-and-get-user` (optional: the Bearer header works too).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ValidateTokenRequest {
    pub token: String,
}

/// `{valid: true, user_id, user}` or `{valid: false, error}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidateTokenResponse {
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<CompatUser>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ValidateTokenResponse {
    fn invalid(error: &str) -> Self {
        Self {
            valid: false,
            user_id: None,
            user: None,
            error: Some(error.to_string()),
        }
    }
}

/// The original system's user shape: `full_name` and `name` are the same value.
#[derive(Debug, Serialize, ToSchema)]
pub struct CompatUser {
    pub id: String,
    pub email: String,
    pub full_name: Option<String>,
    pub name: Option<String>,
}

/// `POST /auth/validate-token-and-get-user`: token from the Bearer header or `{token}`.
/// Always 200: `{valid: true, user_id, user}` or `{valid: false, error}`.
#[utoipa::path(
    post,
    path = "/auth/validate-token-and-get-user",
    tag = "compat",
    security((), ("bearer_jwt" = [])),
    request_body(content = Option<ValidateTokenRequest>, description = "The token, unless it is in the Authorization header"),
    responses(
        (status = 200, description = "Whether the token is valid, and whose it is", body = ValidateTokenResponse),
        (status = 500, response = Internal),
    )
)]
pub async fn validate_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ValidateTokenResponse>, ApiError> {
    let from_body = serde_json::from_slice::<ValidateTokenRequest>(&body)
        .ok()
        .map(|request| request.token);
    let token = bearer_token(&headers).map(str::to_string).or(from_body);
    let Some(token) = token else {
        return Ok(Json(ValidateTokenResponse::invalid("no token given")));
    };
    let user = match state.auth.verify_access(&token).await {
        Ok(user) => user,
        Err(AuthError::Internal(err)) => return Err(ApiError::Internal(err)),
        Err(_) => {
            return Ok(Json(ValidateTokenResponse::invalid(
                "token is invalid, expired or revoked",
            )))
        }
    };
    let info = state.auth.user_info(&user).await?;
    Ok(Json(ValidateTokenResponse {
        valid: true,
        user_id: Some(info.id.clone()),
        user: Some(CompatUser {
            id: info.id,
            email: info.email,
            full_name: info.name.clone(),
            name: info.name,
        }),
        error: None,
    }))
}

/// Answer of `GET /auth/config`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuthConfig {
    pub development_mode: bool,
    /// Always false: Apex has no OAuth.
    pub oauth_enabled: bool,
    /// Always empty.
    pub google_client_id: &'static str,
}

/// `GET /auth/config`: what the original web client asks before it shows a login form.
#[utoipa::path(
    get,
    path = "/auth/config",
    tag = "compat",
    responses((status = 200, description = "The login options", body = AuthConfig))
)]
pub async fn auth_config(State(state): State<AppState>) -> Json<AuthConfig> {
    Json(AuthConfig {
        development_mode: state.settings.development_mode,
        oauth_enabled: false,
        google_client_id: "",
    })
}

/// `POST /auth/dev/login`: log in, or register on first use. Only when both
/// `development_mode` and `dev_login` are on; otherwise it does not exist (404).
///
/// `dev@example.com` is the dev account: logged in (created on first use) whatever the
/// password, without the password rules and without the login throttle, as the original web
/// client's dev login expects (it sends the password `dev`, and retries). Any other email
/// logs in with its password or registers, by the usual rules and throttle.
#[utoipa::path(
    post,
    path = "/auth/dev/login",
    tag = "compat",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = TokenPair),
        (status = 201, description = "Registered on first use, and logged in", body = TokenPair),
        (status = 400, response = InvalidJson),
        (status = 404, description = "Development login is off (code: `not_found`)", body = ErrorBody),
        (status = 409, description = "The email has an account with another password (code: `email_taken`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn dev_login(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    ClientLabel(user_agent): ClientLabel,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<(StatusCode, Json<TokenPair>), ApiError> {
    let Some(enabled) = state.settings.dev_login_enabled() else {
        return Err(ApiError::not_found("route"));
    };
    if is_dev_account(&body.email) {
        let (pair, user, created) = state
            .auth
            .dev_account_login(enabled, user_agent.as_deref())
            .await?;
        if !created {
            return Ok((StatusCode::OK, Json(pair)));
        }
        super::auth::give_demo_data(&state, &user).await?;
        return Ok((StatusCode::CREATED, Json(pair)));
    }
    state
        .limits
        .check_login(&body.email, address)
        .await
        .map_err(|wait| ApiError::throttled(Throttled::Login, wait))?;
    match state
        .auth
        .login(&body.email, &body.password, user_agent.as_deref())
        .await
    {
        Ok(pair) => Ok((StatusCode::OK, Json(pair))),
        Err(AuthError::InvalidCredentials) => {
            state
                .limits
                .check_registration(address)
                .await
                .map_err(|wait| ApiError::throttled(Throttled::Registration, wait))?;
            let (pair, user) = state
                .auth
                .register(&body.email, &body.password, None, user_agent.as_deref())
                .await?;
            super::auth::give_demo_data(&state, &user).await?;
            Ok((StatusCode::CREATED, Json(pair)))
        }
        Err(err) => Err(err.into()),
    }
}

/// Body of `POST /api/agent/v2/execute`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ExecuteRequest {
    #[schema(example = "How can I reduce my LLM costs?")]
    pub message: String,
    /// An existing thread of the caller's; absent or empty starts a new thread.
    #[serde(default)]
    pub thread_id: Option<String>,
    // request_id, agent_type, context and settings are accepted and ignored: the run's
    // ids are the server's, and there is one agent pipeline.
}

/// Answer of `POST /api/agent/v2/execute`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecuteResponse {
    /// Always true (failures answer an error status).
    pub success: bool,
    pub result: ExecuteResult,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ExecuteResult {
    pub run_id: String,
    pub thread_id: String,
    /// Always `queued`.
    pub status: RunStatus,
}

/// `POST /api/agent/v2/execute`: starts a run and answers at once; its events go to the
/// user's sockets as usual.
#[utoipa::path(
    post,
    path = "/api/agent/v2/execute",
    tag = "compat",
    security(("bearer_jwt" = [])),
    request_body = ExecuteRequest,
    responses(
        (status = 200, description = "The run is queued", body = ExecuteResponse),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 409, description = "The thread has a run in progress (code: `thread_busy`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
        (status = 503, description = "The server is shutting down (code: `shutting_down`)", body = ErrorBody),
    )
)]
pub async fn agent_v2_execute(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<ExecuteRequest>,
) -> Result<Json<ExecuteResponse>, ApiError> {
    let thread = match body.thread_id.as_deref().filter(|t| !t.trim().is_empty()) {
        Some(raw) => Some(thread_id(raw)?),
        None => None,
    };
    let started = state
        .runs
        // The original client's route keeps its contract: a busy thread answers 409
        // `thread_busy` (double-texting is for the WebSocket and `/api/threads/{id}/runs`).
        .submit(
            &user,
            thread,
            &body.message,
            Steering {
                multitask_strategy: Some(MultitaskStrategy::Reject),
                ..Steering::unattended()
            },
            RequestId::generate(),
        )
        .await?;
    Ok(Json(ExecuteResponse {
        success: true,
        result: ExecuteResult {
            run_id: started.run_id.to_string(),
            thread_id: started.thread_id.to_string(),
            status: RunStatus::Queued,
        },
    }))
}

/// `POST /ws/beacon`: the original web client's `navigator.sendBeacon` on page unload.
/// Answers 204 and ignores the request: the body is never read, and no credential is
/// asked for, since a beacon cannot carry an `Authorization` header. Nothing happens on
/// the server, so there is nothing to protect; the socket itself ends with its close.
#[utoipa::path(
    post,
    path = "/ws/beacon",
    operation_id = "websocket_beacon",
    tag = "compat",
    request_body(content = Option<String>, content_type = "text/plain", description = "Ignored (not read)"),
    responses(
        (status = 204, description = "Accepted and ignored"),
        (status = 413, response = PayloadTooLarge),
    )
)]
pub async fn beacon() -> StatusCode {
    StatusCode::NO_CONTENT
}
