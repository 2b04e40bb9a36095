//! The LLM gateway: `/v1/chat/completions` and `/v1/embeddings` with an upstream's model,
//! forwarded to a local fake upstream with recorded responses, passed back as they came,
//! and recorded as the key's user's usage (tokens by class, workload, status, cost).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_protocol::usage::UsageSummary;
use apex_server::settings::{GatewayUpstream, Secret};
use axum::response::IntoResponse;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, TestApp, TestUser};

/// What the fake upstream saw of each request: the bearer token and the body.
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

const STREAM: &str = concat!(
    "data: {\"id\":\"c1\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}\n\n",
    "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2,",
    "\"total_tokens\":14,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
    "data: [DONE]\n\n"
);

/// An OpenAI-compatible upstream with recorded answers: model `rate-limited` gets 429,
/// model `cut` a stream that breaks off after two chunks.
async fn fake_upstream() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let chat_seen = Arc::clone(&seen);
    let embed_seen = Arc::clone(&seen);
    let bearer = |headers: &axum::http::HeaderMap| {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                    let seen = Arc::clone(&chat_seen);
                    async move {
                        seen.lock().unwrap().push((bearer(&headers), body.clone()));
                        match (body["model"].as_str(), body["stream"] == true) {
                            (Some("rate-limited"), _) => (
                                axum::http::StatusCode::TOO_MANY_REQUESTS,
                                axum::Json(json!({"error": {"message": "slow down", "type": "rate_limit_exceeded"}})),
                            )
                                .into_response(),
                            (Some("cut"), true) => {
                                let chunks = futures_util::stream::iter(vec![
                                    Ok::<_, std::io::Error>(
                                        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
                                    ),
                                    Ok("data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n"),
                                    Err(std::io::Error::other("upstream died")),
                                ])
                                // Apart in time, so the head and the chunks are out
                                // before the connection breaks.
                                .then(|chunk| async move {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    chunk
                                });
                                (
                                    [("content-type", "text/event-stream")],
                                    axum::body::Body::from_stream(chunks),
                                )
                                    .into_response()
                            }
                            (_, true) => ([("content-type", "text/event-stream")], STREAM).into_response(),
                            (_, false) => axum::Json(json!({
                                "id": "c2", "object": "chat.completion", "created": 1,
                                "model": "gpt-4o-2024-08-06",
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": "Hello there"}}],
                                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120,
                                          "prompt_tokens_details": {"cached_tokens": 40},
                                          "completion_tokens_details": {"reasoning_tokens": 5}}
                            }))
                            .into_response(),
                        }
                    }
                },
            ),
        )
        .route(
            "/v1/embeddings",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, axum::Json(body): axum::Json<Value>| {
                    let seen = Arc::clone(&embed_seen);
                    async move {
                        seen.lock().unwrap().push((bearer(&headers), body));
                        axum::Json(json!({"object": "list", "model": "text-embedding-3-small",
                            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                            "usage": {"prompt_tokens": 8, "total_tokens": 8}}))
                    }
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}/v1"), seen)
}

async fn gateway_app() -> (TestApp, Seen) {
    let (url, seen) = fake_upstream().await;
    let app = spawn_app_with(move |s| {
        s.gateway.upstreams = vec![GatewayUpstream {
            name: "openai".into(),
            base_url: url,
            api_key: Some(Secret::new("sk-upstream")),
        }];
    })
    .await;
    (app, seen)
}

