//! Event delivery: the per-user event bus and the per-run `UserEmitter`.
//!
//! The only path from agent code to a socket is `UserEmitter::emit` → store → `EventBus`
//! → the connections that subscribed with the same authenticated user id.

mod bus;
mod emitter;
pub mod follow;
pub mod log;

pub use bus::{BusEvent, EventBus, InProcessBus, UserSubscription};
pub use emitter::{EmitError, UserEmitter};
