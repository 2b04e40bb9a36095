//! Approval of the action plan: a run asked to wait (`require_approval`, or the user's
//! setting) parks after the actions agent with `approval_required`, holds no execution
//! slot, and continues when its user approves, edits or rejects the plan (socket frame
//! `approval` or `POST /api/runs/{id}/approval`), without running anything before the
//! pause again; unanswered, it expires `timed_out`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use apex_protocol::events::{AgentEvent, EventKind};
use apex_server::settings::{LlmProviderKind, OpenAiSettings, Secret};
use serde_json::{json, Value};

use crate::helpers::{
    assert_contiguous_and_terminated, spawn_app, spawn_app_with, TestApp, TestUser, WsClient,
};

const QUESTION: &str = "How can I reduce my LLM costs?";

/// Starts a run that asks for approval; returns (run id, thread id).
async fn start_with_approval(ws: &mut WsClient, thread: Option<&str>) -> (String, String) {
    let mut frame = json!({"type": "user_message", "text": QUESTION, "require_approval": true});
    if let Some(thread) = thread {
        frame["thread_id"] = json!(thread);
    }
    ws.send_json(frame).await;
    let accepted = ws.expect_type("run_accepted").await;
    (
        accepted["run_id"].as_str().unwrap().to_string(),
        accepted["thread_id"].as_str().unwrap().to_string(),
    )
}

/// The run's events up to and including `approval_required`.
async fn until_approval_required(ws: &mut WsClient, run: &str) -> Vec<AgentEvent> {
    let mut events = Vec::new();
    loop {
        let frame = ws.next_json().await;
        if frame.get("seq").is_none() {
            continue;
        }
        let event: AgentEvent = serde_json::from_value(frame).unwrap();
        assert_eq!(event.run_id, run, "event of another run");
        assert!(
            !event.is_terminal(),
            "the run ended before asking: {event:?}"
        );
        let asked = event.kind == EventKind::ApprovalRequired;
        events.push(event);
        if asked {
            return events;
        }
    }
}

/// The agents that started in `events`, in order.
fn agents_started(events: &[AgentEvent]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == EventKind::AgentStarted)
        .map(|e| e.agent_name.clone())
        .collect()
}

async fn answer_over_rest(app: &TestApp, user: &TestUser, run: &str, body: Value) -> (u16, Value) {
    let response = app
        .post_json(
            &format!("/api/runs/{run}/approval"),
            Some(user.token()),
            &body,
        )
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn run_view(app: &TestApp, user: &TestUser, run: &str) -> Value {
    let response = app.get(&format!("/api/runs/{run}"), user.token()).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn an_approved_plan_continues_with_the_report_and_runs_nothing_before_the_pause_again() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (run, _) = start_with_approval(&mut ws, None).await;
    let before = until_approval_required(&mut ws, &run).await;

    assert_eq!(
        agents_started(&before),
        ["supervisor", "triage", "data", "optimization", "actions"],
        "parks right after the actions agent"
    );
    let asked = before.last().unwrap();
    let approval_id = asked.payload["approval_id"].as_str().unwrap().to_string();
    let plan = asked.payload["plan"].as_array().unwrap();
    assert!(
        plan.iter()
            .any(|s| s["expected_monthly_savings_usd"].as_f64().unwrap() > 0.0),
        "each step carries its savings: {plan:?}"
    );
    assert!(asked.payload["total_monthly_savings_usd"].as_f64().unwrap() > 0.0);

    // Parked and stored: the REST view shows the same request.
    let view = run_view(&app, &user, &run).await;
    assert_eq!(view["status"], "awaiting_approval", "{view}");
    assert_eq!(view["approval"]["approval_id"], approval_id.as_str());
    assert_eq!(view["approval"]["plan"], asked.payload["plan"]);

    ws.send_json(json!({"type": "approval", "run_id": run, "approval_id": approval_id, "decision": "approve"}))
        .await;
    let accepted = ws.expect_type("approval_accepted").await;
    assert_eq!(accepted["decision"], "approve");
    assert_eq!(accepted["run_id"], run.as_str());
    let after = ws.collect_run(&run).await;

    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_contiguous_and_terminated(&all);
    assert_eq!(
        agents_started(&after),
        ["reporting"],
        "only the agent after the pause runs"
    );
    let terminal = after.last().unwrap();
    assert_eq!(terminal.payload["status"], "completed");
    let report = &terminal.payload["result"];
    assert_eq!(report["approval"]["decision"], "approve");
    assert_eq!(report["action_plan"], asked.payload["plan"]);
    assert!(!terminal.payload["final_response"]
        .as_str()
        .unwrap()
        .is_empty());

    // The same answer again is accepted and changes nothing; another one is refused.
    let (status, again) = answer_over_rest(
        &app,
        &user,
        &run,
        json!({"approval_id": approval_id, "decision": "approve"}),
    )
    .await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["status"], "completed");
    let (status, other) = answer_over_rest(
        &app,
        &user,
        &run,
        json!({"approval_id": approval_id, "decision": "reject"}),
    )
    .await;
    assert_eq!(status, 409, "{other}");
    assert_eq!(other["error"]["code"], "approval_already_decided");
    let events = app
        .get(&format!("/api/runs/{run}/events"), user.token())
        .await
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(
        events["events"].as_array().unwrap().len(),
        all.len(),
        "no event after the terminal one"
    );
}