async fn key_with(app: &TestApp, user: &TestUser, scopes: &[&str]) -> String {
    let response = app
        .post_json(
            "/api/keys",
            Some(user.token()),
            &json!({"name": "my app", "scopes": scopes}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    body["key"].as_str().unwrap().to_string()
}

async fn post(app: &TestApp, path: &str, key: &str, body: Value) -> reqwest::Response {
    app.http
        .post(app.url(path))
        .bearer_auth(key)
        .header("X-Apex-Workload", "support-bot")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The summary once the gateway's rows reach `requests` (a stream's row is written as it
/// ends, just after the client has read it).
async fn gateway_summary(app: &TestApp, user: &TestUser, requests: i64) -> UsageSummary {
    for _ in 0..200 {
        let summary = app.usage_summary(user).await;
        if summary
            .by_source
            .iter()
            .any(|s| s.source == "gateway" && s.requests >= requests)
        {
            return summary;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the gateway's rows never reached {requests}");
}

fn gateway_workload(summary: &UsageSummary) -> &apex_protocol::usage::WorkloadUsage {
    summary
        .by_workload
        .iter()
        .find(|w| w.workload == "support-bot")
        .expect("the workload the header named")
}

#[tokio::test]
async fn a_completion_goes_upstream_and_comes_back_as_sent_with_its_usage_recorded() {
    let (app, seen) = gateway_app().await;
    let user = app.register().await;
    let key = key_with(&app, &user, &["gateway"]).await;
    let response = post(
        &app,
        "/v1/chat/completions",
        &key,
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}],
               "temperature": 0.2, "tools": [], "user": "end-user-7"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello there");
    assert_eq!(
        body["usage"]["completion_tokens_details"]["reasoning_tokens"],
        5
    );

    let (bearer, sent) = seen.lock().unwrap()[0].clone();
    assert_eq!(
        bearer, "Bearer sk-upstream",
        "the upstream's key, never the Apex key"
    );
    assert_eq!(sent["temperature"], 0.2, "the body is passed on as sent");
    assert_eq!(sent["user"], "end-user-7");

    let summary = gateway_summary(&app, &user, 1).await;
    let source = summary
        .by_source
        .iter()
        .find(|s| s.source == "gateway")
        .unwrap();
    // gpt-4o: 60 × $2.50 + 40 × $1.25 + 20 × $10 per million.
    assert_eq!(source.cost_usd, 0.0004);
    let workload = gateway_workload(&summary);
    assert_eq!(
        (
            workload.requests,
            workload.prompt_tokens,
            workload.cached_tokens,
            workload.completion_tokens
        ),
        (1, 100, 40, 20)
    );
    assert!(summary
        .by_model
        .iter()
        .any(|m| m.model == "gpt-4o-2024-08-06" && m.provider == "openai"));
}

#[tokio::test]
async fn a_stream_passes_through_chunk_by_chunk_and_its_usage_block_is_asked_for() {
    let (app, seen) = gateway_app().await;
    let user = app.register().await;
    let key = key_with(&app, &user, &["gateway"]).await;
    let before = app.usage_summary(&user).await;
    let response = post(
        &app,
        "/v1/chat/completions",
        &key,
        json!({"model": "openai/gpt-4o", "stream": true,
               "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = response.text().await.unwrap();
    assert_eq!(text, STREAM, "the stream is passed on byte for byte");
    let (_, sent) = seen.lock().unwrap()[0].clone();
    assert_eq!(sent["model"], "gpt-4o", "the upstream's name for the model");
    assert_eq!(sent["stream_options"]["include_usage"], true);

    let summary = gateway_summary(&app, &user, 1).await;
    let workload = gateway_workload(&summary);
    assert_eq!(
        (
            workload.prompt_tokens,
            workload.cached_tokens,
            workload.completion_tokens
        ),
        (12, 4, 2)
    );
    assert_eq!(
        summary.error_requests, before.error_requests,
        "a finished stream is ok"
    );
}

#[tokio::test]
async fn a_stream_cut_midway_is_recorded_for_what_was_sent_and_an_upstream_error_passes_through() {
    let (app, _) = gateway_app().await;
    let user = app.register().await;
    let key = key_with(&app, &user, &["gateway"]).await;
    let before = app.usage_summary(&user).await;

    let response = post(
        &app,
        "/v1/chat/completions",
        &key,
        json!({"model": "cut", "stream": true,
               "messages": [{"role": "user", "content": "twelve chars"}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut received = Vec::new();
    let mut broke = false;
    while let Some(piece) = body.next().await {
        match piece {
            Ok(bytes) => received.extend_from_slice(&bytes),
            Err(_) => {
                broke = true;
                break;
            }
        }
    }
    let received = String::from_utf8(received).unwrap();
    assert!(
        received.contains("\"a\"") && received.contains("\"b\""),
        "{received}"
    );
    assert!(
        broke || !received.contains("[DONE]"),
        "the stream did not end normally"
    );

    let summary = gateway_summary(&app, &user, 1).await;
    let workload = gateway_workload(&summary);
    // Two content chunks sent; the prompt estimated at four characters a token.
    assert_eq!((workload.completion_tokens, workload.prompt_tokens), (2, 3));
    assert_eq!(summary.error_requests, before.error_requests + 1);

    let refused = post(
        &app,
        "/v1/chat/completions",
        &key,
        json!({"model": "rate-limited", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        body["error"]["message"], "slow down",
        "the upstream's own answer"
    );
    let summary = gateway_summary(&app, &user, 2).await;
    assert_eq!(summary.error_requests, before.error_requests + 2);
}

#[tokio::test]
async fn embeddings_are_forwarded_and_counted() {
    let (app, seen) = gateway_app().await;
    let user = app.register().await;
    let key = key_with(&app, &user, &["gateway"]).await;
    let response = post(
        &app,
        "/v1/embeddings",
        &key,
        json!({"model": "text-embedding-3-small", "input": ["some text"]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"][0]["embedding"], json!([0.1, 0.2]));
    assert_eq!(seen.lock().unwrap().len(), 1);
    let summary = gateway_summary(&app, &user, 1).await;
    assert_eq!(gateway_workload(&summary).prompt_tokens, 8);
}

#[tokio::test]
async fn a_key_reaches_upstreams_with_the_gateway_scope_and_apex_with_chat() {
    let (app, seen) = gateway_app().await;
    let user = app.register().await;
    let chat_only = key_with(&app, &user, &["chat"]).await;
    let gateway_only = key_with(&app, &user, &["gateway"]).await;
    let message = json!([{"role": "user", "content": "Hi"}]);

    let refused = post(
        &app,
        "/v1/chat/completions",
        &chat_only,
        json!({"model": "gpt-4o", "messages": message}),
    )
    .await;
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_scope");
    let refused = post(
        &app,
        "/v1/embeddings",
        &chat_only,
        json!({"model": "text-embedding-3-small", "input": "x"}),
    )
    .await;
    assert_eq!(refused.status(), 403);
    assert!(seen.lock().unwrap().is_empty(), "nothing went upstream");

    let refused = post(
        &app,
        "/v1/chat/completions",
        &gateway_only,
        json!({"model": "apex", "messages": message}),
    )
    .await;
    assert_eq!(refused.status(), 403, "the pipeline needs the chat scope");
    let refused = post(&app, "/api/usage/summary", &gateway_only, json!({})).await;
    assert!(refused.status().is_client_error());
}

#[tokio::test]
async fn without_upstreams_an_unknown_model_is_not_found() {
    let app = spawn_app_with(|_| {}).await;
    let user = app.register().await;
    let key = key_with(&app, &user, &["gateway", "chat"]).await;
    let response = post(
        &app,
        "/v1/chat/completions",
        &key,
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn the_official_openai_client_through_the_gateway_is_counted_streamed_and_not() {
    let has_package = tokio::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !has_package {
        crate::helpers::missing_prerequisite(
            "Python's `openai` package is missing, and this test uses it as the client",
            "pip install openai (.ci/run installs it)",
        );
    }
    let (app, _) = gateway_app().await;
    let user = app.register().await;
    let key = key_with(&app, &user, &["gateway"]).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/gateway_check.py"
    );
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .args([app.url(""), key])
        .output()
        .await
        .expect("run python3");
    assert!(
        output.status.success(),
        "gateway_check.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).expect("gateway_check.py prints JSON");
    assert_eq!(seen["completion"], "Hello there", "{seen}");
    assert_eq!(seen["streamed"], "Hello", "{seen}");
    let summary = gateway_summary(&app, &user, 2).await;
    let workload = gateway_workload(&summary);
    assert_eq!(
        (
            workload.requests,
            workload.prompt_tokens,
            workload.cached_tokens,
            workload.completion_tokens
        ),
        (2, 112, 44, 22)
    );
}
