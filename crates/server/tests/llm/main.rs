//! Tests of the model providers: the embedded local model (loaded from the provisioned
//! file) and the OpenAI-compatible client against a real local server. They do not depend
//! on the database engine, so unlike `tests/api` they run once, on SQLite.

#[path = "../api/helpers.rs"]
#[allow(dead_code)] // this target uses only some of the shared helpers
mod helpers;
mod local_model;
mod openai_client;
