//! `/auth/*` and `/api/websocket/ticket`: accounts, the token pair, sessions (logout,
//! logout-all, the sessions list) and WebSocket tickets. Maps [`AuthError`] to the API's
//! error codes.
//!
//! Registration keeps answering `409 email_taken` for a taken email: registration logs the
//! new account in (it answers with tokens), so an answer identical to success cannot be
//! given for an account that is not the caller's, and Apex has no mail channel to send
//! "you already have an account" through instead. The oracle is bounded by the
//! registration throttle (per address and per instance), which makes probing emails as
//! slow as creating accounts. See "Security" in the README.

use std::sync::Arc;

use apex_protocol::approval::UserSettings;
use apex_protocol::auth::{
    LoginRequest, RefreshRequest, RegisterRequest, SessionInfo, TicketRequest, TicketResponse,
    TokenPair, UserInfo,
};
use apex_protocol::error::{codes, ErrorBody};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidCredentials, InvalidJson, PayloadTooLarge, RateLimited, Unauthenticated,
    UnsupportedMediaType, ValidationFailed,
};
use super::{ApiJson, ClientAddress, ClientLabel};
use crate::auth::{AuthError, AuthenticatedUser};
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::limits::Throttled;
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
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    ClientLabel(user_agent): ClientLabel,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<TokenPair>), ApiError> {
    // Before any work: every per-user limit multiplies with accounts.
    state
        .limits
        .check_registration(address)
        .await
        .map_err(|wait| ApiError::throttled(Throttled::Registration, wait))?;
    let (pair, user) = state
        .auth
        .register(
            &body.email,
            &body.password,
            body.name.as_deref(),
            user_agent.as_deref(),
        )
        .await?;
    give_demo_data(&state, &user).await?;
    Ok((StatusCode::CREATED, Json(pair)))
}

/// With `demo_data` on, a new account gets 30 days of generated usage.
pub async fn give_demo_data(state: &AppState, user: &AuthenticatedUser) -> Result<(), ApiError> {
    if state.settings.demo_data {
        let store = UserStore::for_user(Arc::clone(&state.infra.store), user);
        let rows = demo::generate(user.user_id(), now_ms(), &state.infra.price_book);
        store.insert_usage(&rows).await?;
    }
    Ok(())
}

/// Exchanges email and password for a token pair, starting a new session. Throttled per
/// address, and per account from that address (so failed guesses from elsewhere never lock
/// the owner out).
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
    ClientLabel(user_agent): ClientLabel,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    // Counted whether the attempt succeeds or not, so guessing passwords is slow even
    // across many accounts.
    state
        .limits
        .check_login(&body.email, address)
        .await
        .map_err(|wait| ApiError::throttled(Throttled::Login, wait))?;
    Ok(Json(
        state
            .auth
            .login(&body.email, &body.password, user_agent.as_deref())
            .await?,
    ))
}

/// Exchanges a refresh token (once) for a new token pair in the same session. A refresh
/// token presented a second time ends its session (every token of it stops working), and
/// no pair outlives the session's absolute lifetime.
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
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn refresh(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<Json<TokenPair>, ApiError> {
    state
        .limits
        .check_refresh(address)
        .await
        .map_err(|wait| ApiError::throttled(Throttled::Refresh, wait))?;
    Ok(Json(state.auth.refresh(&body.refresh_token).await?))
}

/// Ends the session of the access token used for this request: its refresh token, its
/// tickets and its open sockets and streams (on every instance, within a second).
#[utoipa::path(
    post,
    path = "/auth/logout",
    tag = "auth",
    security(("bearer_jwt" = [])),
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
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

/// Ends every session of the caller, this one included ("log out everywhere").
#[utoipa::path(
    post,
    path = "/auth/logout-all",
    operation_id = "logout_all",
    tag = "auth",
    security(("bearer_jwt" = [])),
    responses(
        (status = 204, description = "Every session ended"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn logout_all(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<StatusCode, ApiError> {
    state.auth.logout_all(&user).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's active sessions, newest first; `current` marks the one asking.
#[utoipa::path(
    get,
    path = "/auth/sessions",
    operation_id = "list_sessions",
    tag = "auth",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "Active sessions", body = Vec<SessionInfo>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn sessions(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<SessionInfo>>, ApiError> {
    Ok(Json(state.auth.list_sessions(&user).await?))
}

/// Ends one of the caller's sessions (its tokens, tickets and open sockets). Another
/// user's session id answers like a missing one.
#[utoipa::path(
    delete,
    path = "/auth/sessions/{session_id}",
    operation_id = "revoke_session",
    tag = "auth",
    security(("bearer_jwt" = [])),
    params(("session_id" = String, Path, description = "A session id from `GET /auth/sessions`")),
    responses(
        (status = 204, description = "The session ended"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such active session of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn revoke_session(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(session_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if state.auth.revoke_session(&user, &session_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("session"))
    }
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
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn me(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<UserInfo>, ApiError> {
    Ok(Json(state.auth.user_info(&user).await?))
}

/// The caller's settings.
#[utoipa::path(
    get,
    path = "/api/settings",
    operation_id = "get_settings",
    tag = "auth",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "The caller's settings", body = UserSettings),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn settings(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<UserSettings>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    Ok(Json(UserSettings {
        require_approval: store.require_approval_setting().await?,
    }))
}

/// Replaces the caller's settings; answers them as stored.
#[utoipa::path(
    put,
    path = "/api/settings",
    operation_id = "update_settings",
    tag = "auth",
    security(("bearer_jwt" = [])),
    request_body = UserSettings,
    responses(
        (status = 200, description = "The caller's settings, as stored", body = UserSettings),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn update_settings(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<UserSettings>,
) -> Result<Json<UserSettings>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    if !store
        .set_require_approval_setting(body.require_approval)
        .await?
    {
        // The account is gone while its token still verified: nothing to set.
        return Err(ApiError::not_found("user"));
    }
    Ok(Json(body))
}

/// Issues a short-lived ticket for `GET /ws?ticket=...`, so the JWT never appears in a URL.
/// The body is optional: an empty POST asks for a default ticket. A ticket belongs to the
/// caller's session and lives no longer than the access token that asked for it (a socket
/// opened with it closes then, too); a multi-use ticket opens at most 5 sockets.
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
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = ValidationFailed),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn ticket(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<TicketResponse>, ApiError> {
    state
        .limits
        .check_ticket(user.user_id())
        .await
        .map_err(|wait| ApiError::throttled(Throttled::Ticket, wait))?;
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
