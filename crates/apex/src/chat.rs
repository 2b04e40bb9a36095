//! `apex chat`: a terminal client for the golden path.
//!
//! Registers or logs in over REST, opens the WebSocket with the access token in the
//! `Authorization` header (never in the URL), then sends each line you type as a
//! `user_message` and prints every agent step as it arrives, with the answer streaming in.
//! `/regenerate` (or `--regenerate THREAD_ID`) answers the thread's last question again.
//! A run that waits for approval of its plan (`--require-approval`, or the account's
//! setting) prints the plan and asks: approve, reject, or the step numbers to carry out.
//! On a terminal that is the live view of `crate::live` (a spinner line per running agent);
//! otherwise (a pipe, a file, a test) one plain line per step.

use std::io::{IsTerminal as _, Write as _};

use anyhow::{bail, Context as _};
use apex_protocol::events::{AgentEvent, EventKind, SUPERVISOR};
use apex_protocol::ws::{ControlFrame, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::account::AccountArgs;
use crate::live::LiveView;
use crate::terminal::{clean, clean_json};

#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    account: AccountArgs,
    /// Ask this one question, print the run, and exit (non-interactive).
    #[arg(long, conflicts_with = "regenerate")]
    message: Option<String>,
    /// Answer the last question of this thread again, print the run, and exit
    /// (non-interactive). The earlier answer stays in the thread, marked superseded.
    #[arg(long, value_name = "THREAD_ID")]
    regenerate: Option<String>,
    /// Ask for approval of the action plan before the report (every message of this
    /// session); without it, the account's setting decides.
    #[arg(long)]
    require_approval: bool,
}

/// A run waiting for this terminal's answer to its plan.
struct AwaitingAnswer {
    run_id: String,
    approval_id: String,
    /// The proposed steps' numbers, to check an edit against before sending it.
    steps: Vec<u64>,
}

/// What was typed at the approval prompt, as the `approval` frame's fields.
fn approval_answer(line: &str, steps: &[u64]) -> Result<Value, String> {
    match line.trim().to_ascii_lowercase().as_str() {
        "a" | "approve" | "y" | "yes" => return Ok(json!({"decision": "approve"})),
        "r" | "reject" | "n" | "no" => return Ok(json!({"decision": "reject"})),
        _ => {}
    }
    let mut chosen = Vec::new();
    for part in line.split(|c: char| c == ',' || c.is_whitespace()) {
        if part.is_empty() {
            continue;
        }
        let order: u64 = part
            .parse()
            .map_err(|_| format!("{part:?} is not a step number"))?;
        if !steps.contains(&order) {
            return Err(format!("there is no step {order}"));
        }
        chosen.push(order);
    }
    if chosen.is_empty() {
        return Err("type a, r, or step numbers".into());
    }
    Ok(json!({"decision": "edit", "plan": chosen}))
}

/// The plan of an `approval_required` event, one line per step, then the question.
fn approval_lines(payload: &Value) -> Vec<String> {
    let mut lines = vec!["The plan waits for your approval:".to_string()];
    for step in payload["plan"].as_array().into_iter().flatten() {
        let savings = step["expected_monthly_savings_usd"].as_f64().unwrap_or(0.0);
        let saves = if savings > 0.0 {
            format!(" (saves about ${savings:.2}/month)")
        } else {
            String::new()
        };
        lines.push(format!(
            "  {}. {}{saves}",
            step["order"],
            step["title"].as_str().unwrap_or("?")
        ));
    }
    lines.push(format!(
        "Approve [a], reject [r], or list the steps to carry out in order (e.g. \"2 1\"); \
         it expires at {}.",
        payload["expires_at"].as_str().unwrap_or("?")
    ));
    lines
}

/// How events are shown: the live view on a terminal, plain lines otherwise.
enum View {
    Live(LiveView<std::io::Stdout>),
    /// Plain lines; `mid_line` as in [`render`].
    Plain {
        mid_line: bool,
    },
}

impl View {
    fn for_stdout() -> View {
        if std::io::stdout().is_terminal() {
            let color = std::env::var_os("NO_COLOR").is_none();
            View::Live(LiveView::new(
                std::io::stdout(),
                crate::live::terminal_width(),
                color,
            ))
        } else {
            View::Plain { mid_line: false }
        }
    }

    /// Shows one event; true for the run's terminal event.
    fn event(&mut self, event: &AgentEvent) -> bool {
        match self {
            View::Live(view) => view.event(event),
            View::Plain { mid_line } => render(event, mid_line, &mut std::io::stdout()),
        }
    }

    fn line(&mut self, line: &str) {
        match self {
            View::Live(view) => view.line(line),
            View::Plain { mid_line } => {
                if std::mem::take(mid_line) {
                    println!();
                }
                println!("{line}");
            }
        }
    }

