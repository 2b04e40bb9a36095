//! Data: the `usage_summary` tool over the user's own rows.

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{Agent, AgentContext, AgentError, RunState};
use crate::usage::{summary_and_window, DEFAULT_WINDOW_DAYS};

pub struct DataAgent;

#[async_trait]
impl Agent for DataAgent {
    fn name(&self) -> &'static str {
        "data"
    }

    async fn run(&self, cx: &AgentContext, state: &mut RunState) -> Result<Value, AgentError> {
        let days = state
            .triage
            .as_ref()
            .map_or(DEFAULT_WINDOW_DAYS, |t| t.days);
        cx.think(
            self.name(),
            format!("Loading your usage for the last {days} days"),
            1,
            2,
        )
        .await?;
        let now = cx.now_ms();
        let mut window = None;
        let summary = cx
            .tool(
                self.name(),
                "usage_summary",
                json!({ "days": days }),
                || async {
                    let (summary, read) = summary_and_window(&cx.store, days, now)
                        .await
                        .map_err(|e| e.to_string())?;
                    window = Some(read);
                    Ok::<_, String>(summary)
                },
            )
            .await?;
        // For the optimization agent: the same window, not read twice.
        state.usage_window = window;
        cx.think(
            self.name(),
            format!(
                "{} requests costing ${:.2} across {} models",
                summary.total_requests,
                summary.total_cost_usd,
                summary.by_model.len()
            ),
            2,
            2,
        )
        .await?;
        let result = json!({
            "total_requests": summary.total_requests,
            "total_cost_usd": summary.total_cost_usd,
            "models": summary.by_model.len(),
            "workloads": summary.by_workload.len(),
        });
        state.usage = Some(summary);
        Ok(result)
    }
}
