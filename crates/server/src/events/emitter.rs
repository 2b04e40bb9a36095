//! `UserEmitter`: the only way agent code can send an event.
//!
//! An emitter is made from a run's [`UserExecutionContext`] and stamps every event with
//! that context's user, thread and run ids; agent code supplies only the body. It assigns
//! the per-run `seq` (1, 2, 3... without gaps), persists the event to the run's log and
//! only then delivers it on the bus. After the terminal event it refuses further events,
//! so "exactly one terminal event, and it is last" holds by construction.
//!
//! Events are pipelined: [`UserEmitter::emit`] encodes the event, queues it and returns, so
//! the agent goes on working while the run's *courier* task persists what has queued (one
//! append of up to [`MAX_EVENTS_PER_APPEND`] events, all or none) and then publishes it.
//! Why: persisting and publishing each event on its own cost a round trip to the store's
//! writer and a wake-up of every subscribed connection (one socket write each) per event,
//! which profiles showed as the largest share of a run's CPU; a run's events mostly come
//! in bursts, which now travel together. What stays exactly as it was:
//! - persist before deliver: the courier publishes an event only after its append is
//!   committed;
//! - seq order: one courier per run takes the queue in order and has one append in flight;
//! - no hole in the log: if an append fails, it and everything queued after it is dropped
//!   (neither stored nor delivered), its seqs are handed out again, and every later `emit`
//!   reports the failure, so the agent stops as it did when `emit` itself failed;
//! - the terminal event waits for everything queued before it, is delivered even if the
//!   store fails, and [`UserEmitter::emit_terminal`] returns once it is stored.
//!
//! [`UserEmitter::flush`] waits for what is queued. A run calls it before it stores its
//! final status (a reader that sees the run ended finds every event but the terminal one)
//! and before it parks for approval (it may go on elsewhere, from the stored last seq).
//!
//! The price: an event is stamped when the agent makes it and may wait in the queue for
//! the append before it, so its time from `emit` to a client is about one commit longer,
//! while the run as a whole ends sooner (docs/benchmarks.md, "Events pipelined to the log").

use std::sync::{Arc, Mutex, MutexGuard};

use apex_protocol::events::{message_id, AgentEvent, EventBody};
use apex_store::MAX_EVENTS_PER_APPEND;
use tokio::sync::oneshot;

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
    /// An event of the run could not be persisted (the store's error, as text); the run
    /// emits nothing more but its terminal event.
    #[error("an event of the run could not be persisted: {0}")]
    EarlierFailed(String),
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

/// Most events queued (encoded, not yet persisted) per run before `emit` waits for them:
/// a bound on a run's memory should its agent emit faster than the store writes.
const MAX_QUEUED: usize = 4 * MAX_EVENTS_PER_APPEND;

pub struct UserEmitter {
    /// What the run's courier task shares with the emitter.
    shared: Arc<Shared>,
}

/// The run's identity, where its events go, and its queue: shared by the emitter and the
/// run's courier task.
struct Shared {
    user_id: UserId,
    thread_id: ThreadId,
    run_id: RunId,
    store: UserStore,
    bus: Arc<dyn EventBus>,
    outgoing: Mutex<Outgoing>,
}

/// The run's events between `emit` and the bus.
struct Outgoing {
    /// Last seq handed out; after a failed append, the last one stored.
    assigned: u64,
    /// Encoded events waiting for the courier, in seq order, and callers waiting for them.
    queued: Vec<Queued>,
    /// Events in `queued` (the rest are waiters).
    queued_events: usize,
    /// A courier task is draining `queued`; at most one per run, which keeps seq order.
    courier: bool,
    /// Why an append failed, once one has; the events queued after it were dropped.
    failed: Option<String>,
    /// The terminal event has been asked for: no further `emit`.
    finished: bool,
}

