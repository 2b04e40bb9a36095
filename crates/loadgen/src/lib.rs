//! `apex-loadgen`: a bounded load generator that drives Apex's real protocol and checks
//! isolation while it measures.
//!
//! Each simulated user registers, opens one to N WebSocket connections and asks questions.
//! Every frame every connection receives is checked against that user's own ids; every
//! run's events must arrive with contiguous `seq` and exactly one terminal event; every
//! completed answer's spend total must equal the user's own usage summary. With chaos on,
//! users also disconnect mid-run and `resume`, stop runs mid-way, send thread ids they
//! invented, and send other users' real run ids to `resume` and `stop_agent` (which must
//! be refused while the other run continues).
//!
//! Loopback only: [`LoadConfig::base_url`] must point at 127.0.0.0/8 or localhost, every
//! loop is bounded by counts and by [`LoadConfig::max_duration`].
//!
//! Used by `apex loadgen` and by the server's stress suite; [`hold_idle`] (idle connections
//! for memory measurements) by `apex loadgen --idle-connections`.

#![forbid(unsafe_code)]

mod idle;
mod stats;
mod user;

pub use idle::{hold_idle, IdleReport};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

pub use stats::Percentiles;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// `http://127.0.0.1:PORT` of a running server (registration and REST go here).
    pub base_url: String,
    /// Further instances of the same deployment: users' connections are spread over
    /// `base_url` and these, so a run started through one instance is followed on others.
    pub also_servers: Vec<String>,
    pub users: usize,
    /// Each user opens between 1 and this many connections.
    pub max_connections_per_user: usize,
    /// Runs each user starts, one after another.
    pub runs_per_user: usize,
    /// Pause between one of a user's runs ending and the next starting (randomised to
    /// 0.5–1.5×; the first run starts after 0–1×). Zero: back to back (closed loop, the
    /// server saturated); non-zero: a paced load the server can keep up with.
    pub think_time: Duration,
    /// Seed of every random choice; print it to reproduce a failure.
    pub seed: u64,
    /// Disconnects, stops, invented thread ids and foreign run ids.
    pub chaos: bool,
    /// Hard bound on the whole load; users stop starting runs after it.
    pub max_duration: Duration,
    /// How many users register at the same time (registration hashes passwords).
    pub registration_concurrency: usize,
    pub question: String,
    /// Print `load starts` on stderr once every user is registered (for benchmark scripts
    /// that measure the server from that moment).
    pub announce_start: bool,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8000".into(),
            also_servers: Vec::new(),
            users: 10,
            max_connections_per_user: 2,
            runs_per_user: 2,
            think_time: Duration::ZERO,
            seed: 1,
            chaos: false,
            max_duration: Duration::from_secs(120),
            registration_concurrency: 16,
            question: "How can I reduce my LLM costs?".into(),
            announce_start: false,
        }
    }
}

