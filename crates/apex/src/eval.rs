//! `apex eval`: asks a fixed question set of several users' demo data through the real
//! pipeline and scores every answer automatically.
//!
//! It starts a server in-process on a fresh SQLite folder (the provider options are those of
//! `apex serve`, so the same command evaluates the template writer, the embedded model or an
//! OpenAI-compatible server), registers `--users` accounts (each gets its own demo data),
//! asks every question over the WebSocket, follow-ups in the same thread, and checks each
//! answer against the run's own report (`payload.result` of the terminal event):
//!
//! - `figures`: every dollar amount stated is one the tools computed, to the cent;
//! - `expected`: the facts the question calls for are stated (the total, the top model and
//!   workload, each saving, the asked-about model's or workload's figure or an honest "does
//!   not show", the plan step, the window);
//! - `named`: a model or workload named as the biggest is the user's biggest;
//! - `repetition`: no 4-word sequence appears more than 3 times;
//! - `echo`: no prompt labels or chat-template tokens;
//! - `length`: within bounds;
//! - `triage`: the category triage chose is the labelled one.
//!
//! The results table goes to stdout (and `--report FILE` as markdown with example answers);
//! the exit status is non-zero when any check fails, so tests can run a subset.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use apex_protocol::events::{AgentEvent, EventKind, SUPERVISOR};
use apex_protocol::ws::{ControlFrame, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::config;

/// The question set: `thread<TAB>category<TAB>expectations<TAB>question`. Consecutive
/// lines with the same thread label (other than `-`) are asked in one thread.
pub const QUESTIONS: &str = include_str!("../eval/questions.tsv");

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Users to evaluate (each with their own demo data).
    #[arg(long, default_value_t = 3)]
    users: usize,
    /// Ask only the first N questions of the set (whole threads are kept together).
    #[arg(long)]
    limit: Option<usize>,
    /// Write the results as markdown (table, failures, example answers) to this file.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Measure triage instead: the labelled set's accuracy by the rules alone, the
    /// configured model's constrained choice alone, and both combined (as runs use them).
    #[arg(long)]
    triage: bool,
    /// Longest wait for one answer, in seconds.
    #[arg(long, default_value_t = 300)]
    answer_timeout_secs: u64,
    #[command(flatten)]
    serve: config::ServeFlags,
}

#[derive(Debug, Clone)]
pub struct Question {
    pub thread: String,
    pub category: String,
    pub expect: Vec<String>,
    pub text: String,
}

pub fn questions(limit: Option<usize>) -> Vec<Question> {
    let mut out: Vec<Question> = Vec::new();
    for line in QUESTIONS
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let fields: Vec<&str> = line.splitn(4, '\t').collect();
        let [thread, category, expect, text] = fields[..] else {
            continue;
        };
        out.push(Question {
            thread: thread.to_string(),
            category: category.to_string(),
            expect: expect
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty() && *e != "-")
                .map(str::to_string)
                .collect(),
            text: text.to_string(),
        });
    }
    if let Some(limit) = limit {
        // Keep a thread whole: stop at the first new thread after `limit` questions.
        let mut end = limit.min(out.len());
        while end < out.len()
            && end > 0
            && out[end].thread != "-"
            && out[end].thread == out[end - 1].thread
        {
            end += 1;
        }
        out.truncate(end);
    }
    out
}

/// The names of the checks, in the table's order.
pub const CHECKS: [&str; 7] = [
    "figures",
    "expected",
    "named",
    "repetition",
    "echo",
    "length",
    "triage",
];

const MIN_CHARS: usize = 40;
const MAX_CHARS: usize = 2_500;

fn money(v: f64) -> String {
    apex_server::agents::answer::money(v)
}

