//! The supervisor: executes one run to its end and always ends it with one terminal event.
//!
//! Whatever happens (success, an agent error, a panic, `stop_agent`, the deadline, server
//! shutdown), the run ends with `final_report` (success) or `error` (otherwise), then the
//! supervisor's `agent_completed` with the final status ([`super::ending::end_run`]). The
//! run's status and, on success, the assistant message are stored before the terminal
//! event goes out, so a client that sees it can immediately read both over REST.
//!
//! With several instances, a run still going when this instance's shutdown grace period
//! ends is handed back to the queue instead (while it has attempts left), so another
//! instance runs it again and continues its log.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use apex_protocol::approval::ApprovalDecision;
use apex_protocol::error::agent_codes;
use apex_protocol::events::{EventBody, SUPERVISOR};
use apex_protocol::threads::RunStatus;
use futures_util::FutureExt;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::approval::{apply, park, worth_approving, Checkpoint, Parked, Resumption, PAUSE_AFTER};
use super::ending::{end_run, settle, Ending, StatusWrite, StopReason};
use super::registry::RunSlot;
use crate::agents::reporting::build_report;
use crate::agents::{run_pipeline, AgentContext, AgentError, RunInstance, RunState};
use crate::clock::now_ms;
use crate::ids::MessageId;
use crate::store::{MessageRecord, Store};

/// A built run and what executing it here involves.
pub(super) struct Execution {
    pub instance: RunInstance,
    /// The run's registration among the runs executing here; released as it finishes.
    pub slot: RunSlot,
    /// Server shutdown: ends the run `interrupted` (or hands it back).
    pub shutdown: CancellationToken,
    /// Which start of the run this is (1 = first) and how many it may have; a run whose
    /// server died is started again from the beginning.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Set with several instances: where to hand the run back at shutdown.
    pub hand_back: Option<HandBack>,
    /// This process's dispatcher, woken when the run's end frees a run of its thread that
    /// was queued behind it (double-texting with `enqueue`, `interrupt`, `rollback`).
    pub wake: Arc<Notify>,
    /// Whether the run parks for approval of its plan, or continues after it.
    pub resumption: Resumption,
    /// Where a run parks (see [`super::approval`]).
    pub parking: Parking,
}

/// What parking a run for approval needs besides its context.
pub(super) struct Parking {
    /// The queue's view of the store: parking is a change of the run's claim.
    pub store: Arc<dyn Store>,
    /// This instance, which holds the run's claim.
    pub instance: String,
    /// How long the user has to answer.
    pub timeout: std::time::Duration,
}

/// How the pipeline stopped when it did not fail.
enum Stopped {
    /// Every agent ran.
    Completed,
    /// Parked for approval of the plan; the run goes on after its user's answer.
    Parked,
}

/// Returning an interrupted run to the queue so that another instance runs it again.
pub(super) struct HandBack {
    pub store: Arc<dyn Store>,
    /// This instance, which holds the run's claim.
    pub instance: String,
}

