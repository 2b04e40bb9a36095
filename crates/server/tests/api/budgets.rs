//! Budgets: caps a user sets on their own LLM calls through the gateway, held by reserving
//! what each call can cost at most before it goes out and settling it to what it used.
//! Concurrent calls admit at most what the budget holds; a user without budgets is never
//! refused for one; a refusal says which budget, its limit, what is spent and when it
//! resets.

use std::time::Duration;

use apex_protocol::budgets::Budget;
use axum::response::IntoResponse;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, TestApp, TestUser};

/// 20 characters: the prompt's bound is 20 tokens.
const PROMPT: &str = "Summarise my costs!!";
/// The completion's bound.
const MAX_TOKENS: i64 = 10;

/// An upstream whose every answer uses exactly the call's bound: 20 prompt tokens and 10
/// completion tokens, so a settled call keeps all it reserved. Model `cut` streams two
/// chunks and breaks off.
async fn upstream() -> String {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|axum::Json(body): axum::Json<Value>| async move {
            if body["model"] == "cut" {
                let chunks = futures_util::stream::iter(vec![
                    Ok::<_, std::io::Error>("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"),
                    Ok("data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n"),
                    Err(std::io::Error::other("upstream died")),
                ])
                .then(|chunk| async move {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    chunk
                });
                return (
                    [("content-type", "text/event-stream")],
                    axum::body::Body::from_stream(chunks),
                )
                    .into_response();
            }
            // Slow enough that the calls of a burst overlap.
            tokio::time::sleep(Duration::from_millis(20)).await;
            axum::Json(json!({
                "id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 10, "total_tokens": 30},
            }))
            .into_response()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

pub(crate) async fn app_with_upstream() -> TestApp {
    let url = upstream().await;
    spawn_app_with(move |settings| {
        settings.gateway.upstreams = vec![apex_server::settings::GatewayUpstream {
            name: "openai".into(),
            base_url: url,
            api_key: None,
        }];
    })
    .await
}

pub(crate) async fn key(app: &TestApp, user: &TestUser) -> (String, String) {
    let response = app
        .post_json(
            "/api/keys",
            Some(user.token()),
            &json!({"name": "program", "scopes": ["gateway"]}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    (
        body["key"].as_str().unwrap().into(),
        body["id"].as_str().unwrap().into(),
    )
}

pub(crate) async fn call(app: &TestApp, token: &str, model: &str) -> (u16, Value) {
    let response = app
        .post_json(
            "/v1/chat/completions",
            Some(token),
            &json!({"model": model, "max_tokens": MAX_TOKENS,
                    "messages": [{"role": "user", "content": PROMPT}]}),
        )
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn create(app: &TestApp, user: &TestUser, body: Value) -> Budget {
    let response = app
        .post_json("/api/budgets", Some(user.token()), &body)
        .await;
    assert_eq!(response.status(), 201, "create {body}");
    response.json().await.unwrap()
}

async fn budgets(app: &TestApp, user: &TestUser) -> Vec<Budget> {
    app.get("/api/budgets", user.token())
        .await
        .json()
        .await
        .unwrap()
}

/// 64 calls at once against a budget with room for exactly `k`: `k` are answered, the rest
/// refused with `budget_exceeded`.
async fn burst(app: &TestApp, token: &str, model: &str) -> (usize, usize, Option<Value>) {
    let calls = (0..64).map(|_| call(app, token, model));
    let results = futures_util::future::join_all(calls).await;
    let admitted = results.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 402)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(admitted + refused.len(), 64, "{results:?}");
    (
        admitted,
        refused.len(),
        refused.first().map(|b| (*b).clone()),
    )
}

#[tokio::test]
async fn sixty_four_concurrent_calls_admit_exactly_what_a_token_budget_holds() {
    let mut app = app_with_upstream().await;
    let user = app.register().await;
    let (secret, _) = key(&app, &user).await;
    // Each call reserves 20 + 10 tokens and uses them all: room for 7 calls.
    create(
        &app,
        &user,
        json!({"scope": "user", "limit_tokens": 7 * 30 + 29, "period": "day"}),
    )
    .await;
    let (admitted, refused, error) = burst(&app, &secret, "gpt-4o-mini").await;
    assert_eq!((admitted, refused), (7, 57));
    let error = error.unwrap();
    assert_eq!(error["error"]["code"], "budget_exceeded");
    let details = &error["error"]["details"];
    assert_eq!(details["scope"], "user");
    assert_eq!(details["unit"], "tokens");
    assert_eq!(details["limit"], 239.0);
    assert_eq!(details["requested"], 30.0);
    assert!(details["spent"].as_f64().unwrap() >= 210.0);
    assert!(details["resets_at"]
        .as_str()
        .unwrap()
        .ends_with("T00:00:00.000Z"));
    // Settled to what the calls used.
    let listed = budgets(&app, &user).await;
    assert_eq!(listed[0].spent, 210.0);
    app.shutdown().await;
}

#[tokio::test]
async fn sixty_four_concurrent_calls_admit_exactly_what_a_usd_budget_holds() {
    let mut app = app_with_upstream().await;
    let user = app.register().await;
    let (secret, _) = key(&app, &user).await;
    // gpt-4o-mini: 20 × $0.15 + 10 × $0.60 per million = 9 µ$ a call; room for 5.
    create(
        &app,
        &user,
        json!({"scope": "model", "scope_id": "gpt-4o-mini", "limit_usd": 0.000049, "period": "month"}),
    )
    .await;
    let (admitted, _, error) = burst(&app, &secret, "gpt-4o-mini").await;
    assert_eq!(admitted, 5);
    assert_eq!(
        error.unwrap()["error"]["details"]["scope_id"],
        "gpt-4o-mini"
    );
    // Another model is not under that budget.
    let (status, _) = call(&app, &secret, "gpt-4o").await;
    assert_eq!(status, 200);
    let listed = budgets(&app, &user).await;
    assert!(
        (listed[0].spent - 0.000045).abs() < 1e-12,
        "{}",
        listed[0].spent
    );
    assert!((listed[0].percent - 45.0 / 49.0 * 100.0).abs() < 1e-6);
    app.shutdown().await;
}

#[tokio::test]
async fn without_a_budget_no_call_is_refused_and_a_budget_holds_only_its_own_calls() {
    let mut app = app_with_upstream().await;
    let user = app.register().await;
    let other = app.register().await;
    let (mine, _) = key(&app, &user).await;
    let (theirs, their_key_id) = key(&app, &other).await;
    // Nothing set: every call goes through.
    let (admitted, _, _) = burst(&app, &mine, "gpt-4o-mini").await;
    assert_eq!(admitted, 64);
    // A cap on one of the other user's keys holds that key, not their logins or my calls.
    create(
        &app,
        &other,
        json!({"scope": "key", "scope_id": their_key_id, "limit_tokens": 0, "period": "rolling_days", "days": 7}),
    )
    .await;
    let (status, body) = call(&app, &theirs, "gpt-4o-mini").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"]["details"]["scope"], "key");
    let (status, _) = call(&app, other.token(), "gpt-4o-mini").await;
    assert_eq!(status, 200);
    let (admitted, _, _) = burst(&app, &mine, "gpt-4o-mini").await;
    assert_eq!(admitted, 64);
    app.shutdown().await;
}

#[tokio::test]
async fn a_stream_cut_off_is_settled_to_what_it_streamed() {
    let mut app = app_with_upstream().await;
    let user = app.register().await;
    let (secret, _) = key(&app, &user).await;
    create(
        &app,
        &user,
        json!({"scope": "user", "limit_tokens": 1_000_000, "period": "week"}),
    )
    .await;
    let response = app
        .post_json(
            "/v1/chat/completions",
            Some(&secret),
            &json!({"model": "cut", "stream": true, "max_tokens": MAX_TOKENS,
                    "messages": [{"role": "user", "content": PROMPT}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let _ = response.text().await;
    // The usage row of the cut stream, and the budget settled to the same tokens.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Value = app
            .get("/api/usage/rows?source=gateway", user.token())
            .await
            .json()
            .await
            .unwrap();
        let listed = budgets(&app, &user).await;
        if let Some(row) = rows["rows"].as_array().and_then(|r| r.first()) {
            let used =
                row["prompt_tokens"].as_i64().unwrap() + row["completion_tokens"].as_i64().unwrap();
            // 20 characters ≈ 5 prompt tokens, 2 chunks streamed: far below the bound of 30.
            assert_eq!(used, 7, "{row}");
            if listed[0].spent == used as f64 {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not settled: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.shutdown().await;
}

#[tokio::test]
async fn budgets_are_managed_by_their_owner_with_a_login() {
    let mut app = app_with_upstream().await;
    let user = app.register().await;
    let other = app.register().await;
    let (secret, _) = key(&app, &user).await;
    let budget = create(
        &app,
        &user,
        json!({"scope": "user", "limit_usd": 25, "period": "month"}),
    )
    .await;
    assert!(budget.id.starts_with("bud_"));
    assert_eq!((budget.limit_usd, budget.limit_tokens), (Some(25.0), None));
    assert_eq!((budget.spent, budget.percent), (0.0, 0.0));
    let path = format!("/api/budgets/{}", budget.id);
    let got: Budget = app.get(&path, user.token()).await.json().await.unwrap();
    assert_eq!(got, budget);
    // Changed: a token limit over rolling days.
    let response = app
        .http
        .patch(app.url(&path))
        .bearer_auth(user.token())
        .json(&json!({"limit_tokens": 5000, "period": "rolling_days", "days": 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let changed: Budget = response.json().await.unwrap();
    assert_eq!(
        (
            changed.limit_usd,
            changed.limit_tokens,
            changed.period.as_str(),
            changed.days
        ),
        (None, Some(5000), "rolling_days", Some(30))
    );
    // Strangers see nothing; keys manage nothing.
    assert_eq!(app.get(&path, other.token()).await.status(), 404);
    assert_eq!(app.get("/api/budgets", &secret).await.status(), 403);
    let response = app
        .post_json(
            "/api/budgets",
            Some(&secret),
            &json!({"scope": "user", "limit_usd": 1000, "period": "day"}),
        )
        .await;
    assert_eq!(response.status(), 403);
    let response = app
        .http
        .delete(app.url(&path))
        .bearer_auth(other.token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // Bad input says what is wrong.
    for (body, says) in [
        (
            json!({"scope": "user", "period": "day"}),
            "exactly one of limit_usd and limit_tokens",
        ),
        (
            json!({"scope": "user", "limit_usd": -1, "period": "day"}),
            "limit_usd",
        ),
        (
            json!({"scope": "team", "limit_usd": 1, "period": "day"}),
            "scope",
        ),
        (
            json!({"scope": "key", "limit_usd": 1, "period": "day"}),
            "scope_id",
        ),
        (
            json!({"scope": "user", "limit_usd": 1, "period": "rolling_days"}),
            "days",
        ),
        (
            json!({"scope": "user", "limit_usd": 1, "period": "year"}),
            "period",
        ),
        (
            json!({"scope": "user", "limit_usd": 1, "period": "day", "timezone": "Mars/Base"}),
            "timezone",
        ),
    ] {
        let response = app
            .post_json("/api/budgets", Some(user.token()), &body)
            .await;
        assert_eq!(response.status(), 422, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "validation_failed");
        assert!(
            error["error"]["message"].as_str().unwrap().contains(says),
            "{error}"
        );
    }
    // Days from midnight in a time zone: Kolkata (UTC+5:30) starts its days at 18:30 UTC.
    let kolkata = create(
        &app,
        &user,
        json!({"scope": "user", "limit_usd": 1, "period": "day", "timezone": "Asia/Kolkata"}),
    )
    .await;
    assert_eq!(kolkata.timezone, "Asia/Kolkata");
    assert!(
        kolkata.period_start.ends_with("T18:30:00.000Z"),
        "{}",
        kolkata.period_start
    );
    assert!(
        kolkata.resets_at.ends_with("T18:30:00.000Z"),
        "{}",
        kolkata.resets_at
    );
    assert_eq!(budget.timezone, "UTC");
    for id in [&kolkata.id, &budget.id] {
        let response = app
            .http
            .delete(app.url(&format!("/api/budgets/{id}")))
            .bearer_auth(user.token())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
    }
    assert!(budgets(&app, &user).await.is_empty());
    app.shutdown().await;
}

/// The next `budget_warning` frame on `ws`, or `None` when none comes within `wait`.
async fn next_warning(ws: &mut crate::helpers::WsClient, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let message = tokio::time::timeout(left, ws.socket.next())
            .await
            .ok()??
            .ok()?;
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "budget_warning" {
                return Some(frame);
            }
        }
    }
}

#[tokio::test]
async fn warnings_at_50_80_and_100_percent_reach_the_users_sockets_once_each() {
    let mut app = app_with_upstream().await;
    let user = app.register().await;
    let other = app.register().await;
    let (secret, _) = key(&app, &user).await;
    let mut ws = app.ws_connect(&user).await;
    let mut theirs = app.ws_connect(&other).await;
    // 30 tokens a call: 33%, 67% (past 50), 100% (past 80 and 100).
    let budget = create(
        &app,
        &user,
        json!({"scope": "user", "limit_tokens": 90, "period": "day"}),
    )
    .await;
    let (status, _) = call(&app, &secret, "gpt-4o-mini").await;
    assert_eq!(status, 200);
    assert_eq!(
        next_warning(&mut ws, Duration::from_millis(300)).await,
        None
    );
    let (status, _) = call(&app, &secret, "gpt-4o-mini").await;
    assert_eq!(status, 200);
    let half = next_warning(&mut ws, Duration::from_secs(5))
        .await
        .expect("the 50% warning");
    assert_eq!(half["threshold"], 50);
    assert_eq!(half["budget_id"], budget.id.as_str());
    assert_eq!(
        (half["spent"].as_f64(), half["limit"].as_f64()),
        (Some(60.0), Some(90.0))
    );
    assert_eq!(half["unit"], "tokens");
    let (status, _) = call(&app, &secret, "gpt-4o-mini").await;
    assert_eq!(status, 200);
    let mut thresholds = Vec::new();
    for _ in 0..2 {
        let warning = next_warning(&mut ws, Duration::from_secs(5))
            .await
            .expect("a warning");
        thresholds.push(warning["threshold"].as_u64().unwrap());
    }
    thresholds.sort();
    assert_eq!(thresholds, vec![80, 100]);
    // Refused from here on, and no warning is sent twice.
    let (status, _) = call(&app, &secret, "gpt-4o-mini").await;
    assert_eq!(status, 402);
    assert_eq!(
        next_warning(&mut ws, Duration::from_millis(300)).await,
        None
    );
    // Another user's sockets never see them.
    assert_eq!(
        next_warning(&mut theirs, Duration::from_millis(100)).await,
        None
    );
    app.shutdown().await;
}
