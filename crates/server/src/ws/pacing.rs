//! Paced delivery for the original web client: the outbox of one connection.
//!
//! That client (`docs/protocol.md` §9) handles one frame per render and drops every frame
//! that arrives while it is still busy with the previous one, so a burst (the fast agents'
//! twenty frames, or `final_report` right before the terminal event, each within a
//! millisecond) reaches its screen as the burst's first frame only. A connection
//! identified as that client therefore sends through an [`Outbox`] instead of writing to
//! the socket at once:
//!
//! - every frame, control frames included, is queued in order and leaves at least
//!   `frame_gap` (15 ms) after the one before it;
//! - `final_report`, `error` and the terminal event leave at least `final_gap` (100 ms)
//!   after the frame before them: they end the run on the client's screen;
//! - `partial_result` frames leave at most about 30 times a second ([`PARTIAL_GAP`]);
//!   chunks of a run that arrive while its last chunk still waits are appended to it
//!   (coalesced) instead of queued behind it. A coalesced frame carries its last chunk's
//!   `seq`, `timestamp` and `message_id`, the chunks' `content` concatenated in order,
//!   and `first_seq`, the seq of its first chunk: it stands for every seq from `first_seq`
//!   to `seq`. Only chunks whose seqs follow on directly are coalesced;
//! - nothing is ever dropped or merged besides answer chunks: every step frame
//!   (`agent_started`, `agent_thinking`, `tool_executing`, `tool_completed`,
//!   `agent_completed`) goes out as it was emitted.
//!
//! The outbox lives in the connection's own task, which keeps taking events from the bus
//! while frames wait, so neither the run nor any other connection waits for the pacing.
//! When [`MAX_QUEUED`] frames wait, the task stops taking events; if the bus then drops
//! some for this connection, the connection catches up from the event log as any
//! connection that fell behind does, so a burst costs time, never frames.
//!
//! The outbox is a plain data structure driven with explicit instants (the connection
//! passes the clock), which keeps its schedule testable without a socket or a timer.

use std::collections::VecDeque;
use std::time::Duration;

use apex_protocol::events::EventKind;
use serde_json::Value;
use tokio::time::Instant;

use crate::events::log;
use crate::ids::RunId;
use crate::settings::LegacyClientSettings;

/// Least time between two `partial_result` frames: at most about 30 a second.
pub const PARTIAL_GAP: Duration = Duration::from_millis(33);

/// Frames an outbox holds before its connection stops taking events from the bus (and
/// catches up from the event log later, if the bus dropped some meanwhile). Coalescing
/// keeps a run to about one queued frame per step event, so this is several runs' worth.
pub const MAX_QUEUED: usize = 512;

/// The schedule of a paced connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pacing {
    pub frame_gap: Duration,
    pub final_gap: Duration,
    pub partial_gap: Duration,
}

impl Pacing {
    pub fn from_settings(settings: &LegacyClientSettings) -> Self {
        Self {
            frame_gap: settings.frame_gap,
            final_gap: settings.final_gap,
            // Never faster than frames in general.
            partial_gap: PARTIAL_GAP.max(settings.frame_gap),
        }
    }
}

/// How a frame is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Control frames and step events: `frame_gap` after the previous frame.
    Other,
    /// `partial_result`: also [`Pacing::partial_gap`] after the previous one.
    Partial,
    /// `final_report`, `error` and the terminal event: `final_gap` after the previous frame.
    Final,
}

fn classify(json: &str) -> Class {
    match log::head(json) {
        (_, true) => Class::Final,
        (Some(EventKind::FinalReport | EventKind::Error), _) => Class::Final,
        (Some(EventKind::PartialResult), _) => Class::Partial,
        _ => Class::Other,
    }
}

/// A `partial_result` frame still waiting, which later chunks of its run may join.
#[derive(Debug)]
struct Chunks {
    run: RunId,
    first_seq: u64,
    last_seq: u64,
    /// The first chunk as emitted; sent unchanged if nothing joins it.
    original: String,
    /// The frame once a chunk has joined it.
    merged: Option<Value>,
}

