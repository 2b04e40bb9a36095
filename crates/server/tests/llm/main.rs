//! Tests of the model providers: the embedded local model (loaded from the provisioned
//! file) and the OpenAI-compatible client against a real local server. They do not depend
//! on the database engine, so unlike `tests/api` they run once, on SQLite.

#[path = "../api/helpers.rs"]
#[allow(dead_code)] // this target uses only some of the shared helpers
mod helpers;
mod local_model;
mod openai_api;
mod openai_client;

/// The user's usage rows as stored (read straight from the store, all time).
async fn usage_rows(
    app: &helpers::TestApp,
    user: &helpers::TestUser,
) -> Vec<apex_server::store::UsageRow> {
    let id = apex_server::ids::UserId::parse(&user.id).expect("a user id");
    app.state
        .infra
        .store
        .usage_rows_since(id, 0)
        .await
        .expect("reading usage rows")
}
