//! One simulated user: registration, connections, runs, chaos (disconnect and resume,
//! stops, foreign ids, regenerating answers), and every check.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{LoadConfig, SharedRunIds};

/// Longest wait for any one expected frame before the user counts an error.
const FRAME_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connections may take to receive the terminal events they are owed at the end.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
const PASSWORD: &str = "load generator password";

type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

/// A registered user and the numbers their answers must contain.
pub(crate) struct Account {
    index: usize,
    user_id: String,
    pub(crate) token: String,
    /// WebSocket URLs of every instance; connection n goes to `ws_urls[n % len]`.
    pub(crate) ws_urls: Vec<String>,
    /// `total_cost_usd` of the user's own 30-day summary.
    summary_total: f64,
}

impl Account {
    pub(crate) async fn register(
        http: &reqwest::Client,
        config: &LoadConfig,
        index: usize,
    ) -> anyhow::Result<Account> {
        let base = config.base_url.trim_end_matches('/');
        let email = format!(
            "loadgen-{}-{index}-{}@example.com",
            config.seed,
            uuid::Uuid::new_v4().simple()
        );
        let response = http
            .post(format!("{base}/auth/register"))
            .json(&json!({"email": email, "password": PASSWORD, "name": format!("load user {index}")}))
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            bail!(
                "register answered 429: the server throttles accounts per address; start it \
                 with --registrations-per-minute 0 (and --registrations-per-minute-total 0) \
                 for load tests"
            );
        }
        if !response.status().is_success() {
            bail!("register answered {}", response.status());
        }
        let pair: Value = response.json().await?;
        let token = pair["access_token"]
            .as_str()
            .context("access_token")?
            .to_string();
        let user_id = pair["user"]["id"].as_str().context("user.id")?.to_string();
        let summary: Value = http
            .get(format!("{base}/api/usage/summary?days=30"))
            .bearer_auth(&token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(Account {
            index,
            user_id,
            token,
            ws_urls: std::iter::once(base)
                .chain(config.also_servers.iter().map(|s| s.trim_end_matches('/')))
                .map(|b| format!("{}/ws", b.replacen("http", "ws", 1)))
                .collect(),
            summary_total: summary["total_cost_usd"]
                .as_f64()
                .context("total_cost_usd")?,
        })
    }
}

/// What one user saw.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub connections: usize,
    pub runs_started: usize,
    pub runs_regenerated: usize,
    pub runs_double_texted: usize,
    /// Runs that asked for approval of their plan, answered while they waited.
    pub runs_approved: usize,
    pub runs_completed: usize,
    pub runs_cancelled: usize,
    pub runs_other: usize,
    pub cross_user_frames: usize,
    pub lost_events: usize,
    pub duplicate_events: usize,
    pub wrong_numbers: usize,
    pub probe_failures: usize,
    pub probes: usize,
    pub errors: usize,
    pub events_received: usize,
    pub event_latency_ms: Vec<f64>,
    pub time_to_first_event_ms: Vec<f64>,
    pub run_duration_ms: Vec<f64>,
    pub violations: Vec<String>,
}

struct Frame {
    conn: usize,
    value: Value,
    received: chrono::DateTime<chrono::Utc>,
}

/// The `type` of the frame a connection's reader hands the session when its stream ends
/// (never a server frame type).
const READER_ENDED: &str = "loadgen.reader_ended";

fn is_event(v: &Value) -> bool {
    v.get("seq").is_some() && v.get("run_id").is_some()
}

fn is_terminal(v: &Value) -> bool {
    v["type"] == "agent_completed" && v["agent_name"] == "supervisor"
}

struct Session<'a> {
    account: &'a Account,
    config: &'a LoadConfig,
    rng: StdRng,
    tx: mpsc::UnboundedSender<Frame>,
    rx: mpsc::UnboundedReceiver<Frame>,
    sinks: HashMap<usize, Sink>,
    next_conn: usize,
    /// (connection, run) → every seq received on that connection. A live event may reach a
    /// freshly opened connection before its `resume` replay does (docs/protocol.md, 5.6),
    /// so a seq below one already received is not a duplicate; a seq received twice is.
    seen: HashMap<(usize, String), HashSet<u64>>,
    terminals: HashSet<(usize, String)>,
    /// Connections whose stream ended though this session did not close them, and how.
    ended: HashMap<usize, String>,
    /// Each connection's id as the server named it (its log lines carry it).
    server_ids: HashMap<usize, String>,
    /// (run, thread) of every event received, checked against the user's own at the end.
    event_ids: Vec<(String, String)>,
    my_runs: HashSet<String>,
    my_threads: HashSet<String>,
    out: Outcome,
}

