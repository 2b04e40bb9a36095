//! Approval of a run's action plan: parking after the actions agent, the user's answer,
//! continuing on any instance, and expiry.
//!
//! A run submitted with `require_approval` (or by a user whose setting asks for it) runs
//! its agents up to and including [`PAUSE_AFTER`]. If the plan has a step that changes
//! something (saves money), the supervisor then
//! 1. records the request for approval in the run's row while it still holds the run: a
//!    [`Checkpoint`] (the request's id and expiry, the plan, and the whole [`RunState`]
//!    the agents produced), so nothing before the pause ever runs again;
//! 2. sends the `approval_required` event;
//! 3. parks the run: status `awaiting_approval`, no instance, no heartbeat. It holds no
//!    execution slot; its thread's later runs wait behind it.
//!
//! The user's answer ([`Runs::decide`], from the socket or REST, on any instance) is
//! stored once ([`StoredDecision`]): a parked run goes back to the queue as a first
//! attempt, and whichever instance claims it continues from the checkpoint (the reporting
//! agent for `approve`/`edit`, no agent at all for `reject`). An answer that arrives
//! between steps 1 and 3 is found by step 3, and the run continues where it is. A run
//! whose instance dies after step 1 is recovered like any other and, claimed again, parks
//! again from its checkpoint (the event is sent again, with the same `approval_id`).
//!
//! A repeated identical answer is accepted again and changes nothing; a different one is
//! `APPROVAL_ALREADY_DECIDED`. Every instance sweeps for requests left unanswered past
//! `approval_timeout` ([`Runs::expire_approvals_periodically`]): the run ends `timed_out`.

use std::sync::Arc;
use std::time::Duration;

use apex_protocol::approval::{
    ApprovalAccepted, ApprovalDecision, ApprovalRequest, PendingApproval, PlanStep, PlanStepChoice,
};
use apex_protocol::error::{agent_codes, ErrorCode};
use apex_protocol::events::{EventBody, SUPERVISOR};
use apex_protocol::threads::RunStatus;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ending::{end_run, restore_superseded, settle, Ending, StatusWrite};
use super::execute::Parking;
use super::Runs;
use crate::agents::{ActionStep, AgentContext, AgentError, RunState};
use crate::auth::AuthenticatedUser;
use crate::clock::{ms_to_rfc3339, now_ms};
use crate::context::UserExecutionContext;
use crate::events::UserEmitter;
use crate::ids::RunId;
use crate::store::{RunApproval, StoreError, StoreResult};
use crate::user_store::UserStore;

/// The agent after which a run that asked for approval parks.
pub(super) const PAUSE_AFTER: &str = "actions";

/// How often each instance looks for requests for approval that expired.
const EXPIRY_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What the user is told when a request for approval expires.
const EXPIRED_MESSAGE: &str = "nobody answered the request for approval of the plan in time";

/// What a parked run stores (`runs.approval`): the request its user sees, and everything
/// the agents before the pause produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Checkpoint {
    pub approval_id: String,
    pub expires_at_ms: i64,
    /// The run's state after [`PAUSE_AFTER`]; its `plan` is the proposal.
    pub state: RunState,
}

impl Checkpoint {
    pub(super) fn new(state: &RunState, timeout: Duration) -> Self {
        let timeout_ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        Self {
            approval_id: format!("appr_{}", uuid::Uuid::new_v4().simple()),
            expires_at_ms: now_ms().saturating_add(timeout_ms),
            state: state.clone(),
        }
    }

    fn parse(value: &Value) -> Result<Self, StoreError> {
        serde_json::from_value(value.clone())
            .map_err(|e| StoreError::Corrupt(format!("stored approval: {e}")))
    }

    /// What the user is asked (the `approval_required` payload).
    pub fn pending(&self) -> PendingApproval {
        let plan: Vec<PlanStep> = self.state.plan.iter().map(plan_step).collect();
        let total: f64 = plan.iter().map(|s| s.expected_monthly_savings_usd).sum();
        PendingApproval {
            approval_id: self.approval_id.clone(),
            plan,
            total_monthly_savings_usd: (total * 100.0).round() / 100.0,
            expires_at: ms_to_rfc3339(self.expires_at_ms),
        }
    }
}

