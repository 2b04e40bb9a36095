//! `AgentInstanceFactory`: everything per-run, built fresh from one context.
//!
//! The factory is created for one run and consumed by `build`. It is the single place that
//! turns shared [`Infrastructure`] (store, bus, LLM, pricing) plus a
//! [`UserExecutionContext`] into per-user objects: the agents, the [`UserEmitter`] bound to
//! that user and run, and the [`UserStore`] bound to that user. Nothing it builds is shared
//! with another run.

use std::sync::Arc;

use super::{actions, data, optimization, reporting, triage, Agent, AgentContext};
use crate::context::UserExecutionContext;
use crate::events::{EventBus, UserEmitter};
use crate::llm::LlmProvider;
use crate::store::Store;
use crate::usage::price_book::PriceBook;
use crate::usage::pricing::PricingTable;
use crate::user_store::UserStore;

/// What a run's agents and events are built from, besides its context. Every field is
/// immutable or internally synchronised and holds no user's data.
pub struct Infrastructure {
    /// The database; user data is reached through `UserStore` handles made from it.
    pub store: Arc<dyn Store>,
    /// Delivers persisted events to the owning user's connections.
    pub bus: Arc<dyn EventBus>,
    /// Writes answers (the configured provider). Stateless between requests.
    pub llm: Arc<dyn LlmProvider>,
    /// The template writer: stands in when `llm` fails.
    pub fallback_llm: Arc<dyn LlmProvider>,
    /// Whether triage may ask `llm` for a structured classification.
    pub llm_triage: bool,
    /// List prices; read-only.
    pub pricing: Arc<PricingTable>,
    /// The built-in price snapshot every cost is computed with (with the user's own
    /// rates, loaded per request); read-only.
    pub price_book: Arc<PriceBook>,
    /// Longest a run's request waits for the model to start on it before the run writes
    /// without the model (see [`crate::llm::LlmRequest::max_queue_wait`]).
    pub llm_queue_wait: Option<std::time::Duration>,
}

pub struct AgentInstanceFactory {
    ctx: Arc<UserExecutionContext>,
    infra: Arc<Infrastructure>,
}

/// A run ready to execute: its agents' view of the world, the agents in pipeline order,
/// and the user's request.
pub struct RunInstance {
    pub context: AgentContext,
    pub agents: Vec<Box<dyn Agent>>,
    pub request: String,
}

impl AgentInstanceFactory {
    pub fn new(ctx: UserExecutionContext, infra: Arc<Infrastructure>) -> Self {
        Self {
            ctx: Arc::new(ctx),
            infra,
        }
    }

    /// Builds the run answering `request`. `last_seq` events are already in the run's log
    /// (from earlier attempts); new ones follow them.
    pub fn build(self, request: String, last_seq: u64) -> RunInstance {
        let emitter = UserEmitter::resuming(
            &self.ctx,
            Arc::clone(&self.infra.store),
            Arc::clone(&self.infra.bus),
            last_seq,
        );
        let context = AgentContext {
            store: UserStore::for_context(Arc::clone(&self.infra.store), &self.ctx),
            emitter: Arc::new(emitter),
            llm: Arc::clone(&self.infra.llm),
            fallback: Arc::clone(&self.infra.fallback_llm),
            llm_triage: self.infra.llm_triage,
            pricing: Arc::clone(&self.infra.pricing),
            price_book: Arc::clone(&self.infra.price_book),
            bus: Arc::clone(&self.infra.bus),
            llm_usage: std::sync::Mutex::new(Vec::new()),
            price_overrides: tokio::sync::OnceCell::new(),
            llm_queue_wait: self.infra.llm_queue_wait,
            ctx: self.ctx,
        };
        let agents: Vec<Box<dyn Agent>> = vec![
            Box::new(triage::TriageAgent),
            Box::new(data::DataAgent),
            Box::new(optimization::OptimizationAgent),
            Box::new(actions::ActionsAgent),
            Box::new(reporting::ReportingAgent),
        ];
        RunInstance {
            context,
            agents,
            request,
        }
    }
}
