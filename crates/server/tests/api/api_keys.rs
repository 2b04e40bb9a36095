//! API keys (`POST/GET /api/keys`, `DELETE /api/keys/{id}`): shown once, stored as a digest,
//! acting as their maker on the routes of their scopes and nowhere else, and dead the moment
//! they are revoked or expire, streams included.

use std::time::Duration;

use apex_server::ids::UserId;
use apex_server::store::ApiKeyRecord;
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, TestApp, TestUser};

/// How long a stream opened with a revoked key may outlive it (the bound is one second;
/// the rest is room for a loaded machine).
const REVOKED_STREAM_BOUND: Duration = Duration::from_secs(3);

async fn create_key(app: &TestApp, user: &TestUser, body: Value) -> (u16, Value) {
    let response = app.post_json("/api/keys", Some(user.token()), &body).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A new key of `user` with `scopes`; returns (key, id).
async fn key_with(app: &TestApp, user: &TestUser, scopes: &[&str]) -> (String, String) {
    let (status, body) =
        create_key(app, user, json!({"name": "a program", "scopes": scopes})).await;
    assert_eq!(status, 201, "{body}");
    (
        body["key"].as_str().unwrap().to_string(),
        body["id"].as_str().unwrap().to_string(),
    )
}

async fn get_with(app: &TestApp, path: &str, token: &str) -> (u16, Value) {
    let response = app.get(path, token).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_key_is_shown_once_listed_by_its_prefix_and_revoked_for_good() {
    let app = spawn_app_with(|_| {}).await;
    let user = app.register().await;
    let (status, created) = create_key(
        &app,
        &user,
        json!({"name": " nightly export ", "scopes": ["usage:read", "usage:read"], "expires_in_days": 30}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap();
    assert!(key.starts_with("apx_") && key.len() == 52, "{key}");
    assert_eq!(created["name"], "nightly export");
    assert_eq!(created["scopes"], json!(["usage:read"]));
    assert!(key.starts_with(created["prefix"].as_str().unwrap()));
    assert!(created["expires_at"].is_string());

    let (status, listed) = get_with(&app, "/api/keys", user.token()).await;
    assert_eq!(status, 200);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], created["id"]);
    assert!(
        !listed[0].to_string().contains(&key[12..]),
        "the key itself is never listed: {listed:?}"
    );
    // Stored as a digest only: the store has no row holding the key's text.
    let owner = UserId::parse(&user.id).unwrap();
    let stored = app.state.infra.store.list_api_keys(owner, 0).await.unwrap();
    assert!(!format!("{stored:?}").contains(&key[12..]));

    let (status, _) = get_with(&app, "/api/usage/summary?days=30", key).await;
    assert_eq!(status, 200);
    let id = created["id"].as_str().unwrap();
    let revoke = |token: String| {
        let url = app.url(&format!("/api/keys/{id}"));
        let http = app.http.clone();
        async move {
            http.delete(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(revoke(user.token().to_string()).await, 204);
    let (status, body) = get_with(&app, "/api/usage/summary?days=30", key).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "invalid_token");
    assert_eq!(
        revoke(user.token().to_string()).await,
        404,
        "already revoked"
    );
    let (_, listed) = get_with(&app, "/api/keys", user.token()).await;
    assert_eq!(listed, json!([]));

    // Another user's key id answers like a missing one, and the key goes on working.
    let stranger = app.register().await;
    let (theirs, their_id) = key_with(&app, &stranger, &["usage:read"]).await;
    let response = app
        .http
        .delete(app.url(&format!("/api/keys/{their_id}")))
        .bearer_auth(user.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(get_with(&app, "/api/usage/summary", &theirs).await.0, 200);
}

#[tokio::test]
async fn a_key_opens_only_the_routes_of_its_scopes() {
    let app = spawn_app_with(|_| {}).await;
    let user = app.register().await;
    let (reader, _) = key_with(&app, &user, &["usage:read"]).await;

    // Its own scope: the maker's figures.
    let (status, summary) = get_with(&app, "/api/usage/summary?days=30", &reader).await;
    assert_eq!(status, 200);
    let own = app.usage_summary(&user).await;
    assert_eq!(summary["total_requests"], own.total_requests);

    // Other scopes' routes, and the routes no key may use.
    for (method, path) in [
        ("GET", "/api/threads"),
        ("POST", "/api/usage/events"),
        ("GET", "/api/keys"),
        ("POST", "/api/keys"),
        ("GET", "/auth/me"),
        ("GET", "/auth/sessions"),
        ("POST", "/auth/logout-all"),
        ("POST", "/api/websocket/ticket"),
        ("PUT", "/api/settings"),
    ] {
        let request = match method {
            "GET" => app.http.get(app.url(path)),
            "PUT" => app
                .http
                .put(app.url(path))
                .json(&json!({"require_approval": true})),
            _ => app
                .http
                .post(app.url(path))
                .json(&json!({"name": "x", "scopes": ["chat"]})),
        };
        let response = request.bearer_auth(&reader).send().await.unwrap();
        assert_eq!(response.status(), 403, "{method} {path}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["error"]["code"], "insufficient_scope",
            "{method} {path}"
        );
    }
    // The maker's sessions are untouched by all that.
    assert_eq!(get_with(&app, "/auth/me", user.token()).await.0, 200);

    // A key never opens a socket.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            app.ws_address.as_str(),
        )
        .unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {reader}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(_) => {}
        Ok((mut socket, _)) => {
            use futures_util::StreamExt;
            let first = socket.next().await;
            let text = format!("{first:?}");
            assert!(
                text.contains("AUTH_FAILED") || text.contains("Close"),
                "{text}"
            );
        }
    }

    // Unknown or mangled keys are unknown.
    let (status, _) = get_with(&app, "/api/usage/summary", "apx_0123456789abcdef").await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn rows_written_with_a_key_are_its_makers_whatever_they_say() {
    let app = spawn_app_with(|s| s.demo_data = false).await;
    let maker = app.register().await;
    let other = app.register().await;
    let (writer, _) = key_with(&app, &maker, &["usage:write"]).await;
    let ts = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let rows = json!([
        {"provider": "openai", "model": "gpt-4o", "workload": "etl", "timestamp": ts,
         "prompt_tokens": 1000, "completion_tokens": 100, "latency_ms": 500,
         "user_id": other.id, "owner": other.id}
    ]);
    let response = app
        .post_json("/api/usage/events", Some(&writer), &rows)
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(app.usage_summary(&maker).await.total_requests, 1);
    assert_eq!(app.usage_summary(&other).await.total_requests, 0);
    // Writing is not reading.
    assert_eq!(get_with(&app, "/api/usage/summary", &writer).await.0, 403);
}

#[tokio::test]
async fn a_chat_key_runs_the_pipeline_over_rest_and_its_stream_ends_when_it_is_revoked() {
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(200)).await;
    let user = app.register().await;
    let (chat, id) = key_with(&app, &user, &["chat"]).await;
    assert_eq!(get_with(&app, "/v1/models", &chat).await.0, 200);
    let thread: Value = app
        .post_json("/api/threads", Some(&chat), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let thread = thread["id"].as_str().unwrap();
    let response = app
        .post_json(
            &format!("/api/threads/{thread}/runs"),
            Some(&chat),
            &json!({"message": "How can I reduce my LLM costs?"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let run = response.json::<Value>().await.unwrap()["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The maker sees the thread: the key acts as them.
    let (status, threads) = get_with(&app, "/api/threads", user.token()).await;
    assert_eq!(status, 200);
    assert!(threads.to_string().contains(thread));

    let stream = app
        .http
        .get(app.url(&format!("/api/runs/{run}/events")))
        .bearer_auth(&chat)
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let response = app
        .http
        .delete(app.url(&format!("/api/keys/{id}")))
        .bearer_auth(user.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let body = tokio::time::timeout(REVOKED_STREAM_BOUND, stream.text())
        .await
        .expect("the stream of a revoked key must end")
        .unwrap();
    assert!(body.contains("event: error"), "{body}");
    assert!(
        !body.contains("\"agent_name\":\"supervisor\",\"status\""),
        "the run had not ended; the revocation ended the stream: {body}"
    );
    assert_eq!(get_with(&app, "/api/threads", &chat).await.0, 401);
}

#[tokio::test]
async fn bad_key_requests_are_refused_and_expired_keys_are_dead() {
    let app = spawn_app_with(|_| {}).await;
    let user = app.register().await;
    for (body, why) in [
        (json!({"name": "", "scopes": ["chat"]}), "empty name"),
        (
            json!({"name": "x".repeat(101), "scopes": ["chat"]}),
            "long name",
        ),
        (json!({"name": "x", "scopes": []}), "no scope"),
        (json!({"name": "x", "scopes": ["admin"]}), "unknown scope"),
        (
            json!({"name": "x", "scopes": ["chat"], "expires_in_days": 0}),
            "zero days",
        ),
        (
            json!({"name": "x", "scopes": ["chat"], "expires_in_days": 4000}),
            "too long",
        ),
    ] {
        let (status, answer) = create_key(&app, &user, body).await;
        assert_eq!(status, 422, "{why}: {answer}");
        assert_eq!(answer["error"]["code"], "validation_failed", "{why}");
    }
    assert_eq!(get_with(&app, "/api/keys", user.token()).await.1, json!([]));

    // A key past its expiry (stored as the server stores keys: by digest).
    use sha2::{Digest, Sha256};
    let key = format!("apx_{}", "ab".repeat(24));
    let digest: String = Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let now = chrono::Utc::now().timestamp_millis();
    let record = ApiKeyRecord {
        id: "key_expired".into(),
        user_id: UserId::parse(&user.id).unwrap(),
        name: "old".into(),
        prefix: key[..12].to_string(),
        scopes: vec!["usage:read".into()],
        created_at_ms: now - 10_000,
        expires_at_ms: Some(now - 1),
        last_used_at_ms: None,
        revoked_at_ms: None,
    };
    app.state
        .infra
        .store
        .create_api_key(&record, &digest)
        .await
        .unwrap();
    assert_eq!(get_with(&app, "/api/usage/summary", &key).await.0, 401);
}
