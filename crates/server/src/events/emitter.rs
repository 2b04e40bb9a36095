//! `UserEmitter`: the only way agent code can send an event.
//!
//! An emitter is made from a run's [`UserExecutionContext`] and stamps every event with
//! that context's user, thread and run ids; agent code supplies only the body. It assigns
//! the per-run `seq` (1, 2, 3... without gaps), persists the event to the run's log and
//! only then delivers it on the bus. After the terminal event it refuses further events,
//! so "exactly one terminal event, and it is last" holds by construction.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use apex_protocol::events::{message_id, AgentEvent, EventBody};
use tokio::sync::Mutex;

use super::bus::{BusEvent, EventBus};
use crate::clock::{now_ms, now_rfc3339_micros};
use crate::context::UserExecutionContext;
use crate::ids::{RunId, ThreadId, UserId};
use crate::store::{Store, StoreError};
use crate::user_store::UserStore;

#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    #[error("event could not be persisted: {0}")]
    Storage(#[from] StoreError),
    #[error("the run already sent its terminal event")]
    RunFinished,
    #[error("event delivery task failed: {0}")]
    Task(String),
}

/// One event, serialised once for each of its two readers.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// What every connection receives: the full envelope.
    pub wire: String,
    /// What the run's event log keeps: the envelope less what can be rebuilt from the
    /// log's row and the run (see [`AgentEvent::to_log_json`]); replay gives back `wire`.
    pub log: String,
}

/// One event of run `ids` = (user, thread, run), in its wire and its log forms.
pub fn encode_event(
    (user_id, thread_id, run_id): (UserId, ThreadId, RunId),
    seq: u64,
    agent_name: &str,
    body: EventBody,
) -> serde_json::Result<EncodedEvent> {
    let run_id = run_id.to_string();
    let message_id = message_id(&run_id, seq);
    let kind = body.kind();
    let (payload, compat) = body.into_parts(&message_id);
    let event = AgentEvent {
        kind,
        seq,
        run_id,
        thread_id: thread_id.to_string(),
        user_id: user_id.to_string(),
        agent_name: agent_name.to_string(),
        timestamp: now_rfc3339_micros(),
        payload,
        compat,
    };
    Ok(EncodedEvent {
        wire: serde_json::to_string(&event)?,
        log: event.to_log_json()?,
    })
}

pub struct UserEmitter {
    user_id: UserId,
    thread_id: ThreadId,
    run_id: RunId,
    store: UserStore,
    bus: Arc<dyn EventBus>,
    /// Last seq handed out. The lock is held (and moved into the delivery task) until the
    /// event is persisted and published, so events leave in seq order even when the
    /// agent that emitted one is cancelled mid-emit.
    seq: Arc<Mutex<u64>>,
    finished: AtomicBool,
}

impl UserEmitter {
    pub fn new(ctx: &UserExecutionContext, store: Arc<dyn Store>, bus: Arc<dyn EventBus>) -> Self {
        Self::resuming(ctx, store, bus, 0)
    }

    /// An emitter continuing a run whose log already holds `last_seq` events.
    pub fn resuming(
        ctx: &UserExecutionContext,
        store: Arc<dyn Store>,
        bus: Arc<dyn EventBus>,
        last_seq: u64,
    ) -> Self {
        Self {
            user_id: ctx.user_id(),
            thread_id: ctx.thread_id(),
            run_id: ctx.run_id(),
            store: UserStore::for_context(store, ctx),
            bus,
            seq: Arc::new(Mutex::new(last_seq)),
            finished: AtomicBool::new(false),
        }
    }

    /// The run this emitter writes the events of.
    pub fn run_id(&self) -> RunId {
        self.run_id
    }

    /// Persists then delivers one event; returns its seq. If it cannot be persisted it is
    /// not delivered either, and its seq is reused, so the log never has a hole.
    pub async fn emit(&self, agent_name: &str, body: EventBody) -> Result<u64, EmitError> {
        if self.finished.load(Ordering::SeqCst) {
            return Err(EmitError::RunFinished);
        }
        self.send(agent_name, body, false).await
    }

    /// The terminal event. Delivered live even if the store fails, because a client must
    /// always learn that its run ended. Only the first call sends anything.
    pub async fn emit_terminal(&self, agent_name: &str, body: EventBody) -> Result<u64, EmitError> {
        if self.finished.swap(true, Ordering::SeqCst) {
            return Err(EmitError::RunFinished);
        }
        self.send(agent_name, body, true).await
    }

    async fn send(
        &self,
        agent_name: &str,
        body: EventBody,
        terminal: bool,
    ) -> Result<u64, EmitError> {
        let mut guard = Arc::clone(&self.seq).lock_owned().await;
        let seq = *guard + 1;
        let EncodedEvent { wire, log } = encode_event(
            (self.user_id, self.thread_id, self.run_id),
            seq,
            agent_name,
            body,
        )
        .map_err(|e| EmitError::Task(format!("serializing event: {e}")))?;
        let store = self.store.clone();
        let bus = Arc::clone(&self.bus);
        let (user_id, run_id) = (self.user_id, self.run_id);
        // Persist-and-publish runs on its own task: if the emitting agent is cancelled
        // while it waits, the event still completes (or is cleanly not sent) and the seq
        // lock is released only afterwards.
        let delivery = tokio::spawn(async move {
            let persisted = store.append_event(run_id, seq, &log, now_ms()).await;
            if persisted.is_ok() || terminal {
                *guard = seq;
                bus.publish(Arc::new(BusEvent {
                    user_id,
                    run_id,
                    seq,
                    terminal,
                    json: wire,
                    emitted_at: std::time::Instant::now(),
                    relayed: false,
                }));
                crate::telemetry::event_emitted();
            }
            drop(guard);
            persisted
        });
        match delivery.await {
            Ok(Ok(())) => Ok(seq),
            Ok(Err(err)) => Err(EmitError::Storage(err)),
            Err(err) => Err(EmitError::Task(err.to_string())),
        }
    }
}
