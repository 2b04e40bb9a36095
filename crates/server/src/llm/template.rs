//! `TemplateWriter`: the deterministic fallback provider.
//!
//! It is not a language model: it fills a fixed template with the structured facts the
//! agents computed (the report), so answers are exact, reproducible and need no model.
//! Text is streamed in small chunks with a short delay, like a model would.

use std::fmt::Write as _;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{LlmError, LlmProvider, LlmRequest, TextStream};

pub struct TemplateWriter {
    chunk_delay: Duration,
}

impl TemplateWriter {
    pub fn new(chunk_delay: Duration) -> Self {
        Self { chunk_delay }
    }
}

fn money(v: f64) -> String {
    format!("${v:.2}")
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn thousands(n: i64) -> String {
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// Renders the reporting agent's report as the answer text.
pub fn render(facts: &Value) -> String {
    let mut out = String::new();
    let usage = &facts["usage"];
    let days = usage["days"].as_u64().unwrap_or(30);
    let requests = usage["total_requests"].as_i64().unwrap_or(0);
    if requests == 0 {
        let _ = writeln!(
            out,
            "I found no AI usage in your account for the last {days} days, so there is nothing to \
             analyse yet. Upload your usage with POST /api/usage/events (JSON or CSV) and ask again."
        );
        return out;
    }
    let total = num(&usage["total_cost_usd"]);
    let _ = writeln!(
        out,
        "Over the last {days} days you made {} LLM requests costing {} in total ({} prompt and {} completion tokens).",
        thousands(requests),
        money(total),
        thousands(usage["total_prompt_tokens"].as_i64().unwrap_or(0)),
        thousands(usage["total_completion_tokens"].as_i64().unwrap_or(0)),
    );
    if let Some(top) = usage["top_models"].as_array().and_then(|m| m.first()) {
        let cost = num(&top["cost_usd"]);
        let share = if total > 0.0 {
            cost / total * 100.0
        } else {
            0.0
        };
        let _ = write!(
            out,
            "Most of it goes to {} ({}, {share:.0}% of spend)",
            top["model"].as_str().unwrap_or("?"),
            money(cost)
        );
        if let Some(w) = usage["top_workloads"].as_array().and_then(|w| w.first()) {
            let _ = write!(
                out,
                ", and your most expensive workload is {} ({})",
                w["workload"].as_str().unwrap_or("?"),
                money(num(&w["cost_usd"]))
            );
        }
        out.push_str(".\n");
    }
    let latency = &usage["latency_ms"];
    let _ = writeln!(
        out,
        "Latency: p50 {} ms, p95 {} ms, p99 {} ms; {} requests failed.",
        latency["p50"], latency["p95"], latency["p99"], usage["error_requests"]
    );

    let recommendations = facts["recommendations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if recommendations.is_empty() {
        out.push_str(
            "\nI found no clear savings: your traffic already uses cost-efficient settings.\n",
        );
    } else {
        let _ = writeln!(
            out,
            "\nYou could save about {} per month:",
            money(num(&facts["potential_monthly_savings_usd"]))
        );
        for (i, r) in recommendations.iter().enumerate() {
            let _ = writeln!(
                out,
                "{}. {}: about {}/month ({} effort). {}",
                i + 1,
                r["title"].as_str().unwrap_or(""),
                money(num(&r["monthly_savings_usd"])),
                r["effort"].as_str().unwrap_or("?"),
                r["description"].as_str().unwrap_or(""),
            );
        }
    }
    if let Some(plan) = facts["action_plan"].as_array().filter(|p| !p.is_empty()) {
        out.push_str("\nNext steps:\n");
        for step in plan {
            let _ = writeln!(
                out,
                "{}. {} ({} effort)",
                step["order"],
                step["title"].as_str().unwrap_or(""),
                step["effort"].as_str().unwrap_or("?")
            );
        }
    }
    out
}

/// Splits text into chunks of a few words, keeping every character (spaces, newlines).
fn chunks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut words = 0;
    for c in text.chars() {
        current.push(c);
        if c == ' ' || c == '\n' {
            words += 1;
            if words == 4 || c == '\n' {
                out.push(std::mem::take(&mut current));
                words = 0;
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[async_trait]
impl LlmProvider for TemplateWriter {
    fn name(&self) -> &str {
        "template"
    }

    async fn stream(
        &self,
        request: LlmRequest,
        cancel: CancellationToken,
    ) -> Result<TextStream, LlmError> {
        let parts = chunks(&render(&request.facts));
        let delay = self.chunk_delay;
        let stream = futures_util::stream::unfold(
            (parts.into_iter(), cancel, true),
            move |(mut parts, cancel, first)| async move {
                let part = parts.next()?;
                if !first && !delay.is_zero() {
                    tokio::select! {
                        _ = cancel.cancelled() => return Some((Err(LlmError::Cancelled), (parts, cancel, false))),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                if cancel.is_cancelled() {
                    return Some((Err(LlmError::Cancelled), (parts, cancel, false)));
                }
                Some((Ok(part), (parts, cancel, false)))
            },
        );
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_the_text_intact() {
        let text = "one two three four five\nsix  seven";
        assert_eq!(chunks(text).concat(), text);
    }

    #[test]
    fn renders_the_users_numbers() {
        let facts = serde_json::json!({
            "usage": {"days": 30, "total_requests": 1234, "total_cost_usd": 56.789,
                      "total_prompt_tokens": 1000, "total_completion_tokens": 10,
                      "error_requests": 3, "latency_ms": {"p50": 1, "p95": 2, "p99": 3},
                      "top_models": [{"model": "gpt-4o", "cost_usd": 50.0}], "top_workloads": []},
            "recommendations": [], "potential_monthly_savings_usd": 0.0, "action_plan": []
        });
        let text = render(&facts);
        assert!(text.contains("1,234 LLM requests costing $56.79"), "{text}");
        assert!(text.contains("gpt-4o"));
    }
}
