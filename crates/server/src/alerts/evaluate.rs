//! What a rule finds at a tick: a [`Finding`] (an alert to raise, or a report to start)
//! or nothing. Reads only the rule owner's usage through their [`UserStore`], or a team's
//! aggregates while the owner still manages the team.

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Tz;

use super::{Kind, Rule};
use crate::budgets::{budgets_of, start_of};
use crate::clock::ms_to_rfc3339;
use crate::store::{Store, StoreResult};
use crate::teams::Role;
use crate::user_store::UserStore;

/// What a tick found.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The period it belongs to: a rule raises at most one alert per key.
    pub period_key: String,
    pub title: String,
    pub detail: String,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    /// What the run that explains it (or the report) is asked.
    pub question: String,
}

/// Whose usage a rule reads.
enum Scope<'a> {
    Own(&'a UserStore),
    Team(&'a dyn Store, String),
}

impl Scope<'_> {
    /// Spend in `[since_ms, until_ms)`, in USD.
    async fn spend(&self, since_ms: i64, until_ms: i64) -> StoreResult<f64> {
        let last = until_ms - 1;
        Ok(match self {
            Scope::Own(store) => store
                .usage_totals(since_ms, last)
                .await?
                .iter()
                .map(|t| t.cost_usd)
                .sum(),
            Scope::Team(store, team) => store
                .team_usage(team, since_ms, last)
                .await?
                .iter()
                .map(|m| m.cost_usd)
                .sum(),
        })
    }

    fn whose(&self) -> &'static str {
        match self {
            Scope::Own(_) => "Your",
            Scope::Team(..) => "Your team's",
        }
    }
}

/// The date (in `tz`) of the instant `ms`, as people write it: `2026-12-01`.
fn local_date(ms: i64, tz: Tz) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::UNIX_EPOCH)
        .with_timezone(&tz)
        .format("%Y-%m-%d")
        .to_string()
}

fn usd(v: f64) -> String {
    format!("${v:.2}")
}

/// Midnight starting the day `days` before the day holding `now_ms`, in `tz`.
fn day_start(now_ms: i64, tz: Tz, days_back: i64) -> i64 {
    let now = Utc
        .timestamp_millis_opt(now_ms)
        .single()
        .unwrap_or(DateTime::UNIX_EPOCH);
    let today = now.with_timezone(&tz).date_naive();
    start_of(today - Duration::days(days_back), tz).timestamp_millis()
}

/// Evaluates `rule` of the user `store` is bound to at `now_ms`, for its tick due at
/// `due_ms` (a report's key: the same tick can never start two reports). `Ok(None)`: nothing to
/// raise (or the rule can no longer be evaluated: its team or budget is gone, or its
/// maker no longer manages the team).
pub async fn evaluate(
    rule: &Rule,
    store: &UserStore,
    shared: &dyn Store,
    due_ms: i64,
    now_ms: i64,
) -> StoreResult<Option<Finding>> {
    let scope = match &rule.team_id {
        None => Scope::Own(store),
        Some(team) => match store.team_membership(team).await? {
            Some(m) if Role::parse(&m.role).is_some_and(Role::manages) => {
                Scope::Team(shared, team.clone())
            }
            _ => return Ok(None),
        },
    };
    let tz = rule.schedule.tz;
    Ok(match &rule.kind {
        Kind::SpendOver {
            threshold_usd,
            period,
        } => {
            let window = period.window(now_ms, tz);
            let spent = scope.spend(window.start_ms, now_ms + 1).await?;
            (spent >= *threshold_usd).then(|| Finding {
                period_key: format!("{}:{}", period.name(), ms_to_rfc3339(window.start_ms)),
                title: format!(
                    "{} AI spend this {} reached {}",
                    scope.whose(),
                    period.name(),
                    usd(spent)
                ),
                detail: format!(
                    "{} since {}, over the alert threshold of {}.",
                    usd(spent),
                    local_date(window.start_ms, tz),
                    usd(*threshold_usd)
                ),
                value: Some(spent),
                threshold: Some(*threshold_usd),
                question: format!(
                    "My AI spend this {} reached {}, over my alert threshold of {}. What drove \
                     it, and how can I cut it?",
                    period.name(),
                    usd(spent),
                    usd(*threshold_usd)
                ),
            })
        }
        Kind::SpendChange {
            percent,
            baseline_days,
        } => {
            // The last whole day against the average day of the days before it.
            let today = day_start(now_ms, tz, 0);
            let yesterday = day_start(now_ms, tz, 1);
            let baseline_start = day_start(now_ms, tz, 1 + i64::from(*baseline_days));
            let last_day = scope.spend(yesterday, today).await?;
            let baseline =
                scope.spend(baseline_start, yesterday).await? / f64::from(*baseline_days);
            let change = if baseline > 0.0 {
                (last_day / baseline - 1.0) * 100.0
            } else {
                0.0
            };
            (baseline > 0.0 && change >= *percent).then(|| Finding {
                period_key: format!("day:{}", ms_to_rfc3339(yesterday)),
                title: format!(
                    "{} AI spend yesterday was {:.0}% above its usual day",
                    scope.whose(),
                    change
                ),
                detail: format!(
                    "{} yesterday against an average of {} a day over the {} days before.",
                    usd(last_day),
                    usd(baseline),
                    baseline_days
                ),
                value: Some(change),
                threshold: Some(*percent),
                question: format!(
                    "My AI spend yesterday was {} against a usual {} a day ({:.0}% more). What \
                     changed, and what should I do about it?",
                    usd(last_day),
                    usd(baseline),
                    change
                ),
            })
        }
        Kind::BudgetForecast { budget_id } => {
            let Some(budget) = budgets_of(store)
                .await?
                .into_iter()
                .find(|b| &b.id == budget_id)
            else {
                return Ok(None);
            };
            let window = budget.window(now_ms);
            let spent = store
                .budget_spent(&budget.id, window.start_ms, window.end_ms, now_ms)
                .await?;
            let view = budget.view(spent, now_ms);
            let limit = view
                .limit_usd
                .or(view.limit_tokens.map(|t| t as f64))
                .unwrap_or(f64::MAX);
            let elapsed = (now_ms - window.start_ms).max(1) as f64;
            let length = (window.end_ms - window.start_ms).max(1) as f64;
            // An hour of data says little about a month: wait for a tenth of the period.
            let forecast = view.spent * length / elapsed;
            let unit = if view.limit_usd.is_some() {
                "USD"
            } else {
                "tokens"
            };
            (elapsed >= length / 10.0 && forecast > limit).then(|| Finding {
                period_key: format!("budget:{}:{}", budget.id, ms_to_rfc3339(window.start_ms)),
                title: format!(
                    "Budget {} is on course to run out before {}",
                    budget.id,
                    local_date(window.end_ms, budget.timezone)
                ),
                detail: format!(
                    "{:.2} {unit} used of {:.2} so far; at this pace the period ends near \
                     {:.2} {unit}.",
                    view.spent, limit, forecast
                ),
                value: Some(forecast),
                threshold: Some(limit),
                question: format!(
                    "At my current pace my {} budget of {:.2} {unit} runs out before the \
                     period ends ({:.2} used so far). Where is it going, and how can I stay \
                     within it?",
                    budget.period.name(),
                    limit,
                    view.spent
                ),
            })
        }
        Kind::Report { message } => Some(Finding {
            period_key: format!("tick:{}", ms_to_rfc3339(due_ms)),
            title: "Your scheduled cost report".into(),
            detail: "A run is writing the report; open it to read it.".into(),
            value: None,
            threshold: None,
            question: message.clone(),
        }),
    })
}
