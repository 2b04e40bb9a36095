//! The agents and what they share within one run.
//!
//! - [`factory::AgentInstanceFactory`] builds everything per-run from a context.
//! - [`pipeline`] runs the agents in order (the supervisor around it, which starts and
//!   ends runs, is `run::execute`).
//! - [`triage`], [`data`], [`optimization`], [`actions`], [`reporting`]: the pipeline.
//! - [`AgentContext`] is an agent's whole view of the world: the run's context, its
//!   emitter, its user-scoped store, the LLM (with the template writer as its fallback)
//!   and the pricing table. Agents hold no state
//!   between runs; results flow from one agent to the next through [`RunState`].

pub mod actions;
pub mod answer;
pub mod conversation;
pub mod data;
pub mod factory;
pub mod optimization;
pub mod pipeline;
pub mod reporting;
pub mod triage;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use apex_protocol::error::agent_codes;
use apex_protocol::events::EventBody;
use apex_protocol::usage::UsageSummary;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::context::UserExecutionContext;
use crate::events::{EmitError, UserEmitter};
use crate::llm::{LlmError, LlmProvider, TokenUsage};
use crate::store::{StoreError, UsageRow};
use crate::usage::llm_calls::LlmCall;
use crate::usage::price_book::PriceBook;
use crate::usage::pricing::PricingTable;
use crate::user_store::UserStore;

pub use factory::{AgentInstanceFactory, Infrastructure, RunInstance};
pub use pipeline::run_pipeline;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Emit(#[from] EmitError),
    #[error("tool {tool} failed: {message}")]
    Tool { tool: String, message: String },
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
    #[error("cancelled")]
    Cancelled,
    #[error("agent {0} exceeded its time limit")]
    TimedOut(&'static str),
}

impl AgentError {
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::Emit(_) | AgentError::Store(_) => agent_codes::STORAGE_FAILED,
            AgentError::Tool { .. } => agent_codes::TOOL_FAILED,
            AgentError::Llm(LlmError::Cancelled) | AgentError::Cancelled => agent_codes::CANCELLED,
            AgentError::Llm(_) => agent_codes::LLM_FAILED,
            AgentError::TimedOut(_) => agent_codes::TIMED_OUT,
        }
    }
}

/// What the user asked about, decided by triage.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RequestCategory {
    CostOptimization,
    LatencyPerformance,
    ModelSelection,
    UsageReport,
    General,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Triage {
    pub category: RequestCategory,
    /// Models the request (or the thread's earlier question) names: the pricing table's
    /// and the user's own.
    pub models: Vec<String>,
    /// Analysis window in days (from "last week", "past 14 days"...; default 30).
    pub days: u32,
    /// The user's workloads the request (or the thread's earlier question) names.
    #[serde(default)]
    pub workloads: Vec<String>,
    /// The plan step the request asks about ("explain step 2"); `u32::MAX` is "the last".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// Whether the request was read together with the thread's previous question.
    #[serde(default)]
    pub follow_up: bool,
    /// How many days before now the window ends: a follow-up about "the week before" moves
    /// the window back past the one the thread discussed. 0: it ends now.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ends_days_ago: u32,
}

/// What `opportunities` save per month together, in USD. Folded from `0.0` rather than
/// `Iterator::sum`, whose empty sum of floats is `-0.0`: a run with nothing to save said
/// "Found 0 opportunities worth about $-0.00/month" and reported `-0.0`.
pub(crate) fn total_savings(opportunities: &[Opportunity]) -> f64 {
    opportunities
        .iter()
        .fold(0.0, |total, o| total + o.monthly_savings_usd)
}

/// A day in milliseconds: the unit [`Triage::ends_days_ago`] moves a window back by.
pub(crate) const DAY_MS: i64 = 24 * 3600 * 1000;

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The window as the answer names it: "the last 7 days" ("the last day" for one), or for
/// a window that ends earlier, "the 7 days before the last 7".
pub fn period_phrase(days: u64, ends_days_ago: u64) -> String {
    let span = if days == 1 {
        "day".to_string()
    } else {
        format!("{days} days")
    };
    match ends_days_ago {
        0 => format!("the last {span}"),
        1 => format!("the {span} before yesterday"),
        ago => format!("the {span} before the last {ago}"),
    }
}

