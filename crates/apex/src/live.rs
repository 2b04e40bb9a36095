//! `apex chat`'s live view on a terminal: a line per agent, with a spinner (and what the
//! agent is doing) while it runs, replaced by `✓` and its duration when it completes or
//! `✗` when it fails, and the answer streaming in as it is written.
//!
//! Hand-rolled with a few ANSI escapes, no dependency. The running agents' lines are a
//! "live area" kept below everything else. Anything permanent (a finished agent's line, a
//! piece of the answer) is written by erasing the live area, writing the text, and drawing
//! the live area again. Live lines are cut to the terminal's width so that each takes one
//! row, and the cursor is only moved relative to where it is, so scrolling cannot confuse
//! it. The answer's unfinished last line is tracked (in characters) to get back to its end.
//! When standard output is not a terminal `apex chat` prints plain lines instead.

use std::io::Write;
use std::time::Instant;

use apex_protocol::events::{AgentEvent, EventKind, SUPERVISOR};

const SPINNER: [&str; 10] = ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"];

struct Running {
    agent: String,
    started: Instant,
    /// The latest thing it reported: a thought or a tool.
    detail: String,
}

pub struct LiveView<W: Write> {
    out: W,
    width: usize,
    color: bool,
    running: Vec<Running>,
    /// Characters written on the answer's current, unfinished line (0: at a line start).
    column: usize,
    /// Live lines on the screen now.
    drawn: usize,
    frame: usize,
}

/// `1.2 s` or `85 ms`.
fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// The terminal's width in columns (80 when it cannot be asked).
pub fn terminal_width() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: TIOCGWINSZ fills a winsize struct we own; a failure leaves it zeroed.
        let mut size = unsafe { std::mem::zeroed::<libc::winsize>() };
        let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
        if ok && size.ws_col > 0 {
            return usize::from(size.ws_col);
        }
    }
    80
}

impl<W: Write> LiveView<W> {
    pub fn new(out: W, width: usize, color: bool) -> Self {
        Self {
            out,
            width: width.max(20),
            color,
            running: Vec::new(),
            column: 0,
            drawn: 0,
            frame: 0,
        }
    }

