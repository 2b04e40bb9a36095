//! `EventBus`: fan-out of persisted events to the open connections of one user.
//!
//! Routing is by user id only. A connection subscribes with the user id of its own
//! authentication, so it receives that user's events and nothing else; there is no
//! "topic" a client can name. The in-process bus keeps one broadcast channel per user
//! with at least one open connection, and removes the channel when the last one closes,
//! so no entry outlives its connections.
//!
//! With several instances the bus is [`super::redis_bus::RedisBus`], which carries events
//! between instances and hands them to an `InProcessBus` for the per-user fan-out. Because
//! a hop between instances can lose messages (Redis briefly unreachable), a subscription
//! can also be told to *resync*: the connection then catches up from the persisted log,
//! exactly as when it falls behind the local buffer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use crate::ids::{RunId, UserId};

/// One event as delivered: serialized once, shared by every receiving connection.
#[derive(Debug)]
pub struct BusEvent {
    pub user_id: UserId,
    pub run_id: RunId,
    pub seq: u64,
    pub terminal: bool,
    pub json: String,
    /// When the emitter published it, for the delivery-latency metric.
    pub emitted_at: std::time::Instant,
    /// Came from another instance (over Redis). One run's events can come from two
    /// instances (a run continued after approval, or recovered, elsewhere), and the hop
    /// keeps order per instance only: the older instance's events may arrive after the
    /// newer one's. A connection that first sees a run through a relayed event therefore
    /// reads the rest from the log (see `ws::delivery`).
    pub relayed: bool,
}

/// The `seq` of a notice: a frame for the user's sockets that belongs to no run (a
/// `budget_warning`). Nothing stores it; a socket that is not open misses it.
pub const NOTICE_SEQ: u64 = 0;

impl BusEvent {
    /// A notice for `user_id`'s sockets (see [`NOTICE_SEQ`]).
    pub fn notice(user_id: UserId, json: String) -> Self {
        Self {
            user_id,
            // No run: a fresh id that names nothing stored.
            run_id: RunId::generate(),
            seq: NOTICE_SEQ,
            terminal: false,
            json,
            emitted_at: std::time::Instant::now(),
            relayed: false,
        }
    }

    pub fn is_notice(&self) -> bool {
        self.seq == NOTICE_SEQ
    }
}

/// Whether the bus can deliver right now (reported by `/health/ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusHealth {
    /// `in_process` or `redis`.
    pub kind: &'static str,
    /// Events published now reach every instance's subscribers.
    pub connected: bool,
}

pub trait EventBus: Send + Sync + 'static {
    /// Delivers to the user's current subscribers; a user with none simply misses it
    /// live (the event is already in the store for `resume`).
    fn publish(&self, event: Arc<BusEvent>);
    fn subscribe(&self, user: UserId) -> UserSubscription;
    /// Number of users with at least one live subscription (for tests and metrics).
    fn subscribed_users(&self) -> usize;
    fn health(&self) -> BusHealth {
        BusHealth {
            kind: "in_process",
            connected: true,
        }
    }
    /// Asks the other instances to cancel `run` of `owner` if one of them executes it.
    /// The caller has checked in the store that `owner` owns `run`; the executing
    /// instance checks again against its own record of the run. `false` when there is
    /// no other instance to ask (the in-process bus) or the request could not be sent.
    fn request_stop(&self, owner: UserId, run: RunId) -> bool {
        let _ = (owner, run);
        false
    }
}

/// Why [`UserSubscription::recv`] returned no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusRecvError {
    /// The connection fell this many events behind its buffer.
    Lagged(u64),
    /// Events may have been lost between instances (the bus reconnected): catch up.
    Resync,
    /// The bus is gone.
    Closed,
}

/// How many events a connection may fall behind before it has to catch up from the store.
const PER_USER_BUFFER: usize = 1024;

pub struct InProcessBus {
    /// user → channel; an entry exists only while that user has a subscription.
    channels: Arc<Mutex<HashMap<UserId, broadcast::Sender<Arc<BusEvent>>>>>,
    /// Bumped to tell every subscription to catch up from the store.
    resync: watch::Sender<u64>,
}

impl Default for InProcessBus {
    fn default() -> Self {
        Self {
            channels: Arc::default(),
            resync: watch::channel(0).0,
        }
    }
}

impl InProcessBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells every current subscription to catch up from the persisted log.
    pub fn resync_all(&self) {
        self.resync
            .send_modify(|epoch| *epoch = epoch.wrapping_add(1));
    }
}

impl EventBus for InProcessBus {
    fn publish(&self, event: Arc<BusEvent>) {
        let sender = {
            let channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            channels.get(&event.user_id).cloned()
        };
        match sender {
            // An error only means every receiver went away in the meantime.
            Some(sender) => {
                if let Err(broadcast::error::SendError(event)) = sender.send(event) {
                    tracing::debug!(run = %event.run_id, seq = event.seq, "no connection of the user here any more; event not delivered here");
                }
            }
            None => {
                tracing::debug!(run = %event.run_id, seq = event.seq, "no connection of the user here; event not delivered here")
            }
        }
    }

    fn subscribe(&self, user: UserId) -> UserSubscription {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = channels
            .entry(user)
            .or_insert_with(|| broadcast::channel(PER_USER_BUFFER).0)
            .subscribe();
        UserSubscription {
            user,
            receiver: Some(receiver),
            resync: self.resync.subscribe(),
            channels: Arc::clone(&self.channels),
        }
    }

