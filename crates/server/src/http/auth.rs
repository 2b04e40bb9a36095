//! `/auth/*` and `/api/websocket/ticket`: accounts, the token pair, logout and WebSocket
//! tickets. Maps [`AuthError`] to the API's error codes.

use std::sync::Arc;

use apex_protocol::auth::{
    LoginRequest, RefreshRequest, RegisterRequest, TicketRequest, TicketResponse, TokenPair,
    UserInfo,
};
use apex_protocol::error::{codes, ErrorBody};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidCredentials, InvalidJson, PayloadTooLarge, RateLimited, Unauthenticated,
    UnsupportedMediaType, ValidationFailed,
};
use super::{ApiJson, ClientAddress};
use crate::auth::{AuthError, AuthenticatedUser};
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::state::AppState;
use crate::usage::demo;
use crate::user_store::UserStore;

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Validation(message) => ApiError::validation(message),
            AuthError::EmailTaken => {
                ApiError::client(StatusCode::CONFLICT, codes::EMAIL_TAKEN, err.to_string())
            }
            AuthError::InvalidCredentials => {
                ApiError::unauthorized(codes::INVALID_CREDENTIALS, err.to_string())
            }
            AuthError::InvalidToken => {
                ApiError::unauthorized(codes::INVALID_TOKEN, err.to_string())
            }
            AuthError::Internal(inner) => ApiError::Internal(inner),
        }
    }
}

/// Creates an account and logs it in. With demo data on (the default), the account gets
/// 30 days of generated usage.
#[utoipa::path(
    post,
    path = "/auth/register",
    tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Account created; its tokens", body = TokenPair),
        (status = 400, response = InvalidJson),
        (status = 409, description = "An account with this email exists (code: `email_taken`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<TokenPair>), ApiError> {
    let (pair, user) = state
        .auth
        .register(&body.email, &body.password, body.name.as_deref())
        .await?;
    give_demo_data(&state, &user).await?;
    Ok((StatusCode::CREATED, Json(pair)))
}

/// With `demo_data` on, a new account gets 30 days of generated usage.
pub async fn give_demo_data(state: &AppState, user: &AuthenticatedUser) -> Result<(), ApiError> {
    if state.settings.demo_data {
        let store = UserStore::for_user(Arc::clone(&state.infra.store), user);
        let rows = demo::generate(user.user_id(), now_ms(), &state.infra.pricing);
        store.insert_usage(&rows).await?;
    }
    Ok(())
}

/// Exchanges email and password for a token pair. Throttled per account and per address.
#[utoipa::path(
    post,
    path = "/auth/login",
    tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in; the tokens", body = TokenPair),
        (status = 400, response = InvalidJson),
        (status = 401, response = InvalidCredentials),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    // Throttled per account and per address, whether the attempt succeeds or not, so
    // guessing passwords is slow even across many accounts.
    state
        .limits
        .check_login(&body.email, address)
        .await
        .map_err(|retry_after| {
            crate::telemetry::limit_rejected("login_throttled");
            ApiError::Limited {
                code: codes::RATE_LIMITED,
                message: "too many login attempts; try again later".into(),
                retry_after,
            }
        })?;
    Ok(Json(state.auth.login(&body.email, &body.password).await?))
}

/// Exchanges a refresh token (once) for a new token pair.
#[utoipa::path(
    post,
    path = "/auth/refresh",
    tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "New tokens; the old refresh token is spent", body = TokenPair),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn refresh(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    Ok(Json(state.auth.refresh(&body.refresh_token).await?))
}

/// Revokes the access token used for this request.
#[utoipa::path(
    post,
    path = "/auth/logout",
    tag = "auth",
    security(("bearer_jwt" = [])),
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, response = Unauthenticated),
        (status = 500, response = Internal),
    )
)]
pub async fn logout(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<StatusCode, ApiError> {
    state.auth.logout(&user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's account.
#[utoipa::path(
    get,
    path = "/auth/me",
    operation_id = "me",
    tag = "auth",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "The caller's account", body = UserInfo),
        (status = 401, response = Unauthenticated),
        (status = 500, response = Internal),
    )
)]
pub async fn me(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<UserInfo>, ApiError> {
    Ok(Json(state.auth.user_info(&user).await?))
}

/// Issues a short-lived ticket for `GET /ws?ticket=...`, so the JWT never appears in a URL.
/// The body is optional: an empty POST asks for a default ticket.
#[utoipa::path(
    post,
    path = "/api/websocket/ticket",
    operation_id = "websocket_ticket",
    tag = "auth",
    security(("bearer_jwt" = [])),
    request_body(content = Option<TicketRequest>, description = "Optional; an empty body gives the defaults"),
    responses(
        (status = 200, description = "The ticket", body = TicketResponse),
        (status = 401, response = Unauthenticated),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn ticket(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<TicketResponse>, ApiError> {
    // The body is optional: an empty POST asks for a default ticket.
    let request: TicketRequest = if body.iter().all(u8::is_ascii_whitespace) {
        TicketRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::validation(format!("invalid ticket request: {e}")))?
    };
    let websocket_url = crate::ws::ticket_websocket_url(&state.settings.public_origins, &headers);
    Ok(Json(
        state
            .auth
            .issue_ticket(
                &user,
                request.ttl_seconds,
                request.single_use,
                websocket_url,
            )
            .await?,
    ))
}
