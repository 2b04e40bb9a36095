//! Agent events: what a run streams to its user while the agents work.
//!
//! Every event has the same envelope ([`AgentEvent`]): `type`, a per-run `seq` starting at 1
//! with no gaps, the ids it belongs to, the agent that produced it, an RFC 3339 timestamp
//! and a `payload`. For clients written against the original Python system the main payload
//! fields are repeated at top level (`reasoning`, `tool_name`, `results`, `status`...).
//!
//! Agent code never builds an envelope itself: it hands an [`EventBody`] to its emitter,
//! which stamps the ids and the seq. That is what keeps ids from being forged or mixed up.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::threads::RunStatus;

/// Name of the agent that owns the run and sends its first and terminal events.
pub const SUPERVISOR: &str = "supervisor";

/// The pipeline the supervisor runs, in order.
pub const PIPELINE: [&str; 5] = ["triage", "data", "optimization", "actions", "reporting"];

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    AgentStarted,
    AgentThinking,
    ToolExecuting,
    ToolCompleted,
    AgentCompleted,
    PartialResult,
    AgentError,
    /// The full report of a successful run, just before the terminal event.
    FinalReport,
    /// Sent instead of `final_report` when a run fails, is cancelled or times out.
    Error,
    /// The run paused for its user to approve, edit or reject the proposed plan (payload:
    /// [`crate::approval::PendingApproval`]); more events follow once they answer.
    ApprovalRequired,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AgentStarted => "agent_started",
            EventKind::AgentThinking => "agent_thinking",
            EventKind::ToolExecuting => "tool_executing",
            EventKind::ToolCompleted => "tool_completed",
            EventKind::AgentCompleted => "agent_completed",
            EventKind::PartialResult => "partial_result",
            EventKind::AgentError => "agent_error",
            EventKind::FinalReport => "final_report",
            EventKind::Error => "error",
            EventKind::ApprovalRequired => "approval_required",
        }
    }
}

/// The envelope of every agent event on the wire and in the event log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct AgentEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub seq: u64,
    pub run_id: String,
    pub thread_id: String,
    pub user_id: String,
    pub agent_name: String,
    /// RFC 3339, UTC, millisecond precision.
    pub timestamp: String,
    /// The event's fields, by `type` (see `docs/protocol.md`).
    #[schema(value_type = Object)]
    pub payload: Value,
    /// Payload fields repeated at top level for clients of the original system.
    #[serde(flatten)]
    pub compat: Map<String, Value>,
}

impl AgentEvent {
    /// The terminal event: the supervisor's `agent_completed`. Exactly one per run, always last.
    pub fn is_terminal(&self) -> bool {
        self.kind == EventKind::AgentCompleted && self.agent_name == SUPERVISOR
    }

    /// Status of a terminal event (`completed`, `failed`, `cancelled`, `timed_out`...).
    pub fn status(&self) -> Option<&str> {
        self.payload.get("status").and_then(Value::as_str)
    }
}

/// What an agent says; the emitter turns it into an [`AgentEvent`].
#[derive(Debug, Clone, PartialEq)]
pub enum EventBody {
    AgentStarted {
        message: String,
    },
    AgentThinking {
        reasoning: String,
        step_number: u32,
        total_steps: u32,
    },
    ToolExecuting {
        tool_name: String,
        tool_call_id: String,
        parameters: Value,
    },
    ToolCompleted {
        tool_name: String,
        tool_call_id: String,
        result: Value,
        execution_time_ms: u64,
        success: bool,
    },
    AgentCompleted {
        status: String,
        result: Value,
        execution_time_ms: u64,
    },
    PartialResult {
        content: String,
    },
    AgentError {
        error_code: String,
        error_message: String,
        recoverable: bool,
    },
    FinalReport {
        executive_summary: String,
        recommendations: Value,
        action_plan: Value,
        cost_analysis: Value,
        total_duration_ms: u64,
    },
    RunError {
        error_code: String,
        error_message: String,
    },
    /// The run waits for its user's answer to the proposed plan.
    ApprovalRequired(crate::approval::PendingApproval),
    /// The supervisor's terminal `agent_completed`.
    RunFinished {
        status: RunStatus,
        final_response: String,
        result: Value,
        execution_time_ms: u64,
        error: Option<String>,
    },
}