#[tokio::test]
async fn an_edited_plan_carries_out_only_the_chosen_steps_in_the_chosen_order() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (run, _) = start_with_approval(&mut ws, None).await;
    let asked = until_approval_required(&mut ws, &run).await.pop().unwrap();
    let approval_id = asked.payload["approval_id"].as_str().unwrap();
    let plan = asked.payload["plan"].as_array().unwrap().clone();
    assert!(plan.len() >= 2, "a plan to edit: {plan:?}");
    let last = plan.last().unwrap();
    let first = &plan[0];

    // Steps that were not proposed, repeated, renamed, or none at all: refused, nothing
    // recorded.
    for bad in [
        json!([99]),
        json!([1, 1]),
        json!([]),
        json!([{"order": 1, "title": "Cancel every subscription"}]),
    ] {
        let (status, body) = answer_over_rest(
            &app,
            &user,
            &run,
            json!({"approval_id": approval_id, "decision": "edit", "plan": bad}),
        )
        .await;
        assert_eq!(status, 422, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "validation_failed");
    }
    assert_eq!(
        run_view(&app, &user, &run).await["status"],
        "awaiting_approval"
    );

    let (status, body) = answer_over_rest(
        &app,
        &user,
        &run,
        json!({"approval_id": approval_id, "decision": "edit",
               "plan": [last["order"], {"order": first["order"], "title": first["title"]}]}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["decision"], "edit");
    let after = ws.collect_run(&run).await;
    let terminal = after.last().unwrap();
    assert_eq!(terminal.payload["status"], "completed");
    let carried_out = terminal.payload["result"]["action_plan"]
        .as_array()
        .unwrap();
    let titles: Vec<&str> = carried_out
        .iter()
        .map(|s| s["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        titles,
        [
            last["title"].as_str().unwrap(),
            first["title"].as_str().unwrap()
        ]
    );
    assert_eq!(carried_out[0]["order"], 1, "renumbered");
    let dropped = &terminal.payload["result"]["approval"]["not_carried_out"];
    assert_eq!(
        dropped.as_array().unwrap().len(),
        plan.len() - 2,
        "{dropped}"
    );
}

#[tokio::test]
async fn a_rejected_plan_ends_completed_saying_what_was_not_done_without_the_report_agent() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (run, thread) = start_with_approval(&mut ws, None).await;
    let asked = until_approval_required(&mut ws, &run).await.pop().unwrap();
    let approval_id = asked.payload["approval_id"].as_str().unwrap();
    let first_title = asked.payload["plan"][0]["title"].as_str().unwrap();

    ws.send_json(json!({"type": "approval",
                        "payload": {"run_id": run, "approval_id": approval_id, "decision": "reject"}}))
        .await;
    ws.expect_type("approval_accepted").await;
    let after = ws.collect_run(&run).await;
    assert!(
        agents_started(&after).is_empty(),
        "no agent runs: {after:?}"
    );
    let terminal = after.last().unwrap();
    assert_eq!(terminal.payload["status"], "completed");
    let answer = terminal.payload["final_response"].as_str().unwrap();
    assert!(answer.contains("rejected"), "{answer}");
    assert!(
        answer.contains(first_title),
        "names what is not done: {answer}"
    );
    assert_eq!(terminal.payload["result"]["action_plan"], json!([]));

    // The answer is the thread's, like any other.
    let messages: Value = app
        .get(&format!("/api/threads/{thread}/messages"), user.token())
        .await
        .json()
        .await
        .unwrap();
    let last = messages["messages"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["role"], "assistant");
    assert_eq!(last["content"], answer);
}

