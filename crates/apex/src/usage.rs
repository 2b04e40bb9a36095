//! `apex usage`: upload your AI usage (Apex's CSV or JSON rows, or a provider's usage
//! export) and print your usage summary.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use apex_protocol::prices::{UsageExplanation, UsageRowsPage};
use apex_protocol::usage::{UsageImportResult, UsageSummary};

use crate::account::{describe_error, AccountArgs};
use crate::terminal::clean;

#[derive(clap::Subcommand)]
pub enum UsageCommand {
    /// Upload usage rows from a file: Apex's CSV (header: provider,model,workload,
    /// timestamp,prompt_tokens,completion_tokens,latency_ms[,status,cost_usd,
    /// cached_tokens,reasoning_tokens,id]) or JSON rows, or a provider's export:
    ///   openai-usage     OpenAI's organization Usage API (completions), group_by=model
    ///   anthropic-usage  Anthropic's usage report (messages), group_by[]=model
    ///   litellm-spend    LiteLLM's spend logs (/spend/logs)
    /// Importing the same export again stores nothing twice; entries that cannot be
    /// used are listed with the reason.
    ///
    /// Example: APEX_PASSWORD=... apex usage import --email me@example.com usage.csv
    ///          APEX_PASSWORD=... apex usage import --email me@example.com \
    ///                --format openai-usage completions-2026-11.json
    #[command(verbatim_doc_comment)]
    Import {
        /// The file.
        file: PathBuf,
        /// csv, json (Apex's rows), openai-usage, anthropic-usage or litellm-spend.
        #[arg(long, default_value = "csv")]
        format: String,
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
    /// List your latest usage rows with their ids and the price each was costed with.
    ///
    /// Example: APEX_PASSWORD=... apex usage rows --email me@example.com --source gateway
    #[command(verbatim_doc_comment)]
    Rows {
        #[command(flatten)]
        cell: CellArgs,
        /// Rows to list (1..=500).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Show how a cost was computed: one row (--row, an id from `apex usage rows`), or
    /// every row of a model, workload, provider or source in the window: tokens × rate
    /// per class, and the price entry and version used.
    ///
    /// Example: APEX_PASSWORD=... apex usage explain --email me@example.com --row 1234
    ///          APEX_PASSWORD=... apex usage explain --email me@example.com --model gpt-4o
    #[command(verbatim_doc_comment)]
    Explain {
        /// A row id.
        #[arg(long)]
        row: Option<i64>,
        #[command(flatten)]
        cell: CellArgs,
        #[command(flatten)]
        account: AccountArgs,
    },
}

/// A cell of the summary: the window and the fields that select its rows.
#[derive(clap::Args)]
pub struct CellArgs {
    /// Window in days (1..=365).
    #[arg(long, default_value_t = 30)]
    days: u32,
    #[arg(long)]
    provider: Option<String>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    workload: Option<String>,
    /// upload, demo, apex, otlp, gateway, openai-usage, anthropic-usage, litellm-spend.
    #[arg(long)]
    source: Option<String>,
}

impl CellArgs {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = vec![("days", self.days.to_string())];
        for (name, value) in [
            ("provider", &self.provider),
            ("model", &self.model),
            ("workload", &self.workload),
            ("source", &self.source),
        ] {
            if let Some(value) = value {
                query.push((name, value.clone()));
            }
        }
        query
    }
}

pub async fn run(command: UsageCommand) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    match command {
        UsageCommand::Import {
            file,
            format,
            account,
        } => {
            let (content_type, query) = match format.as_str() {
                "csv" => ("text/csv", "rows"),
                "json" => ("application/json", "rows"),
                "openai-usage" | "anthropic-usage" | "litellm-spend" => {
                    ("application/json", format.as_str())
                }
                other => bail!(
                    "unknown --format {other:?}: use csv, json, openai-usage, anthropic-usage \
                     or litellm-spend"
                ),
            };
            let body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let token = account.authenticate().await?.access_token;
            let response = http
                .post(format!(
                    "{}/api/usage/events?format={query}",
                    account.base_url()
                ))
                .bearer_auth(token)
                .header("Content-Type", content_type)
                .body(body)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("import refused: {}", describe_error(response).await);
            }
            let result: UsageImportResult = response.json().await?;
            print_import(&result, &file);
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
        UsageCommand::Rows {
            cell,
            limit,
            account,
        } => {
            let token = account.authenticate().await?.access_token;
            let mut query = cell.query();
            query.push(("limit", limit.to_string()));
            let response = http
                .get(format!("{}/api/usage/rows", account.base_url()))
                .query(&query)
                .bearer_auth(token)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("rows refused: {}", describe_error(response).await);
            }
            let page: UsageRowsPage = response.json().await?;
            for r in &page.rows {
                println!(
                    "{:>10}  {}  {:<10} {:<24} {:<20} {:<15} {:>8}+{:<8} ${:.6}  {}",
                    r.id,
                    r.timestamp,
                    clean(&r.provider),
                    clean(&r.model),
                    clean(&r.workload),
                    clean(&r.source),
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cost_usd,
                    r.price_version
                        .as_deref()
                        .map(clean)
                        .unwrap_or_else(|| "(cost as sent)".into())
                );
            }
        }
        UsageCommand::Explain { row, cell, account } => {
            let token = account.authenticate().await?.access_token;
            let query = match row {
                Some(id) => vec![("row", id.to_string())],
                None => cell.query(),
            };
            let response = http
                .get(format!("{}/api/usage/explain", account.base_url()))
                .query(&query)
                .bearer_auth(token)
                .send()
                .await?;
            if !response.status().is_success() {
                bail!("explain refused: {}", describe_error(response).await);
            }
            let explanation: UsageExplanation = response.json().await?;
            crate::pricebook::print_explanation(&explanation);
        }
    }
    Ok(())
}

fn print_import(result: &UsageImportResult, file: &std::path::Path) {
    println!(
        "imported {} rows from {} ({} already stored, {} skipped)",
        result.inserted,
        file.display(),
        result.duplicates,
        result.skipped.len()
    );
    for skip in &result.skipped {
        // The reason may quote a model name from the file: printed cleaned.
        println!("  skipped entry {}: {}", skip.index, clean(&skip.reason));
    }
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
    if s.total_cached_tokens > 0 || s.total_reasoning_tokens > 0 {
        println!(
            "of which {} prompt tokens cached, {} completion tokens reasoning",
            s.total_cached_tokens, s.total_reasoning_tokens
        );
    }
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
    println!("by source:");
    for source in &s.by_source {
        println!(
            "  {:<24} {:>8} requests  ${:.2}  latest {}",
            clean(&source.source),
            source.requests,
            source.cost_usd,
            source.latest
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
