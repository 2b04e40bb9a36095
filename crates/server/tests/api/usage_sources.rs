//! Usage from where it happens: OpenTelemetry spans at `POST /otlp/v1/traces` and provider
//! exports at `POST /api/usage/events?format=`, stored under the key's (or token's) user
//! once each, and counted in the summary by source with their cached tokens.

use std::io::Write as _;

use apex_protocol::usage::UsageSummary;
use apex_server::usage::otlp::{
    AnyValue, ExportTraceServiceRequest, ExportTraceServiceResponse, KeyValue, Resource,
    ResourceSpans, ScopeSpans, Span, Value as OtlpValue,
};
use prost::Message as _;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp, TestUser};

async fn key_with(app: &TestApp, user: &TestUser, scopes: &[&str]) -> String {
    let response = app
        .post_json(
            "/api/keys",
            Some(user.token()),
            &json!({"name": "exporter", "scopes": scopes}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    body["key"].as_str().unwrap().to_string()
}

fn kv(key: &str, value: OtlpValue) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
    }
}

/// A span of one chat call: 1,000 prompt tokens of which 400 cached, 200 completion.
fn chat_span(span_id: u8, extra: Vec<KeyValue>) -> Span {
    let now_ns = (chrono::Utc::now().timestamp_millis() as u64 - 60_000) * 1_000_000;
    let mut attributes = vec![
        kv("gen_ai.operation.name", OtlpValue::String("chat".into())),
        kv("gen_ai.provider.name", OtlpValue::String("openai".into())),
        kv("gen_ai.request.model", OtlpValue::String("gpt-4o".into())),
        kv("gen_ai.usage.input_tokens", OtlpValue::Int(1000)),
        kv("gen_ai.usage.cache_read.input_tokens", OtlpValue::Int(400)),
        kv("gen_ai.usage.output_tokens", OtlpValue::Int(200)),
    ];
    attributes.extend(extra);
    Span {
        trace_id: vec![0xab; 16],
        span_id: vec![span_id; 8],
        name: "chat gpt-4o".into(),
        start_time_unix_nano: now_ns,
        end_time_unix_nano: now_ns + 420_000_000,
        attributes,
        status: None,
    }
}

fn batch(spans: Vec<Span>) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", OtlpValue::String("support-bot".into()))],
            }),
            scope_spans: vec![ScopeSpans { spans }],
        }],
    }
    .encode_to_vec()
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body).unwrap();
    encoder.finish().unwrap()
}

async fn send_traces(
    app: &TestApp,
    token: &str,
    content_type: &str,
    gzipped: bool,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url("/otlp/v1/traces"))
        .bearer_auth(token)
        .header("Content-Type", content_type);
    let body = if gzipped {
        request = request.header("Content-Encoding", "gzip");
        gzip(&body)
    } else {
        body
    };
    request.body(body).send().await.unwrap()
}

fn source<'a>(
    summary: &'a UsageSummary,
    name: &str,
) -> Option<&'a apex_protocol::usage::SourceUsage> {
    summary.by_source.iter().find(|s| s.source == name)
}

