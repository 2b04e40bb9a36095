//! Prometheus metrics: what is recorded, under which names, and the HTTP metrics
//! middleware (the `/metrics` page itself is served by `http::health`).
//!
//! Recording goes through the `metrics` facade; the `apex` binary installs the Prometheus
//! recorder and hands its handle to the state, so a library user (or a test) that installs
//! nothing pays nothing. Labels are routes, statuses, agent names, providers and error
//! codes — never user, thread or run ids.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

pub const HTTP_REQUESTS: &str = "apex_http_requests_total";
pub const HTTP_DURATION: &str = "apex_http_request_duration_seconds";
pub const WS_CONNECTIONS: &str = "apex_websocket_connections_open";
pub const RUNS_STARTED: &str = "apex_runs_started_total";
pub const RUNS_QUEUED: &str = "apex_runs_queued_total";
pub const RUNS_REQUEUED: &str = "apex_runs_requeued_total";
pub const RUNS_FINISHED: &str = "apex_runs_finished_total";
pub const RUNS_ACTIVE: &str = "apex_runs_active";
pub const RUN_DURATION: &str = "apex_run_duration_seconds";
pub const AGENT_DURATION: &str = "apex_agent_duration_seconds";
pub const EVENTS_EMITTED: &str = "apex_events_emitted_total";
pub const EVENT_DELIVERY: &str = "apex_event_delivery_latency_seconds";
/// Recorded by the store, which writes the batches.
pub const EVENT_BATCH: &str = apex_store::EVENT_BATCH_METRIC;
pub const LLM_TOKENS: &str = "apex_llm_tokens_total";
pub const LLM_QUEUE: &str = "apex_llm_queue_depth";
pub const LLM_ACTIVE: &str = "apex_llm_active_requests";
/// Requests advanced together by one forward pass of the local model.
pub const LLM_BATCH: &str = "apex_llm_batch_size";
pub const LLM_LATENCY: &str = "apex_llm_request_duration_seconds";
/// Requests the local model did not start on within their `max_queue_wait`.
pub const LLM_BUSY: &str = "apex_llm_busy_total";
pub const LIMIT_REJECTIONS: &str = "apex_limit_rejections_total";
pub const BUS_FRAMES_REJECTED: &str = "apex_bus_frames_rejected_total";
/// Alert ticks taken by this instance, by rule kind (no user ids).
pub const ALERT_TICKS: &str = "apex_alert_ticks_total";
/// Alerts raised (and reports started), by rule kind.
pub const ALERTS_RAISED: &str = "apex_alerts_raised_total";
/// Webhook attempts, by result: delivered, retry, failed.
pub const WEBHOOK_ATTEMPTS: &str = "apex_webhook_attempts_total";
pub const WEBHOOK_DURATION: &str = "apex_webhook_attempt_duration_seconds";

/// The buckets of each histogram, chosen for what it measures. Histograms (not summaries)
/// so that instances' figures add up in Prometheus, and a quiet minute does not read 0.
pub const BUCKETS: &[(&str, &[f64])] = &[
    // Sub-millisecond: an event goes from its emitter to a socket in microseconds.
    (
        EVENT_DELIVERY,
        &[
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 1.0,
        ],
    ),
    (
        HTTP_DURATION,
        &[
            0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
    ),
    (
        AGENT_DURATION,
        &[
            0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ],
    ),
    // A run lasts seconds (the template writer) to minutes (a local model under load).
    (
        RUN_DURATION,
        &[
            0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
        ],
    ),
    (
        LLM_LATENCY,
        &[
            0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ],
    ),
    // A receiver answers in milliseconds, or times out (15 s by default).
    (
        WEBHOOK_DURATION,
        &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0,
        ],
    ),
    // Requests per forward pass, not seconds (a thread holds at most 64 by configuration).
    (LLM_BATCH, &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
    // Events per transaction, not seconds.
    (
        EVENT_BATCH,
        &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
    ),
];

/// The Prometheus recorder's builder with [`BUCKETS`] set: what `apex serve` installs.
pub fn prometheus_builder() -> metrics_exporter_prometheus::PrometheusBuilder {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    BUCKETS
        .iter()
        .fold(PrometheusBuilder::new(), |builder, (name, buckets)| {
            // Only an empty list is refused, and none is.
            builder
                .set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new())
        })
}

