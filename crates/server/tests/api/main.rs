//! Integration tests: the real server on port 0, driven over HTTP and WebSocket.
//!
//! This target (`api`) runs them on SQLite; `tests/api_postgres` compiles the same files
//! again to run them on PostgreSQL (see `helpers.rs`).

mod alerts;
mod answers;
mod api_keys;
mod approval;
mod auth;
mod authorization;
pub mod budgets;
mod compat;
mod durability;
mod emitter;
mod gateway;
mod golden_path;
pub mod helpers;
mod hostile;
mod hostile_fairness;
mod hostile_hygiene;
mod hostile_sessions;
mod isolation;
mod layers;
mod lifecycle;
mod limits;
mod multitask;
mod no_global_state;
mod openai_compat;
mod openapi;
mod paced_delivery;
mod price_book;
mod queue;
mod regenerate;
mod store;
mod stress;
mod teams;
mod text;
mod threads;
mod usage;
mod usage_sources;
mod usage_sql;
mod web_page;
mod websocket;
