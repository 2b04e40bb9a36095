//! Reporting: assembles the structured report and writes the answer from it, streamed to
//! the user as `partial_result` events while it is written (chunks written within
//! [`PARTIAL_RESULT_GAP`] of each other leave as one event).
//!
//! The answer is laid out by [`super::answer::compose`]: fixed text built from the report's
//! figures, and a few slots of prose the configured model writes (a summary, a short why per
//! recommendation). Each slot is generated on its own with a bound, stop sequences and the
//! repetition controls, then checked ([`super::answer::check_slot`] and the [`FigureGuard`]:
//! no loop, no echo, no figure that is not the tools'). A slot whose text fails the check, or
//! whose model fails, gets its template wording instead, and an `agent_thinking` note says
//! so. With the template writer configured every slot has its template wording. So whatever
//! writes the prose, the answer states the user's figures; the run completes and
//! `final_response` is the answer as streamed.

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::{sleep_until, Instant};

use super::answer::{self, check_slot, compose, fixed_text, placed, Part, Slot, SlotProblem};
use super::{Agent, AgentContext, AgentError, RequestCategory, RunState};
use crate::llm::{LlmError, LlmRequest, Repetition, TokenMeter};
use apex_protocol::events::EventBody;

pub struct ReportingAgent;

/// Least time between two `partial_result` events of a run's answer (about 60 a second, a
/// screen's refresh): chunks written faster are sent together (see `PartialResults`). The
/// answer's first chunk leaves at once and its last is not held.
pub const PARTIAL_RESULT_GAP: Duration = Duration::from_millis(16);

/// What the report says about the models and workloads the question names, and the plan
/// step it asks about, with the names the data does show (for an honest "not in your data").
fn focus(state: &RunState) -> Value {
    let triage = state.triage.as_ref();
    let usage = state.usage.as_ref();
    let models: Vec<Value> = triage
        .map(|t| t.models.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|name| {
            let found = usage.and_then(|u| {
                let rows: Vec<_> = u
                    .by_model
                    .iter()
                    .filter(|m| m.model.eq_ignore_ascii_case(name))
                    .collect();
                (!rows.is_empty()).then(|| {
                    json!({
                        "name": name, "found": true,
                        "cost_usd": rows.iter().map(|m| m.cost_usd).sum::<f64>(),
                        "requests": rows.iter().map(|m| m.requests).sum::<i64>(),
                        "prompt_tokens": rows.iter().map(|m| m.prompt_tokens).sum::<i64>(),
                        "completion_tokens": rows.iter().map(|m| m.completion_tokens).sum::<i64>(),
                    })
                })
            });
            found.unwrap_or_else(|| json!({"name": name, "found": false}))
        })
        .collect();
    let workloads: Vec<Value> = triage
        .map(|t| t.workloads.as_slice())
        .unwrap_or_default()
        .iter()
        .map(
            |name| match usage.and_then(|u| u.by_workload.iter().find(|w| &w.workload == name)) {
                Some(w) => json!({
                    "name": name, "found": true, "cost_usd": w.cost_usd, "requests": w.requests,
                    "prompt_tokens": w.prompt_tokens, "completion_tokens": w.completion_tokens,
                }),
                None => json!({"name": name, "found": false}),
            },
        )
        .collect();
    let mut known_models: Vec<&str> = Vec::new();
    for m in usage.map(|u| u.by_model.as_slice()).unwrap_or_default() {
        if !known_models.contains(&m.model.as_str()) {
            known_models.push(&m.model);
        }
    }
    json!({
        "models": models,
        "workloads": workloads,
        "step": triage.and_then(|t| t.step),
        "known_models": known_models,
        "known_workloads": usage.map(|u| u.by_workload.iter().map(|w| w.workload.clone()).collect::<Vec<_>>()).unwrap_or_default(),
    })
}