    /// Whether a spinner is turning (the caller ticks only then).
    pub fn is_live(&self) -> bool {
        !self.running.is_empty()
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    /// Erases the live area and puts the cursor back where the permanent text ends.
    fn clear_live(&mut self) {
        if self.drawn == 0 {
            return;
        }
        // The live area starts on the row after the answer's unfinished line, or on the
        // row where the permanent text ends when that is a line start. An unfinished line
        // that exactly fills its last row continues on the next row anyway.
        let within_row = self.column % self.width;
        let up = if self.column > 0 && within_row != 0 {
            self.drawn
        } else {
            self.drawn - 1
        };
        let mut seq = String::new();
        if up > 0 {
            seq.push_str(&format!("\x1b[{up}A"));
        }
        seq.push('\r');
        if self.column > 0 && within_row != 0 {
            seq.push_str(&format!("\x1b[{within_row}C"));
        }
        seq.push_str("\x1b[J");
        let _ = self.out.write_all(seq.as_bytes());
        self.drawn = 0;
    }

    fn draw_live(&mut self) {
        if self.running.is_empty() {
            let _ = self.out.flush();
            return;
        }
        let mut text = String::new();
        if self.column > 0 {
            text.push('\n');
        }
        let frame = SPINNER[self.frame % SPINNER.len()];
        // Room for the spinner, the name and the time; the detail gets the rest of a row
        // (two columns spare, for symbols a terminal draws wide).
        for (i, agent) in self.running.iter().enumerate() {
            if i > 0 {
                text.push('\n');
            }
            let head = format!(
                "{frame} {:<13} {:>5.1} s",
                agent.agent,
                agent.started.elapsed().as_secs_f64()
            );
            let room = self.width.saturating_sub(head.chars().count() + 4);
            let detail: String = agent.detail.chars().take(room).collect();
            text.push_str(&self.paint("36", &head));
            if !detail.is_empty() {
                text.push_str("  ");
                text.push_str(&self.paint("2", &detail));
            }
        }
        let _ = self.out.write_all(text.as_bytes());
        let _ = self.out.flush();
        self.drawn = self.running.len();
    }

    /// Writes a permanent line above the live area.
    pub fn line(&mut self, line: &str) {
        self.clear_live();
        let mut text = String::new();
        if self.column > 0 {
            text.push('\n');
            self.column = 0;
        }
        text.push_str(line);
        text.push('\n');
        let _ = self.out.write_all(text.as_bytes());
        self.draw_live();
    }

    /// Streams a piece of the answer.
    fn answer(&mut self, piece: &str) {
        self.clear_live();
        let _ = self.out.write_all(piece.as_bytes());
        for c in piece.chars() {
            if c == '\n' {
                self.column = 0;
            } else {
                self.column += 1;
            }
        }
        self.draw_live();
    }

    /// Advances the spinners.
    pub fn tick(&mut self) {
        if self.running.is_empty() {
            return;
        }
        self.frame += 1;
        self.clear_live();
        self.draw_live();
    }

    fn set_detail(&mut self, agent: &str, detail: String) {
        if let Some(running) = self.running.iter_mut().find(|r| r.agent == agent) {
            running.detail = detail.replace(['\n', '\r', '\t'], " ");
        }
        self.clear_live();
        self.draw_live();
    }

    fn finish(&mut self, agent: &str) {
        self.running.retain(|r| r.agent != agent);
    }

    /// Shows one event. Returns true for the run's terminal event.
    pub fn event(&mut self, event: &AgentEvent) -> bool {
        let p = &event.payload;
        let agent = event.agent_name.as_str();
        let text = |key: &str| p[key].as_str().unwrap_or("").to_string();
        match event.kind {
            EventKind::AgentStarted if agent != SUPERVISOR => {
                self.clear_live();
                self.running.push(Running {
                    agent: agent.to_string(),
                    started: Instant::now(),
                    detail: String::new(),
                });
                self.draw_live();
            }
            EventKind::AgentThinking => self.set_detail(agent, format!("· {}", text("reasoning"))),
            EventKind::ToolExecuting => self.set_detail(agent, format!("⚙ {}", text("tool_name"))),
            EventKind::ToolCompleted => {
                self.set_detail(agent, format!("⚙ {} done", text("tool_name")))
            }
            EventKind::PartialResult => self.answer(&text("content")),
            EventKind::AgentCompleted if event.is_terminal() => {
                self.running.clear();
                let status = text("status");
                let mark = if status == "completed" {
                    self.paint("32", "✓")
                } else {
                    self.paint("31", "✗")
                };
                let ms = p["execution_time_ms"].as_u64().unwrap_or(0);
                self.line("");
                self.line(&format!("{mark} run {status} in {}", duration(ms)));
                return true;
            }
            EventKind::AgentCompleted => {
                self.finish(agent);
                let status = text("status");
                let ms = p["execution_time_ms"].as_u64().unwrap_or(0);
                let line = if status == "completed" {
                    format!("{} {agent:<13} {}", self.paint("32", "✓"), duration(ms))
                } else {
                    format!(
                        "{} {agent:<13} {status} after {}",
                        self.paint("31", "✗"),
                        duration(ms)
                    )
                };
                self.line(&line);
            }
            EventKind::AgentError => {
                self.finish(agent);
                let line = format!(
                    "{} {agent:<13} {}",
                    self.paint("31", "✗"),
                    text("error_message")
                );
                self.line(&line);
            }
            EventKind::Error => {
                let line = format!("{} {}", self.paint("31", "✗"), text("error_message"));
                self.line(&line);
            }
            _ => {}
        }
        false
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A tiny terminal: printable characters wrap at `width`; `\r`, `\n`, cursor up
    /// (`ESC[nA`), right (`ESC[nC`), erase below (`ESC[J`); colors are ignored.
    fn screen(bytes: &[u8], width: usize) -> Vec<String> {
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let mut rows: Vec<Vec<char>> = vec![Vec::new()];
        let (mut row, mut col) = (0usize, 0usize);
        let mut pending_wrap = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\x1b' => {
                    assert_eq!(chars.next(), Some('['));
                    let mut n = String::new();
                    let command = loop {
                        let c = chars.next().unwrap();
                        if c.is_ascii_digit() || c == ';' {
                            n.push(c);
                        } else {
                            break c;
                        }
                    };
                    let n: usize = n.parse().unwrap_or(1);
                    pending_wrap = false;
                    match command {
                        'A' => row = row.saturating_sub(n),
                        'C' => col = (col + n).min(width - 1),
                        'J' => {
                            rows[row].truncate(col);
                            rows.truncate(row + 1);
                        }
                        'm' => {}
                        other => panic!("unexpected escape {other}"),
                    }
                }
                '\r' => {
                    col = 0;
                    pending_wrap = false;
                }
                '\n' => {
                    row += 1;
                    col = 0;
                    pending_wrap = false;
                }
                c => {
                    if pending_wrap {
                        row += 1;
                        col = 0;
                        pending_wrap = false;
                    }
                    while rows.len() <= row {
                        rows.push(Vec::new());
                    }
                    let line = &mut rows[row];
                    while line.len() < col {
                        line.push(' ');
                    }
                    if col < line.len() {
                        line[col] = c;
                    } else {
                        line.push(c);
                    }
                    if col + 1 == width {
                        pending_wrap = true;
                    } else {
                        col += 1;
                    }
                }
            }
            while rows.len() <= row {
                rows.push(Vec::new());
            }
        }
        rows.into_iter()
            .map(|r| r.into_iter().collect::<String>().trim_end().to_string())
            .collect()
    }

    /// An event of `kind` from `agent` with `payload` (the other fields fixed), for the
    /// views' tests here and in `chat`.
    pub(crate) fn event(agent: &str, kind: &str, payload: serde_json::Value) -> AgentEvent {
        serde_json::from_value(json!({
            "type": kind, "agent_name": agent, "payload": payload, "user_id": "u",
            "run_id": "r", "thread_id": "t", "seq": 1, "timestamp": "2025-01-01T00:00:00Z",
        }))
        .unwrap_or_else(|e| panic!("an event: {e}"))
    }

    #[test]
    fn agents_get_a_line_each_and_the_answer_streams_above_the_spinner() {
        let width = 40;
        let mut view = LiveView::new(Vec::new(), width, false);
        view.event(&event("triage", "agent_started", json!({})));
        view.event(&event(
            "triage",
            "tool_executing",
            json!({"tool_name": "classify"}),
        ));
        view.tick();
        let shown = screen(&view.out, width);
        assert!(shown.last().unwrap().starts_with("⠙ triage"), "{shown:?}");
        assert!(shown.last().unwrap().contains("⚙ classify"), "{shown:?}");
        view.event(&event(
            "triage",
            "agent_completed",
            json!({"status": "completed", "execution_time_ms": 12}),
        ));
        view.event(&event("data", "agent_started", json!({})));
        view.event(&event(
            "data",
            "agent_error",
            json!({"error_message": "no rows"}),
        ));
        view.event(&event("reporting", "agent_started", json!({})));
        // An answer longer than a row, in pieces, with a line break.
        for piece in [
            "You could save about $12 ",
            "by routing short prompts to a ",
            "smaller model.\nDone",
        ] {
            view.event(&event(
                "reporting",
                "partial_result",
                json!({"content": piece}),
            ));
            view.tick();
        }
        let shown = screen(&view.out, width);
        assert!(
            shown.last().unwrap().starts_with('⠏') || shown.last().unwrap().contains("reporting"),
            "{shown:?}"
        );
        view.event(&event(
            "reporting",
            "agent_completed",
            json!({"status": "completed", "execution_time_ms": 1500}),
        ));
        let terminal = event(
            SUPERVISOR,
            "agent_completed",
            json!({"status": "completed", "execution_time_ms": 1600}),
        );
        assert!(view.event(&terminal));
        let shown = screen(&view.out, width);
        let answer = "You could save about $12 by routing short prompts to a smaller model.";
        let wrapped: Vec<String> = answer
            .chars()
            .collect::<Vec<_>>()
            .chunks(width)
            .map(|c| c.iter().collect::<String>().trim_end().to_string())
            .collect();
        let mut expected = vec![
            "✓ triage        12 ms".to_string(),
            "✗ data          no rows".to_string(),
        ];
        expected.extend(wrapped);
        expected.extend([
            "Done".to_string(),
            "✓ reporting     1.5 s".to_string(),
            String::new(),
            "✓ run completed in 1.6 s".to_string(),
            String::new(),
        ]);
        assert_eq!(shown, expected);
    }
}