enum Queued {
    Event {
        seq: u64,
        wire: String,
        log: String,
    },
    /// Told once every event queued before it is stored and published, or dropped.
    Waiter(oneshot::Sender<Result<(), EmitError>>),
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
            shared: Arc::new(Shared {
                user_id: ctx.user_id(),
                thread_id: ctx.thread_id(),
                run_id: ctx.run_id(),
                store: UserStore::for_context(store, ctx),
                bus,
                outgoing: Mutex::new(Outgoing {
                    assigned: last_seq,
                    queued: Vec::new(),
                    queued_events: 0,
                    courier: false,
                    failed: None,
                    finished: false,
                }),
            }),
        }
    }

    /// The run this emitter writes the events of.
    pub fn run_id(&self) -> RunId {
        self.shared.run_id
    }

    /// Queues one event to be persisted, then delivered; returns its seq. It is stored and
    /// delivered shortly after, in seq order (see the module doc). An error if the run
    /// already ended, or an earlier event could not be persisted: nothing is queued then.
    pub async fn emit(&self, agent_name: &str, body: EventBody) -> Result<u64, EmitError> {
        let (seq, backlog) = {
            let mut outgoing = self.shared.lock();
            if outgoing.finished {
                return Err(EmitError::RunFinished);
            }
            if let Some(failure) = &outgoing.failed {
                return Err(EmitError::EarlierFailed(failure.clone()));
            }
            let seq = outgoing.assigned + 1;
            let EncodedEvent { wire, log } = self.shared.encode(seq, agent_name, body)?;
            outgoing.assigned = seq;
            outgoing.queued.push(Queued::Event { seq, wire, log });
            outgoing.queued_events += 1;
            self.shared.start_courier(&mut outgoing);
            (seq, outgoing.queued_events)
        };
        if backlog >= MAX_QUEUED {
            self.flush().await?;
        }
        Ok(seq)
    }

    /// Waits until every event emitted so far is stored and delivered; the error if one
    /// could not be stored (it and the events after it were then not delivered).
    pub async fn flush(&self) -> Result<(), EmitError> {
        self.shared.flush().await
    }

    /// The terminal event, after every event queued before it. Delivered live even if the
    /// store fails, because a client must always learn that its run ended. Only the first
    /// call sends anything; it returns once the event is stored (or could not be).
    pub async fn emit_terminal(&self, agent_name: &str, body: EventBody) -> Result<u64, EmitError> {
        {
            let mut outgoing = self.shared.lock();
            if outgoing.finished {
                return Err(EmitError::RunFinished);
            }
            outgoing.finished = true;
        }
        let shared = Arc::clone(&self.shared);
        let agent_name = agent_name.to_owned();
        // On its own task: if the caller is cancelled while it waits, the terminal event
        // still goes out, after the events queued before it.
        let delivery = tokio::spawn(async move {
            // Whatever the queue's outcome: a failed append was dropped and its seqs are
            // handed out again, so the terminal event follows the last stored one.
            let _ = shared.flush().await;
            let seq = shared.lock().assigned + 1;
            let EncodedEvent { wire, log } = shared.encode(seq, &agent_name, body)?;
            let persisted = shared
                .store
                .append_events(shared.run_id, vec![(seq, log)], now_ms())
                .await;
            shared.lock().assigned = seq;
            shared.publish(seq, true, wire);
            persisted.map(|()| seq).map_err(EmitError::Storage)
        });
        delivery
            .await
            .map_err(|err| EmitError::Task(err.to_string()))?
    }
}

impl Shared {
    /// The run's event `seq` in its wire and log forms.
    fn encode(
        &self,
        seq: u64,
        agent_name: &str,
        body: EventBody,
    ) -> Result<EncodedEvent, EmitError> {
        encode_event(
            (self.user_id, self.thread_id, self.run_id),
            seq,
            agent_name,
            body,
        )
        .map_err(|e| EmitError::Task(format!("serializing event: {e}")))
    }

