//! `/api/budgets`: the caller's spending caps (see `crate::budgets`), each with what its
//! current period has spent. Managed with a login only: no API key may change the caps
//! its own calls are held to.

use std::sync::Arc;

use apex_protocol::budgets::{Budget as BudgetView, BudgetInput, BudgetPatch};
use apex_protocol::error::ErrorBody;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, PayloadTooLarge, Unauthenticated, UnsupportedMediaType, ValidationFailed,
};
use super::ApiJson;
use crate::budgets::{budgets_holding, budgets_of, new_budget, patched, Budget, Scope};
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::state::AppState;
use crate::teams::Role;
use crate::user_store::UserStore;
use apex_protocol::error::ErrorCode;

/// `budget` with what its current period has spent.
async fn view(store: &UserStore, budget: &Budget) -> Result<BudgetView, ApiError> {
    let now = now_ms();
    let window = budget.window(now);
    let spent = store
        .budget_spent(&budget.id, window.start_ms, window.end_ms, now)
        .await?;
    Ok(budget.view(spent, now))
}

/// The caller's budget `id`; another user's answers like a missing one.
async fn find(store: &UserStore, id: &str) -> Result<Budget, ApiError> {
    budgets_of(store)
        .await?
        .into_iter()
        .find(|b| b.id == id)
        .ok_or_else(|| ApiError::not_found("budget"))
}

/// Sets a spending cap on the caller's own LLM calls through Apex: all of them, those of
/// one API key, or of one model; or, for a team's owner or admin, every member's calls
/// (`scope: team`). USD or tokens; per day, week, month or rolling days. A call that could
/// go past it is refused with `budget_exceeded` (402) before it is sent.
#[utoipa::path(
    post,
    path = "/api/budgets",
    operation_id = "create_budget",
    tag = "budgets",
    security(("bearer_jwt" = [])),
    request_body = BudgetInput,
    responses(
        (status = 201, description = "The budget", body = BudgetView),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<BudgetInput>,
) -> Result<(StatusCode, Json<BudgetView>), ApiError> {
    let now = now_ms();
    let budget = new_budget(&body, now).map_err(ApiError::validation)?;
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    if let Scope::Team(team) = &budget.scope {
        // Only the team's owner and admins cap the team; a stranger's team is not found.
        let membership = store
            .team_membership(team)
            .await?
            .ok_or_else(|| ApiError::not_found("team"))?;
        if !Role::parse(&membership.role).is_some_and(Role::manages) {
            return Err(ApiError::coded(
                ErrorCode::Forbidden,
                "only the team's owner and admins set its budgets",
            ));
        }
    }
    store.create_budget(&budget.record(now)).await?;
    Ok((StatusCode::CREATED, Json(view(&store, &budget).await?)))
}

/// The budgets that hold the caller: their own, oldest first, then their teams' (which
/// only whoever set them changes), each with what its current period has spent.
#[utoipa::path(
    get,
    path = "/api/budgets",
    operation_id = "list_budgets",
    tag = "budgets",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "The caller's budgets", body = Vec<BudgetView>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<BudgetView>>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let mut out = Vec::new();
    for budget in budgets_holding(&store).await? {
        out.push(view(&store, &budget).await?);
    }
    Ok(Json(out))
}

/// One of the caller's budgets.
#[utoipa::path(
    get,
    path = "/api/budgets/{budget_id}",
    operation_id = "get_budget",
    tag = "budgets",
    security(("bearer_jwt" = [])),
    params(("budget_id" = String, Path, description = "A budget id")),
    responses(
        (status = 200, description = "The budget", body = BudgetView),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such budget of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn get_one(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<BudgetView>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let budget = find(&store, &id).await?;
    Ok(Json(view(&store, &budget).await?))
}

/// Changes a budget's limit or period; what its calls used still counts.
#[utoipa::path(
    patch,
    path = "/api/budgets/{budget_id}",
    operation_id = "update_budget",
    tag = "budgets",
    security(("bearer_jwt" = [])),
    params(("budget_id" = String, Path, description = "A budget id")),
    request_body = BudgetPatch,
    responses(
        (status = 200, description = "The budget", body = BudgetView),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such budget of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(patch): ApiJson<BudgetPatch>,
) -> Result<Json<BudgetView>, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let budget = patched(&find(&store, &id).await?, &patch).map_err(ApiError::validation)?;
    if !store.update_budget(&budget.record(now_ms())).await? {
        return Err(ApiError::not_found("budget"));
    }
    Ok(Json(view(&store, &budget).await?))
}

/// Deletes a budget: its calls are no longer held to it.
#[utoipa::path(
    delete,
    path = "/api/budgets/{budget_id}",
    operation_id = "delete_budget",
    tag = "budgets",
    security(("bearer_jwt" = [])),
    params(("budget_id" = String, Path, description = "A budget id")),
    responses(
        (status = 204, description = "The budget is gone"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such budget of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    if store.delete_budget(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("budget"))
    }
}
