//! WebSocket authentication (ticket, header, subprotocol, failure) and frame errors.

use base64::Engine;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{spawn_app, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_a_bearer_header() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    ws.send_json(json!({"type": "ping", "timestamp": 1, "connection_id": "x"}))
        .await;
    assert_eq!(ws.next_json().await["type"], "pong");
    ws.send_json(json!({"type": "heartbeat"})).await;
    assert_eq!(ws.next_json().await["type"], "heartbeat_ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_a_single_use_ticket() {
    let app = spawn_app().await;
    let user = app.register().await;
    let ticket = app
        .ticket(&user, json!({"ttl_seconds": 30, "single_use": true}))
        .await;
    assert_eq!(ticket["single_use"], true);
    assert_eq!(ticket["ttl_seconds"], 30);
    assert!(ticket["expires_at"].as_i64().unwrap() > ticket["created_at"].as_i64().unwrap());
    assert!(ticket["websocket_url"].as_str().unwrap().ends_with("/ws"));
    let url = format!(
        "{}?ticket={}",
        app.ws_address,
        ticket["ticket_id"].as_str().unwrap()
    );

    let mut ws = WsClient::connect(url.as_str().into_client_request().unwrap())
        .await
        .unwrap();
    let hello = ws.next_json().await;
    assert_eq!(hello["type"], "connection_established");
    assert_eq!(hello["data"]["user_id"], user.id.as_str());
    assert_eq!(hello["data"]["protocol_version"], 1);

    // Used once: the second attempt is refused with 1008 and a reason naming the ticket.
    let mut again = WsClient::connect(url.as_str().into_client_request().unwrap())
        .await
        .unwrap();
    let error = again.next_json().await;
    assert_eq!(error["type"], "error_message");
    assert_eq!(error["error_code"], "AUTH_FAILED");
    let (code, reason) = again.expect_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("ticket"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_the_jwt_subprotocol_and_echoes_it() {
    let app = spawn_app().await;
    let user = app.register().await;
    let protocol = format!(
        "jwt.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(user.token())
    );
    let mut request = app.ws_address.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response
            .headers()
            .get("sec-websocket-protocol")
            .unwrap()
            .to_str()
            .unwrap(),
        protocol
    );
    use futures_util::StreamExt;
    let hello = socket.next().await.unwrap().unwrap();
    let hello: serde_json::Value = serde_json::from_str(hello.to_text().unwrap()).unwrap();
    assert_eq!(hello["data"]["user_id"], user.id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_auth_failed_and_close_1008() {
    let app = spawn_app().await;
    let user = app.register().await;
    for setup in ["none", "garbage", "refresh-token"] {
        let mut request = app.ws_address.as_str().into_client_request().unwrap();
        let token = match setup {
            "none" => None,
            "garbage" => Some("abc.def.ghi".to_string()),
            _ => Some(user.tokens.refresh_token.clone()),
        };
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        let mut ws = WsClient::connect(request).await.unwrap();
        let error = ws.next_json().await;
        assert_eq!(error["error_code"], "AUTH_FAILED", "{setup}");
        assert_eq!(ws.expect_close().await.0, 1008, "{setup}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_the_connection_stays_open() {
    let app = spawn_app().await;
    let alice = app.register().await;
    let bob = app.register().await;
    let bobs_thread: serde_json::Value = app
        .post_json(
            "/api/threads",
            Some(bob.token()),
            &json!({"title": "bob's"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let mut ws = app.ws_connect(&alice).await;

    let cases = [
        ("{not json".to_string(), "JSON_PARSE_ERROR"),
        (
            json!({"type": "teleport"}).to_string(),
            "UNKNOWN_MESSAGE_TYPE",
        ),
        (json!({"no_type": true}).to_string(), "VALIDATION_ERROR"),
        (
            json!({"type": "user_message"}).to_string(),
            "VALIDATION_ERROR",
        ),
        (
            json!({"type": "user_message", "text": "hi", "thread_id": bobs_thread["id"]})
                .to_string(),
            "THREAD_NOT_FOUND",
        ),
        (
            json!({"type": "user_message", "text": "hi", "thread_id": "my-own-thread"}).to_string(),
            "THREAD_NOT_FOUND",
        ),
        (
            json!({"type": "get_thread_history", "thread_id": bobs_thread["id"]}).to_string(),
            "THREAD_NOT_FOUND",
        ),
        (
            json!({"type": "stop_agent", "run_id": "null"}).to_string(),
            "RUN_NOT_FOUND",
        ),
        (
            json!({"type": "resume", "run_id": uuid::Uuid::new_v4().to_string(), "after_seq": 0})
                .to_string(),
            "RUN_NOT_FOUND",
        ),
    ];
    for (frame, code) in cases {
        ws.send_text(frame.clone()).await;
        let reply = ws.next_json().await;
        assert_eq!(reply["type"], "error_message", "{frame}");
        assert_eq!(reply["error_code"], code, "{frame}");
    }
    ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(ws.next_json().await["type"], "pong");

    // Bob's thread is untouched by Alice's attempts.
    let messages: serde_json::Value = app
        .get(
            &format!(
                "/api/threads/{}/messages",
                bobs_thread["id"].as_str().unwrap()
            ),
            bob.token(),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(messages["total"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_size_limit_closes_with_1009() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let huge = json!({"type": "user_message", "text": "x".repeat(70 * 1024)});
    ws.send_text(huge.to_string()).await;
    assert_eq!(ws.expect_close().await.0, 1009);
}