impl Chunks {
    /// Appends the chunk `seq` if it directly follows the last one; `false` (and nothing
    /// changed) otherwise, or if either frame is not the expected shape.
    fn absorb(&mut self, seq: u64, json: &str) -> bool {
        if seq != self.last_seq + 1 {
            return false;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(json) else {
            return false;
        };
        let Some(content) = chunk.pointer("/payload/content").and_then(Value::as_str) else {
            return false;
        };
        if self.merged.is_none() {
            self.merged = serde_json::from_str::<Value>(&self.original)
                .ok()
                .filter(|frame| {
                    frame
                        .pointer("/payload/content")
                        .is_some_and(Value::is_string)
                });
        }
        let Some(frame) = self.merged.as_mut() else {
            return false;
        };
        if let Some(Value::String(text)) = frame.pointer_mut("/payload/content") {
            text.push_str(content);
        }
        if let (Some(slot), Some(id)) = (
            frame.pointer_mut("/payload/message_id"),
            chunk.pointer("/payload/message_id"),
        ) {
            *slot = id.clone();
        }
        if let Some(object) = frame.as_object_mut() {
            object.insert("seq".into(), Value::from(seq));
            object.insert("first_seq".into(), Value::from(self.first_seq));
            if let Some(timestamp) = chunk.get("timestamp") {
                object.insert("timestamp".into(), timestamp.clone());
            }
        }
        self.last_seq = seq;
        true
    }

    fn into_text(self) -> String {
        match self.merged {
            Some(frame) => frame.to_string(),
            None => self.original,
        }
    }
}

#[derive(Debug)]
enum Entry {
    Frame {
        /// The run of an event; `None` for control frames.
        run: Option<RunId>,
        class: Class,
        text: String,
    },
    Chunks(Chunks),
}

impl Entry {
    fn class(&self) -> Class {
        match self {
            Entry::Frame { class, .. } => *class,
            Entry::Chunks(_) => Class::Partial,
        }
    }

    fn run(&self) -> Option<RunId> {
        match self {
            Entry::Frame { run, .. } => *run,
            Entry::Chunks(chunks) => Some(chunks.run),
        }
    }
}

/// A frame whose time has come: send `text`, then report it with [`Outbox::sent`].
#[derive(Debug)]
pub struct Ready {
    pub text: String,
    pub class: Class,
}

/// The frames of one paced connection not yet sent, in order, and when the last left.
#[derive(Debug)]
pub struct Outbox {
    pacing: Pacing,
    queue: VecDeque<Entry>,
    last_sent: Option<Instant>,
    last_partial_sent: Option<Instant>,
}

impl Outbox {
    pub fn new(pacing: Pacing) -> Self {
        Self {
            pacing,
            queue: VecDeque::new(),
            last_sent: None,
            last_partial_sent: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether the connection may take more events from the bus now.
    pub fn has_room(&self) -> bool {
        self.queue.len() < MAX_QUEUED
    }

    /// Queues a control frame (not an agent event).
    pub fn push_control(&mut self, text: String) {
        self.queue.push_back(Entry::Frame {
            run: None,
            class: Class::Other,
            text,
        });
    }

    /// Queues event `seq` of `run`. A `partial_result` joins the run's waiting chunks when
    /// they are the run's latest queued frame and end at `seq - 1`; frames of other runs
    /// and control frames queued after them do not matter, since only the order within a
    /// run is promised.
    pub fn push_event(&mut self, run: RunId, seq: u64, json: String) {
        let class = classify(&json);
        if class == Class::Partial {
            let latest = self.queue.iter_mut().rev().find(|e| e.run() == Some(run));
            if let Some(Entry::Chunks(chunks)) = latest {
                if chunks.absorb(seq, &json) {
                    return;
                }
            }
            self.queue.push_back(Entry::Chunks(Chunks {
                run,
                first_seq: seq,
                last_seq: seq,
                original: json,
                merged: None,
            }));
            return;
        }
        self.queue.push_back(Entry::Frame {
            run: Some(run),
            class,
            text: json,
        });
    }

    /// When the next frame may leave (at or before `now`: at once); `None` if nothing waits.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        let class = self.queue.front()?.class();
        let Some(last) = self.last_sent else {
            return Some(now);
        };
        let gap = match class {
            Class::Final => self.pacing.final_gap.max(self.pacing.frame_gap),
            Class::Other | Class::Partial => self.pacing.frame_gap,
        };
        let mut due = last + gap;
        if class == Class::Partial {
            if let Some(partial) = self.last_partial_sent {
                due = due.max(partial + self.pacing.partial_gap);
            }
        }
        Some(due)
    }

    /// Takes the next frame if it may leave at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Ready> {
        if self.next_due(now)? > now {
            return None;
        }
        let entry = self.queue.pop_front()?;
        let class = entry.class();
        // Leaving now; [`Self::sent`] moves this to when the write has finished.
        self.sent(class, now);
        let text = match entry {
            Entry::Frame { text, .. } => text,
            Entry::Chunks(chunks) => chunks.into_text(),
        };
        Some(Ready { text, class })
    }

