//! Threads, their messages and runs as the REST API shows them.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A conversation. Owned by exactly one user; other users get 404 for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Thread {
    pub id: String,
    pub title: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// RFC 3339, UTC.
    pub updated_at: String,
    pub message_count: i64,
    /// Client-defined JSON object (at most 16 KiB).
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateThreadRequest {
    /// At most 200 characters; empty or absent gives "New conversation".
    #[serde(default)]
    pub title: Option<String>,
    /// A JSON object of at most 16 KiB.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

/// `PATCH /api/threads/{id}`: absent fields are left alone; `metadata` is merged key by key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UpdateThreadRequest {
    #[serde(default)]
    pub title: Option<String>,
    /// Merged into the stored object; a key set to `null` is removed.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Message {
    pub id: String,
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    /// Unix seconds.
    pub created_at: i64,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
    /// An answer that was regenerated (`POST /api/threads/{id}/regenerate`): kept in
    /// history, but no longer the thread's answer to its question.
    #[serde(default)]
    pub superseded: bool,
    /// With `superseded`: the run that answers the question again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MessagesPage {
    pub thread_id: String,
    pub messages: Vec<Message>,
    pub total: i64,
    pub limit: i64,
    pub offset: i64,
}

/// `POST /api/threads/{id}/runs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StartRunRequest {
    /// 1 to 16,000 characters.
    #[schema(example = "How can I reduce my LLM costs?")]
    pub message: String,
    /// What to do if the thread's previous run is still going (double-texting); absent:
    /// the server's `default_multitask_strategy` (`enqueue` unless configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multitask_strategy: Option<MultitaskStrategy>,
    /// Pause after the actions agent until the user approves, edits or rejects the
    /// proposed plan (`approval_required` event); absent: the user's setting
    /// (`GET /api/settings`, off unless changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_approval: Option<bool>,
}

/// What a message sent to a thread whose run is still going (queued or running, on any
/// instance) does with that run: LangGraph's double-texting strategies.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MultitaskStrategy {
    /// The new run waits in the queue behind the thread's unfinished runs and starts when
    /// the last of them has ended.
    Enqueue,
    /// The thread's unfinished runs end `interrupted` (their events kept), then the new
    /// run starts.
    Interrupt,
    /// The thread's unfinished runs are stopped and removed (their user message, events
    /// and run row), then the new run starts.
    Rollback,
    /// The message is refused with `THREAD_BUSY` / `409 thread_busy`.
    Reject,
}

impl MultitaskStrategy {
    /// Every strategy, in the order the documentation lists them.
    pub const ALL: [MultitaskStrategy; 4] = [
        MultitaskStrategy::Enqueue,
        MultitaskStrategy::Interrupt,
        MultitaskStrategy::Rollback,
        MultitaskStrategy::Reject,
    ];

    /// The wire (and stored) name.
    pub fn as_str(self) -> &'static str {
        match self {
            MultitaskStrategy::Enqueue => "enqueue",
            MultitaskStrategy::Interrupt => "interrupt",
            MultitaskStrategy::Rollback => "rollback",
            MultitaskStrategy::Reject => "reject",
        }
    }

    /// The strategy named `name` (exactly a wire name).
    pub fn parse(name: &str) -> Option<MultitaskStrategy> {
        Self::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// Whether the thread's unfinished runs are ended for the new one.
    pub fn ends_previous(self) -> bool {
        matches!(
            self,
            MultitaskStrategy::Interrupt | MultitaskStrategy::Rollback
        )
    }
}

/// Answer of `POST /api/threads/{id}/runs` (202) and of `POST /api/runs/{id}/cancel`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunAccepted {
    pub run_id: String,
    pub thread_id: String,
    pub status: RunStatus,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
    /// The server stopped (crash or shutdown) while the run was in flight.
    Interrupted,
    /// Paused after the actions agent until its user answers the `approval_required`
    /// event; holds no execution slot meanwhile. Not terminal.
    AwaitingApproval,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Interrupted => "interrupted",
            RunStatus::AwaitingApproval => "awaiting_approval",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "completed" => RunStatus::Completed,
            "failed" => RunStatus::Failed,
            "cancelled" => RunStatus::Cancelled,
            "timed_out" => RunStatus::TimedOut,
            "interrupted" => RunStatus::Interrupted,
            "awaiting_approval" => RunStatus::AwaitingApproval,
            _ => return None,
        })
    }

    /// A terminal run never changes status again.
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            RunStatus::Queued | RunStatus::Running | RunStatus::AwaitingApproval
        )
    }
}

/// `GET /api/runs/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Run {
    pub id: String,
    pub thread_id: String,
    pub status: RunStatus,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    /// Highest event seq stored for this run.
    pub last_seq: u64,
    /// With status `awaiting_approval`: what the user is asked to approve (the same as
    /// the `approval_required` event's payload), so a client that reloads can answer it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<crate::approval::PendingApproval>,
}

/// `GET /api/runs/{id}/events?after_seq=N`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunEventsPage {
    pub run_id: String,
    pub events: Vec<crate::events::AgentEvent>,
}