/// What happened. `violations` lists every isolation or ordering failure in words.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct LoadReport {
    pub seed: u64,
    pub users: usize,
    pub connections: usize,
    pub runs_started: usize,
    /// Runs started by `regenerate` after a completed run (chaos only), on top of
    /// `runs_started`; their ends are counted with the others.
    pub runs_regenerated: usize,
    /// Runs started by two messages sent back to back to one thread, the second with
    /// `enqueue`, `interrupt` or `rollback` (chaos only), on top of `runs_started`.
    pub runs_double_texted: usize,
    /// Runs started with `require_approval` after a completed run (chaos only), whose plan
    /// was approved, edited or rejected while they waited; on top of `runs_started`.
    pub runs_approved: usize,
    pub runs_completed: usize,
    pub runs_cancelled: usize,
    pub runs_other: usize,
    /// Frames whose user, run or thread is not the receiving user's.
    pub cross_user_frames: usize,
    /// Seq gaps on a run's followed stream (including after resume).
    pub lost_events: usize,
    /// Events a connection received twice.
    pub duplicate_events: usize,
    /// Completed answers whose spend total differs from the user's own summary.
    pub wrong_numbers: usize,
    /// Chaos probes that were answered wrongly (foreign run ids, invented threads).
    pub probe_failures: usize,
    pub probes: usize,
    /// Requests that failed or timed out (registration, connection, protocol).
    pub errors: usize,
    pub events_received: usize,
    /// The load itself: from the moment every user was registered and connected to the
    /// end of the last run (registration hashes passwords and is not part of it).
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
    /// Registering the users before the load.
    #[serde(serialize_with = "seconds")]
    pub registration: Duration,
    /// Server event timestamp to client receipt, milliseconds.
    pub event_latency_ms: Percentiles,
    /// Message sent to first event of its run, milliseconds.
    pub time_to_first_event_ms: Percentiles,
    /// Message sent to terminal event, milliseconds.
    pub run_duration_ms: Percentiles,
    pub violations: Vec<String>,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl LoadReport {
    /// The report as one JSON object (for scripts), with `runs_per_s` added.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        value["runs_per_s"] = serde_json::json!(self.runs_per_second());
        value
    }

    pub fn runs_per_second(&self) -> f64 {
        let finished = self.runs_completed + self.runs_cancelled + self.runs_other;
        finished as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Isolation held and nothing was lost.
    pub fn is_clean(&self) -> bool {
        self.cross_user_frames == 0
            && self.lost_events == 0
            && self.duplicate_events == 0
            && self.wrong_numbers == 0
            && self.probe_failures == 0
            && self.errors == 0
            && self.violations.is_empty()
    }

    pub fn render(&self) -> String {
        format!(
            "seed {seed}\n\
             users {users}, connections {connections}, runs started {started} (+{regenerated} regenerated, +{double} double-texted, +{approved} approved)\n\
             runs completed {completed}, cancelled {cancelled}, other {other}\n\
             runs/s {rps:.1} over {elapsed:.1} s (after {registration:.1} s of registration), events received {events}\n\
             event latency ms      p50 {l50} p90 {l90} p99 {l99} p99.9 {l999} max {lmax}\n\
             time to first event ms p50 {f50} p90 {f90} p99 {f99}\n\
             run duration ms       p50 {d50} p90 {d90} p99 {d99}\n\
             errors {errors}, probes {probes} (failed {probe_failures})\n\
             cross-user frames {cross}\n\
             lost events {lost}, duplicate events {dups}, wrong numbers {wrong}",
            seed = self.seed,
            users = self.users,
            connections = self.connections,
            started = self.runs_started,
            regenerated = self.runs_regenerated,
            double = self.runs_double_texted,
            approved = self.runs_approved,
            completed = self.runs_completed,
            cancelled = self.runs_cancelled,
            other = self.runs_other,
            rps = self.runs_per_second(),
            elapsed = self.elapsed.as_secs_f64(),
            registration = self.registration.as_secs_f64(),
            events = self.events_received,
            l50 = self.event_latency_ms.p50,
            l90 = self.event_latency_ms.p90,
            l99 = self.event_latency_ms.p99,
            l999 = self.event_latency_ms.p999,
            lmax = self.event_latency_ms.max,
            f50 = self.time_to_first_event_ms.p50,
            f90 = self.time_to_first_event_ms.p90,
            f99 = self.time_to_first_event_ms.p99,
            d50 = self.run_duration_ms.p50,
            d90 = self.run_duration_ms.p90,
            d99 = self.run_duration_ms.p99,
            errors = self.errors,
            probes = self.probes,
            probe_failures = self.probe_failures,
            cross = self.cross_user_frames,
            lost = self.lost_events,
            dups = self.duplicate_events,
            wrong = self.wrong_numbers,
        )
    }
}

/// Refuses anything but loopback: load is never sent to another machine.
fn check_loopback(base_url: &str) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(base_url).context("base URL")?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if !loopback {
        bail!("the load generator only targets loopback addresses, not {base_url}");
    }
    Ok(())
}

/// Run ids started by all users, so chaos can probe with other users' real ids.
#[derive(Default)]
pub(crate) struct SharedRunIds {
    ids: Mutex<Vec<(usize, String)>>,
}

