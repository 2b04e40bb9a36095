//! The single error shape of the REST API and the stable error codes.
//!
//! Every failed HTTP request answers `{"error":{"code":"snake_case_code","message":"..."}}`.
//! Codes are part of the contract: clients branch on them, so they never change meaning.
//! WebSocket errors use the upper-case codes in [`ws_codes`] inside an `error_message` frame.
//! Both come from one table, [`ErrorCode`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
/// The body of every failed REST request: `{"error":{"code":"...","message":"..."}}`.
#[schema(example = json!({"error": {"code": "not_found", "message": "thread not found"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case code (see [`codes`] and `docs/errors.md`); clients branch on it.
    #[schema(example = "not_found")]
    pub code: String,
    /// Human-readable; may change between versions.
    pub message: String,
    /// Figures a client can act on, for the codes that have them (`budget_exceeded`:
    /// a [`crate::budgets::BudgetExceededDetails`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// Every error a client can be told about, over REST or the WebSocket: one row per
/// concept, with its REST code (snake_case, in the JSON error body), its WebSocket code
/// (upper case, in an `error_message` frame, as the original system's clients expect) and
/// its HTTP status. The constants in [`codes`] and [`ws_codes`] are read from this table,
/// so the two vocabularies cannot drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is well-formed but a value is not acceptable.
    ValidationFailed,
    EmailTaken,
    InvalidCredentials,
    /// No credential was given.
    Unauthorized,
    /// The credential is invalid, expired or revoked.
    InvalidToken,
    /// A resource other than a thread or run does not exist (or is someone else's).
    NotFound,
    /// The thread does not exist or is someone else's (REST: `not_found`).
    ThreadNotFound,
    /// The run does not exist or is someone else's (REST: `not_found`).
    RunNotFound,
    /// The run already ended (or, on the socket, there is no run to stop).
    RunNotActive,
    PayloadTooLarge,
    /// The body or frame is not JSON of the expected shape.
    InvalidJson,
    UnsupportedMediaType,
    MethodNotAllowed,
    /// The server is draining: no new runs.
    ShuttingDown,
    /// The user has as many unfinished runs as allowed.
    TooManyRuns,
    /// The thread already has a run in progress.
    ThreadBusy,
    /// Too many messages; retry after the given time.
    RateLimited,
    /// A browser origin that may not call the API.
    OriginNotAllowed,
    /// The requested events were removed by retention; reload the thread.
    ResumeGap,
    /// `/v1/chat/completions`: the model is not one `/v1/models` lists.
    ModelNotFound,
    /// `/v1/chat/completions` with model `apex`: the run ended other than `completed`.
    RunFailed,
    /// `/v1/chat/completions` with the local model: it could not answer (queue full,
    /// failure).
    LlmUnavailable,
    /// The user has as many open connections (WebSockets and event streams) as allowed.
    TooManyConnections,
    /// `/v1/chat/completions` with the local model: the user has as many direct
    /// completions in progress as allowed.
    TooManyCompletions,
    /// A WebSocket frame of a type the server does not know.
    UnknownMessageType,
    /// The session the credential belongs to ended (logout, logout-all, revoked, or a
    /// replayed refresh token); log in again. Sent before a socket or stream is closed.
    SessionEnded,
    /// The access token a socket or stream was opened with expired; reconnect with a fresh
    /// token (and `resume`, which loses nothing).
    TokenExpired,
    /// A usage import would leave the user with more stored rows than allowed; nothing of
    /// it was stored.
    ImportQuotaExceeded,
    /// An approval answered a run that is not waiting for it (never asked, already
    /// ended, or another `approval_id`).
    ApprovalNotPending,
    /// The run's approval was already answered with another decision.
    ApprovalAlreadyDecided,
    /// The approval was not answered in time; the run ended `timed_out`.
    ApprovalExpired,
    /// An API key was used on a route its scopes do not allow (or one no key may use).
    InsufficientScope,
    /// The gateway could not reach the model's upstream (an upstream's own error answers
    /// are passed on as they came).
    UpstreamUnavailable,
    /// An LLM call would go past a budget the user set; `details` says which, its limit,
    /// what is spent and when it resets.
    BudgetExceeded,
    /// The caller's role in a team does not allow this (a member asking for the team's
    /// usage, an admin removing the owner).
    Forbidden,
    /// A failure of the server's own; details stay in its log.
    Internal,
}

