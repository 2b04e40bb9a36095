//! `/api/pricebook` (the prices that cost the caller's rows, and their negotiated rates)
//! and `/api/usage/rows`, `/api/usage/explain` (the caller's rows, and how each cost was
//! computed). See `usage::price_book` and `usage::explain`. Only the caller's own rows
//! and rates.

use std::sync::Arc;

use apex_protocol::error::ErrorBody;
use apex_protocol::prices::{
    PriceBook as PriceBookView, PriceOverrideImport, PriceOverrideResult, UsageExplanation,
    UsageRowsPage,
};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, NotFound, PayloadTooLarge, Unauthenticated, UnsupportedMediaType,
    ValidationFailed,
};
use super::{ApiJson, ApiQuery};
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::UsageFilter;
use crate::usage::explain::{explain_cell, explain_row, row_view};
use crate::usage::price_book::{override_records, override_version, SNAPSHOT};
use crate::usage::{window_start_ms, DEFAULT_WINDOW_DAYS, MAX_WINDOW_DAYS};
use crate::user_store::UserStore;

/// Every price that can cost the caller's rows: their negotiated rates (newest first),
/// then the built-in snapshot, each with the version rows name it by.
#[utoipa::path(
    get,
    path = "/api/pricebook",
    operation_id = "price_book",
    tag = "usage",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "The caller's price book", body = PriceBookView),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<PriceBookView>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let overrides = store.price_overrides().await?;
    let prices = state.infra.price_book.for_user(&overrides);
    Ok(Json(PriceBookView {
        snapshot: SNAPSHOT.into(),
        entries: prices.entries().map(|e| e.view()).collect(),
    }))
}

/// Adds negotiated rates (all or none). Each costs the caller's rows of its model dated
/// from its `effective_from` on, from now on: rows stored before keep the cost and price
/// version they were stored with. Entries are never changed or deleted; a later entry for
/// the same model and date supersedes an earlier one.
#[utoipa::path(
    post,
    path = "/api/pricebook",
    operation_id = "import_prices",
    tag = "usage",
    security(("bearer_jwt" = [])),
    request_body = PriceOverrideImport,
    responses(
        (status = 201, description = "The stored entries", body = PriceOverrideResult),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn import(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<PriceOverrideImport>,
) -> Result<(StatusCode, Json<PriceOverrideResult>), ApiError> {
    let records = override_records(&body.prices, &state.infra.price_book, now_ms())
        .map_err(ApiError::validation)?;
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    store.add_price_overrides(&records).await?;
    let prices = state.infra.price_book.for_user(&records);
    let entries = records
        .iter()
        .filter_map(|r| prices.entry_by_version(&override_version(&r.id)))
        .map(|e| e.view())
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(PriceOverrideResult {
            imported: records.len() as u64,
            entries,
        }),
    ))
}

/// Which rows: a window and the fields of a summary cell.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RowsQuery {
    /// The window in days, ending now: 1 to 365, default 30.
    #[param(minimum = 1, maximum = 365)]
    pub days: Option<u32>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub workload: Option<String>,
    /// `upload`, `demo`, `apex`, `otlp`, `gateway`, or an export format's name.
    pub source: Option<String>,
    /// Rows with an id below this one (the `next_before` of the previous page).
    pub before: Option<i64>,
    /// Rows per page: 1 to 500, default 50.
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

impl RowsQuery {
    fn filter(&self) -> Result<UsageFilter, ApiError> {
        let days = self.days.unwrap_or(DEFAULT_WINDOW_DAYS);
        if !(1..=MAX_WINDOW_DAYS).contains(&days) {
            return Err(ApiError::validation(format!(
                "days must be 1..={MAX_WINDOW_DAYS}"
            )));
        }
        let now = now_ms();
        let field = |value: &Option<String>| {
            value
                .as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        Ok(UsageFilter {
            since_ms: window_start_ms(days, now),
            until_ms: now,
            provider: field(&self.provider),
            model: field(&self.model),
            workload: field(&self.workload),
            source: field(&self.source),
        })
    }
}

/// The caller's usage rows, newest first, with the price version each was costed with.
#[utoipa::path(
    get,
    path = "/api/usage/rows",
    operation_id = "usage_rows",
    tag = "usage",
    security(("bearer_jwt" = [])),
    params(RowsQuery),
    responses(
        (status = 200, description = "A page of the caller's rows", body = UsageRowsPage),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn rows(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(query): ApiQuery<RowsQuery>,
) -> Result<Json<UsageRowsPage>, ApiError> {
    let filter = query.filter()?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::validation("limit must be 1..=500"));
    }
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    // One more than a page tells whether there is a next one.
    let mut rows = store
        .usage_rows_page(&filter, query.before, limit + 1)
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Json(UsageRowsPage {
        next_before: more.then(|| rows.last().map(|r| r.id)).flatten(),
        rows: rows.iter().map(row_view).collect(),
    }))
}

/// What to explain: one row (`row`), or the rows of a summary cell (the window and any of
/// provider, model, workload, source).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExplainQuery {
    /// A row's id (from `GET /api/usage/rows`); the other fields are then ignored.
    pub row: Option<i64>,
    /// The window in days, ending now: 1 to 365, default 30.
    #[param(minimum = 1, maximum = 365)]
    pub days: Option<u32>,
    pub provider: Option<String>,
    pub model: Option<String>,
    pub workload: Option<String>,
    pub source: Option<String>,
}

/// How a cost was computed: for each price version among the rows, the entry and
/// `tokens × rate` per class (input, cached input, cache write, output, reasoning) and
/// the per-request fee, with the computed and the stored totals.
#[utoipa::path(
    get,
    path = "/api/usage/explain",
    operation_id = "usage_explain",
    tag = "usage",
    security(("bearer_jwt" = [])),
    params(ExplainQuery),
    responses(
        (status = 200, description = "The arithmetic", body = UsageExplanation),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "An API key without the scope this route needs (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, response = NotFound),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn explain(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(query): ApiQuery<ExplainQuery>,
) -> Result<Json<UsageExplanation>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let overrides = store.price_overrides().await?;
    let prices = state.infra.price_book.for_user(&overrides);
    if let Some(id) = query.row {
        // Another user's row answers exactly like a missing one.
        let stored = store
            .usage_row(id)
            .await?
            .ok_or_else(|| ApiError::not_found("usage row"))?;
        return Ok(Json(explain_row(&prices, &stored)));
    }
    let filter = RowsQuery {
        days: query.days,
        provider: query.provider,
        model: query.model,
        workload: query.workload,
        source: query.source,
        before: None,
        limit: None,
    }
    .filter()?;
    Ok(Json(explain_cell(&store, &prices, &filter).await?))
}
