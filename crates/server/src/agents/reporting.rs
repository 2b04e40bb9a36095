//! Reporting: assembles the structured report and has the LLM write the answer, streamed
//! to the user as `partial_result` events while it is generated.

use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{Agent, AgentContext, AgentError, RequestCategory, RunState};
use crate::llm::{ChatMessage, LlmRequest};
use apex_protocol::events::EventBody;

pub struct ReportingAgent;

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

#[async_trait]
impl Agent for ReportingAgent {
    fn name(&self) -> &'static str {
        "reporting"
    }

    async fn run(&self, cx: &AgentContext, state: &mut RunState) -> Result<Value, AgentError> {
        cx.think(self.name(), "Writing the answer from your numbers", 1, 1)
            .await?;
        let report = build_report(state);
        let request = LlmRequest {
            messages: vec![
                ChatMessage {
                    role: "system".into(),
                    content:
                        "You are Apex, an AI cost and usage analyst. Answer from the facts given; \
                              never invent numbers."
                            .into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: state.request.clone(),
                },
            ],
            facts: report.clone(),
            max_tokens: 800,
        };
        let llm_started = std::time::Instant::now();
        let mut stream = cx
            .llm
            .stream(request, cx.ctx.cancellation().clone())
            .await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if chunk.is_empty() {
                continue;
            }
            state.answer.push_str(&chunk);
            cx.emitter
                .emit(self.name(), EventBody::PartialResult { content: chunk })
                .await?;
        }
        // The template writer counts no tokens; model providers report theirs.
        crate::telemetry::llm_request(cx.llm.name(), llm_started.elapsed(), 0, 0);
        state.report = Some(report);
        Ok(json!({ "characters": state.answer.chars().count(), "provider": cx.llm.name() }))
    }
}