#[tokio::test]
async fn gen_ai_spans_become_the_key_owners_rows_once_each() {
    let app = spawn_app().await;
    let owner = app.register().await;
    let other = app.register().await;
    let key = key_with(&app, &owner, &["usage:write"]).await;
    let before = app.usage_summary(&owner).await;
    let other_before = app.usage_summary(&other).await;

    let spans = vec![
        chat_span(1, vec![]),
        // Naming another user changes nothing: the key's owner is the row's owner.
        chat_span(2, vec![kv("user.id", OtlpValue::String(other.id.clone()))]),
        // Not an LLM call: ignored.
        Span {
            attributes: vec![kv("http.request.method", OtlpValue::String("GET".into()))],
            ..chat_span(3, vec![])
        },
    ];
    let response = send_traces(
        &app,
        &key,
        "application/x-protobuf",
        true,
        batch(spans.clone()),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/x-protobuf");
    let answer = ExportTraceServiceResponse::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!(answer.partial_success, None, "every span was taken");

    // The exporter retries the same batch: stored once.
    let again = send_traces(&app, &key, "application/x-protobuf", false, batch(spans)).await;
    assert_eq!(again.status(), 200);

    let after = app.usage_summary(&owner).await;
    let otlp = source(&after, "otlp").expect("an otlp source");
    assert_eq!(otlp.requests, 2);
    // gpt-4o: 600 × $2.50 + 400 × $1.25 + 200 × $10 per million = $0.004 a call.
    assert_eq!(otlp.cost_usd, 0.008);
    assert_eq!(after.total_requests, before.total_requests + 2);
    assert_eq!(after.total_cached_tokens, before.total_cached_tokens + 800);
    assert_eq!(after.total_prompt_tokens, before.total_prompt_tokens + 2000);
    let workload = after
        .by_workload
        .iter()
        .find(|w| w.workload == "support-bot")
        .expect("the service's name is the workload");
    assert!(workload.cached_tokens >= 800);
    let other_after = app.usage_summary(&other).await;
    assert_eq!(
        (
            other_after.total_requests,
            other_after.total_cost_usd,
            other_after.by_source
        ),
        (
            other_before.total_requests,
            other_before.total_cost_usd,
            other_before.by_source
        ),
        "nothing reached the other user"
    );
}

#[tokio::test]
async fn otlp_json_works_and_unusable_spans_get_a_partial_success() {
    let app = spawn_app().await;
    let user = app.register().await;
    let key = key_with(&app, &user, &["usage:write"]).await;
    let now_ns = (chrono::Utc::now().timestamp_millis() - 60_000) * 1_000_000;
    let span = |span_id: &str, model: Option<&str>| {
        let mut attributes = vec![
            json!({"key": "gen_ai.system", "value": {"stringValue": "openai"}}),
            json!({"key": "gen_ai.usage.input_tokens", "value": {"intValue": "100"}}),
            json!({"key": "gen_ai.usage.output_tokens", "value": {"intValue": 10}}),
        ];
        if let Some(model) = model {
            attributes
                .push(json!({"key": "gen_ai.response.model", "value": {"stringValue": model}}));
        }
        json!({"traceId": "0102030405060708090a0b0c0d0e0f10", "spanId": span_id,
               "name": "chat", "startTimeUnixNano": now_ns.to_string(),
               "endTimeUnixNano": (now_ns + 5_000_000).to_string(), "attributes": attributes})
    };
    let body = json!({"resourceSpans": [{"scopeSpans": [{"spans": [
        span("1111111111111111", Some("gpt-4o-mini")),
        span("2222222222222222", None),
        span("3333333333333333", Some("acme-unpriced")),
    ]}]}]});
    let response = send_traces(
        &app,
        &key,
        "application/json",
        true,
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["partialSuccess"]["rejectedSpans"], "2", "{answer}");
    let message = answer["partialSuccess"]["errorMessage"].as_str().unwrap();
    assert!(message.contains("no gen_ai.response.model"), "{message}");
    assert!(message.contains("acme-unpriced"), "{message}");
    let summary = app.usage_summary(&user).await;
    assert_eq!(source(&summary, "otlp").unwrap().requests, 1);

    // Not a trace export at all: 400 with a status, in the request's encoding.
    let broken = send_traces(&app, &key, "application/json", false, b"[1, 2".to_vec()).await;
    assert_eq!(broken.status(), 400);
    let status: Value = broken.json().await.unwrap();
    assert_eq!(status["code"], 3);
    let broken = send_traces(
        &app,
        &key,
        "application/x-protobuf",
        false,
        b"\xff\xff".to_vec(),
    )
    .await;
    assert_eq!(broken.status(), 400);
    let empty = send_traces(&app, &key, "application/x-protobuf", false, Vec::new()).await;
    assert_eq!(empty.status(), 200, "an empty export is a valid one");
    let not_gzip = app
        .http
        .post(app.url("/otlp/v1/traces"))
        .bearer_auth(&key)
        .header("Content-Type", "application/x-protobuf")
        .header("Content-Encoding", "gzip")
        .body(batch(vec![chat_span(9, vec![])]))
        .send()
        .await
        .unwrap();
    assert_eq!(not_gzip.status(), 400);
    let refused = app
        .http
        .post(app.url("/otlp/v1/traces"))
        .bearer_auth(&key)
        .header("Content-Type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 415);
}

#[tokio::test]
async fn only_a_key_that_may_write_usage_sends_spans() {
    let app = spawn_app().await;
    let user = app.register().await;
    let reader = key_with(&app, &user, &["usage:read", "chat"]).await;
    let response = send_traces(
        &app,
        &reader,
        "application/x-protobuf",
        false,
        batch(vec![chat_span(1, vec![])]),
    )
    .await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "insufficient_scope");
    let anonymous = app
        .http
        .post(app.url("/otlp/v1/traces"))
        .header("Content-Type", "application/x-protobuf")
        .body(batch(vec![chat_span(1, vec![])]))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(source(&app.usage_summary(&user).await, "otlp").is_none());
}

async fn import(app: &TestApp, user: &TestUser, format: &str, body: &Value) -> (u16, Value) {
    let response = app
        .post_json(
            &format!("/api/usage/events?format={format}"),
            Some(user.token()),
            body,
        )
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn days_ago(days: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now() - chrono::Duration::days(days)
}

#[tokio::test]
async fn provider_exports_import_once_and_report_what_they_skipped() {
    let app = spawn_app().await;
    let user = app.register().await;
    let before = app.usage_summary(&user).await;
    let start = days_ago(2).timestamp() / 86_400 * 86_400;
    let openai = json!({"object": "page", "has_more": false, "data": [
    {"object": "bucket", "start_time": start, "end_time": start + 86_400, "results": [
        {"object": "organization.usage.completions.result", "input_tokens": 1_000_000,
         "output_tokens": 100_000, "input_cached_tokens": 400_000,
         "num_model_requests": 250, "model": "gpt-4o-2024-08-06",
         "project_id": "proj_support", "batch": false},
        {"object": "organization.usage.completions.result", "input_tokens": 5,
         "output_tokens": 5, "num_model_requests": 1, "model": null}
    ]}]});
    let (status, result) = import(&app, &user, "openai-usage", &openai).await;
    assert_eq!(status, 201, "{result}");
    assert_eq!(result["inserted"], 1);
    assert_eq!(result["skipped"][0]["index"], 1);
    let (status, again) = import(&app, &user, "openai-usage", &openai).await;
    assert_eq!(status, 201);
    assert_eq!(
        (again["inserted"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(1))
    );

    let day = days_ago(1).format("%Y-%m-%dT00:00:00Z").to_string();
    let anthropic = json!({"has_more": false, "data": [{"starting_at": day, "results": [
        {"uncached_input_tokens": 400_000, "cache_read_input_tokens": 500_000,
         "cache_creation": {"ephemeral_5m_input_tokens": 100_000, "ephemeral_1h_input_tokens": 0},
         "output_tokens": 0, "model": "claude-3-5-sonnet-20241022",
         "workspace_id": "wrkspc_research"}]}]});
    let (status, result) = import(&app, &user, "anthropic-usage", &anthropic).await;
    assert_eq!(
        (status, result["inserted"].as_u64()),
        (201, Some(1)),
        "{result}"
    );

    // Buckets have no latency: the percentiles are still the demo rows'.
    let buckets_only = app.usage_summary(&user).await;
    assert_eq!(buckets_only.latency_ms, before.latency_ms);

    let started = days_ago(1).format("%Y-%m-%dT10:00:00.000000").to_string();
    let litellm = json!([{"request_id": "chatcmpl-9", "spend": 0.00125, "prompt_tokens": 300,
                          "completion_tokens": 50, "startTime": started,
                          "model": "openai/gpt-4o-mini", "custom_llm_provider": "openai",
                          "request_tags": ["triage"], "status": "success"}]);
    let (status, result) = import(&app, &user, "litellm-spend", &litellm).await;
    assert_eq!(
        (status, result["inserted"].as_u64()),
        (201, Some(1)),
        "{result}"
    );
    let (_, again) = import(&app, &user, "litellm-spend", &litellm).await;
    assert_eq!(again["duplicates"], 1);

    let after = app.usage_summary(&user).await;
    let of = |name: &str| source(&after, name).unwrap_or_else(|| panic!("{name}: {after:?}"));
    assert_eq!(of("openai-usage").requests, 250);
    // 600k × 2.50 + 400k × 1.25 + 100k × 10, per million.
    assert_eq!(of("openai-usage").cost_usd, 3.0);
    // 400k × 3 + 500k × 0.30 + 100k × 3.75, per million; the report counts no requests.
    assert_eq!(of("anthropic-usage").cost_usd, 1.725);
    assert_eq!(of("anthropic-usage").requests, 0);
    assert_eq!(of("litellm-spend").cost_usd, 0.00125);
    assert_eq!(after.total_requests, before.total_requests + 251);
    assert_eq!(
        after.total_cached_tokens,
        before.total_cached_tokens + 900_000
    );

    let (status, refused) = import(&app, &user, "openai-usage", &json!({"rows": []})).await;
    assert_eq!(status, 422, "{refused}");
    let (status, refused) = import(&app, &user, "excel", &json!([])).await;
    assert_eq!(status, 422);
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("openai-usage"));
}

#[tokio::test]
async fn uploaded_rows_with_an_id_are_stored_once() {
    let app = spawn_app().await;
    let user = app.register().await;
    let when = days_ago(1).to_rfc3339();
    let rows = json!([
        {"id": "job-1", "provider": "openai", "model": "gpt-4o", "workload": "etl",
         "timestamp": when, "prompt_tokens": 1000, "cached_tokens": 400,
         "completion_tokens": 200, "reasoning_tokens": 50, "latency_ms": 900},
        {"provider": "openai", "model": "gpt-4o", "workload": "etl",
         "timestamp": when, "prompt_tokens": 10, "completion_tokens": 2, "latency_ms": 90}
    ]);
    let (status, first) = import(&app, &user, "rows", &rows).await;
    assert_eq!(
        (status, first["inserted"].as_u64()),
        (201, Some(2)),
        "{first}"
    );
    let (_, second) = import(&app, &user, "rows", &rows).await;
    // The row with an id is a duplicate; the one without is stored again, as always.
    assert_eq!(
        (second["inserted"].as_u64(), second["duplicates"].as_u64()),
        (Some(1), Some(1))
    );
    let summary = app.usage_summary(&user).await;
    let etl = summary
        .by_workload
        .iter()
        .find(|w| w.workload == "etl")
        .unwrap();
    assert_eq!(etl.requests, 3);
    assert_eq!(etl.cached_tokens, 400);
    // The cached share is priced at the cached rate: job-1 costs $0.004, not $0.0045;
    // each small row $0.000045.
    let upload = source(&summary, "upload").unwrap();
    assert_eq!(upload.cost_usd, 0.00409, "{upload:?}");

    let bad = json!([{"provider": "openai", "model": "gpt-4o", "workload": "etl",
                      "timestamp": when, "prompt_tokens": 10, "cached_tokens": 11,
                      "completion_tokens": 2, "latency_ms": 90}]);
    let (status, refused) = import(&app, &user, "rows", &bad).await;
    assert_eq!(status, 422);
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cached_tokens"));
}

#[tokio::test]
async fn the_official_python_exporter_sends_spans_that_are_stored_once() {
    let has_package = tokio::process::Command::new("python3")
        .args([
            "-c",
            "import opentelemetry.sdk, opentelemetry.exporter.otlp.proto.http",
        ])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !has_package {
        crate::helpers::missing_prerequisite(
            "OpenTelemetry's Python SDK and OTLP/HTTP exporter are missing, and this test uses them",
            "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http (.ci/run installs them)",
        );
    }
    let app = spawn_app().await;
    let user = app.register().await;
    let key = key_with(&app, &user, &["usage:write"]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/otlp_export.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .args([app.url(""), key])
        .output()
        .await
        .expect("run python3");
    assert!(
        output.status.success(),
        "otlp_export.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).expect("otlp_export.py prints JSON");
    assert_eq!(seen["spans"], 3, "{seen}");
    assert_eq!(seen["results"], json!(["SUCCESS", "SUCCESS"]), "{seen}");

    let summary = app.usage_summary(&user).await;
    let otlp = source(&summary, "otlp").expect("an otlp source");
    assert_eq!(otlp.requests, 2, "two LLM spans, each once: {summary:?}");
    // gpt-4o-mini: 1000 × 0.15 + 1000 × 0.075 + 300 × 0.60 = 405; gpt-4o: 1000 × 2.50 +
    // 100 × 10 = 3500; per million.
    assert_eq!(otlp.cost_usd, 0.003905);
    let workload = summary
        .by_workload
        .iter()
        .find(|w| w.workload == "python-support-bot")
        .expect("service.name is the workload");
    assert_eq!((workload.requests, workload.cached_tokens), (2, 1000));
    assert_eq!(workload.prompt_tokens, 3000);
}