/// The structured report (`payload.result` of the terminal event); the answer is composed
/// from it.
pub fn build_report(state: &RunState) -> Value {
    let usage = state.usage.as_ref();
    let savings = super::total_savings(&state.opportunities);
    json!({
        "request": state.request,
        "category": state.triage.as_ref().map_or(RequestCategory::General, |t| t.category),
        "days": state.triage.as_ref().map(|t| t.days),
        "ends_days_ago": state.triage.as_ref().map_or(0, |t| t.ends_days_ago),
        "models_asked_about": state.triage.as_ref().map(|t| t.models.clone()).unwrap_or_default(),
        "workloads_asked_about": state.triage.as_ref().map(|t| t.workloads.clone()).unwrap_or_default(),
        "follow_up": state.triage.as_ref().is_some_and(|t| t.follow_up),
        "focus": focus(state),
        "usage": usage.map(|u| json!({
            "days": u.days,
            "total_requests": u.total_requests,
            "error_requests": u.error_requests,
            "total_prompt_tokens": u.total_prompt_tokens,
            "total_completion_tokens": u.total_completion_tokens,
            "total_cached_tokens": u.total_cached_tokens,
            "total_cost_usd": u.total_cost_usd,
            // Where the figures came from: names and request counts (the costs are in the
            // totals already).
            "sources": u.by_source.iter()
                .map(|s| json!({"source": s.source, "requests": s.requests}))
                .collect::<Vec<_>>(),
            "latency_ms": u.latency_ms,
            "top_models": u.by_model.iter().take(3).collect::<Vec<_>>(),
            "top_workloads": u.by_workload.iter().take(3).collect::<Vec<_>>(),
        })),
        "recommendations": state.opportunities,
        "potential_monthly_savings_usd": (savings * 100.0).round() / 100.0,
        "action_plan": state.plan,
    })
}

