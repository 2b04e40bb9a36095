//! `WsError`: the one error type of the WebSocket's request handlers, rendered as the one
//! `error_message` frame.
//!
//! A handler returns `Err` for three different things, and the connection treats each
//! once: a refusal the client is told about (a code from the shared [`ErrorCode`] table
//! and a message meant for the client); a failure of ours, logged here with its cause,
//! of which the client only hears `INTERNAL_ERROR`; or a socket that failed, which ends
//! the connection (nothing more can be sent).

use std::time::Duration;

use apex_protocol::error::ErrorCode;
use apex_protocol::ws::ControlFrame;

use crate::clock::now_rfc3339;
use crate::run::{ApprovalError, SubmitError};
use crate::store::StoreError;

#[derive(Debug)]
pub(super) enum WsError {
    /// Told to the client: `code`, `message`, and when to retry if it may.
    Refused {
        code: ErrorCode,
        message: String,
        retry_after: Option<Duration>,
    },
    /// Ours: logged, never shown.
    Internal(String),
    /// The socket failed: the peer is gone.
    Socket(axum::Error),
}

impl WsError {
    pub(super) fn refused(code: ErrorCode, message: impl Into<String>) -> Self {
        WsError::Refused {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The frame the client gets for this error; `None` for a failed socket. An internal
    /// error is logged here, once.
    pub(super) fn into_frame(self) -> Option<ControlFrame> {
        let (code, message, retry_after) = match self {
            WsError::Refused {
                code,
                message,
                retry_after,
            } => (code, message, retry_after),
            WsError::Internal(cause) => {
                tracing::error!(error = %cause, "websocket request failed");
                (ErrorCode::Internal, "internal server error".into(), None)
            }
            WsError::Socket(_) => return None,
        };
        Some(ControlFrame::ErrorMessage {
            error_code: code.ws().into(),
            error_message: message,
            retry_after_ms: retry_after.map(|wait| wait.as_millis() as u64),
            timestamp: now_rfc3339(),
        })
    }
}

impl From<axum::Error> for WsError {
    fn from(err: axum::Error) -> Self {
        WsError::Socket(err)
    }
}

impl From<StoreError> for WsError {
    fn from(err: StoreError) -> Self {
        WsError::Internal(err.to_string())
    }
}

impl From<SubmitError> for WsError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::Store(err) => err.into(),
            SubmitError::RateLimited(wait) => WsError::Refused {
                code: ErrorCode::RateLimited,
                message: SubmitError::RateLimited(wait).to_string(),
                retry_after: Some(wait),
            },
            other => WsError::refused(other.code(), other.to_string()),
        }
    }
}

impl From<ApprovalError> for WsError {
    fn from(err: ApprovalError) -> Self {
        match err {
            ApprovalError::Store(err) => err.into(),
            other => WsError::refused(other.code(), other.to_string()),
        }
    }
}