/// Every dollar amount in `answer` that is not one of the report's figures.
pub fn unknown_figures(answer: &str, report: &Value) -> Vec<String> {
    let mut figures = Vec::new();
    collect_usd(report, None, &mut figures);
    let mut unknown = Vec::new();
    for (i, _) in answer.match_indices('$') {
        let amount: String = answer[i + 1..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
            .collect();
        let amount = amount.trim_end_matches(['.', ',']);
        let Ok(value) = amount.replace(',', "").parse::<f64>() else {
            continue;
        };
        let cents = (value * 100.0).round() as i64;
        if !figures.contains(&cents) {
            unknown.push(format!("${amount}"));
        }
    }
    unknown
}

fn collect_usd(value: &Value, key: Option<&str>, out: &mut Vec<i64>) {
    match value {
        Value::Object(map) => map.iter().for_each(|(k, v)| collect_usd(v, Some(k), out)),
        Value::Array(items) => items.iter().for_each(|v| collect_usd(v, key, out)),
        Value::Number(n) if key.is_some_and(|k| k.ends_with("_usd")) => {
            if let Some(v) = n.as_f64() {
                out.push((v * 100.0).round() as i64);
            }
        }
        _ => {}
    }
}

/// The most frequent 4-word sequence and its count.
pub fn most_repeated_4gram(answer: &str) -> (String, usize) {
    let words = apex_server::agents::answer::words_of(answer);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for gram in words.windows(4) {
        *counts.entry(gram.join(" ")).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .unwrap_or_default()
}

const ECHO_MARKERS: &[&str] = &[
    "Question:",
    "Answer:",
    "Facts:",
    "My question",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "Analysis of my usage",
    "Explain in one sentence",
];

/// What the question calls for that the answer does not state.
fn missing_expectations(q: &Question, answer: &str, report: &Value) -> Vec<String> {
    let usage = &report["usage"];
    let mut missing = Vec::new();
    let mut need = |ok: bool, what: String| {
        if !ok {
            missing.push(what);
        }
    };
    for e in &q.expect {
        match e.split_once('=') {
            Some(("days", n)) => need(
                report["usage"]["days"]
                    .as_u64()
                    .map(|d| d.to_string())
                    .as_deref()
                    == Some(n),
                format!("a {n}-day window (report: {})", report["usage"]["days"]),
            ),
            _ => match e.as_str() {
                "total" => {
                    let total = money(usage["total_cost_usd"].as_f64().unwrap_or(0.0));
                    need(answer.contains(&total), format!("the total {total}"));
                }
                "latency" if usage["total_requests"].as_u64() == Some(0) => need(
                    answer.contains("no requests"),
                    "that the window has no requests (so no latency)".into(),
                ),
                "latency" => {
                    let p95 = usage["latency_ms"]["p95"].as_i64().unwrap_or(0);
                    let shown = format!("p95 {} ms", apex_server::agents::answer::thousands(p95));
                    need(answer.contains(&shown), format!("the latency ({shown})"));
                }
                "top_model" => {
                    let m = usage["top_models"][0]["model"].as_str().unwrap_or("?");
                    need(answer.contains(m), format!("the top model {m}"));
                }
                "top_workload" => {
                    let w = usage["top_workloads"][0]["workload"]
                        .as_str()
                        .unwrap_or("?");
                    need(answer.contains(w), format!("the top workload {w}"));
                }
                "savings" => {
                    for r in report["recommendations"].as_array().into_iter().flatten() {
                        let s = money(r["monthly_savings_usd"].as_f64().unwrap_or(0.0));
                        need(
                            answer.contains(&s),
                            format!("the saving {s} of {}", r["title"]),
                        );
                    }
                }
                "focus" => {
                    let focus = &report["focus"];
                    let items: Vec<&Value> = ["models", "workloads"]
                        .iter()
                        .flat_map(|k| focus[*k].as_array().into_iter().flatten())
                        .collect();
                    need(
                        !items.is_empty(),
                        "a model or workload recognised in the question".into(),
                    );
                    for item in items {
                        let name = item["name"].as_str().unwrap_or("?");
                        if item["found"].as_bool() == Some(true) {
                            let cost = money(item["cost_usd"].as_f64().unwrap_or(0.0));
                            need(
                                answer.contains(&format!("{name}: {cost}")),
                                format!("{name}'s own figure {cost}"),
                            );
                        } else {
                            need(
                                answer.contains("does not show") && answer.contains(name),
                                format!("an honest 'does not show' for {name}"),
                            );
                        }
                    }
                }
                "step" => {
                    let step = report["focus"]["step"].as_u64();
                    need(
                        step.is_some()
                            && (answer.starts_with("Step ") || answer.contains("there is no step")),
                        "the plan step asked about".into(),
                    );
                }
                "scope" => need(
                    answer.contains("I can answer questions about your own AI usage"),
                    "what Apex can answer".into(),
                ),
                other => need(false, format!("an unknown expectation {other:?}")),
            },
        }
    }
    missing
}

/// One answer's failed checks (check name → why); empty when every check passed.
pub fn score(
    q: &Question,
    answer: &str,
    report: &Value,
    category: &str,
) -> Vec<(&'static str, String)> {
    let mut failed = Vec::new();
    let unknown = unknown_figures(answer, report);
    if !unknown.is_empty() {
        failed.push((
            "figures",
            format!("not the tools' figures: {}", unknown.join(", ")),
        ));
    }
    let missing = missing_expectations(q, answer, report);
    if !missing.is_empty() {
        failed.push(("expected", format!("missing {}", missing.join("; "))));
    }
    let usage = &report["usage"];
    for (phrase, name) in [
        (
            "Most of it goes to ",
            usage["top_models"][0]["model"].as_str(),
        ),
        (
            "your most expensive workload is ",
            usage["top_workloads"][0]["workload"].as_str(),
        ),
    ] {
        if let (Some(at), Some(name)) = (answer.find(phrase), name) {
            if !answer[at + phrase.len()..].starts_with(name) {
                failed.push((
                    "named",
                    format!("'{phrase}' is not followed by the user's {name}"),
                ));
            }
        }
    }
    let (gram, count) = most_repeated_4gram(answer);
    if count > 3 {
        failed.push(("repetition", format!("\"{gram}\" {count} times")));
    }
    if let Some(marker) = ECHO_MARKERS.iter().find(|m| answer.contains(*m)) {
        failed.push(("echo", format!("contains {marker:?}")));
    }
    let chars = answer.chars().count();
    if !(MIN_CHARS..=MAX_CHARS).contains(&chars) {
        failed.push((
            "length",
            format!("{chars} characters (bounds {MIN_CHARS}..={MAX_CHARS})"),
        ));
    }
    if category != q.category {
        failed.push((
            "triage",
            format!("classified {category}, labelled {}", q.category),
        ));
    }
    failed
}

/// One asked question and what came back.
struct Outcome {
    user: usize,
    question: Question,
    answer: String,
    failed: Vec<(&'static str, String)>,
    seconds: f64,
    slots_by_model: usize,
    slots: usize,
}

struct Session {
    sink: futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Message,
    >,
    stream: futures_util::stream::SplitStream<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
}

async fn register(http: &reqwest::Client, base: &str, index: usize) -> anyhow::Result<String> {
    let email = format!("eval-{index}-{}@example.com", std::process::id());
    let response = http
        .post(format!("{base}/auth/register"))
        .json(&json!({"email": email, "password": "an evaluation password", "name": format!("Eval {index}")}))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!(
            "registering {email}: {}",
            response.text().await.unwrap_or_default()
        );
    }
    let body: Value = response.json().await?;
    body["access_token"]
        .as_str()
        .map(str::to_string)
        .context("no access token in the registration answer")
}

async fn connect(ws_url: &str, token: &str) -> anyhow::Result<Session> {
    let mut request = ws_url.into_client_request()?;
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    let (socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true).await?;
    let (sink, stream) = socket.split();
    Ok(Session { sink, stream })
}

/// What one run produced: the answer, the report, triage's category and the reporting
/// agent's result, plus the thread it ran in.
struct RunResult {
    answer: String,
    report: Value,
    category: String,
    reporting: Value,
    thread_id: String,
}

async fn ask(
    session: &mut Session,
    text: &str,
    thread: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<RunResult> {
    let mut frame = json!({"type": "user_message", "text": text});
    if let Some(thread) = thread {
        frame["thread_id"] = json!(thread);
    }
    session
        .sink
        .send(Message::Text(frame.to_string().into()))
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut category = String::new();
    let mut reporting = Value::Null;
    loop {
        let message = tokio::time::timeout_at(deadline, session.stream.next())
            .await
            .context("no answer in time")?
            .context("the server closed the socket")??;
        let Message::Text(text) = message else {
            continue;
        };
        match ServerFrame::parse(&text)? {
            ServerFrame::Event(event) => {
                let event: AgentEvent = *event;
                if event.kind == EventKind::AgentCompleted && event.agent_name == "triage" {
                    category = event.payload["result"]["category"]
                        .as_str()
                        .unwrap_or("?")
                        .to_string();
                }
                if event.kind == EventKind::AgentCompleted && event.agent_name == "reporting" {
                    reporting = event.payload["result"].clone();
                }
                if event.is_terminal() && event.agent_name == SUPERVISOR {
                    if event.status() != Some("completed") {
                        bail!(
                            "the run ended {}: {}",
                            event.status().unwrap_or("?"),
                            event.payload
                        );
                    }
                    return Ok(RunResult {
                        answer: event.payload["final_response"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        report: event.payload["result"].clone(),
                        category,
                        reporting,
                        thread_id: event.thread_id.to_string(),
                    });
                }
            }
            ServerFrame::Control(ControlFrame::ErrorMessage {
                error_code,
                error_message,
                ..
            }) => {
                bail!("{error_message} ({error_code})")
            }
            _ => {}
        }
    }
}

/// Accuracy of triage on the labelled set: rules alone, the model alone, combined.
async fn triage_accuracy(
    state: &apex_server::state::AppState,
    provider: &str,
) -> anyhow::Result<String> {
    use apex_server::agents::triage::{
        category_of_choice, choice_labels, choice_prompt, labelled_set, needs_model_choice,
        resolve, KnownNames,
    };
    use apex_server::agents::RequestCategory;
    let llm = &state.infra.llm;
    let names = KnownNames::new(
        &state.infra.pricing,
        &[],
        &apex_server::usage::demo::workload_names(),
    );
    let set = labelled_set();
    let (mut rules, mut model, mut combined) = (0usize, 0usize, 0usize);
    let mut misses = Vec::new();
    let started = Instant::now();
    for (expected, request, earlier) in &set {
        let (by_rules, _) = resolve(request, earlier, &names, None);
        rules += usize::from(by_rules.category == *expected);
        let choice = llm
            .choose(
                choice_prompt(request),
                choice_labels(),
                apex_server::llm::TokenMeter::default(),
                None,
                tokio_util::sync::CancellationToken::new(),
            )
            .await
            .ok()
            .flatten()
            .and_then(category_of_choice);
        let by_model = choice.unwrap_or(RequestCategory::General);
        model += usize::from(by_model == *expected);
        // As a run decides: the model only where the rules find nothing and the message
        // does not follow up an earlier one.
        let needs_model = needs_model_choice(request, earlier, &names);
        let (both, _) = resolve(
            request,
            earlier,
            &names,
            if needs_model { choice } else { None },
        );
        if both.category == *expected {
            combined += 1;
        } else {
            misses.push(format!(
                "- \"{request}\": {:?}, labelled {expected:?}",
                both.category
            ));
        }
    }
    let n = set.len();
    let pct = |k: usize| format!("{:.1}%", k as f64 * 100.0 / n as f64);
    let mut out = format!(
        "## triage on {n} labelled requests, model {provider} ({:.0} s)\n\n| source | correct | accuracy |\n| --- | ---: | ---: |\n",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(out, "| rules alone | {rules} | {} |", pct(rules));
    let _ = writeln!(
        out,
        "| model alone (constrained choice) | {model} | {} |",
        pct(model)
    );
    let _ = writeln!(out, "| combined | {combined} | {} |", pct(combined));
    if !misses.is_empty() {
        let _ = writeln!(out, "\nCombined misses:\n\n{}", misses.join("\n"));
    }
    Ok(out)
}

pub async fn run(args: EvalArgs) -> anyhow::Result<()> {
    let questions = questions(args.limit);
    let config = config::Resolved::serve(&args.serve)?.serve_config();
    let mut settings = config.settings;
    let data_dir = std::env::temp_dir().join(format!(
        "apex-eval-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    ));
    std::fs::create_dir_all(&data_dir)?;
    if settings.local_model.path.is_none() {
        // The model of this machine, not one in the throw-away folder.
        settings.local_model.path = Some(apex_server::llm::local::default_model_path(
            &settings.data_dir,
        ));
    }
    settings.data_dir = data_dir.clone();
    settings.database_url = None;
    settings.template_stream_delay = Duration::ZERO;
    // Every user asks many questions back to back.
    settings.limits.messages_per_minute = 10_000;
    settings.limits.message_burst = 10_000;
    // Its users are registered from one address in moments, and each asks on a thread of
    // its own.
    settings.limits.registrations_per_minute = 0;
    settings.limits.registrations_per_minute_total = 0;
    settings.limits.threads_per_minute = 0;
    let provider = format!("{:?}", settings.llm_provider).to_lowercase();
    let state = apex_server::build_state(settings).await?;
    let model = state.infra.llm.model_name().to_string();
    if args.triage {
        let markdown = triage_accuracy(&state, &model).await?;
        println!("{markdown}");
        if let Some(path) = &args.report {
            std::fs::write(path, &markdown)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let _ = std::fs::remove_dir_all(&data_dir);
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(apex_server::serve(listener, state, async move {
        let _ = stopped.await;
    }));
    let base = format!("http://{address}");
    let ws_url = format!("ws://{address}/ws");
    let http = reqwest::Client::new();
    let timeout = Duration::from_secs(args.answer_timeout_secs);
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for user in 0..args.users {
        let token = register(&http, &base, user).await?;
        let mut session = connect(&ws_url, &token).await?;
        let mut threads: HashMap<String, String> = HashMap::new();
        for q in &questions {
            let thread = (q.thread != "-")
                .then(|| threads.get(&q.thread).cloned())
                .flatten();
            let asked = Instant::now();
            let result = ask(&mut session, &q.text, thread.as_deref(), timeout)
                .await
                .with_context(|| format!("user {user}, question {:?}", q.text))?;
            if q.thread != "-" {
                threads.insert(q.thread.clone(), result.thread_id.clone());
            }
            let failed = score(q, &result.answer, &result.report, &result.category);
            eprintln!(
                "user {user} {:>5.1}s {} {}",
                asked.elapsed().as_secs_f64(),
                if failed.is_empty() { "pass" } else { "FAIL" },
                q.text
            );
            outcomes.push(Outcome {
                user,
                question: q.clone(),
                answer: result.answer,
                failed,
                seconds: asked.elapsed().as_secs_f64(),
                slots_by_model: result.reporting["slots_by_model"]
                    .as_array()
                    .map_or(0, Vec::len),
                slots: result.reporting["slots"].as_u64().unwrap_or(0) as usize,
            });
        }
    }
    let _ = stop.send(());
    let _ = server.await;
    let _ = std::fs::remove_dir_all(&data_dir);

    let markdown = render(
        &provider,
        &model,
        args.users,
        questions.len(),
        &outcomes,
        started.elapsed(),
    );
    println!("{markdown}");
    if let Some(path) = &args.report {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    }
    let failures = outcomes.iter().filter(|o| !o.failed.is_empty()).count();
    if failures > 0 {
        bail!("{failures} of {} answers failed a check", outcomes.len());
    }
    Ok(())
}

fn render(
    provider: &str,
    model: &str,
    users: usize,
    questions: usize,
    outcomes: &[Outcome],
    took: Duration,
) -> String {
    let mut out = String::new();
    let answers = outcomes.len();
    let _ = writeln!(
        out,
        "## {provider} ({model}): {users} users × {questions} questions = {answers} answers, {:.0} s\n",
        took.as_secs_f64()
    );
    let _ = writeln!(out, "| check | passed | of |");
    let _ = writeln!(out, "| --- | ---: | ---: |");
    for check in CHECKS {
        let failed = outcomes
            .iter()
            .filter(|o| o.failed.iter().any(|(c, _)| *c == check))
            .count();
        let _ = writeln!(out, "| {check} | {} | {answers} |", answers - failed);
    }
    let all = outcomes.iter().filter(|o| o.failed.is_empty()).count();
    let _ = writeln!(out, "| **every check** | **{all}** | **{answers}** |");
    let slots: usize = outcomes.iter().map(|o| o.slots).sum();
    let by_model: usize = outcomes.iter().map(|o| o.slots_by_model).sum();
    let mut seconds: Vec<f64> = outcomes.iter().map(|o| o.seconds).collect();
    seconds.sort_by(f64::total_cmp);
    let median = seconds.get(seconds.len() / 2).copied().unwrap_or(0.0);
    let _ = writeln!(
        out,
        "\nProse slots written by the model: {by_model} of {slots} (the rest in their template wording). Median time per answer: {median:.2} s.\n"
    );
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| !o.failed.is_empty()).collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "Failures:\n");
        for o in failures.iter().take(30) {
            let why: Vec<String> = o.failed.iter().map(|(c, w)| format!("{c}: {w}")).collect();
            let _ = writeln!(
                out,
                "- user {}, \"{}\": {}",
                o.user,
                o.question.text,
                why.join("; ")
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "Example answers (user 0):\n");
    // The first few answers, and the first two follow-up threads whole.
    let shown = outcomes
        .iter()
        .filter(|o| o.user == 0)
        .enumerate()
        .filter(|(i, o)| *i < EXAMPLES || ["a", "b"].contains(&o.question.thread.as_str()));
    for (_, o) in shown {
        let _ = writeln!(out, "**{}**\n", o.question.text);
        for line in o.answer.lines() {
            let _ = writeln!(out, "> {line}");
        }
        out.push('\n');
    }
    out
}

/// Full answers shown in the report, besides the follow-up threads.
const EXAMPLES: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Value {
        json!({"usage": {"days": 30, "total_cost_usd": 11.4149,
                         "top_models": [{"model": "claude-3-5-sonnet", "cost_usd": 10.58}],
                         "top_workloads": [{"workload": "rag-assistant", "cost_usd": 8.0}]},
               "recommendations": [{"title": "Cache", "monthly_savings_usd": 2.01}],
               "potential_monthly_savings_usd": 2.01,
               "focus": {"models": [{"name": "gpt-4o", "found": true, "cost_usd": 0.5}], "workloads": []}})
    }

    fn q(category: &str, expect: &[&str]) -> Question {
        Question {
            thread: "-".into(),
            category: category.into(),
            expect: expect.iter().map(|s| s.to_string()).collect(),
            text: "How can I reduce my LLM costs?".into(),
        }
    }

    #[test]
    fn a_good_answer_passes_every_check() {
        let answer = "Over the last 30 days you spent $11.41 in total. Most of it goes to claude-3-5-sonnet ($10.58), \
                      and your most expensive workload is rag-assistant ($8.00). 1. Cache: about $2.01/month. gpt-4o: $0.50 over the last 30 days.";
        let failed = score(
            &q(
                "cost_optimization",
                &["total", "top_model", "savings", "focus"],
            ),
            answer,
            &report(),
            "cost_optimization",
        );
        assert!(failed.is_empty(), "{failed:?}");
    }

    /// A window with no requests asks for its $0.00 and for saying there were no requests,
    /// not for a latency of 0 ms.
    #[test]
    fn an_empty_window_expects_no_requests_not_a_latency() {
        let empty = json!({"usage": {"days": 1, "total_requests": 0, "total_cost_usd": 0.0,
                                     "latency_ms": {"p95": 0}}});
        let expect = &["total", "latency"];
        let honest =
            "I found no AI usage in your account for yesterday: no requests and $0.00 spent.";
        assert!(missing_expectations(&q("latency_performance", expect), honest, &empty).is_empty());
        let silent = "I found nothing for yesterday.";
        assert_eq!(
            missing_expectations(&q("latency_performance", expect), silent, &empty).len(),
            2
        );
    }

    #[test]
    fn invented_figures_loops_echoes_and_misses_fail() {
        let answer = "765 tokens 765 tokens 765 tokens 765 tokens 765 tokens. Question: you spent $12.00. Most of it goes to gpt-4o.";
        let failed = score(
            &q("usage_report", &["total"]),
            answer,
            &report(),
            "cost_optimization",
        );
        let names: Vec<&str> = failed.iter().map(|(c, _)| *c).collect();
        assert_eq!(
            names,
            vec![
                "figures",
                "expected",
                "named",
                "repetition",
                "echo",
                "triage"
            ],
            "{failed:?}"
        );
    }

    #[test]
    fn the_question_set_is_big_enough_and_well_formed() {
        let all = questions(None);
        assert!(all.len() >= 50, "{} questions", all.len());
        let follow_ups = all
            .windows(2)
            .filter(|w| w[1].thread != "-" && w[1].thread == w[0].thread)
            .count();
        assert!(follow_ups >= 10, "{follow_ups} follow-ups");
        for q in &all {
            assert!(
                serde_json::from_value::<apex_server::agents::RequestCategory>(json!(q.category))
                    .is_ok(),
                "{q:?}"
            );
        }
        let limited = questions(Some(3));
        assert!(limited.len() >= 3);
    }
}
