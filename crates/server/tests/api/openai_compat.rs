//! The OpenAI-compatible API as existing clients use it: the official `openai` Python
//! package lists the models and asks model `apex`, which runs the user's own pipeline.

use serde_json::Value;

use crate::helpers::{openai_package_check, spawn_app};

const QUESTION: &str = "How can I reduce my LLM costs?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_package_gets_pipeline_answers_about_the_users_own_data() {
    let app = spawn_app().await;
    let user = app.register().await;
    let summary = app.usage_summary(&user).await;
    let seen = openai_package_check(&app, &user, "apex", QUESTION).await;
    assert_eq!(seen["models"], serde_json::json!(["apex"]), "{seen}");

    let answer = seen["completion"]["text"].as_str().unwrap();
    assert!(
        answer.contains(&format!("${:.2}", summary.total_cost_usd)),
        "the answer quotes this user's own total: {answer}"
    );
    assert_eq!(seen["completion"]["finish_reason"], "stop");
    assert!(seen["completion"]["id"]
        .as_str()
        .unwrap()
        .starts_with("chatcmpl-"));
    // The streamed answer arrives in pieces and is the same text (same data, same writer).
    assert!(seen["stream"]["chunks"].as_u64().unwrap() > 1, "{seen}");
    assert_eq!(seen["stream"]["text"].as_str().unwrap(), answer);
    assert_eq!(seen["stream"]["finish_reason"], "stop");

    assert_eq!(seen["unknown_model"]["status"], 404, "{seen}");
    assert!(seen["unknown_model"]["message"]
        .as_str()
        .unwrap()
        .contains("unknown model"));
    assert_eq!(seen["bad_token"]["status"], 401, "{seen}");

    // Each request was an ordinary run in a thread of the user's own.
    let threads: Vec<Value> = app
        .get("/api/threads", user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(threads.len(), 2, "{threads:?}");
}

#[tokio::test]
async fn chat_completions_refuse_bad_requests_with_the_error_shape() {
    let app = spawn_app().await;
    let user = app.register().await;
    let cases = [
        (
            serde_json::json!({"model": "apex", "messages": []}),
            422,
            "validation_failed",
        ),
        (
            serde_json::json!({"model": "apex", "messages": [{"role": "system", "content": "x"}]}),
            422,
            "validation_failed",
        ),
        (
            serde_json::json!({"model": "apex", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            422,
            "validation_failed",
        ),
        (
            serde_json::json!({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}),
            404,
            "model_not_found",
        ),
        (
            serde_json::json!({"messages": "nope"}),
            422,
            "validation_failed",
        ),
    ];
    for (body, status, code) in cases {
        let response = app
            .post_json("/v1/chat/completions", Some(user.token()), &body)
            .await;
        assert_eq!(response.status().as_u16(), status, "{body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
    }
    let anonymous = app
        .post_json(
            "/v1/chat/completions",
            None,
            &serde_json::json!({"model": "apex", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(anonymous.status().as_u16(), 401);
}
