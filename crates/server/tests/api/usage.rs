//! Usage upload (JSON and CSV) and the summary.

use serde_json::json;

use crate::helpers::spawn_app_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_validated_whole_and_counted_in_the_summary() {
    let Some(app) = spawn_app_with(|s| s.demo_data = false).await else {
        return;
    };
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
