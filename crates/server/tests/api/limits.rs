//! Fair limits: concurrent runs, busy threads, message rate, connections, logins; and
//! connection state that does not outlive its connection.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{spawn_app, spawn_app_with, WsClient, PASSWORD};

const QUESTION: &str = "How can I reduce my LLM costs?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_runs_per_user_are_capped_across_connections() {
    let app = spawn_app_with(|s| {
        s.template_stream_delay = Duration::from_millis(100);
        s.limits.max_concurrent_runs_per_user = 2;
    })
    .await;
    let user = app.register().await;
    let other = app.register().await;
    let mut first = app.ws_connect(&user).await;
    let mut second = app.ws_connect(&user).await;
    first
        .send_json(json!({"type": "user_message", "text": QUESTION}))
        .await;
    first.expect_type("run_accepted").await;
    second
        .send_json(json!({"type": "user_message", "text": QUESTION}))
        .await;
    second.expect_type("run_accepted").await;
    // A third run from either connection is refused...
    second
        .send_json(json!({"type": "user_message", "text": QUESTION}))
        .await;
    let refused = second.expect_type("error_message").await;
    assert_eq!(refused["error_code"], "TOO_MANY_RUNS");
    // ...but another user is not affected.
    let mut theirs = app.ws_connect(&other).await;
    theirs
        .send_json(json!({"type": "user_message", "text": QUESTION}))
        .await;
    theirs.expect_type("run_accepted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_with_a_run_in_progress_is_busy_until_the_terminal_event() {
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(20)).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let accepted = ws.start_run(QUESTION).await;
    let thread_id = accepted["thread_id"].as_str().unwrap().to_string();
    let run_id = accepted["run_id"].as_str().unwrap().to_string();
    // Refused only when asked to (the default strategy queues it: see `multitask`).
    ws.send_json(json!({
        "type": "user_message",
        "text": "and latency?",
        "thread_id": thread_id,
        "multitask_strategy": "reject",
    }))
    .await;
    assert_eq!(
        ws.expect_type("error_message").await["error_code"],
        "THREAD_BUSY"
    );
    ws.collect_run(&run_id).await;
    // Right after the terminal event the thread takes the next message.
    let next = ws.ask("and latency?", Some(&thread_id)).await;
    assert_eq!(next.terminal().status(), Some("completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_rate_get_rate_limited_with_a_retry_hint() {
    let app = spawn_app_with(|s| {
        s.limits.message_burst = 2;
        s.limits.messages_per_minute = 1;
    })
    .await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    ws.ask(QUESTION, None).await;
    let thread: serde_json::Value = app
        .post_json("/api/threads", Some(user.token()), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let path = format!("/api/threads/{}/runs", thread["id"].as_str().unwrap());
    // The second message of the burst goes over REST: the limit is per user, not per channel.
    let accepted = app
        .post_json(&path, Some(user.token()), &json!({"message": QUESTION}))
        .await;
    assert_eq!(accepted.status(), 202);
    let limited = app
        .post_json(&path, Some(user.token()), &json!({"message": QUESTION}))
        .await;
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let body: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    ws.send_json(json!({"type": "user_message", "text": QUESTION}))
        .await;
    let frame = ws.expect_type("error_message").await;
    assert_eq!(frame["error_code"], "RATE_LIMITED");
    assert!(frame["retry_after_ms"].as_u64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_user_are_capped_and_slots_come_back() {
    let app = spawn_app_with(|s| s.limits.max_connections_per_user = 2).await;
    let user = app.register().await;
    let first = app.ws_connect(&user).await;
    let _second = app.ws_connect(&user).await;
    let mut request = app.ws_address.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", user.token()).parse().unwrap(),
    );
    let mut third = WsClient::connect(request).await.unwrap();
    assert_eq!(
        third.next_json().await["error_code"],
        "TOO_MANY_CONNECTIONS"
    );
    assert_eq!(third.expect_close().await.0, 1008);

    first.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut request = app.ws_address.as_str().into_client_request().unwrap();
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", user.token()).parse().unwrap(),
        );
        let mut again = WsClient::connect(request).await.unwrap();
        if again.next_json().await["type"] == "connection_established" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_attempts_are_throttled_per_account() {
    let app = spawn_app_with(|s| s.limits.login_attempts_per_account = 3).await;
    let user = app.register().await;
    for _ in 0..3 {
        assert_eq!(
            app.login(&user.email, "wrong password!").await.status(),
            401
        );
    }
    let throttled = app.login(&user.email, PASSWORD).await;
    assert_eq!(throttled.status(), 429, "even the right password waits");
    assert!(throttled.headers().contains_key("retry-after"));
    // Another account from the same address is still fine.
    let other = app.register().await;
    assert_eq!(app.login(&other.email, PASSWORD).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connect_disconnect_cycles_leave_no_per_connection_state() {
    let app = spawn_app().await;
    let users = [app.register().await, app.register().await];
    for cycle in 0..1000 {
        let ws = app.ws_connect(&users[cycle % 2]).await;
        ws.close().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let subscriptions = app.state.infra.bus.subscribed_users();
        let connected = app.state.limits.users_with_connections();
        if subscriptions == 0 && connected == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left behind: {subscriptions} bus entries, {connected} connection counters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(app.state.runs.is_empty());
}
