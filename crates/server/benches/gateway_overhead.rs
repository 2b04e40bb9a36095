//! What the LLM gateway adds to a call (`cargo bench -p apex-server --bench gateway_overhead`).
//!
//! One process holds a fake OpenAI-compatible upstream (a fixed chat completion with its
//! usage block, answered at once), Apex on its embedded defaults (SQLite in a temporary
//! folder) with that upstream configured, and a client. The client sends the same chat
//! completion straight to the upstream and through Apex's `/v1` with a `gateway` key,
//! alternating rounds so both see the same machine, at 1 and at 16 requests in flight.
//!
//! Reported: latency percentiles of each road and their difference (the added latency:
//! key lookup, routing, forwarding, and the usage row written with the caller's prices),
//! and process CPU time per request of each road, whose difference is Apex's CPU per call
//! (the client's and the upstream's work is the same on both roads). Figures go to
//! docs/benchmarks.md; nothing here asserts a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use apex_server::settings::{GatewayUpstream, LlmProviderKind, PasswordHashing, Settings};
use serde_json::{json, Value};

/// Requests per road and concurrency, after a warm-up of a tenth of that.
const REQUESTS: usize = 4000;
const ROUNDS: usize = 4;

fn completion() -> Value {
    json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Route short prompts to gpt-4o-mini."}}],
        "usage": {"prompt_tokens": 42, "completion_tokens": 9, "total_tokens": 51,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    })
}

async fn fake_upstream() -> String {
    let answer = Arc::new(completion());
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |axum::Json(_): axum::Json<Value>| {
            let answer = Arc::clone(&answer);
            async move { axum::Json((*answer).clone()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    address
}

/// User plus system CPU time of this process so far.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name; clock
    // ticks are 100 a second on Linux.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

struct Road {
    url: String,
    key: Option<String>,
}

/// Sends `n` requests on `road`, `in_flight` at a time; returns each latency.
async fn drive(http: &reqwest::Client, road: &Road, n: usize, in_flight: usize) -> Vec<Duration> {
    let body = json!({"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "How can I cut my LLM costs on the support bot?"}]});
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let (http, body, next) = (http.clone(), body.clone(), Arc::clone(&next));
        let (url, key) = (road.url.clone(), road.key.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                let mut request = http.post(&url).json(&body);
                if let Some(key) = &key {
                    request = request.bearer_auth(key).header("x-apex-workload", "bench");
                }
                let started = Instant::now();
                let response = request.send().await.expect("request");
                assert!(response.status().is_success(), "{}", response.status());
                let _ = response.bytes().await.expect("body");
                latencies.push(started.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; a filter argument is accepted and ignored.
    let upstream = fake_upstream().await;
    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::embedded(data_dir.path());
    settings.llm_provider = LlmProviderKind::Template;
    settings.password_hashing = PasswordHashing::Light;
    settings.demo_data = false;
    settings.limits.registrations_per_minute = 0;
    settings.gateway.upstreams = vec![GatewayUpstream {
        name: "openai".into(),
        base_url: upstream.clone(),
        api_key: None,
    }];
    let state = apex_server::build_state(settings).await.expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let apex = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(apex_server::serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let tokens: Value = http
        .post(format!("{apex}/auth/register"))
        .json(&json!({"email": "bench@example.com", "password": "a long bench password"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = tokens["access_token"].as_str().expect("registered");
    let key: Value = http
        .post(format!("{apex}/api/keys"))
        .bearer_auth(token)
        .json(&json!({"name": "bench", "scopes": ["gateway"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let roads = [
        (
            "direct",
            Road {
                url: format!("{upstream}/chat/completions"),
                key: None,
            },
        ),
        (
            "gateway",
            Road {
                url: format!("{apex}/v1/chat/completions"),
                key: Some(key["key"].as_str().expect("key").to_string()),
            },
        ),
    ];

    println!(
        "{REQUESTS} requests per road and concurrency in {ROUNDS} alternating rounds; latency in µs"
    );
    println!("| in flight | road | p50 | p90 | p99 | req/s | CPU µs/request |");
    println!("|---|---|---|---|---|---|---|");
    for in_flight in [1usize, 16] {
        let mut results: Vec<(Vec<Duration>, Duration, Duration)> =
            vec![(Vec::new(), Duration::ZERO, Duration::ZERO); roads.len()];
        for (_, road) in &roads {
            drive(&http, road, REQUESTS / 10, in_flight).await;
        }
        for _ in 0..ROUNDS {
            for (i, (_, road)) in roads.iter().enumerate() {
                let cpu = process_cpu();
                let started = Instant::now();
                let latencies = drive(&http, road, REQUESTS / ROUNDS, in_flight).await;
                results[i].2 += started.elapsed();
                results[i].1 += process_cpu() - cpu;
                results[i].0.extend(latencies);
            }
        }
        let mut lines = Vec::new();
        for (i, (name, _)) in roads.iter().enumerate() {
            let (latencies, cpu, wall) = &mut results[i];
            latencies.sort();
            let n = latencies.len() as f64;
            lines.push((
                percentile(latencies, 50.0),
                percentile(latencies, 99.0),
                micros(*cpu) / n,
            ));
            println!(
                "| {in_flight} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                micros(percentile(latencies, 50.0)),
                micros(percentile(latencies, 90.0)),
                micros(percentile(latencies, 99.0)),
                n / wall.as_secs_f64(),
                micros(*cpu) / n,
            );
        }
        println!(
            "| {in_flight} | added by the gateway | {:.0} | | {:.0} | | {:.0} |",
            micros(lines[1].0) - micros(lines[0].0),
            micros(lines[1].1) - micros(lines[0].1),
            lines[1].2 - lines[0].2,
        );
    }
}
