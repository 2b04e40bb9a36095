//! `/api/alerts` and `/api/webhooks`: the caller's alert rules and scheduled reports,
//! what they raised, and the webhooks those go to with their delivery log (see
//! `crate::alerts`). Login only. Another user's rule, webhook or delivery answers
//! `404 not_found` like a missing one; a team rule needs the team's owner or an admin.

use std::sync::Arc;

use apex_protocol::alerts::{
    Alert, AlertRule, AlertRuleInput, Webhook, WebhookAttempt, WebhookDelivery, WebhookInput,
};
use apex_protocol::error::{ErrorBody, ErrorCode};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::json;

use super::extract::AuthUser;
use super::openapi::{
    Internal, InvalidJson, PayloadTooLarge, Unauthenticated, UnsupportedMediaType, ValidationFailed,
};
use super::{ApiJson, ApiQuery, Page};
use crate::alerts::webhooks::{check_url, new_secret};
use crate::alerts::{alert_view, new_rule, rule_view};
use crate::clock::{ms_to_rfc3339, now_ms, now_rfc3339};
use crate::error::ApiError;
use crate::state::AppState;
use crate::store::{WebhookDeliveryRecord, WebhookRecord};
use crate::teams::Role;
use crate::user_store::UserStore;

/// Most rules one user may have, and most webhooks.
const MAX_RULES: usize = 50;
const MAX_WEBHOOKS: usize = 10;

fn store_of(state: &AppState, user: &crate::auth::AuthenticatedUser) -> UserStore {
    UserStore::for_user(Arc::clone(&state.infra.store), user)
}

