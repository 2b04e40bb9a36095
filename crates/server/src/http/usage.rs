//! `/api/usage/*`: upload usage rows (JSON array or CSV), read the summary and the daily
//! series (spend per day and model, for the web page's chart). Only the caller's own rows.

use std::sync::Arc;

use apex_protocol::error::{codes, ErrorBody};
use apex_protocol::usage::{DailyUsage, UsageEventInput, UsageImportResult, UsageSummary};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;

use super::extract::AuthUser;
use super::openapi::{
    ImportQuotaExceeded, Internal, PayloadTooLarge, RateLimited, Unauthenticated,
    UnsupportedMediaType, ValidationFailed,
};
use super::ApiQuery;
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{ImportOutcome, ImportPlan};
use crate::usage::exports::{read_export, ExportFormat};
use crate::usage::import::{parse_csv, validate, IMPORT_CHUNK_ROWS};
use crate::usage::price_book::UserPrices;
use crate::usage::{daily_for, summary_for, DEFAULT_WINDOW_DAYS, MAX_WINDOW_DAYS};
use crate::user_store::UserStore;

/// `?format=` of an upload.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// `rows` (the default: Apex's rows, as JSON or CSV by `Content-Type`), or a provider
    /// export: `openai-usage` (OpenAI's organization Usage API, completions),
    /// `anthropic-usage` (Anthropic's usage report for messages), `litellm-spend`
    /// (LiteLLM's spend logs).
    pub format: Option<String>,
}

/// Adds usage rows: a JSON array of events, or CSV with a header row of the same field
/// names; or a provider's usage export (`?format=`). Rows are all or nothing, and the
/// upload is refused whole if it would leave the user with more stored rows than the
/// quota; an export's entries Apex cannot use are skipped and listed. A row stored before
/// (same `id`, or the export's own id for it) is counted in `duplicates`, not stored
/// again.
#[utoipa::path(
    post,
    path = "/api/usage/events",
    operation_id = "import_usage",
    tag = "usage",
    security(("bearer_jwt" = [])),
    params(ImportQuery),
    request_body(
        description = "Up to 32 MiB",
        content(
            (Vec<UsageEventInput> = "application/json"),
            (String = "text/csv", example = "provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms\nopenai,gpt-4o,support-bot,2025-01-01T12:00:00Z,1200,300,850\n"),
        )
    ),
    responses(
        (status = 201, description = "All rows were stored", body = UsageImportResult),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 409, response = ImportQuotaExceeded),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 429, response = RateLimited),
        (status = 500, response = Internal),
    )
)]
pub async fn import(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(query): ApiQuery<ImportQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<UsageImportResult>), ApiError> {
    state
        .limits
        .check_import(user.user_id())
        .await
        .map_err(|wait| ApiError::throttled(crate::limits::Throttled::Import, wait))?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let overrides = store.price_overrides().await?;
    let prices = state.infra.price_book.for_user(&overrides);
    let (rows, skipped) = match query.format.as_deref().map(str::trim) {
        None | Some("") | Some("rows") | Some("csv") | Some("json") => {
            (read_rows(&prices, &content_type, &body)?, Vec::new())
        }
        Some(name) => {
            let format = ExportFormat::parse(name).ok_or_else(|| {
                ApiError::validation(format!(
                    "format {name:?} is not one of rows, openai-usage, anthropic-usage, \
                     litellm-spend"
                ))
            })?;
            let read = read_export(format, &body, &prices).map_err(ApiError::validation)?;
            (read.rows, read.skipped)
        }
    };
    if rows.is_empty() {
        // An export with nothing usable in it: nothing to store, everything explained.
        return Ok((
            StatusCode::CREATED,
            Json(UsageImportResult {
                inserted: 0,
                duplicates: 0,
                skipped,
            }),
        ));
    }
    let plan = ImportPlan {
        quota: state.settings.limits.import_row_quota,
        chunk_rows: IMPORT_CHUNK_ROWS,
        now_ms: now_ms(),
    };
    match store.import_usage(&rows, &plan).await? {
        ImportOutcome::Stored(inserted) => Ok((
            StatusCode::CREATED,
            Json(UsageImportResult {
                inserted,
                duplicates: (rows.len() as u64).saturating_sub(inserted),
                skipped,
            }),
        )),
        ImportOutcome::OverQuota { stored, quota } => Err(ApiError::client(
            StatusCode::CONFLICT,
            codes::IMPORT_QUOTA_EXCEEDED,
            format!(
                "this upload of {} rows would exceed your quota of {quota} stored usage rows \
                 ({stored} stored); nothing was imported",
                rows.len()
            ),
        )),
    }
}

/// Apex's own rows, as JSON or CSV by `content_type`, validated all or nothing.
fn read_rows(
    prices: &UserPrices<'_>,
    content_type: &str,
    body: &[u8],
) -> Result<Vec<crate::store::UsageRow>, ApiError> {
    let inputs: Vec<UsageEventInput> = if content_type.starts_with("text/csv") {
        parse_csv(body).map_err(|e| ApiError::validation(e.to_string()))?
    } else if content_type.starts_with("application/json") {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::validation(format!("body must be a JSON array of usage events: {e}"))
        })?
    } else {
        return Err(ApiError::client(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            codes::UNSUPPORTED_MEDIA_TYPE,
            "send application/json (an array) or text/csv",
        ));
    };
    validate(inputs, prices).map_err(|e| ApiError::validation(e.to_string()))
}

/// `?days=N` of the summary and the daily series.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WindowQuery {
    /// The window in days, ending now: 1 to 365, default 30.
    #[param(minimum = 1, maximum = 365)]
    pub days: Option<u32>,
}

impl WindowQuery {
    /// `days`, defaulting to 30, within 1..=365.
    fn days(&self) -> Result<u32, ApiError> {
        let days = self.days.unwrap_or(DEFAULT_WINDOW_DAYS);
        if !(1..=MAX_WINDOW_DAYS).contains(&days) {
            return Err(ApiError::validation(format!(
                "days must be 1..={MAX_WINDOW_DAYS}"
            )));
        }
        Ok(days)
    }
}

/// Totals, latency percentiles and the breakdown by model and workload over the window.
#[utoipa::path(
    get,
    path = "/api/usage/summary",
    operation_id = "usage_summary",
    tag = "usage",
    security(("bearer_jwt" = [])),
    params(WindowQuery),
    responses(
        (status = 200, description = "The caller's usage summary", body = UsageSummary),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn summary(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(query): ApiQuery<WindowQuery>,
) -> Result<Json<UsageSummary>, ApiError> {
    let days = query.days()?;
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    Ok(Json(summary_for(&store, days, now_ms()).await?))
}

/// The caller's spend and requests per UTC day and model (the web page's chart).
#[utoipa::path(
    get,
    path = "/api/usage/daily",
    operation_id = "usage_daily",
    tag = "usage",
    security(("bearer_jwt" = [])),
    params(WindowQuery),
    responses(
        (status = 200, description = "The caller's spend per day and model", body = DailyUsage),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn daily(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(query): ApiQuery<WindowQuery>,
) -> Result<Json<DailyUsage>, ApiError> {
    let days = query.days()?;
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    Ok(Json(daily_for(&store, days, now_ms()).await?))
}
