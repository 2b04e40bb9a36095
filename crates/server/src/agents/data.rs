//! Data: the `usage_summary` tool over the user's own rows.

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{period_phrase, Agent, AgentContext, AgentError, RunState, DAY_MS};
use crate::usage::{summary_and_window, DEFAULT_WINDOW_DAYS};

pub struct DataAgent;

#[async_trait]
impl Agent for DataAgent {
    fn name(&self) -> &'static str {
        "data"
    }

    async fn run(&self, cx: &AgentContext, state: &mut RunState) -> Result<Value, AgentError> {
        let (days, ends_days_ago) = state
            .triage
            .as_ref()
            .map_or((DEFAULT_WINDOW_DAYS, 0), |t| (t.days, t.ends_days_ago));
        cx.think(
            self.name(),
            format!(
                "Loading your usage for {}",
                period_phrase(days.into(), ends_days_ago.into())
            ),
            1,
            2,
        )
        .await?;
        // The window ends now, or as many days before as the thread moved it back.
        let until = cx.now_ms() - i64::from(ends_days_ago) * DAY_MS;
        let arguments = if ends_days_ago == 0 {
            json!({ "days": days })
        } else {
            json!({ "days": days, "ends_days_ago": ends_days_ago })
        };
        let mut window = None;
        let summary = cx
            .tool(self.name(), "usage_summary", arguments, || async {
                let (summary, read) = summary_and_window(&cx.store, days, until)
                    .await
                    .map_err(|e| e.to_string())?;
                window = Some(read);
                Ok::<_, String>(summary)
            })
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
