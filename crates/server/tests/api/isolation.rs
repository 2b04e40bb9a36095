//! Many users at once: each sees only their own events, threads, runs and numbers.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{
    assert_contiguous_and_terminated, spawn_app, spawn_app_with, TestApp, TestUser,
};

const USERS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_users_at_once_each_receive_only_their_own_frames_and_numbers() {
    let app = spawn_app().await;
    let mut users = Vec::new();
    for _ in 0..USERS {
        users.push(app.register().await);
    }
    // Connect everyone first so that every socket is open while all runs execute.
    let mut sockets = Vec::new();
    for user in &users {
        sockets.push(app.ws_connect(user).await);
    }
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(USERS));
    let mut tasks = Vec::new();
    for (user, mut ws) in users.iter().cloned().zip(sockets) {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            ws.send_json(json!({"type": "user_message", "text": "How can I reduce my LLM costs?"}))
                .await;
            // Read every frame up to the terminal event and check each one.
            let mut run_id: Option<String> = None;
            let mut thread_id: Option<String> = None;
            let mut events = Vec::new();
            loop {
                let frame = ws.next_json().await;
                match frame["type"].as_str().unwrap() {
                    "thread_created" => {
                        thread_id = Some(frame["thread_id"].as_str().unwrap().into())
                    }
                    "run_accepted" => run_id = Some(frame["run_id"].as_str().unwrap().into()),
                    _ => {
                        assert_eq!(frame["user_id"], user.id.as_str(), "foreign frame: {frame}");
                        assert_eq!(
                            frame["run_id"].as_str(),
                            run_id.as_deref(),
                            "foreign run: {frame}"
                        );
                        assert_eq!(
                            frame["thread_id"].as_str(),
                            thread_id.as_deref(),
                            "foreign thread: {frame}"
                        );
                        let event: apex_protocol::events::AgentEvent =
                            serde_json::from_value(frame).unwrap();
                        let terminal = event.is_terminal();
                        events.push(event);
                        if terminal {
                            break;
                        }
                    }
                }
            }
            (user, thread_id.unwrap(), events, ws)
        }));
    }
    let mut totals = HashSet::new();
    let mut keep_open = Vec::new();
    for task in tasks {
        let (user, thread_id, events, ws) = task.await.expect("user task");
        assert_contiguous_and_terminated(&events);
        let terminal = events.last().unwrap();
        assert_eq!(terminal.status(), Some("completed"));
        let summary = app.usage_summary(&user).await;
        let reported = terminal.payload["result"]["usage"]["total_cost_usd"]
            .as_f64()
            .unwrap();
        assert_eq!(
            reported, summary.total_cost_usd,
            "answer uses the user's own numbers"
        );
        totals.insert(format!("{reported:.6}"));
        // Their thread is theirs alone.
        let threads: Vec<Value> = app
            .get("/api/threads", user.token())
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(threads.len(), 1);
        assert_eq!(threads[0]["id"], thread_id.as_str());
        keep_open.push(ws);
    }
    assert!(
        totals.len() > USERS / 2,
        "users have different data: {totals:?}"
    );

    // Quiet afterwards: no socket receives anything more (in particular nothing foreign).
    for ws in keep_open.iter_mut() {
        ws.send_json(json!({"type": "ping"})).await;
        assert_eq!(ws.next_json().await["type"], "pong");
    }
    for ws in keep_open {
        ws.close().await;
    }
    wait_for_no_subscriptions(&app).await;
}

async fn wait_for_no_subscriptions(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.state.infra.bus.subscribed_users() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections left bus entries behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status_and_body(response: reqwest::Response) -> (u16, Value) {
    (
        response.status().as_u16(),
        response.json().await.unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_thread_and_run_answer_404_exactly_like_missing_ones() {
    let app = spawn_app().await;
    let alice = app.register().await;
    let bob = app.register().await;
    let mut ws = app.ws_connect(&alice).await;
    let run = ws.ask("How can I reduce my LLM costs?", None).await;
    let missing_thread = uuid::Uuid::new_v4().to_string();
    let missing_run = uuid::Uuid::new_v4().to_string();

    let pairs = [
        (
            format!("/api/threads/{}", run.thread_id),
            format!("/api/threads/{missing_thread}"),
        ),
        (
            format!("/api/threads/{}/messages", run.thread_id),
            format!("/api/threads/{missing_thread}/messages"),
        ),
        (
            format!("/api/runs/{}", run.run_id),
            format!("/api/runs/{missing_run}"),
        ),
        (
            format!("/api/runs/{}/events", run.run_id),
            format!("/api/runs/{missing_run}/events"),
        ),
    ];
    for (alices, missing) in pairs {
        let foreign = status_and_body(app.get(&alices, bob.token()).await).await;
        let absent = status_and_body(app.get(&missing, bob.token()).await).await;
        assert_eq!(foreign.0, 404, "{alices}");
        assert_eq!(foreign, absent, "{alices} reveals nothing");
    }
    let patch = app
        .http
        .patch(app.url(&format!("/api/threads/{}", run.thread_id)))
        .bearer_auth(bob.token())
        .json(&json!({"title": "mine now"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), 404);
    let delete = app
        .http
        .delete(app.url(&format!("/api/threads/{}", run.thread_id)))
        .bearer_auth(bob.token())
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), 404);
    let start = app
        .post_json(
            &format!("/api/threads/{}/runs", run.thread_id),
            Some(bob.token()),
            &json!({"message": "hi"}),
        )
        .await;
    assert_eq!(start.status(), 404);
    let cancel = app
        .post_json(
            &format!("/api/runs/{}/cancel", run.run_id),
            Some(bob.token()),
            &json!({}),
        )
        .await;
    assert_eq!(cancel.status(), 404);

    // Alice's thread is intact.
    let thread: Value = app
        .get(&format!("/api/threads/{}", run.thread_id), alice.token())
        .await
        .json()
        .await
        .unwrap();
    assert_ne!(thread["title"], "mine now");
    assert_eq!(thread["message_count"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_run_id_cannot_be_resumed_or_stopped() {
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(30)).await;
    let alice = app.register().await;
    let bob: TestUser = app.register().await;
    let mut alice_ws = app.ws_connect(&alice).await;
    let mut bob_ws = app.ws_connect(&bob).await;
    alice_ws
        .send_json(json!({"type": "user_message", "text": "How can I reduce my LLM costs?"}))
        .await;
    let run_id = alice_ws.expect_type("run_accepted").await["run_id"]
        .as_str()
        .unwrap()
        .to_string();

    bob_ws
        .send_json(json!({"type": "stop_agent", "run_id": run_id}))
        .await;
    assert_eq!(bob_ws.next_json().await["error_code"], "RUN_NOT_FOUND");
    bob_ws
        .send_json(json!({"type": "resume", "run_id": run_id, "after_seq": 0}))
        .await;
    assert_eq!(bob_ws.next_json().await["error_code"], "RUN_NOT_FOUND");
    // Bob's stop without a run id has nothing of his to stop.
    bob_ws.send_json(json!({"type": "stop_agent"})).await;
    assert_eq!(bob_ws.next_json().await["error_code"], "RUN_NOT_ACTIVE");

    let events = alice_ws.collect_run(&run_id).await;
    assert_eq!(
        events.last().unwrap().status(),
        Some("completed"),
        "Alice's run was untouched"
    );
    assert!(events.iter().all(|e| e.user_id == alice.id));
    bob_ws.send_json(json!({"type": "ping"})).await;
    assert_eq!(
        bob_ws.next_json().await["type"],
        "pong",
        "Bob received none of Alice's events"
    );
}
