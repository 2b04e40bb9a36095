//! Regenerating an answer: a new run for a thread's last user message, on the same road as
//! a message ([`Runs::submit`](super::Runs::submit)) but storing no message.
//!
//! The store queues the run and, in the same transaction, marks the answers after that
//! message as superseded by it, so history keeps them (shown as superseded) and the next
//! run's context skips them. A regeneration that ends without an answer (failed, stopped,
//! timed out, interrupted) clears the mark again when it ends (see
//! [`ending`](super::ending)): the earlier answer is then still the thread's answer.

use std::sync::Arc;

use apex_protocol::threads::RunStatus;

use super::submit::{SubmitError, Submitted};
use super::Runs;
use crate::auth::AuthenticatedUser;
use crate::clock::now_ms;
use crate::ids::{RequestId, RunId, ThreadId};
use crate::store::{RegenerateOutcome, RegenerateSubmission, RunRecord};
use crate::user_store::UserStore;

/// What the user is told when the thread has nothing to answer again.
pub const NO_QUESTION: &str = "this thread has no message to answer again";

impl Runs {
    /// Queues a run answering the last user message of `thread` (which must be the user's)
    /// again, within the same limits as a message: message rate, unfinished runs, one run
    /// per thread. [`Submitted::message_id`] is the message answered again.
    pub async fn regenerate(
        &self,
        user: &AuthenticatedUser,
        thread: ThreadId,
        request_id: RequestId,
    ) -> Result<Submitted, SubmitError> {
        let shared = &self.shared;
        if shared.lifecycle.draining.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let store = UserStore::for_user(Arc::clone(&shared.infra.store), user);
        // Unknown or foreign threads are answered before limits are spent on them, exactly
        // as for a message.
        if store.get_thread(thread).await?.is_none() {
            return Err(SubmitError::ThreadNotFound);
        }
        self.check_message_rate(user).await?;

        let run_id = RunId::generate();
        let now = now_ms();
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
        let reservation = shared
            .registry
            .try_reserve(shared.settings.max_runs_per_instance);
        let max_unfinished = shared.limits.settings.max_concurrent_runs_per_user;
        let submission = RegenerateSubmission {
            run: &run,
            request_id: &request,
            max_unfinished,
            claim_by: reservation.as_ref().map(|_| shared.instance_id.as_str()),
        };
        let (question, claimed, approval_required) = match store.regenerate_run(&submission).await?
        {
            RegenerateOutcome::Stored {
                question,
                claimed,
                approval_required,
            } => (question, claimed, approval_required),
            RegenerateOutcome::ThreadNotFound => return Err(SubmitError::ThreadNotFound),
            RegenerateOutcome::NoQuestion => {
                return Err(SubmitError::InvalidMessage(NO_QUESTION.into()))
            }
            RegenerateOutcome::ThreadBusy => {
                crate::telemetry::limit_rejected("thread_busy");
                return Err(SubmitError::ThreadBusy);
            }
            RegenerateOutcome::TooManyRuns => {
                crate::telemetry::limit_rejected("too_many_runs");
                return Err(SubmitError::TooManyRuns(max_unfinished));
            }
        };
        self.launch(
            user,
            run,
            &question.content,
            request,
            reservation.filter(|_| claimed),
            approval_required,
        )
        .await;
        Ok(Submitted {
            run_id,
            thread_id: thread,
            message_id: question.id,
            thread_created: false,
        })
    }
}
