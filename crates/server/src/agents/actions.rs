//! Actions: turns the opportunities into an ordered plan (`action_plan` tool).

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{ActionStep, Agent, AgentContext, AgentError, Opportunity, RunState};

pub struct ActionsAgent;

fn effort_rank(effort: &str) -> u8 {
    match effort {
        "low" => 0,
        "medium" => 1,
        _ => 2,
    }
}

/// Biggest savings first; among similar savings (within 10%), the easier step first.
pub fn plan(opportunities: &[Opportunity]) -> Vec<ActionStep> {
    let mut ordered: Vec<&Opportunity> = opportunities.iter().collect();
    ordered.sort_by(|a, b| {
        let close = (a.monthly_savings_usd - b.monthly_savings_usd).abs()
            <= 0.1 * a.monthly_savings_usd.max(b.monthly_savings_usd);
        if close {
            effort_rank(&a.effort).cmp(&effort_rank(&b.effort))
        } else {
            b.monthly_savings_usd.total_cmp(&a.monthly_savings_usd)
        }
    });
    let mut steps: Vec<ActionStep> = ordered
        .iter()
        .enumerate()
        .map(|(i, o)| ActionStep {
            order: i as u32 + 1,
            title: o.title.clone(),
            details: o.description.clone(),
            effort: o.effort.clone(),
            expected_monthly_savings_usd: o.monthly_savings_usd,
        })
        .collect();
    steps.push(ActionStep {
        order: steps.len() as u32 + 1,
        title: "Track the effect".into(),
        details: "Compare GET /api/usage/summary week over week to confirm the savings.".into(),
        effort: "low".into(),
        expected_monthly_savings_usd: 0.0,
    });
    steps
}

#[async_trait]
impl Agent for ActionsAgent {
    fn name(&self) -> &'static str {
        "actions"
    }

    async fn run(&self, cx: &AgentContext, state: &mut RunState) -> Result<Value, AgentError> {
        cx.think(
            self.name(),
            "Ordering the changes by savings and effort",
            1,
            1,
        )
        .await?;
        let opportunities = state.opportunities.clone();
        let steps = cx
            .tool(
                self.name(),
                "action_plan",
                json!({ "opportunities": opportunities.iter().map(|o| &o.strategy).collect::<Vec<_>>() }),
                || async { Ok::<_, String>(plan(&opportunities)) },
            )
            .await?;
        state.plan = steps;
        Ok(json!({ "steps": state.plan.len() }))
    }
}
