//! WebSocket frames other than agent events, and the close codes the server uses.
//!
//! Server → client frames are JSON objects with a `type`. Agent events ([`crate::events`])
//! travel on the same socket; [`ServerFrame`] parses either kind on the client side.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::events::AgentEvent;
use crate::threads::Message;

/// Close code sent when authentication fails (policy violation).
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
/// Close code sent when a client frame exceeds the size limit.
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;
/// Close code sent when the server shuts down.
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code sent after a client's `disconnect` frame.
pub const CLOSE_NORMAL: u16 = 1000;

/// Non-event frames the server sends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ControlFrame {
    ConnectionEstablished {
        data: ConnectionInfo,
        timestamp: String,
    },
    /// The server created a thread for a message that named none.
    ThreadCreated {
        thread_id: String,
        timestamp: String,
    },
    /// A message was stored and a run queued for it. `status` is `queued`: the run's
    /// `agent_started` event marks its start (behind the thread's earlier runs, with
    /// `multitask_strategy: "enqueue"`).
    RunAccepted {
        run_id: String,
        thread_id: String,
        message_id: String,
        status: crate::threads::RunStatus,
        timestamp: String,
    },
    ThreadData {
        thread_id: String,
        messages: Vec<Message>,
        timestamp: String,
    },
    /// `resume` asked for events the server no longer keeps (see event retention): the
    /// client should reload the thread (`get_thread_history`) instead of replaying.
    ResumeGap {
        run_id: String,
        after_seq: u64,
        /// Highest seq the run had; the events up to it are gone.
        last_seq: u64,
        message: String,
        timestamp: String,
    },
    /// Answer to `approval`: the decision is stored and the run continues (or ends, for
    /// `reject`) wherever an instance has room.
    ApprovalAccepted {
        run_id: String,
        approval_id: String,
        decision: crate::approval::ApprovalDecision,
        status: crate::threads::RunStatus,
        timestamp: String,
    },
    /// Answer to `stop_agent` once cancellation has been requested.
    StopAcknowledged {
        run_id: String,
        timestamp: String,
    },
    Pong {
        timestamp: String,
    },
    /// The server is shutting down; the socket closes with 1001 right after.
    ServerShutdown {
        timestamp: String,
    },
    HeartbeatAck {
        timestamp: String,
    },
    ErrorMessage {
        error_code: String,
        error_message: String,
        /// With `RATE_LIMITED`: how long to wait before trying again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        timestamp: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ConnectionInfo {
    pub connection_id: String,
    pub user_id: String,
    pub protocol_version: u32,
}

/// Any frame the server may send; used by clients to parse the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerFrame {
    Event(Box<AgentEvent>),
    Control(ControlFrame),
    /// A frame this client version does not know; kept raw so clients can ignore it.
    Unknown(Value),
}

impl ServerFrame {
    pub fn parse(text: &str) -> Result<ServerFrame, serde_json::Error> {
        let value: Value = serde_json::from_str(text)?;
        if value.get("seq").is_some() && value.get("run_id").is_some() {
            if let Ok(event) = serde_json::from_value::<AgentEvent>(value.clone()) {
                return Ok(ServerFrame::Event(Box::new(event)));
            }
        }
        match serde_json::from_value::<ControlFrame>(value.clone()) {
            Ok(frame) => Ok(ServerFrame::Control(frame)),
            Err(_) => Ok(ServerFrame::Unknown(value)),
        }
    }
}
