//! `UserExecutionContext`: the immutable identity of one run.
//!
//! A context is built only from an [`AuthenticatedUser`] (which only the auth module can
//! create, after verifying a token or ticket) plus ids the server generated or looked up
//! under that user. There is no constructor taking a user id string: a client can never
//! talk its way into someone else's context. Everything per-user in a run (emitter, store
//! handle, agents) is derived from this value by the `AgentInstanceFactory`.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::auth::AuthenticatedUser;
use crate::ids::{RequestId, RunId, ThreadId, UserId};

#[derive(Debug, Clone)]
pub struct UserExecutionContext {
    user_id: UserId,
    thread_id: ThreadId,
    run_id: RunId,
    request_id: RequestId,
    created_at: DateTime<Utc>,
    /// Cancelled by `stop_agent` / `POST /api/runs/{id}/cancel`; agents and tools watch it.
    cancellation: CancellationToken,
    /// The run is timed out when this instant passes.
    deadline: Instant,
    /// Longest any single agent may take.
    agent_timeout: Duration,
}

impl UserExecutionContext {
    /// `thread_id` must have been looked up under `user` (see `UserStore::get_thread`).
    pub fn new(
        user: &AuthenticatedUser,
        thread_id: ThreadId,
        run_id: RunId,
        request_id: RequestId,
        run_timeout: Duration,
        agent_timeout: Duration,
    ) -> Self {
        Self::for_queued_run(
            user.user_id(),
            thread_id,
            run_id,
            request_id,
            run_timeout,
            agent_timeout,
        )
    }

    pub fn user_id(&self) -> UserId {
        self.user_id
    }
    pub fn thread_id(&self) -> ThreadId {
        self.thread_id
    }
    pub fn run_id(&self) -> RunId {
        self.run_id
    }
    pub fn request_id(&self) -> RequestId {
        self.request_id
    }
    pub fn created_at(&self) -> DateTime<Utc> {
        self.created_at
    }
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancellation
    }
    pub fn deadline(&self) -> Instant {
        self.deadline
    }
    pub fn agent_timeout(&self) -> Duration {
        self.agent_timeout
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancellation.is_cancelled()
    }
}

impl UserExecutionContext {
    /// Context for executing a run claimed from the queue. Every id comes from the run's
    /// row, which `Runs::submit` (`crate::run::submit`) wrote from an authenticated user; a client
    /// never supplies them.
    pub(crate) fn for_queued_run(
        owner: UserId,
        thread_id: ThreadId,
        run_id: RunId,
        request_id: RequestId,
        run_timeout: Duration,
        agent_timeout: Duration,
    ) -> Self {
        Self {
            user_id: owner,
            thread_id,
            run_id,
            request_id,
            created_at: Utc::now(),
            cancellation: CancellationToken::new(),
            deadline: Instant::now() + run_timeout,
            agent_timeout,
        }
    }

    /// Context for closing out a run a previous process left unfinished. The owner comes
    /// from the stored run row, never from a client; no agent runs under it.
    pub(crate) fn for_recovery(owner: UserId, thread_id: ThreadId, run_id: RunId) -> Self {
        Self {
            user_id: owner,
            thread_id,
            run_id,
            request_id: RequestId::generate(),
            created_at: Utc::now(),
            cancellation: CancellationToken::new(),
            deadline: Instant::now(),
            agent_timeout: Duration::ZERO,
        }
    }
}