    fn subscribed_users(&self) -> usize {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// A connection's feed of its user's events. Dropping it unsubscribes.
pub struct UserSubscription {
    user: UserId,
    /// Always `Some` until `drop`, which releases it under the map's lock.
    receiver: Option<broadcast::Receiver<Arc<BusEvent>>>,
    resync: watch::Receiver<u64>,
    channels: Arc<Mutex<HashMap<UserId, broadcast::Sender<Arc<BusEvent>>>>>,
}

impl UserSubscription {
    pub fn user(&self) -> UserId {
        self.user
    }

    /// The next event, or why there is none: the connection fell behind, or events may
    /// have been lost between instances. Either way the caller catches up from the store.
    pub async fn recv(&mut self) -> Result<Arc<BusEvent>, BusRecvError> {
        tokio::select! {
            biased;
            changed = self.resync.changed() => match changed {
                Ok(()) => Err(BusRecvError::Resync),
                Err(_) => Err(BusRecvError::Closed),
            },
            event = recv(&mut self.receiver) => event.map_err(|err| match err {
                broadcast::error::RecvError::Lagged(n) => BusRecvError::Lagged(n),
                broadcast::error::RecvError::Closed => BusRecvError::Closed,
            }),
        }
    }
}

impl UserSubscription {
    /// The next event if one is already queued, without waiting; `None` if none is. Same
    /// errors as [`Self::recv`], checked in the same order (a resync first).
    pub fn try_recv(&mut self) -> Option<Result<Arc<BusEvent>, BusRecvError>> {
        match self.resync.has_changed() {
            Ok(true) => {
                // Marks this resync seen, as `changed()` in `recv` does.
                self.resync.borrow_and_update();
                return Some(Err(BusRecvError::Resync));
            }
            Ok(false) => {}
            Err(_) => return Some(Err(BusRecvError::Closed)),
        }
        let Some(receiver) = self.receiver.as_mut() else {
            return Some(Err(BusRecvError::Closed));
        };
        match receiver.try_recv() {
            Ok(event) => Some(Ok(event)),
            Err(broadcast::error::TryRecvError::Empty) => None,
            Err(broadcast::error::TryRecvError::Lagged(n)) => Some(Err(BusRecvError::Lagged(n))),
            Err(broadcast::error::TryRecvError::Closed) => Some(Err(BusRecvError::Closed)),
        }
    }
}

async fn recv(
    receiver: &mut Option<broadcast::Receiver<Arc<BusEvent>>>,
) -> Result<Arc<BusEvent>, broadcast::error::RecvError> {
    match receiver {
        Some(receiver) => receiver.recv().await,
        None => Err(broadcast::error::RecvError::Closed),
    }
}

impl Drop for UserSubscription {
    fn drop(&mut self) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        // Our receiver goes while the lock is held: were it dropped after the lock is
        // released, two subscriptions of one user closing at once could each still count
        // the other and both leave the channel behind.
        self.receiver = None;
        if channels
            .get(&self.user)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.remove(&self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(user: UserId, seq: u64) -> Arc<BusEvent> {
        Arc::new(BusEvent {
            user_id: user,
            run_id: RunId::generate(),
            seq,
            terminal: false,
            json: format!("{{\"seq\":{seq}}}"),
            emitted_at: std::time::Instant::now(),
            relayed: false,
        })
    }

    #[tokio::test]
    async fn delivers_only_to_the_events_user_and_cleans_up() {
        let bus = InProcessBus::new();
        let (alice, bob) = (UserId::generate(), UserId::generate());
        let mut alice_sub = bus.subscribe(alice);
        let mut bob_sub = bus.subscribe(bob);
        let alice_second = bus.subscribe(alice);
        assert_eq!(bus.subscribed_users(), 2);

        bus.publish(event(alice, 1));
        bus.publish(event(bob, 7));
        assert_eq!(alice_sub.recv().await.unwrap().seq, 1);
        assert_eq!(bob_sub.recv().await.unwrap().seq, 7);
        assert!(alice_sub.receiver.as_mut().unwrap().try_recv().is_err());

        drop(alice_second);
        assert_eq!(bus.subscribed_users(), 2, "alice still has a connection");
        drop(alice_sub);
        drop(bob_sub);
        assert_eq!(bus.subscribed_users(), 0);
    }

    #[tokio::test]
    async fn try_recv_takes_queued_events_in_order_without_waiting() {
        let bus = InProcessBus::new();
        let user = UserId::generate();
        let mut sub = bus.subscribe(user);
        assert!(sub.try_recv().is_none());
        bus.publish(event(user, 1));
        bus.publish(event(user, 2));
        assert_eq!(sub.try_recv().unwrap().unwrap().seq, 1);
        assert_eq!(sub.try_recv().unwrap().unwrap().seq, 2);
        assert!(sub.try_recv().is_none());
        bus.resync_all();
        assert_eq!(sub.try_recv().unwrap().unwrap_err(), BusRecvError::Resync);
        assert!(sub.try_recv().is_none(), "a resync is reported once");
    }

    #[tokio::test]
    async fn resync_reaches_every_subscription_once() {
        let bus = InProcessBus::new();
        let user = UserId::generate();
        let mut sub = bus.subscribe(user);
        bus.resync_all();
        assert_eq!(sub.recv().await.unwrap_err(), BusRecvError::Resync);
        bus.publish(event(user, 3));
        assert_eq!(sub.recv().await.unwrap().seq, 3);
    }
}
