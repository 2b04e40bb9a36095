//! Triage: what is the user asking about, which models, which time window.
//!
//! Keyword rules always work. With a language model configured (anything but the template
//! writer) and `llm_triage` on, triage asks the model first: with JSON-schema structured
//! output where the provider enforces it, by instruction and an example otherwise (the
//! embedded model). The answer is validated against [`triage_schema`] (category from the
//! fixed list, days in range, only models the pricing table knows and the request names)
//! and anything invalid falls back to the rules, saying so in the `agent_thinking` note.

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{Agent, AgentContext, AgentError, RequestCategory, RunState, Triage};
use crate::llm::{ChatMessage, LlmError, LlmRequest, ResponseSchema};
use crate::usage::pricing::PricingTable;
use crate::usage::{DEFAULT_WINDOW_DAYS, MAX_WINDOW_DAYS};

pub struct TriageAgent;

const RULES: &[(RequestCategory, &[&str])] = &[
    (
        RequestCategory::CostOptimization,
        &[
            "cost",
            "cheap",
            "spend",
            "save",
            "saving",
            "reduce",
            "bill",
            "price",
            "budget",
            "expensive",
            "money",
        ],
    ),
    (
        RequestCategory::LatencyPerformance,
        &[
            "latency",
            "slow",
            "fast",
            "speed",
            "performance",
            "p95",
            "p99",
            "timeout",
            "throughput",
        ],
    ),
    (
        RequestCategory::ModelSelection,
        &[
            "which model",
            "model choice",
            "switch",
            "compare",
            "best model",
            "alternative",
            "migrate",
        ],
    ),
    (
        RequestCategory::UsageReport,
        &[
            "usage",
            "report",
            "summary",
            "how much",
            "breakdown",
            "stats",
            "overview",
        ],
    ),
];

pub fn classify(text: &str) -> RequestCategory {
    let text = text.to_lowercase();
    RULES
        .iter()
        .map(|(category, words)| {
            (
                *category,
                words.iter().filter(|w| text.contains(*w)).count(),
            )
        })
        .filter(|(_, hits)| *hits > 0)
        // Highest score wins; on a tie the earlier rule (max_by_key keeps the last max).
        .rev()
        .max_by_key(|(_, hits)| *hits)
        .map(|(category, _)| category)
        .unwrap_or(RequestCategory::General)
}

/// Window from phrases like "last 14 days", "past week", "this month".
pub fn window_days(text: &str) -> u32 {
    let text = text.to_lowercase();
    let words: Vec<&str> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    for pair in words.windows(2) {
        if let (Ok(n), unit) = (pair[0].parse::<u32>(), pair[1]) {
            let days = match unit {
                "day" | "days" => Some(n),
                "week" | "weeks" => Some(n.saturating_mul(7)),
                "month" | "months" => Some(n.saturating_mul(30)),
                _ => None,
            };
            if let Some(days) = days {
                return days.clamp(1, MAX_WINDOW_DAYS);
            }
        }
    }
    if text.contains("today") {
        1
    } else if text.contains("week") {
        7
    } else if text.contains("quarter") {
        90
    } else {
        DEFAULT_WINDOW_DAYS
    }
}

pub fn mentioned_models(text: &str, pricing: &PricingTable) -> Vec<String> {
    let text = text.to_lowercase();
    let mut found: Vec<String> = pricing
        .models()
        .iter()
        .map(|p| p.model)
        .filter(|m| text.contains(m))
        .map(str::to_string)
        .collect();
    // "gpt-4o-mini" also contains "gpt-4o": keep only the longest of overlapping names.
    let all = found.clone();
    found.retain(|m| {
        !all.iter()
            .any(|other| other != m && other.contains(m.as_str()))
    });
    found
}

