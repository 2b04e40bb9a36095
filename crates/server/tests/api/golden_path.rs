//! The golden path: ask over the WebSocket, watch every agent step, get an answer built
//! from the user's own numbers; runs survive closed sockets; resume and stop.

use std::time::Duration;

use apex_protocol::events::{AgentEvent, EventKind, PIPELINE, SUPERVISOR};
use serde_json::{json, Value};

use crate::helpers::{assert_contiguous_and_terminated, spawn_app, spawn_app_with, FRAME_TIMEOUT};

const QUESTION: &str = "How can I reduce my LLM costs?";

/// Checks the documented order: supervisor start; per agent start, thinking, tool pairs,
/// completion; final_report; terminal.
fn assert_pipeline_order(events: &[AgentEvent]) {
    let first = &events[0];
    assert_eq!(
        (first.kind, first.agent_name.as_str()),
        (EventKind::AgentStarted, SUPERVISOR)
    );
    let mut i = 1;
    for agent in PIPELINE {
        assert_eq!(
            events[i].kind,
            EventKind::AgentStarted,
            "{agent} starts at {i}"
        );
        assert_eq!(events[i].agent_name, agent);
        i += 1;
        let mut thinking = 0;
        let mut open_tool: Option<String> = None;
        while events[i].kind != EventKind::AgentCompleted {
            let e = &events[i];
            assert_eq!(e.agent_name, agent, "event {i} belongs to {agent}");
            match e.kind {
                EventKind::AgentThinking => thinking += 1,
                EventKind::ToolExecuting => {
                    assert!(open_tool.is_none(), "tool calls do not overlap");
                    open_tool = Some(e.payload["tool_call_id"].as_str().unwrap().to_string());
                }
                EventKind::ToolCompleted => {
                    let id = open_tool
                        .take()
                        .expect("tool_completed follows tool_executing");
                    assert_eq!(e.payload["tool_call_id"], id.as_str());
                    assert_eq!(e.payload["success"], true);
                }
                EventKind::PartialResult => assert_eq!(agent, "reporting"),
                other => panic!("unexpected {other:?} inside {agent}"),
            }
            i += 1;
        }
        assert!(thinking >= 1, "{agent} thinks at least once");
        assert!(open_tool.is_none());
        assert_eq!(events[i].agent_name, agent);
        assert_eq!(events[i].payload["status"], "completed");
        i += 1;
    }
    assert_eq!(events[i].kind, EventKind::FinalReport);
    assert!(events[i + 1].is_terminal());
    assert_eq!(i + 2, events.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_path_streams_every_step_and_answers_with_the_users_own_numbers() {
    let app = spawn_app().await;
    let user = app.register().await;
    let summary = app.usage_summary(&user).await;
    assert!(summary.total_requests > 100, "demo data was generated");

    let mut ws = app.ws_connect(&user).await;
    ws.send_json(json!({"type": "user_message", "text": QUESTION}))
        .await;
    let created = ws.next_json().await;
    assert_eq!(created["type"], "thread_created");
    let accepted = ws.next_json().await;
    assert_eq!(accepted["type"], "run_accepted");
    assert_eq!(accepted["thread_id"], created["thread_id"]);
    let run_id = accepted["run_id"].as_str().unwrap().to_string();
    let events = ws.collect_run(&run_id).await;

    assert_contiguous_and_terminated(&events);
    assert_pipeline_order(&events);
    for event in &events {
        assert_eq!(event.user_id, user.id);
        assert_eq!(event.thread_id, created["thread_id"].as_str().unwrap());
        assert!(event.payload["message_id"].is_string());
        assert!(chrono_like(&event.timestamp), "{}", event.timestamp);
    }
    let tools: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == EventKind::ToolExecuting)
        .map(|e| e.compat["tool_name"].as_str().unwrap())
        .collect();
    assert_eq!(
        tools,
        [
            "usage_summary",
            "pricing_lookup",
            "savings_simulator",
            "action_plan"
        ]
    );

    // Compatibility fields at top level.
    let thinking = events
        .iter()
        .find(|e| e.kind == EventKind::AgentThinking)
        .unwrap();
    assert!(thinking.compat["reasoning"].is_string());
    let tool_done = events
        .iter()
        .find(|e| e.kind == EventKind::ToolCompleted)
        .unwrap();
    assert!(tool_done.compat.contains_key("results") && tool_done.compat.contains_key("duration"));

    // The answer is about this user's numbers, exactly as the usage API reports them.
    let terminal = events.last().unwrap();
    assert_eq!(terminal.status(), Some("completed"));
    assert_eq!(terminal.compat["status"], "completed");
    let answer = terminal.compat["final_response"].as_str().unwrap();
    let report = &terminal.payload["result"];
    assert_eq!(
        report["usage"]["total_cost_usd"].as_f64().unwrap(),
        summary.total_cost_usd
    );
    assert_eq!(
        report["usage"]["total_requests"].as_i64().unwrap(),
        summary.total_requests
    );
    assert!(
        answer.contains(&format!("${:.2}", summary.total_cost_usd)),
        "{answer}"
    );
    assert!(answer.contains(&summary.by_model[0].model), "{answer}");
    assert!(!report["recommendations"].as_array().unwrap().is_empty());

    // The streamed text is the answer, and final_report carries it too.
    let streamed: String = events
        .iter()
        .filter(|e| e.kind == EventKind::PartialResult)
        .map(|e| e.payload["content"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, answer);
    let final_report = &events[events.len() - 2];
    assert_eq!(final_report.payload["executive_summary"], answer);
    assert!(events
        .iter()
        .filter(|e| e.kind == EventKind::PartialResult)
        .all(|e| e.payload["is_complete"] == false));
}

/// RFC 3339 in UTC with microseconds (protocol 5.1), so clients can measure sub-millisecond
/// delivery latency: `2025-11-26T09:14:03.533214Z`.
fn chrono_like(timestamp: &str) -> bool {
    let fraction = timestamp
        .strip_suffix('Z')
        .and_then(|t| t.rsplit_once('.'))
        .map(|(_, f)| f);
    timestamp.contains('T')
        && chrono::DateTime::parse_from_rfc3339(timestamp).is_ok()
        && fraction.is_some_and(|f| f.len() == 6 && f.bytes().all(|b| b.is_ascii_digit()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_thread_and_its_messages_are_stored_and_readable_over_rest() {
    let app = spawn_app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let first = ws.ask(QUESTION, None).await;
    let second = ws
        .ask(
            "Give me a usage breakdown for the last 7 days",
            Some(&first.thread_id),
        )
        .await;
    assert_eq!(
        second.thread_id, first.thread_id,
        "the second question continues the thread"
    );
    assert_eq!(second.terminal().status(), Some("completed"));

    let threads: Vec<Value> = app
        .get("/api/threads", user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(threads.len(), 1);
    assert_eq!(threads[0]["id"], first.thread_id.as_str());
    assert_eq!(threads[0]["message_count"], 4);

    let page: Value = app
        .get(
            &format!("/api/threads/{}/messages", first.thread_id),
            user.token(),
        )
        .await
        .json()
        .await
        .unwrap();
    let messages = page["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(messages[0]["content"], QUESTION);
    assert_eq!(
        messages[1]["content"],
        first.terminal().compat["final_response"]
    );
    assert!(messages[1]["created_at"].is_i64());

    let history = {
        ws.send_json(json!({"type": "get_thread_history", "thread_id": first.thread_id}))
            .await;
        ws.expect_type("thread_data").await
    };
    assert_eq!(history["messages"].as_array().unwrap().len(), 4);

    let run: Value = app
        .get(&format!("/api/runs/{}", first.run_id), user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "completed");
    assert_eq!(run["last_seq"].as_u64().unwrap(), first.events.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_continues_after_its_socket_closes_and_its_events_stay_readable() {
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(20)).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let accepted = ws.start_run(QUESTION).await;
    let run_id = accepted["run_id"].as_str().unwrap().to_string();
    ws.close().await;

    let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
    let run = loop {
        let run: Value = app
            .get(&format!("/api/runs/{run_id}"), user.token())
            .await
            .json()
            .await
            .unwrap();
        if run["status"] != "queued" && run["status"] != "running" {
            break run;
        }
        assert!(tokio::time::Instant::now() < deadline, "run did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        run["status"], "completed",
        "closing the socket does not stop the run"
    );

    let events = app.stored_events(&user, &run_id).await;
    assert_contiguous_and_terminated(&events);
    assert_pipeline_order(&events);

    let tail: Value = app
        .get(
            &format!("/api/runs/{run_id}/events?after_seq=10"),
            user.token(),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tail["events"][0]["seq"], 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_exactly_the_missing_events_then_continues_live() {
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(25)).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let run_id = ws.start_run_id(QUESTION).await;
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let frame = ws.next_json().await;
        if frame.get("seq").is_some() {
            seen.push(frame["seq"].as_u64().unwrap());
        }
    }
    ws.close().await;

    // A second connection resumes after the last seq the first one saw.
    let mut again = app.ws_connect(&user).await;
    again
        .send_json(json!({"type": "resume", "run_id": run_id, "after_seq": 5}))
        .await;
    // Live events can overtake the replay (they may reach the new socket before its
    // `resume` is read), so order may differ right at the resume point; what must hold is
    // that every event after `after_seq` arrives exactly once.
    let mut seqs = Vec::new();
    let mut terminal_seq = None;
    while terminal_seq.is_none_or(|last| (seqs.len() as u64) < last - 5) {
        let frame = again.next_json().await;
        if frame.get("seq").is_none() {
            continue;
        }
        let event: apex_protocol::events::AgentEvent = serde_json::from_value(frame).unwrap();
        assert_eq!(event.run_id, run_id);
        if event.is_terminal() {
            terminal_seq = Some(event.seq);
        }
        seqs.push(event.seq);
    }
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), seqs.len(), "no duplicate: {seqs:?}");
    let expected: Vec<u64> = (6..=terminal_seq.unwrap()).collect();
    assert_eq!(sorted, expected, "no gap: {seqs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_can_start_a_run_on_a_thread() {
    let app = spawn_app().await;
    let user = app.register().await;
    let thread: Value = app
        .post_json(
            "/api/threads",
            Some(user.token()),
            &json!({"title": "costs"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let thread_id = thread["id"].as_str().unwrap();
    let mut ws = app.ws_connect(&user).await;
    let response = app
        .post_json(
            &format!("/api/threads/{thread_id}/runs"),
            Some(user.token()),
            &json!({"message": QUESTION}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["thread_id"], thread_id);
    let run_id = accepted["run_id"].as_str().unwrap();
    // Events of a REST-started run reach the user's open sockets.
    let events = ws.collect_run(run_id).await;
    assert_contiguous_and_terminated(&events);
    assert_eq!(events.last().unwrap().status(), Some("completed"));

    let empty = app
        .post_json(
            &format!("/api/threads/{thread_id}/runs"),
            Some(user.token()),
            &json!({"message": "   "}),
        )
        .await;
    assert_eq!(empty.status(), 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_agent_cancels_the_run_with_a_terminal_cancelled_event() {
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(200)).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let run_id = ws.start_run_id(QUESTION).await;
    // Wait until the answer is streaming, then stop without naming the run.
    loop {
        let frame = ws.next_json().await;
        if frame["type"] == "partial_result" {
            break;
        }
    }
    ws.send_json(json!({"type": "stop_agent"})).await;
    let mut saw_ack = false;
    let mut saw_error = false;
    let terminal = loop {
        let frame = ws.next_json().await;
        match frame["type"].as_str().unwrap() {
            "stop_acknowledged" => saw_ack = true,
            "error" => saw_error = true,
            "agent_completed" if frame["agent_name"] == SUPERVISOR => break frame,
            _ => {}
        }
    };
    assert!(saw_ack && saw_error);
    assert_eq!(terminal["status"], "cancelled");
    assert_eq!(terminal["run_id"], run_id.as_str());

    let run: Value = app
        .get(&format!("/api/runs/{run_id}"), user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(run["status"], "cancelled");
    // Stopping again is a clear error, not a silent success.
    ws.send_json(json!({"type": "stop_agent", "run_id": run_id}))
        .await;
    let again = ws.expect_type("error_message").await;
    assert_eq!(again["error_code"], "RUN_NOT_ACTIVE");
    let rest = app
        .post_json(
            &format!("/api/runs/{run_id}/cancel"),
            Some(user.token()),
            &json!({}),
        )
        .await;
    assert_eq!(rest.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_writers_chunks_leave_together_and_the_stored_log_matches_the_wire() {
    // A millisecond between the template writer's chunks: they arrive far faster than one
    // event per 16 ms could carry them, and the answer takes long enough to need several.
    let app = spawn_app_with(|s| s.template_stream_delay = Duration::from_millis(1)).await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let run = ws.ask(QUESTION, None).await;
    assert_contiguous_and_terminated(&run.events);
    let partials: Vec<&AgentEvent> = run
        .events
        .iter()
        .filter(|e| e.kind == EventKind::PartialResult)
        .collect();
    let streamed: String = partials
        .iter()
        .map(|e| e.payload["content"].as_str().unwrap())
        .collect();
    let answer = run.terminal().compat["final_response"].as_str().unwrap();
    assert_eq!(streamed, answer, "the chunks are the answer, in order");
    // The writer's chunks are four words or a line each; together they leave as far fewer
    // events.
    let lines = answer.matches('\n').count();
    let words = answer.split([' ', '\n']).filter(|w| !w.is_empty()).count();
    let chunks = lines.max(words / 4);
    assert!(
        partials.len() * 2 < chunks,
        "{} partial_result events for about {chunks} chunks",
        partials.len()
    );
    assert!(
        partials.len() >= 3,
        "{} partial_result events",
        partials.len()
    );
    // The gap holds across the answer's passages (fixed text and slots), not only within
    // one: no event follows the one before it sooner than 16 ms, save the last (the answer
    // ends, nothing is held back). Timestamps are taken when an event is made, to the
    // microsecond; 15 ms allows for the wall clock's rounding against the monotonic one.
    let at = |e: &AgentEvent| {
        chrono::DateTime::parse_from_rfc3339(&e.timestamp)
            .unwrap()
            .timestamp_micros()
    };
    for pair in partials[..partials.len() - 1].windows(2) {
        let gap_us = at(pair[1]) - at(pair[0]);
        assert!(
            gap_us >= 15_000,
            "partial_result {} left {gap_us} µs after {}",
            pair[1].seq,
            pair[0].seq
        );
    }
    // The stored log holds exactly the events the socket carried.
    let stored = app.stored_events(&user, &run.run_id).await;
    assert_eq!(stored.len(), run.events.len());
    for (s, w) in stored.iter().zip(&run.events) {
        assert_eq!((s.seq, s.kind, &s.payload), (w.seq, w.kind, &w.payload));
    }
}
