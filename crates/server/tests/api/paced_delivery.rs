//! Paced delivery to the original web client (`docs/protocol.md` §9): a client that loses
//! every frame arriving soon after the previous one, as that client's queue does, still
//! sees each run whole; every other connection gets its frames as fast as they come.

use std::time::{Duration, Instant};

use apex_protocol::events::{PIPELINE, SUPERVISOR};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{spawn_app_with, TestApp, TestUser, WsClient};

/// Where the original web client is served from in these tests.
const FRONTEND: &str = "http://localhost:3000";
/// Another browser client of protocol v1, not the original one.
const OTHER_FRONTEND: &str = "http://localhost:5173";
/// The original client's queue loses a frame that arrives sooner than this after the
/// previous one.
const CLIENT_LOSES_WITHIN: Duration = Duration::from_millis(10);

/// A frame and when it arrived.
struct Arrival {
    at: Instant,
    frame: Value,
}

/// A socket opened as a browser page of `origin` opens it: a ticket, and `Origin`.
async fn browser_request(app: &TestApp, user: &TestUser, origin: &str) -> Request {
    let ticket = app.ticket(user, json!({"ttl_seconds": 300})).await;
    let url = format!(
        "{}?ticket={}",
        app.ws_address,
        ticket["ticket_id"].as_str().unwrap()
    );
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Origin", origin.parse().unwrap());
    request
}

/// Reads every frame, stamped on arrival, until `runs` terminal events have come.
async fn read_until_terminals(ws: &mut WsClient, runs: usize) -> Vec<Arrival> {
    let mut arrivals = vec![];
    let mut terminals = 0;
    while terminals < runs {
        let message = ws.next_message().await;
        let at = Instant::now();
        let Message::Text(text) = message else {
            panic!("expected a text frame, got {message:?}");
        };
        let frame: Value = serde_json::from_str(&text).expect("JSON frame");
        if frame["type"] == "agent_completed" && frame["agent_name"] == SUPERVISOR {
            terminals += 1;
        }
        arrivals.push(Arrival { at, frame });
    }
    arrivals
}

/// What the original client's queue keeps: a frame is lost when it arrives less than
/// [`CLIENT_LOSES_WITHIN`] after the one before it.
fn kept_by_the_original_client(arrivals: &[Arrival]) -> Vec<&Value> {
    let mut previous: Option<Instant> = None;
    let mut kept = vec![];
    for arrival in arrivals {
        if previous.is_none_or(|p| arrival.at.duration_since(p) >= CLIENT_LOSES_WITHIN) {
            kept.push(&arrival.frame);
        }
        previous = Some(arrival.at);
    }
    kept
}

/// Checks one run's frames as sent: each covers `first_seq..=seq` (just `seq` unless
/// coalesced), together every seq from 1 to the terminal exactly once and in order; only
/// answer chunks are ever coalesced, and the chunks make up the whole answer.
fn assert_whole_run(frames: &[&Value]) {
    let mut next = 1;
    let mut answer = String::new();
    for frame in frames {
        let seq = frame["seq"].as_u64().expect("seq");
        let first = frame.get("first_seq").map_or(seq, |f| f.as_u64().unwrap());
        assert_eq!(first, next, "no seq lost or repeated: {frame}");
        if first != seq {
            assert_eq!(frame["type"], "partial_result", "only chunks coalesce");
        }
        assert_eq!(
            frame["payload"]["message_id"],
            format!("{}-{seq}", frame["run_id"].as_str().unwrap())
        );
        if frame["type"] == "partial_result" {
            answer.push_str(frame["payload"]["content"].as_str().unwrap());
        }
        next = seq + 1;
    }
    let terminal = frames.last().expect("frames");
    assert_eq!(terminal["type"], "agent_completed");
    assert_eq!(terminal["agent_name"], SUPERVISOR);
    assert_eq!(terminal["status"], "completed");
    let report = frames
        .iter()
        .find(|f| f["type"] == "final_report")
        .expect("final_report");
    assert_eq!(report["payload"]["executive_summary"], answer.as_str());
    assert_eq!(terminal["final_response"], answer.as_str());
}