    fn lock(&self) -> MutexGuard<'_, Outgoing> {
        // The state stays consistent at every unlock; a panic elsewhere cannot break it.
        self.outgoing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See [`UserEmitter::flush`].
    async fn flush(&self) -> Result<(), EmitError> {
        let waiting = {
            let mut outgoing = self.lock();
            if !outgoing.courier {
                return match &outgoing.failed {
                    Some(failure) => Err(EmitError::EarlierFailed(failure.clone())),
                    None => Ok(()),
                };
            }
            let (told, waiting) = oneshot::channel();
            outgoing.queued.push(Queued::Waiter(told));
            waiting
        };
        waiting
            .await
            .map_err(|_| EmitError::Task("the run's courier task ended early".into()))?
    }

    /// Starts the run's courier unless it is running.
    fn start_courier(self: &Arc<Self>, outgoing: &mut Outgoing) {
        if !outgoing.courier {
            outgoing.courier = true;
            tokio::spawn(Arc::clone(self).deliver_queued());
        }
    }

    fn publish(&self, seq: u64, terminal: bool, json: String) {
        self.bus.publish(Arc::new(BusEvent {
            user_id: self.user_id,
            run_id: self.run_id,
            seq,
            terminal,
            json,
            emitted_at: std::time::Instant::now(),
            relayed: false,
        }));
        crate::telemetry::event_emitted();
    }

    /// The courier: stores and publishes what is queued, in order, until the queue is
    /// empty. Runs on its own task, so an agent cancelled mid-run leaves nothing half done.
    async fn deliver_queued(self: Arc<Self>) {
        loop {
            let (
                Append {
                    rows,
                    wires,
                    waiters,
                },
                failed,
            ) = {
                let mut outgoing = self.lock();
                if outgoing.queued.is_empty() {
                    outgoing.courier = false;
                    return;
                }
                (take_append(&mut outgoing), outgoing.failed.clone())
            };
            let outcome = match (failed, rows.first()) {
                // Queued behind a failed append: dropped, never stored or delivered.
                (Some(failure), _) => Err(failure),
                (None, None) => Ok(()),
                (None, Some(&(first_seq, _))) => {
                    match self.store.append_events(self.run_id, rows, now_ms()).await {
                        Ok(()) => {
                            for (seq, wire) in wires {
                                self.publish(seq, false, wire);
                            }
                            Ok(())
                        }
                        Err(err) => {
                            tracing::error!(run_id = %self.run_id, error = %err, "events could not be persisted; the run emits nothing more but its end");
                            let failure = err.to_string();
                            let mut outgoing = self.lock();
                            outgoing.failed = Some(failure.clone());
                            // These seqs and those queued after them are handed out again.
                            outgoing.assigned = first_seq - 1;
                            Err(failure)
                        }
                    }
                }
            };
            for waiter in waiters {
                let _ = waiter.send(outcome.clone().map_err(EmitError::EarlierFailed));
            }
        }
    }
}

/// The next append taken off the queue: its events' rows for the log and their wire forms
/// (both in seq order), and the waiters among and right after them.
struct Append {
    rows: Vec<(u64, String)>,
    wires: Vec<(u64, String)>,
    waiters: Vec<oneshot::Sender<Result<(), EmitError>>>,
}

/// Takes the next append off the queue: at most [`MAX_EVENTS_PER_APPEND`] events, and the
/// waiters among and right after them (told once those events are settled).
fn take_append(outgoing: &mut Outgoing) -> Append {
    let mut events = 0;
    let end = outgoing
        .queued
        .iter()
        .position(|item| {
            events += usize::from(matches!(item, Queued::Event { .. }));
            events > MAX_EVENTS_PER_APPEND
        })
        .unwrap_or(outgoing.queued.len());
    let mut append = Append {
        rows: Vec::with_capacity(end),
        wires: Vec::with_capacity(end),
        waiters: Vec::new(),
    };
    for item in outgoing.queued.drain(..end) {
        match item {
            Queued::Event { seq, wire, log } => {
                append.rows.push((seq, log));
                append.wires.push((seq, wire));
            }
            Queued::Waiter(told) => append.waiters.push(told),
        }
    }
    outgoing.queued_events -= append.rows.len();
    append
}
