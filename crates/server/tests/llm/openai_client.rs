//! The OpenAI-compatible client against a small local mock server that replays recorded
//! OpenAI-style responses: a streamed answer, structured output, 429 then success, 500,
//! 401, a stalled response, and the whole pipeline with the provider failing (the template
//! writer takes over, with an `agent_thinking` note).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use apex_protocol::events::EventKind;
use apex_server::llm::openai::OpenAiClient;
use apex_server::llm::{
    ChatMessage, LlmError, LlmProvider, LlmRequest, ResponseSchema, TokenUsage,
};
use apex_server::settings::{LlmProviderKind, OpenAiSettings, Secret};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::helpers::{assert_contiguous_and_terminated, spawn_app_with};

/// Recorded chunks of a streamed OpenAI chat completion.
const RECORDED_STREAM: &str = concat!(
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
    ": keep-alive\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\", world\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":31,\"completion_tokens\":4,\"total_tokens\":35}}\n\n",
    "data: [DONE]\n\n",
);

#[derive(Clone, Copy)]
enum Script {
    Stream,
    /// 429 with `Retry-After: 0` the first time, then the stream.
    RateLimitedOnce,
    AlwaysServerError,
    Unauthorized,
    /// Answers after 5 s.
    Stall,
    Structured,
}

struct Mock {
    script: Script,
    hits: AtomicUsize,
    last_body: std::sync::Mutex<Value>,
    last_auth: std::sync::Mutex<Option<String>>,
}

async fn completions(
    State(mock): State<Arc<Mock>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let hit = mock.hits.fetch_add(1, Ordering::SeqCst);
    *mock.last_body.lock().unwrap() = body;
    *mock.last_auth.lock().unwrap() = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let sse = || {
        (
            [("content-type", "text/event-stream")],
            RECORDED_STREAM.to_string(),
        )
            .into_response()
    };
    let error = |status: StatusCode, message: &str| {
        (
            status,
            Json(json!({"error": {"message": message, "type": "server_error"}})),
        )
            .into_response()
    };
    match mock.script {
        Script::Stream => sse(),
        Script::RateLimitedOnce if hit == 0 => {
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, "Rate limit reached");
            response
                .headers_mut()
                .insert("retry-after", "0".parse().unwrap());
            response
        }
        Script::RateLimitedOnce => sse(),
        Script::AlwaysServerError => error(StatusCode::INTERNAL_SERVER_ERROR, "The server had an error"),
        Script::Unauthorized => error(StatusCode::UNAUTHORIZED, "Incorrect API key provided"),
        Script::Stall => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            sse()
        }
        Script::Structured => Json(json!({
            "id": "chatcmpl-2", "object": "chat.completion", "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                "content": "{\"category\":\"model_selection\",\"days\":14,\"models\":[\"gpt-4o\"]}"}}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70}
        }))
        .into_response(),
    }
}

async fn mock_server(script: Script) -> (String, Arc<Mock>) {
    let mock = Arc::new(Mock {
        script,
        hits: AtomicUsize::new(0),
        last_body: std::sync::Mutex::new(Value::Null),
        last_auth: std::sync::Mutex::new(None),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .with_state(Arc::clone(&mock));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}/v1"), mock)
}

fn settings(base_url: String) -> OpenAiSettings {
    OpenAiSettings {
        base_url,
        model: "gpt-4o-mini".into(),
        api_key: Some(Secret::new("sk-test-key")),
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(2),
        max_retries: 2,
        retry_backoff: Duration::from_millis(10),
        structured_output: true,
    }
}

fn request() -> LlmRequest {
    LlmRequest::new(vec![ChatMessage::user("Say hello")], Value::Null, 50)
}

async fn collect(client: &OpenAiClient) -> Result<Vec<String>, LlmError> {
    collect_with(client, request()).await
}

async fn collect_with(client: &OpenAiClient, request: LlmRequest) -> Result<Vec<String>, LlmError> {
    let mut stream = client.stream(request, CancellationToken::new()).await?;
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk?);
    }
    Ok(chunks)
}

#[tokio::test]
async fn streams_a_recorded_completion() {
    let (url, mock) = mock_server(Script::Stream).await;
    let client = OpenAiClient::new(settings(url)).unwrap();
    let request = request();
    let tokens = request.tokens.clone();
    let chunks = collect_with(&client, request).await.unwrap();
    assert_eq!(chunks, vec!["Hello".to_string(), ", world".to_string()]);
    assert_eq!(
        tokens.get(),
        TokenUsage {
            prompt_tokens: 31,
            completion_tokens: 4
        },
        "the usage chunk after finish_reason is read"
    );
    let body = mock.last_body.lock().unwrap().clone();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["messages"][0]["content"], "Say hello");
    assert_eq!(
        mock.last_auth.lock().unwrap().as_deref(),
        Some("Bearer sk-test-key")
    );
}