    fn is_live(&self) -> bool {
        matches!(self, View::Live(view) if view.is_live())
    }

    fn tick(&mut self) {
        if let View::Live(view) = self {
            view.tick();
        }
    }
}

/// Prints one event as a line (or, for answer text, inline) to `out`. Returns true for the
/// terminal. `mid_line` says whether the answer text printed last ended inside a line: the
/// next line then starts on one of its own (a note written while the model works on a
/// passage would otherwise run on from the passage's last words).
fn render(event: &AgentEvent, mid_line: &mut bool, out: &mut impl std::io::Write) -> bool {
    let p = &event.payload;
    let agent = event.agent_name.as_str();
    if event.kind == EventKind::PartialResult {
        let text = p["content"].as_str().unwrap_or("");
        let _ = write!(out, "{text}");
        let _ = out.flush();
        if !text.is_empty() {
            *mid_line = !text.ends_with('\n');
        }
        return false;
    }
    let line = match event.kind {
        EventKind::AgentStarted if agent != SUPERVISOR => format!("▶ {agent}"),
        EventKind::AgentThinking => format!("  · {}", p["reasoning"].as_str().unwrap_or("")),
        EventKind::ToolExecuting => format!(
            "  ⚙ {}({})",
            p["tool_name"].as_str().unwrap_or("?"),
            p["parameters"]
        ),
        EventKind::ToolCompleted => {
            let mark = if p["success"].as_bool().unwrap_or(false) {
                "✓"
            } else {
                "✗"
            };
            format!(
                "  {mark} {} in {} ms",
                p["tool_name"].as_str().unwrap_or("?"),
                p["execution_time_ms"]
            )
        }
        EventKind::AgentCompleted if event.is_terminal() => format!(
            "\n— run {} in {} ms",
            p["status"].as_str().unwrap_or("?"),
            p["execution_time_ms"]
        ),
        EventKind::AgentCompleted => {
            let mut line = format!(
                "✔ {agent} {} in {} ms",
                p["status"].as_str().unwrap_or(""),
                p["execution_time_ms"]
            );
            if agent == "actions" {
                line.push('\n');
            }
            line
        }
        EventKind::AgentError | EventKind::Error => {
            format!("✖ {}", p["error_message"].as_str().unwrap_or("error"))
        }
        _ => return false,
    };
    if std::mem::take(mid_line) {
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "{line}");
    event.is_terminal()
}

