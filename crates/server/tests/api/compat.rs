//! The original web client's exact sequence, and the compatibility routes it uses.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{spawn_app_with, WsClient};

const FRONTEND: &str = "http://localhost:3000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_web_client_completes_its_whole_sequence() {
    let app = spawn_app_with(|s| {
        s.cors_allowed_origins = vec![FRONTEND.to_string()];
        s.template_stream_delay = Duration::from_millis(40);
    })
    .await;
    let user = app.register().await;

    // Preflight: allowed origin echoed with credentials; a foreign one gets no grant.
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/api/threads"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization,content-type",
            )
            .send()
    };
    let allowed = preflight(FRONTEND).await.unwrap();
    assert!(allowed.status().is_success());
    assert_eq!(allowed.headers()["access-control-allow-origin"], FRONTEND);
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );
    let allow_headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(allow_headers.contains("authorization") && allow_headers.contains("content-type"));
    let refused = preflight("http://evil.example").await.unwrap();
    assert!(refused
        .headers()
        .get("access-control-allow-origin")
        .is_none());

    // Ready check, then token validation (header and body forms).
    assert_eq!(
        app.http
            .get(app.url("/health/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let valid: Value = app
        .post_json(
            "/auth/validate-token-and-get-user",
            Some(user.token()),
            &json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(valid["valid"], true);
    assert_eq!(valid["user_id"], user.id.as_str());
    assert_eq!(valid["user"]["email"], user.email.as_str());
    assert_eq!(valid["user"]["full_name"], "Test");
    let by_body: Value = app
        .post_json(
            "/auth/validate-token-and-get-user",
            None,
            &json!({"token": user.token()}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(by_body["valid"], true);
    let invalid: Value = app
        .post_json(
            "/auth/validate-token-and-get-user",
            None,
            &json!({"token": "nope"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(invalid["valid"], false);
    assert!(invalid["error"].is_string());

    // Thread list is a bare array; a new thread is readable at once.
    let list: Value = app
        .get("/api/threads?limit=20&offset=0", user.token())
        .await
        .json()
        .await
        .unwrap();
    assert!(list.is_array());
    let thread: Value = app
        .post_json(
            "/api/threads",
            Some(user.token()),
            &json!({"title": "New chat", "metadata": {"source": "web"}}),
        )
        .await
        .json()
        .await
        .unwrap();
    let thread_id = thread["id"].as_str().unwrap().to_string();

    // Ticket with permissions, then the socket.
    let ticket = app
        .ticket(&user, json!({"ttl_seconds": 300, "single_use": true, "permissions": ["read", "write", "fly"]}))
        .await;
    let url = format!(
        "{}?ticket={}",
        app.ws_address,
        ticket["ticket_id"].as_str().unwrap()
    );
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Origin", FRONTEND.parse().unwrap());
    let mut ws = WsClient::connect(request).await.unwrap();
    assert_eq!(ws.next_json().await["type"], "connection_established");

    // start_agent on the new thread: streamed text, final_report, then the terminal event.
    ws.send_json(json!({"type": "start_agent", "payload": {"user_request": "How can I reduce my LLM costs?", "thread_id": thread_id}})).await;
    let mut message_ids = std::collections::HashSet::new();
    let mut streamed = String::new();
    let report = loop {
        let frame = ws.next_json().await;
        if let Some(id) = frame["payload"]["message_id"].as_str() {
            assert!(message_ids.insert(id.to_string()), "message ids are unique");
        }
        if frame.get("seq").is_some() {
            assert_eq!(frame["thread_id"], thread_id.as_str());
        }
        match frame["type"].as_str().unwrap() {
            "partial_result" => {
                assert_eq!(frame["payload"]["is_complete"], false);
                streamed.push_str(frame["payload"]["content"].as_str().unwrap());
            }
            "final_report" => break frame,
            _ => {}
        }
    };
    assert_eq!(report["payload"]["executive_summary"], streamed.as_str());
    for key in [
        "recommendations",
        "action_plan",
        "cost_analysis",
        "total_duration_ms",
        "message_id",
    ] {
        assert!(
            report["payload"].get(key).is_some(),
            "final_report has {key}"
        );
    }
    let terminal = ws.next_json().await;
    assert_eq!(terminal["type"], "agent_completed");
    assert_eq!(terminal["agent_name"], "supervisor");
    assert_eq!(terminal["final_response"], streamed.as_str());

    // REST views of the thread.
    let fetched: Value = app
        .get(&format!("/api/threads/{thread_id}"), user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(fetched["message_count"], 2);
    let renamed: Value = app
        .http
        .put(app.url(&format!("/api/threads/{thread_id}")))
        .bearer_auth(user.token())
        .json(&json!({"title": "Cost ideas", "metadata": {"pinned": true}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(renamed["title"], "Cost ideas");
    assert_eq!(
        renamed["metadata"],
        json!({"source": "web", "pinned": true})
    );
    let page: Value = app
        .get(
            &format!("/api/threads/{thread_id}/messages?limit=50&offset=0"),
            user.token(),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["total"], 2);
    assert!(page["messages"][0]["created_at"].is_number());
    assert!(page["messages"][1]["content"].is_string());

    // Second question on the same thread, stopped mid-run with an empty stop_agent.
    ws.send_json(json!({"type": "start_agent", "payload": {"user_request": "And latency?", "thread_id": thread_id}})).await;
    ws.expect_type("partial_result").await;
    ws.send_json(json!({"type": "stop_agent", "payload": {}}))
        .await;
    let error = ws.expect_type("error").await;
    assert_eq!(error["payload"]["error_code"], "CANCELLED");
    assert!(error["payload"]["message_id"].is_string());
    let terminal = ws.next_json().await;
    assert_eq!(terminal["agent_name"], "supervisor");
    assert_eq!(terminal["status"], "cancelled");

    // Tolerated frames: switch_thread answers thread_data, session_restore is silent,
    // a ping with extra fields gets its pong.
    ws.send_json(json!({"type": "switch_thread", "payload": {"thread_id": thread_id}}))
        .await;
    let data = ws.next_json().await;
    assert_eq!(data["type"], "thread_data");
    assert_eq!(data["messages"].as_array().unwrap().len(), 3);
    ws.send_json(json!({"type": "switch_thread", "payload": {"thread_id": "not-a-thread"}}))
        .await;
    ws.send_json(json!({"type": "session_restore", "payload": {"threadId": thread_id, "lastMessageId": "x", "connectionId": "y"}})).await;
    ws.send_json(json!({"type": "ping", "timestamp": 123, "connection_id": "abc"}))
        .await;
    assert_eq!(
        ws.next_json().await["type"],
        "pong",
        "nothing else was sent in between"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_from_foreign_origins_are_refused() {
    let app = spawn_app_with(|s| s.cors_allowed_origins = vec![FRONTEND.to_string()]).await;
    let user = app.register().await;
    let open = |origin: Option<&str>| {
        let mut request = app.ws_address.as_str().into_client_request().unwrap();
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", user.token()).parse().unwrap(),
        );
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("Origin", origin.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
    };
    assert!(
        open(Some("http://evil.example")).await.is_err(),
        "foreign origin refused"
    );
    assert!(open(Some(FRONTEND)).await.is_ok());
    let same_origin = app.address.clone();
    assert!(open(Some(&same_origin)).await.is_ok());
    assert!(
        open(None).await.is_ok(),
        "non-browser clients send no Origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_config_dev_login_and_v2_execute() {
    let off = spawn_app_with(|_| {}).await;
    let config: Value = off
        .http
        .get(off.url("/auth/config"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        config,
        json!({"development_mode": false, "oauth_enabled": false, "google_client_id": ""})
    );
    let refused = off
        .post_json(
            "/auth/dev/login",
            None,
            &json!({"email": "dev@example.com", "password": "dev password"}),
        )
        .await;
    assert_eq!(
        refused.status(),
        404,
        "dev login does not exist outside development mode"
    );

    let dev = spawn_app_with(|s| {
        s.development_mode = true;
        s.dev_login = true;
    })
    .await;
    let body = json!({"email": "dev@example.com", "password": "dev password"});
    let first = dev.post_json("/auth/dev/login", None, &body).await;
    assert_eq!(first.status(), 201, "registers on first use");
    let second = dev.post_json("/auth/dev/login", None, &body).await;
    assert_eq!(second.status(), 200, "logs in afterwards");
    let pair: Value = second.json().await.unwrap();
    let token = pair["access_token"].as_str().unwrap();

    let started: Value = dev
        .post_json(
            "/api/agent/v2/execute",
            Some(token),
            &json!({"request_id": "r1", "agent_type": "supervisor", "message": "How can I reduce my LLM costs?",
                    "thread_id": null, "context": {}, "settings": {}}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(started["success"], true);
    let run_id = started["result"]["run_id"].as_str().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let run: Value = dev
            .get(&format!("/api/runs/{run_id}"), token)
            .await
            .json()
            .await
            .unwrap();
        if run["status"] == "completed" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run finished: {run}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_login_of_the_original_client_works_every_time_in_development_mode_only() {
    // What the client sends, automatically and from its "Quick Dev Login" button.
    let dev = json!({"email": "dev@example.com", "password": "dev"});
    let app = spawn_app_with(|s| {
        s.development_mode = true;
        s.dev_login = true;
    })
    .await;
    let first = app.post_json("/auth/dev/login", None, &dev).await;
    assert_eq!(
        first.status(),
        201,
        "created on first use despite a 3-character password"
    );
    let pair: Value = first.json().await.unwrap();
    assert_eq!(pair["user"]["email"], "dev@example.com");
    let user_id = pair["user"]["id"].clone();
    // More than the 10 attempts a minute the login throttle allows one account.
    for attempt in 0..25 {
        let again = app.post_json("/auth/dev/login", None, &dev).await;
        assert_eq!(again.status(), 200, "attempt {attempt}: never throttled");
        let pair: Value = again.json().await.unwrap();
        assert_eq!(pair["user"]["id"], user_id, "always the same account");
    }
    let token = pair["access_token"].as_str().unwrap();
    let me: Value = app.get("/auth/me", token).await.json().await.unwrap();
    assert_eq!(me["email"], "dev@example.com");
    // New accounts get demo data, the dev account included.
    let summary: Value = app
        .get("/api/usage/summary?days=30", token)
        .await
        .json()
        .await
        .unwrap();
    assert!(summary["total_requests"].as_u64().unwrap() > 0, "{summary}");
    // The dev account has no usable password: the ordinary login does not open it.
    assert_eq!(app.login("dev@example.com", "dev").await.status(), 401);
    // Any other email keeps the rules: too short a password is refused.
    let other = app
        .post_json(
            "/auth/dev/login",
            None,
            &json!({"email": "someone@example.com", "password": "dev"}),
        )
        .await;
    assert_eq!(other.status(), 422);

    // Without both switches the route does not exist, whatever the body.
    for (development_mode, dev_login) in [(false, false), (true, false), (false, true)] {
        let off = spawn_app_with(|s| {
            s.development_mode = development_mode;
            s.dev_login = dev_login;
        })
        .await;
        let refused = off.post_json("/auth/dev/login", None, &dev).await;
        assert_eq!(
            refused.status(),
            404,
            "development_mode {development_mode}, dev_login {dev_login}"
        );
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "not_found");
        assert_eq!(off.login("dev@example.com", "dev").await.status(), 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unload_frames_close_quietly() {
    let app = spawn_app_with(|s| {
        s.cors_allowed_origins = vec![FRONTEND.to_string()];
        s.legacy_client.origins = vec![FRONTEND.to_string()];
    })
    .await;
    let user = app.register().await;
    let unload =
        json!({"type": "disconnect", "payload": {"connectionId": "c-1", "reason": "page_unload"}});

    // The original client's socket, and any other: the next frame is a normal close.
    let ticket = app.ticket(&user, json!({})).await;
    let url = format!(
        "{}?ticket={}",
        app.ws_address,
        ticket["ticket_id"].as_str().unwrap()
    );
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Origin", FRONTEND.parse().unwrap());
    let mut original = WsClient::connect(request).await.unwrap();
    assert_eq!(original.next_json().await["type"], "connection_established");
    let mut ordinary = app.ws_connect(&user).await;
    for ws in [&mut original, &mut ordinary] {
        ws.send_json(unload.clone()).await;
        match ws.next_message().await {
            tokio_tungstenite::tungstenite::Message::Close(Some(close)) => {
                assert_eq!(u16::from(close.code), 1000, "{close:?}");
            }
            other => panic!("expected a normal close and nothing before it, got {other:?}"),
        }
    }

    // The beacon: no credentials, any body, 204; from the client's origin with CORS.
    for (content_type, body) in [
        (
            "text/plain;charset=UTF-8",
            r#"{"connectionId":"c-1","reason":"page_unload"}"#,
        ),
        ("application/json", "{}"),
        ("application/octet-stream", ""),
    ] {
        let response = app
            .http
            .post(app.url("/ws/beacon"))
            .header("Origin", FRONTEND)
            .header("Content-Type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204, "{content_type}");
        assert_eq!(response.headers()["access-control-allow-origin"], FRONTEND);
    }
    let get = app.http.get(app.url("/ws/beacon")).send().await.unwrap();
    assert_eq!(get.status(), 405, "only POST");
}
