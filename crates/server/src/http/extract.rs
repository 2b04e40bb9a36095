//! The `AuthUser` extractor: `Authorization: Bearer <access token>` → `AuthenticatedUser`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::auth::{bearer_token, AuthError, AuthenticatedUser};
use crate::error::ApiError;
use crate::state::AppState;
use apex_protocol::error::codes;

/// Handlers that take `AuthUser` only run for a verified caller.
pub struct AuthUser(pub AuthenticatedUser);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)
            .ok_or_else(|| ApiError::unauthorized(codes::UNAUTHORIZED, "missing bearer token"))?;
        match state.auth.verify_access(token).await {
            Ok(user) => Ok(AuthUser(user)),
            Err(AuthError::Internal(err)) => Err(ApiError::Internal(err)),
            Err(_) => Err(ApiError::unauthorized(
                codes::INVALID_TOKEN,
                "access token is invalid, expired or revoked",
            )),
        }
    }
}
