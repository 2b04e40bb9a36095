//! A run's whole life, in one place: submitted, queued, claimed, built, executed, ended,
//! recovered.
//!
//! Every entry point (the WebSocket, REST, the original client's routes and
//! `/v1/chat/completions`) goes through [`Runs::submit`], and every way a run can end
//! goes through [`ending`]. In the order a run meets them:
//!
//! - [`submit`]: validates the message and stores it, its queued run and (for a message
//!   without one) its new thread in one transaction that enforces the user's limits in the
//!   database (so they hold across instances, and a refused message leaves no thread).
//!   With room here and nothing waiting, the same transaction claims the run and it starts
//!   at once. A message to a thread whose run is still going follows its
//!   `multitask_strategy` (double-texting: queue behind it, interrupt it, roll it back, or
//!   refuse); a thread's runs execute one at a time, in order, which the claim enforces.
//! - [`regenerate`]: a new run for a thread's last message, the earlier answers kept and
//!   marked superseded.
//! - [`approval`]: a run that asked for approval of its plan parks after the actions
//!   agent (`awaiting_approval`, holding no slot); the user's answer queues it again and
//!   it continues from what it stored, on any instance; unanswered, it expires.
//! - [`registry`]: the runs executing in this process (owner and cancellation token per
//!   run) and the places held for runs being submitted here.
//! - [`dispatch`]: each instance's dispatcher claims queued runs while it has room and
//!   starts each on its own task, with a fresh `AgentInstanceFactory` built from a
//!   context made of the run's stored ids.
//! - [`execute`]: the supervisor: runs the agents' pipeline under the run's deadline,
//!   stop and shutdown, and always ends the run with one terminal event.
//! - [`ending`]: the one way to end a run (error event, stored status, terminal event),
//!   and stopping a run wherever it is (executing here, queued, or on another instance).
//! - [`recovery`]: a claimed run whose instance stopped responding is queued again while
//!   it has attempts left, else ended `interrupted`.
//! - [`cluster`]: several instances on one database: heartbeats, and the sweep that
//!   recovers the runs of instances that died.
//!
//! [`Runs`] is the cheap `Clone` handle all of this hangs off (in the spirit of
//! mini-redis's `Db`): it holds exactly what runs need and nothing per user.

pub mod approval;
pub mod cluster;
mod dispatch;
pub mod ending;
mod execute;
pub mod recovery;
pub mod regenerate;
pub mod registry;
pub mod submit;

use std::sync::Arc;
use std::time::Duration;

use apex_protocol::threads::MultitaskStrategy;
use tokio::sync::Notify;

use crate::agents::Infrastructure;
use crate::ids::{RunId, ThreadId, UserId};
use crate::lifecycle::Lifecycle;
use crate::limits::Limits;
use crate::settings::Settings;

pub use approval::ApprovalError;
pub use ending::StopOutcome;
pub use registry::ActiveRuns;
pub use submit::{Steering, SubmitError};

/// The settings runs are executed under (copied out of [`Settings`] once).
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// How many runs this instance executes at once; more wait in the queue.
    pub max_runs_per_instance: usize,
    /// The longest a run may take.
    pub run_timeout: Duration,
    /// The longest any one agent may take.
    pub agent_timeout: Duration,
    /// How many times a run may be started (see [`recovery`]).
    pub run_max_attempts: u32,
    /// How often an idle dispatcher looks at the queue unprompted (a safety net).
    pub queue_poll_interval: Duration,
    /// With several instances: how often this instance records that it is alive.
    pub instance_heartbeat: Duration,
    /// With several instances: a run not refreshed for this long is orphaned.
    pub instance_stale_after: Duration,
    /// Several instances share the database (a bus is configured): a run still going
    /// when this instance's shutdown grace period ends goes back to the queue, and a stop
    /// for a run executing elsewhere is sent over the bus.
    pub several_instances: bool,
    /// The strategy of a message that names none (see [`submit`]).
    pub default_multitask_strategy: MultitaskStrategy,
    /// How long a run waits for approval of its plan (see [`approval`]).
    pub approval_timeout: Duration,
}

impl RunSettings {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            max_runs_per_instance: settings.max_runs_per_instance,
            run_timeout: settings.run_timeout,
            agent_timeout: settings.agent_timeout,
            run_max_attempts: settings.run_max_attempts,
            queue_poll_interval: settings.queue_poll_interval,
            instance_heartbeat: settings.instance_heartbeat,
            instance_stale_after: settings.instance_stale_after,
            several_instances: settings.bus_url.is_some(),
            default_multitask_strategy: settings.default_multitask_strategy,
            approval_timeout: settings.approval_timeout,
        }
    }
}

/// The handle to this process's runs. Cheap to clone; every clone is the same runs.
#[derive(Clone)]
pub struct Runs {
    shared: Arc<Shared>,
}

struct Shared {
    /// Store, bus, LLM and pricing: what a run's agents and events are built from.
    infra: Arc<Infrastructure>,
    /// The runs executing here; a stop request finds its run through it.
    registry: Arc<ActiveRuns>,
    /// Wakes this process's dispatcher (a signal only; the queue is in the database).
    wake: Arc<Notify>,
    /// Per-user message rate and the limit of unfinished runs per user.
    limits: Arc<Limits>,
    settings: RunSettings,
    /// This process's id among several instances (a fresh UUID per start); stored on the
    /// runs it claims.
    instance_id: String,
    /// Draining refuses new runs; `interrupt_runs` ends the ones still going.
    lifecycle: Lifecycle,
}

impl Runs {
    /// `registry` is passed in because the bus, built before, cancels runs through it
    /// when another instance forwards a stop.
    pub fn new(
        infra: Arc<Infrastructure>,
        registry: Arc<ActiveRuns>,
        limits: Arc<Limits>,
        settings: RunSettings,
        instance_id: String,
        lifecycle: Lifecycle,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                infra,
                registry,
                wake: Arc::new(Notify::new()),
                limits,
                settings,
                instance_id,
                lifecycle,
            }),
        }
    }

    /// This process's id among several instances.
    pub fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }

    pub fn settings(&self) -> &RunSettings {
        &self.shared.settings
    }

    /// Whether `run` is executing here on behalf of `owner` (and can still be stopped).
    pub fn is_active(&self, owner: UserId, run: RunId) -> bool {
        self.shared.registry.is_active(owner, run)
    }

    /// The owner's most recently started run that is still executing here.
    pub fn latest_for(&self, owner: UserId) -> Option<RunId> {
        self.shared.registry.latest_for(owner)
    }

    /// Cancels every run of `owner` on `thread` executing here (before the thread is
    /// deleted).
    pub fn cancel_thread(&self, owner: UserId, thread: ThreadId) -> usize {
        self.shared.registry.cancel_thread(owner, thread)
    }

    /// Runs executing here (finishing ones included) and places reserved for runs being
    /// submitted here.
    pub fn len(&self) -> usize {
        self.shared.registry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shared.registry.is_empty()
    }

    /// Waits until no run executes here, or `limit` passes. `true` if none is left.
    pub async fn drained(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_empty() {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            // Woken when a run leaves; the cap covers a wake-up taken by the dispatcher.
            let wait = (deadline - now).min(Duration::from_millis(100));
            let _ = tokio::time::timeout(wait, self.shared.registry.freed.notified()).await;
        }
        true
    }
}
