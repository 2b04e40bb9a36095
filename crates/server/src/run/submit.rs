//! Submitting a run: the one road from a user's message to a queued (or started) run.
//!
//! [`Runs::submit`] is used by every entry point. It validates the message, creates the
//! thread for a message that names none, and stores it, the message and the run answering
//! it in one transaction that also enforces the user's limits (unfinished runs, one run per
//! thread) in the database, so they hold across instances. If this instance has room (a
//! [`RunReservation`](super::registry::RunReservation)) and no run waits in the queue,
//! the same transaction claims the run and it starts at once; otherwise this instance's
//! dispatcher is woken and claims it when it can. Either way the run executes detached
//! from the socket or request that asked for it: closing the socket does not stop it.
//!
//! Double-texting: a message to a thread whose run is still going (queued or running, on
//! any instance) follows its [`MultitaskStrategy`] (the server's
//! `default_multitask_strategy` when it names none). `enqueue` queues the new run behind
//! the thread's unfinished runs (the claim starts a thread's runs one at a time, in
//! order); `interrupt` and `rollback` queue it too and stop those runs (marked
//! `superseded` by the same transaction, so the supervisor wherever they execute ends them
//! `interrupted`, or `cancelled` and then removed); `reject` refuses it (`THREAD_BUSY`).

use std::sync::Arc;

use apex_protocol::error::ErrorCode;
use apex_protocol::threads::{MultitaskStrategy, RunStatus};
use serde_json::{json, Value};

use super::Runs;
use crate::auth::AuthenticatedUser;
use crate::clock::now_ms;
use crate::ids::{MessageId, RequestId, RunId, ThreadId};
use crate::store::{
    MessageRecord, QueueEntry, RunApproval, RunRecord, RunSubmission, StoreError, SubmitOutcome,
    ThreadRecord,
};
use crate::user_store::UserStore;

/// Longest accepted user message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 16_000;

/// Characters of the message that title a thread created for it.
const TITLE_CHARS: usize = 60;

/// Why a message did not start a run. The `Display` text is what the user is told (REST
/// and WebSocket alike), with [`SubmitError::code`].
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    InvalidMessage(String),
    #[error("thread not found")]
    ThreadNotFound,
    #[error("the server is shutting down; retry later")]
    ShuttingDown,
    /// The user already has this many unfinished runs.
    #[error("at most {0} runs at once; wait for one to finish")]
    TooManyRuns(usize),
    #[error("this thread already has a run in progress; wait for it or stop it")]
    ThreadBusy,
    #[error("too many messages; slow down")]
    RateLimited(std::time::Duration),
    /// Not the user's fault: logged, and the user hears only "internal error".
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SubmitError {
    /// The error's row in the one table of client error codes.
    pub fn code(&self) -> ErrorCode {
        match self {
            SubmitError::InvalidMessage(_) => ErrorCode::ValidationFailed,
            SubmitError::ThreadNotFound => ErrorCode::ThreadNotFound,
            SubmitError::ShuttingDown => ErrorCode::ShuttingDown,
            SubmitError::TooManyRuns(_) => ErrorCode::TooManyRuns,
            SubmitError::ThreadBusy => ErrorCode::ThreadBusy,
            SubmitError::RateLimited(_) => ErrorCode::RateLimited,
            SubmitError::Store(_) => ErrorCode::Internal,
        }
    }
}

/// How a message steers its run (both optional; see the module docs and
/// [`super::approval`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Steering {
    /// What to do with the thread's unfinished run; `None`: the server's default.
    pub multitask_strategy: Option<MultitaskStrategy>,
    /// Park after the actions agent for approval of the plan; `None`: the user's setting.
    pub require_approval: Option<bool>,
}

impl Steering {
    /// For entry points that cannot answer a request for approval (the OpenAI-compatible
    /// API, the original client's REST route): never parks, whatever the user's setting.
    pub fn unattended() -> Self {
        Self {
            multitask_strategy: None,
            require_approval: Some(false),
        }
    }
}

/// A run that was accepted.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub run_id: RunId,
    pub thread_id: ThreadId,
    pub message_id: MessageId,
    /// The message named no thread and this one was created for it.
    pub thread_created: bool,
}

/// The message as stored: trimmed, non-empty, at most [`MAX_MESSAGE_CHARS`], no NUL.
pub fn validate_message(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("message must not be empty".into());
    }
    if text.chars().count() > MAX_MESSAGE_CHARS {
        return Err(format!(
            "message must be at most {MAX_MESSAGE_CHARS} characters"
        ));
    }
    // PostgreSQL cannot store U+0000 in text; refuse it on every engine alike.
    if text.contains('\0') {
        return Err("message must not contain NUL characters".into());
    }
    Ok(text.to_string())
}

