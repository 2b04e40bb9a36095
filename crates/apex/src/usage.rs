//! `apex usage`: upload your AI usage from a CSV file and print your usage summary.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use apex_protocol::usage::{UsageImportResult, UsageSummary};

use crate::account::{describe_error, AccountArgs};
use crate::terminal::clean;

#[derive(clap::Subcommand)]
pub enum UsageCommand {
    /// Upload usage rows from a CSV file (header: provider,model,workload,timestamp,
    /// prompt_tokens,completion_tokens,latency_ms[,status,cost_usd]).
    ///
    /// Example: APEX_PASSWORD=... apex usage import --email me@example.com usage.csv
    #[command(verbatim_doc_comment)]
    Import {
        /// The CSV file.
        file: PathBuf,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Print your spend, requests and latency over the last N days.
    ///
    /// Example: APEX_PASSWORD=... apex usage summary --email me@example.com --days 7
    #[command(verbatim_doc_comment)]
    Summary {
        /// Window in days (1..=365).
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[command(flatten)]
        account: AccountArgs,
    },
}

pub async fn run(command: UsageCommand) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    match command {
        UsageCommand::Import { file, account } => {
            let body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let token = account.authenticate().await?.access_token;
            let response = http
                .post(format!("{}/api/usage/events", account.base_url()))
                .bearer_auth(token)
                .header("Content-Type", "text/csv")
                .body(body)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("import refused: {}", describe_error(response).await);
            }
            let result: UsageImportResult = response.json().await?;
            println!("imported {} rows from {}", result.inserted, file.display());
        }
        UsageCommand::Summary { days, account } => {
            let token = account.authenticate().await?.access_token;
            let response = http
                .get(format!(
                    "{}/api/usage/summary?days={days}",
                    account.base_url()
                ))
                .bearer_auth(token)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("summary refused: {}", describe_error(response).await);
            }
            let summary: UsageSummary = response.json().await?;
            print_summary(&summary);
        }
    }
    Ok(())
}

fn print_summary(s: &UsageSummary) {
    println!(
        "last {} days: {} requests ({} failed), ${:.2}, {} prompt + {} completion tokens",
        s.days,
        s.total_requests,
        s.error_requests,
        s.total_cost_usd,
        s.total_prompt_tokens,
        s.total_completion_tokens
    );
    println!(
        "latency p50 {} ms, p95 {} ms, p99 {} ms",
        s.latency_ms.p50, s.latency_ms.p95, s.latency_ms.p99
    );
    // Model and workload names are whatever an uploaded file said: printed cleaned.
    println!("by model:");
    for m in &s.by_model {
        println!(
            "  {:<24} {:>8} requests  ${:.2}",
            clean(&m.model),
            m.requests,
            m.cost_usd
        );
    }
    println!("by workload:");
    for w in &s.by_workload {
        println!(
            "  {:<24} {:>8} requests  ${:.2}",
            clean(&w.workload),
            w.requests,
            w.cost_usd
        );
    }
}