impl ErrorCode {
    /// Every row of the table.
    pub const ALL: [ErrorCode; 36] = [
        ErrorCode::ValidationFailed,
        ErrorCode::EmailTaken,
        ErrorCode::InvalidCredentials,
        ErrorCode::Unauthorized,
        ErrorCode::InvalidToken,
        ErrorCode::NotFound,
        ErrorCode::ThreadNotFound,
        ErrorCode::RunNotFound,
        ErrorCode::RunNotActive,
        ErrorCode::PayloadTooLarge,
        ErrorCode::InvalidJson,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::MethodNotAllowed,
        ErrorCode::ShuttingDown,
        ErrorCode::TooManyRuns,
        ErrorCode::ThreadBusy,
        ErrorCode::RateLimited,
        ErrorCode::OriginNotAllowed,
        ErrorCode::ResumeGap,
        ErrorCode::ModelNotFound,
        ErrorCode::RunFailed,
        ErrorCode::LlmUnavailable,
        ErrorCode::TooManyConnections,
        ErrorCode::TooManyCompletions,
        ErrorCode::UnknownMessageType,
        ErrorCode::SessionEnded,
        ErrorCode::TokenExpired,
        ErrorCode::ImportQuotaExceeded,
        ErrorCode::ApprovalNotPending,
        ErrorCode::ApprovalAlreadyDecided,
        ErrorCode::ApprovalExpired,
        ErrorCode::InsufficientScope,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::BudgetExceeded,
        ErrorCode::Forbidden,
        ErrorCode::Internal,
    ];

    /// `(REST code, WebSocket code, HTTP status)`.
    const fn row(self) -> (&'static str, &'static str, u16) {
        match self {
            ErrorCode::ValidationFailed => ("validation_failed", "VALIDATION_ERROR", 422),
            ErrorCode::EmailTaken => ("email_taken", "EMAIL_TAKEN", 409),
            ErrorCode::InvalidCredentials => ("invalid_credentials", "INVALID_CREDENTIALS", 401),
            ErrorCode::Unauthorized => ("unauthorized", "AUTH_FAILED", 401),
            ErrorCode::InvalidToken => ("invalid_token", "AUTH_FAILED", 401),
            ErrorCode::NotFound => ("not_found", "NOT_FOUND", 404),
            ErrorCode::ThreadNotFound => ("not_found", "THREAD_NOT_FOUND", 404),
            ErrorCode::RunNotFound => ("not_found", "RUN_NOT_FOUND", 404),
            ErrorCode::RunNotActive => ("run_not_active", "RUN_NOT_ACTIVE", 409),
            ErrorCode::PayloadTooLarge => ("payload_too_large", "PAYLOAD_TOO_LARGE", 413),
            ErrorCode::InvalidJson => ("invalid_json", "JSON_PARSE_ERROR", 400),
            ErrorCode::UnsupportedMediaType => {
                ("unsupported_media_type", "UNSUPPORTED_MEDIA_TYPE", 415)
            }
            ErrorCode::MethodNotAllowed => ("method_not_allowed", "METHOD_NOT_ALLOWED", 405),
            ErrorCode::ShuttingDown => ("shutting_down", "SERVER_SHUTTING_DOWN", 503),
            ErrorCode::TooManyRuns => ("too_many_runs", "TOO_MANY_RUNS", 429),
            ErrorCode::ThreadBusy => ("thread_busy", "THREAD_BUSY", 409),
            ErrorCode::RateLimited => ("rate_limited", "RATE_LIMITED", 429),
            ErrorCode::OriginNotAllowed => ("origin_not_allowed", "ORIGIN_NOT_ALLOWED", 403),
            ErrorCode::ResumeGap => ("resume_gap", "RESUME_GAP", 410),
            ErrorCode::ModelNotFound => ("model_not_found", "MODEL_NOT_FOUND", 404),
            ErrorCode::RunFailed => ("run_failed", "RUN_FAILED", 502),
            ErrorCode::LlmUnavailable => ("llm_unavailable", "LLM_UNAVAILABLE", 503),
            ErrorCode::TooManyConnections => ("too_many_connections", "TOO_MANY_CONNECTIONS", 429),
            ErrorCode::TooManyCompletions => ("too_many_completions", "TOO_MANY_COMPLETIONS", 429),
            ErrorCode::UnknownMessageType => ("unknown_message_type", "UNKNOWN_MESSAGE_TYPE", 400),
            ErrorCode::SessionEnded => ("session_ended", "SESSION_ENDED", 401),
            ErrorCode::TokenExpired => ("token_expired", "TOKEN_EXPIRED", 401),
            ErrorCode::ImportQuotaExceeded => {
                ("import_quota_exceeded", "IMPORT_QUOTA_EXCEEDED", 409)
            }
            ErrorCode::ApprovalNotPending => ("approval_not_pending", "APPROVAL_NOT_PENDING", 409),
            ErrorCode::ApprovalAlreadyDecided => {
                ("approval_already_decided", "APPROVAL_ALREADY_DECIDED", 409)
            }
            ErrorCode::ApprovalExpired => ("approval_expired", "APPROVAL_EXPIRED", 409),
            ErrorCode::InsufficientScope => ("insufficient_scope", "INSUFFICIENT_SCOPE", 403),
            ErrorCode::UpstreamUnavailable => ("upstream_unavailable", "UPSTREAM_UNAVAILABLE", 502),
            ErrorCode::BudgetExceeded => ("budget_exceeded", "BUDGET_EXCEEDED", 402),
            ErrorCode::Forbidden => ("forbidden", "FORBIDDEN", 403),
            ErrorCode::Internal => ("internal_error", "INTERNAL_ERROR", 500),
        }
    }

