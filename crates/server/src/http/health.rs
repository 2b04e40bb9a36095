//! Liveness and readiness: `GET /health` and `GET /health/ready`, for load balancers and
//! orchestrators (no token, no user data).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// Answer of `GET /health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(example = "ok")]
    pub status: &'static str,
    /// The server's version.
    #[schema(example = "0.1.0")]
    pub version: &'static str,
}

/// Answer of `GET /health/ready`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready` (200) or `unavailable` (503).
    #[schema(example = "ready")]
    pub status: &'static str,
    pub checks: ReadinessChecks,
    /// This instance's id (runs record which instance executes them).
    pub instance_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadinessChecks {
    /// The database answered a ping.
    pub database: bool,
    /// The event bus is connected (always true for the in-process bus).
    pub bus: bool,
    /// `in_process` or `redis`.
    pub bus_kind: &'static str,
    /// The server is not draining for shutdown.
    pub accepting: bool,
    /// The configured LLM provider (`local`, `openai`, `template`).
    pub llm: String,
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses((status = 200, description = "The process answers", body = Health))
)]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Readiness: the database answers, the event bus is connected (always, in-process; with
/// Redis, both of the instance's Redis connections are up) and the server is not shutting
/// down.
#[utoipa::path(
    get,
    path = "/health/ready",
    operation_id = "ready",
    tag = "health",
    responses(
        (status = 200, description = "Ready to serve", body = Readiness),
        (status = 503, description = "The database or the event bus does not answer, or shutdown has begun", body = Readiness),
    )
)]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let database = state.infra.store.ping().await.is_ok();
    let bus = state.infra.bus.health();
    let accepting = !state.lifecycle.draining.is_cancelled();
    let status = if database && bus.connected && accepting {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            status: if status == StatusCode::OK {
                "ready"
            } else {
                "unavailable"
            },
            checks: ReadinessChecks {
                database,
                bus: bus.connected,
                bus_kind: bus.kind,
                accepting,
                llm: state.infra.llm.name().to_string(),
            },
            instance_id: state.runs.instance_id().to_string(),
        }),
    )
}

/// `GET /metrics` in the Prometheus text format; 404 when no recorder was installed.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "meta",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = 404, description = "No metrics recorder is installed (plain text)", content_type = "text/plain", body = String),
    )
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}
