//! Identity: who is calling, and in which session. Passwords, JWTs, sessions and WebSocket
//! tickets (the axum extractor that turns a request into an identity is
//! `http::extract::AuthUser`).
//!
//! [`AuthenticatedUser`] is the root of every per-user value in Apex. Its constructor is
//! private to this module and only runs after a token's signature, expiry, audience and type
//! were checked and its session was found active (or a ticket of an active session was
//! redeemed), so holding one proves the identity. It also carries the session and the time
//! its credential expires, so a long-lived socket or stream can end when either does
//! ([`SessionWatch`]).

pub mod api_keys;
mod password;
mod service;
mod session_watch;
mod tokens;

pub use password::PasswordHasher;
pub use service::{
    create_account, is_dev_account, validate_new_account, AuthError, AuthLifetimes, Authenticator,
    DEV_ACCOUNT_EMAIL, MAX_TICKET_USES,
};
pub use session_watch::{SessionEnd, SessionGuard, SessionWatch};

use crate::ids::UserId;

/// A verified identity. Cannot be built from a client-supplied id.
#[derive(Debug, Clone)]
pub struct AuthenticatedUser {
    user_id: UserId,
    /// The login session the credential belongs to.
    session_id: String,
    /// When the credential (the access token, or the one that bought the ticket) expires,
    /// in unix milliseconds, never later than the session's own end.
    credential_expires_at_ms: i64,
    /// With an API key: what it may do (see [`api_keys`]); `None` for a login.
    key_scopes: Option<Vec<apex_protocol::auth::ApiKeyScope>>,
}

impl AuthenticatedUser {
    fn new(user_id: UserId, session_id: String, credential_expires_at_ms: i64) -> Self {
        Self {
            user_id,
            session_id,
            credential_expires_at_ms,
            key_scopes: None,
        }
    }

    /// A program with an API key: the key's id stands for the session (streams opened with
    /// it end when it is revoked).
    fn for_api_key(
        user_id: UserId,
        key_id: String,
        expires_at_ms: i64,
        scopes: Vec<apex_protocol::auth::ApiKeyScope>,
    ) -> Self {
        Self {
            user_id,
            session_id: key_id,
            credential_expires_at_ms: expires_at_ms,
            key_scopes: Some(scopes),
        }
    }

    /// A user's standing instruction: an alert rule or scheduled report they made, acting
    /// as them at its tick. The identity is the rule's stored owner, never anything a
    /// client sends at the time; `rule:<id>` stands for the session.
    pub(crate) fn for_schedule(user_id: UserId, rule_id: &str) -> Self {
        Self {
            user_id,
            session_id: format!("rule:{rule_id}"),
            credential_expires_at_ms: i64::MAX,
            key_scopes: None,
        }
    }

    /// The scopes of the API key this identity came from; `None` for a login.
    pub fn api_key_scopes(&self) -> Option<&[apex_protocol::auth::ApiKeyScope]> {
        self.key_scopes.as_deref()
    }

    /// The id of the API key this identity came from; `None` for a login.
    pub fn api_key_id(&self) -> Option<&str> {
        self.key_scopes.as_ref().map(|_| self.session_id.as_str())
    }

    pub fn user_id(&self) -> UserId {
        self.user_id
    }

    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Unix milliseconds at which the credential stops being valid: a socket or stream
    /// opened with it ends then.
    pub fn credential_expires_at_ms(&self) -> i64 {
        self.credential_expires_at_ms
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
