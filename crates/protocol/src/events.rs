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
        let kind = self.kind();
        let mut payload = match self {
            EventBody::AgentStarted { message } => json!({"status": "started", "message": message}),
            EventBody::AgentThinking {
                reasoning,
                step_number,
                total_steps,
            } => {
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
                json!({"tool_name": tool_name, "tool_call_id": tool_call_id, "parameters": parameters})
            }
            EventBody::ToolCompleted {
                tool_name,
                tool_call_id,
                result,
                execution_time_ms,
                success,
            } => {
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
        let compat = compat_fields(kind, &payload);
        (payload, compat)
    }
}

/// The `message_id` of event `seq` of run `run_id`: unique per event, so that clients can
/// de-duplicate on it. Derived, never stored: the log rebuilds it on replay.
pub fn message_id(run_id: &str, seq: u64) -> String {
    format!("{run_id}-{seq}")
}

/// The top-level fields the original system's clients read, copied from the payload. They
/// are a function of the payload alone, so the event log does not keep them.
fn compat_fields(kind: EventKind, payload: &Value) -> Map<String, Value> {
    let mut compat = Map::new();
    let mut copy = |to: &str, from: &str| {
        if let Some(value) = payload.get(from) {
            compat.insert(to.to_string(), value.clone());
        }
    };
    match kind {
        EventKind::AgentThinking => copy("reasoning", "reasoning"),
        EventKind::ToolExecuting => {
            copy("tool_name", "tool_name");
            copy("parameters", "parameters");
        }
        EventKind::ToolCompleted => {
            copy("tool_name", "tool_name");
            copy("results", "result");
            copy("duration", "execution_time_ms");
        }
        EventKind::AgentCompleted => {
            copy("status", "status");
            // Only the supervisor's terminal event carries a final response.
            copy("final_response", "final_response");
        }
        _ => {}
    }
    compat
}

/// How the event log keeps an event: the envelope less everything that can be rebuilt.
/// The run and the seq are the log row's key, the thread and the user are the run's, the
/// `message_id` follows from run and seq, and the compatibility fields from the payload.
/// What is left is about half the wire form's bytes, which is half the pages SQLite (or
/// PostgreSQL) writes per event. The short keys also tell this form apart from logs
/// written before it existed, which hold the wire form itself.
#[derive(Serialize, Deserialize)]
/// `S` is `&str` when writing (no copies per event) and `String` when reading.
struct LogForm<S, P> {
    #[serde(rename = "k")]
    kind: EventKind,
    #[serde(rename = "a")]
    agent_name: S,
    #[serde(rename = "t")]
    timestamp: S,
    #[serde(rename = "p")]
    payload: P,
}

/// An object serialised without its `message_id` (see [`LogForm`]).
struct WithoutMessageId<'a>(&'a Value);

impl Serialize for WithoutMessageId<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Value::Object(map) = self.0 else {
            return self.0.serialize(serializer);
        };
        let mut out = serializer.serialize_map(None)?;
        for (key, value) in map.iter().filter(|(key, _)| *key != "message_id") {
            out.serialize_entry(key, value)?;
        }
        out.end()
    }
}

/// The ids that the event log's rows do not repeat, given back to rebuild an event.
#[derive(Debug, Clone, Copy)]
pub struct LogIds<'a> {
    pub run_id: &'a str,
    pub thread_id: &'a str,
    pub user_id: &'a str,
}

impl AgentEvent {
    /// The text the event log stores for this event (see [`LogForm`]).
    pub fn to_log_json(&self) -> serde_json::Result<String> {
        serde_json::to_string(&LogForm {
            kind: self.kind,
            agent_name: self.agent_name.as_str(),
            timestamp: self.timestamp.as_str(),
            payload: WithoutMessageId(&self.payload),
        })
    }

    /// Rebuilds event `seq` from the text [`Self::to_log_json`] stored. `None` when the
    /// text is not in that form: logs written before it existed hold the wire form.
    pub fn from_log_json(stored: &str, seq: u64, ids: LogIds<'_>) -> Option<AgentEvent> {
        let LogForm {
            kind,
            agent_name,
            timestamp,
            mut payload,
        } = serde_json::from_str::<LogForm<String, Value>>(stored).ok()?;
        if let Value::Object(map) = &mut payload {
            map.insert("message_id".into(), json!(message_id(ids.run_id, seq)));
        }
        let compat = compat_fields(kind, &payload);
        Some(AgentEvent {
            kind,
            seq,
            run_id: ids.run_id.to_string(),
            thread_id: ids.thread_id.to_string(),
            user_id: ids.user_id.to_string(),
            agent_name,
            timestamp,
            payload,
            compat,
        })
    }