fn plan_step(step: &ActionStep) -> PlanStep {
    PlanStep {
        order: step.order,
        title: step.title.clone(),
        details: step.details.clone(),
        effort: step.effort.clone(),
        expected_monthly_savings_usd: step.expected_monthly_savings_usd,
    }
}

/// The user's answer as stored (`runs.approval_decision`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct StoredDecision {
    pub approval_id: String,
    pub decision: ApprovalDecision,
    /// With `edit`: the proposed steps chosen, by their `order`, in the chosen order
    /// (what tells a repeated answer from a different one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<Vec<u32>>,
}

/// A request for approval is worth making when the plan changes something: a plan whose
/// steps save nothing (only "track the effect") continues without asking.
pub(super) fn worth_approving(plan: &[ActionStep]) -> bool {
    plan.iter()
        .any(|step| step.expected_monthly_savings_usd > 0.0)
}

/// What the run's user is asked, while the request is unanswered (`approval` of
/// `GET /api/runs/{id}`).
pub fn pending_view(approval: &RunApproval) -> Option<PendingApproval> {
    if approval.decision.is_some() {
        return None;
    }
    let checkpoint = Checkpoint::parse(approval.pending.as_ref()?).ok()?;
    Some(checkpoint.pending())
}

/// An edited plan: proposed steps only, each at most once, at least one. Returns their
/// `order`s in the chosen order.
pub(super) fn validate_edit(
    proposed: &[ActionStep],
    chosen: &[PlanStepChoice],
) -> Result<Vec<u32>, String> {
    if chosen.is_empty() {
        return Err("an edited plan keeps at least one step; to carry out none, reject".into());
    }
    let mut orders = Vec::with_capacity(chosen.len());
    for choice in chosen {
        let order = choice.order();
        let Some(step) = proposed.iter().find(|s| s.order == order) else {
            return Err(format!("step {order} was not proposed"));
        };
        if let PlanStepChoice::Step {
            title: Some(title), ..
        } = choice
        {
            if title.trim() != step.title {
                return Err(format!(
                    "step {order} is {:?}; an edit may remove or reorder steps, not change them",
                    step.title
                ));
            }
        }
        if orders.contains(&order) {
            return Err(format!("step {order} is listed twice"));
        }
        orders.push(order);
    }
    Ok(orders)
}

/// Applies the user's answer to the parked state: the plan to carry out (renumbered), the
/// recommendations it keeps, and, for `reject`, the answer. Returns the report's
/// `approval` section.
pub(super) fn apply(decision: &StoredDecision, state: &mut RunState) -> Value {
    let proposed = std::mem::take(&mut state.plan);
    let kept: Vec<ActionStep> = match (decision.decision, &decision.chosen) {
        (ApprovalDecision::Reject, _) => Vec::new(),
        (ApprovalDecision::Edit, Some(orders)) => orders
            .iter()
            .filter_map(|order| proposed.iter().find(|s| s.order == *order).cloned())
            .collect(),
        _ => proposed.clone(),
    };
    let dropped: Vec<&ActionStep> = proposed
        .iter()
        .filter(|s| !kept.iter().any(|k| k.order == s.order))
        .collect();
    // The recommendations the answer talks about are the ones still in the plan.
    state
        .opportunities
        .retain(|o| kept.iter().any(|step| step.title == o.title));
    state.plan = kept
        .into_iter()
        .enumerate()
        .map(|(i, step)| ActionStep {
            order: i as u32 + 1,
            ..step
        })
        .collect();
    if decision.decision == ApprovalDecision::Reject {
        state.answer = rejection_answer(&proposed);
    }
    json!({
        "approval_id": decision.approval_id,
        "decision": decision.decision.as_str(),
        "not_carried_out": dropped.iter().map(|s| &s.title).collect::<Vec<_>>(),
    })
}

/// The answer of a run whose plan was rejected: what was proposed and is not being done.
fn rejection_answer(proposed: &[ActionStep]) -> String {
    let mut text = String::from(
        "You rejected the proposed plan, so none of its changes will be made. \
         What it proposed, and what is not being done:\n",
    );
    let mut forgone = 0.0;
    for step in proposed {
        forgone += step.expected_monthly_savings_usd;
        if step.expected_monthly_savings_usd > 0.0 {
            text.push_str(&format!(
                "\n{}. {} (about ${:.2} a month)",
                step.order, step.title, step.expected_monthly_savings_usd
            ));
        } else {
            text.push_str(&format!("\n{}. {}", step.order, step.title));
        }
    }
    if forgone > 0.0 {
        text.push_str(&format!(
            "\n\nTogether these would have saved about ${forgone:.2} a month. \
             Ask again whenever you want a new plan."
        ));
    } else {
        text.push_str("\n\nAsk again whenever you want a new plan.");
    }
    text
}