impl SharedRunIds {
    fn add(&self, user: usize, run: String) {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((user, run));
    }

    /// The most recent run id of a user other than `me`.
    fn foreign(&self, me: usize) -> Option<String> {
        self.ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .rev()
            .find(|(user, _)| *user != me)
            .map(|(_, run)| run.clone())
    }
}

/// Runs the load and returns the report. Never panics on server misbehaviour: every
/// problem is counted and described in the report.
pub async fn run(config: LoadConfig) -> anyhow::Result<LoadReport> {
    for url in std::iter::once(&config.base_url).chain(&config.also_servers) {
        check_loopback(url)?;
    }
    let config = Arc::new(config);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .build()?;
    let registration_started = Instant::now();
    let shared = Arc::new(SharedRunIds::default());

    // Register everyone first, with bounded concurrency, so runs overlap for real.
    let registration = Arc::new(tokio::sync::Semaphore::new(
        config.registration_concurrency.max(1),
    ));
    let mut registered = Vec::new();
    for index in 0..config.users {
        let (http, config, registration) =
            (http.clone(), Arc::clone(&config), Arc::clone(&registration));
        registered.push(tokio::spawn(async move {
            let _permit = registration.acquire_owned().await;
            user::Account::register(&http, &config, index).await
        }));
    }
    let mut report = LoadReport {
        seed: config.seed,
        users: config.users,
        ..LoadReport::default()
    };
    let mut accounts = Vec::new();
    for handle in registered {
        match handle.await {
            Ok(Ok(account)) => accounts.push(account),
            Ok(Err(err)) => {
                report.errors += 1;
                report
                    .violations
                    .push(format!("registration failed: {err:#}"));
            }
            Err(err) => {
                report.errors += 1;
                report
                    .violations
                    .push(format!("registration task failed: {err}"));
            }
        }
    }

    report.registration = registration_started.elapsed();
    if config.announce_start {
        eprintln!("load starts ({} users registered)", accounts.len());
    }
    // The load's clock starts once everyone is registered.
    let started = Instant::now();
    let deadline = started + config.max_duration;
    let barrier = Arc::new(tokio::sync::Barrier::new(accounts.len().max(1)));
    let mut tasks = Vec::new();
    for account in accounts {
        let (config, shared, barrier) = (
            Arc::clone(&config),
            Arc::clone(&shared),
            Arc::clone(&barrier),
        );
        tasks.push(tokio::spawn(async move {
            user::simulate(account, &config, &shared, barrier, deadline).await
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        match task.await {
            Ok(outcome) => outcomes.push(outcome),
            Err(err) => {
                report.errors += 1;
                report.violations.push(format!("user task failed: {err}"));
            }
        }
    }
    report.elapsed = started.elapsed();
    let mut latency = Vec::new();
    let mut first_event = Vec::new();
    let mut durations = Vec::new();
    for outcome in outcomes {
        report.connections += outcome.connections;
        report.runs_started += outcome.runs_started;
        report.runs_regenerated += outcome.runs_regenerated;
        report.runs_double_texted += outcome.runs_double_texted;
        report.runs_approved += outcome.runs_approved;
        report.runs_completed += outcome.runs_completed;
        report.runs_cancelled += outcome.runs_cancelled;
        report.runs_other += outcome.runs_other;
        report.cross_user_frames += outcome.cross_user_frames;
        report.lost_events += outcome.lost_events;
        report.duplicate_events += outcome.duplicate_events;
        report.wrong_numbers += outcome.wrong_numbers;
        report.probe_failures += outcome.probe_failures;
        report.probes += outcome.probes;
        report.errors += outcome.errors;
        report.events_received += outcome.events_received;
        latency.extend(outcome.event_latency_ms);
        first_event.extend(outcome.time_to_first_event_ms);
        durations.extend(outcome.run_duration_ms);
        report.violations.extend(outcome.violations);
    }
    report.event_latency_ms = Percentiles::of(latency);
    report.time_to_first_event_ms = Percentiles::of(first_event);
    report.run_duration_ms = Percentiles::of(durations);
    Ok(report)
}
