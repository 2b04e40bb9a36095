//! Shutdown and restart: runs finish or end `interrupted`, clients are told, nothing is
//! left without a terminal event.

use std::time::Duration;

use apex_protocol::events::AgentEvent;
use apex_protocol::threads::RunStatus;
use apex_server::ids::{RunId, ThreadId, UserId};
use apex_server::store::RunRecord;
use serde_json::json;

use crate::helpers::{assert_contiguous_and_terminated, spawn_app_with};

const QUESTION: &str = "How can I reduce my LLM costs?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_tells_clients_and_lets_runs_finish() {
    let mut app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(10)).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let run_id = ws.start_run_id(QUESTION).await;
    ws.expect_type("partial_result").await;

    app.shutdown().await;
    // Everything the socket got after the request to stop: the notice, the rest of the
    // run, then the close.
    let mut saw_notice = false;
    let terminal = loop {
        let frame = ws.next_json().await;
        if frame["type"] == "server_shutdown" {
            saw_notice = true;
        } else if frame["type"] == "agent_completed" && frame["agent_name"] == "supervisor" {
            break frame;
        }
    };
    assert!(saw_notice, "clients are told the server is stopping");
    assert_eq!(terminal["run_id"], run_id.as_str());
    assert_eq!(
        terminal["status"], "completed",
        "the run finished within the grace period"
    );
    assert_eq!(ws.expect_close().await.0, 1001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_still_going_after_the_grace_period_end_interrupted() {
    let mut app = spawn_app_with(|s| {
        s.template_stream_delay = Duration::from_millis(300);
        s.shutdown_grace = Duration::from_millis(100);
    })
    .await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let run_id = ws.start_run_id(QUESTION).await;
    ws.expect_type("partial_result").await;

    app.shutdown().await;
    let terminal = loop {
        let frame = ws.next_json().await;
        if frame["type"] == "agent_completed" && frame["agent_name"] == "supervisor" {
            break frame;
        }
    };
    assert_eq!(terminal["status"], "interrupted");
    let owner = UserId::parse(&user.id).unwrap();
    let run = app
        .state
        .infra
        .store
        .get_run(owner, RunId::parse(&run_id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.status, RunStatus::Interrupted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_closes_out_runs_a_previous_process_left_unfinished() {
    let app = spawn_app_with(|_| {}).await;
    let user = app.register().await;
    let thread: serde_json::Value = app
        .post_json("/api/threads", Some(user.token()), &json!({"title": "t"}))
        .await
        .json()
        .await
        .unwrap();
    // A run as a crashed process would leave it: running, one event stored.
    let owner = UserId::parse(&user.id).unwrap();
    let run = RunRecord {
        id: RunId::generate(),
        thread_id: ThreadId::parse(thread["id"].as_str().unwrap()).unwrap(),
        status: RunStatus::Running,
        created_at_ms: 0,
        started_at_ms: Some(0),
        finished_at_ms: None,
        error: None,
        last_seq: 0,
    };
    let store = &app.state.infra.store;
    store.create_run(owner, &run).await.unwrap();
    store
        .set_run_status(owner, run.id, RunStatus::Running, None, 1)
        .await
        .unwrap();
    let first = json!({"type": "agent_started", "seq": 1, "run_id": run.id.to_string(),
        "thread_id": thread["id"], "user_id": user.id, "agent_name": "supervisor",
        "timestamp": "2026-01-01T00:00:00.000Z", "payload": {"status": "started", "message": "m"}});
    store
        .append_event(owner, run.id, 1, &first.to_string(), 1)
        .await
        .unwrap();

    // The next start over the same data folder.
    let restarted = apex_server::build_state(app.settings.clone())
        .await
        .unwrap();
    let recovered = restarted
        .infra
        .store
        .get_run(owner, run.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(recovered.status, RunStatus::Interrupted);
    let events: Vec<AgentEvent> = restarted
        .infra
        .store
        .list_events(owner, run.id, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| serde_json::from_str(&e.json).unwrap())
        .collect();
    assert_contiguous_and_terminated(&events);
    assert_eq!(events.last().unwrap().status(), Some("interrupted"));
    assert_eq!(events.len(), 3, "start, error, terminal");
}
