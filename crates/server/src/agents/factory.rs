//! `AgentInstanceFactory`: everything per-run, built fresh from one context.
//!
//! The factory is created for one run and consumed by `build`. It is the single place that
//! turns shared infrastructure (store, bus, LLM, pricing) plus a [`UserExecutionContext`]
//! into per-user objects: the agents, the [`UserEmitter`] bound to that user and run, and the
//! [`UserStore`] bound to that user. Nothing it builds is shared with another run.

use std::sync::Arc;

use super::{actions, data, optimization, reporting, triage, Agent, AgentContext};
use crate::context::UserExecutionContext;
use crate::events::UserEmitter;
use crate::runs::RunSlot;
use crate::state::Infrastructure;
use crate::store::UserStore;

pub struct AgentInstanceFactory {
    ctx: Arc<UserExecutionContext>,
    infra: Arc<Infrastructure>,
}

/// A run ready to execute: its context, the agents in pipeline order, and their view.
pub struct RunInstance {
    pub context: AgentContext,
    pub agents: Vec<Box<dyn Agent>>,
    pub request: String,
    /// Server shutdown: ends the run as `interrupted`.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The run's registration among running runs; released as the run finishes.
    pub slot: RunSlot,
    /// Which start of the run this is (1 = first) and how many it may have; a run whose
    /// server died is started again from the beginning.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Set with several instances: where to hand the run back if the server shuts down
    /// during it (see [`HandBack`]).
    pub hand_back: Option<HandBack>,
}

/// Returning an interrupted run to the queue so that another instance runs it again.
pub struct HandBack {
    pub store: Arc<dyn crate::store::Store>,
    /// This instance, which holds the run's claim.
    pub instance: String,
}

/// Where a claimed run stands: its log so far and its attempt.
#[derive(Debug, Clone, Copy)]
pub struct RunStart {
    /// Events already in the run's log (from earlier attempts); new ones follow them.
    pub last_seq: u64,
    pub attempt: u32,
    pub max_attempts: u32,
}

impl AgentInstanceFactory {
    pub fn new(ctx: UserExecutionContext, infra: Arc<Infrastructure>) -> Self {
        Self {
            ctx: Arc::new(ctx),
            infra,
        }
    }

    pub fn build(self, request: String, slot: RunSlot, start: RunStart) -> RunInstance {
        let emitter = UserEmitter::resuming(
            &self.ctx,
            Arc::clone(&self.infra.store),
            Arc::clone(&self.infra.bus),
            start.last_seq,
        );
        let context = AgentContext {
            store: UserStore::for_context(Arc::clone(&self.infra.store), &self.ctx),
            emitter: Arc::new(emitter),
            llm: Arc::clone(&self.infra.llm),
            fallback: Arc::clone(&self.infra.fallback_llm),
            llm_triage: self.infra.llm_triage,
            pricing: Arc::clone(&self.infra.pricing),
            llm_usage: std::sync::Mutex::new(Vec::new()),
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
            shutdown: self.infra.lifecycle.interrupt_runs.clone(),
            slot,
            attempt: start.attempt,
            max_attempts: start.max_attempts,
            hand_back: self.infra.hand_back_on_shutdown.then(|| HandBack {
                store: Arc::clone(&self.infra.store),
                instance: self.infra.instance_id.clone(),
            }),
        }
    }
}
