//! Identity: who is calling. Passwords, JWTs and WebSocket tickets (the axum extractor
//! that turns a request into an identity is `http::extract::AuthUser`).
//!
//! [`AuthenticatedUser`] is the root of every per-user value in Apex. Its constructor is
//! private to this module and only runs after a token signature, expiry, audience, type and
//! revocation check (or a ticket redemption) succeeded, so holding one proves the identity.

mod password;
mod service;
mod tokens;

pub use password::PasswordHasher;
pub use service::{
    create_account, is_dev_account, validate_new_account, AuthError, Authenticator,
    DEV_ACCOUNT_EMAIL,
};

use crate::ids::UserId;

/// A verified identity. Cannot be built from a client-supplied id.
#[derive(Debug, Clone)]
pub struct AuthenticatedUser {
    user_id: UserId,
    /// The access token's id and expiry, when the identity came from a JWT (for logout).
    access_token: Option<(String, i64)>,
}

impl AuthenticatedUser {
    fn from_access_token(user_id: UserId, jti: String, expires_at_ms: i64) -> Self {
        Self {
            user_id,
            access_token: Some((jti, expires_at_ms)),
        }
    }

    fn from_ticket(user_id: UserId) -> Self {
        Self {
            user_id,
            access_token: None,
        }
    }

    pub fn user_id(&self) -> UserId {
        self.user_id
    }
}

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
