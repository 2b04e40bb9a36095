//! Text the database cannot hold. PostgreSQL refuses U+0000 in text columns (SQLite takes
//! it), so the server refuses it where text comes in, on both engines alike: a 422 or a
//! validation error frame, never a 500; and lookups by a client-supplied key holding it
//! simply find nothing.

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{spawn_app, WsClient, PASSWORD};

const NUL: &str = "a\u{0}b";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_characters_are_refused_as_invalid_input_on_every_engine() {
    let app = spawn_app().await;
    let with_nul_name = app
        .post_json(
            "/auth/register",
            None,
            &json!({"email": "nul-name@example.com", "password": PASSWORD, "name": NUL}),
        )
        .await;
    assert_eq!(with_nul_name.status(), 422);
    let nul_email = format!("{NUL}@example.com");
    assert_eq!(app.register_raw(&nul_email, PASSWORD).await.status(), 422);
    assert_eq!(app.login(&nul_email, PASSWORD).await.status(), 401);

    let user = app.register().await;
    let title = app
        .post_json("/api/threads", Some(user.token()), &json!({"title": NUL}))
        .await;
    assert_eq!(title.status(), 422);
    let thread: serde_json::Value = app
        .post_json("/api/threads", Some(user.token()), &json!({"title": "ok"}))
        .await
        .json()
        .await
        .unwrap();
    let run = app
        .post_json(
            &format!("/api/threads/{}/runs", thread["id"].as_str().unwrap()),
            Some(user.token()),
            &json!({"message": NUL}),
        )
        .await;
    assert_eq!(run.status(), 422);
    let usage = app
        .post_json(
            "/api/usage/events",
            Some(user.token()),
            &json!([{"provider": NUL, "model": "gpt-4o", "workload": "chat",
                     "timestamp": chrono::Utc::now().to_rfc3339(),
                     "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1}]),
        )
        .await;
    assert_eq!(usage.status(), 422);

    let mut ws = app.ws_connect(&user).await;
    ws.send_json(json!({"type": "user_message", "text": NUL}))
        .await;
    let reply = ws.next_json().await;
    assert_eq!(reply["error_code"], "VALIDATION_ERROR", "{reply}");
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next_json().await["type"], "pong");

    // A ticket nobody could have been given is refused like any unknown ticket.
    let url = format!("{}?ticket=a%00b", app.ws_address);
    let mut refused = WsClient::connect(url.as_str().into_client_request().unwrap())
        .await
        .unwrap();
    assert_eq!(refused.next_json().await["error_code"], "AUTH_FAILED");
    assert_eq!(refused.expect_close().await.0, 1008);
}