#[tokio::test]
async fn another_users_run_and_a_wrong_approval_id_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let owner = app.register().await;
    let stranger = app.register().await;
    let mut ws = app.ws_connect(&owner).await;
    let (run, _) = start_with_approval(&mut ws, None).await;
    let asked = until_approval_required(&mut ws, &run).await.pop().unwrap();
    let approval_id = asked.payload["approval_id"].as_str().unwrap();

    let (status, body) = answer_over_rest(
        &app,
        &stranger,
        &run,
        json!({"approval_id": approval_id, "decision": "approve"}),
    )
    .await;
    assert_eq!(status, 404, "a stranger's run is a missing one: {body}");
    let mut stranger_ws = app.ws_connect(&stranger).await;
    stranger_ws
        .send_json(json!({"type": "approval", "run_id": run, "approval_id": approval_id, "decision": "approve"}))
        .await;
    let refused = stranger_ws.expect_type("error_message").await;
    assert_eq!(refused["error_code"], "RUN_NOT_FOUND");

    let (status, body) = answer_over_rest(
        &app,
        &owner,
        &run,
        json!({"approval_id": "appr_not_this_one", "decision": "approve"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "approval_not_pending");
    let (status, body) = answer_over_rest(
        &app,
        &owner,
        &run,
        json!({"approval_id": approval_id, "decision": "maybe"}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        run_view(&app, &owner, &run).await["status"],
        "awaiting_approval"
    );

    // A run that never asked has nothing to answer.
    let plain = ws.ask(QUESTION, None).await;
    let (status, body) = answer_over_rest(
        &app,
        &owner,
        &plain.run_id,
        json!({"approval_id": approval_id, "decision": "approve"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "approval_not_pending");
}

#[tokio::test]
async fn a_parked_run_holds_no_slot_and_can_be_stopped() {
    let app = spawn_app_with(|s| s.max_runs_per_instance = 1).await;
    let user = app.register().await;
    let other = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (run, thread) = start_with_approval(&mut ws, None).await;
    until_approval_required(&mut ws, &run).await;

    // The only slot is free: another user's run completes while this one waits.
    let mut other_ws = app.ws_connect(&other).await;
    let done = other_ws.ask(QUESTION, None).await;
    assert_eq!(done.terminal().payload["status"], "completed");

    // A message to the thread queues behind the parked run (enqueue)...
    ws.send_json(json!({"type": "user_message", "text": "And my latency?", "thread_id": thread}))
        .await;
    let queued = ws.expect_type("run_accepted").await;
    let next_run = queued["run_id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(run_view(&app, &user, &next_run).await["status"], "queued");

    // ...and stopping the parked run ends it `cancelled`, which lets the next one start.
    ws.send_json(json!({"type": "stop_agent", "run_id": run}))
        .await;
    let rest = ws.collect_run(&run).await;
    assert_eq!(rest.last().unwrap().payload["status"], "cancelled");
    let next = ws.collect_run(&next_run).await;
    assert_eq!(next.last().unwrap().payload["status"], "completed");
}

#[tokio::test]
async fn a_message_that_interrupts_a_parked_run_ends_it_interrupted() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (run, thread) = start_with_approval(&mut ws, None).await;
    until_approval_required(&mut ws, &run).await;
    ws.send_json(
        json!({"type": "user_message", "text": "Never mind", "thread_id": thread,
                        "multitask_strategy": "interrupt"}),
    )
    .await;
    let accepted = ws.expect_type("run_accepted").await;
    let next_run = accepted["run_id"].as_str().unwrap().to_string();
    let rest = ws.collect_run(&run).await;
    assert_eq!(rest.last().unwrap().payload["status"], "interrupted");
    let next = ws.collect_run(&next_run).await;
    assert_eq!(next.last().unwrap().payload["status"], "completed");
}

#[tokio::test]
async fn an_unanswered_request_expires_and_the_run_ends_timed_out() {
    let app = spawn_app_with(|s| s.approval_timeout = Duration::from_millis(1500)).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (run, _) = start_with_approval(&mut ws, None).await;
    let asked = until_approval_required(&mut ws, &run).await.pop().unwrap();
    let approval_id = asked.payload["approval_id"].as_str().unwrap();
    let rest = ws.collect_run(&run).await;
    let terminal = rest.last().unwrap();
    assert_eq!(terminal.payload["status"], "timed_out");
    assert!(
        terminal.payload["error"]
            .as_str()
            .unwrap()
            .contains("approval"),
        "{terminal:?}"
    );
    let (status, body) = answer_over_rest(
        &app,
        &user,
        &run,
        json!({"approval_id": approval_id, "decision": "approve"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "approval_expired");
    let view = run_view(&app, &user, &run).await;
    assert_eq!(view["status"], "timed_out");
    assert!(
        view.get("approval").is_none(),
        "nothing is pending any more: {view}"
    );
}

#[tokio::test]
async fn the_users_setting_asks_for_approval_when_a_message_does_not_say() {
    let app = spawn_app().await;
    let user = app.register().await;
    let settings: Value = app
        .get("/api/settings", user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(settings, json!({"require_approval": false}));
    let response = app
        .http
        .put(app.url("/api/settings"))
        .bearer_auth(user.token())
        .json(&json!({"require_approval": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Over REST, with no flag: it parks.
    let thread: Value = app
        .post_json("/api/threads", Some(user.token()), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let thread = thread["id"].as_str().unwrap();
    let accepted: Value = app
        .post_json(
            &format!("/api/threads/{thread}/runs"),
            Some(user.token()),
            &json!({"message": QUESTION}),
        )
        .await
        .json()
        .await
        .unwrap();
    let run = accepted["run_id"].as_str().unwrap();
    let mut parked = false;
    for _ in 0..100 {
        if run_view(&app, &user, run).await["status"] == "awaiting_approval" {
            parked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(parked, "the setting made the run wait for approval");

    // A message that says no does not wait; neither does another user's. (The parked run's
    // `approval_required` may still be on its way to this user's connections: it is
    // published just before the run is marked parked.)
    let mut ws = app.ws_connect(&user).await;
    ws.send_json(json!({"type": "user_message", "text": QUESTION, "require_approval": false}))
        .await;
    let accepted = ws.expect_type("run_accepted").await;
    let events = ws
        .collect_run_besides(accepted["run_id"].as_str().unwrap(), &[run])
        .await;
    assert!(events.iter().all(|e| e.kind != EventKind::ApprovalRequired));
    assert_eq!(events.last().unwrap().payload["status"], "completed");
    let other = app.register().await;
    let mut other_ws = app.ws_connect(&other).await;
    let plain = other_ws.ask(QUESTION, None).await;
    assert_eq!(plain.terminal().payload["status"], "completed");

    // A flag that is not a boolean is refused.
    ws.send_json(json!({"type": "user_message", "text": QUESTION, "require_approval": "yes"}))
        .await;
    let refused = ws.expect_type("error_message").await;
    assert_eq!(refused["error_code"], "VALIDATION_ERROR");
}

// ---- LLM requests are never repeated ----

/// A streamed answer from an OpenAI-compatible server.
const STREAM: &str = concat!(
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Route the short requests to a smaller model.\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
);

/// An OpenAI-compatible server that counts the requests it gets.
async fn counting_llm() -> (String, Arc<AtomicUsize>) {
    use axum::response::IntoResponse;
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let counter = Arc::clone(&counter);
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                if body["stream"] == true {
                    ([("content-type", "text/event-stream")], STREAM).into_response()
                } else {
                    axum::Json(json!({
                        "id": "c", "object": "chat.completion", "created": 1, "model": "m",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "{}"}}]
                    }))
                    .into_response()
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}/v1"), hits)
}

#[tokio::test]
async fn a_run_that_waited_for_approval_makes_exactly_the_llm_requests_of_one_that_did_not() {
    let (url, hits) = counting_llm().await;
    let app = spawn_app_with(move |s| {
        s.llm_provider = LlmProviderKind::OpenAi;
        s.openai = OpenAiSettings {
            base_url: url,
            model: "m".into(),
            api_key: Some(Secret::new("sk-test")),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_retries: 0,
            retry_backoff: Duration::from_millis(10),
            structured_output: true,
        };
    })
    .await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;

    let plain = ws.ask(QUESTION, None).await;
    assert_eq!(plain.terminal().payload["status"], "completed");
    let per_run = hits.swap(0, Ordering::SeqCst);
    assert!(per_run > 0, "the pipeline asks the model");

    let (run, _) = start_with_approval(&mut ws, None).await;
    let asked = until_approval_required(&mut ws, &run).await.pop().unwrap();
    let before_pause = hits.load(Ordering::SeqCst);
    assert!(
        before_pause < per_run,
        "the report is written after the pause"
    );
    ws.send_json(json!({"type": "approval", "run_id": run,
                        "approval_id": asked.payload["approval_id"], "decision": "approve"}))
        .await;
    let after = ws.collect_run(&run).await;
    assert_eq!(after.last().unwrap().payload["status"], "completed");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        per_run,
        "no LLM request before the pause was made again"
    );
}

/// Waits until the run's stored status reads `awaiting_approval`.
async fn wait_until_parked(app: &TestApp, user: &TestUser, run: &str) {
    for _ in 0..250 {
        if run_view(app, user, run).await["status"] == "awaiting_approval" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("run {run} was never parked");
}

#[tokio::test]
async fn a_run_recovered_after_its_process_died_while_parking_asks_again_from_its_checkpoint() {
    use apex_protocol::threads::RunStatus;
    use apex_server::ids::{RunId, UserId};
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (run, _) = start_with_approval(&mut ws, None).await;
    let before = until_approval_required(&mut ws, &run).await;
    let approval_id = before.last().unwrap().payload["approval_id"].clone();
    // The request reaches the client before the run is parked; rewriting the row before
    // the park lands would let the park overwrite it, so wait for the park first.
    wait_until_parked(&app, &user, &run).await;

    // The row as a process leaves it when it dies after recording the request and before
    // parking the run: still `running`, the checkpoint stored, no answer. A restart
    // recovers it like any run of a dead process.
    let store = &app.state.infra.store;
    let (owner, run_id) = (
        UserId::parse(&user.id).unwrap(),
        RunId::parse(&run).unwrap(),
    );
    store
        .set_run_status(owner, run_id, RunStatus::Running, None, 0)
        .await
        .unwrap();
    let (requeued, interrupted) = app.state.runs.recover_after_restart().await.unwrap();
    assert_eq!((requeued, interrupted), (1, 0));

    // Claimed again, it asks again (same request) without running any agent.
    let again = until_approval_required(&mut ws, &run).await;
    assert_eq!(again.len(), 1, "nothing but the request again: {again:?}");
    assert_eq!(again[0].payload["approval_id"], approval_id);
    assert_eq!(again[0].seq, before.len() as u64 + 1);
    wait_until_parked(&app, &user, &run).await;

    ws.send_json(json!({"type": "approval", "run_id": run, "approval_id": approval_id, "decision": "approve"}))
        .await;
    let after = ws.collect_run(&run).await;
    let mut all = before;
    all.extend(again);
    all.extend(after.iter().cloned());
    assert_contiguous_and_terminated(&all);
    assert_eq!(agents_started(&after), ["reporting"]);
    assert_eq!(after.last().unwrap().payload["status"], "completed");
}
