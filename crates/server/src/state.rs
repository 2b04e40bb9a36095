//! Shared state: the infrastructure every request may use, and nothing per-user.
//!
//! Every field is immutable or internally synchronised and holds no user's data; per-user
//! values are created per request (see `AgentInstanceFactory`) and live in that request's
//! task. The one map keyed by run is inside [`Runs`]: it holds only cancellation handles,
//! each tagged with its owner and removed when the run ends.

use std::sync::Arc;

use crate::agents::Infrastructure;
use crate::auth::Authenticator;
use crate::lifecycle::Lifecycle;
use crate::limits::Limits;
use crate::run::Runs;
use crate::settings::Settings;

/// The axum state: cheap to clone, shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    /// Store, bus, LLM and pricing (the same ones runs are built from).
    pub infra: Arc<Infrastructure>,
    pub auth: Arc<Authenticator>,
    /// Submits, stops and executes runs; knows the runs executing in this process.
    pub runs: Runs,
    /// Per-user rate limits and connection caps (counters only).
    pub limits: Arc<Limits>,
    /// The phases of a graceful shutdown.
    pub lifecycle: Lifecycle,
    /// Renders `/metrics` when the embedding binary installed a Prometheus recorder.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// The LLM gateway's upstreams and HTTP client (immutable; no user state).
    pub gateway: Arc<crate::gateway::Gateway>,
    pub settings: Arc<Settings>,
    /// Takes due alert ticks and sends webhook messages; woken when a handler queues work.
    pub alerting: Arc<crate::alerts::Alerting>,
}
