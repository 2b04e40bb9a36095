//! The single error shape of the REST API and the stable error codes.
//!
//! Every failed HTTP request answers `{"error":{"code":"snake_case_code","message":"..."}}`.
//! Codes are part of the contract: clients branch on them, so they never change meaning.
//! WebSocket errors use the upper-case codes in [`ws_codes`] inside an `error_message` frame.

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
}

/// REST error codes (snake_case), paired with their HTTP status in `docs/protocol.md`.
pub mod codes {
    pub const VALIDATION_FAILED: &str = "validation_failed";
    pub const EMAIL_TAKEN: &str = "email_taken";
    pub const INVALID_CREDENTIALS: &str = "invalid_credentials";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const INVALID_TOKEN: &str = "invalid_token";
    pub const NOT_FOUND: &str = "not_found";
    pub const RUN_NOT_ACTIVE: &str = "run_not_active";
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    pub const INVALID_JSON: &str = "invalid_json";
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "unsupported_media_type";
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    pub const SHUTTING_DOWN: &str = "shutting_down";
    pub const TOO_MANY_RUNS: &str = "too_many_runs";
    pub const THREAD_BUSY: &str = "thread_busy";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const ORIGIN_NOT_ALLOWED: &str = "origin_not_allowed";
    /// The requested events were removed by retention; reload the thread.
    pub const RESUME_GAP: &str = "resume_gap";
    /// `/v1/chat/completions`: the model is not one `/v1/models` lists.
    pub const MODEL_NOT_FOUND: &str = "model_not_found";
    /// `/v1/chat/completions` with model `apex`: the run ended other than `completed`.
    pub const RUN_FAILED: &str = "run_failed";
    /// `/v1/chat/completions` with the local model: it could not answer (queue full, failure).
    pub const LLM_UNAVAILABLE: &str = "llm_unavailable";
    pub const INTERNAL: &str = "internal_error";
}

/// WebSocket error codes (upper case, as the original system's clients expect).
pub mod ws_codes {
    pub const AUTH_FAILED: &str = "AUTH_FAILED";
    pub const JSON_PARSE_ERROR: &str = "JSON_PARSE_ERROR";
    pub const UNKNOWN_MESSAGE_TYPE: &str = "UNKNOWN_MESSAGE_TYPE";
    pub const VALIDATION_ERROR: &str = "VALIDATION_ERROR";
    pub const THREAD_NOT_FOUND: &str = "THREAD_NOT_FOUND";
    pub const RUN_NOT_FOUND: &str = "RUN_NOT_FOUND";
    pub const RUN_NOT_ACTIVE: &str = "RUN_NOT_ACTIVE";
    pub const SERVER_SHUTTING_DOWN: &str = "SERVER_SHUTTING_DOWN";
    pub const TOO_MANY_RUNS: &str = "TOO_MANY_RUNS";
    pub const THREAD_BUSY: &str = "THREAD_BUSY";
    pub const RATE_LIMITED: &str = "RATE_LIMITED";
    pub const TOO_MANY_CONNECTIONS: &str = "TOO_MANY_CONNECTIONS";
    pub const INTERNAL_ERROR: &str = "INTERNAL_ERROR";
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