    /// Records that a frame of `class` finished leaving at `at`: the next gap counts from
    /// here, so a slow write never shortens it.
    pub fn sent(&mut self, class: Class, at: Instant) {
        self.last_sent = Some(at);
        if class == Class::Partial {
            self.last_partial_sent = Some(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MS: Duration = Duration::from_millis(1);

    fn pacing() -> Pacing {
        Pacing::from_settings(&LegacyClientSettings::default())
    }

    fn event(run: RunId, seq: u64, kind: &str, agent: &str, content: Option<&str>) -> String {
        let mut payload = json!({"message_id": format!("{run}-{seq}")});
        if let Some(content) = content {
            payload["content"] = json!(content);
            payload["is_complete"] = json!(false);
        }
        json!({
            "type": kind, "seq": seq, "run_id": run.to_string(), "thread_id": "t",
            "user_id": "u", "agent_name": agent, "timestamp": format!("ts-{seq}"),
            "payload": payload,
        })
        .to_string()
    }

    /// A whole successful run as the supervisor emits it: 23 step frames, `chunks`
    /// answer chunks, the reporting agent's completion, `final_report`, the terminal.
    fn run_events(run: RunId, chunks: usize) -> Vec<(u64, String)> {
        let mut events = vec![];
        let mut seq = 0;
        let mut push = |kind: &str, agent: &str, content: Option<String>| {
            seq += 1;
            events.push((seq, event(run, seq, kind, agent, content.as_deref())));
        };
        push("agent_started", "supervisor", None);
        for agent in ["triage", "data", "optimization", "actions"] {
            push("agent_started", agent, None);
            push("agent_thinking", agent, None);
            push("tool_executing", agent, None);
            push("tool_completed", agent, None);
            push("agent_completed", agent, None);
        }
        push("agent_started", "reporting", None);
        push("agent_thinking", "reporting", None);
        for i in 0..chunks {
            push("partial_result", "reporting", Some(format!("c{i} ")));
        }
        push("agent_completed", "reporting", None);
        push("final_report", "supervisor", None);
        push("agent_completed", "supervisor", None);
        events
    }

    /// Drives `outbox` like the connection task: each input is pushed at its time, each
    /// frame sent as soon as it is due (writes take no time). Returns (sent at, frame).
    fn drive(
        outbox: &mut Outbox,
        start: Instant,
        inputs: Vec<(Duration, RunId, u64, String)>,
    ) -> Vec<(Instant, Value)> {
        let mut inputs: VecDeque<_> = inputs.into();
        let mut now = start;
        let mut out = vec![];
        loop {
            let next_input = inputs.front().map(|(at, ..)| start + *at);
            let next_send = outbox.next_due(now).map(|due| due.max(now));
            now = match (next_input, next_send) {
                (None, None) => return out,
                (Some(input), Some(send)) => input.min(send),
                (Some(at), None) | (None, Some(at)) => at,
            };
            while inputs.front().is_some_and(|(at, ..)| start + *at <= now) {
                let (_, run, seq, json) = inputs.pop_front().unwrap();
                outbox.push_event(run, seq, json);
            }
            if let Some(ready) = outbox.pop_due(now) {
                outbox.sent(ready.class, now);
                out.push((now, serde_json::from_str(&ready.text).unwrap()));
            }
        }
    }

    fn gap(a: Instant, b: Instant) -> Duration {
        b.duration_since(a)
    }

    /// Every seq of the run is covered exactly once, in order: each frame stands for
    /// `first_seq..=seq` (just `seq` when it was not coalesced).
    fn assert_covers(frames: &[&Value], last: u64) {
        let mut expected = 1;
        for frame in frames {
            let seq = frame["seq"].as_u64().unwrap();
            let first = frame
                .get("first_seq")
                .and_then(Value::as_u64)
                .unwrap_or(seq);
            assert_eq!(first, expected, "no seq skipped or repeated: {frame}");
            assert!(seq >= first);
            assert_eq!(
                frame["payload"]["message_id"],
                format!("{}-{seq}", frame["run_id"].as_str().unwrap())
            );
            expected = seq + 1;
        }
        assert_eq!(expected, last + 1);
    }

    #[test]
    fn a_burst_leaves_spaced_with_every_step_frame_and_the_answer_whole() {
        let run = RunId::generate();
        let events = run_events(run, 40);
        let last = events.len() as u64;
        let steps: Vec<String> = events
            .iter()
            .map(|(_, json)| serde_json::from_str::<Value>(json).unwrap())
            .filter(|e| e["type"] != "partial_result")
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect();
        let mut outbox = Outbox::new(pacing());
        let start = Instant::now();
        // The whole run at one instant: the worst burst there is.
        let inputs = events
            .into_iter()
            .map(|(seq, json)| (Duration::ZERO, run, seq, json))
            .collect();
        let out = drive(&mut outbox, start, inputs);

        for pair in out.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            assert!(
                gap(before.0, after.0) >= 15 * MS,
                "frames at least 15 ms apart"
            );
            let kind = after.1["type"].as_str().unwrap();
            if kind == "final_report"
                || after.1["agent_name"] == "supervisor" && kind == "agent_completed"
            {
                assert!(
                    gap(before.0, after.0) >= 100 * MS,
                    "{kind} 100 ms after the frame before"
                );
            }
        }
        let partials: Vec<_> = out
            .iter()
            .filter(|(_, f)| f["type"] == "partial_result")
            .collect();
        for pair in partials.windows(2) {
            assert!(gap(pair[0].0, pair[1].0) >= PARTIAL_GAP);
        }
        let sent_steps: Vec<String> = out
            .iter()
            .filter(|(_, f)| f["type"] != "partial_result")
            .map(|(_, f)| f["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(sent_steps, steps, "every step frame, in order, none merged");
        // Queued together, the chunks leave as one frame.
        assert_eq!(partials.len(), 1);
        let answer: String = (0..40).map(|i| format!("c{i} ")).collect();
        assert_eq!(partials[0].1["payload"]["content"], answer.as_str());
        assert_eq!(partials[0].1["payload"]["is_complete"], false);
        // Seqs 1-23 are the steps before the answer; the 40 chunks are 24-63.
        assert_contains_seq_range(&partials[0].1, 24, 63);
        let frames: Vec<&Value> = out.iter().map(|(_, f)| f).collect();
        assert_covers(&frames, last);
    }

    fn assert_contains_seq_range(frame: &Value, first: u64, last: u64) {
        assert_eq!(frame["first_seq"], first);
        assert_eq!(frame["seq"], last);
        assert_eq!(frame["timestamp"], format!("ts-{last}"));
    }

    #[test]
    fn streamed_chunks_reach_the_client_about_thirty_times_a_second_and_in_full() {
        let run = RunId::generate();
        let mut outbox = Outbox::new(pacing());
        let start = Instant::now();
        // A chunk every 2 ms for 600 ms (300 chunks).
        let inputs: Vec<_> = (1..=300u64)
            .map(|seq| {
                let json = event(
                    run,
                    seq,
                    "partial_result",
                    "reporting",
                    Some(&format!("{seq},")),
                );
                (2 * MS * seq as u32, run, seq, json)
            })
            .collect();
        let out = drive(&mut outbox, start, inputs);
        assert!(out.len() <= 21, "{} frames for 600 ms", out.len());
        assert!(
            out.len() >= 10,
            "chunks are not held back longer than needed"
        );
        for pair in out.windows(2) {
            assert!(gap(pair[0].0, pair[1].0) >= PARTIAL_GAP);
        }
        let text: String = out
            .iter()
            .map(|(_, f)| f["payload"]["content"].as_str().unwrap())
            .collect();
        let expected: String = (1..=300).map(|seq| format!("{seq},")).collect();
        assert_eq!(text, expected);
        let frames: Vec<&Value> = out.iter().map(|(_, f)| f).collect();
        assert_covers(&frames, 300);
        // A frame that is a single chunk is sent exactly as emitted.
        let first = event(run, 1, "partial_result", "reporting", Some("1,"));
        assert_eq!(out[0].1, serde_json::from_str::<Value>(&first).unwrap());
    }

    #[test]
    fn chunks_join_only_their_own_runs_latest_frame_when_seqs_follow_on() {
        let (a, b) = (RunId::generate(), RunId::generate());
        let mut outbox = Outbox::new(pacing());
        let chunk = |run, seq| {
            event(
                run,
                seq,
                "partial_result",
                "reporting",
                Some(&format!("{seq}")),
            )
        };
        outbox.push_event(a, 5, chunk(a, 5));
        outbox.push_event(b, 9, chunk(b, 9));
        outbox.push_control(r#"{"type":"pong"}"#.into());
        outbox.push_event(a, 6, chunk(a, 6)); // joins a's waiting chunk past b and the pong
        outbox.push_event(b, 11, chunk(b, 11)); // not 10: stays apart
        outbox.push_event(a, 7, event(a, 7, "agent_completed", "reporting", None));
        outbox.push_event(a, 8, chunk(a, 8)); // a step of a came between: stays apart
        let now = Instant::now() + Duration::from_secs(60);
        let mut frames = vec![];
        while let Some(ready) = outbox.pop_due(now) {
            frames.push(serde_json::from_str::<Value>(&ready.text).unwrap());
            outbox.sent(ready.class, Instant::now());
        }
        let shape: Vec<(String, u64, String)> = frames
            .iter()
            .map(|f| {
                (
                    f["type"].as_str().unwrap().to_string(),
                    f["seq"].as_u64().unwrap_or(0),
                    f["payload"]["content"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let row = |t: &str, s, c: &str| (t.to_string(), s, c.to_string());
        assert_eq!(
            shape,
            vec![
                row("partial_result", 6, "56"),
                row("partial_result", 9, "9"),
                row("pong", 0, ""),
                row("partial_result", 11, "11"),
                row("agent_completed", 7, ""),
                row("partial_result", 8, "8"),
            ]
        );
        assert_eq!(frames[0]["first_seq"], 5);
        assert!(frames[1].get("first_seq").is_none());
    }

    #[test]
    fn the_first_frame_leaves_at_once_and_gaps_count_from_the_end_of_a_write() {
        let run = RunId::generate();
        let mut outbox = Outbox::new(pacing());
        let start = Instant::now();
        assert_eq!(outbox.next_due(start), None);
        outbox.push_control("{\"type\":\"connection_established\"}".into());
        outbox.push_event(run, 1, event(run, 1, "agent_started", "supervisor", None));
        outbox.push_event(run, 2, event(run, 2, "error", "supervisor", None));
        let ready = outbox.pop_due(start).expect("first frame at once");
        assert!(outbox.pop_due(start).is_none(), "the next waits");
        // The write took 40 ms: the next gap counts from its end.
        outbox.sent(ready.class, start + 40 * MS);
        assert_eq!(outbox.next_due(start), Some(start + 55 * MS));
        let ready = outbox.pop_due(start + 55 * MS).unwrap();
        outbox.sent(ready.class, start + 55 * MS);
        assert_eq!(
            outbox.next_due(start),
            Some(start + 155 * MS),
            "error waits 100 ms"
        );
        assert!(outbox.has_room());
    }

    #[test]
    fn an_oversized_gap_setting_still_spaces_partials_at_least_as_far() {
        let settings = LegacyClientSettings {
            frame_gap: 50 * MS,
            ..LegacyClientSettings::default()
        };
        let pacing = Pacing::from_settings(&settings);
        assert_eq!(pacing.partial_gap, 50 * MS);
        assert_eq!(
            Pacing::from_settings(&LegacyClientSettings::default()).partial_gap,
            PARTIAL_GAP
        );
    }
}
