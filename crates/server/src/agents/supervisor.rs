//! The supervisor: runs the pipeline for one run and always ends it with one terminal event.
//!
//! Whatever happens (success, an agent error, a panic, `stop_agent`, the deadline, server
//! shutdown), the run ends with `final_report` (success) or `error` (otherwise), then the
//! supervisor's `agent_completed` with the final status. The run's status and, on success,
//! the assistant message are stored before the terminal event goes out, so a client that
//! sees it can immediately read both over REST.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use apex_protocol::error::agent_codes;
use apex_protocol::events::{EventBody, SUPERVISOR};
use apex_protocol::threads::RunStatus;
use futures_util::FutureExt;
use serde_json::{json, Value};

use super::reporting::build_report;
use super::{Agent, AgentContext, AgentError, HandBack, RunInstance, RunState};
use crate::clock::now_ms;
use crate::ids::MessageId;
use crate::runs::RunSlot;
use crate::store::MessageRecord;

enum Outcome {
    Completed,
    AgentTimedOut(&'static str),
    Failed(String, String),
    Cancelled,
    TimedOut,
    Interrupted,
}

impl AgentError {
    /// What the user is told; details stay in the server log.
    fn client_message(&self) -> String {
        match self {
            AgentError::Emit(_) | AgentError::Store(_) => {
                "the server could not store the run's progress".into()
            }
            AgentError::Tool { tool, .. } => format!("the {tool} tool failed"),
            AgentError::Llm(err) => err.to_string(),
            AgentError::Cancelled => "cancelled".into(),
            AgentError::TimedOut(agent) => format!("the {agent} agent took too long"),
        }
    }
}

async fn run_agent(
    cx: &AgentContext,
    agent: &dyn Agent,
    state: &mut RunState,
) -> Result<(), AgentError> {
    let name = agent.name();
    let started = Instant::now();
    cx.emitter
        .emit(
            name,
            EventBody::AgentStarted {
                message: format!("{name} agent started"),
            },
        )
        .await?;
    // Inside the run's span (run and request ids), so an agent's log lines say which agent.
    let span = tracing::info_span!("agent", agent = name);
    let work = tracing::Instrument::instrument(agent.run(cx, state), span);
    let outcome = match tokio::time::timeout(cx.ctx.agent_timeout(), work).await {
        Ok(outcome) => outcome,
        Err(_) => Err(AgentError::TimedOut(name)),
    };
    crate::telemetry::agent_finished(name, started.elapsed());
    match outcome {
        Ok(result) => {
            cx.emitter
                .emit(
                    name,
                    EventBody::AgentCompleted {
                        status: "completed".into(),
                        result,
                        execution_time_ms: started.elapsed().as_millis() as u64,
                    },
                )
                .await?;
            Ok(())
        }
        Err(err) => {
            tracing::warn!(agent = name, error = %err, "agent failed");
            if !matches!(err, AgentError::Emit(_)) {
                // Best effort: the run is failing anyway, the terminal event follows.
                let _ = cx
                    .emitter
                    .emit(
                        name,
                        EventBody::AgentError {
                            error_code: err.code().into(),
                            error_message: err.client_message(),
                            recoverable: false,
                        },
                    )
                    .await;
            }
            Err(err)
        }
    }
}

/// Executes a run to its end. Returns the final status.
pub async fn execute(run: RunInstance) -> RunStatus {
    let RunInstance {
        context: cx,
        agents,
        request,
        shutdown,
        slot,
        attempt,
        max_attempts,
        hand_back,
    } = run;
    let started = Instant::now();
    let run_id = cx.ctx.run_id();
    // The claim that handed this run to us already marked it running.
    let mut state = RunState {
        request,
        ..RunState::default()
    };

    let outcome = {
        let pipeline = AssertUnwindSafe(async {
            if attempt > 1 {
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
            cx.emitter
                .emit(
                    SUPERVISOR,
                    EventBody::AgentStarted {
                        message: "Working on your request".into(),
                    },
                )
                .await?;
            for agent in &agents {
                run_agent(&cx, agent.as_ref(), &mut state).await?;
            }
            Ok::<(), AgentError>(())
        })
        .catch_unwind();
        tokio::select! {
            biased;
            _ = cx.ctx.cancellation().cancelled() => Outcome::Cancelled,
            _ = shutdown.cancelled() => Outcome::Interrupted,
            _ = tokio::time::sleep_until(cx.ctx.deadline().into()) => Outcome::TimedOut,
            result = pipeline => match result {
                Ok(Ok(())) => Outcome::Completed,
                Ok(Err(AgentError::Cancelled | AgentError::Llm(crate::llm::LlmError::Cancelled))) => Outcome::Cancelled,
                Ok(Err(AgentError::TimedOut(agent))) => Outcome::AgentTimedOut(agent),
                Ok(Err(err)) => Outcome::Failed(err.code().into(), err.client_message()),
                Err(_) => {
                    tracing::error!(%run_id, "an agent panicked");
                    Outcome::Failed(agent_codes::AGENT_PANICKED.into(), "an agent crashed".into())
                }
            },
        }
    };
    if matches!(outcome, Outcome::Interrupted) && attempt < max_attempts {
        if let Some(hand_back) = &hand_back {
            if handed_back(&cx, hand_back, started).await {
                return RunStatus::Queued;
            }
        }
    }
    finish(&cx, &slot, state, outcome, started).await
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
    let (status, error) = match outcome {
        Outcome::Completed => (RunStatus::Completed, None),
        Outcome::AgentTimedOut(agent) => (
            RunStatus::TimedOut,
            Some((
                agent_codes::TIMED_OUT.into(),
                format!("the {agent} agent took too long"),
            )),
        ),
        Outcome::Failed(code, message) => (RunStatus::Failed, Some((code, message))),
        Outcome::Cancelled => (
            RunStatus::Cancelled,
            Some((agent_codes::CANCELLED.into(), "the run was stopped".into())),
        ),
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
    };
    let report = state.report.clone().unwrap_or_else(|| build_report(&state));

    if status == RunStatus::Completed {
        let message = MessageRecord {
            id: MessageId::generate(),
            thread_id: cx.ctx.thread_id(),
            role: "assistant".into(),
            content: state.answer.clone(),
            metadata: json!({ "run_id": run_id.to_string(), "report": report }),
            created_at_ms: now_ms(),
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
    } else if let Some((code, message)) = &error {
        let _ = cx
            .emitter
            .emit(
                SUPERVISOR,
                EventBody::RunError {
                    error_code: code.clone(),
                    error_message: message.clone(),
                },
            )
            .await;
    }

    let error_text = error
        .as_ref()
        .map(|(code, message)| format!("{code}: {message}"));
    if let Err(err) = cx
        .store
        .set_run_status(run_id, status, error_text.as_deref(), now_ms())
        .await
    {
        tracing::error!(%run_id, error = %err, "could not store the run's final status");
    }
    // The outcome is decided and stored: the user may start the next run on this thread
    // as soon as they see the terminal event.
    slot.mark_finishing();
    let terminal = EventBody::RunFinished {
        status,
        final_response: state.answer,
        result: report,
        execution_time_ms: total_duration_ms,
        error: error.map(|(_, message)| message),
    };
    if let Err(err) = cx.emitter.emit_terminal(SUPERVISOR, terminal).await {
        tracing::error!(%run_id, error = %err, "terminal event was delivered but not stored");
    }
    crate::telemetry::run_finished(status.as_str(), started.elapsed());
    tracing::info!(%run_id, status = status.as_str(), duration_ms = total_duration_ms, "run finished");
    status
}