    /// The code in a REST error body.
    pub const fn rest(self) -> &'static str {
        self.row().0
    }

    /// The code in a WebSocket `error_message` frame.
    pub const fn ws(self) -> &'static str {
        self.row().1
    }

    /// The HTTP status a REST answer with this code has.
    pub const fn http_status(self) -> u16 {
        self.row().2
    }
}

/// REST error codes (snake_case), from [`ErrorCode`]; `docs/errors.md` lists them.
pub mod codes {
    use super::ErrorCode as C;

    pub const VALIDATION_FAILED: &str = C::ValidationFailed.rest();
    pub const EMAIL_TAKEN: &str = C::EmailTaken.rest();
    pub const INVALID_CREDENTIALS: &str = C::InvalidCredentials.rest();
    pub const UNAUTHORIZED: &str = C::Unauthorized.rest();
    pub const INVALID_TOKEN: &str = C::InvalidToken.rest();
    pub const NOT_FOUND: &str = C::NotFound.rest();
    pub const RUN_NOT_ACTIVE: &str = C::RunNotActive.rest();
    pub const PAYLOAD_TOO_LARGE: &str = C::PayloadTooLarge.rest();
    pub const INVALID_JSON: &str = C::InvalidJson.rest();
    pub const UNSUPPORTED_MEDIA_TYPE: &str = C::UnsupportedMediaType.rest();
    pub const METHOD_NOT_ALLOWED: &str = C::MethodNotAllowed.rest();
    pub const SHUTTING_DOWN: &str = C::ShuttingDown.rest();
    pub const TOO_MANY_RUNS: &str = C::TooManyRuns.rest();
    pub const THREAD_BUSY: &str = C::ThreadBusy.rest();
    pub const RATE_LIMITED: &str = C::RateLimited.rest();
    pub const ORIGIN_NOT_ALLOWED: &str = C::OriginNotAllowed.rest();
    pub const RESUME_GAP: &str = C::ResumeGap.rest();
    pub const MODEL_NOT_FOUND: &str = C::ModelNotFound.rest();
    pub const RUN_FAILED: &str = C::RunFailed.rest();
    pub const LLM_UNAVAILABLE: &str = C::LlmUnavailable.rest();
    pub const TOO_MANY_CONNECTIONS: &str = C::TooManyConnections.rest();
    pub const TOO_MANY_COMPLETIONS: &str = C::TooManyCompletions.rest();
    pub const IMPORT_QUOTA_EXCEEDED: &str = C::ImportQuotaExceeded.rest();
    pub const APPROVAL_NOT_PENDING: &str = C::ApprovalNotPending.rest();
    pub const APPROVAL_ALREADY_DECIDED: &str = C::ApprovalAlreadyDecided.rest();
    pub const APPROVAL_EXPIRED: &str = C::ApprovalExpired.rest();
    pub const INSUFFICIENT_SCOPE: &str = C::InsufficientScope.rest();
    pub const UPSTREAM_UNAVAILABLE: &str = C::UpstreamUnavailable.rest();
    pub const BUDGET_EXCEEDED: &str = C::BudgetExceeded.rest();
    pub const FORBIDDEN: &str = C::Forbidden.rest();
    pub const INTERNAL: &str = C::Internal.rest();
}