/// How a parked run stands when it is claimed (or submitted): see the module docs.
pub(super) enum Resumption {
    /// Runs its agents; parks after [`PAUSE_AFTER`] if `pause` and the plan is worth it.
    Fresh { pause: bool },
    /// Recovered after its instance died between recording the request and its answer:
    /// parks again from the checkpoint.
    Repark(Checkpoint),
    /// Answered: continues from the checkpoint.
    Decided(Checkpoint, StoredDecision),
}

impl Resumption {
    /// Reads the run's stored approval state. A checkpoint that cannot be read fails the
    /// run (it cannot continue), with the error in the log.
    pub(super) fn of(approval: &RunApproval) -> Result<Self, StoreError> {
        let Some(pending) = &approval.pending else {
            return Ok(Resumption::Fresh {
                pause: approval.required,
            });
        };
        let checkpoint = Checkpoint::parse(pending)?;
        Ok(match &approval.decision {
            None => Resumption::Repark(checkpoint),
            Some(decision) => Resumption::Decided(
                checkpoint,
                serde_json::from_value(decision.clone())
                    .map_err(|e| StoreError::Corrupt(format!("stored decision: {e}")))?,
            ),
        })
    }
}

/// How parking a run went.
pub(super) enum Parked {
    /// Parked: its executor leaves it.
    Waiting,
    /// The answer came while it was parking: it continues here.
    Answered(StoredDecision),
}

/// Steps 1 to 3 of the module docs, for the run of `cx`. `recorded`: the request is
/// stored already (a recovered run parking again).
pub(super) async fn park(
    cx: &AgentContext,
    parking: &Parking,
    checkpoint: Checkpoint,
    recorded: bool,
) -> Result<Parked, AgentError> {
    let run_id = cx.ctx.run_id();
    let lost = || {
        AgentError::from(StoreError::Corrupt(
            "the run is no longer this instance's".into(),
        ))
    };
    if !recorded {
        let stored = serde_json::to_value(&checkpoint)
            .map_err(|e| StoreError::Corrupt(format!("approval request: {e}")))?;
        if !parking
            .store
            .request_approval(run_id, &parking.instance, &stored, checkpoint.expires_at_ms)
            .await?
        {
            return Err(lost());
        }
    }
    cx.emitter
        .emit(
            SUPERVISOR,
            EventBody::ApprovalRequired(checkpoint.pending()),
        )
        .await?;
    // Parked, the run may go on elsewhere (from the log's last seq): nothing of it may
    // still be on its way to the log.
    cx.emitter.flush().await?;
    if parking
        .store
        .park_for_approval(run_id, &parking.instance)
        .await?
    {
        return Ok(Parked::Waiting);
    }
    // Answered meanwhile (or no longer ours, which the answer's absence says).
    match cx.store.run_approval(run_id).await? {
        Some((
            _,
            RunApproval {
                decision: Some(decision),
                ..
            },
        )) => Ok(Parked::Answered(serde_json::from_value(decision).map_err(
            |e| StoreError::Corrupt(format!("stored decision: {e}")),
        )?)),
        _ => Err(lost()),
    }
}

/// Why an answer to a request for approval was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("run not found")]
    RunNotFound,
    #[error("{0}")]
    NotPending(String),
    #[error("this request for approval was already answered with {0:?}")]
    AlreadyDecided(&'static str),
    #[error("the request for approval expired; the run ended timed_out")]
    Expired,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApprovalError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ApprovalError::RunNotFound => ErrorCode::RunNotFound,
            ApprovalError::NotPending(_) => ErrorCode::ApprovalNotPending,
            ApprovalError::AlreadyDecided(_) => ErrorCode::ApprovalAlreadyDecided,
            ApprovalError::Expired => ErrorCode::ApprovalExpired,
            ApprovalError::Invalid(_) => ErrorCode::ValidationFailed,
            ApprovalError::Store(_) => ErrorCode::Internal,
        }
    }
}