impl Session<'_> {
    fn violation(&mut self, text: String) {
        if self.out.violations.len() < 50 {
            self.out
                .violations
                .push(format!("user {}: {text}", self.account.index));
        }
    }

    async fn connect(&mut self) -> anyhow::Result<usize> {
        let url = &self.account.ws_urls[self.next_conn % self.account.ws_urls.len()];
        let mut request = url.as_str().into_client_request()?;
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", self.account.token).parse()?,
        );
        // Nagle off (`true`): requests are small frames that must leave at once.
        let (socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true).await?;
        let (sink, mut stream) = socket.split();
        let conn = self.next_conn;
        self.next_conn += 1;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let ended = loop {
                let message = match stream.next().await {
                    None => break "the stream ended without a close frame".to_string(),
                    Some(Err(err)) => break format!("read failed: {err}"),
                    Some(Ok(Message::Close(frame))) => {
                        break format!("the server closed it: {frame:?}")
                    }
                    Some(Ok(message)) => message,
                };
                if let Message::Text(text) = message {
                    let Ok(value) = serde_json::from_str::<Value>(&text) else {
                        continue;
                    };
                    let frame = Frame {
                        conn,
                        value,
                        received: chrono::Utc::now(),
                    };
                    if tx.send(frame).is_err() {
                        return;
                    }
                }
            };
            // Told to the session (not an event, so no check counts it): when a connection
            // owes a terminal event, whether and how its stream ended says where to look.
            let _ = tx.send(Frame {
                conn,
                value: json!({"type": READER_ENDED, "reason": ended}),
                received: chrono::Utc::now(),
            });
        });
        self.sinks.insert(conn, sink);
        self.out.connections += 1;
        let Some(hello) = self
            .wait_for(conn, |v| v["type"] == "connection_established")
            .await
        else {
            bail!("no connection_established");
        };
        if let Some(id) = hello["data"]["connection_id"].as_str() {
            self.server_ids.insert(conn, id.to_string());
        }
        Ok(conn)
    }

    async fn send(&mut self, conn: usize, frame: Value) {
        let sent = match self.sinks.get_mut(&conn) {
            Some(sink) => sink
                .send(Message::Text(frame.to_string().into()))
                .await
                .is_ok(),
            None => false,
        };
        if !sent {
            self.out.errors += 1;
            self.violation(format!("could not send on connection {conn}"));
        }
    }

    async fn disconnect(&mut self, conn: usize) {
        if let Some(mut sink) = self.sinks.remove(&conn) {
            let _ = sink.close().await;
        }
    }

    /// Checks one received frame against the user's identity and per-run ordering.
    fn observe(&mut self, frame: &Frame) {
        let v = &frame.value;
        if v["type"] == READER_ENDED {
            let reason = v["reason"].as_str().unwrap_or_default().to_string();
            self.ended.insert(frame.conn, reason);
            return;
        }
        if !is_event(v) {
            return;
        }
        self.out.events_received += 1;
        if v["user_id"] != self.account.user_id.as_str() {
            self.out.cross_user_frames += 1;
            self.violation(format!("frame of another user: {v}"));
            return;
        }
        let run = v["run_id"].as_str().unwrap_or_default().to_string();
        let thread = v["thread_id"].as_str().unwrap_or_default().to_string();
        let seq = v["seq"].as_u64().unwrap_or(0);
        // Exactly once per connection. Not "in order": right at a resume point a live event
        // may overtake the replay (docs/protocol.md, 5.6); the per-run follower checks that
        // nothing is missing.
        if !self
            .seen
            .entry((frame.conn, run.clone()))
            .or_default()
            .insert(seq)
        {
            self.out.duplicate_events += 1;
        }
        if let Some(sent) = v["timestamp"]
            .as_str()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        {
            let ms = (frame.received - sent.with_timezone(&chrono::Utc)).num_microseconds();
            self.out
                .event_latency_ms
                .push(ms.unwrap_or(0) as f64 / 1000.0);
        }
        if is_terminal(v) {
            self.terminals.insert((frame.conn, run.clone()));
        }
        self.event_ids.push((run, thread));
    }

    async fn next_frame(&mut self) -> Option<Frame> {
        match tokio::time::timeout(FRAME_TIMEOUT, self.rx.recv()).await {
            Ok(Some(frame)) => {
                self.observe(&frame);
                Some(frame)
            }
            _ => {
                self.out.errors += 1;
                self.violation("timed out waiting for a frame".into());
                None
            }
        }
    }

    /// Reads (and checks) frames until one on `conn` matches.
    async fn wait_for(&mut self, conn: usize, matches: impl Fn(&Value) -> bool) -> Option<Value> {
        loop {
            let frame = self.next_frame().await?;
            if frame.conn == conn && matches(&frame.value) {
                return Some(frame.value);
            }
        }
    }

    fn pick_connection(&mut self) -> usize {
        let open: Vec<usize> = self.sinks.keys().copied().collect();
        open[self.rng.gen_range(0..open.len())]
    }

    /// Another user's real run id must be unknown to us: `resume` and `stop_agent` fail.
    async fn probe_foreign_run(&mut self, conn: usize, shared: &SharedRunIds) {
        let Some(foreign) = shared.foreign(self.account.index) else {
            return;
        };
        for frame in [
            json!({"type": "resume", "run_id": foreign, "after_seq": 0}),
            json!({"type": "stop_agent", "run_id": foreign}),
        ] {
            self.out.probes += 1;
            self.send(conn, frame.clone()).await;
            let reply = self.wait_for(conn, |v| v["type"] == "error_message").await;
            if reply.as_ref().map(|r| r["error_code"].clone()) != Some(json!("RUN_NOT_FOUND")) {
                self.out.probe_failures += 1;
                self.violation(format!("foreign run probe {frame} answered {reply:?}"));
            }
        }
    }

    /// A thread id the user invented (and others may invent too) names nothing.
    async fn probe_invented_thread(&mut self, conn: usize, run_index: usize) {
        self.out.probes += 1;
        let frame = json!({"type": "user_message", "text": "hello", "thread_id": format!("shared-thread-{run_index}")});
        self.send(conn, frame).await;
        let reply = self.wait_for(conn, |v| v["type"] == "error_message").await;
        if reply.as_ref().map(|r| r["error_code"].clone()) != Some(json!("THREAD_NOT_FOUND")) {
            self.out.probe_failures += 1;
            self.violation(format!("invented thread answered {reply:?}"));
        }
    }

    async fn one_run(&mut self, run_index: usize, shared: &SharedRunIds) {
        let conn = self.pick_connection();
        let chaos = self.config.chaos;
        if chaos && self.rng.gen_bool(0.2) {
            self.probe_invented_thread(conn, run_index).await;
        }
        let sent_at = Instant::now();
        self.send(
            conn,
            json!({"type": "user_message", "text": self.config.question}),
        )
        .await;
        let Some(accepted) = self
            .wait_for(conn, |v| {
                v["type"] == "run_accepted" || v["type"] == "error_message"
            })
            .await
        else {
            return;
        };
        if accepted["type"] == "error_message" {
            self.out.errors += 1;
            self.violation(format!("message refused: {accepted}"));
            return;
        }
        let run_id = accepted["run_id"].as_str().unwrap_or_default().to_string();
        self.my_runs.insert(run_id.clone());
        self.my_threads.insert(
            accepted["thread_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        shared.add(self.account.index, run_id.clone());
        self.out.runs_started += 1;

        // 0: follow the run; 1: drop the connection and resume elsewhere; 2: stop it.
        let action = if !chaos {
            0
        } else {
            match self.rng.gen_range(0..100) {
                0..=19 => 1,
                20..=34 => 2,
                _ => 0,
            }
        };
        let action_at = self.rng.gen_range(2..20);
        let mut followed = conn;
        // Seqs of this run received on the followed connection(s), and the highest seq up
        // to which nothing is missing. Live events may overtake a resume replay, so the
        // check is "every seq exactly once", not "in order".
        let mut got = std::collections::BTreeSet::new();
        let mut last = 0u64;
        let mut terminal: Option<Value> = None;
        let mut acted = false;
        let mut stop_sent = false;
        loop {
            if let Some(end) = terminal.as_ref().and_then(|t| t["seq"].as_u64()) {
                if last >= end {
                    break;
                }
            }
            let Some(frame) = self.next_frame().await else {
                let missing = terminal
                    .as_ref()
                    .and_then(|t| t["seq"].as_u64())
                    .map_or(1, |end| end.saturating_sub(got.len() as u64));
                self.out.lost_events += missing as usize;
                self.violation(format!("run {run_id}: {missing} event(s) never arrived"));
                return;
            };
            let v = &frame.value;
            if frame.conn != followed || !is_event(v) || v["run_id"] != run_id.as_str() {
                continue;
            }
            let seq = v["seq"].as_u64().unwrap_or(0);
            if !got.insert(seq) {
                continue;
            }
            while got.contains(&(last + 1)) {
                last += 1;
            }
            if seq == 1 {
                self.out
                    .time_to_first_event_ms
                    .push(sent_at.elapsed().as_secs_f64() * 1000.0);
            }
            if is_terminal(v) {
                terminal = Some(frame.value.clone());
                continue;
            }
            if acted || last < action_at || terminal.is_some() {
                continue;
            }
            acted = true;
            if action == 1 {
                self.disconnect(followed).await;
                match self.connect().await {
                    Ok(new) => followed = new,
                    Err(err) => {
                        self.out.errors += 1;
                        self.violation(format!("reconnect failed: {err:#}"));
                        return;
                    }
                }
                // Everything above `last` is requested again, so drop it from the record.
                got.retain(|s| *s <= last);
                self.send(
                    followed,
                    json!({"type": "resume", "run_id": run_id, "after_seq": last}),
                )
                .await;
            } else if action == 2 {
                self.send(followed, json!({"type": "stop_agent", "run_id": run_id}))
                    .await;
                stop_sent = true;
            }
        }
        let terminal = terminal.unwrap_or_default();
        self.out
            .run_duration_ms
            .push(sent_at.elapsed().as_secs_f64() * 1000.0);
        match terminal["status"].as_str() {
            Some("completed") => {
                self.out.runs_completed += 1;
                let reported = terminal["payload"]["result"]["usage"]["total_cost_usd"].as_f64();
                if reported != Some(self.account.summary_total) {
                    self.out.wrong_numbers += 1;
                    self.violation(format!(
                        "run {run_id}: answer says {reported:?}, summary says {}",
                        self.account.summary_total
                    ));
                }
            }
            Some("cancelled") if stop_sent => self.out.runs_cancelled += 1,
            other => {
                self.out.runs_other += 1;
                self.violation(format!(
                    "run {run_id} ended {other:?} (stop sent: {stop_sent})"
                ));
            }
        }
        if chaos && self.rng.gen_bool(0.3) {
            self.probe_foreign_run(followed, shared).await;
        }
        // Steering: answer the thread's question again, or send it two messages back to
        // back. The new runs are this user's like any other, and must arrive whole with one
        // terminal event like any other.
        if chaos && terminal["status"] == "completed" {
            let thread = terminal["thread_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match self.rng.gen_range(0..100) {
                0..=19 => self.regenerate(followed, &thread, shared).await,
                20..=34 => self.double_text(followed, &thread, shared).await,
                35..=49 => self.ask_with_approval(followed, &thread, shared).await,
                _ => {}
            }
        }
    }

    /// Double-texting: two messages to `thread` back to back, the second with `enqueue`,
    /// `interrupt` or `rollback`. Both runs must arrive whole (every seq once, one terminal
    /// event, sent live even for a run rolled back and removed afterwards); the second
    /// completes; the first completes (enqueue), or ends interrupted (interrupt) or
    /// cancelled (rollback) unless it finished first.
    async fn double_text(&mut self, conn: usize, thread: &str, shared: &SharedRunIds) {
        let strategy = ["enqueue", "interrupt", "rollback"][self.rng.gen_range(0..3)];
        let question = self.config.question.clone();
        self.send(
            conn,
            json!({"type": "user_message", "text": question, "thread_id": thread}),
        )
        .await;
        self.send(
            conn,
            json!({"type": "user_message", "text": question, "thread_id": thread,
                   "multitask_strategy": strategy}),
        )
        .await;
        // Run ids in the order accepted (None: refused by the user's own limits), and each
        // run's seqs and terminal event.
        let mut accepted: Vec<Option<String>> = Vec::new();
        let mut seqs: HashMap<String, std::collections::BTreeSet<u64>> = HashMap::new();
        let mut ends: HashMap<String, Value> = HashMap::new();
        loop {
            let complete = |run: &String| {
                ends.get(run)
                    .and_then(|t| t["seq"].as_u64())
                    .is_some_and(|end| seqs.get(run).map_or(0, |s| s.len() as u64) >= end)
            };
            if accepted.len() == 2 && accepted.iter().flatten().all(complete) {
                break;
            }
            let Some(frame) = self.next_frame().await else {
                self.out.lost_events += 1;
                self.violation(format!("double-text on {thread}: frames stopped"));
                return;
            };
            let v = &frame.value;
            if frame.conn != conn {
                continue;
            }
            if v["type"] == "run_accepted" && v["thread_id"] == thread && accepted.len() < 2 {
                let run = v["run_id"].as_str().unwrap_or_default().to_string();
                self.my_runs.insert(run.clone());
                shared.add(self.account.index, run.clone());
                self.out.runs_double_texted += 1;
                accepted.push(Some(run));
            } else if v["type"] == "error_message" && accepted.len() < 2 {
                let code = v["error_code"].as_str().unwrap_or_default();
                if !matches!(code, "TOO_MANY_RUNS" | "RATE_LIMITED") {
                    self.out.errors += 1;
                    self.violation(format!("double-text refused: {v}"));
                }
                accepted.push(None);
            } else if is_event(v) && v["thread_id"] == thread {
                let run = v["run_id"].as_str().unwrap_or_default().to_string();
                seqs.entry(run.clone())
                    .or_default()
                    .insert(v["seq"].as_u64().unwrap_or(0));
                if is_terminal(v) {
                    ends.insert(run, v.clone());
                }
            }
        }
        for (index, run) in accepted.iter().enumerate() {
            let Some(run) = run else { continue };
            let Some(terminal) = ends.get(run) else {
                continue;
            };
            let end = terminal["seq"].as_u64().unwrap_or(0);
            let got = seqs.get(run).cloned().unwrap_or_default();
            if got.iter().copied().ne(1..=end) {
                self.out.lost_events += end.saturating_sub(got.len() as u64) as usize;
                self.violation(format!("double-texted run {run}: seqs {got:?}, end {end}"));
            }
            let status = terminal["status"].as_str().unwrap_or_default();
            let expected = match (index, strategy) {
                (0, "interrupt") => matches!(status, "interrupted" | "completed"),
                (0, "rollback") => matches!(status, "cancelled" | "completed"),
                _ => status == "completed",
            };
            if status == "completed" {
                self.out.runs_completed += 1;
            } else {
                self.out.runs_other += 1;
            }
            if !expected {
                self.violation(format!(
                    "double-texted run {run} ({strategy}, message {}) ended {status}",
                    index + 1
                ));
            }
        }
    }

    /// Sends `regenerate` for `thread` and follows the new run to its terminal event: seqs
    /// 1..=end each exactly once, and the answer about this user's own numbers.
    async fn regenerate(&mut self, conn: usize, thread: &str, shared: &SharedRunIds) {
        self.send(conn, json!({"type": "regenerate", "thread_id": thread}))
            .await;
        let Some(accepted) = self.accepted_run(conn, "regenerate").await else {
            return;
        };
        let run_id = accepted["run_id"].as_str().unwrap_or_default().to_string();
        if accepted["thread_id"] != thread {
            self.violation(format!("regenerate of {thread} answered {accepted}"));
        }
        self.my_runs.insert(run_id.clone());
        shared.add(self.account.index, run_id.clone());
        self.out.runs_regenerated += 1;
        self.follow_to_end(conn, &run_id, "regenerated", |_, _| None)
            .await;
    }

    /// The `run_accepted` answer on `conn` to a steering request (`what`); `None` if it was
    /// refused (a violation unless by the user's own limits, runs or message rate, which is
    /// no fault) or frames stopped.
    async fn accepted_run(&mut self, conn: usize, what: &str) -> Option<Value> {
        let answer = self
            .wait_for(conn, |v| {
                v["type"] == "run_accepted" || v["type"] == "error_message"
            })
            .await?;
        if answer["type"] != "error_message" {
            return Some(answer);
        }
        let code = answer["error_code"].as_str().unwrap_or_default();
        if !matches!(code, "TOO_MANY_RUNS" | "RATE_LIMITED") {
            self.out.errors += 1;
            self.violation(format!("{what} refused: {answer}"));
        }
        None
    }

    /// Follows `run_id` on `conn` to its terminal event and checks it: seqs 1..=end each
    /// exactly once, `completed`, and a report about this user's own numbers. `on_event`
    /// sees each event first and may answer with a frame to send (an approval).
    async fn follow_to_end(
        &mut self,
        conn: usize,
        run_id: &str,
        what: &str,
        mut on_event: impl FnMut(&Value, &mut StdRng) -> Option<Value>,
    ) {
        let mut got = std::collections::BTreeSet::new();
        let terminal = loop {
            let Some(frame) = self.next_frame().await else {
                self.out.lost_events += 1;
                self.violation(format!("{what} run {run_id}: its events never arrived"));
                return;
            };
            let v = &frame.value;
            if frame.conn == conn
                && v["type"] == "error_message"
                && v["error_code"]
                    .as_str()
                    .is_some_and(|code| code.starts_with("APPROVAL_"))
            {
                // An answer to the plan was refused: the run would wait until it expires.
                self.out.errors += 1;
                self.violation(format!("{what} run {run_id}: answer refused: {v}"));
                return;
            }
            if frame.conn != conn || !is_event(v) || v["run_id"] != run_id {
                continue;
            }
            got.insert(v["seq"].as_u64().unwrap_or(0));
            if is_terminal(v) {
                break frame.value.clone();
            }
            if let Some(reply) = on_event(v, &mut self.rng) {
                self.send(conn, reply).await;
            }
        };
        let end = terminal["seq"].as_u64().unwrap_or(0);
        if got.len() as u64 != end || got.iter().copied().ne(1..=end) {
            self.out.lost_events += end.saturating_sub(got.len() as u64) as usize;
            self.violation(format!("{what} run {run_id}: seqs {got:?}, end {end}"));
        }
        match terminal["status"].as_str() {
            Some("completed") => {
                self.out.runs_completed += 1;
                let reported = terminal["payload"]["result"]["usage"]["total_cost_usd"].as_f64();
                if reported != Some(self.account.summary_total) {
                    self.out.wrong_numbers += 1;
                    self.violation(format!(
                        "{what} run {run_id}: answer says {reported:?}, summary says {}",
                        self.account.summary_total
                    ));
                }
            }
            other => {
                self.out.runs_other += 1;
                self.violation(format!("{what} run {run_id} ended {other:?}"));
            }
        }
    }

    /// Asks `thread` again with `require_approval`, and answers the plan when it is asked
    /// for: approve, reject, or keep only its first step. The run must pause with a seq
    /// like any event, continue after the answer, and arrive whole with one terminal event.
    async fn ask_with_approval(&mut self, conn: usize, thread: &str, shared: &SharedRunIds) {
        let question = self.config.question.clone();
        self.send(
            conn,
            json!({"type": "user_message", "text": question, "thread_id": thread,
                   "require_approval": true}),
        )
        .await;
        let Some(accepted) = self.accepted_run(conn, "message with approval").await else {
            return;
        };
        let run_id = accepted["run_id"].as_str().unwrap_or_default().to_string();
        self.my_runs.insert(run_id.clone());
        shared.add(self.account.index, run_id.clone());
        self.out.runs_approved += 1;
        let answered = run_id.clone();
        self.follow_to_end(conn, &run_id, "approval", move |event, rng| {
            if event["type"] != "approval_required" {
                return None;
            }
            let approval_id = event["payload"]["approval_id"].clone();
            let decision = match rng.gen_range(0..3) {
                0 => json!({"decision": "approve"}),
                1 => json!({"decision": "reject"}),
                _ => json!({"decision": "edit",
                            "plan": [event["payload"]["plan"][0]["order"].clone()]}),
            };
            let mut frame = json!({"type": "approval", "run_id": answered,
                                   "approval_id": approval_id});
            if let (Some(frame), Some(decision)) = (frame.as_object_mut(), decision.as_object()) {
                frame.extend(decision.clone());
            }
            Some(frame)
        })
        .await;
    }

    /// Every open connection must receive the terminal event of every run it saw.
    async fn drain(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let owed = self
                .seen
                .keys()
                .filter(|(conn, _)| self.sinks.contains_key(conn))
                .filter(|key| !self.terminals.contains(*key))
                .count();
            if owed == 0 {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some(frame)) => self.observe(&frame),
                _ => {
                    self.out.lost_events += owed;
                    // Which run, on which connection, up to which seq: what to look for
                    // in the server logs.
                    let detail: Vec<String> = self
                        .seen
                        .iter()
                        .filter(|(key, _)| self.sinks.contains_key(&key.0))
                        .filter(|(key, _)| !self.terminals.contains(*key))
                        .map(|((conn, run), seqs)| {
                            let urls = &self.account.ws_urls;
                            format!(
                                "run {run} on connection {conn} (to {}, connection_id {}; {}): \
                                 {} events, last seq {:?}",
                                urls[conn % urls.len()],
                                self.server_ids.get(conn).map_or("?", String::as_str),
                                self.ended.get(conn).map_or("still open", String::as_str),
                                seqs.len(),
                                seqs.iter().max()
                            )
                        })
                        .collect();
                    self.violation(format!(
                        "{owed} connection(s) never got their terminal event: {}",
                        detail.join("; ")
                    ));
                    return;
                }
            }
        }
    }

    fn check_ownership(&mut self) {
        let foreign: Vec<(String, String)> = self
            .event_ids
            .iter()
            .filter(|(run, thread)| {
                !self.my_runs.contains(run) || !self.my_threads.contains(thread)
            })
            .cloned()
            .collect();
        for (run, thread) in foreign {
            self.out.cross_user_frames += 1;
            self.violation(format!(
                "event of run {run} / thread {thread} that is not this user's"
            ));
        }
    }
}

