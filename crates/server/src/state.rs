//! Shared state: the infrastructure every request may use, and nothing per-user.
//!
//! Every field is immutable or internally synchronised and holds no user's data; per-user
//! values are created per request (see `AgentInstanceFactory`) and live in that request's
//! task. [`ActiveRuns`] is the one map keyed by run: it holds only cancellation handles,
//! each tagged with its owner and removed when the run ends.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::events::EventBus;
use crate::limits::Limits;
use crate::llm::LlmProvider;
use crate::runs::ActiveRuns;
use crate::settings::Settings;
use crate::store::Store;
use crate::usage::pricing::PricingTable;

/// What a run is built from, besides its context.
pub struct Infrastructure {
    /// The database; user data is reached through `UserStore` handles made from it.
    pub store: Arc<dyn Store>,
    /// Delivers persisted events to the owning user's connections.
    pub bus: Arc<dyn EventBus>,
    /// Writes answers (the configured provider). Stateless between requests.
    pub llm: Arc<dyn LlmProvider>,
    /// The template writer: stands in when `llm` fails.
    pub fallback_llm: Arc<dyn LlmProvider>,
    /// Whether triage may ask `llm` for a structured classification.
    pub llm_triage: bool,
    /// List prices; read-only.
    pub pricing: Arc<PricingTable>,
    /// The phases of a graceful shutdown.
    pub lifecycle: Lifecycle,
    /// With several instances: a run still going when this instance's shutdown grace
    /// period ends goes back to the queue for another instance (while it has attempts
    /// left) instead of ending `interrupted`.
    pub hand_back_on_shutdown: bool,
    /// This process's id among several instances (a fresh UUID per start); recorded on
    /// the runs it executes, see [`crate::cluster`].
    pub instance_id: String,
}

/// Shutdown happens in three steps, each a token that fires once, in this order:
/// 1. `draining`: no new runs are accepted, readiness answers 503, open sockets get a
///    `server_shutdown` frame but stay open so they see their runs finish;
/// 2. `interrupt_runs`: after the grace period, runs still going end `interrupted`;
/// 3. `close_sockets`: once runs have written their terminal events, sockets close (1001).
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    pub draining: CancellationToken,
    pub interrupt_runs: CancellationToken,
    pub close_sockets: CancellationToken,
}

/// The axum state: cheap to clone, shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    pub infra: Arc<Infrastructure>,
    pub auth: Arc<Authenticator>,
    /// Cancellation handles of the runs executing in this process.
    pub runs: Arc<ActiveRuns>,
    /// Wakes this process's run dispatcher (a signal only; the queue is in the database).
    pub queue: Arc<crate::queue::RunQueue>,
    /// Per-user rate limits and connection caps (counters only).
    pub limits: Arc<Limits>,
    /// Renders `/metrics` when the embedding binary installed a Prometheus recorder.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub settings: Arc<Settings>,
}
