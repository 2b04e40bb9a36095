//! Apex's OpenAI-compatible API serving the embedded local model: the official `openai`
//! Python package as the client, and Apex's own OpenAI-compatible client against a real
//! OpenAI-compatible server (this one).

use apex_server::llm::openai::OpenAiClient;
use apex_server::llm::{ChatMessage, LlmProvider, LlmRequest};
use apex_server::settings::{LlmProviderKind, OpenAiSettings, Secret};
use futures_util::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::helpers::{openai_package_check, spawn_app_with, TestApp};
use crate::local_model::model_path;

const MODEL: &str = "SmolLM2-135M-Instruct";

async fn spawn_local(path: std::path::PathBuf) -> TestApp {
    spawn_app_with(move |s| {
        s.llm_provider = LlmProviderKind::Local;
        s.local_model.path = Some(path);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_package_talks_to_the_local_model() {
    let path = model_path();
    let app = spawn_local(path).await;
    let user = app.register().await;
    let seen = openai_package_check(&app, &user, MODEL, "What is the capital of France?").await;
    assert_eq!(seen["models"], serde_json::json!(["apex", MODEL]), "{seen}");
    let completion = &seen["completion"];
    let text = completion["text"].as_str().unwrap();
    assert!(!text.trim().is_empty(), "{seen}");
    assert!(completion["prompt_tokens"].as_u64().unwrap() > 5, "{seen}");
    let generated = completion["completion_tokens"].as_u64().unwrap();
    assert!((1..=48).contains(&generated), "max_tokens holds: {seen}");
    // Greedy decoding: the streamed answer is the same text, in pieces.
    assert!(seen["stream"]["chunks"].as_u64().unwrap() > 1, "{seen}");
    assert_eq!(seen["stream"]["text"].as_str().unwrap(), text);
    assert_eq!(seen["unknown_model"]["status"], 404);
    assert_eq!(seen["bad_token"]["status"], 401);

    // Both requests are in the user's own usage data.
    let rows = crate::usage_rows(&app, &user).await;
    let direct: Vec<_> = rows.iter().filter(|r| r.workload == "apex/v1").collect();
    assert_eq!(direct.len(), 2, "{rows:?}");
    assert!(direct
        .iter()
        .all(|r| r.model == MODEL && r.completion_tokens as u64 == generated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_works_against_apex_serving_its_local_model() {
    let path = model_path();
    let app = spawn_local(path).await;
    let user = app.register().await;
    let client = OpenAiClient::new(OpenAiSettings {
        base_url: app.url("/v1"),
        model: MODEL.into(),
        api_key: Some(Secret::new(user.token())),
        max_retries: 0,
        ..OpenAiSettings::default()
    })
    .unwrap();
    let request = LlmRequest::new(
        vec![ChatMessage::user("Say hello in one short sentence.")],
        Value::Null,
        24,
    );
    let tokens = request.tokens.clone();
    let mut stream = client
        .stream(request, CancellationToken::new())
        .await
        .unwrap();
    let mut pieces = Vec::new();
    while let Some(piece) = stream.next().await {
        pieces.push(piece.unwrap());
    }
    assert!(pieces.len() > 1, "streamed in pieces: {pieces:?}");
    assert!(!pieces.concat().trim().is_empty());
    let usage = tokens.get();
    assert!(
        usage.prompt_tokens > 5 && (1..=24).contains(&usage.completion_tokens),
        "{usage:?}"
    );

    // Apex's errors reach its client as clear provider errors.
    let stranger = OpenAiClient::new(OpenAiSettings {
        base_url: app.url("/v1"),
        model: MODEL.into(),
        api_key: Some(Secret::new("not-a-token")),
        max_retries: 0,
        ..OpenAiSettings::default()
    })
    .unwrap();
    let request = LlmRequest::new(vec![ChatMessage::user("hi")], Value::Null, 4);
    let err = match stranger.stream(request, CancellationToken::new()).await {
        Ok(_) => panic!("a bad token must be refused"),
        Err(err) => err,
    };
    assert_eq!(err.reason(), "auth_failed", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budgets_hold_the_local_model_and_are_settled_to_what_it_generated() {
    let path = model_path();
    let mut app = spawn_local(path).await;
    let user = app.register().await;
    let body = serde_json::json!({"model": MODEL, "max_tokens": 8,
        "messages": [{"role": "user", "content": "Name a colour."}]});
    // 14 characters + 8 tokens = a bound of 22 tokens.
    let response = app
        .post_json(
            "/api/budgets",
            Some(user.token()),
            &serde_json::json!({"scope": "model", "scope_id": MODEL, "limit_tokens": 21, "period": "day"}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let budget: Value = response.json().await.unwrap();
    let response = app
        .post_json("/v1/chat/completions", Some(user.token()), &body)
        .await;
    assert_eq!(response.status(), 402);
    let refused: Value = response.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "budget_exceeded");
    assert_eq!(refused["error"]["details"]["requested"], 22.0);
    // Room for it: answered, and the budget holds what the model really processed.
    let response = app
        .http
        .patch(app.url(&format!("/api/budgets/{}", budget["id"].as_str().unwrap())))
        .bearer_auth(user.token())
        .json(&serde_json::json!({"limit_tokens": 10_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = app
        .post_json("/v1/chat/completions", Some(user.token()), &body)
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    let used = answer["usage"]["total_tokens"].as_f64().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let listed: Value = app
            .get("/api/budgets", user.token())
            .await
            .json()
            .await
            .unwrap();
        if listed[0]["spent"].as_f64() == Some(used) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{listed} vs {used}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.shutdown().await;
}