/// One way to save money, with its projected monthly effect on this user's bill.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Opportunity {
    /// `model_routing`, `prompt_caching`, `batching` or `output_caps`.
    pub strategy: String,
    pub title: String,
    pub description: String,
    pub workloads: Vec<String>,
    pub monthly_savings_usd: f64,
    /// `low`, `medium` or `high`.
    pub effort: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActionStep {
    pub order: u32,
    pub title: String,
    pub details: String,
    pub effort: String,
    pub expected_monthly_savings_usd: f64,
}

/// Results passed down the pipeline, one field per agent. Serializable: a run that pauses
/// for approval of its plan stores it, and continues from it (see `run::approval`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunState {
    pub request: String,
    /// The thread's earlier turns, oldest first (bounded; see [`conversation`]).
    pub history: Vec<conversation::Turn>,
    pub triage: Option<Triage>,
    pub usage: Option<UsageSummary>,
    /// The usage window the data agent read, for the optimization agent (which takes it).
    /// Not stored with the rest: a run continued from its stored state reads it again.
    #[serde(skip)]
    pub usage_window: Option<crate::usage::ReadWindow>,
    pub opportunities: Vec<Opportunity>,
    pub plan: Vec<ActionStep>,
    /// The structured report (what `payload.result` of the terminal event carries).
    pub report: Option<Value>,
    /// The answer text, as streamed.
    pub answer: String,
}

/// One step of the pipeline.
#[async_trait]
pub trait Agent: Send + Sync {
    fn name(&self) -> &'static str;
    /// Does the agent's work; the returned value is its `agent_completed` result.
    async fn run(&self, cx: &AgentContext, state: &mut RunState) -> Result<Value, AgentError>;
}

/// An agent's view of its run. Built by the factory; see the module docs.
pub struct AgentContext {
    pub ctx: Arc<UserExecutionContext>,
    pub emitter: Arc<UserEmitter>,
    pub store: UserStore,
    /// The configured provider.
    pub llm: Arc<dyn LlmProvider>,
    /// The template writer, used when `llm` fails (or when it is the configured one).
    pub fallback: Arc<dyn LlmProvider>,
    /// Triage may ask `llm` for a structured classification.
    pub llm_triage: bool,
    pub pricing: Arc<PricingTable>,
    /// Costs the run's own LLM requests (with the user's rates, at the end of the run).
    pub price_book: Arc<PriceBook>,
    /// For budget warnings to the user's sockets (run events go through `emitter`).
    pub bus: Arc<dyn crate::events::EventBus>,
    /// This run's LLM requests, added to the user's usage data when the run ends (see
    /// [`AgentContext::record_llm_usage`]). Per run, like everything here.
    pub llm_usage: std::sync::Mutex<Vec<UsageRow>>,
    /// The user's negotiated rates, read once per run (the first model request that needs
    /// them) rather than at each reservation and settlement.
    pub price_overrides: tokio::sync::OnceCell<Vec<crate::store::PriceOverrideRecord>>,
    /// Longest the run's model requests wait for the model to start on them.
    pub llm_queue_wait: Option<std::time::Duration>,
}

impl AgentContext {
    /// The user's price overrides, read from the store the first time in this run.
    async fn user_price_overrides(
        &self,
    ) -> Result<&[crate::store::PriceOverrideRecord], StoreError> {
        self.price_overrides
            .get_or_try_init(|| self.store.price_overrides())
            .await
            .map(Vec::as_slice)
    }

    pub fn now_ms(&self) -> i64 {
        crate::clock::now_ms()
    }

    /// Whether a language model is configured (anything but the template writer, which
    /// is also the fallback).
    pub fn has_model(&self) -> bool {
        self.llm.name() != self.fallback.name()
    }

    /// Records what one LLM request of this run used (see [`crate::usage::llm_calls`]):
    /// the metrics now, the usage row when the run ends ([`Self::flush_llm_usage`]), so the
    /// run's own analysis of the user's usage never counts the run's own requests.
    pub async fn record_llm_usage(
        &self,
        agent: &str,
        provider: &dyn LlmProvider,
        usage: TokenUsage,
        elapsed: std::time::Duration,
        succeeded: bool,
    ) {
        let call = LlmCall {
            provider,
            workload: &format!("apex/{agent}"),
            usage,
            elapsed,
            succeeded,
        };
        crate::usage::llm_calls::count(&call);
        if let Some(row) = crate::usage::llm_calls::usage_row(&call, self.now_ms()) {
            self.llm_usage
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(row);
        }
    }

