//! `kill -9` in the middle of many runs: the next start finds every stored message intact,
//! runs every in-flight run again (a second attempt continuing its event log) to a
//! completed answer, and the database passes SQLite's integrity check.

mod support;

use std::process::Child;
use std::time::Duration;

use serde_json::{json, Value};

/// Starts `apex serve` on `data_dir`, streaming the template answer with `delay_ms`
/// between chunks.
fn start(data_dir: &std::path::Path, delay_ms: u64) -> (Child, String) {
    let mut command = support::serve_command(data_dir);
    command.args(["--template-stream-delay-ms", &delay_ms.to_string()]);
    support::spawn_serve(command)
}

async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn post_json(http: &reqwest::Client, url: &str, token: Option<&str>, body: &Value) -> Value {
    let mut request = http.post(url).json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dash_nine_mid_run_loses_nothing_and_recovers_every_run() {
    let data_dir = tempfile::tempdir().unwrap();
    let (mut server, base) = start(data_dir.path(), 100);
    let http = reqwest::Client::new();

    // Five users, two threads each, one run per thread: ten runs in flight.
    let mut started = Vec::new();
    for user in 0..5 {
        let pair: Value = post_json(
            &http,
            &format!("{base}/auth/register"),
            None,
            &json!({"email": format!("crash{user}@example.com"), "password": "a long password"}),
        )
        .await;
        let token = pair["access_token"].as_str().unwrap().to_string();
        for thread in 0..2 {
            let created: Value = post_json(
                &http,
                &format!("{base}/api/threads"),
                Some(&token),
                &json!({"title": format!("t{thread}")}),
            )
            .await;
            let thread_id = created["id"].as_str().unwrap().to_string();
            let message = format!("How can I reduce my LLM costs? ({user}/{thread})");
            let accepted: Value = post_json(
                &http,
                &format!("{base}/api/threads/{thread_id}/runs"),
                Some(&token),
                &json!({"message": message}),
            )
            .await;
            started.push((
                token.clone(),
                thread_id,
                accepted["run_id"].as_str().unwrap().to_string(),
                message,
            ));
        }
    }
    // Wait until every run is streaming its answer, then kill without warning.
    for (token, _, run_id, _) in &started {
        loop {
            let run: Value = get_json(&http, &format!("{base}/api/runs/{run_id}"), token).await;
            assert_eq!(run["status"], "running", "runs are still in flight: {run}");
            if run["last_seq"].as_u64().unwrap() > 30 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();

    // The next start runs them again, faster.
    let (mut server, base) = start(data_dir.path(), 2);
    for (token, thread_id, run_id, message) in &started {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let run = loop {
            let run: Value = get_json(&http, &format!("{base}/api/runs/{run_id}"), token).await;
            if !matches!(run["status"].as_str(), Some("queued" | "running")) {
                break run;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "run never ended: {run}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(run["status"], "completed", "{run}");
        let events: Value = get_json(
            &http,
            &format!("{base}/api/runs/{run_id}/events?after_seq=0"),
            token,
        )
        .await;
        let events = events["events"].as_array().unwrap();
        for (i, event) in events.iter().enumerate() {
            assert_eq!(
                event["seq"].as_u64().unwrap(),
                i as u64 + 1,
                "log has no hole"
            );
        }
        // The first attempt's events stay, then the second attempt says so and starts over.
        assert!(
            events.len() > 31,
            "the first attempt's events are kept: {}",
            events.len()
        );
        assert!(
            events.iter().any(|e| e["type"] == "agent_thinking"
                && e["agent_name"] == "supervisor"
                && e["payload"]["reasoning"]
                    .as_str()
                    .is_some_and(|r| r.contains("attempt 2 of 2"))),
            "the restart is announced in the log"
        );
        let last = events.last().unwrap();
        assert_eq!(last["agent_name"], "supervisor");
        assert_eq!(last["type"], "agent_completed");
        assert_eq!(last["status"], "completed");
        let page: Value = get_json(
            &http,
            &format!("{base}/api/threads/{thread_id}/messages"),
            token,
        )
        .await;
        assert_eq!(
            page["messages"][0]["content"],
            message.as_str(),
            "the user's message survived"
        );
        assert_eq!(page["messages"][1]["role"], "assistant", "{page}");
        assert_eq!(page["messages"].as_array().unwrap().len(), 2, "one answer");
    }
    server.kill().unwrap();
    server.wait().unwrap();

    // The database file itself is sound.
    let url = format!("sqlite://{}", data_dir.path().join("apex.db").display());
    let mut connection = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let (result,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(result, "ok");
}
