//! Reporting: assembles the structured report and has the LLM write the answer, streamed
//! to the user as `partial_result` events while it is generated.
//!
//! The prompt gives the model the figures the tools computed (the template writer's
//! rendering of the report) and asks it to quote them. Numbers must come from the tools:
//! a [`FigureGuard`] checks every dollar amount as it streams and holds back an amount until
//! it is complete, so an invented figure (in particular a spend total different from the
//! tool's) never reaches the user. When the configured provider fails or its answer is
//! rejected, the agent says so in an `agent_thinking` note and writes the answer with the
//! template writer instead; the run still completes and `final_response` is that answer.

use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{Agent, AgentContext, AgentError, RequestCategory, RunState};
use crate::llm::template::render;
use crate::llm::{ChatMessage, LlmError, LlmProvider, LlmRequest};
use apex_protocol::events::EventBody;

pub struct ReportingAgent;

/// Longest answer asked of a model.
const MAX_ANSWER_TOKENS: u32 = 320;

/// The structured report; also what the template writer renders.
pub fn build_report(state: &RunState) -> Value {
    let usage = state.usage.as_ref();
    let savings: f64 = state
        .opportunities
        .iter()
        .map(|o| o.monthly_savings_usd)
        .sum();
    json!({
        "request": state.request,
        "category": state.triage.as_ref().map_or(RequestCategory::General, |t| t.category),
        "days": state.triage.as_ref().map(|t| t.days),
        "models_asked_about": state.triage.as_ref().map(|t| t.models.clone()).unwrap_or_default(),
        "usage": usage.map(|u| json!({
            "days": u.days,
            "total_requests": u.total_requests,
            "error_requests": u.error_requests,
            "total_prompt_tokens": u.total_prompt_tokens,
            "total_completion_tokens": u.total_completion_tokens,
            "total_cost_usd": u.total_cost_usd,
            "latency_ms": u.latency_ms,
            "top_models": u.by_model.iter().take(3).collect::<Vec<_>>(),
            "top_workloads": u.by_workload.iter().take(3).collect::<Vec<_>>(),
        })),
        "recommendations": state.opportunities,
        "potential_monthly_savings_usd": (savings * 100.0).round() / 100.0,
        "action_plan": state.plan,
    })
}

/// The messages for a language model: the computed figures, then the user's question.
pub fn report_prompt(request: &str, report: &Value) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system(
            "You are Apex, an AI cost and usage analyst. Answer the user's question in a few \
             short sentences using only the figures in the analysis below. Quote dollar amounts \
             exactly as written there and never state any other number.",
        ),
        ChatMessage::user(format!(
            "Analysis of my usage:\n{}\nQuestion: {request}",
            render(report)
        )),
    ]
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

impl ReportingAgent {
    /// Streams `provider`'s answer to the user, checked by the guard. Text already shown
    /// stays in `state.answer`.
    async fn stream_answer(
        &self,
        cx: &AgentContext,
        provider: &dyn LlmProvider,
        request: LlmRequest,
        mut guard: Option<FigureGuard>,
        state: &mut RunState,
    ) -> Result<(), AgentError> {
        let mut stream = provider
            .stream(request, cx.ctx.cancellation().clone())
            .await?;
        loop {
            let (chunk, last) = match stream.next().await {
                Some(chunk) => (chunk?, false),
                None => (String::new(), true),
            };
            let text = match guard.as_mut() {
                Some(guard) if last => guard.finish()?,
                Some(guard) => guard.push(&chunk)?,
                None => chunk,
            };
            if !text.is_empty() {
                state.answer.push_str(&text);
                cx.emitter
                    .emit(self.name(), EventBody::PartialResult { content: text })
                    .await?;
            }
            if last {
                return Ok(());
            }
        }
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
        let fallback_request = LlmRequest::new(
            report_prompt(&state.request, &report),
            report.clone(),
            MAX_ANSWER_TOKENS,
        );
        let tokens = fallback_request.tokens.clone();
        let llm_started = std::time::Instant::now();
        let mut provider = cx.llm.name().to_string();
        let mut fallback_reason = None;
        if cx.has_model() {
            let guard = FigureGuard::new(&report);
            match self
                .stream_answer(
                    cx,
                    cx.llm.as_ref(),
                    fallback_request.clone(),
                    Some(guard),
                    state,
                )
                .await
            {
                Ok(()) if !state.answer.trim().is_empty() => {}
                Ok(()) => fallback_reason = Some("it gave an empty answer".to_string()),
                Err(AgentError::Llm(LlmError::Cancelled)) => {
                    return Err(AgentError::Llm(LlmError::Cancelled))
                }
                Err(AgentError::Llm(err)) => fallback_reason = Some(err.to_string()),
                Err(other) => return Err(other),
            }
        }
        if let Some(reason) = &fallback_reason {
            tracing::warn!(provider = cx.llm.name(), %reason, "falling back to the template writer");
            cx.think(
                self.name(),
                format!(
                    "The {} model's answer could not be used ({reason}); writing the answer \
                     from the template instead",
                    cx.llm.name()
                ),
                1,
                1,
            )
            .await?;
            if !state.answer.is_empty() {
                // Separate the abandoned text from the answer that replaces it.
                cx.emitter
                    .emit(
                        self.name(),
                        EventBody::PartialResult {
                            content: "\n\n".into(),
                        },
                    )
                    .await?;
            }
            state.answer.clear();
            provider = cx.fallback.name().to_string();
        }
        if !cx.has_model() || fallback_reason.is_some() {
            self.stream_answer(cx, cx.fallback.as_ref(), fallback_request, None, state)
                .await?;
        }
        // The tokens are the configured provider's (the template writer counts none).
        let usage = tokens.get();
        cx.record_llm_usage(
            self.name(),
            cx.llm.as_ref(),
            usage,
            llm_started.elapsed(),
            fallback_reason.is_none(),
        )
        .await;
        state.report = Some(report);
        let mut result = json!({
            "characters": state.answer.chars().count(),
            "provider": provider,
            "model": cx.llm.model_name(),
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
        });
        if let Some(reason) = fallback_reason {
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
