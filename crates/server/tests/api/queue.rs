//! The run queue as users meet it: runs beyond an instance's capacity wait and then run,
//! a waiting run can be stopped before it starts, and a run a crashed process was
//! executing is run again (or ended `interrupted`) by the next process.

use std::time::Duration;

use apex_protocol::events::AgentEvent;
use apex_protocol::threads::RunStatus;
use apex_server::clock::now_ms;
use apex_server::ids::{MessageId, RunId, ThreadId, UserId};
use apex_server::store::{MessageRecord, RunRecord, RunSubmission, SubmitOutcome};
use serde_json::{json, Value};

use crate::helpers::{
    assert_contiguous_and_terminated, spawn_app_with, TestApp, TestUser, WsClient,
};

const QUESTION: &str = "How can I reduce my LLM costs?";

async fn run_json(app: &TestApp, user: &TestUser, run_id: &str) -> Value {
    app.get(&format!("/api/runs/{run_id}"), user.token())
        .await
        .json()
        .await
        .unwrap()
}

/// An instance that executes one run at a time: Alice's run holds the slot, Bob's was
/// accepted and waits in the queue.
struct OneSlotTaken {
    app: TestApp,
    alice: TestUser,
    bob: TestUser,
    alice_ws: WsClient,
    bob_ws: WsClient,
    busy: String,
    waiting: String,
}

