//! `POST /otlp/v1/traces`: OTLP/HTTP trace ingestion. Point an OpenTelemetry exporter at
//! `http(s)://apex/otlp` with an API key of scope `usage:write` in its `Authorization`
//! header, and the LLM calls in its spans become the key owner's usage rows (see
//! [`crate::usage::otlp`] for how a span is read).
//!
//! The answers are OTLP's: 200 with an `ExportTraceServiceResponse` in the request's
//! encoding (protobuf or JSON), whose `partial_success` counts and explains the GenAI spans
//! that could not be used; 400 with a `google.rpc.Status` for a body that is not an OTLP
//! trace export at all (so an exporter does not retry it); 415 for another encoding.
//! A body may be gzip-compressed (`Content-Encoding: gzip`); it is inflated up to
//! [`MAX_INFLATED_BYTES`], and refused past that.

use std::io::Read as _;
use std::sync::Arc;

use apex_protocol::error::ErrorBody;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prost::Message as _;

use super::extract::AuthUser;
use super::openapi::{Internal, PayloadTooLarge, Unauthenticated, UnsupportedMediaType};
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{ImportOutcome, ImportPlan};
use crate::usage::import::IMPORT_CHUNK_ROWS;
use crate::usage::otlp::{
    decode_json, decode_protobuf, rows_of, ExportTracePartialSuccess, ExportTraceServiceResponse,
    JsonPartialSuccess, JsonResponse, RpcStatus,
};
use crate::user_store::UserStore;

/// Largest batch once inflated: a gzip body of a few MiB must not become gigabytes.
pub const MAX_INFLATED_BYTES: u64 = 64 * 1024 * 1024;

/// `google.rpc.Code.INVALID_ARGUMENT`.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Clone, Copy, PartialEq)]
enum Encoding {
    Protobuf,
    Json,
}

impl Encoding {
    fn content_type(self) -> &'static str {
        match self {
            Encoding::Protobuf => "application/x-protobuf",
            Encoding::Json => "application/json",
        }
    }
}

/// Takes OpenTelemetry spans; those of LLM calls (GenAI semantic conventions) become
/// usage rows of the key's user, once per trace and span id.
#[utoipa::path(
    post,
    path = "/otlp/v1/traces",
    operation_id = "otlp_traces",
    tag = "usage",
    security(("bearer_jwt" = [])),
    request_body(
        description = "An OTLP `ExportTraceServiceRequest`, protobuf or OTLP/JSON, \
                       optionally gzip-compressed (`Content-Encoding: gzip`); up to 32 MiB",
        content(
            (Vec<u8> = "application/x-protobuf"),
            (Object = "application/json"),
        )
    ),
    responses(
        (status = 200, description = "Taken. An `ExportTraceServiceResponse` in the request's \
            encoding; its `partialSuccess` counts the GenAI spans that could not be used \
            (no model, no known price, counts out of range) and says why"),
        (status = 400, description = "Not an OTLP trace export (a `google.rpc.Status`); not \
            worth retrying"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 500, response = Internal),
    )
)]
pub async fn traces(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let encoding = if content_type.starts_with("application/x-protobuf")
        || content_type.starts_with("application/protobuf")
    {
        Encoding::Protobuf
    } else if content_type.starts_with("application/json") {
        Encoding::Json
    } else {
        return Err(ApiError::client(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            apex_protocol::error::codes::UNSUPPORTED_MEDIA_TYPE,
            "send application/x-protobuf or application/json",
        ));
    };
    let compressed = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let body = match compressed.as_deref() {
        None | Some("") | Some("identity") => body.to_vec(),
        Some("gzip") => match inflate(&body)? {
            Some(inflated) => inflated,
            None => return Ok(bad_request(encoding, "the body is not valid gzip")),
        },
        Some(other) => {
            return Ok(bad_request(
                encoding,
                &format!("Content-Encoding {other:?} is not supported; use gzip"),
            ))
        }
    };
    let decoded = match encoding {
        Encoding::Protobuf => decode_protobuf(&body),
        Encoding::Json => decode_json(&body),
    };
    let request = match decoded {
        Ok(request) => request,
        Err(message) => return Ok(bad_request(encoding, &message)),
    };
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let overrides = store.price_overrides().await?;
    let mut read = rows_of(&request, &state.infra.price_book.for_user(&overrides));
    if !read.rows.is_empty() {
        let plan = ImportPlan {
            quota: state.settings.limits.import_row_quota,
            chunk_rows: IMPORT_CHUNK_ROWS,
            now_ms: now_ms(),
        };
        // Duplicates (a batch an exporter sent again) are skipped by the store.
        if let ImportOutcome::OverQuota { stored, quota } =
            store.import_usage(&read.rows, &plan).await?
        {
            read.rejected += read.rows.len() as i64;
            read.reasons.insert(
                0,
                format!(
                    "your quota of {quota} stored usage rows is reached ({stored} stored); \
                     none of this batch's LLM spans were stored"
                ),
            );
        }
    }
    metrics::counter!("apex_otlp_spans_rejected_total").increment(read.rejected as u64);
    let partial = (read.rejected > 0).then(|| (read.rejected, read.reasons.join("; ")));
    Ok(answer(encoding, partial))
}

/// The gzip `body` inflated; `None` when it is not gzip; 413 past the inflated limit.
fn inflate(body: &[u8]) -> Result<Option<Vec<u8>>, ApiError> {
    let mut inflated = Vec::new();
    let reader = flate2::read::GzDecoder::new(body);
    // One byte past the limit tells a body at the limit from one over it.
    match reader
        .take(MAX_INFLATED_BYTES + 1)
        .read_to_end(&mut inflated)
    {
        Ok(_) if inflated.len() as u64 > MAX_INFLATED_BYTES => Err(ApiError::client(
            StatusCode::PAYLOAD_TOO_LARGE,
            apex_protocol::error::codes::PAYLOAD_TOO_LARGE,
            format!("the inflated body is larger than {MAX_INFLATED_BYTES} bytes"),
        )),
        Ok(_) => Ok(Some(inflated)),
        Err(_) => Ok(None),
    }
}

fn with_type(status: StatusCode, encoding: Encoding, body: Vec<u8>) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(encoding.content_type()),
    );
    response
}

/// 400 with a `google.rpc.Status`, as OTLP/HTTP answers a batch it cannot parse.
fn bad_request(encoding: Encoding, message: &str) -> Response {
    let body = match encoding {
        Encoding::Protobuf => RpcStatus {
            code: INVALID_ARGUMENT,
            message: message.to_string(),
        }
        .encode_to_vec(),
        Encoding::Json => serde_json::json!({"code": INVALID_ARGUMENT, "message": message})
            .to_string()
            .into_bytes(),
    };
    with_type(StatusCode::BAD_REQUEST, encoding, body)
}

/// 200 with an `ExportTraceServiceResponse`, partial when spans were rejected.
fn answer(encoding: Encoding, partial: Option<(i64, String)>) -> Response {
    let body = match encoding {
        Encoding::Protobuf => ExportTraceServiceResponse {
            partial_success: partial.map(|(rejected_spans, error_message)| {
                ExportTracePartialSuccess {
                    rejected_spans,
                    error_message,
                }
            }),
        }
        .encode_to_vec(),
        Encoding::Json => serde_json::to_vec(&JsonResponse {
            partial_success: partial.map(|(rejected, error_message)| JsonPartialSuccess {
                rejected_spans: rejected.to_string(),
                error_message,
            }),
        })
        .unwrap_or_default(),
    };
    with_type(StatusCode::OK, encoding, body)
}