/// Every dollar figure the report contains, in cents.
fn report_figures(report: &Value) -> Vec<i64> {
    fn collect(value: &Value, key: Option<&str>, out: &mut Vec<i64>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    collect(v, Some(k), out);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| collect(v, key, out)),
            Value::Number(n) if key.is_some_and(|k| k.ends_with("_usd")) => {
                if let Some(v) = n.as_f64() {
                    out.push((v * 100.0).round() as i64);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    collect(report, None, &mut out);
    out
}

/// Checks dollar amounts in streamed text against the report's figures, releasing text
/// only once every amount in it has been checked.
pub struct FigureGuard {
    figures: Vec<i64>,
    total_cents: Option<i64>,
    pending: String,
}

impl FigureGuard {
    pub fn new(report: &Value) -> Self {
        Self {
            figures: report_figures(report),
            total_cents: report["usage"]["total_cost_usd"]
                .as_f64()
                .map(|v| (v * 100.0).round() as i64),
            pending: String::new(),
        }
    }

    /// Is `$amount` one of the figures (to the cent, or rounded to whole dollars)?
    fn allowed(&self, amount: &str) -> bool {
        let digits: String = amount.chars().filter(|c| *c != ',').collect();
        let Ok(value) = digits.parse::<f64>() else {
            return false;
        };
        let cents = (value * 100.0).round() as i64;
        let whole = !digits.contains('.');
        self.figures
            .iter()
            .any(|f| *f == cents || (whole && (*f as f64 / 100.0).round() as i64 * 100 == cents))
    }

    fn reject(&self, amount: &str) -> LlmError {
        let total = self
            .total_cents
            .map(|c| format!("; the computed total spend is ${:.2}", c as f64 / 100.0))
            .unwrap_or_default();
        LlmError::Rejected(format!(
            "it states ${amount}, which is not a figure the tools computed{total}"
        ))
    }

    /// Adds streamed text; returns the part that is safe to show now.
    pub fn push(&mut self, chunk: &str) -> Result<String, LlmError> {
        self.pending.push_str(chunk);
        self.release(false)
    }

    /// The end of the answer: checks and returns whatever is still held back.
    pub fn finish(&mut self) -> Result<String, LlmError> {
        self.release(true)
    }

    fn release(&mut self, at_end: bool) -> Result<String, LlmError> {
        let mut out = String::new();
        loop {
            let Some(dollar) = self.pending.find('$') else {
                out.push_str(&self.pending);
                self.pending.clear();
                return Ok(out);
            };
            out.push_str(&self.pending[..dollar]);
            let rest = &self.pending[dollar + 1..];
            let len = rest
                .char_indices()
                .find(|(_, c)| !(c.is_ascii_digit() || *c == ',' || *c == '.'))
                .map(|(i, _)| i);
            let len = match len {
                Some(len) => len,
                None if at_end => rest.len(),
                // The amount may continue in the next chunk: hold it back.
                None => {
                    self.pending.drain(..dollar);
                    return Ok(out);
                }
            };
            // A trailing '.' or ',' ends the sentence, not the number.
            let amount = rest[..len].trim_end_matches(['.', ',']);
            if amount.chars().any(|c| c.is_ascii_digit()) && !self.allowed(amount) {
                let err = self.reject(amount);
                self.pending.clear();
                return Err(err);
            }
            let end = dollar + 1 + amount.len();
            out.push('$');
            out.push_str(amount);
            self.pending.drain(..end);
        }
    }
}

/// Texts of the slots the model wrote and those that fell back, for the result.
#[derive(Default)]
struct SlotTally {
    written: Vec<String>,
    fell_back: Vec<Value>,
    /// The model failed (not just wrote something unusable): later slots skip it.
    provider_failed: Option<String>,
}

/// The answer's chunks on their way out as `partial_result` events, for the whole answer:
/// at most one event per [`PARTIAL_RESULT_GAP`], the first at once, later chunks held until
/// the gap has passed and then sent together.
///
/// Why one for the whole answer rather than one per passage: the answer is a dozen
/// passages (fixed text and slots), and a fast writer streams all of them within a few
/// milliseconds. Starting each passage afresh sent each passage's first chunk at once, so a
/// run carried about two dozen events where two or three say the same; each event is a
/// stored row and a frame to every socket of the user.
#[derive(Default)]
struct PartialResults {
    /// Written, not yet sent.
    held: String,
    /// When the last `partial_result` left.
    last_sent: Option<Instant>,
}

impl PartialResults {
    /// When held text may leave: at once if nothing was sent yet.
    fn due(&self) -> Option<Instant> {
        self.last_sent.map(|at| at + PARTIAL_RESULT_GAP)
    }

    /// Adds `chunk` and sends what is held if the gap has passed.
    async fn push(
        &mut self,
        agent: &ReportingAgent,
        cx: &AgentContext,
        chunk: &str,
    ) -> Result<(), AgentError> {
        self.held.push_str(chunk);
        if self.due().is_none_or(|due| Instant::now() >= due) {
            self.send(agent, cx).await?;
        }
        Ok(())
    }

    /// Sends what is held, now.
    async fn send(&mut self, agent: &ReportingAgent, cx: &AgentContext) -> Result<(), AgentError> {
        if self.held.is_empty() {
            return Ok(());
        }
        agent.send_chunk(cx, std::mem::take(&mut self.held)).await?;
        self.last_sent = Some(Instant::now());
        Ok(())
    }

    /// Sends what is held once the gap has passed (at most [`PARTIAL_RESULT_GAP`] from now):
    /// before something slow (a model writing a slot), so the user is not left without the
    /// text already written while it runs.
    async fn send_when_due(
        &mut self,
        agent: &ReportingAgent,
        cx: &AgentContext,
    ) -> Result<(), AgentError> {
        if self.held.is_empty() {
            return Ok(());
        }
        if let Some(due) = self.due() {
            sleep_until(due).await;
        }
        self.send(agent, cx).await
    }
}

impl ReportingAgent {
    /// Streams fixed text through the template writer (same chunking and pacing as any
    /// streamed answer) and adds it to the answer. What is still held when the text ends
    /// leaves with the next passage's chunks, or at the end of the answer.
    async fn stream_fixed(
        &self,
        cx: &AgentContext,
        text: String,
        state: &mut RunState,
        out: &mut PartialResults,
    ) -> Result<(), AgentError> {
        if text.is_empty() {
            return Ok(());
        }
        let request = LlmRequest::new(Vec::new(), Value::String(text), 0);
        let mut stream = cx
            .fallback
            .stream(request, cx.ctx.cancellation().clone())
            .await?;
        loop {
            let due = out.due();
            tokio::select! {
                biased;
                _ = sleep_until(due.unwrap_or_else(Instant::now)), if !out.held.is_empty() => {
                    out.send(self, cx).await?;
                }
                next = stream.next() => {
                    let Some(chunk) = next else { break };
                    let chunk = chunk?;
                    if chunk.is_empty() {
                        continue;
                    }
                    state.answer.push_str(&chunk);
                    out.push(self, cx, &chunk).await?;
                }
            }
        }
        Ok(())
    }

    /// Emits one `partial_result` event with `content`.
    async fn send_chunk(&self, cx: &AgentContext, content: String) -> Result<(), AgentError> {
        cx.emitter
            .emit(self.name(), EventBody::PartialResult { content })
            .await?;
        Ok(())
    }

    /// The model's text for one slot, bounded and cut at the stop sequences.
    async fn generate_slot(
        &self,
        cx: &AgentContext,
        slot: &Slot,
        meter: &TokenMeter,
    ) -> Result<String, LlmError> {
        let prompt_chars = slot
            .messages
            .iter()
            .map(|m| m.content.chars().count())
            .sum();
        let held = cx.hold_budget(prompt_chars, slot.max_tokens).await?;
        let before = meter.get();
        let mut request = LlmRequest::new(slot.messages.clone(), Value::Null, slot.max_tokens);
        request.tokens = meter.clone();
        request.user = Some(cx.ctx.user_id());
        request.max_queue_wait = cx.llm_queue_wait;
        request.temperature = Some(0.0);
        request.repetition = Repetition::AGENT;
        request.stop = answer::SLOT_STOPS.iter().map(|s| s.to_string()).collect();
        let text = async {
            let mut stream = cx
                .llm
                .stream(request, cx.ctx.cancellation().clone())
                .await?;
            let mut text = String::new();
            while let Some(chunk) = stream.next().await {
                text.push_str(&chunk?);
            }
            Ok(text)
        }
        .await;
        // The meter counts the whole run's slots: this slot used the difference.
        let after = meter.get();
        let used = crate::llm::TokenUsage {
            prompt_tokens: after.prompt_tokens.saturating_sub(before.prompt_tokens),
            completion_tokens: after
                .completion_tokens
                .saturating_sub(before.completion_tokens),
        };
        cx.settle_budget(held, used).await;
        text
    }

    /// Writes one slot: the model's text if it passes the checks, else the template's.
    #[allow(clippy::too_many_arguments)]
    async fn write_slot(
        &self,
        cx: &AgentContext,
        slot: &Slot,
        facts: &str,
        report: &Value,
        meter: &TokenMeter,
        tally: &mut SlotTally,
        state: &mut RunState,
        out: &mut PartialResults,
    ) -> Result<(), AgentError> {
        let mut chosen = slot.fallback.clone();
        if cx.has_model() && tally.provider_failed.is_none() {
            // The model takes a while: the text written so far goes first.
            out.send_when_due(self, cx).await?;
            let problem = match self.generate_slot(cx, slot, meter).await {
                Err(LlmError::Cancelled) => return Err(AgentError::Llm(LlmError::Cancelled)),
                Err(LlmError::OverBudget(message)) => {
                    // Not a failure of the model: the user's own cap. Later slots skip it.
                    tally.provider_failed = Some(message);
                    Some("your budget has no room for the model".to_string())
                }
                Err(LlmError::Busy(message)) => {
                    // Other users' requests fill the model's queue: rather than wait,
                    // this and later slots are written without it.
                    tally.provider_failed = Some(message);
                    Some("the model is busy with other requests".to_string())
                }
                Err(err) => {
                    tracing::warn!(provider = cx.llm.name(), slot = %slot.name, error = %err, "the model failed to write a slot");
                    tally.provider_failed = Some(err.to_string());
                    Some(format!("the model failed ({})", err.reason()))
                }
                Ok(raw) => {
                    let prompt_facts: String =
                        slot.messages.iter().map(|m| m.content.as_str()).collect();
                    let checked = check_slot(
                        &raw,
                        slot,
                        &format!("{facts}\n{prompt_facts}"),
                        &state.request,
                    )
                    .and_then(|text| {
                        let mut guard = FigureGuard::new(report);
                        let guarded = guard.push(&text).and_then(|mut t| {
                            t.push_str(&guard.finish()?);
                            Ok(t)
                        });
                        guarded.map_err(|_| SlotProblem::UnknownFigure("a dollar amount".into()))
                    });
                    match checked {
                        Ok(text) => {
                            chosen = text;
                            tally.written.push(slot.name.clone());
                            None
                        }
                        Err(problem) => {
                            tracing::info!(slot = %slot.name, %problem, "a slot fell back to its template text");
                            Some(problem.to_string())
                        }
                    }
                }
            };
            if let Some(reason) = problem {
                tally
                    .fell_back
                    .push(json!({"slot": slot.name, "reason": reason}));
                cx.think(
                    self.name(),
                    format!(
                        "The {} model's text for the {} was not used ({reason}); using the template wording",
                        cx.llm.name(),
                        slot_words(&slot.name)
                    ),
                    1,
                    1,
                )
                .await?;
            }
        }
        self.stream_fixed(cx, placed(slot, &chosen), state, out)
            .await
    }
}

/// How a slot is named to the user.
fn slot_words(name: &str) -> String {
    match name {
        "summary" => "summary".into(),
        "why_step" => "explanation of the step".into(),
        other => match other.strip_prefix("why_") {
            Some(n) => format!("explanation of recommendation {n}"),
            None => other.to_string(),
        },
    }
}

#[async_trait]
impl Agent for ReportingAgent {
    fn name(&self) -> &'static str {
        "reporting"
    }

    async fn run(&self, cx: &AgentContext, state: &mut RunState) -> Result<Value, AgentError> {
        cx.think(self.name(), "Writing the answer from your numbers", 1, 1)
            .await?;
        let report = build_report(state);
        let parts = compose(&report, &state.request);
        let facts = fixed_text(&parts);
        let meter = TokenMeter::default();
        let started = std::time::Instant::now();
        let mut tally = SlotTally::default();
        let mut out = PartialResults::default();
        for part in &parts {
            match part {
                Part::Fixed(text) => self.stream_fixed(cx, text.clone(), state, &mut out).await?,
                Part::Slot(slot) => {
                    // Checked against the fixed text and the slots written before it.
                    let written = format!("{facts}\n{}", state.answer);
                    self.write_slot(
                        cx, slot, &written, &report, &meter, &mut tally, state, &mut out,
                    )
                    .await?
                }
            }
        }
        // The answer's last chunk is not held: the run ends now.
        out.send(self, cx).await?;
        let slots = parts.iter().filter(|p| matches!(p, Part::Slot(_))).count();
        let usage = meter.get();
        if cx.has_model() {
            cx.record_llm_usage(
                self.name(),
                cx.llm.as_ref(),
                usage,
                started.elapsed(),
                tally.provider_failed.is_none(),
            )
            .await;
        }
        state.report = Some(report);
        let provider = if cx.has_model() && !tally.written.is_empty() {
            cx.llm.name()
        } else {
            cx.fallback.name()
        };
        let mut result = json!({
            "characters": state.answer.chars().count(),
            "provider": provider,
            "model": cx.llm.model_name(),
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "slots": slots,
            "slots_by_model": tally.written,
        });
        if !tally.fell_back.is_empty() {
            result["slots_from_template"] = json!(tally.fell_back);
        }
        if let Some(reason) = tally.provider_failed {
            result["fallback_from"] = json!(cx.llm.name());
            result["fallback_reason"] = json!(reason);
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Value {
        json!({"usage": {"total_cost_usd": 1234.567, "top_models": [{"model": "gpt-4o", "cost_usd": 1000.0}]},
               "potential_monthly_savings_usd": 210.4, "recommendations": [{"monthly_savings_usd": 210.4}]})
    }

    #[test]
    fn the_guard_passes_the_tools_figures_across_chunks() {
        let mut guard = FigureGuard::new(&report());
        let mut out = guard.push("You spent $1,2").unwrap();
        assert_eq!(out, "You spent ", "an unfinished amount is held back");
        out += &guard
            .push("34.57 in total, $1,000 on gpt-4o; save $210.40.")
            .unwrap();
        out += &guard.finish().unwrap();
        assert_eq!(
            out,
            "You spent $1,234.57 in total, $1,000 on gpt-4o; save $210.40."
        );
    }

    #[test]
    fn the_guard_rejects_an_invented_total() {
        let mut guard = FigureGuard::new(&report());
        let shown = guard.push("Your total spend was $99").unwrap();
        assert_eq!(shown, "Your total spend was ");
        let err = guard.finish().unwrap_err();
        assert!(err.to_string().contains("$99"), "{err}");
        assert!(err.to_string().contains("$1234.57"), "{err}");
        let mut guard = FigureGuard::new(&report());
        assert!(guard.push("It cost $1,234.00 overall.").is_err());
    }
}