pub(crate) async fn simulate(
    account: Account,
    config: &LoadConfig,
    shared: &SharedRunIds,
    barrier: Arc<tokio::sync::Barrier>,
    deadline: Instant,
) -> Outcome {
    let seed = config.seed ^ (account.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (tx, rx) = mpsc::unbounded_channel();
    let mut session = Session {
        account: &account,
        config,
        rng: StdRng::seed_from_u64(seed),
        tx,
        rx,
        sinks: HashMap::new(),
        next_conn: 0,
        seen: HashMap::new(),
        terminals: HashSet::new(),
        ended: HashMap::new(),
        server_ids: HashMap::new(),
        event_ids: Vec::new(),
        my_runs: HashSet::new(),
        my_threads: HashSet::new(),
        out: Outcome::default(),
    };
    let connections = session
        .rng
        .gen_range(1..=config.max_connections_per_user.max(1));
    let mut connected = true;
    for _ in 0..connections {
        if let Err(err) = session.connect().await {
            session.out.errors += 1;
            session.violation(format!("connect failed: {err:#}"));
            connected = false;
            break;
        }
    }
    // Everyone starts together, so runs really overlap.
    barrier.wait().await;
    if connected {
        for run_index in 0..config.runs_per_user {
            // Paced load: a person reads the answer before asking again. The first pause
            // spreads the users' first runs over one think time instead of all at once.
            if !config.think_time.is_zero() {
                let factor = if run_index == 0 {
                    session.rng.gen_range(0.0..1.0)
                } else {
                    session.rng.gen_range(0.5..1.5)
                };
                let pause = config.think_time.mul_f64(factor);
                tokio::time::sleep_until((Instant::now() + pause).min(deadline).into()).await;
            }
            if Instant::now() >= deadline {
                break;
            }
            session.one_run(run_index, shared).await;
        }
        session.drain().await;
    }
    session.check_ownership();
    let open: Vec<usize> = session.sinks.keys().copied().collect();
    for conn in open {
        session.disconnect(conn).await;
    }
    session.out
}