fn prompt() {
    print!("you> ");
    let _ = std::io::stdout().flush();
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    let pair = args.account.authenticate().await?;
    println!(
        "signed in as {} ({})",
        clean(&pair.user.email),
        clean(&pair.user.id)
    );
    let ws_url = format!(
        "{}/ws",
        args.account
            .server
            .trim_end_matches('/')
            .replacen("http", "ws", 1)
    );
    let mut request = ws_url.as_str().into_client_request()?;
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", pair.access_token).parse()?,
    );
    // Nagle off (`true`): messages and stops are small frames that must leave at once.
    let (socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true)
        .await
        .with_context(|| format!("opening {ws_url}"))?;
    let (mut sink, mut stream) = socket.split();

    let mut thread_id: Option<String> = args.regenerate.clone();
    let one_shot = args.message.is_some() || args.regenerate.is_some();
    let require_approval = args.require_approval;
    let send_message = |text: String, thread: &Option<String>| {
        let mut frame = json!({ "type": "user_message", "text": text });
        if require_approval {
            frame["require_approval"] = Value::Bool(true);
        }
        if let Some(thread) = thread {
            frame["thread_id"] = Value::String(thread.clone());
        }
        Message::Text(frame.to_string().into())
    };
    let regenerate = |thread: &str| {
        Message::Text(
            json!({ "type": "regenerate", "thread_id": thread })
                .to_string()
                .into(),
        )
    };
    if let Some(text) = &args.message {
        sink.send(send_message(text.clone(), &thread_id)).await?;
    } else if let Some(thread) = &args.regenerate {
        sink.send(regenerate(thread)).await?;
    } else {
        println!(
            "Ask about your AI usage. Commands: /stop, /regenerate (answer the last question \
             again), /new (new thread), /quit"
        );
        prompt();
    }

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = !one_shot;
    // A one-shot run still reads its answer to a request for approval from stdin.
    let mut stdin_ended = false;
    let mut awaiting: Option<AwaitingAnswer> = None;
    let mut view = View::for_stdout();
    let mut spinner = tokio::time::interval(std::time::Duration::from_millis(100));
    spinner.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = spinner.tick(), if view.is_live() => view.tick(),
            line = lines.next_line(), if (stdin_open || awaiting.is_some()) && !stdin_ended => {
                let Some(line) = line? else {
                    stdin_open = false;
                    stdin_ended = true;
                    if awaiting.is_some() {
                        view.line("(no answer to the plan: it waits on the server until it expires)");
                        if one_shot { return Ok(()) }
                    }
                    continue;
                };
                if let Some(asked) = &awaiting {
                    match approval_answer(&line, &asked.steps) {
                        Ok(mut frame) => {
                            frame["type"] = json!("approval");
                            frame["run_id"] = json!(asked.run_id);
                            frame["approval_id"] = json!(asked.approval_id);
                            sink.send(Message::Text(frame.to_string().into())).await?;
                            awaiting = None;
                        }
                        Err(problem) => {
                            view.line(&format!("({problem})"));
                            print!("approve> ");
                            let _ = std::io::stdout().flush();
                        }
                    }
                    continue;
                }
                match line.trim() {
                    "" => prompt(),
                    "/quit" => break,
                    "/new" => { thread_id = None; println!("(new thread)"); prompt(); }
                    "/stop" => sink.send(Message::Text(json!({"type": "stop_agent"}).to_string().into())).await?,
                    "/regenerate" => match &thread_id {
                        Some(thread) => sink.send(regenerate(thread)).await?,
                        None => { view.line("(nothing to regenerate yet: ask a question first)"); prompt(); }
                    },
                    text => sink.send(send_message(text.to_string(), &thread_id)).await?,
                }
            }
            frame = stream.next() => {
                let Some(frame) = frame else { bail!("the server closed the connection") };
                let text = match frame? {
                    Message::Text(text) => text.to_string(),
                    Message::Close(close) => bail!("the server closed the connection: {close:?}"),
                    _ => continue,
                };
                match ServerFrame::parse(&text)? {
                    ServerFrame::Event(mut event) => {
                        // Any of it may be printed (names, reasoning, the answer, errors),
                        // and all of it may carry text from other people's data.
                        event.agent_name = clean(&event.agent_name);
                        clean_json(&mut event.payload);
                        let run_ended = view.event(&event);
                        if event.kind == EventKind::ApprovalRequired {
                            for line in approval_lines(&event.payload) {
                                view.line(&line);
                            }
                            awaiting = Some(AwaitingAnswer {
                                run_id: event.run_id.clone(),
                                approval_id: event.payload["approval_id"].as_str().unwrap_or("").to_string(),
                                steps: event.payload["plan"].as_array().into_iter().flatten()
                                    .filter_map(|s| s["order"].as_u64()).collect(),
                            });
                            print!("approve> ");
                            let _ = std::io::stdout().flush();
                        }
                        if run_ended && awaiting.as_ref().is_some_and(|a| a.run_id == event.run_id) {
                            // Ended while asking (expired, stopped): nothing left to answer.
                            awaiting = None;
                        }
                        match (run_ended, one_shot, event.status()) {
                            (false, _, _) => {}
                            (true, true, Some("completed")) => return Ok(()),
                            (true, true, status) => bail!("run ended with status {}", status.unwrap_or("?")),
                            (true, false, _) => prompt(),
                        }
                    }
                    ServerFrame::Control(ControlFrame::ThreadCreated { thread_id: id, .. }) => thread_id = Some(id),
                    ServerFrame::Control(ControlFrame::ApprovalAccepted { decision, .. }) => {
                        view.line(&format!("(plan answered: {}; the run continues)", decision.as_str()));
                    }
                    ServerFrame::Control(ControlFrame::ErrorMessage { error_code, error_message, .. }) => {
                        let (error_code, error_message) = (clean(&error_code), clean(&error_message));
                        view.line(&format!("✖ {error_message} ({error_code})"));
                        if one_shot { bail!("{error_message}") }
                        prompt();
                    }
                    ServerFrame::Control(ControlFrame::ServerShutdown { .. }) => bail!("the server is shutting down"),
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::tests::event;

    #[test]
    fn a_note_after_answer_text_ending_mid_line_starts_a_line_of_its_own() {
        let (mut out, mut mid_line) = (Vec::new(), false);
        let events = [
            event(
                "reporting",
                "partial_result",
                json!({"content": "1. Cache prompts."}),
            ),
            event(
                "reporting",
                "agent_thinking",
                json!({"reasoning": "using the template"}),
            ),
            event(
                "reporting",
                "partial_result",
                json!({"content": "2. Route.\n"}),
            ),
            event(
                "reporting",
                "agent_thinking",
                json!({"reasoning": "done writing"}),
            ),
        ];
        let terminal: Vec<bool> = events
            .iter()
            .map(|e| render(e, &mut mid_line, &mut out))
            .collect();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "1. Cache prompts.\n  · using the template\n2. Route.\n  · done writing\n"
        );
        assert_eq!(terminal, [false; 4]);
    }
}