/// WebSocket error codes (upper case), from [`ErrorCode`].
pub mod ws_codes {
    use super::ErrorCode as C;

    pub const AUTH_FAILED: &str = C::InvalidToken.ws();
    pub const SESSION_ENDED: &str = C::SessionEnded.ws();
    pub const TOKEN_EXPIRED: &str = C::TokenExpired.ws();
    pub const JSON_PARSE_ERROR: &str = C::InvalidJson.ws();
    pub const UNKNOWN_MESSAGE_TYPE: &str = C::UnknownMessageType.ws();
    pub const VALIDATION_ERROR: &str = C::ValidationFailed.ws();
    pub const THREAD_NOT_FOUND: &str = C::ThreadNotFound.ws();
    pub const RUN_NOT_FOUND: &str = C::RunNotFound.ws();
    pub const RUN_NOT_ACTIVE: &str = C::RunNotActive.ws();
    pub const SERVER_SHUTTING_DOWN: &str = C::ShuttingDown.ws();
    pub const TOO_MANY_RUNS: &str = C::TooManyRuns.ws();
    pub const THREAD_BUSY: &str = C::ThreadBusy.ws();
    pub const RATE_LIMITED: &str = C::RateLimited.ws();
    pub const TOO_MANY_CONNECTIONS: &str = C::TooManyConnections.ws();
    pub const INTERNAL_ERROR: &str = C::Internal.ws();
}

/// Codes carried by `agent_error` events and by the terminal event of a failed run.
pub mod agent_codes {
    pub const TOOL_FAILED: &str = "TOOL_FAILED";
    pub const LLM_FAILED: &str = "LLM_FAILED";
    pub const AGENT_PANICKED: &str = "AGENT_PANICKED";
    pub const CANCELLED: &str = "CANCELLED";
    pub const TIMED_OUT: &str = "TIMED_OUT";
    pub const STORAGE_FAILED: &str = "STORAGE_FAILED";
    /// The server stopped (shutdown after the grace period, or a crash) during the run.
    pub const INTERRUPTED: &str = "INTERRUPTED";
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    /// REST codes are snake_case, socket codes upper case, and one code never means two
    /// things on the same side (the not-found family shares REST's `not_found` on
    /// purpose; the unauthenticated pair shares the socket's `AUTH_FAILED`).
    #[test]
    fn the_table_is_consistent() {
        for code in ErrorCode::ALL {
            assert!(code
                .rest()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_'));
            assert!(code
                .ws()
                .chars()
                .all(|c| c.is_ascii_uppercase() || c == '_'));
            assert!((400..600).contains(&code.http_status()), "{code:?}");
        }
        for (i, a) in ErrorCode::ALL.iter().enumerate() {
            for b in &ErrorCode::ALL[i + 1..] {
                if a.ws() == b.ws() {
                    assert_eq!(a.ws(), "AUTH_FAILED", "{a:?} and {b:?}");
                }
                if a.rest() == b.rest() {
                    assert_eq!(a.rest(), "not_found", "{a:?} and {b:?}");
                    assert_eq!(a.http_status(), b.http_status());
                }
            }
        }
    }
}
