//! Apex: a multi-user AI agent server.
//!
//! A person registers, logs in, opens a WebSocket and asks a question; a supervisor runs a
//! pipeline of agents (triage → data → optimization → actions → reporting) over **that
//! person's own** usage data and streams every step back as events.
//!
//! The design goal is that one user's data or events cannot reach another user. The
//! modules sit in layers; each imports only from its own layer or below, and the
//! top-level modules have no import cycle (`tests/api/layers.rs` enforces both). Bottom to
//! top:
//!
//! 0. **Leaves.** [`ids`]: validated id newtypes; [`clock`]; [`settings`]: typed settings
//!    and the `Secret` wrapper; [`telemetry`]: metric names and the HTTP metrics
//!    middleware; [`lifecycle`]: the phases of a graceful shutdown.
//! 1. **Infrastructure.** [`store`]: the `apex-store` crate (the `Store` role traits
//!    and one SQL implementation run on SQLite or PostgreSQL, chosen by the database
//!    URL; [`store::group_commit`] batches run events into few transactions); [`llm`]: the LLM trait, the embedded local model
//!    (default), the OpenAI-compatible client and the deterministic template writer;
//!    [`limits`]: per-user rate limits and connection caps (counters, no user data);
//!    the event bus ([`events::bus`], in-process, or [`events::redis_bus`] between
//!    several instances).
//! 2. **One user's world.** [`auth`]: passwords, JWTs, tickets; produces
//!    [`auth::AuthenticatedUser`], the only source of a user id; [`context`]: the immutable
//!    `UserExecutionContext` of a run; [`user_store`]: `UserStore`, the user-scoped handle
//!    through which all user data is read and written; [`usage`]: pricing, demo data, the
//!    usage summary, provider exports and OpenTelemetry spans read into rows, and Apex's
//!    own LLM requests as the user's usage; [`gateway`]: the LLM gateway's upstreams and
//!    the usage row of each call it forwards; [`budgets`]: spending caps, held by
//!    reserving what a call can cost before it goes out; [`teams`]: roles and invites;
//!    [`events`]:
//!    `UserEmitter` (per run: seq, persist, deliver), the event log and following a run;
//!    [`views`]: the API's views of stored records.
//! 3. **Agents.** [`agents`]: `AgentInstanceFactory` (per run), the pipeline and the five
//!    agents (triage → data → optimization → actions → reporting).
//! 4. **Runs.** [`run`]: a run's whole life behind the `Runs` handle: submit (the one
//!    road for every entry point), the registry of runs executing here, the dispatcher
//!    that claims queued runs, the supervisor that executes them, the one way a run ends,
//!    recovery of runs whose instance died, and the cluster heartbeats. [`alerts`]: alert
//!    rules and scheduled reports ticking on every instance (each tick taken by one),
//!    the runs that explain them, and Standard Webhooks delivery with retries.
//! 5. **Edges.** [`http`]: `app(state) -> Router`, the REST handlers, each registered
//!    with its OpenAPI operation ([`http::openapi`]); [`ws`]: the WebSocket endpoint, one
//!    task per connection; [`web`]: the browser chat page and `/docs`; [`state`]: the
//!    shared, per-user-free state handlers get; [`error`]: the one JSON error shape.
//!
//! This file builds the state from the settings ([`build_state`]) and serves it
//! ([`run`], [`serve`]).

#![forbid(unsafe_code)]

pub mod agents;
pub mod alerts;
pub mod auth;
pub mod budgets;
pub mod clock;
pub mod context;
pub(crate) mod error;
pub mod events;
pub mod gateway;
pub mod http;
pub mod ids;
pub(crate) mod lifecycle;
pub(crate) mod limits;
pub mod llm;
pub(crate) mod run;
pub mod settings;
pub mod state;
pub mod store;
pub mod teams;
pub mod telemetry;
pub mod usage;
pub mod user_store;
pub(crate) mod views;
pub(crate) mod web;
pub mod ws;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rand::RngCore;
use tokio::net::TcpListener;

use crate::agents::Infrastructure;
use crate::auth::{AuthLifetimes, Authenticator, PasswordHasher};
use crate::events::redis_bus::{BusKey, RedisBus, RedisBusConfig};
use crate::events::{EventBus, InProcessBus};
use crate::lifecycle::Lifecycle;
use crate::llm::template::TemplateWriter;
use crate::run::{ActiveRuns, RunSettings, Runs};
use crate::settings::{Secret, Settings};
use crate::state::AppState;
use crate::store::{Backend, Store};
use crate::usage::price_book::PriceBook;
use crate::usage::pricing::PricingTable;

/// Reads the JWT secret from settings, else from `<data_dir>/jwt_secret`, creating it.
fn load_jwt_secret(settings: &Settings) -> anyhow::Result<Secret> {
    if let Some(secret) = &settings.jwt_secret {
        anyhow::ensure!(
            secret.expose().len() >= 32,
            "jwt_secret must be at least 32 characters"
        );
        return Ok(secret.clone());
    }
    let path = settings.data_dir.join("jwt_secret");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let existing = existing.trim().to_string();
        anyhow::ensure!(
            existing.len() >= 32,
            "{} is too short; delete it to regenerate",
            path.display()
        );
        return Ok(Secret::new(existing));
    }
    let mut bytes = [0u8; 48];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok(Secret::new(secret))
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(contents.as_bytes())
}

