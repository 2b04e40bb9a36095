//! The pipeline: the five agents in order, each announced, timed and reported.
//!
//! [`run_pipeline`] runs the agents of one run over its [`RunState`], emitting each agent's
//! `agent_started`, then `agent_completed` or `agent_error`. It knows nothing of how the
//! run was started or how it ends: the supervisor (`run::execute`) runs it under the
//! run's deadline, stop and shutdown, and writes the ending.

use std::time::Instant;

use apex_protocol::events::EventBody;

use super::{Agent, AgentContext, AgentError, RunState};

impl AgentError {
    /// What the user is told; details stay in the server log.
    pub fn client_message(&self) -> String {
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

/// Runs one agent: `agent_started`, the work under the agent's time limit, then
/// `agent_completed` or `agent_error`.
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

/// Runs `agents` in order over `state`; stops at the first that fails.
pub async fn run_pipeline(
    cx: &AgentContext,
    agents: &[Box<dyn Agent>],
    state: &mut RunState,
) -> Result<(), AgentError> {
    for agent in agents {
        run_agent(cx, agent.as_ref(), state).await?;
    }
    Ok(())
}