fn frames_of<'a>(frames: impl IntoIterator<Item = &'a Value>, run: &str) -> Vec<&'a Value> {
    frames
        .into_iter()
        .filter(|f| f["run_id"] == run && f.get("seq").is_some())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_clients_queue_sees_every_step_and_the_answer_of_every_run() {
    let app = spawn_app_with(|s| {
        s.cors_allowed_origins = vec![FRONTEND.to_string()];
        s.legacy_client.origins = vec![FRONTEND.to_string()];
        // Far wider than the default 15 ms: on a busy test machine the reader is sometimes
        // scheduled tens of milliseconds late, then reads two frames back to back although
        // they left far apart, and would lose the second (30 ms of such delay were seen on
        // a loaded 2-core machine). The default schedule itself is checked exactly, with
        // no clock, by the unit tests of `ws::pacing`.
        s.legacy_client.frame_gap = Duration::from_millis(100);
        s.legacy_client.final_gap = Duration::from_millis(150);
    })
    .await;
    let user = app.register().await;
    let request = browser_request(&app, &user, FRONTEND).await;
    // The reader has a thread and a runtime of its own, so frames are stamped as they
    // arrive, not when the server's tasks on the test runtime let it run.
    let reader = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let mut ws = WsClient::connect(request).await.expect("connect");
            // Two questions at once, each on a new thread: their frames interleave.
            for question in [
                "How can I reduce my LLM costs?",
                "Which models cost the most?",
            ] {
                ws.send_json(json!({"type": "start_agent", "payload": {"user_request": question}}))
                    .await;
            }
            read_until_terminals(&mut ws, 2).await
        })
    });
    let arrivals = tokio::task::spawn_blocking(move || reader.join().expect("reader"))
        .await
        .unwrap();
    assert_eq!(arrivals[0].frame["type"], "connection_established");
    let runs: Vec<String> = arrivals
        .iter()
        .filter(|a| a.frame["type"] == "run_accepted")
        .map(|a| a.frame["run_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(runs.len(), 2);

    let kept = kept_by_the_original_client(&arrivals);
    for run in &runs {
        let seen = frames_of(kept.iter().copied(), run);
        let has = |kind: &str, agent: &str| {
            seen.iter()
                .any(|f| f["type"] == kind && f["agent_name"] == agent)
        };
        assert!(
            has("agent_started", SUPERVISOR),
            "run {run}: supervisor start"
        );
        for agent in PIPELINE {
            assert!(has("agent_started", agent), "run {run}: {agent} started");
            assert!(
                has("agent_completed", agent),
                "run {run}: {agent} completed"
            );
        }
        assert!(has("final_report", SUPERVISOR), "run {run}: final_report");
        assert!(has("agent_completed", SUPERVISOR), "run {run}: terminal");
        // On the wire nothing was lost at all.
        assert_whole_run(&frames_of(arrivals.iter().map(|a| &a.frame), run));
    }

    // A resume on such a connection replays through the same schedule, by the same rules.
    let mut ws = WsClient::connect(browser_request(&app, &user, FRONTEND).await)
        .await
        .unwrap();
    assert_eq!(ws.next_json().await["type"], "connection_established");
    ws.send_json(json!({"type": "resume", "run_id": runs[0], "after_seq": 0}))
        .await;
    let replayed = read_until_terminals(&mut ws, 1).await;
    assert_whole_run(&frames_of(replayed.iter().map(|a| &a.frame), &runs[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_connections_are_not_paced() {
    let app = spawn_app_with(|s| {
        s.cors_allowed_origins = vec![FRONTEND.to_string(), OTHER_FRONTEND.to_string()];
        s.legacy_client.origins = vec![FRONTEND.to_string()];
        // So slow that a paced connection could not see two frames close together.
        s.legacy_client.frame_gap = Duration::from_millis(400);
    })
    .await;
    let user = app.register().await;
    // `apex chat` and other programs: a bearer token, no `Origin`.
    let program = app.ws_connect(&user).await;
    // Apex's own page: a ticket, its own origin.
    let own_page = app.address.clone();
    let mut page = WsClient::connect(browser_request(&app, &user, &own_page).await)
        .await
        .unwrap();
    // A protocol-v1 page served elsewhere.
    let mut elsewhere = WsClient::connect(browser_request(&app, &user, OTHER_FRONTEND).await)
        .await
        .unwrap();
    for ws in [&mut page, &mut elsewhere] {
        assert_eq!(ws.next_json().await["type"], "connection_established");
    }
    let readers: Vec<_> = [
        ("program", program),
        ("own page", page),
        ("elsewhere", elsewhere),
    ]
    .into_iter()
    .map(|(name, mut ws)| {
        tokio::spawn(async move { (name, read_until_terminals(&mut ws, 1).await) })
    })
    .collect();

    let thread: Value = app
        .post_json("/api/threads", Some(user.token()), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let started = app
        .post_json(
            &format!("/api/threads/{}/runs", thread["id"].as_str().unwrap()),
            Some(user.token()),
            &json!({"message": "How can I reduce my LLM costs?"}),
        )
        .await;
    assert_eq!(started.status(), 202);

    for reader in readers {
        let (name, arrivals) = reader.await.unwrap();
        let events: Vec<&Arrival> = arrivals
            .iter()
            .filter(|a| a.frame.get("seq").is_some())
            .collect();
        // Every event as emitted: none coalesced.
        for (i, arrival) in events.iter().enumerate() {
            assert_eq!(arrival.frame["seq"], i as u64 + 1, "{name}");
            assert!(arrival.frame.get("first_seq").is_none(), "{name}");
        }
        let close_together = events
            .windows(2)
            .filter(|pair| pair[1].at.duration_since(pair[0].at) < Duration::from_millis(400))
            .count();
        // Paced, none would be; unpaced, the fast agents' frames come in bursts.
        assert!(
            close_together >= events.len() / 4,
            "{name}: only {close_together} of {} events came within 400 ms of the one before",
            events.len()
        );
    }
}