    /// The wire text of a stored event: rebuilt from the log form, or the stored text
    /// itself when it already is the wire form (or anything else: it is passed on as is).
    pub fn wire_json_from_log(stored: String, seq: u64, ids: LogIds<'_>) -> String {
        match Self::from_log_json(&stored, seq, ids).map(|event| serde_json::to_string(&event)) {
            Some(Ok(wire)) => wire,
            _ => stored,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::{PendingApproval, PlanStep};

    const IDS: LogIds<'static> = LogIds {
        run_id: "5d0c3c52-95a4-4a0e-9d7b-6f1b0f5a2e11",
        thread_id: "0b6f3f7e-2d0a-4c55-8f0e-3f1c1c2a9a77",
        user_id: "9a1e7c3d-6b5f-4e2a-8c4d-1e2f3a4b5c6d",
    };

    /// One of every body, with nested values, floats and text that needs escaping.
    fn every_body() -> Vec<(&'static str, EventBody)> {
        let figures =
            json!({"total_cost_usd": 3.27, "by_model": [{"model": "gpt-4o", "cost": 0.1 + 0.2}]});
        vec![
            (
                SUPERVISOR,
                EventBody::AgentStarted {
                    message: "Analysing \"your\" usage\n".into(),
                },
            ),
            (
                "triage",
                EventBody::AgentThinking {
                    reasoning: "Reading the week".into(),
                    step_number: 1,
                    total_steps: 3,
                },
            ),
            (
                "data",
                EventBody::ToolExecuting {
                    tool_name: "usage_summary".into(),
                    tool_call_id: "call-1".into(),
                    parameters: json!({"days": 7, "ends_days_ago": 7}),
                },
            ),
            (
                "data",
                EventBody::ToolCompleted {
                    tool_name: "usage_summary".into(),
                    tool_call_id: "call-1".into(),
                    result: figures.clone(),
                    execution_time_ms: 12,
                    success: true,
                },
            ),
            (
                "data",
                EventBody::AgentCompleted {
                    status: "completed".into(),
                    result: figures.clone(),
                    execution_time_ms: 40,
                },
            ),
            (
                "reporting",
                EventBody::PartialResult {
                    content: "You spent $3.27 ".into(),
                },
            ),
            (
                "actions",
                EventBody::AgentError {
                    error_code: "TOOL_FAILED".into(),
                    error_message: "no rows".into(),
                    recoverable: true,
                },
            ),
            (
                "reporting",
                EventBody::FinalReport {
                    executive_summary: "Cut costs".into(),
                    recommendations: json!([{"title": "Cache"}]),
                    action_plan: json!([]),
                    cost_analysis: figures,
                    total_duration_ms: 900,
                },
            ),
            (
                SUPERVISOR,
                EventBody::RunError {
                    error_code: "LLM_UNAVAILABLE".into(),
                    error_message: "down".into(),
                },
            ),
            (
                "actions",
                EventBody::ApprovalRequired(PendingApproval {
                    approval_id: "ap-1".into(),
                    plan: vec![PlanStep {
                        order: 1,
                        title: "Route to a smaller model".into(),
                        details: "d".into(),
                        effort: "low".into(),
                        expected_monthly_savings_usd: 1.5,
                    }],
                    total_monthly_savings_usd: 1.5,
                    expires_at: "2026-12-07T16:00:00.000Z".into(),
                }),
            ),
            (
                SUPERVISOR,
                EventBody::RunFinished {
                    status: RunStatus::Completed,
                    final_response: "You spent $3.27.".into(),
                    result: json!({"ok": true}),
                    execution_time_ms: 950,
                    error: None,
                },
            ),
        ]
    }

    fn wire_event(seq: u64, agent_name: &str, body: EventBody) -> AgentEvent {
        let kind = body.kind();
        let (payload, compat) = body.into_parts(&message_id(IDS.run_id, seq));
        AgentEvent {
            kind,
            seq,
            run_id: IDS.run_id.into(),
            thread_id: IDS.thread_id.into(),
            user_id: IDS.user_id.into(),
            agent_name: agent_name.into(),
            timestamp: "2026-12-07T15:40:01.123456Z".into(),
            payload,
            compat,
        }
    }

    #[test]
    fn the_log_form_rebuilds_the_wire_form_byte_for_byte() {
        for (seq, (agent, body)) in (1..).zip(every_body()) {
            let event = wire_event(seq, agent, body);
            let wire = serde_json::to_string(&event).unwrap();
            let log = event.to_log_json().unwrap();
            assert!(log.len() < wire.len(), "{log} is not shorter than {wire}");
            assert!(
                !log.contains(IDS.run_id) && !log.contains(IDS.user_id),
                "{log}"
            );
            assert_eq!(
                AgentEvent::from_log_json(&log, seq, IDS),
                Some(event.clone())
            );
            assert_eq!(AgentEvent::wire_json_from_log(log, seq, IDS), wire);
        }
    }

    #[test]
    fn the_compatibility_fields_follow_from_the_payload() {
        let compat = wire_event(4, "data", every_body().swap_remove(3).1).compat;
        assert_eq!(compat["tool_name"], "usage_summary");
        assert_eq!(compat["duration"], 12);
        assert_eq!(compat["results"]["total_cost_usd"], 3.27);
        let finished = wire_event(11, SUPERVISOR, every_body().swap_remove(10).1);
        assert_eq!(finished.compat["status"], "completed");
        assert_eq!(finished.compat["final_response"], "You spent $3.27.");
        let step = wire_event(5, "data", every_body().swap_remove(4).1);
        assert!(
            !step.compat.contains_key("final_response"),
            "{:?}",
            step.compat
        );
    }

    #[test]
    fn text_in_any_other_form_is_passed_on_as_it_is() {
        let legacy =
            serde_json::to_string(&wire_event(1, "triage", every_body().swap_remove(1).1)).unwrap();
        for stored in [
            legacy.as_str(),
            "{}",
            "not json",
            r#"{"k":"no_such_kind","a":"x","t":"","p":{}}"#,
        ] {
            assert_eq!(AgentEvent::from_log_json(stored, 1, IDS), None, "{stored}");
            assert_eq!(
                AgentEvent::wire_json_from_log(stored.to_string(), 1, IDS),
                stored
            );
        }
    }
}