#[tokio::test]
async fn retries_after_429_then_succeeds() {
    let (url, mock) = mock_server(Script::RateLimitedOnce).await;
    let client = OpenAiClient::new(settings(url)).unwrap();
    let chunks = collect(&client).await.unwrap();
    assert_eq!(chunks.concat(), "Hello, world");
    assert_eq!(mock.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn gives_up_on_500_after_the_retries() {
    let (url, mock) = mock_server(Script::AlwaysServerError).await;
    let client = OpenAiClient::new(settings(url)).unwrap();
    let err = collect(&client).await.unwrap_err();
    assert!(matches!(err, LlmError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("The server had an error"), "{err}");
    assert_eq!(mock.hits.load(Ordering::SeqCst), 3, "1 try + 2 retries");
}

#[tokio::test]
async fn a_refused_key_is_not_retried_and_never_shown() {
    let (url, mock) = mock_server(Script::Unauthorized).await;
    let client = OpenAiClient::new(settings(url)).unwrap();
    let err = collect(&client).await.unwrap_err();
    assert!(matches!(err, LlmError::Auth(_)), "{err:?}");
    assert!(!err.to_string().contains("sk-test-key"));
    assert_eq!(mock.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stalled_provider_times_out() {
    let (url, _mock) = mock_server(Script::Stall).await;
    let mut settings = settings(url);
    settings.max_retries = 0;
    let client = OpenAiClient::new(settings).unwrap();
    let started = std::time::Instant::now();
    let err = collect(&client).await.unwrap_err();
    assert!(matches!(err, LlmError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn asks_for_json_schema_structured_output() {
    let (url, mock) = mock_server(Script::Structured).await;
    let client = OpenAiClient::new(settings(url)).unwrap();
    let mut request = request();
    request.schema = Some(ResponseSchema {
        name: "triage".into(),
        schema: json!({"type": "object"}),
    });
    let text = client
        .complete_structured(request, CancellationToken::new())
        .await
        .unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["category"], "model_selection");
    let body = mock.last_body.lock().unwrap().clone();
    assert_eq!(body["stream"], false);
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["name"], "triage");
}

#[tokio::test]
async fn a_failing_provider_falls_back_to_the_template_with_a_note() {
    let (url, _mock) = mock_server(Script::AlwaysServerError).await;
    let app = spawn_app_with(move |s| {
        s.llm_provider = LlmProviderKind::OpenAi;
        s.openai = settings(url);
    })
    .await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let run = ws.ask("How can I reduce my LLM costs?", None).await;
    assert_contiguous_and_terminated(&run.events);
    let terminal = run.terminal();
    assert_eq!(terminal.payload["status"], "completed");
    let answer = terminal.payload["final_response"].as_str().unwrap();
    assert!(answer.contains("LLM requests costing $"), "{answer}");
    let note = run
        .events
        .iter()
        .find(|e| {
            e.kind == EventKind::AgentThinking
                && e.agent_name == "reporting"
                && e.payload["reasoning"]
                    .as_str()
                    .unwrap_or("")
                    .contains("template")
        })
        .expect("a note that the template writer took over");
    assert!(note.payload["reasoning"]
        .as_str()
        .unwrap()
        .contains("openai"));
    let reporting = run
        .events
        .iter()
        .find(|e| e.kind == EventKind::AgentCompleted && e.agent_name == "reporting")
        .unwrap();
    assert_eq!(reporting.payload["result"]["provider"], "template");
    assert_eq!(reporting.payload["result"]["fallback_from"], "openai");
}

#[tokio::test]
async fn a_working_provider_writes_the_answer() {
    let (url, _mock) = mock_server(Script::Stream).await;
    let app = spawn_app_with(move |s| {
        s.llm_provider = LlmProviderKind::OpenAi;
        s.openai = settings(url);
        // The recorded triage answer is not JSON: triage falls back to its rules.
        s.llm_triage = true;
    })
    .await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let run = ws.ask("How can I reduce my LLM costs?", None).await;
    assert_contiguous_and_terminated(&run.events);
    let terminal = run.terminal();
    assert_eq!(terminal.payload["status"], "completed");
    // The model writes only the prose slots; "Hello, world" is too short to be a summary,
    // so every slot keeps its template wording and the figures are there either way.
    let answer = terminal.payload["final_response"].as_str().unwrap();
    assert!(answer.contains("LLM requests costing $"), "{answer}");
    assert!(!answer.contains("Hello, world"), "{answer}");
    let reporting = run
        .events
        .iter()
        .find(|e| e.kind == EventKind::AgentCompleted && e.agent_name == "reporting")
        .unwrap();
    let result = &reporting.payload["result"];
    let asked = result["slots"].as_u64().unwrap();
    assert!(asked >= 1, "{result}");
    assert_eq!(
        result["slots_from_template"].as_array().unwrap().len() as u64,
        asked,
        "{result}"
    );
    // Each slot was one request of 31 prompt and 4 completion tokens (the mock's usage).
    assert_eq!(result["prompt_tokens"], 31 * asked);
    assert_eq!(result["completion_tokens"], 4 * asked);
    // The run's own token use is now part of the user's usage data.
    let rows = crate::usage_rows(&app, &user).await;
    let own: Vec<_> = rows
        .iter()
        .filter(|r| r.provider == "apex" && r.workload == "apex/reporting")
        .collect();
    assert_eq!(own.len(), 1, "{own:?}");
    assert_eq!(
        (own[0].prompt_tokens as u64, own[0].completion_tokens as u64),
        (31 * asked, 4 * asked)
    );
    assert_eq!(own[0].model, "gpt-4o-mini");
    assert!(own[0].cost_usd > 0.0, "a hosted model is priced: {own:?}");
    let triage = run
        .events
        .iter()
        .find(|e| e.kind == EventKind::AgentCompleted && e.agent_name == "triage")
        .unwrap();
    assert_eq!(triage.payload["result"]["category"], "cost_optimization");
}
