//! Usage upload (JSON and CSV) and the summary.

use serde_json::json;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_validated_whole_and_counted_in_the_summary() {
    let app = spawn_app_with(|s| s.demo_data = false).await;
    let user = app.register().await;
    let empty = app.usage_summary(&user).await;
    assert_eq!(empty.total_requests, 0);

    let now = chrono::Utc::now();
    let ts = (now - chrono::Duration::hours(1)).to_rfc3339();
    let rows = json!([
        {"provider": "openai", "model": "gpt-4o", "workload": "chat", "timestamp": ts,
         "prompt_tokens": 1000000, "completion_tokens": 0, "latency_ms": 800},
        {"provider": "acme", "model": "acme-1", "workload": "batch", "timestamp": ts,
         "prompt_tokens": 10, "completion_tokens": 10, "latency_ms": 100, "status": "error", "cost_usd": 1.25}
    ]);
    let response = app
        .post_json("/api/usage/events", Some(user.token()), &rows)
        .await;
    assert_eq!(response.status(), 201);
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["inserted"],
        2
    );

    let csv = format!(
        "provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms,status,cost_usd\n\
         openai,gpt-4o-mini,chat,{ts},1000000,0,300,ok,\n"
    );
    let response = app
        .http
        .post(app.url("/api/usage/events"))
        .bearer_auth(user.token())
        .header("Content-Type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    let summary = app.usage_summary(&user).await;
    assert_eq!(summary.total_requests, 3);
    assert_eq!(summary.error_requests, 1);
    assert_eq!(summary.total_cost_usd, 2.5 + 1.25 + 0.15);
    assert_eq!(summary.by_model[0].model, "gpt-4o");

    // One bad row rejects the whole batch: nothing is stored.
    let bad = json!([
        {"provider": "openai", "model": "gpt-4o", "workload": "chat", "timestamp": ts,
         "prompt_tokens": 5, "completion_tokens": 5, "latency_ms": 1},
        {"provider": "openai", "model": "gpt-4o", "workload": "chat", "timestamp": "not a time",
         "prompt_tokens": 5, "completion_tokens": 5, "latency_ms": 1}
    ]);
    let response = app
        .post_json("/api/usage/events", Some(user.token()), &bad)
        .await;
    assert_eq!(response.status(), 422);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("row 1"));
    assert_eq!(app.usage_summary(&user).await.total_requests, 3);

    assert_eq!(
        app.get("/api/usage/summary?days=0", user.token())
            .await
            .status(),
        422
    );
    assert_eq!(
        app.get("/api/usage/summary?days=abc", user.token())
            .await
            .status(),
        422
    );
}

/// `GET /api/usage/daily`: the caller's rows only, grouped per UTC day and model, summing to
/// the summary's totals; `days` validated like the summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_series_counts_only_the_callers_rows() {
    let app = spawn_app().await;
    let demo_user = app.register().await;
    let fresh = spawn_app_with(|s| s.demo_data = false).await;
    let alice = fresh.register().await;
    let bob = fresh.register().await;

    // Demo data: the series adds up to the summary, per model and in total.
    let daily: apex_protocol::usage::DailyUsage = app
        .get("/api/usage/daily?days=30", demo_user.token())
        .await
        .json()
        .await
        .unwrap();
    let summary = app.usage_summary(&demo_user).await;
    assert_eq!(daily.days, 30);
    assert!(daily.series.len() >= 20, "{} entries", daily.series.len());
    let requests: i64 = daily.series.iter().map(|d| d.requests).sum();
    assert_eq!(requests, summary.total_requests);
    let cost: f64 = daily.series.iter().map(|d| d.cost_usd).sum();
    assert!((cost - summary.total_cost_usd).abs() < 1e-4, "{cost}");
    for model in &summary.by_model {
        let per_model: i64 = daily
            .series
            .iter()
            .filter(|d| d.model == model.model)
            .map(|d| d.requests)
            .sum();
        assert_eq!(per_model, model.requests, "{}", model.model);
    }
    let mut sorted = daily.series.clone();
    sorted.sort_by(|a, b| (&a.date, &a.model).cmp(&(&b.date, &b.model)));
    assert_eq!(sorted, daily.series);
    assert!(daily
        .series
        .iter()
        .all(|d| d.date.len() == 10
            && chrono::NaiveDate::parse_from_str(&d.date, "%Y-%m-%d").is_ok()));

    // Two users of the same server: each sees exactly their own upload.
    let yesterday = chrono::Utc::now() - chrono::Duration::days(1);
    let ts = yesterday.to_rfc3339();
    let upload = |model: &str, cost: f64| {
        json!([{"provider": "acme", "model": model, "workload": "w", "timestamp": ts,
                "prompt_tokens": 1, "completion_tokens": 1, "latency_ms": 1, "cost_usd": cost}])
    };
    for (user, body) in [
        (&alice, upload("alice-model", 1.5)),
        (&bob, upload("bob-model", 2.25)),
    ] {
        let response = fresh
            .post_json("/api/usage/events", Some(user.token()), &body)
            .await;
        assert_eq!(response.status(), 201);
    }
    let alice_daily: serde_json::Value = fresh
        .get("/api/usage/daily?days=7", alice.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        alice_daily,
        json!({"days": 7, "series": [{"date": yesterday.format("%Y-%m-%d").to_string(),
            "model": "alice-model", "cost_usd": 1.5, "requests": 1}]})
    );

    for bad in ["0", "366", "abc", "-1"] {
        let response = fresh
            .get(&format!("/api/usage/daily?days={bad}"), bob.token())
            .await;
        assert_eq!(response.status(), 422, "days={bad}");
    }
    let unauthenticated = fresh
        .http
        .get(fresh.url("/api/usage/daily"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
}
