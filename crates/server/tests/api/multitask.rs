//! Double-texting: a message to a thread whose run is still going, with each
//! `multitask_strategy` (`enqueue`, the default; `interrupt`; `rollback`; `reject`), over
//! the WebSocket and REST, and the limits that still hold.

use std::time::Duration;

use apex_protocol::events::AgentEvent;
use apex_protocol::threads::MultitaskStrategy;
use serde_json::{json, Value};

use crate::helpers::{
    assert_contiguous_and_terminated, spawn_app_with, TestApp, TestUser, WsClient,
};

const QUESTION: &str = "How can I reduce my LLM costs?";

/// Slow enough that a second message reliably arrives while the first run is going.
fn slow_runs(settings: &mut apex_server::settings::Settings) {
    settings.template_stream_delay = Duration::from_millis(30);
}

/// What one socket saw until `terminals` runs had ended: every `run_accepted` and every
/// agent event, in arrival order.
struct Seen {
    accepted: Vec<Value>,
    events: Vec<AgentEvent>,
}

impl Seen {
    fn of_run(&self, run: &str) -> Vec<AgentEvent> {
        self.events
            .iter()
            .filter(|e| e.run_id == run)
            .cloned()
            .collect()
    }

    /// Index of the run's terminal event, and of its first event, in arrival order.
    fn span(&self, run: &str) -> (usize, usize) {
        let first = self.events.iter().position(|e| e.run_id == run);
        let terminal = self
            .events
            .iter()
            .position(|e| e.run_id == run && e.is_terminal());
        (
            first.expect("the run sent events"),
            terminal.expect("the run ended"),
        )
    }
}

async fn read_until_ended(ws: &mut WsClient, terminals: usize) -> Seen {
    let mut seen = Seen {
        accepted: Vec::new(),
        events: Vec::new(),
    };
    while seen.events.iter().filter(|e| e.is_terminal()).count() < terminals {
        let frame = ws.next_json().await;
        if frame["type"] == "run_accepted" {
            seen.accepted.push(frame);
        } else if frame.get("seq").is_some() {
            seen.events
                .push(serde_json::from_value(frame).expect("agent event"));
        }
    }
    seen
}

/// Starts a run on a new thread and waits for its first event, so that it is running.
async fn first_run(ws: &mut WsClient) -> (String, String, Vec<AgentEvent>) {
    let accepted = ws.start_run(QUESTION).await;
    let run = accepted["run_id"].as_str().unwrap().to_string();
    let thread = accepted["thread_id"].as_str().unwrap().to_string();
    let mut early = Vec::new();
    while early.is_empty() {
        let frame = ws.next_json().await;
        if frame.get("seq").is_some() {
            early.push(serde_json::from_value::<AgentEvent>(frame).unwrap());
        }
    }
    (run, thread, early)
}

fn second_message(thread: &str, strategy: Option<&str>) -> Value {
    let mut frame = json!({
        "type": "user_message",
        "payload": {"text": "and latency?", "thread_id": thread},
    });
    if let Some(strategy) = strategy {
        frame["payload"]["multitask_strategy"] = json!(strategy);
    }
    frame
}

async fn thread_messages(app: &TestApp, user: &TestUser, thread: &str) -> Vec<Value> {
    let response = app
        .get(&format!("/api/threads/{thread}/messages"), user.token())
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["messages"].as_array().cloned().unwrap_or_default()
}