/// Opens the database `settings` select (SQLite unless the URL is `postgres://` or
/// `postgresql://`) and applies pending migrations. `apex migrate` is exactly this.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating data folder {}", settings.data_dir.display()))?;
    let url = settings.database_url();
    let backend = Backend::from_url(url.expose());
    store::open(url.expose(), &settings.database_pool)
        .await
        .with_context(|| format!("opening the {} database", backend.name()))
}

/// Opens storage, recovers runs a previous process left unfinished, and builds the state.
pub async fn build_state(settings: Settings) -> anyhow::Result<AppState> {
    let store = open_store(&settings).await?;
    let instance_id = uuid::Uuid::new_v4().to_string();
    let active_runs = Arc::new(ActiveRuns::default());
    // Before the bus: its frames are authenticated with a key derived from the secret.
    let secret = load_jwt_secret(&settings)?;
    let bus: Arc<dyn EventBus> = match &settings.bus_url {
        None => Arc::new(InProcessBus::new()),
        Some(url) => {
            let runs = Arc::clone(&active_runs);
            let bus = RedisBus::start(
                RedisBusConfig {
                    url: url.clone(),
                    prefix: settings.bus_channel_prefix.clone(),
                    instance_id: instance_id.clone(),
                    key: BusKey::derive(&secret),
                },
                // A stop request from another instance: `cancel` checks the owner.
                Arc::new(move |owner, run| {
                    runs.cancel(owner, run);
                }),
            )?;
            tracing::info!(%instance_id, "several-instance mode: events and stops go over Redis");
            Arc::new(bus)
        }
    };
    // With several instances, rate limits live in the same Redis as the bus.
    let shared_buckets = match &settings.bus_url {
        Some(url) => Some(limits::shared::SharedBuckets::new(
            redis::Client::open(url.expose()).context("the bus URL")?,
            &settings.bus_channel_prefix,
        )),
        None => None,
    };
    let llm = llm::build_provider(&settings).await?;
    let auth = Authenticator::new(
        Arc::clone(&store),
        &secret,
        PasswordHasher::new(settings.password_hashing),
        AuthLifetimes {
            access: settings.access_token_ttl,
            refresh: settings.refresh_token_ttl,
            ticket: settings.ticket_ttl,
            session: settings.session_lifetime,
        },
    );
    let infra = Arc::new(Infrastructure {
        store,
        bus,
        llm,
        fallback_llm: Arc::new(TemplateWriter::new(settings.template_stream_delay)),
        llm_triage: settings.llm_triage,
        price_book: Arc::new(PriceBook::builtin(&PricingTable::builtin())),
        pricing: Arc::new(PricingTable::builtin()),
        llm_queue_wait: settings.local_model.max_queue_wait,
    });
    let limits = Arc::new(limits::Limits::with_shared(
        settings.limits.clone(),
        shared_buckets,
    ));
    let lifecycle = Lifecycle::default();
    let runs = Runs::new(
        Arc::clone(&infra),
        active_runs,
        Arc::clone(&limits),
        RunSettings::from_settings(&settings),
        instance_id,
        lifecycle.clone(),
    );
    let alerting = Arc::new(alerts::Alerting::new(
        Arc::clone(&infra),
        runs.clone(),
        settings.alerts.poll_interval,
        settings.alerts.webhooks.clone(),
    )?);
    let state = AppState {
        alerting,
        infra,
        auth: Arc::new(auth),
        runs,
        limits,
        lifecycle,
        metrics: None,
        gateway: Arc::new(gateway::Gateway::new(&settings.gateway)?),
        settings: Arc::new(settings),
    };
    if state.settings.bus_url.is_none() {
        // One instance: every run a previous process had claimed and not finished was left
        // by a crash or kill. (With several, other instances may be executing theirs; see
        // `cluster`.) Runs still queued are simply run by the dispatcher.
        let (requeued, interrupted) = state
            .runs
            .recover_after_restart()
            .await
            .context("recovering unfinished runs")?;
        if requeued + interrupted > 0 {
            tracing::warn!(
                requeued,
                interrupted,
                "recovered runs a previous process left unfinished"
            );
        }
    }
    Ok(state)
}

/// Serves Apex on `listener` until `shutdown` resolves, then shuts down gracefully: stop
/// accepting and tell open sockets (`server_shutdown`), give running runs the configured
/// grace period, interrupt the rest, and close the sockets once every run has written its
/// terminal event. See [`lifecycle::Lifecycle`].
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let state = build_state(settings).await?;
    serve(listener, state, shutdown).await
}

/// Longest the server waits at shutdown for its background tasks to end.
const BACKGROUND_JOIN: Duration = Duration::from_secs(5);