    /// Reserves what a request to the run's model can use at most (`prompt_chars` of
    /// prompt at a token each, `max_tokens` of answer) on the user's budgets (see
    /// [`crate::budgets`]); settle it with [`Self::settle_budget`]. A budget without room
    /// is [`LlmError::OverBudget`]: the caller writes without the model. Budgets that
    /// cannot be read fail the same way, closed.
    pub async fn hold_budget(
        &self,
        prompt_chars: usize,
        max_tokens: u32,
    ) -> Result<Option<crate::budgets::Reservation>, LlmError> {
        use crate::budgets::{reserve, BudgetError, CallBound};
        let model = self.llm.model_name();
        let now = self.now_ms();
        let overrides = self.user_price_overrides().await.map_err(|err| {
            tracing::warn!(error = %err, "could not read the user's prices");
            LlmError::OverBudget("the budgets could not be checked".into())
        })?;
        let prices = self.price_book.for_user(overrides);
        let bound = CallBound::of_call(
            &prices,
            model,
            now,
            prompt_chars,
            Some(i64::from(max_tokens)),
        );
        match reserve(&self.store, None, model, bound, now).await {
            Ok(reservation) => Ok(reservation),
            Err(BudgetError::Exceeded { message, .. }) => Err(LlmError::OverBudget(message)),
            Err(BudgetError::Store(err)) => {
                tracing::warn!(error = %err, "could not check the user's budgets");
                Err(LlmError::OverBudget(
                    "the budgets could not be checked".into(),
                ))
            }
        }
    }

    /// Settles a reservation of [`Self::hold_budget`] to what the request used.
    pub async fn settle_budget(
        &self,
        reservation: Option<crate::budgets::Reservation>,
        used: TokenUsage,
    ) {
        let Some(reservation) = reservation else {
            return;
        };
        let overrides = self.user_price_overrides().await.unwrap_or_default();
        let prices = self.price_book.for_user(overrides);
        let used = crate::budgets::CallBound::of_usage(
            &prices,
            self.llm.model_name(),
            self.now_ms(),
            i64::try_from(used.prompt_tokens).unwrap_or(i64::MAX),
            i64::try_from(used.completion_tokens).unwrap_or(i64::MAX),
        );
        let warnings = reservation.settle(&self.store, used).await;
        crate::budgets::publish_warnings(self.bus.as_ref(), self.ctx.user_id(), warnings);
    }

    /// Writes the run's LLM usage rows to the user's usage data (at the end of the run,
    /// whatever its outcome: tokens spent on a failed run were spent too).
    pub async fn flush_llm_usage(&self) {
        let rows = std::mem::take(&mut *self.llm_usage.lock().unwrap_or_else(|p| p.into_inner()));
        if rows.is_empty() {
            return;
        }
        crate::usage::llm_calls::store_rows(&self.store, &self.price_book, rows).await;
    }

    pub async fn think(
        &self,
        agent: &str,
        reasoning: impl Into<String>,
        step_number: u32,
        total_steps: u32,
    ) -> Result<(), AgentError> {
        self.emitter
            .emit(
                agent,
                EventBody::AgentThinking {
                    reasoning: reasoning.into(),
                    step_number,
                    total_steps,
                },
            )
            .await?;
        Ok(())
    }

    /// Runs one tool call between its `tool_executing` and `tool_completed` events.
    pub async fn tool<T, F, Fut>(
        &self,
        agent: &str,
        tool_name: &str,
        parameters: Value,
        call: F,
    ) -> Result<T, AgentError>
    where
        T: Serialize,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        if self.ctx.is_cancelled() {
            return Err(AgentError::Cancelled);
        }
        let tool_call_id = format!("call_{}", uuid::Uuid::new_v4().simple());
        self.emitter
            .emit(
                agent,
                EventBody::ToolExecuting {
                    tool_name: tool_name.to_string(),
                    tool_call_id: tool_call_id.clone(),
                    parameters,
                },
            )
            .await?;
        let started = Instant::now();
        let outcome = call().await;
        let execution_time_ms = started.elapsed().as_millis() as u64;
        let (result, success) = match &outcome {
            Ok(value) => (serde_json::to_value(value).unwrap_or(Value::Null), true),
            Err(message) => (serde_json::json!({ "error": message }), false),
        };
        self.emitter
            .emit(
                agent,
                EventBody::ToolCompleted {
                    tool_name: tool_name.to_string(),
                    tool_call_id,
                    result,
                    execution_time_ms,
                    success,
                },
            )
            .await?;
        outcome.map_err(|message| AgentError::Tool {
            tool: tool_name.to_string(),
            message,
        })
    }
}
