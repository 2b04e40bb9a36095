//! Regenerating an answer (`regenerate` frame, `POST /api/threads/{id}/regenerate`): a new
//! run for the thread's last question, the earlier answer kept and marked superseded, and
//! the same refusals and limits as a message.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, TestApp, TestUser, WsClient};

const QUESTION: &str = "How can I reduce my LLM costs?";

/// The thread's messages over REST.
async fn messages(app: &TestApp, user: &TestUser, thread: &str) -> Vec<Value> {
    let response = app
        .get(&format!("/api/threads/{thread}/messages"), user.token())
        .await;
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    page["messages"].as_array().unwrap().clone()
}

/// `POST /api/threads/{thread}/regenerate` as `user`: status and raw body.
async fn regenerate(app: &TestApp, user: &TestUser, thread: &str) -> (u16, String) {
    let response = app
        .http
        .post(app.url(&format!("/api/threads/{thread}/regenerate")))
        .bearer_auth(user.token())
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

/// Polls `GET /api/runs/{run}` until the run is finished; returns its status.
async fn finished_status(app: &TestApp, user: &TestUser, run: &str) -> String {
    for _ in 0..600 {
        let record: Value = app
            .get(&format!("/api/runs/{run}"), user.token())
            .await
            .json()
            .await
            .unwrap();
        let status = record["status"].as_str().unwrap().to_string();
        if status != "queued" && status != "running" {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run} did not finish");
}

/// Sends a `regenerate` frame and returns the answer (`run_accepted` or `error_message`).
async fn regenerate_frame(ws: &mut WsClient, thread: &str) -> Value {
    ws.send_json(json!({"type": "regenerate", "thread_id": thread}))
        .await;
    loop {
        let frame = ws.next_json().await;
        if frame["type"] == "run_accepted" || frame["type"] == "error_message" {
            return frame;
        }
    }
}

fn without_timestamp(mut frame: Value) -> Value {
    frame.as_object_mut().unwrap().remove("timestamp");
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerate_over_websocket_answers_the_same_question_again_and_keeps_the_first_answer_superseded(
) {
    let app = spawn_app_with(|_| {}).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let first = ws.ask(QUESTION, None).await;
    assert_eq!(first.terminal().status(), Some("completed"));
    let before = messages(&app, &user, &first.thread_id).await;
    assert_eq!(before.len(), 2);
    assert_eq!(before[1]["superseded"], false);

    let accepted = regenerate_frame(&mut ws, &first.thread_id).await;
    assert_eq!(accepted["type"], "run_accepted", "{accepted}");
    assert_eq!(accepted["thread_id"], first.thread_id.as_str());
    // The message answered again is the question already stored.
    assert_eq!(accepted["message_id"], before[0]["id"]);
    let run = accepted["run_id"].as_str().unwrap().to_string();
    assert_ne!(run, first.run_id);
    let events = ws.collect_run(&run).await;
    assert_eq!(events.last().unwrap().status(), Some("completed"));

    let history = messages(&app, &user, &first.thread_id).await;
    let roles: Vec<&str> = history
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "assistant"], "{history:?}");
    assert_eq!(history[0]["content"], QUESTION);
    assert_eq!(history[0]["id"], before[0]["id"]);
    // The first answer is kept, unchanged, and marked as replaced by the new run...
    assert_eq!(history[1]["id"], before[1]["id"]);
    assert_eq!(history[1]["content"], before[1]["content"]);
    assert_eq!(history[1]["superseded"], true);
    assert_eq!(history[1]["superseded_by"], run.as_str());
    // ...which answered the same question.
    assert_eq!(history[2]["superseded"], false);
    assert!(history[2].get("superseded_by").is_none(), "{}", history[2]);
    assert_eq!(history[2]["metadata"]["run_id"], run.as_str());
    let record: Value = app
        .get(&format!("/api/runs/{run}"), user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(record["thread_id"], first.thread_id.as_str());
    assert_eq!(record["status"], "completed");

    // The WebSocket's history says the same.
    ws.send_json(json!({"type": "get_thread_history", "thread_id": first.thread_id}))
        .await;
    let data = ws.expect_type("thread_data").await;
    assert_eq!(data["messages"].as_array().unwrap(), &history);

    // The thread takes a follow-up as usual after a regeneration.
    let next = ws.ask("and latency?", Some(&first.thread_id)).await;
    assert_eq!(next.terminal().status(), Some("completed"));
    assert_eq!(messages(&app, &user, &first.thread_id).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerate_over_rest_is_accepted_like_a_run_and_each_answer_keeps_its_successor() {
    let app = spawn_app_with(|_| {}).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let first = ws.ask(QUESTION, None).await;

    let (status, body) = regenerate(&app, &user, &first.thread_id).await;
    assert_eq!(status, 202, "{body}");
    let accepted: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(accepted["thread_id"], first.thread_id.as_str());
    assert_eq!(accepted["status"], "queued");
    let second = accepted["run_id"].as_str().unwrap().to_string();
    assert_eq!(finished_status(&app, &user, &second).await, "completed");

    let (status, body) = regenerate(&app, &user, &first.thread_id).await;
    assert_eq!(status, 202, "{body}");
    let third: Value = serde_json::from_str(&body).unwrap();
    let third = third["run_id"].as_str().unwrap().to_string();
    assert_eq!(finished_status(&app, &user, &third).await, "completed");

    let history = messages(&app, &user, &first.thread_id).await;
    assert_eq!(history.len(), 4, "{history:?}");
    let users = history.iter().filter(|m| m["role"] == "user").count();
    assert_eq!(users, 1, "the question is not stored again");
    assert_eq!(history[1]["superseded_by"], second.as_str());
    assert_eq!(history[2]["superseded_by"], third.as_str());
    assert_eq!(history[3]["superseded"], false);
    assert_eq!(history[3]["metadata"]["run_id"], third.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_thread_answers_exactly_like_a_missing_one() {
    let app = spawn_app_with(|_| {}).await;
    let alice = app.register().await;
    let bob = app.register().await;
    let mut alices = app.ws_connect(&alice).await;
    let run = alices.ask(QUESTION, None).await;
    let missing = uuid::Uuid::new_v4().to_string();

    let foreign = regenerate(&app, &bob, &run.thread_id).await;
    assert_eq!(foreign.0, 404, "{}", foreign.1);
    assert_eq!(foreign, regenerate(&app, &bob, &missing).await);
    assert_eq!(foreign, regenerate(&app, &bob, "not-an-id").await);

    let mut bobs = app.ws_connect(&bob).await;
    let foreign = without_timestamp(regenerate_frame(&mut bobs, &run.thread_id).await);
    assert_eq!(foreign["error_code"], "THREAD_NOT_FOUND", "{foreign}");
    assert_eq!(
        foreign,
        without_timestamp(regenerate_frame(&mut bobs, &missing).await)
    );
    assert_eq!(
        foreign,
        without_timestamp(regenerate_frame(&mut bobs, "not-an-id").await)
    );
    bobs.send_json(json!({"type": "regenerate"})).await;
    assert_eq!(
        foreign,
        without_timestamp(bobs.expect_type("error_message").await)
    );

    // Alice's thread is untouched: no run started, nothing superseded.
    let history = messages(&app, &alice, &run.thread_id).await;
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["superseded"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_without_a_question_is_refused() {
    let app = spawn_app_with(|_| {}).await;
    let user = app.register().await;
    let thread: Value = app
        .post_json("/api/threads", Some(user.token()), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let thread = thread["id"].as_str().unwrap();

    let (status, body) = regenerate(&app, &user, thread).await;
    assert_eq!(status, 422, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "validation_failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no message"),
        "{body}"
    );
    let mut ws = app.ws_connect(&user).await;
    let refused = regenerate_frame(&mut ws, thread).await;
    assert_eq!(refused["error_code"], "VALIDATION_ERROR", "{refused}");
    assert!(messages(&app, &user, thread).await.is_empty());
    // No run was left behind (the thread would be busy): a message starts one at once.
    let asked = ws.ask(QUESTION, Some(thread)).await;
    assert_eq!(asked.terminal().status(), Some("completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_with_a_run_in_progress_is_busy() {
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(20)).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let accepted = ws.start_run(QUESTION).await;
    let thread = accepted["thread_id"].as_str().unwrap().to_string();
    let run = accepted["run_id"].as_str().unwrap().to_string();

    let (status, body) = regenerate(&app, &user, &thread).await;
    assert_eq!(status, 409, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "thread_busy");
    let refused = regenerate_frame(&mut ws, &thread).await;
    assert_eq!(refused["error_code"], "THREAD_BUSY", "{refused}");

    ws.collect_run(&run).await;
    // Only the run's own answer is there, and it is current.
    let history = messages(&app, &user, &thread).await;
    assert_eq!(history.len(), 2);
    assert_eq!(history[1]["superseded"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regeneration_stopped_before_its_answer_leaves_the_first_answer_current() {
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(20)).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let first = ws.ask(QUESTION, None).await;

    let accepted = regenerate_frame(&mut ws, &first.thread_id).await;
    let run = accepted["run_id"].as_str().unwrap().to_string();
    // While it runs, the answer it is to replace shows as superseded.
    let during = messages(&app, &user, &first.thread_id).await;
    assert_eq!(during[1]["superseded_by"], run.as_str());
    ws.send_json(json!({"type": "stop_agent", "run_id": run}))
        .await;
    let events = ws.collect_run(&run).await;
    assert_eq!(events.last().unwrap().status(), Some("cancelled"));

    let history = messages(&app, &user, &first.thread_id).await;
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1]["superseded"], false);
    assert!(history[1].get("superseded_by").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regenerating_spends_the_message_rate_and_counts_toward_the_run_limit() {
    let app = spawn_app_with(|s| {
        s.limits.message_burst = 2;
        s.limits.messages_per_minute = 1;
    })
    .await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let first = ws.ask(QUESTION, None).await;
    let (status, body) = regenerate(&app, &user, &first.thread_id).await;
    assert_eq!(status, 202, "{body}");
    let run: Value = serde_json::from_str(&body).unwrap();
    finished_status(&app, &user, run["run_id"].as_str().unwrap()).await;

    let limited = app
        .http
        .post(app.url(&format!("/api/threads/{}/regenerate", first.thread_id)))
        .bearer_auth(user.token())
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    let refused = regenerate_frame(&mut ws, &first.thread_id).await;
    assert_eq!(refused["error_code"], "RATE_LIMITED", "{refused}");
    // The refusals superseded nothing.
    let history = messages(&app, &user, &first.thread_id).await;
    assert_eq!(history.len(), 3);
    assert_eq!(history[2]["superseded"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_limit_applies_to_regenerations() {
    let app = spawn_app_with(|s| {
        s.template_stream_delay = Duration::from_millis(20);
        s.limits.max_concurrent_runs_per_user = 1;
    })
    .await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let first = ws.ask(QUESTION, None).await;
    // Another thread's run takes the user's only place.
    let busy = ws.start_run(QUESTION).await;
    let refused = regenerate_frame(&mut ws, &first.thread_id).await;
    assert_eq!(refused["error_code"], "TOO_MANY_RUNS", "{refused}");
    ws.collect_run(busy["run_id"].as_str().unwrap()).await;
    let history = messages(&app, &user, &first.thread_id).await;
    assert_eq!(history[1]["superseded"], false);
}
