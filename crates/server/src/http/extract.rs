//! The `AuthUser` extractor: `Authorization: Bearer <access token or API key>` →
//! `AuthenticatedUser`. An API key (`apx_…`) is also checked against the route: only the
//! routes of its scopes take it (`auth::api_keys::required_scope`), others answer
//! `403 insufficient_scope`.

use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::request::Parts;

use crate::auth::{api_keys, bearer_token, AuthError, AuthenticatedUser};
use crate::error::ApiError;
use crate::state::AppState;
use apex_protocol::error::{codes, ErrorCode};

/// Handlers that take `AuthUser` only run for a verified caller.
pub struct AuthUser(pub AuthenticatedUser);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)
            .ok_or_else(|| ApiError::unauthorized(codes::UNAUTHORIZED, "missing bearer token"))?;
        let verified = if token.starts_with(api_keys::KEY_PREFIX) {
            state.auth.verify_api_key(token).await
        } else {
            state.auth.verify_access(token).await
        };
        match verified {
            Ok(user) => {
                if let Some(scopes) = user.api_key_scopes() {
                    let route = parts
                        .extensions
                        .get::<MatchedPath>()
                        .map_or("", MatchedPath::as_str);
                    match api_keys::required_scope(&parts.method, route) {
                        Some(needed) if api_keys::route_accepts(scopes, needed, route) => {}
                        Some(needed) => {
                            return Err(ApiError::coded(
                                ErrorCode::InsufficientScope,
                                format!("this API key lacks the {} scope", needed.as_str()),
                            ))
                        }
                        None => {
                            return Err(ApiError::coded(
                                ErrorCode::InsufficientScope,
                                "API keys cannot be used here; log in instead",
                            ))
                        }
                    }
                }
                Ok(AuthUser(user))
            }
            Err(AuthError::Internal(err)) => Err(ApiError::Internal(err)),
            Err(_) => Err(ApiError::unauthorized(
                codes::INVALID_TOKEN,
                "access token is invalid, expired or revoked",
            )),
        }
    }
}
