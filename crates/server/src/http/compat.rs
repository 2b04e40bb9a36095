//! Routes that clients of the original Python system call, in the shapes they expect.
//!
//! The original web client is served unchanged: these routes add its extra entry points
//! on top of protocol v1 without changing any v1 shape. See "Clients of the original
//! system" in `docs/protocol.md`.

use std::sync::Arc;

use apex_protocol::auth::LoginRequest;
use apex_protocol::auth::TokenPair;
use apex_protocol::error::codes;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::runs::validate_message;
use super::threads::{create_thread, thread_id};
use super::{ApiJson, ClientAddress};
use crate::auth::{bearer_token, AuthError, AuthUser};
use crate::error::ApiError;
use crate::ids::RequestId;
use crate::runs::start_run;
use crate::state::AppState;
use crate::store::UserStore;

/// `POST /auth/validate-token-and-get-user`: token from the Bearer header or `{token}`.
/// Always 200: `{valid: true, user_id, user}` or `{valid: false, error}`.
pub async fn validate_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let from_body = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("token").and_then(Value::as_str).map(str::to_string));
    let token = bearer_token(&headers).map(str::to_string).or(from_body);
    let Some(token) = token else {
        return Ok(Json(json!({"valid": false, "error": "no token given"})));
    };
    let user = match state.auth.verify_access(&token).await {
        Ok(user) => user,
        Err(AuthError::Internal(err)) => return Err(ApiError::Internal(err)),
        Err(_) => {
            return Ok(Json(
                json!({"valid": false, "error": "token is invalid, expired or revoked"}),
            ))
        }
    };
    let info = state.auth.user_info(&user).await?;
    Ok(Json(json!({
        "valid": true,
        "user_id": info.id,
        "user": {"id": info.id, "email": info.email, "full_name": info.name, "name": info.name},
    })))
}

/// `GET /auth/config`.
pub async fn auth_config(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "development_mode": state.settings.development_mode,
        "oauth_enabled": false,
        "google_client_id": "",
    }))
}

/// `POST /auth/dev/login`: log in, or register on first use. Only when both
/// `development_mode` and `dev_login` are on; otherwise it does not exist (404).
pub async fn dev_login(
    State(state): State<AppState>,
    ClientAddress(address): ClientAddress,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<(StatusCode, Json<TokenPair>), ApiError> {
    if !(state.settings.development_mode && state.settings.dev_login) {
        return Err(ApiError::not_found("route"));
    }
    state
        .limits
        .check_login(&body.email, address)
        .map_err(|retry_after| ApiError::Limited {
            code: codes::RATE_LIMITED,
            message: "too many login attempts; try again later".into(),
            retry_after,
        })?;
    match state.auth.login(&body.email, &body.password).await {
        Ok(pair) => Ok((StatusCode::OK, Json(pair))),
        Err(AuthError::InvalidCredentials) => {
            let (pair, user) = state
                .auth
                .register(&body.email, &body.password, None)
                .await?;
            super::auth::give_demo_data(&state, &user).await?;
            Ok((StatusCode::CREATED, Json(pair)))
        }
        Err(err) => Err(err.into()),
    }
}

#[derive(Debug, Deserialize)]
pub struct ExecuteRequest {
    pub message: String,
    #[serde(default)]
    pub thread_id: Option<String>,
    // request_id, agent_type, context and settings are accepted and ignored: the run's
    // ids are the server's, and there is one agent pipeline.
}

/// `POST /api/agent/v2/execute`: starts a run and answers at once; its events go to the
/// user's sockets as usual.
pub async fn agent_v2_execute(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<ExecuteRequest>,
) -> Result<Json<Value>, ApiError> {
    let text = validate_message(&body.message).map_err(ApiError::validation)?;
    let thread = match body.thread_id.as_deref().filter(|t| !t.trim().is_empty()) {
        Some(raw) => thread_id(raw)?,
        None => {
            let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
            let title: String = text.chars().take(60).collect();
            create_thread(&store, &title, Map::new()).await?.id
        }
    };
    let started = start_run(&state, &user, thread, text, RequestId::generate())
        .await
        .map_err(|e| super::runs::start_error(&state, e))?;
    Ok(Json(json!({
        "success": true,
        "result": {
            "run_id": started.run_id.to_string(),
            "thread_id": started.thread_id.to_string(),
            "status": "queued",
        },
    })))
}
