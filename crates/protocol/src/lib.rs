//! Wire types of Apex protocol v1, shared by the server, the `apex` CLI and the tests.
//!
//! Everything a client can see travels through a type in this crate, so the server,
//! the terminal client and the integration tests cannot drift apart: change a shape here
//! and every side stops compiling until it agrees. `docs/protocol.md` is the prose
//! version of this file. The REST types also derive `utoipa::ToSchema`, so the server's
//! OpenAPI document (`/openapi.json`) describes them from the same definitions.
//!
//! Map:
//! - [`error`]: the one JSON error body and the stable error codes.
//! - [`auth`]: register / login / refresh bodies, the token pair, WebSocket tickets.
//! - [`threads`]: threads, messages, runs over REST.
//! - [`approval`]: approving, editing or rejecting a run's action plan; the user's settings.
//! - [`usage`]: a user's AI usage rows and the summary computed from them.
//! - [`budgets`]: spending caps and what a refused call is told.
//! - [`alerts`]: alert rules, scheduled reports, what they raised, webhooks and their
//!   delivery log.
//! - [`teams`]: teams, their members, invites and usage aggregates.
//! - [`prices`]: the price book (built-in prices and a user's negotiated rates) and the
//!   explanation of a cost.
//! - [`events`]: agent events streamed during a run (`agent_started`, `tool_completed`...).
//! - [`ws`]: the other server → client WebSocket frames and the close codes.

#![forbid(unsafe_code)]

pub mod alerts;
pub mod approval;
pub mod auth;
pub mod budgets;
pub mod error;
pub mod events;
pub mod prices;
pub mod teams;
pub mod threads;
pub mod usage;
pub mod ws;

/// Protocol version announced in `connection_established`.
pub const PROTOCOL_VERSION: u32 = 1;
