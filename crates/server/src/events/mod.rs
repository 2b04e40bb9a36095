//! Event delivery: the per-user event bus and the per-run `UserEmitter`.
//!
//! The only path from agent code to a socket is `UserEmitter::emit` → store → `EventBus`
//! → the connections that subscribed with the same authenticated user id. The one other
//! thing the bus carries is a notice for a user's sockets that belongs to no run
//! (`BusEvent::notice`: a budget warning), routed the same way, by user id only. With several
//! instances, `EventBus` is the [`redis_bus::RedisBus`], which adds the hop between them.

mod bus;
mod emitter;
pub mod follow;
pub mod log;
pub mod redis_bus;

pub use bus::{BusEvent, BusHealth, BusRecvError, EventBus, InProcessBus, UserSubscription};
pub use emitter::{encode_event, EmitError, EncodedEvent, UserEmitter};
