//! Approval of a run's action plan, and the user settings that ask for it.
//!
//! A run asked to wait for approval (`require_approval`, or the user's setting) stops after
//! the actions agent with an `approval_required` event whose payload is a
//! [`PendingApproval`]; its status is `awaiting_approval`. The user answers with an
//! [`ApprovalRequest`] (WebSocket frame `approval`, or `POST /api/runs/{id}/approval`):
//! approve, edit (a subset of the proposed steps, in a new order) or reject. The server
//! answers [`ApprovalAccepted`] (the socket's `approval_accepted` frame).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::threads::RunStatus;

/// One step of a proposed plan, as the `approval_required` event shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PlanStep {
    /// The step's number in the proposal (1-based); an edit names steps by it.
    pub order: u32,
    pub title: String,
    pub details: String,
    /// `low`, `medium` or `high`.
    pub effort: String,
    /// What the step is expected to save per month, in USD, on the user's own usage.
    pub expected_monthly_savings_usd: f64,
}

/// What a run waits for while its status is `awaiting_approval`: the payload of its
/// `approval_required` event, and `approval` in `GET /api/runs/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PendingApproval {
    /// Names this request for approval; the answer must carry it.
    pub approval_id: String,
    /// The proposed plan, in order.
    pub plan: Vec<PlanStep>,
    /// The sum of the steps' expected monthly savings, in USD.
    pub total_monthly_savings_usd: f64,
    /// RFC 3339, UTC: unanswered by then, the run ends `timed_out`.
    pub expires_at: String,
}

/// The user's answer to an approval request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalDecision {
    /// Carry out the plan as proposed: the run continues with its report.
    Approve,
    /// Carry out `plan` instead: some of the proposed steps, possibly reordered.
    Edit,
    /// Carry out nothing: the run ends `completed` with an answer saying what was not done.
    Reject,
}

impl ApprovalDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalDecision::Approve => "approve",
            ApprovalDecision::Edit => "edit",
            ApprovalDecision::Reject => "reject",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [Self::Approve, Self::Edit, Self::Reject]
            .into_iter()
            .find(|d| d.as_str() == name)
    }
}

/// A step of an edited plan: the proposed step's `order`, alone or as a step object
/// (whose `title`, if given, must be the proposed step's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum PlanStepChoice {
    Order(u32),
    Step {
        order: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
    },
}

impl PlanStepChoice {
    /// The proposed step this names.
    pub fn order(&self) -> u32 {
        match self {
            PlanStepChoice::Order(order) | PlanStepChoice::Step { order, .. } => *order,
        }
    }
}

/// `POST /api/runs/{id}/approval`, and the WebSocket frame `approval` (with `run_id`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ApprovalRequest {
    /// From the `approval_required` event.
    pub approval_id: String,
    pub decision: ApprovalDecision,
    /// With `edit`: the steps to carry out, in order; only proposed steps, each at most
    /// once, at least one. Ignored otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Vec<PlanStepChoice>>,
}

/// Answer to an approval (202; the same again for a repeated identical answer).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ApprovalAccepted {
    pub run_id: String,
    pub approval_id: String,
    pub decision: ApprovalDecision,
    /// The run's status as of the answer: `queued` (it continues as soon as an instance
    /// has room), or `running` when the answer came while it was still pausing (it
    /// continues there), or its final status if it has ended since.
    pub status: RunStatus,
}

/// `GET` / `PUT /api/settings`: the caller's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UserSettings {
    /// Runs whose message does not say otherwise wait for approval of their action plan.
    #[serde(default)]
    pub require_approval: bool,
}