enum Outcome {
    Completed,
    Parked,
    AgentTimedOut(&'static str),
    Failed(String, String),
    /// Stopped: by its user, or by a newer message on its thread.
    Cancelled(StopReason),
    TimedOut,
    Interrupted,
}

/// Executes a run to its end. Returns the final status (`queued` if handed back).
pub(super) async fn execute(run: Execution) -> RunStatus {
    let Execution {
        instance:
            RunInstance {
                context: cx,
                agents,
                request,
            },
        slot,
        shutdown,
        attempt,
        max_attempts,
        hand_back,
        wake,
        resumption,
        parking,
    } = run;
    let started = Instant::now();
    let run_id = cx.ctx.run_id();
    // The claim that handed this run to us already marked it running.
    let mut state = RunState {
        request,
        ..RunState::default()
    };
    // The report's `approval` section, once the plan is answered.
    let mut approval_section = None;

    let outcome = {
        let pipeline = AssertUnwindSafe(async {
            if attempt > 1 && matches!(resumption, Resumption::Fresh { .. }) {
                cx.emitter
                    .emit(
                        SUPERVISOR,
                        EventBody::AgentThinking {
                            reasoning: format!(
                                "The server that was working on this request stopped; starting \
                                 again from the beginning (attempt {attempt} of {max_attempts})."
                            ),
                            step_number: 0,
                            total_steps: 0,
                        },
                    )
                    .await?;
            }
            // The agents up to the pause, and the ones after it.
            let split = agents
                .iter()
                .position(|agent| agent.name() == PAUSE_AFTER)
                .map_or(agents.len(), |i| i + 1);
            let (before, after) = agents.split_at(split);
            let decision = match resumption {
                Resumption::Fresh { pause } => {
                    cx.emitter
                        .emit(
                            SUPERVISOR,
                            EventBody::AgentStarted {
                                message: "Working on your request".into(),
                            },
                        )
                        .await?;
                    run_pipeline(&cx, before, &mut state).await?;
                    if pause && worth_approving(&state.plan) {
                        let checkpoint = Checkpoint::new(&state, parking.timeout);
                        match park(&cx, &parking, checkpoint, false).await? {
                            Parked::Waiting => return Ok(Stopped::Parked),
                            Parked::Answered(decision) => Some(decision),
                        }
                    } else {
                        if pause {
                            cx.think(
                                SUPERVISOR,
                                "The plan changes nothing, so there is nothing to approve",
                                0,
                                0,
                            )
                            .await?;
                        }
                        None
                    }
                }
                Resumption::Repark(checkpoint) => {
                    state = checkpoint.state.clone();
                    match park(&cx, &parking, checkpoint, true).await? {
                        Parked::Waiting => return Ok(Stopped::Parked),
                        Parked::Answered(decision) => Some(decision),
                    }
                }
                Resumption::Decided(checkpoint, decision) => {
                    state = checkpoint.state;
                    Some(decision)
                }
            };
            let Some(decision) = decision else {
                run_pipeline(&cx, after, &mut state).await?;
                return Ok(Stopped::Completed);
            };
            approval_section = Some(apply(&decision, &mut state));
            cx.think(SUPERVISOR, continuing_note(&decision, &state), 0, 0)
                .await?;
            if decision.decision != ApprovalDecision::Reject {
                run_pipeline(&cx, after, &mut state).await?;
            }
            Ok(Stopped::Completed)
        })
        .catch_unwind();
        tokio::select! {
            biased;
            _ = cx.ctx.cancellation().cancelled() => Outcome::Cancelled(StopReason::User),
            _ = shutdown.cancelled() => Outcome::Interrupted,
            _ = tokio::time::sleep_until(cx.ctx.deadline().into()) => Outcome::TimedOut,
            result = pipeline => match result {
                Ok(Ok(Stopped::Completed)) => Outcome::Completed,
                Ok(Ok(Stopped::Parked)) => Outcome::Parked,
                Ok(Err(AgentError::Cancelled | AgentError::Llm(crate::llm::LlmError::Cancelled))) => Outcome::Cancelled(StopReason::User),
                Ok(Err(AgentError::TimedOut(agent))) => Outcome::AgentTimedOut(agent),
                Ok(Err(err)) => Outcome::Failed(err.code().into(), err.client_message()),
                Err(_) => {
                    tracing::error!(%run_id, "an agent panicked");
                    Outcome::Failed(agent_codes::AGENT_PANICKED.into(), "an agent crashed".into())
                }
            },
        }
    };
    if matches!(outcome, Outcome::Parked) {
        // The LLM requests before the pause were made; the slot is free for other runs.
        cx.flush_llm_usage().await;
        drop(slot);
        tracing::info!(%run_id, "run parked until its plan is answered");
        return RunStatus::AwaitingApproval;
    }
    if let Some(section) = approval_section {
        let mut report = state.report.take().unwrap_or_else(|| build_report(&state));
        if let Value::Object(fields) = &mut report {
            fields.insert("approval".into(), section);
        }
        state.report = Some(report);
    }
    if matches!(outcome, Outcome::Interrupted) && attempt < max_attempts {
        if let Some(hand_back) = &hand_back {
            if handed_back(&cx, hand_back, started).await {
                return RunStatus::Queued;
            }
        }
    }
    // A stop may have come from a newer message (from any instance): the store says.
    let outcome = match outcome {
        Outcome::Cancelled(_) => Outcome::Cancelled(StopReason::of(&cx.store, run_id).await),
        other => other,
    };
    let status = finish(&cx, &slot, state, outcome, started).await;
    if settle(&cx.store, run_id).await {
        wake.notify_one();
    }
    status
}

/// What the supervisor says as a run continues after its user answered the plan.
fn continuing_note(decision: &super::approval::StoredDecision, state: &RunState) -> String {
    match decision.decision {
        ApprovalDecision::Approve => "You approved the plan; writing the report".into(),
        ApprovalDecision::Edit => format!(
            "You edited the plan to {} step(s); writing the report for those",
            state.plan.len()
        ),
        ApprovalDecision::Reject => "You rejected the plan; nothing will be carried out".into(),
    }
}

/// At shutdown with several instances: returns the run to the queue (this instance still
/// holds its claim), so another instance runs it again and continues its log. `false` if
/// that failed, and the run is to end `interrupted` here instead.
async fn handed_back(cx: &AgentContext, hand_back: &HandBack, started: Instant) -> bool {
    let run_id = cx.ctx.run_id();
    // The LLM requests of this attempt did happen; they are the user's usage either way.
    cx.flush_llm_usage().await;
    match hand_back
        .store
        .requeue_run(run_id, Some(&hand_back.instance))
        .await
    {
        Ok(true) => {
            if let Err(err) = hand_back.store.announce_queued_runs().await {
                tracing::warn!(%run_id, error = %err, "could not announce the returned run");
            }
            crate::telemetry::run_requeued();
            crate::telemetry::run_finished("requeued", started.elapsed());
            tracing::info!(%run_id, "shutting down: returned the run to the queue");
            true
        }
        Ok(false) => false,
        Err(err) => {
            tracing::error!(%run_id, error = %err, "could not return the run to the queue");
            false
        }
    }
}

/// The status and, unless the run completed, the error code and message of `outcome`.
fn status_of(outcome: Outcome) -> (RunStatus, Option<(String, String)>) {
    match outcome {
        Outcome::Completed => (RunStatus::Completed, None),
        // Returned before the run is finished (see `execute`); never ends a run.
        Outcome::Parked => (RunStatus::AwaitingApproval, None),
        Outcome::AgentTimedOut(agent) => (
            RunStatus::TimedOut,
            Some((
                agent_codes::TIMED_OUT.into(),
                format!("the {agent} agent took too long"),
            )),
        ),
        Outcome::Failed(code, message) => (RunStatus::Failed, Some((code, message))),
        Outcome::Cancelled(reason) => {
            let (status, code, message) = reason.ending();
            (status, Some((code.into(), message.into())))
        }
        Outcome::TimedOut => (
            RunStatus::TimedOut,
            Some((
                agent_codes::TIMED_OUT.into(),
                "the run took too long".into(),
            )),
        ),
        Outcome::Interrupted => (
            RunStatus::Interrupted,
            Some((
                agent_codes::INTERRUPTED.into(),
                "the server shut down during the run".into(),
            )),
        ),
    }
}

async fn finish(
    cx: &AgentContext,
    slot: &RunSlot,
    state: RunState,
    outcome: Outcome,
    started: Instant,
) -> RunStatus {
    let run_id = cx.ctx.run_id();
    let total_duration_ms = started.elapsed().as_millis() as u64;
    // Before the terminal event, so a client that asks about its usage right after the run
    // sees the run's own LLM requests.
    cx.flush_llm_usage().await;
    let (status, error) = status_of(outcome);
    let report = state.report.clone().unwrap_or_else(|| build_report(&state));

    if status == RunStatus::Completed {
        let message = MessageRecord {
            id: MessageId::generate(),
            thread_id: cx.ctx.thread_id(),
            role: "assistant".into(),
            content: state.answer.clone(),
            metadata: json!({ "run_id": run_id.to_string(), "report": report }),
            created_at_ms: now_ms(),
            superseded_by: None,
        };
        if let Err(err) = cx.store.insert_message(&message).await {
            tracing::error!(%run_id, error = %err, "could not store the answer");
        }
        let _ = cx
            .emitter
            .emit(
                SUPERVISOR,
                EventBody::FinalReport {
                    executive_summary: state.answer.clone(),
                    recommendations: json!(state.opportunities),
                    action_plan: json!(state.plan),
                    cost_analysis: report.get("usage").cloned().unwrap_or(Value::Null),
                    total_duration_ms,
                },
            )
            .await;
    }
    let ending = Ending {
        status,
        error,
        answer: state.answer,
        report,
        duration_ms: total_duration_ms,
    };
    // Once the outcome is stored, the user may start the next run on this thread as soon
    // as they see the terminal event: the run no longer counts and can no longer be
    // stopped.
    let ended = end_run(
        &cx.emitter,
        StatusWrite::BestEffort(&cx.store),
        ending,
        || slot.mark_finishing(),
    )
    .await;
    if let Err(err) = ended {
        tracing::error!(%run_id, error = %err, "terminal event was delivered but not stored");
    }
    crate::telemetry::run_finished(status.as_str(), started.elapsed());
    tracing::info!(%run_id, status = status.as_str(), duration_ms = total_duration_ms, "run finished");
    status
}