/// The structured output triage asks the LLM for.
pub fn triage_schema() -> ResponseSchema {
    ResponseSchema {
        name: "triage".into(),
        schema: json!({
            "type": "object",
            "properties": {
                "category": {"type": "string", "enum": [
                    "cost_optimization", "latency_performance", "model_selection",
                    "usage_report", "general"]},
                "days": {"type": "integer", "minimum": 1, "maximum": MAX_WINDOW_DAYS},
                "models": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["category", "days", "models"],
            "additionalProperties": false,
        }),
    }
}

/// Validates the LLM's triage against the schema and the request; `None` if invalid.
pub fn validate_llm_triage(text: &str, request: &str, pricing: &PricingTable) -> Option<Triage> {
    // Tolerate a fenced or chatty answer: take the outermost JSON object.
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    let value: Value = serde_json::from_str(text.get(start..=end)?).ok()?;
    let object = value.as_object()?;
    if object.len() != 3 {
        return None;
    }
    let category: RequestCategory = serde_json::from_value(value["category"].clone()).ok()?;
    let days = u32::try_from(value["days"].as_u64()?).ok()?;
    if !(1..=MAX_WINDOW_DAYS).contains(&days) {
        return None;
    }
    let named = mentioned_models(request, pricing);
    let mut models = Vec::new();
    for model in value["models"].as_array()? {
        let model = model.as_str()?.to_lowercase();
        // Only models the request really names: the LLM may not invent any.
        if named.contains(&model) && !models.contains(&model) {
            models.push(model);
        }
    }
    Some(Triage {
        category,
        models,
        days,
    })
}

impl TriageAgent {
    async fn ask_llm(&self, cx: &AgentContext, request: &str) -> Result<Triage, LlmError> {
        let known: Vec<&str> = cx.pricing.models().iter().map(|p| p.model).collect();
        let mut llm_request = LlmRequest::new(
            vec![
                ChatMessage::system(format!(
                    "Classify an AI usage question. category: cost_optimization, \
                     latency_performance, model_selection, usage_report or general. days: the \
                     analysis window it asks about (default {DEFAULT_WINDOW_DAYS}). models: the \
                     model names it mentions, from: {}. Answer with one JSON object only, like \
                     {{\"category\": \"model_selection\", \"days\": 14, \"models\": [\"gpt-4o\"]}} \
                     for \"Is gpt-4o worth it over the last two weeks?\"",
                    known.join(", ")
                )),
                ChatMessage::user(request),
            ],
            Value::Null,
            // The JSON is about 30 tokens; a model that rambles is cut off and falls back.
            80,
        );
        llm_request.temperature = Some(0.0);
        llm_request.schema = Some(triage_schema());
        let tokens = llm_request.tokens.clone();
        let started = std::time::Instant::now();
        let text = cx
            .llm
            .complete_structured(llm_request, cx.ctx.cancellation().clone())
            .await;
        let triage = text.and_then(|text| {
            validate_llm_triage(&text, request, &cx.pricing).ok_or_else(|| {
                LlmError::InvalidResponse("the classification does not match the schema".into())
            })
        });
        cx.record_llm_usage(
            self.name(),
            cx.llm.as_ref(),
            tokens.get(),
            started.elapsed(),
            triage.is_ok(),
        )
        .await;
        triage
    }
}

#[async_trait]
impl Agent for TriageAgent {
    fn name(&self) -> &'static str {
        "triage"
    }

    async fn run(&self, cx: &AgentContext, state: &mut RunState) -> Result<Value, AgentError> {
        cx.think(
            self.name(),
            "Classifying the request and extracting models and time range",
            1,
            2,
        )
        .await?;
        let rules = || Triage {
            category: classify(&state.request),
            models: mentioned_models(&state.request, &cx.pricing),
            days: window_days(&state.request),
        };
        let (triage, how) = if cx.llm_triage && cx.has_model() {
            match self.ask_llm(cx, &state.request).await {
                Ok(triage) => (triage, format!("classified by the {} model", cx.llm.name())),
                Err(LlmError::Cancelled) => return Err(AgentError::Llm(LlmError::Cancelled)),
                Err(err) => {
                    tracing::warn!(error = %err, "LLM triage failed; using the rules");
                    (
                        rules(),
                        format!(
                            "the model could not classify it ({}), so by keyword rules",
                            err.reason()
                        ),
                    )
                }
            }
        } else {
            (rules(), "by keyword rules".to_string())
        };
        cx.think(
            self.name(),
            format!(
                "Request is about {:?} ({how}); analysing the last {} days",
                triage.category, triage.days
            ),
            2,
            2,
        )
        .await?;
        let result = json!(triage);
        state.triage = Some(triage);
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_keywords() {
        assert_eq!(
            classify("How can I reduce my LLM costs?"),
            RequestCategory::CostOptimization
        );
        assert_eq!(
            classify("why is my bot so slow"),
            RequestCategory::LatencyPerformance
        );
        assert_eq!(
            classify("give me a usage breakdown"),
            RequestCategory::UsageReport
        );
        assert_eq!(classify("hello"), RequestCategory::General);
    }

    #[test]
    fn llm_triage_is_validated_against_the_schema_and_the_request() {
        let pricing = PricingTable::builtin();
        let request = "compare gpt-4o with claude-3-5-haiku over 2 weeks";
        let ok = validate_llm_triage(
            r#"{"category":"model_selection","days":14,"models":["gpt-4o","gpt-4.1"]}"#,
            request,
            &pricing,
        )
        .unwrap();
        assert_eq!(ok.category, RequestCategory::ModelSelection);
        assert_eq!(ok.days, 14);
        assert_eq!(
            ok.models,
            vec!["gpt-4o".to_string()],
            "unnamed models are dropped"
        );
        for bad in [
            r#"{"category":"astrology","days":14,"models":[]}"#,
            r#"{"category":"general","days":0,"models":[]}"#,
            r#"{"category":"general","days":7}"#,
            r#"{"category":"general","days":7,"models":[],"extra":1}"#,
            "no json here",
        ] {
            assert!(
                validate_llm_triage(bad, request, &pricing).is_none(),
                "{bad}"
            );
        }
    }

    #[test]
    fn extracts_windows_and_models() {
        assert_eq!(window_days("spend over the last 14 days"), 14);
        assert_eq!(window_days("this week"), 7);
        assert_eq!(window_days("reduce costs"), 30);
        assert_eq!(window_days("last 9999 days"), MAX_WINDOW_DAYS);
        let pricing = PricingTable::builtin();
        assert_eq!(
            mentioned_models(
                "should I move gpt-4o-mini traffic to claude-3-5-haiku?",
                &pricing
            ),
            vec!["gpt-4o-mini".to_string(), "claude-3-5-haiku".to_string()]
        );
    }
}
