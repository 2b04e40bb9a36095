//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

/// Liveness: the process answers.
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// Readiness: the database answers, the event bus is connected (always, in-process; with
/// Redis, both of the instance's Redis connections are up) and the server is not shutting
/// down.
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let database = state.infra.store.ping().await.is_ok();
    let bus = state.infra.bus.health();
    let accepting = !state.infra.lifecycle.draining.is_cancelled();
    let status = if database && bus.connected && accepting {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if status == StatusCode::OK { "ready" } else { "unavailable" },
            "checks": {
                "database": database,
                "bus": bus.connected,
                "bus_kind": bus.kind,
                "accepting": accepting,
                "llm": state.infra.llm.name(),
            },
            "instance_id": state.infra.instance_id,
        })),
    )
}