impl Runs {
    /// Stores `message` as the user's message in `thread` (which must be theirs; `None`
    /// creates one titled from the message) and queues a run answering it, within the
    /// user's limits: message rate, unfinished runs. If the thread's previous run is still
    /// going, its strategy (else the configured default) says what happens (module docs).
    pub async fn submit(
        &self,
        user: &AuthenticatedUser,
        thread: Option<ThreadId>,
        message: &str,
        steering: Steering,
        request_id: RequestId,
    ) -> Result<Submitted, SubmitError> {
        let strategy = steering
            .multitask_strategy
            .unwrap_or(self.shared.settings.default_multitask_strategy);
        let text = validate_message(message).map_err(SubmitError::InvalidMessage)?;
        let shared = &self.shared;
        if shared.lifecycle.draining.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let store = UserStore::for_user(Arc::clone(&shared.infra.store), user);
        // Unknown or foreign threads are answered before limits are spent on them.
        if let Some(id) = thread {
            if store.get_thread(id).await?.is_none() {
                return Err(SubmitError::ThreadNotFound);
            }
        }
        self.check_message_rate(user).await?;
        // A message without a thread gets one, stored by the same transaction as its run:
        // a message the limits refuse leaves no thread behind.
        let (thread, new_thread) = match thread {
            Some(id) => (id, None),
            None => {
                let record = thread_for(&text);
                (record.id, Some(record))
            }
        };
        let thread_created = new_thread.is_some();

        let run_id = RunId::generate();
        let now = now_ms();
        let message = MessageRecord {
            id: MessageId::generate(),
            thread_id: thread,
            role: "user".into(),
            content: text,
            metadata: json!({ "run_id": run_id.to_string() }),
            created_at_ms: now,
            superseded_by: None,
        };
        let run = RunRecord {
            id: run_id,
            thread_id: thread,
            status: RunStatus::Queued,
            created_at_ms: now,
            started_at_ms: None,
            finished_at_ms: None,
            error: None,
            last_seq: 0,
        };
        let request = request_id.to_string();
        // With room here, the run is claimed in the submitting transaction and started at
        // once; otherwise it waits in the queue for this or another instance's dispatcher.
        let reservation = shared
            .registry
            .try_reserve(shared.settings.max_runs_per_instance);
        let max_unfinished = shared.limits.settings.max_concurrent_runs_per_user;
        let submission = RunSubmission {
            message: &message,
            run: &run,
            request_id: &request,
            max_unfinished,
            claim_by: reservation.as_ref().map(|_| shared.instance_id.as_str()),
            new_thread: new_thread.as_ref(),
            strategy,
            require_approval: steering.require_approval,
        };
        // Whether the run parks for approval matters here only if it starts here at once;
        // a queued run's claim reads it from the store.
        let mut approval_required = false;
        let claimed = match store.submit_run(&submission).await? {
            SubmitOutcome::Queued => false,
            SubmitOutcome::Claimed {
                approval_required: required,
            } => {
                approval_required = required;
                true
            }
            SubmitOutcome::Superseding(previous) => {
                // Stored: the new run waits in the queue until these have ended.
                for run in &previous {
                    if let Err(err) = self.supersede(user, run, strategy).await {
                        // The mark is stored: the run still ends `interrupted` (or is
                        // removed) when it ends; only its stop is late.
                        tracing::error!(run_id = %run.id, error = %err, "could not stop a superseded run");
                    }
                }
                false
            }
            SubmitOutcome::ThreadNotFound => return Err(SubmitError::ThreadNotFound),
            SubmitOutcome::ThreadBusy => {
                crate::telemetry::limit_rejected("thread_busy");
                return Err(SubmitError::ThreadBusy);
            }
            SubmitOutcome::TooManyRuns => {
                crate::telemetry::limit_rejected("too_many_runs");
                return Err(SubmitError::TooManyRuns(max_unfinished));
            }
        };
        self.launch(
            user,
            run,
            &message.content,
            request,
            reservation.filter(|_| claimed),
            approval_required,
        )
        .await;
        Ok(Submitted {
            run_id,
            thread_id: thread,
            message_id: message.id,
            thread_created,
        })
    }

    /// Spends one of `user`'s message-rate tokens (every message counts, whether it
    /// starts a run or asks the model directly); counts a refusal in the metrics.
    pub async fn check_message_rate(&self, user: &AuthenticatedUser) -> Result<(), SubmitError> {
        self.shared
            .limits
            .check_message(user.user_id())
            .await
            .map_err(|wait| {
                crate::telemetry::limit_rejected("rate_limited");
                SubmitError::RateLimited(wait)
            })
    }
}

/// The thread a message without one starts, titled from the message (stored with the run).
fn thread_for(text: &str) -> ThreadRecord {
    let now = now_ms();
    ThreadRecord {
        id: ThreadId::generate(),
        title: text
            .chars()
            .take(TITLE_CHARS)
            .collect::<String>()
            .trim()
            .to_string(),
        metadata: Value::Object(Default::default()),
        created_at_ms: now,
        updated_at_ms: now,
        message_count: 0,
    }
}

/// The user's queued or running runs on every instance, newest first.
pub async fn unfinished_runs_of(store: &UserStore) -> Result<Vec<RunRecord>, StoreError> {
    // `finished_since` in the future: only unfinished runs qualify.
    store.recent_runs(i64::MAX, 1000).await
}

impl Runs {
    /// A run just stored: started here at once when the submitting transaction claimed it
    /// for this instance (`claimed` holds the slot reserved for it), else left to the
    /// dispatcher, which is woken. Messages and regenerations both end here.
    pub(super) async fn launch(
        &self,
        user: &AuthenticatedUser,
        run: RunRecord,
        input: &str,
        request: String,
        claimed: Option<super::registry::RunReservation>,
        approval_required: bool,
    ) {
        crate::telemetry::run_queued();
        match claimed {
            Some(reservation) => {
                let entry = QueueEntry {
                    owner: user.user_id(),
                    run: RunRecord {
                        status: RunStatus::Running,
                        // As the claiming transaction stored it.
                        started_at_ms: Some(run.created_at_ms),
                        ..run
                    },
                    input: Some(input.to_string()),
                    request_id: Some(request),
                    attempts: 1,
                    instance: Some(self.shared.instance_id.clone()),
                    approval: RunApproval {
                        required: approval_required,
                        ..RunApproval::default()
                    },
                };
                self.start(entry, Some(reservation)).await;
            }
            None => self.wake_dispatcher(),
        }
    }
}
