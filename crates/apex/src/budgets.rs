//! `apex budgets`: caps on your own LLM calls through the gateway (the CLI side of
//! `/api/budgets`). Budgets are managed with a login, so each command logs in and ends
//! that session again when it is done.

use anyhow::bail;
use apex_protocol::budgets::{Budget, BudgetInput};

use crate::account::{describe_error, AccountArgs};
use crate::sessions::urlencoding_path;
use crate::terminal::clean;

#[derive(clap::Subcommand)]
pub enum BudgetsCommand {
    /// Set a cap: on all your calls (default), one API key's (--key) or one model's
    /// (--model); in USD (--limit-usd) or tokens (--limit-tokens); per day, week, month
    /// (UTC) or over the last N days (--period rolling_days --days N).
    ///
    /// Example: APEX_PASSWORD=... apex budgets create --email me@example.com \
    ///              --limit-usd 25 --period month
    ///          APEX_PASSWORD=... apex budgets create --email me@example.com \
    ///              --model gpt-4o --limit-tokens 2000000 --period rolling_days --days 7
    #[command(verbatim_doc_comment)]
    Create {
        /// The API key id (from `apex keys list`) whose calls it caps.
        #[arg(long, conflicts_with = "model")]
        key: Option<String>,
        /// The model whose calls it caps.
        #[arg(long)]
        model: Option<String>,
        #[arg(
            long,
            conflicts_with = "limit_tokens",
            required_unless_present = "limit_tokens"
        )]
        limit_usd: Option<f64>,
        #[arg(long)]
        limit_tokens: Option<i64>,
        /// day, week, month or rolling_days.
        #[arg(long, default_value = "month")]
        period: String,
        /// For --period rolling_days.
        #[arg(long)]
        days: Option<u32>,
        /// IANA time zone whose midnights start the days (default UTC).
        #[arg(long)]
        timezone: Option<String>,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// List your budgets with what their current period has spent.
    ///
    /// Example: APEX_PASSWORD=... apex budgets list --email me@example.com
    #[command(verbatim_doc_comment)]
    List {
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Delete a budget.
    ///
    /// Example: APEX_PASSWORD=... apex budgets delete --email me@example.com BUDGET_ID
    #[command(verbatim_doc_comment)]
    Delete {
        /// A budget id from `apex budgets list`.
        budget_id: String,
        #[command(flatten)]
        account: AccountArgs,
    },
}

pub async fn run(command: BudgetsCommand) -> anyhow::Result<()> {
    let account = match &command {
        BudgetsCommand::Create { account, .. }
        | BudgetsCommand::List { account }
        | BudgetsCommand::Delete { account, .. } => account,
    };
    let token = account.authenticate().await?.access_token;
    let http = reqwest::Client::new();
    let base = account.base_url();
    let outcome = async {
        match &command {
            BudgetsCommand::Create {
                key,
                model,
                limit_usd,
                limit_tokens,
                period,
                days,
                timezone,
                ..
            } => {
                let (scope, scope_id) = match (key, model) {
                    (Some(key), _) => ("key", Some(key.clone())),
                    (None, Some(model)) => ("model", Some(model.clone())),
                    (None, None) => ("user", None),
                };
                let body = BudgetInput {
                    scope: scope.into(),
                    scope_id,
                    limit_usd: *limit_usd,
                    limit_tokens: *limit_tokens,
                    period: period.clone(),
                    days: *days,
                    timezone: timezone.clone(),
                };
                let response = http
                    .post(format!("{base}/api/budgets"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!(
                        "creating the budget refused: {}",
                        describe_error(response).await
                    );
                }
                let budget: Budget = response.json().await?;
                print_budget(&budget);
            }
            BudgetsCommand::List { .. } => {
                let response = http
                    .get(format!("{base}/api/budgets"))
                    .bearer_auth(&token)
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!(
                        "listing budgets refused: {}",
                        describe_error(response).await
                    );
                }
                let budgets: Vec<Budget> = response.json().await?;
                if budgets.is_empty() {
                    println!("no budgets: no call is refused for one");
                }
                for budget in &budgets {
                    print_budget(budget);
                }
            }
            BudgetsCommand::Delete { budget_id, .. } => {
                let response = http
                    .delete(format!(
                        "{base}/api/budgets/{}",
                        urlencoding_path(budget_id)
                    ))
                    .bearer_auth(&token)
                    .send()
                    .await?;
                if !response.status().is_success() {
                    bail!(
                        "deleting the budget refused: {}",
                        describe_error(response).await
                    );
                }
                println!("budget {} deleted", clean(budget_id));
            }
        }
        Ok(())
    }
    .await;
    // The command's own session ends whatever happened.
    let _ = http
        .post(format!("{base}/auth/logout"))
        .bearer_auth(&token)
        .send()
        .await;
    outcome
}

fn print_budget(b: &Budget) {
    let what = match (b.scope.as_str(), &b.scope_id) {
        ("key", Some(id)) => format!("key {}", clean(id)),
        ("model", Some(model)) => format!("model {}", clean(model)),
        _ => "all your calls".into(),
    };
    let mut period = match b.days {
        Some(days) => format!("last {days} days"),
        None => format!("per {}", b.period),
    };
    if b.timezone != "UTC" {
        period.push_str(&format!(" ({})", clean(&b.timezone)));
    }
    let (limit, spent) = match (b.limit_usd, b.limit_tokens) {
        (Some(usd), _) => (format!("${usd:.2}"), format!("${:.4}", b.spent)),
        (_, Some(tokens)) => (format!("{tokens} tokens"), format!("{} tokens", b.spent)),
        _ => ("?".into(), b.spent.to_string()),
    };
    println!(
        "{}  {what}: {limit} {period}; {spent} spent ({:.0}%), resets {}",
        clean(&b.id),
        b.percent,
        b.resets_at
    );
}