impl EventBody {
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::AgentStarted { .. } => EventKind::AgentStarted,
            EventBody::AgentThinking { .. } => EventKind::AgentThinking,
            EventBody::ToolExecuting { .. } => EventKind::ToolExecuting,
            EventBody::ToolCompleted { .. } => EventKind::ToolCompleted,
            EventBody::AgentCompleted { .. } | EventBody::RunFinished { .. } => {
                EventKind::AgentCompleted
            }
            EventBody::PartialResult { .. } => EventKind::PartialResult,
            EventBody::AgentError { .. } => EventKind::AgentError,
            EventBody::FinalReport { .. } => EventKind::FinalReport,
            EventBody::RunError { .. } => EventKind::Error,
            EventBody::ApprovalRequired(_) => EventKind::ApprovalRequired,
        }
    }

    /// Splits the body into the `payload` object and the top-level compatibility fields.
    /// `message_id` is unique per event so that clients can de-duplicate on it.
    pub fn into_parts(self, message_id: &str) -> (Value, Map<String, Value>) {
        let mut compat = Map::new();
        let mut payload = match self {
            EventBody::AgentStarted { message } => json!({"status": "started", "message": message}),
            EventBody::AgentThinking {
                reasoning,
                step_number,
                total_steps,
            } => {
                compat.insert("reasoning".into(), json!(reasoning));
                let progress = (step_number * 100)
                    .checked_div(total_steps)
                    .map_or(100, |p| p.min(100));
                json!({
                    "reasoning": reasoning,
                    "step_number": step_number,
                    "total_steps": total_steps,
                    "progress_percentage": progress,
                })
            }
            EventBody::ToolExecuting {
                tool_name,
                tool_call_id,
                parameters,
            } => {
                compat.insert("tool_name".into(), json!(tool_name));
                compat.insert("parameters".into(), parameters.clone());
                json!({"tool_name": tool_name, "tool_call_id": tool_call_id, "parameters": parameters})
            }
            EventBody::ToolCompleted {
                tool_name,
                tool_call_id,
                result,
                execution_time_ms,
                success,
            } => {
                compat.insert("tool_name".into(), json!(tool_name));
                compat.insert("results".into(), result.clone());
                compat.insert("duration".into(), json!(execution_time_ms));
                json!({
                    "tool_name": tool_name,
                    "tool_call_id": tool_call_id,
                    "result": result,
                    "execution_time_ms": execution_time_ms,
                    "success": success,
                })
            }
            EventBody::AgentCompleted {
                status,
                result,
                execution_time_ms,
            } => {
                compat.insert("status".into(), json!(status));
                json!({"status": status, "result": result, "execution_time_ms": execution_time_ms})
            }
            EventBody::PartialResult { content } => {
                json!({"content": content, "is_complete": false})
            }
            EventBody::AgentError {
                error_code,
                error_message,
                recoverable,
            } => json!({
                "error_code": error_code,
                "error_message": error_message,
                "recoverable": recoverable,
            }),
            EventBody::FinalReport {
                executive_summary,
                recommendations,
                action_plan,
                cost_analysis,
                total_duration_ms,
            } => json!({
                "executive_summary": executive_summary,
                "recommendations": recommendations,
                "action_plan": action_plan,
                "cost_analysis": cost_analysis,
                "total_duration_ms": total_duration_ms,
            }),
            EventBody::RunError {
                error_code,
                error_message,
            } => json!({"error_code": error_code, "error_message": error_message}),
            EventBody::ApprovalRequired(pending) => json!(pending),
            EventBody::RunFinished {
                status,
                final_response,
                result,
                execution_time_ms,
                error,
            } => {
                compat.insert("status".into(), json!(status.as_str()));
                compat.insert("final_response".into(), json!(final_response));
                json!({
                    "status": status.as_str(),
                    "result": result,
                    "final_response": final_response,
                    "execution_time_ms": execution_time_ms,
                    "error": error,
                })
            }
        };
        if let Value::Object(map) = &mut payload {
            map.insert("message_id".into(), json!(message_id));
        }
        (payload, compat)
    }
}