/// Age after which a usage import still in progress is taken as abandoned.
const ABANDONED_IMPORT_AFTER_MS: i64 = 3600 * 1000;

/// Age after which a rolled-back run that is still stored was left behind by a stopped
/// process (its own removal follows its terminal event at once).
const ROLLED_BACK_GRACE_MS: i64 = 60 * 1000;

/// How often old event logs are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Retention: deletes the event logs of runs finished longer ago than `event_retention`,
/// expired tickets and refresh tokens, and sessions that ended longer ago than the same
/// retention, at start and then every [`PRUNE_EVERY`], until shutdown.
async fn prune_events_periodically(state: AppState) {
    let draining = state.lifecycle.draining.clone();
    loop {
        let cutoff = clock::now_ms()
            - i64::try_from(state.settings.event_retention.as_millis()).unwrap_or(i64::MAX);
        match state.infra.store.prune_events(cutoff).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "pruned old run events"),
            Err(err) => tracing::error!(error = %err, "pruning run events failed"),
        }
        match state.auth.prune(state.settings.event_retention).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "pruned expired tickets, tokens and sessions"),
            Err(err) => tracing::error!(error = %err, "pruning expired sessions failed"),
        }
        // An import takes seconds; one still unfinished after an hour was cut short by a
        // stopped process (this one or another instance) and must not count half.
        let abandoned = clock::now_ms() - ABANDONED_IMPORT_AFTER_MS;
        match state.infra.store.sweep_abandoned_imports(abandoned).await {
            Ok(0) => {}
            Ok(deleted) => tracing::warn!(deleted, "removed the rows of unfinished usage imports"),
            Err(err) => tracing::error!(error = %err, "removing unfinished usage imports failed"),
        }
        // A rolled-back run is removed right after its terminal event; one whose process
        // stopped in between is removed here.
        let settled = clock::now_ms() - ROLLED_BACK_GRACE_MS;
        match state.infra.store.sweep_rolled_back_runs(settled).await {
            Ok(0) => {}
            Ok(removed) => tracing::warn!(removed, "removed rolled-back runs left behind"),
            Err(err) => tracing::error!(error = %err, "removing rolled-back runs failed"),
        }
        tokio::select! {
            _ = draining.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}

/// Like [`run`] with a prepared state (tests use it to inspect the state afterwards).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut state = state;
    if state.settings.public_origins.is_empty() {
        // Only now is the port known (tests and `--bind HOST:0` pick a free one).
        let port = listener
            .local_addr()
            .context("the listener's address")?
            .port();
        let mut settings = (*state.settings).clone();
        settings.public_origins = ws::loopback_origins(port);
        state.settings = Arc::new(settings);
    }
    let app = http::app(state.clone());
    let lifecycle = state.lifecycle.clone();
    // The server's own background tasks, joined before it returns: each ends at its
    // phase of the shutdown (pruning and dispatching when draining starts, the cluster
    // heartbeat once the sockets close).
    let mut background = tokio::task::JoinSet::new();
    background.spawn(prune_events_periodically(state.clone()));
    background.spawn(Arc::clone(state.auth.sessions()).run(lifecycle.close_sockets.clone()));
    background.spawn(state.runs.clone().dispatch());
    background.spawn(state.runs.clone().expire_approvals_periodically());
    background.spawn(Arc::clone(&state.alerting).run(lifecycle.draining.clone()));
    if state.settings.bus_url.is_some() {
        background.spawn(state.runs.clone().upkeep());
    }
    let draining = lifecycle.draining.clone();
    // Events are small frames sent one after another: with Nagle's algorithm on, a frame
    // written while the previous one is unacknowledged waits for the peer's delayed ACK
    // (40 ms on Linux). Every accepted socket sends at once instead.
    let listener =
        axum::serve::ListenerExt::tap_io(listener, |socket: &mut tokio::net::TcpStream| {
            if let Err(err) = socket.set_nodelay(true) {
                tracing::debug!(error = %err, "could not set TCP_NODELAY");
            }
        });
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: no new runs; telling connected clients");
        draining.cancel();
    })
    .await
    .context("serving HTTP")?;
    // The listener is closed; upgraded WebSocket connections live on in their own tasks.
    if !state.runs.drained(state.settings.shutdown_grace).await {
        tracing::warn!(
            runs = state.runs.len(),
            "grace period over; interrupting runs"
        );
        lifecycle.interrupt_runs.cancel();
        state.runs.drained(Duration::from_secs(5)).await;
    }
    lifecycle.close_sockets.cancel();
    // Give connection tasks a moment to send their close frames.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while state.infra.bus.subscribed_users() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Joined before leaving the cluster, so no heartbeat records this instance again
    // after it left.
    let joined = tokio::time::timeout(BACKGROUND_JOIN, async {
        while background.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!("background tasks did not stop in time; aborting them");
        background.abort_all();
    }
    if state.settings.bus_url.is_some() {
        state.runs.leave().await;
    }
    Ok(())
}
