//! `apex alerts` and `apex webhooks`: alert rules and scheduled reports, what they
//! raised, and the webhooks they are posted to with their delivery log (the CLI side of
//! `/api/alerts` and `/api/webhooks`). Managed with a login, so each command logs in and
//! ends that session again when it is done.

use anyhow::bail;
use apex_protocol::alerts::{
    Alert, AlertRule, AlertRuleInput, Webhook, WebhookDelivery, WebhookInput,
};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::account::{describe_error, AccountArgs};
use crate::sessions::urlencoding_path;
use crate::terminal::clean;

#[derive(clap::Subcommand)]
pub enum AlertsCommand {
    /// Make an alert rule or a scheduled report. It is evaluated at once, then on its
    /// schedule (--every hour, day or week, at --at-hour in --timezone).
    ///
    /// Example: APEX_PASSWORD=... apex alerts create --email me@example.com \
    ///              --kind spend_over --threshold-usd 50 --period month
    ///          APEX_PASSWORD=... apex alerts create --email me@example.com \
    ///              --kind report --every week --at-hour 8 --timezone Europe/Paris
    #[command(verbatim_doc_comment)]
    Create {
        /// spend_over, spend_change, budget_forecast or report.
        #[arg(long)]
        kind: String,
        /// Watch this team's usage (its owner or an admin).
        #[arg(long)]
        team: Option<String>,
        /// hour, day or week (Mondays).
        #[arg(long, default_value = "day")]
        every: String,
        #[arg(long)]
        at_hour: Option<u32>,
        #[arg(long)]
        timezone: Option<String>,
        /// spend_over: the threshold in USD.
        #[arg(long)]
        threshold_usd: Option<f64>,
        /// spend_over: day, week or month.
        #[arg(long)]
        period: Option<String>,
        /// spend_change: percent above the trailing baseline.
        #[arg(long)]
        percent: Option<f64>,
        /// spend_change: days of the baseline.
        #[arg(long)]
        baseline_days: Option<u32>,
        /// budget_forecast: the budget watched.
        #[arg(long)]
        budget: Option<String>,
        /// report: what the report run is asked.
        #[arg(long)]
        message: Option<String>,
        /// Do not start a run that explains each alert.
        #[arg(long)]
        no_explain: bool,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// List your alert rules.
    ///
    /// Example: APEX_PASSWORD=... apex alerts list --email me@example.com
    #[command(verbatim_doc_comment)]
    List {
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Delete an alert rule and what it raised.
    ///
    /// Example: APEX_PASSWORD=... apex alerts delete --email me@example.com RULE_ID
    #[command(verbatim_doc_comment)]
    Delete {
        rule_id: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// What your rules raised, newest first, with the run that explains each.
    ///
    /// Example: APEX_PASSWORD=... apex alerts raised --email me@example.com
    #[command(verbatim_doc_comment)]
    Raised {
        #[command(flatten)]
        account: AccountArgs,
    },
}

#[derive(clap::Subcommand)]
pub enum WebhooksCommand {
    /// Add a webhook; prints its signing secret once.
    ///
    /// Example: APEX_PASSWORD=... apex webhooks create --email me@example.com \
    ///              https://hooks.example.com/apex
    #[command(verbatim_doc_comment)]
    Create {
        url: String,
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// List your webhooks.
    ///
    /// Example: APEX_PASSWORD=... apex webhooks list --email me@example.com
    #[command(verbatim_doc_comment)]
    List {
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Delete a webhook and its delivery log.
    ///
    /// Example: APEX_PASSWORD=... apex webhooks delete --email me@example.com WEBHOOK_ID
    #[command(verbatim_doc_comment)]
    Delete {
        webhook_id: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Queue a `webhook.test` message to a webhook.
    ///
    /// Example: APEX_PASSWORD=... apex webhooks test --email me@example.com WEBHOOK_ID
    #[command(verbatim_doc_comment)]
    Test {
        webhook_id: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// A webhook's delivery log: every message and attempt.
    ///
    /// Example: APEX_PASSWORD=... apex webhooks deliveries --email me@example.com WEBHOOK_ID
    #[command(verbatim_doc_comment)]
    Deliveries {
        webhook_id: String,
        #[command(flatten)]
        account: AccountArgs,
    },
    /// Send a message again (same id), with a fresh retry schedule.
    ///
    /// Example: APEX_PASSWORD=... apex webhooks redeliver --email me@example.com \
    ///              WEBHOOK_ID msg_...
    #[command(verbatim_doc_comment)]
    Redeliver {
        webhook_id: String,
        delivery_id: String,
        #[command(flatten)]
        account: AccountArgs,
    },
}

/// A logged-in client of the API for one command.
struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn login(account: &AccountArgs) -> anyhow::Result<Self> {
        Ok(Self {
            token: account.authenticate().await?.access_token,
            http: reqwest::Client::new(),
            base: account.base_url().to_string(),
        })
    }

    /// `method path` with `body` (JSON) if any; the answer, or the API's error as `what`
    /// refused.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + Sync)>,
        what: &str,
    ) -> anyhow::Result<T> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await?;
        if !response.status().is_success() {
            bail!("{what} refused: {}", describe_error(response).await);
        }
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(serde_json::from_value(serde_json::Value::Null)?);
        }
        Ok(response.json().await?)
    }

    /// Ends the command's own session, whatever happened.
    async fn logout(self) {
        let _ = self
            .http
            .post(format!("{}/auth/logout", self.base))
            .bearer_auth(&self.token)
            .send()
            .await;
    }
}

const NO_BODY: Option<&()> = None;

pub async fn run_alerts(command: AlertsCommand) -> anyhow::Result<()> {
    let account = match &command {
        AlertsCommand::Create { account, .. }
        | AlertsCommand::List { account }
        | AlertsCommand::Delete { account, .. }
        | AlertsCommand::Raised { account } => account,
    };
    let client = Client::login(account).await?;
    let outcome = alerts(&client, &command).await;
    client.logout().await;
    outcome
}

async fn alerts(client: &Client, command: &AlertsCommand) -> anyhow::Result<()> {
    match command {
        AlertsCommand::Create {
            kind,
            team,
            every,
            at_hour,
            timezone,
            threshold_usd,
            period,
            percent,
            baseline_days,
            budget,
            message,
            no_explain,
            ..
        } => {
            let body = AlertRuleInput {
                kind: kind.clone(),
                team_id: team.clone(),
                every: Some(every.clone()),
                at_hour: *at_hour,
                timezone: timezone.clone(),
                threshold_usd: *threshold_usd,
                period: period.clone(),
                percent: *percent,
                baseline_days: *baseline_days,
                budget_id: budget.clone(),
                message: message.clone(),
                explain: no_explain.then_some(false),
            };
            let rule: AlertRule = client
                .call(
                    Method::POST,
                    "/api/alerts/rules",
                    Some(&body),
                    "making the rule",
                )
                .await?;
            print_rule(&rule);
        }
        AlertsCommand::List { .. } => {
            let rules: Vec<AlertRule> = client
                .call(Method::GET, "/api/alerts/rules", NO_BODY, "listing rules")
                .await?;
            if rules.is_empty() {
                println!("no alert rules");
            }
            rules.iter().for_each(print_rule);
        }
        AlertsCommand::Delete { rule_id, .. } => {
            let path = format!("/api/alerts/rules/{}", urlencoding_path(rule_id));
            let () = client
                .call(Method::DELETE, &path, NO_BODY, "deleting the rule")
                .await?;
            println!("rule {} deleted", clean(rule_id));
        }
        AlertsCommand::Raised { .. } => {
            let raised: Vec<Alert> = client
                .call(Method::GET, "/api/alerts", NO_BODY, "listing alerts")
                .await?;
            if raised.is_empty() {
                println!("nothing raised");
            }
            for a in &raised {
                let run = a
                    .run_id
                    .as_deref()
                    .map(|r| {
                        format!(
                            " (explained by run {}, thread {})",
                            clean(r),
                            clean(a.thread_id.as_deref().unwrap_or("?"))
                        )
                    })
                    .unwrap_or_default();
                println!(
                    "{}  {}  {}: {}{run}",
                    clean(&a.created_at),
                    clean(&a.kind),
                    clean(&a.title),
                    clean(&a.detail)
                );
            }
        }
    }
    Ok(())
}

fn print_rule(r: &AlertRule) {
    let team = r
        .team_id
        .as_deref()
        .map(|t| format!(" team {}", clean(t)))
        .unwrap_or_default();
    println!(
        "{}  {}{team} {}  every {} at {}:00 {}; next {}",
        clean(&r.id),
        clean(&r.kind),
        clean(&r.params.to_string()),
        clean(&r.every),
        r.at_hour,
        clean(&r.timezone),
        clean(&r.next_tick_at)
    );
}

pub async fn run_webhooks(command: WebhooksCommand) -> anyhow::Result<()> {
    let account = match &command {
        WebhooksCommand::Create { account, .. }
        | WebhooksCommand::List { account }
        | WebhooksCommand::Delete { account, .. }
        | WebhooksCommand::Test { account, .. }
        | WebhooksCommand::Deliveries { account, .. }
        | WebhooksCommand::Redeliver { account, .. } => account,
    };
    let client = Client::login(account).await?;
    let outcome = webhooks(&client, &command).await;
    client.logout().await;
    outcome
}

async fn webhooks(client: &Client, command: &WebhooksCommand) -> anyhow::Result<()> {
    let hook_path = |id: &str| format!("/api/webhooks/{}", urlencoding_path(id));
    match command {
        WebhooksCommand::Create {
            url, description, ..
        } => {
            let body = WebhookInput {
                url: url.clone(),
                description: description.clone(),
            };
            let hook: Webhook = client
                .call(
                    Method::POST,
                    "/api/webhooks",
                    Some(&body),
                    "adding the webhook",
                )
                .await?;
            println!("{}  {}", clean(&hook.id), clean(&hook.url));
            println!(
                "signing secret (shown once; verify webhook-signature with it): {}",
                clean(hook.secret.as_deref().unwrap_or_default())
            );
        }
        WebhooksCommand::List { .. } => {
            let hooks: Vec<Webhook> = client
                .call(Method::GET, "/api/webhooks", NO_BODY, "listing webhooks")
                .await?;
            if hooks.is_empty() {
                println!("no webhooks");
            }
            for h in &hooks {
                println!(
                    "{}  {}  {}",
                    clean(&h.id),
                    clean(&h.url),
                    clean(&h.description)
                );
            }
        }
        WebhooksCommand::Delete { webhook_id, .. } => {
            let () = client
                .call(
                    Method::DELETE,
                    &hook_path(webhook_id),
                    NO_BODY,
                    "deleting the webhook",
                )
                .await?;
            println!("webhook {} deleted", clean(webhook_id));
        }
        WebhooksCommand::Test { webhook_id, .. } => {
            let path = format!("{}/test", hook_path(webhook_id));
            let d: WebhookDelivery = client
                .call(Method::POST, &path, NO_BODY, "queueing a test")
                .await?;
            println!("queued {} ({})", clean(&d.id), clean(&d.event_type));
        }
        WebhooksCommand::Deliveries { webhook_id, .. } => {
            let path = format!("{}/deliveries", hook_path(webhook_id));
            let log: Vec<WebhookDelivery> = client
                .call(Method::GET, &path, NO_BODY, "reading the delivery log")
                .await?;
            if log.is_empty() {
                println!("no messages yet");
            }
            for d in &log {
                println!(
                    "{}  {}  {}  {} attempt(s)",
                    clean(&d.id),
                    clean(&d.event_type),
                    clean(&d.status),
                    d.attempts
                );
                for a in &d.attempt_log {
                    let result = match (a.status_code, &a.error) {
                        (Some(code), _) => code.to_string(),
                        (None, Some(error)) => clean(error),
                        (None, None) => "?".into(),
                    };
                    println!(
                        "    #{} {}  {result}  {} ms",
                        a.attempt,
                        clean(&a.at),
                        a.duration_ms
                    );
                }
            }
        }
        WebhooksCommand::Redeliver {
            webhook_id,
            delivery_id,
            ..
        } => {
            let path = format!(
                "{}/deliveries/{}/redeliver",
                hook_path(webhook_id),
                urlencoding_path(delivery_id)
            );
            let d: WebhookDelivery = client
                .call(Method::POST, &path, NO_BODY, "redelivering")
                .await?;
            println!("{} queued again", clean(&d.id));
        }
    }
    Ok(())
}