async fn run_status(app: &TestApp, user: &TestUser, run: &str) -> (u16, Value) {
    let response = app.get(&format!("/api/runs/{run}"), user.token()).await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_is_the_default_and_starts_the_second_run_after_the_first_ends() {
    let app = spawn_app_with(slow_runs).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (first, thread, mut early) = first_run(&mut ws).await;
    ws.send_json(second_message(&thread, None)).await;
    let mut seen = read_until_ended(&mut ws, 2).await;
    early.append(&mut seen.events);
    seen.events = early;

    assert_eq!(
        seen.accepted.len(),
        1,
        "one run_accepted for the second message"
    );
    let accepted = &seen.accepted[0];
    assert_eq!(accepted["status"], "queued");
    assert_eq!(accepted["thread_id"], thread.as_str());
    let second = accepted["run_id"].as_str().unwrap().to_string();
    // The second run's first event comes after the first run's terminal event.
    let (_, first_end) = seen.span(&first);
    let (second_start, _) = seen.span(&second);
    assert!(
        first_end < second_start,
        "the queued run started before the first run ended"
    );
    for run in [&first, &second] {
        let events = seen.of_run(run);
        assert_contiguous_and_terminated(&events);
        assert_eq!(events.last().unwrap().status(), Some("completed"));
    }
    // Messages are stored as they arrive: both questions, then the answers in run order,
    // each naming its run.
    let messages = thread_messages(&app, &user, &thread).await;
    let rows: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap(),
                m["metadata"]["run_id"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("user", first.as_str()),
            ("user", second.as_str()),
            ("assistant", first.as_str()),
            ("assistant", second.as_str()),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_over_rest_answers_202_queued_and_runs_in_order() {
    let app = spawn_app_with(slow_runs).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (first, thread, _) = first_run(&mut ws).await;
    let response = app
        .post_json(
            &format!("/api/threads/{thread}/runs"),
            Some(user.token()),
            &json!({"message": "and latency?", "multitask_strategy": "enqueue"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "queued");
    let second = body["run_id"].as_str().unwrap().to_string();
    let seen = read_until_ended(&mut ws, 2).await;
    let (_, first_end) = seen.span(&first);
    let (second_start, _) = seen.span(&second);
    assert!(first_end < second_start);
    let (status, run) = run_status(&app, &user, &second).await;
    assert_eq!(status, 200);
    assert_eq!(run["status"], "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_ends_the_first_run_interrupted_with_its_events_kept() {
    let app = spawn_app_with(slow_runs).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (first, thread, mut early) = first_run(&mut ws).await;
    ws.send_json(second_message(&thread, Some("interrupt")))
        .await;
    let mut seen = read_until_ended(&mut ws, 2).await;
    early.append(&mut seen.events);
    seen.events = early;
    let second = seen.accepted[0]["run_id"].as_str().unwrap().to_string();

    let first_events = seen.of_run(&first);
    assert_contiguous_and_terminated(&first_events);
    assert_eq!(first_events.last().unwrap().status(), Some("interrupted"));
    let second_events = seen.of_run(&second);
    assert_contiguous_and_terminated(&second_events);
    assert_eq!(second_events.last().unwrap().status(), Some("completed"));
    let (_, first_end) = seen.span(&first);
    let (second_start, _) = seen.span(&second);
    assert!(first_end < second_start);

    // The interrupted run and its events stay, as delivered.
    let (status, run) = run_status(&app, &user, &first).await;
    assert_eq!(status, 200);
    assert_eq!(run["status"], "interrupted");
    let stored: Value = app
        .get(&format!("/api/runs/{first}/events"), user.token())
        .await
        .json()
        .await
        .unwrap();
    let stored = stored["events"].as_array().unwrap();
    assert_eq!(stored.len(), first_events.len());
    // Both user messages stay; only the second run answered.
    let messages = thread_messages(&app, &user, &thread).await;
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "user", "assistant"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_removes_the_first_run_its_message_and_events() {
    let app = spawn_app_with(slow_runs).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (first, thread, mut early) = first_run(&mut ws).await;
    let response = app
        .post_json(
            &format!("/api/threads/{thread}/runs"),
            Some(user.token()),
            &json!({"message": "actually, only latency", "multitask_strategy": "rollback"}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let body: Value = response.json().await.unwrap();
    let second = body["run_id"].as_str().unwrap().to_string();
    let mut seen = read_until_ended(&mut ws, 2).await;
    early.append(&mut seen.events);
    seen.events = early;

    // Watchers saw the first run end (one terminal event, `cancelled`) before the second.
    let first_events = seen.of_run(&first);
    assert_contiguous_and_terminated(&first_events);
    assert_eq!(first_events.last().unwrap().status(), Some("cancelled"));
    let second_events = seen.of_run(&second);
    assert_contiguous_and_terminated(&second_events);
    assert_eq!(second_events.last().unwrap().status(), Some("completed"));

    // The run is removed once its terminal event is out (before or while the next runs).
    let mut gone = false;
    for _ in 0..100 {
        if run_status(&app, &user, &first).await.0 == 404 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the rolled-back run is still there");
    let events = app
        .get(&format!("/api/runs/{first}/events"), user.token())
        .await;
    assert_eq!(events.status(), 404);
    let messages = thread_messages(&app, &user, &thread).await;
    let contents: Vec<(&str, &str)> = messages
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap(),
                m["content"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(contents.len(), 2, "{contents:?}");
    assert_eq!(contents[0], ("user", "actually, only latency"));
    assert_eq!(contents[1].0, "assistant");
    assert!(
        messages.iter().all(|m| m["content"] != QUESTION),
        "the rolled-back question is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_answers_thread_busy_and_stores_nothing() {
    let app = spawn_app_with(slow_runs).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (first, thread, _) = first_run(&mut ws).await;
    ws.send_json(second_message(&thread, Some("reject"))).await;
    assert_eq!(
        ws.expect_type("error_message").await["error_code"],
        "THREAD_BUSY"
    );
    let response = app
        .post_json(
            &format!("/api/threads/{thread}/runs"),
            Some(user.token()),
            &json!({"message": "and latency?", "multitask_strategy": "reject"}),
        )
        .await;
    assert_eq!(response.status(), 409);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "thread_busy");
    let events = ws.collect_run(&first).await;
    assert_eq!(events.last().unwrap().status(), Some("completed"));
    assert_eq!(thread_messages(&app, &user, &thread).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_strategy_is_a_validation_error() {
    let app = spawn_app_with(slow_runs).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (first, thread, _) = first_run(&mut ws).await;
    for bad in [json!("queue"), json!(7)] {
        let mut frame = second_message(&thread, None);
        frame["payload"]["multitask_strategy"] = bad;
        ws.send_json(frame).await;
        assert_eq!(
            ws.expect_type("error_message").await["error_code"],
            "VALIDATION_ERROR"
        );
    }
    let response = app
        .post_json(
            &format!("/api/threads/{thread}/runs"),
            Some(user.token()),
            &json!({"message": "and latency?", "multitask_strategy": "INTERRUPT"}),
        )
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "validation_failed");
    // Nothing was stored, and the first run went on undisturbed.
    let events = ws.collect_run(&first).await;
    assert_eq!(events.last().unwrap().status(), Some("completed"));
    assert_eq!(thread_messages(&app, &user, &thread).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_default_strategy_applies_to_messages_that_name_none() {
    let app = spawn_app_with(|s| {
        slow_runs(s);
        s.default_multitask_strategy = MultitaskStrategy::Reject;
    })
    .await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (first, thread, _) = first_run(&mut ws).await;
    ws.send_json(second_message(&thread, None)).await;
    assert_eq!(
        ws.expect_type("error_message").await["error_code"],
        "THREAD_BUSY"
    );
    // An explicit strategy still wins over the default.
    ws.send_json(second_message(&thread, Some("enqueue"))).await;
    let seen = read_until_ended(&mut ws, 2).await;
    let second = seen.accepted[0]["run_id"].as_str().unwrap().to_string();
    assert_eq!(
        seen.of_run(&second).last().unwrap().status(),
        Some("completed")
    );
    let (_, first_end) = seen.span(&first);
    let (second_start, _) = seen.span(&second);
    assert!(first_end < second_start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_runs_count_against_the_per_user_limit_and_superseded_ones_do_not() {
    let app = spawn_app_with(|s| {
        slow_runs(s);
        s.limits.max_concurrent_runs_per_user = 2;
    })
    .await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (first, thread, _) = first_run(&mut ws).await;
    // Running + queued = the limit of 2.
    ws.send_json(second_message(&thread, Some("enqueue"))).await;
    let queued = ws.expect_type("run_accepted").await;
    let queued = queued["run_id"].as_str().unwrap().to_string();
    ws.send_json(second_message(&thread, Some("enqueue"))).await;
    assert_eq!(
        ws.expect_type("error_message").await["error_code"],
        "TOO_MANY_RUNS"
    );
    ws.send_json(json!({"type": "user_message", "text": QUESTION}))
        .await;
    assert_eq!(
        ws.expect_type("error_message").await["error_code"],
        "TOO_MANY_RUNS"
    );
    // An interrupt ends both: they no longer count, so it is accepted at the limit.
    ws.send_json(second_message(&thread, Some("interrupt")))
        .await;
    let seen = read_until_ended(&mut ws, 3).await;
    assert_eq!(seen.accepted.len(), 1);
    let last = seen.accepted[0]["run_id"].as_str().unwrap().to_string();
    assert_eq!(
        seen.of_run(&first).last().unwrap().status(),
        Some("interrupted")
    );
    // The queued run never started: it ends with just its error and terminal event.
    let never_started = seen.of_run(&queued);
    assert_contiguous_and_terminated(&never_started);
    assert_eq!(never_started.last().unwrap().status(), Some("interrupted"));
    assert_eq!(
        seen.of_run(&last).last().unwrap().status(),
        Some("completed")
    );
    // All ended: the user has their two places back.
    let again = ws.ask(QUESTION, Some(&thread)).await;
    assert_eq!(again.terminal().status(), Some("completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_the_strategy() {
    let app = spawn_app_with(|_| {}).await;
    let document: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schemas = &document["components"]["schemas"];
    let field = &schemas["StartRunRequest"]["properties"]["multitask_strategy"];
    assert!(!field.is_null(), "{}", schemas["StartRunRequest"]);
    let strategies = schemas["MultitaskStrategy"]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("{}", schemas["MultitaskStrategy"]));
    let names: Vec<&str> = strategies.iter().filter_map(Value::as_str).collect();
    assert_eq!(names, ["enqueue", "interrupt", "rollback", "reject"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_also_removes_runs_still_queued_behind_the_running_one() {
    let app = spawn_app_with(slow_runs).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (first, thread, _) = first_run(&mut ws).await;
    ws.send_json(second_message(&thread, Some("enqueue"))).await;
    let queued = ws.expect_type("run_accepted").await["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut frame = second_message(&thread, Some("rollback"));
    frame["payload"]["text"] = json!("start over");
    ws.send_json(frame).await;
    let seen = read_until_ended(&mut ws, 3).await;
    let last = seen.accepted[0]["run_id"].as_str().unwrap().to_string();
    for gone in [&first, &queued] {
        assert_eq!(
            seen.of_run(gone).last().unwrap().status(),
            Some("cancelled")
        );
    }
    assert_eq!(
        seen.of_run(&last).last().unwrap().status(),
        Some("completed")
    );
    for gone in [&first, &queued] {
        let mut removed = false;
        for _ in 0..100 {
            if run_status(&app, &user, gone).await.0 == 404 {
                removed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(removed, "run {gone} is still there");
    }
    let messages = thread_messages(&app, &user, &thread).await;
    let runs: Vec<&str> = messages
        .iter()
        .map(|m| m["metadata"]["run_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(runs, [last.as_str(), last.as_str()], "{messages:?}");
    assert_eq!(messages[0]["content"], "start over");
}
