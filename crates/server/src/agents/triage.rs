//! Triage: what is the user asking about, which models, which time window. Rules only.

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{Agent, AgentContext, AgentError, RequestCategory, RunState, Triage};
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
        let triage = Triage {
            category: classify(&state.request),
            models: mentioned_models(&state.request, &cx.pricing),
            days: window_days(&state.request),
        };
        cx.think(
            self.name(),
            format!(
                "Request is about {:?}; analysing the last {} days",
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
