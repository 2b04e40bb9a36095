//! `ApiError`: the one error type of the HTTP API, rendered as the one JSON error shape.
//!
//! Handlers return `Result<_, ApiError>`. Client mistakes carry a stable code and a message
//! meant for the client; internal failures are logged once here, with their cause, and the
//! client only ever sees `internal_error` (no SQL, paths or stack traces leak out).

use apex_protocol::error::{codes, ErrorBody, ErrorCode, ErrorDetail};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::budgets::BudgetError;
use crate::run::{ApprovalError, SubmitError};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    Client {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// A client error with figures the client can act on (`details` in the body).
    #[error("{message}")]
    Detailed {
        status: StatusCode,
        code: &'static str,
        message: String,
        details: serde_json::Value,
    },
    /// 429 with a `Retry-After` header.
    #[error("{message}")]
    Limited {
        code: &'static str,
        message: String,
        retry_after: std::time::Duration,
    },
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

impl ApiError {
    /// A rate limit of [`Limits`](crate::limits::Limits) refused: 429 `rate_limited` with
    /// `Retry-After`, counted in `apex_limit_rejections_total`.
    pub fn throttled(which: crate::limits::Throttled, retry_after: std::time::Duration) -> Self {
        crate::telemetry::limit_rejected(which.metric_reason());
        ApiError::Limited {
            code: apex_protocol::error::codes::RATE_LIMITED,
            message: which.message().into(),
            retry_after,
        }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::client(
            StatusCode::UNPROCESSABLE_ENTITY,
            codes::VALIDATION_FAILED,
            message,
        )
    }

    /// The same answer for "does not exist" and "belongs to someone else".
    pub fn not_found(what: &str) -> Self {
        Self::client(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            format!("{what} not found"),
        )
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::client(StatusCode::UNAUTHORIZED, code, message)
    }

    /// A client error with its code's status from the one table of codes.
    /// `code` with `details` in the error body.
    pub fn with_details(
        code: ErrorCode,
        message: impl Into<String>,
        details: serde_json::Value,
    ) -> Self {
        Self::Detailed {
            status: StatusCode::from_u16(code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: code.rest(),
            message: message.into(),
            details,
        }
    }

    pub fn coded(code: ErrorCode, message: impl Into<String>) -> Self {
        let status =
            StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::client(status, code.rest(), message)
    }

    pub fn client(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self::Client {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::Store(err) => err.into(),
            SubmitError::RateLimited(retry_after) => ApiError::Limited {
                code: err.code().rest(),
                message: err.to_string(),
                retry_after,
            },
            // `thread not found` answers like every other missing resource.
            SubmitError::ThreadNotFound => ApiError::not_found("thread"),
            other => ApiError::coded(other.code(), other.to_string()),
        }
    }
}

impl From<ApprovalError> for ApiError {
    fn from(err: ApprovalError) -> Self {
        match err {
            ApprovalError::Store(err) => err.into(),
            // A stranger's run answers like every other missing resource.
            ApprovalError::RunNotFound => ApiError::not_found("run"),
            other => ApiError::coded(other.code(), other.to_string()),
        }
    }
}

impl From<BudgetError> for ApiError {
    fn from(err: BudgetError) -> Self {
        match err {
            BudgetError::Store(err) => err.into(),
            BudgetError::Exceeded { message, details } => ApiError::with_details(
                ErrorCode::BudgetExceeded,
                message,
                serde_json::to_value(&*details).unwrap_or_default(),
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError::Internal(anyhow::Error::new(err))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut retry_after = None;
        let mut details = None;
        let (status, code, message) = match self {
            ApiError::Detailed {
                status,
                code,
                message,
                details: figures,
            } => {
                details = Some(figures);
                (status, code, message)
            }
            ApiError::Limited {
                code,
                message,
                retry_after: wait,
            } => {
                retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
                (StatusCode::TOO_MANY_REQUESTS, code, message)
            }
            ApiError::Client {
                status,
                code,
                message,
            } => (status, code, message),
            ApiError::Internal(err) => {
                tracing::error!(error = %format!("{err:#}"), "request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    codes::INTERNAL,
                    "internal server error".to_string(),
                )
            }
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: code.to_string(),
                message,
                details,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}
