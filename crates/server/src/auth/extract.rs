//! The `AuthUser` extractor: `Authorization: Bearer <access token>` → `AuthenticatedUser`.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::{AuthError, AuthenticatedUser};
use crate::error::ApiError;
use crate::state::AppState;
use apex_protocol::error::codes;

/// Handlers that take `AuthUser` only run for a verified caller.
pub struct AuthUser(pub AuthenticatedUser);

/// The token of an `Authorization: Bearer ...` header, if any.
pub fn bearer_token(parts: &axum::http::HeaderMap) -> Option<&str> {
    let value = parts
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

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