impl Runs {
    /// Records `user`'s answer to the request for approval of their run `run` (module
    /// docs). A run of another user is a missing one.
    pub async fn decide(
        &self,
        user: &AuthenticatedUser,
        run: RunId,
        answer: &ApprovalRequest,
    ) -> Result<ApprovalAccepted, ApprovalError> {
        let store = UserStore::for_user(Arc::clone(&self.shared.infra.store), user);
        // Twice at most: a first try that loses a race re-reads what won it.
        for _ in 0..2 {
            let (record, approval) = store
                .run_approval(run)
                .await?
                .ok_or(ApprovalError::RunNotFound)?;
            let Some(pending) = &approval.pending else {
                return Err(ApprovalError::NotPending(match record.status {
                    s if s.is_terminal() => {
                        format!("the run ended with status {}", s.as_str())
                    }
                    _ => "this run is not waiting for approval".into(),
                }));
            };
            let checkpoint = Checkpoint::parse(pending)?;
            if answer.approval_id.trim() != checkpoint.approval_id {
                return Err(ApprovalError::NotPending(
                    "approval_id does not name this run's request for approval".into(),
                ));
            }
            let chosen = match answer.decision {
                ApprovalDecision::Edit => {
                    let plan = answer.plan.as_deref().ok_or_else(|| {
                        ApprovalError::Invalid("an edit needs the plan to carry out".into())
                    })?;
                    Some(
                        validate_edit(&checkpoint.state.plan, plan)
                            .map_err(ApprovalError::Invalid)?,
                    )
                }
                _ => None,
            };
            let decision = StoredDecision {
                approval_id: checkpoint.approval_id.clone(),
                decision: answer.decision,
                chosen,
            };
            let accepted = |status: RunStatus| ApprovalAccepted {
                run_id: run.to_string(),
                approval_id: decision.approval_id.clone(),
                decision: decision.decision,
                status,
            };
            if let Some(stored) = &approval.decision {
                let stored: StoredDecision = serde_json::from_value(stored.clone())
                    .map_err(|e| StoreError::Corrupt(format!("stored decision: {e}")))?;
                return if stored == decision {
                    Ok(accepted(record.status))
                } else {
                    Err(ApprovalError::AlreadyDecided(stored.decision.as_str()))
                };
            }
            if record.status == RunStatus::TimedOut || checkpoint.expires_at_ms <= now_ms() {
                return Err(ApprovalError::Expired);
            }
            if record.status.is_terminal() {
                return Err(ApprovalError::NotPending(format!(
                    "the run ended with status {}",
                    record.status.as_str()
                )));
            }
            let stored = serde_json::to_value(&decision)
                .map_err(|e| StoreError::Corrupt(format!("decision: {e}")))?;
            if store.decide_approval(run, &stored, now_ms()).await? {
                tracing::info!(run_id = %run, decision = decision.decision.as_str(), "plan answered");
                // A parked run is queued again: this instance's dispatcher, or any other's,
                // takes it. (Woken even if the run looked still parking when read: it may
                // have parked before the answer was stored.)
                self.wake_dispatcher();
                self.announce().await;
                return Ok(accepted(if record.status == RunStatus::AwaitingApproval {
                    RunStatus::Queued
                } else {
                    RunStatus::Running
                }));
            }
        }
        Err(ApprovalError::NotPending(
            "this run is not waiting for approval".into(),
        ))
    }

    /// Ends every run whose request for approval expired (`timed_out`, with its error and
    /// terminal events). Returns how many.
    pub async fn expire_approvals(&self) -> StoreResult<usize> {
        let infra = &self.shared.infra;
        let error = format!("{}: {EXPIRED_MESSAGE}", agent_codes::TIMED_OUT);
        let expired = infra.store.expire_approvals(now_ms(), &error).await?;
        let mut woken = false;
        for entry in &expired {
            let run = &entry.run;
            let ctx = UserExecutionContext::for_recovery(entry.owner, run.thread_id, run.id);
            let user_store = UserStore::for_context(Arc::clone(&infra.store), &ctx);
            restore_superseded(&user_store, run.id).await;
            let emitter = UserEmitter::resuming(
                &ctx,
                Arc::clone(&infra.store),
                Arc::clone(&infra.bus),
                run.last_seq,
            );
            let ending = Ending::bare(RunStatus::TimedOut, agent_codes::TIMED_OUT, EXPIRED_MESSAGE);
            if let Err(err) = end_run(&emitter, StatusWrite::AlreadyStored, ending, || {}).await {
                tracing::error!(run_id = %run.id, error = %err, "could not end a run whose approval expired");
            }
            tracing::info!(run_id = %run.id, "request for approval expired");
            woken |= settle(&user_store, run.id).await;
        }
        if woken {
            self.wake_dispatcher();
        }
        Ok(expired.len())
    }

