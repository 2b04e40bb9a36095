//! Integration tests: the real server on port 0, driven over HTTP and WebSocket.

mod auth;
mod compat;
mod durability;
mod golden_path;
mod helpers;
mod hostile;
mod isolation;
mod lifecycle;
mod limits;
mod no_global_state;
mod stress;
mod threads;
mod usage;
mod web_page;
mod websocket;