/// Makes an alert rule or a scheduled report. It is evaluated at once, then on its
/// schedule; what it raises appears in `GET /api/alerts`, on the caller's sockets
/// (`alert`) and at their webhooks (`alert.fired`, `report.started`).
#[utoipa::path(
    post,
    path = "/api/alerts/rules",
    operation_id = "create_alert_rule",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    request_body = AlertRuleInput,
    responses(
        (status = 201, description = "The rule", body = AlertRule),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`), or a team rule by a member who does not manage the team (code: `forbidden`)", body = ErrorBody),
        (status = 404, description = "No such team of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn create_rule(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<AlertRuleInput>,
) -> Result<(StatusCode, Json<AlertRule>), ApiError> {
    let store = store_of(&state, &user);
    let id = format!("rule_{}", uuid::Uuid::new_v4().simple());
    let (rule, record) =
        new_rule(&body, id, user.user_id(), now_ms()).map_err(ApiError::validation)?;
    if let Some(team) = &rule.team_id {
        let membership = store
            .team_membership(team)
            .await?
            .ok_or_else(|| ApiError::not_found("team"))?;
        if !Role::parse(&membership.role).is_some_and(Role::manages) {
            return Err(ApiError::coded(
                ErrorCode::Forbidden,
                "only the team's owner and admins set alerts on its usage",
            ));
        }
    }
    if let crate::alerts::Kind::BudgetForecast { budget_id } = &rule.kind {
        if !crate::budgets::budgets_of(&store)
            .await?
            .iter()
            .any(|b| &b.id == budget_id)
        {
            return Err(ApiError::not_found("budget"));
        }
    }
    if store.list_alert_rules().await?.len() >= MAX_RULES {
        return Err(ApiError::validation(format!(
            "at most {MAX_RULES} alert rules; delete one first"
        )));
    }
    store.create_alert_rule(&record).await?;
    state.alerting.wake();
    Ok((StatusCode::CREATED, Json(rule_view(&record))))
}

/// The caller's alert rules and scheduled reports, oldest first.
#[utoipa::path(
    get,
    path = "/api/alerts/rules",
    operation_id = "list_alert_rules",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "The caller's rules", body = Vec<AlertRule>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn list_rules(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<AlertRule>>, ApiError> {
    let rules = store_of(&state, &user).list_alert_rules().await?;
    Ok(Json(rules.iter().map(rule_view).collect()))
}

/// Deletes a rule with the alerts it raised.
#[utoipa::path(
    delete,
    path = "/api/alerts/rules/{rule_id}",
    operation_id = "delete_alert_rule",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    params(("rule_id" = String, Path, description = "A rule id")),
    responses(
        (status = 204, description = "The rule is gone"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such rule of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn delete_rule(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if store_of(&state, &user).delete_alert_rule(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("alert rule"))
    }
}

/// What the caller's rules raised, newest first; each links the run that explains it.
#[utoipa::path(
    get,
    path = "/api/alerts",
    operation_id = "list_alerts",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    params(Page),
    responses(
        (status = 200, description = "The caller's alerts", body = Vec<Alert>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn list_alerts(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<Vec<Alert>>, ApiError> {
    let (limit, offset) = page.bounds()?;
    let alerts = store_of(&state, &user).list_alerts(limit, offset).await?;
    Ok(Json(alerts.iter().map(alert_view).collect()))
}

fn webhook_view(hook: &WebhookRecord, with_secret: bool) -> Webhook {
    Webhook {
        id: hook.id.clone(),
        url: hook.url.clone(),
        description: hook.description.clone(),
        secret: with_secret.then(|| hook.secret.clone()),
        created_at: ms_to_rfc3339(hook.created_at_ms),
    }
}

/// Adds a webhook: every alert and report of the caller is POSTed to it, signed as the
/// Standard Webhooks spec says. The answer shows the signing secret, once.
#[utoipa::path(
    post,
    path = "/api/webhooks",
    operation_id = "create_webhook",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    request_body = WebhookInput,
    responses(
        (status = 201, description = "The webhook, with its signing secret", body = Webhook),
        (status = 400, response = InvalidJson),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn create_webhook(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<WebhookInput>,
) -> Result<(StatusCode, Json<Webhook>), ApiError> {
    let allow_private = state.settings.alerts.webhooks.allow_private_targets;
    let url = check_url(body.url.trim(), allow_private).map_err(ApiError::validation)?;
    let description = body.description.unwrap_or_default();
    if description.chars().count() > 200 {
        return Err(ApiError::validation(
            "description must be at most 200 characters",
        ));
    }
    let store = store_of(&state, &user);
    if store.list_webhooks().await?.len() >= MAX_WEBHOOKS {
        return Err(ApiError::validation(format!(
            "at most {MAX_WEBHOOKS} webhooks; delete one first"
        )));
    }
    let hook = WebhookRecord {
        id: format!("wh_{}", uuid::Uuid::new_v4().simple()),
        url: url.to_string(),
        secret: new_secret(),
        description,
        created_at_ms: now_ms(),
    };
    store.create_webhook(&hook).await?;
    Ok((StatusCode::CREATED, Json(webhook_view(&hook, true))))
}

/// The caller's webhooks (without their secrets).
#[utoipa::path(
    get,
    path = "/api/webhooks",
    operation_id = "list_webhooks",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    responses(
        (status = 200, description = "The caller's webhooks", body = Vec<Webhook>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn list_webhooks(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
) -> Result<Json<Vec<Webhook>>, ApiError> {
    let hooks = store_of(&state, &user).list_webhooks().await?;
    Ok(Json(hooks.iter().map(|h| webhook_view(h, false)).collect()))
}

/// Deletes a webhook with its delivery log; messages still pending are dropped.
#[utoipa::path(
    delete,
    path = "/api/webhooks/{webhook_id}",
    operation_id = "delete_webhook",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    params(("webhook_id" = String, Path, description = "A webhook id")),
    responses(
        (status = 204, description = "The webhook is gone"),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such webhook of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn delete_webhook(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if store_of(&state, &user).delete_webhook(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("webhook"))
    }
}

async fn delivery_view(
    store: &UserStore,
    d: &WebhookDeliveryRecord,
) -> Result<WebhookDelivery, ApiError> {
    let attempts = store.delivery_attempts(&d.id).await?;
    Ok(WebhookDelivery {
        id: d.id.clone(),
        webhook_id: d.webhook_id.clone(),
        event_type: d.event_type.clone(),
        status: d.status.clone(),
        attempts: d.attempts,
        next_attempt_at: (d.status == "pending").then(|| ms_to_rfc3339(d.next_attempt_at_ms)),
        created_at: ms_to_rfc3339(d.created_at_ms),
        delivered_at: d.delivered_at_ms.map(ms_to_rfc3339),
        payload: serde_json::from_str(&d.payload).unwrap_or(serde_json::Value::Null),
        attempt_log: attempts
            .into_iter()
            .map(|a| WebhookAttempt {
                attempt: a.attempt,
                at: ms_to_rfc3339(a.at_ms),
                status_code: a.status_code,
                error: a.error,
                duration_ms: a.duration_ms,
            })
            .collect(),
    })
}

/// The webhook's `id` (the caller's), else not found.
async fn own_webhook(store: &UserStore, id: &str) -> Result<WebhookRecord, ApiError> {
    store
        .list_webhooks()
        .await?
        .into_iter()
        .find(|h| h.id == id)
        .ok_or_else(|| ApiError::not_found("webhook"))
}

/// The delivery log of a webhook, newest first: each message with every attempt (the
/// receiver's status code or the error) and what happens next.
#[utoipa::path(
    get,
    path = "/api/webhooks/{webhook_id}/deliveries",
    operation_id = "list_webhook_deliveries",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    params(("webhook_id" = String, Path, description = "A webhook id"), Page),
    responses(
        (status = 200, description = "The delivery log", body = Vec<WebhookDelivery>),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such webhook of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 422, response = ValidationFailed),
        (status = 500, response = Internal),
    )
)]
pub async fn list_deliveries(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiQuery(page): ApiQuery<Page>,
) -> Result<Json<Vec<WebhookDelivery>>, ApiError> {
    let (limit, offset) = page.bounds()?;
    let store = store_of(&state, &user);
    own_webhook(&store, &id).await?;
    let mut out = Vec::new();
    for d in store.list_deliveries(&id, limit, offset).await? {
        out.push(delivery_view(&store, &d).await?);
    }
    Ok(Json(out))
}

/// Sends a message again (same `webhook-id`, so a receiver that got it drops the copy),
/// with a fresh retry schedule.
#[utoipa::path(
    post,
    path = "/api/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver",
    operation_id = "redeliver_webhook",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    params(
        ("webhook_id" = String, Path, description = "A webhook id"),
        ("delivery_id" = String, Path, description = "A delivery id (`msg_...`)"),
    ),
    responses(
        (status = 202, description = "Queued again", body = WebhookDelivery),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such webhook or delivery of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn redeliver(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path((hook, delivery)): Path<(String, String)>,
) -> Result<(StatusCode, Json<WebhookDelivery>), ApiError> {
    let store = store_of(&state, &user);
    own_webhook(&store, &hook).await?;
    let found = store
        .get_delivery(&hook, &delivery)
        .await?
        .ok_or_else(|| ApiError::not_found("delivery"))?;
    if !store.redeliver(&found.id, now_ms()).await? {
        return Err(ApiError::not_found("delivery"));
    }
    state.alerting.wake();
    let again = store
        .get_delivery(&hook, &delivery)
        .await?
        .ok_or_else(|| ApiError::not_found("delivery"))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(delivery_view(&store, &again).await?),
    ))
}

/// Queues a `webhook.test` message to the webhook, to check the receiver and its
/// signature check.
#[utoipa::path(
    post,
    path = "/api/webhooks/{webhook_id}/test",
    operation_id = "test_webhook",
    tag = "alerts",
    security(("bearer_jwt" = [])),
    params(("webhook_id" = String, Path, description = "A webhook id")),
    responses(
        (status = 202, description = "Queued; see the delivery log", body = WebhookDelivery),
        (status = 401, response = Unauthenticated),
        (status = 403, description = "Called with an API key (code: `insufficient_scope`)", body = ErrorBody),
        (status = 404, description = "No such webhook of the caller's (code: `not_found`)", body = ErrorBody),
        (status = 500, response = Internal),
    )
)]
pub async fn test_webhook(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<WebhookDelivery>), ApiError> {
    let store = store_of(&state, &user);
    let hook = own_webhook(&store, &id).await?;
    let now = now_ms();
    let delivery = WebhookDeliveryRecord {
        id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
        webhook_id: hook.id,
        event_type: "webhook.test".into(),
        payload: json!({
            "type": "webhook.test",
            "timestamp": now_rfc3339(),
            "data": { "message": "A test message from Apex." }
        })
        .to_string(),
        status: "pending".into(),
        attempts: 0,
        schedule_start: 0,
        next_attempt_at_ms: now,
        created_at_ms: now,
        delivered_at_ms: None,
    };
    store
        .enqueue_deliveries(std::slice::from_ref(&delivery))
        .await?;
    state.alerting.wake();
    Ok((
        StatusCode::ACCEPTED,
        Json(delivery_view(&store, &delivery).await?),
    ))
}