/// Describes every metric once, so `/metrics` carries help text.
pub fn describe() {
    metrics::describe_counter!(HTTP_REQUESTS, "HTTP requests by route and status");
    metrics::describe_histogram!(
        HTTP_DURATION,
        metrics::Unit::Seconds,
        "HTTP request duration by route"
    );
    metrics::describe_gauge!(WS_CONNECTIONS, "Open WebSocket connections");
    metrics::describe_counter!(
        LLM_BUSY,
        "Run requests the local model did not start on in time, written without it"
    );
    metrics::describe_counter!(ALERT_TICKS, "Alert rule ticks taken here, by kind");
    metrics::describe_counter!(ALERTS_RAISED, "Alerts raised and reports started, by kind");
    metrics::describe_counter!(
        WEBHOOK_ATTEMPTS,
        "Webhook delivery attempts, by result (delivered, retry, failed)"
    );
    metrics::describe_histogram!(
        WEBHOOK_DURATION,
        metrics::Unit::Seconds,
        "Time from sending a webhook message to the receiver's answer (or the error)"
    );
    metrics::describe_counter!(RUNS_STARTED, "Runs started (claimed from the queue) here");
    metrics::describe_counter!(RUNS_QUEUED, "Runs submitted to the run queue here");
    metrics::describe_counter!(
        RUNS_REQUEUED,
        "Runs whose instance died, queued again by this instance"
    );
    metrics::describe_counter!(RUNS_FINISHED, "Runs finished, by final status");
    metrics::describe_gauge!(
        RUNS_ACTIVE,
        "Runs executing in this process (the run queue depth)"
    );
    metrics::describe_histogram!(
        RUN_DURATION,
        metrics::Unit::Seconds,
        "Run duration by final status"
    );
    metrics::describe_histogram!(
        AGENT_DURATION,
        metrics::Unit::Seconds,
        "Agent duration by agent"
    );
    metrics::describe_counter!(EVENTS_EMITTED, "Agent events persisted and published");
    metrics::describe_histogram!(
        EVENT_BATCH,
        "Events written per event-log transaction (group commit)"
    );
    metrics::describe_histogram!(
        EVENT_DELIVERY,
        metrics::Unit::Seconds,
        "From an event's emission to its send on a WebSocket"
    );
    metrics::describe_counter!(
        LLM_TOKENS,
        "LLM tokens by provider and kind (prompt, completion)"
    );
    metrics::describe_gauge!(
        LLM_QUEUE,
        "Local model requests waiting for an inference thread"
    );
    metrics::describe_gauge!(
        LLM_ACTIVE,
        "Local model requests being generated (prompt or decode)"
    );
    metrics::describe_histogram!(
        LLM_BATCH,
        "Local model requests advanced together by one forward pass"
    );
    metrics::describe_histogram!(
        LLM_LATENCY,
        metrics::Unit::Seconds,
        "LLM request duration by provider"
    );
    metrics::describe_counter!(
        LIMIT_REJECTIONS,
        "Requests refused by a per-user limit, by code"
    );
    metrics::describe_counter!(
        BUS_FRAMES_REJECTED,
        "Redis bus frames dropped because their MAC was missing or wrong"
    );
}

/// Middleware: counts and times every HTTP request by matched route (not raw path, so
/// ids never become labels) and status.
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    metrics::histogram!(HTTP_DURATION, "route" => route).record(started.elapsed().as_secs_f64());
    response
}

/// Counts one open WebSocket connection for as long as it lives.
pub struct ConnectionGauge;

impl ConnectionGauge {
    pub fn open() -> Self {
        metrics::gauge!(WS_CONNECTIONS).increment(1.0);
        ConnectionGauge
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        metrics::gauge!(WS_CONNECTIONS).decrement(1.0);
    }
}

pub fn run_queued() {
    metrics::counter!(RUNS_QUEUED).increment(1);
}

pub fn run_requeued() {
    metrics::counter!(RUNS_REQUEUED).increment(1);
}

pub fn run_started() {
    metrics::counter!(RUNS_STARTED).increment(1);
    metrics::gauge!(RUNS_ACTIVE).increment(1.0);
}

pub fn run_finished(status: &'static str, duration: Duration) {
    metrics::counter!(RUNS_FINISHED, "status" => status).increment(1);
    metrics::gauge!(RUNS_ACTIVE).decrement(1.0);
    metrics::histogram!(RUN_DURATION, "status" => status).record(duration.as_secs_f64());
}

pub fn agent_finished(agent: &'static str, duration: Duration) {
    metrics::histogram!(AGENT_DURATION, "agent" => agent).record(duration.as_secs_f64());
}

pub fn event_emitted() {
    metrics::counter!(EVENTS_EMITTED).increment(1);
}

pub fn event_delivered(emitted: Instant) {
    metrics::histogram!(EVENT_DELIVERY).record(emitted.elapsed().as_secs_f64());
}

pub fn bus_frame_rejected() {
    metrics::counter!(BUS_FRAMES_REJECTED).increment(1);
}

pub fn limit_rejected(code: &'static str) {
    metrics::counter!(LIMIT_REJECTIONS, "code" => code).increment(1);
}

pub fn llm_request(provider: &str, duration: Duration, prompt_tokens: u64, completion_tokens: u64) {
    let provider = provider.to_string();
    metrics::histogram!(LLM_LATENCY, "provider" => provider.clone()).record(duration.as_secs_f64());
    metrics::counter!(LLM_TOKENS, "provider" => provider.clone(), "kind" => "prompt")
        .increment(prompt_tokens);
    metrics::counter!(LLM_TOKENS, "provider" => provider, "kind" => "completion")
        .increment(completion_tokens);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_histogram_has_rising_buckets() {
        for (name, buckets) in BUCKETS {
            assert!(!buckets.is_empty(), "{name}");
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{name}");
        }
        // The delivery latency resolves well below a millisecond.
        let delivery = BUCKETS
            .iter()
            .find(|(n, _)| *n == EVENT_DELIVERY)
            .unwrap()
            .1;
        assert!(delivery.iter().filter(|b| **b < 0.001).count() >= 4);
    }
}
