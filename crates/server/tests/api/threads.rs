//! Thread CRUD over REST.

use serde_json::{json, Value};

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_can_be_created_listed_renamed_and_deleted() {
    let app = spawn_app().await;
    let user = app.register().await;
    let created = app
        .post_json(
            "/api/threads",
            Some(user.token()),
            &json!({"title": "Costs", "metadata": {"a": 1, "b": 2}}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let thread: Value = created.json().await.unwrap();
    let id = thread["id"].as_str().unwrap();
    assert_eq!(thread["title"], "Costs");
    assert_eq!(thread["message_count"], 0);
    assert!(thread["created_at"].as_str().unwrap().ends_with('Z'));

    let fetched: Value = app
        .get(&format!("/api/threads/{id}"), user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["id"], id);

    // PATCH (and its PUT alias) merges metadata; null removes a key.
    let updated: Value = app
        .http
        .put(app.url(&format!("/api/threads/{id}")))
        .bearer_auth(user.token())
        .json(&json!({"title": "Renamed", "metadata": {"b": null, "c": 3}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(updated["title"], "Renamed");
    assert_eq!(updated["metadata"], json!({"a": 1, "c": 3}));

    let list: Vec<Value> = app
        .get("/api/threads?limit=10&offset=0", user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list.len(), 1);
    let bad_page = app.get("/api/threads?limit=0", user.token()).await;
    assert_eq!(bad_page.status(), 422);
    let bad_metadata = app
        .post_json(
            "/api/threads",
            Some(user.token()),
            &json!({"metadata": [1]}),
        )
        .await;
    assert_eq!(bad_metadata.status(), 422);

    let deleted = app
        .http
        .delete(app.url(&format!("/api/threads/{id}")))
        .bearer_auth(user.token())
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        app.get(&format!("/api/threads/{id}"), user.token())
            .await
            .status(),
        404
    );
    assert_eq!(
        app.get("/api/threads/not-a-uuid", user.token())
            .await
            .status(),
        404
    );
}