async fn one_slot_taken(stream_delay: Duration) -> OneSlotTaken {
    let app = spawn_app_with(|s| {
        s.max_runs_per_instance = 1;
        s.template_stream_delay = stream_delay;
    })
    .await;
    let (alice, bob) = (app.register().await, app.register().await);
    let mut alice_ws = app.ws_connect(&alice).await;
    let mut bob_ws = app.ws_connect(&bob).await;
    let start = async |ws: &mut WsClient| {
        ws.send_json(json!({"type": "user_message", "text": QUESTION}))
            .await;
        ws.expect_type("run_accepted").await["run_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let busy = start(&mut alice_ws).await;
    while run_json(&app, &alice, &busy).await["status"] != "running" {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let waiting = start(&mut bob_ws).await;
    // Accepted, but the one slot is taken: it waits.
    assert_eq!(run_json(&app, &bob, &waiting).await["status"], "queued");
    OneSlotTaken {
        app,
        alice,
        bob,
        alice_ws,
        bob_ws,
        busy,
        waiting,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_beyond_the_instance_capacity_wait_their_turn_and_then_run() {
    let mut t = one_slot_taken(Duration::from_millis(5)).await;
    let first_events = t.alice_ws.collect_run(&t.busy).await;
    let second_events = t.bob_ws.collect_run(&t.waiting).await;
    assert_contiguous_and_terminated(&first_events);
    assert_contiguous_and_terminated(&second_events);
    assert_eq!(second_events.last().unwrap().status(), Some("completed"));
    // One at a time: the second started once the first had finished.
    let first = run_json(&t.app, &t.alice, &t.busy).await;
    let second = run_json(&t.app, &t.bob, &t.waiting).await;
    assert!(
        second["started_at"].as_str().unwrap() >= first["finished_at"].as_str().unwrap(),
        "{first} / {second}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_run_can_be_stopped_before_it_starts() {
    let t = one_slot_taken(Duration::from_millis(20)).await;
    let OneSlotTaken {
        app,
        bob,
        mut alice_ws,
        mut bob_ws,
        busy,
        waiting,
        ..
    } = t;
    // Alice cannot stop Bob's waiting run; Bob can.
    alice_ws
        .send_json(json!({"type": "stop_agent", "run_id": waiting}))
        .await;
    assert_eq!(
        alice_ws.expect_type("error_message").await["error_code"],
        "RUN_NOT_FOUND"
    );
    bob_ws
        .send_json(json!({"type": "stop_agent", "run_id": waiting}))
        .await;
    bob_ws.expect_type("stop_acknowledged").await;
    let events = bob_ws.collect_run(&waiting).await;
    assert_contiguous_and_terminated(&events);
    assert_eq!(
        events.len(),
        2,
        "an error and the terminal event: {events:?}"
    );
    assert_eq!(events[0].payload["error_code"], "CANCELLED");
    assert_eq!(events[1].status(), Some("cancelled"));
    assert_eq!(run_json(&app, &bob, &waiting).await["status"], "cancelled");

    // Alice's run is untouched, and the stopped run never starts afterwards.
    let busy_events = alice_ws.collect_run(&busy).await;
    assert_eq!(busy_events.last().unwrap().status(), Some("completed"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stored = app
        .state
        .infra
        .store
        .list_events(
            UserId::parse(&bob.id).unwrap(),
            RunId::parse(&waiting).unwrap(),
            0,
            100,
        )
        .await
        .unwrap();
    assert_eq!(stored.len(), 2);
}

/// Leaves a run as a process killed mid-run would: submitted, claimed by that process,
/// its first event written. Returns the user, the run and the server's settings.
async fn run_left_by_a_crash(max_attempts: u32) -> (TestApp, UserId, RunId) {
    let mut app = spawn_app_with(|s| {
        // This process's own dispatcher must not take the run: it only polls, rarely.
        s.queue_poll_interval = Duration::from_secs(3600);
        s.run_max_attempts = max_attempts;
    })
    .await;
    let user = app.register().await;
    let thread: Value = app
        .post_json("/api/threads", Some(user.token()), &json!({"title": "t"}))
        .await
        .json()
        .await
        .unwrap();
    app.shutdown().await;
    let owner = UserId::parse(&user.id).unwrap();
    let thread_id = ThreadId::parse(thread["id"].as_str().unwrap()).unwrap();
    let run_id = RunId::generate();
    let now = now_ms();
    let store = &app.state.infra.store;
    let message = MessageRecord {
        id: MessageId::generate(),
        thread_id,
        role: "user".into(),
        content: QUESTION.into(),
        metadata: json!({"run_id": run_id.to_string()}),
        created_at_ms: now,
        superseded_by: None,
    };
    let run = RunRecord {
        id: run_id,
        thread_id,
        status: RunStatus::Queued,
        created_at_ms: now,
        started_at_ms: None,
        finished_at_ms: None,
        error: None,
        last_seq: 0,
    };
    let submitted = store
        .submit_run(
            owner,
            &RunSubmission {
                message: &message,
                run: &run,
                request_id: "request-of-the-crashed-process",
                max_unfinished: 3,
                claim_by: None,
                new_thread: None,
                strategy: apex_protocol::threads::MultitaskStrategy::Reject,
                require_approval: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(submitted, SubmitOutcome::Queued);
    let claimed = store
        .claim_queued_runs("crashed-process", 1, now)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let first = json!({"type": "agent_started", "seq": 1, "run_id": run_id.to_string(),
        "thread_id": thread_id.to_string(), "user_id": user.id, "agent_name": "supervisor",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "payload": {"status": "started", "message": "Working on your request"}});
    store
        .append_event(owner, run_id, 1, &first.to_string(), now)
        .await
        .unwrap();
    (app, owner, run_id)
}

/// Starts a new process over the same database and waits for the run to end there.
async fn restart_and_wait(app: &TestApp, owner: UserId, run_id: RunId) -> Vec<AgentEvent> {
    let restarted = apex_server::build_state(app.settings.clone())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(apex_server::serve(
        listener,
        restarted.clone(),
        std::future::pending(),
    ));
    let store = &restarted.infra.store;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let run = store.get_run(owner, run_id).await.unwrap().unwrap();
        if run.status.is_terminal() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run never ended: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The terminal event is written right after the status.
    tokio::time::sleep(Duration::from_millis(100)).await;
    store
        .list_events(owner, run_id, 0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| serde_json::from_str(&e.json).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_runs_again_what_a_crashed_process_was_running() {
    let (app, owner, run_id) = run_left_by_a_crash(2).await;
    let events = restart_and_wait(&app, owner, run_id).await;
    assert_contiguous_and_terminated(&events);
    assert_eq!(events.last().unwrap().status(), Some("completed"));
    // The first attempt's event stays; the second attempt says what happened, then
    // starts over.
    assert_eq!(events[0].timestamp, "2026-01-01T00:00:00.000Z");
    let notice = &events[1];
    assert_eq!(notice.agent_name, "supervisor");
    assert!(
        notice.payload["reasoning"]
            .as_str()
            .unwrap()
            .contains("attempt 2 of 2"),
        "{notice:?}"
    );
    assert_eq!(events[2].payload["status"], "started");
    let stored = app
        .state
        .infra
        .store
        .get_run(owner, run_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, RunStatus::Completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_attempt_a_crashed_run_ends_interrupted_instead() {
    let (app, owner, run_id) = run_left_by_a_crash(1).await;
    let events = restart_and_wait(&app, owner, run_id).await;
    assert_contiguous_and_terminated(&events);
    assert_eq!(events.len(), 3, "the first event, an error, the terminal");
    assert_eq!(events[1].payload["error_code"], "INTERRUPTED");
    assert_eq!(events[2].status(), Some("interrupted"));
}
