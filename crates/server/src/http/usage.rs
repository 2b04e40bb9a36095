//! `/api/usage/*`: upload usage rows (JSON array or CSV), read the summary and the daily
//! series (spend per day and model, for the web page's chart).

use std::sync::Arc;

use apex_protocol::error::codes;
use apex_protocol::usage::{DailyUsage, UsageEventInput, UsageImportResult, UsageSummary};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;

use super::ApiQuery;
use crate::auth::AuthUser;
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::UserStore;
use crate::usage::import::{parse_csv, validate};
use crate::usage::{daily_for, summary_for, DEFAULT_WINDOW_DAYS, MAX_WINDOW_DAYS};

pub async fn import(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<UsageImportResult>), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let inputs: Vec<UsageEventInput> = if content_type.starts_with("text/csv") {
        parse_csv(&body).map_err(|e| ApiError::validation(e.to_string()))?
    } else if content_type.starts_with("application/json") {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::validation(format!("body must be a JSON array of usage events: {e}"))
        })?
    } else {
        return Err(ApiError::client(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            codes::UNSUPPORTED_MEDIA_TYPE,
            "send application/json (an array) or text/csv",
        ));
    };
    let rows =
        validate(inputs, &state.infra.pricing).map_err(|e| ApiError::validation(e.to_string()))?;
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let inserted = store.insert_usage(&rows).await?;
    Ok((StatusCode::CREATED, Json(UsageImportResult { inserted })))
}

/// `?days=N` of the summary and the daily series.
#[derive(Debug, Deserialize)]
pub struct WindowQuery {
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

pub async fn summary(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(query): ApiQuery<WindowQuery>,
) -> Result<Json<UsageSummary>, ApiError> {
    let days = query.days()?;
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    Ok(Json(summary_for(&store, days, now_ms()).await?))
}

/// `GET /api/usage/daily?days=30`: the caller's spend and requests per UTC day and model.
pub async fn daily(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(query): ApiQuery<WindowQuery>,
) -> Result<Json<DailyUsage>, ApiError> {
    let days = query.days()?;
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    Ok(Json(daily_for(&store, days, now_ms()).await?))
}
