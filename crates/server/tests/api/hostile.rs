//! Hostile input: forged and misused tokens, malformed frames and bodies, other users' ids.
//! Every case gets its documented answer (docs/errors.md), the server keeps serving, and a
//! bystander's data is unchanged.

use base64::Engine;
use futures_util::SinkExt;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{spawn_app, TestApp, TestUser, WsClient, JWT_SECRET};

/// method, path, content type, body, expected status, expected code.
type RestCase = (
    reqwest::Method,
    String,
    Option<&'static str>,
    Option<String>,
    u16,
    &'static str,
);

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn claims(user: &TestUser, overrides: Value) -> Value {
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({
        "sub": user.id, "iat": now, "exp": now + 600, "jti": uuid::Uuid::new_v4().to_string(),
        "type": "access", "iss": "apex", "aud": "apex-api",
    });
    for (key, value) in overrides.as_object().unwrap() {
        claims[key] = value.clone();
    }
    claims
}

fn sign(claims: &Value, secret: &str) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// What a bystander can see of their own data; must not change while others attack.
async fn snapshot(app: &TestApp, user: &TestUser) -> Value {
    let threads: Value = app
        .get("/api/threads", user.token())
        .await
        .json()
        .await
        .unwrap();
    let mut messages = Vec::new();
    for thread in threads.as_array().unwrap() {
        let page: Value = app
            .get(
                &format!("/api/threads/{}/messages", thread["id"].as_str().unwrap()),
                user.token(),
            )
            .await
            .json()
            .await
            .unwrap();
        messages.push(page["messages"].clone());
    }
    let mut summary: Value = app
        .get("/api/usage/summary", user.token())
        .await
        .json()
        .await
        .unwrap();
    // The window moves with the clock; the data is what must not change.
    summary["window_start"] = Value::Null;
    json!({"threads": threads, "messages": messages, "summary": summary})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misused_tokens_are_refused() {
    let app = spawn_app().await;
    let user = app.register().await;
    let now = chrono::Utc::now().timestamp();
    let forged_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(&user, json!({})).to_string().as_bytes())
    );
    let logged_out: Value = app
        .post_json(
            "/auth/login",
            None,
            &json!({"email": user.email, "password": crate::helpers::PASSWORD}),
        )
        .await
        .json()
        .await
        .unwrap();
    let revoked = logged_out["access_token"].as_str().unwrap().to_string();
    assert_eq!(
        app.post_json("/auth/logout", Some(&revoked), &json!({}))
            .await
            .status(),
        204
    );

    let cases: Vec<(&str, String)> = vec![
        (
            "expired",
            sign(
                &claims(&user, json!({"exp": now - 3600, "iat": now - 7200})),
                JWT_SECRET,
            ),
        ),
        (
            "not yet valid",
            sign(&claims(&user, json!({"nbf": now + 3600})), JWT_SECRET),
        ),
        (
            "another key",
            sign(
                &claims(&user, json!({})),
                "some-other-secret-some-other-secret",
            ),
        ),
        ("alg none", forged_none),
        (
            "wrong audience",
            sign(&claims(&user, json!({"aud": "someone-else"})), JWT_SECRET),
        ),
        (
            "wrong issuer",
            sign(&claims(&user, json!({"iss": "evil"})), JWT_SECRET),
        ),
        (
            "refresh type",
            sign(&claims(&user, json!({"type": "refresh"})), JWT_SECRET),
        ),
        (
            "unknown type",
            sign(&claims(&user, json!({"type": "admin"})), JWT_SECRET),
        ),
        (
            "placeholder subject",
            sign(&claims(&user, json!({"sub": "null"})), JWT_SECRET),
        ),
        ("refresh token as access", user.tokens.refresh_token.clone()),
        ("revoked by logout", revoked),
        ("garbage", "not-a-token".into()),
        ("empty", String::new()),
        (
            "truncated",
            user.token()[..user.token().len() - 5].to_string(),
        ),
    ];
    for (name, token) in &cases {
        let response = app
            .http
            .get(app.url("/auth/me"))
            .header("Authorization", format!("Bearer {token}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{name}");
        let code: Value = response.json().await.unwrap();
        assert!(
            code["error"]["code"] == "invalid_token" || code["error"]["code"] == "unauthorized",
            "{name}: {code}"
        );
        // The same tokens cannot open a socket either.
        let mut request = app.ws_address.as_str().into_client_request().unwrap();
        if !token.is_empty() {
            request
                .headers_mut()
                .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        }
        let mut ws = WsClient::connect(request).await.unwrap();
        assert_eq!(ws.next_json().await["error_code"], "AUTH_FAILED", "{name}");
        assert_eq!(ws.expect_close().await.0, 1008, "{name}");
    }
    // Other schemes and a bad subprotocol.
    let basic = app
        .http
        .get(app.url("/auth/me"))
        .header("Authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
    let mut request = app.ws_address.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "jwt.%%%notbase64".parse().unwrap(),
    );
    let mut ws = WsClient::connect(request).await.unwrap();
    assert_eq!(ws.next_json().await["error_code"], "AUTH_FAILED");
    for ticket in ["", "x", &"a".repeat(500)] {
        let url = format!("{}?ticket={ticket}", app.ws_address);
        let mut ws = WsClient::connect(url.as_str().into_client_request().unwrap())
            .await
            .unwrap();
        assert_eq!(
            ws.next_json().await["error_code"],
            "AUTH_FAILED",
            "ticket {ticket:?}"
        );
        let (code, reason) = ws.expect_close().await;
        assert_eq!(code, 1008);
        assert!(
            reason.contains("ticket") || reason.contains("authentication"),
            "{reason}"
        );
    }
    // The real token still works.
    assert_eq!(app.get("/auth/me", user.token()).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_websocket_frames_get_their_documented_errors() {
    let app = spawn_app().await;
    let attacker = app.register().await;
    let bystander = app.register().await;
    let mut bystander_ws = app.ws_connect(&bystander).await;
    bystander_ws
        .ask("How can I reduce my LLM costs?", None)
        .await;
    let before = snapshot(&app, &bystander).await;
    let bystander_thread = before["threads"][0]["id"].as_str().unwrap().to_string();

    let mut ws = app.ws_connect(&attacker).await;
    let nested = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let deep_object = format!(
        "{}1{}",
        r#"{"type":"ping","x":"#.repeat(300),
        "}".repeat(300)
    );
    let cases: Vec<(String, &str)> = vec![
        ("".into(), "JSON_PARSE_ERROR"),
        ("{".into(), "JSON_PARSE_ERROR"),
        (nested, "JSON_PARSE_ERROR"),
        (deep_object, "JSON_PARSE_ERROR"),
        ("null".into(), "VALIDATION_ERROR"),
        ("42".into(), "VALIDATION_ERROR"),
        (r#""user_message""#.into(), "VALIDATION_ERROR"),
        ("[]".into(), "VALIDATION_ERROR"),
        (json!({"type": null}).to_string(), "VALIDATION_ERROR"),
        (json!({"type": ["ping"]}).to_string(), "VALIDATION_ERROR"),
        (json!({"type": "PING"}).to_string(), "UNKNOWN_MESSAGE_TYPE"),
        (json!({"type": "x".repeat(10_000)}).to_string(), "UNKNOWN_MESSAGE_TYPE"),
        (json!({"type": "user_message", "text": 123}).to_string(), "VALIDATION_ERROR"),
        (json!({"type": "user_message", "text": ["a"]}).to_string(), "VALIDATION_ERROR"),
        (json!({"type": "user_message", "text": "x".repeat(20_000)}).to_string(), "VALIDATION_ERROR"),
        (json!({"type": "user_message", "text": "hi", "thread_id": 42}).to_string(), "THREAD_NOT_FOUND"),
        (json!({"type": "user_message", "text": "hi", "thread_id": {"$ne": null}}).to_string(), "THREAD_NOT_FOUND"),
        (json!({"type": "user_message", "text": "hi", "thread_id": "' OR 1=1 --"}).to_string(), "THREAD_NOT_FOUND"),
        (json!({"type": "user_message", "text": "hi", "thread_id": bystander_thread}).to_string(), "THREAD_NOT_FOUND"),
        (json!({"type": "start_agent", "payload": {"user_request": "hi", "thread_id": bystander_thread}}).to_string(), "THREAD_NOT_FOUND"),
        (json!({"type": "user_message", "text": "hi", "user_id": bystander.id, "thread_id": bystander_thread}).to_string(), "THREAD_NOT_FOUND"),
        (json!({"type": "get_thread_history", "thread_id": bystander_thread}).to_string(), "THREAD_NOT_FOUND"),
        (json!({"type": "get_thread_history"}).to_string(), "THREAD_NOT_FOUND"),
        (json!({"type": "resume", "run_id": {"a": 1}, "after_seq": "x"}).to_string(), "RUN_NOT_FOUND"),
        (json!({"type": "resume"}).to_string(), "RUN_NOT_FOUND"),
        (json!({"type": "stop_agent", "run_id": "undefined"}).to_string(), "RUN_NOT_FOUND"),
        (json!({"type": "stop_agent", "run_id": uuid::Uuid::nil().to_string()}).to_string(), "RUN_NOT_FOUND"),
        (json!({"type": "stop_agent"}).to_string(), "RUN_NOT_ACTIVE"),
    ];
    let count = cases.len();
    for (frame, code) in cases {
        ws.send_text(frame.clone()).await;
        let reply = ws.next_json().await;
        assert_eq!(
            reply["type"],
            "error_message",
            "{}",
            &frame[..frame.len().min(80)]
        );
        assert_eq!(
            reply["error_code"],
            code,
            "{}",
            &frame[..frame.len().min(80)]
        );
    }
    // Binary frames: UTF-8 JSON is read like text; anything else is a parse error.
    ws.socket
        .send(Message::Binary(vec![0xff, 0xfe, 0x00].into()))
        .await
        .unwrap();
    assert_eq!(ws.next_json().await["error_code"], "JSON_PARSE_ERROR");
    ws.socket
        .send(Message::Binary(br#"{"type":"ping"}"#.to_vec().into()))
        .await
        .unwrap();
    assert_eq!(ws.next_json().await["type"], "pong");
    // A flood of pings is answered in order; the connection survives it.
    for _ in 0..300 {
        ws.send_json(json!({"type": "ping"})).await;
    }
    for _ in 0..300 {
        assert_eq!(ws.next_json().await["type"], "pong");
    }
    // A flood of messages is rate limited, not executed.
    let mut limited = 0;
    for _ in 0..30 {
        ws.send_json(json!({"type": "user_message", "text": "flood"}))
            .await;
    }
    let mut accepted = 0;
    while accepted + limited < 30 {
        let frame = ws.next_json().await;
        match (
            frame["type"].as_str().unwrap(),
            frame["error_code"].as_str(),
        ) {
            ("run_accepted", _) => accepted += 1,
            ("error_message", Some("RATE_LIMITED")) | ("error_message", Some("TOO_MANY_RUNS")) => {
                limited += 1
            }
            _ => {}
        }
    }
    assert!(limited >= 20, "{limited} of 30 refused");
    assert!(count + 4 >= 30);

    assert_eq!(
        snapshot(&app, &bystander).await,
        before,
        "the bystander's data is unchanged"
    );
    bystander_ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(
        bystander_ws.next_json().await["type"],
        "pong",
        "and they received nothing of it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rest_requests_get_their_documented_errors() {
    let app = spawn_app().await;
    let attacker = app.register().await;
    let bystander = app.register().await;
    let mut bystander_ws = app.ws_connect(&bystander).await;
    let run = bystander_ws
        .ask("How can I reduce my LLM costs?", None)
        .await;
    let before = snapshot(&app, &bystander).await;
    let (thread, run_id) = (run.thread_id.clone(), run.run_id.clone());
    let token = attacker.token().to_string();

    let send = |method: reqwest::Method,
                path: String,
                content_type: Option<&'static str>,
                body: Option<String>| {
        let mut request = app.http.request(method, app.url(&path)).bearer_auth(&token);
        if let Some(content_type) = content_type {
            request = request.header("Content-Type", content_type);
        }
        if let Some(body) = body {
            request = request.body(body);
        }
        request.send()
    };
    use reqwest::Method as M;
    const JSON: Option<&str> = Some("application/json");
    let cases: Vec<RestCase> = vec![
        (
            M::POST,
            "/api/threads".into(),
            JSON,
            Some("{oops".into()),
            400,
            "invalid_json",
        ),
        (
            M::POST,
            "/api/threads".into(),
            Some("text/plain"),
            Some("{}".into()),
            415,
            "unsupported_media_type",
        ),
        (
            M::POST,
            "/api/threads".into(),
            JSON,
            Some(r#"{"title": 5}"#.into()),
            422,
            "validation_failed",
        ),
        (
            M::POST,
            "/api/threads".into(),
            JSON,
            Some(format!("{{\"title\":\"{}\"}}", "x".repeat(300))),
            422,
            "validation_failed",
        ),
        (
            M::POST,
            "/api/threads".into(),
            JSON,
            Some(r#"{"metadata": "x"}"#.into()),
            422,
            "validation_failed",
        ),
        (
            M::GET,
            "/api/threads?limit=-1".into(),
            None,
            None,
            422,
            "validation_failed",
        ),
        (
            M::GET,
            "/api/threads?limit=abc".into(),
            None,
            None,
            422,
            "validation_failed",
        ),
        (
            M::GET,
            "/api/threads?offset=-5".into(),
            None,
            None,
            422,
            "validation_failed",
        ),
        (
            M::GET,
            "/api/usage/summary?days=366".into(),
            None,
            None,
            422,
            "validation_failed",
        ),
        (
            M::POST,
            "/api/usage/events".into(),
            JSON,
            Some(r#"{"not": "an array"}"#.into()),
            422,
            "validation_failed",
        ),
        (
            M::POST,
            "/api/usage/events".into(),
            JSON,
            Some("[]".into()),
            422,
            "validation_failed",
        ),
        (
            M::POST,
            "/api/usage/events".into(),
            Some("text/csv"),
            Some("a,b\n1,2\n".into()),
            422,
            "validation_failed",
        ),
        (
            M::POST,
            "/api/usage/events".into(),
            Some("application/xml"),
            Some("<x/>".into()),
            415,
            "unsupported_media_type",
        ),
        (
            M::GET,
            format!("/api/threads/{thread}"),
            None,
            None,
            404,
            "not_found",
        ),
        (
            M::PATCH,
            format!("/api/threads/{thread}"),
            JSON,
            Some(r#"{"title": "pwned"}"#.into()),
            404,
            "not_found",
        ),
        (
            M::PUT,
            format!("/api/threads/{thread}"),
            JSON,
            Some(r#"{"title": "pwned"}"#.into()),
            404,
            "not_found",
        ),
        (
            M::DELETE,
            format!("/api/threads/{thread}"),
            None,
            None,
            404,
            "not_found",
        ),
        (
            M::GET,
            format!("/api/threads/{thread}/messages"),
            None,
            None,
            404,
            "not_found",
        ),
        (
            M::POST,
            format!("/api/threads/{thread}/runs"),
            JSON,
            Some(r#"{"message": "hi"}"#.into()),
            404,
            "not_found",
        ),
        (
            M::GET,
            format!("/api/runs/{run_id}"),
            None,
            None,
            404,
            "not_found",
        ),
        (
            M::GET,
            format!("/api/runs/{run_id}/events"),
            None,
            None,
            404,
            "not_found",
        ),
        (
            M::POST,
            format!("/api/runs/{run_id}/cancel"),
            None,
            None,
            404,
            "not_found",
        ),
        (
            M::POST,
            "/api/agent/v2/execute".into(),
            JSON,
            Some(json!({"message": "hi", "thread_id": thread}).to_string()),
            404,
            "not_found",
        ),
        (
            M::GET,
            "/api/threads/..%2F..%2Fetc%2Fpasswd".into(),
            None,
            None,
            404,
            "not_found",
        ),
        (
            M::GET,
            "/api/runs/null".into(),
            None,
            None,
            404,
            "not_found",
        ),
        (
            M::GET,
            "/api/nothing-here".into(),
            None,
            None,
            404,
            "not_found",
        ),
        (
            M::DELETE,
            "/api/usage/summary".into(),
            None,
            None,
            405,
            "method_not_allowed",
        ),
        (
            M::POST,
            "/auth/refresh".into(),
            JSON,
            Some(json!({"refresh_token": token}).to_string()),
            401,
            "invalid_token",
        ),
        (
            M::POST,
            "/auth/register".into(),
            JSON,
            Some(
                json!({"email": format!("{}@x.io", "a".repeat(300)), "password": "long enough"})
                    .to_string(),
            ),
            422,
            "validation_failed",
        ),
        (
            M::POST,
            "/auth/register".into(),
            JSON,
            Some(
                json!({"email": "a@b.io", "password": "long enough", "name": "n".repeat(300)})
                    .to_string(),
            ),
            422,
            "validation_failed",
        ),
        (
            M::POST,
            "/auth/login".into(),
            JSON,
            Some(r#"{"email": ["x"], "password": 1}"#.into()),
            422,
            "validation_failed",
        ),
    ];
    assert!(cases.len() >= 30, "{} cases", cases.len());
    for (method, path, content_type, body, status, code) in cases {
        let response = send(method.clone(), path.clone(), content_type, body)
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(body["error"]["code"], code, "{method} {path}: {body}");
    }
    // An announced oversized body is refused before it is read (raw socket: a client
    // still writing a large body may see the connection close under its answer).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = app.address.strip_prefix("http://").unwrap();
        let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
        let head = format!(
            "POST /api/threads HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 3000000\r\nConnection: close\r\n\r\n"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert!(answer.contains("payload_too_large"), "{answer}");
    }
    let sse = app
        .http
        .get(app.url(&format!("/api/runs/{run_id}/events")))
        .bearer_auth(&token)
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 404, "no stream of another user's run");
    let bad_cursor = app
        .http
        .get(app.url(&format!("/api/runs/{run_id}/events")))
        .bearer_auth(bystander.token())
        .header("Last-Event-ID", "abc")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_cursor.status(), 422);

    assert_eq!(
        snapshot(&app, &bystander).await,
        before,
        "the bystander's data is unchanged"
    );
    assert_eq!(
        app.http
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