    /// [`Runs::expire_approvals`] every [`EXPIRY_SWEEP_EVERY`] until the server drains.
    pub async fn expire_approvals_periodically(self) {
        let draining = self.shared.lifecycle.draining.clone();
        loop {
            if let Err(err) = self.expire_approvals().await {
                tracing::error!(error = %err, "expiring requests for approval failed");
            }
            tokio::select! {
                _ = draining.cancelled() => return,
                _ = tokio::time::sleep(EXPIRY_SWEEP_EVERY) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(order: u32, title: &str, savings: f64) -> ActionStep {
        ActionStep {
            order,
            title: title.into(),
            details: String::new(),
            effort: "low".into(),
            expected_monthly_savings_usd: savings,
        }
    }

    #[test]
    fn an_edit_may_remove_and_reorder_proposed_steps_only() {
        let proposed = [
            step(1, "Route", 40.0),
            step(2, "Cache", 10.0),
            step(3, "Track", 0.0),
        ];
        assert_eq!(
            validate_edit(
                &proposed,
                &[PlanStepChoice::Order(2), PlanStepChoice::Order(1)]
            ),
            Ok(vec![2, 1])
        );
        let named = PlanStepChoice::Step {
            order: 1,
            title: Some("Route".into()),
        };
        assert_eq!(validate_edit(&proposed, &[named]), Ok(vec![1]));
        assert!(validate_edit(&proposed, &[PlanStepChoice::Order(4)]).is_err());
        assert!(validate_edit(&proposed, &[]).is_err());
        assert!(validate_edit(
            &proposed,
            &[PlanStepChoice::Order(1), PlanStepChoice::Order(1)]
        )
        .is_err());
        let renamed = PlanStepChoice::Step {
            order: 1,
            title: Some("Do something else".into()),
        };
        assert!(validate_edit(&proposed, &[renamed]).is_err());
    }

    #[test]
    fn an_edited_plan_is_renumbered_and_keeps_only_its_recommendations() {
        let mut state = RunState {
            plan: vec![step(1, "Route", 40.0), step(2, "Cache", 10.0)],
            ..RunState::default()
        };
        for title in ["Route", "Cache"] {
            state.opportunities.push(crate::agents::Opportunity {
                strategy: title.to_lowercase(),
                title: title.into(),
                description: String::new(),
                workloads: vec![],
                monthly_savings_usd: 1.0,
                effort: "low".into(),
            });
        }
        let decision = StoredDecision {
            approval_id: "a".into(),
            decision: ApprovalDecision::Edit,
            chosen: Some(vec![2]),
        };
        let section = apply(&decision, &mut state);
        assert_eq!(state.plan.len(), 1);
        assert_eq!(
            (state.plan[0].order, state.plan[0].title.as_str()),
            (1, "Cache")
        );
        assert_eq!(state.opportunities.len(), 1);
        assert_eq!(section["not_carried_out"], json!(["Route"]));
    }

    #[test]
    fn a_rejection_says_what_is_not_done_and_carries_out_nothing() {
        let mut state = RunState {
            plan: vec![step(1, "Route", 40.0), step(2, "Track", 0.0)],
            ..RunState::default()
        };
        let decision = StoredDecision {
            approval_id: "a".into(),
            decision: ApprovalDecision::Reject,
            chosen: None,
        };
        apply(&decision, &mut state);
        assert!(state.plan.is_empty());
        assert!(state.answer.contains("Route"), "{}", state.answer);
        assert!(state.answer.contains("$40.00"), "{}", state.answer);
        assert!(!worth_approving(&[step(1, "Track", 0.0)]));
    }
}
