//! Budgets: spending caps a user sets on their own LLM calls, held by reservation.
//!
//! A budget caps USD or tokens per day, week (from Monday) or month (UTC), or over the
//! last N days, for all of the user's calls, those made with one API key, or those of one
//! model. Before a call goes out, what it can cost at most ([`CallBound`]: its prompt, at
//! most one token per character, and its `max_tokens`, or [`DEFAULT_MAX_OUTPUT_TOKENS`],
//! at the model's prices) is reserved on every budget it falls under, in one transaction
//! that holds those budgets until commit (see the store's `Budgets` role); if one has no
//! room, the call is refused with `budget_exceeded` and nothing is reserved. When the call
//! ends (answered, failed, stopped or cut off), the reservation is settled to what the
//! call used. So concurrent calls, on one instance or many, cannot together pass a budget
//! by more than the last call's excess over its bound; and a user without budgets is never
//! refused for one.

use apex_protocol::budgets::{
    Budget as BudgetView, BudgetExceededDetails, BudgetInput, BudgetPatch, BudgetWarning,
};
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;

use crate::clock::ms_to_rfc3339;
use crate::events::{BusEvent, EventBus};
use crate::ids::UserId;
use crate::store::{BudgetCharge, BudgetRecord, ReserveOutcome, StoreError, StoreResult};
use crate::usage::price_book::{cost, Quantities, UserPrices};
use crate::usage::pricing::names_model;
use crate::user_store::UserStore;

/// Completion tokens a call is assumed to be able to produce when it sets no `max_tokens`.
pub const DEFAULT_MAX_OUTPUT_TOKENS: i64 = 4096;
/// How long a reservation counts if its call never settles it (a crash): longer than any
/// call may take.
const RESERVATION_TTL_MS: i64 = 30 * 60 * 1000;
/// Largest limits a budget may have.
pub const MAX_LIMIT_USD: f64 = 1_000_000_000.0;
pub const MAX_LIMIT_TOKENS: i64 = 1_000_000_000_000_000;

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MicroUsd(i64),
    Tokens(i64),
}

impl Limit {
    fn amount(self) -> i64 {
        match self {
            Limit::MicroUsd(n) | Limit::Tokens(n) => n,
        }
    }
    fn unit(self) -> &'static str {
        match self {
            Limit::MicroUsd(_) => "usd",
            Limit::Tokens(_) => "tokens",
        }
    }
    /// An amount of this unit as the API shows it (USD, or tokens).
    fn shown(self, amount: i64) -> f64 {
        match self {
            Limit::MicroUsd(_) => amount as f64 / 1e6,
            Limit::Tokens(_) => amount as f64,
        }
    }
}

/// How long a budget's period is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Week,
    Month,
    RollingDays(u32),
}

/// A budget's current period: `[start_ms, end_ms)`, and when what it counts resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
    pub resets_at_ms: i64,
}

/// Length of a usage bucket: every time zone's midnight falls on a quarter hour.
const BUCKET_MS: i64 = 15 * 60 * 1000;

/// Start of the quarter hour holding `ms`.
fn bucket_of(ms: i64) -> i64 {
    ms.div_euclid(BUCKET_MS) * BUCKET_MS
}

/// The instant `date` starts (its first moment) in `tz`. On a day whose midnight a
/// daylight-saving change skips, the first moment that exists.
pub(crate) fn start_of(date: NaiveDate, tz: Tz) -> DateTime<Utc> {
    let midnight = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    (0..=4)
        .find_map(|hours| {
            tz.from_local_datetime(&(midnight + Duration::hours(hours)))
                .earliest()
        })
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| midnight.and_utc())
}

impl Period {
    pub fn parse(name: &str, days: Option<u32>) -> Result<Self, String> {
        match (name, days) {
            ("day", None) => Ok(Period::Day),
            ("week", None) => Ok(Period::Week),
            ("month", None) => Ok(Period::Month),
            ("rolling_days", Some(days)) if (1..=366).contains(&days) => {
                Ok(Period::RollingDays(days))
            }
            ("rolling_days", _) => Err("rolling_days needs days from 1 to 366".into()),
            ("day" | "week" | "month", Some(_)) => {
                Err("days is only for the period rolling_days".into())
            }
            (other, _) => Err(format!(
                "period {other:?} is not one of day, week, month, rolling_days"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::RollingDays(_) => "rolling_days",
        }
    }

    fn days(self) -> Option<u32> {
        match self {
            Period::RollingDays(days) => Some(days),
            _ => None,
        }
    }

    /// The period containing `now_ms`, its days running from midnight to midnight in `tz`.
    pub fn window(self, now_ms: i64, tz: Tz) -> Window {
        let now = Utc
            .timestamp_millis_opt(now_ms)
            .single()
            .unwrap_or(DateTime::UNIX_EPOCH);
        let today = now.with_timezone(&tz).date_naive();
        let (first, next) = match self {
            Period::Day => (today, today + Duration::days(1)),
            Period::Week => {
                let monday =
                    today - Duration::days(i64::from(today.weekday().num_days_from_monday()));
                (monday, monday + Duration::days(7))
            }
            Period::Month => {
                let first =
                    NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap_or_default();
                let next = if today.month() == 12 {
                    NaiveDate::from_ymd_opt(today.year() + 1, 1, 1)
                } else {
                    NaiveDate::from_ymd_opt(today.year(), today.month() + 1, 1)
                }
                .unwrap_or_default();
                (first, next)
            }
            Period::RollingDays(days) => (
                today - Duration::days(i64::from(days) - 1),
                today + Duration::days(1),
            ),
        };
        let (start, end) = (start_of(first, tz), start_of(next, tz));
        Window {
            start_ms: start.timestamp_millis(),
            end_ms: end.timestamp_millis(),
            // A rolling window drops today's usage after `days` days; the others reset
            // at their end.
            resets_at_ms: end.timestamp_millis(),
        }
    }
}

/// Which calls a budget counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    User,
    Key(String),
    Model(String),
    /// Every call of every member of the team (set by its owner or an admin).
    Team(String),
}

impl Scope {
    fn name(&self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Key(_) => "key",
            Scope::Model(_) => "model",
            Scope::Team(_) => "team",
        }
    }
    fn id(&self) -> Option<String> {
        match self {
            Scope::User => None,
            Scope::Key(id) | Scope::Model(id) | Scope::Team(id) => Some(id.clone()),
        }
    }
}

/// A stored budget, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub id: String,
    pub scope: Scope,
    pub limit: Limit,
    pub period: Period,
    /// Whose midnights start its days.
    pub timezone: Tz,
    pub created_at_ms: i64,
}

impl Budget {
    /// `None` for a row this server cannot read (written by a newer version).
    pub fn from_record(r: &BudgetRecord) -> Option<Self> {
        let scope = match (r.scope.as_str(), &r.scope_id) {
            ("user", _) => Scope::User,
            ("key", Some(id)) => Scope::Key(id.clone()),
            ("model", Some(model)) => Scope::Model(model.to_ascii_lowercase()),
            ("team", Some(team)) => Scope::Team(team.clone()),
            _ => return None,
        };
        let limit = match (r.limit_micro_usd, r.limit_tokens) {
            (Some(usd), None) => Limit::MicroUsd(usd),
            (None, Some(tokens)) => Limit::Tokens(tokens),
            _ => return None,
        };
        let days = r.days.and_then(|d| u32::try_from(d).ok());
        Some(Self {
            id: r.id.clone(),
            scope,
            limit,
            period: Period::parse(&r.period, days).ok()?,
            timezone: r.timezone.parse().ok()?,
            created_at_ms: r.created_at_ms,
        })
    }

    pub fn record(&self, updated_at_ms: i64) -> BudgetRecord {
        let (usd, tokens) = match self.limit {
            Limit::MicroUsd(n) => (Some(n), None),
            Limit::Tokens(n) => (None, Some(n)),
        };
        BudgetRecord {
            id: self.id.clone(),
            scope: self.scope.name().into(),
            scope_id: self.scope.id(),
            limit_micro_usd: usd,
            limit_tokens: tokens,
            period: self.period.name().into(),
            days: self.period.days().map(i64::from),
            timezone: self.timezone.name().to_string(),
            created_at_ms: self.created_at_ms,
            updated_at_ms,
        }
    }

    /// Whether a call made with `key` (an API key's id, if any) to `model` counts here.
    pub fn counts(&self, key: Option<&str>, model: &str) -> bool {
        match &self.scope {
            // A team budget reaches a caller only through their membership.
            Scope::User | Scope::Team(_) => true,
            Scope::Key(id) => key == Some(id.as_str()),
            Scope::Model(name) => names_model(name, &model.trim().to_ascii_lowercase()),
        }
    }

    /// The budget as the API shows it, with what its period has `spent`.
    /// The period containing `now_ms`.
    pub fn window(&self, now_ms: i64) -> Window {
        self.period.window(now_ms, self.timezone)
    }

    pub fn view(&self, spent: i64, now_ms: i64) -> BudgetView {
        let window = self.window(now_ms);
        let limit = self.limit.amount();
        BudgetView {
            id: self.id.clone(),
            scope: self.scope.name().into(),
            scope_id: self.scope.id(),
            limit_usd: matches!(self.limit, Limit::MicroUsd(_)).then(|| self.limit.shown(limit)),
            limit_tokens: matches!(self.limit, Limit::Tokens(_)).then_some(limit),
            period: self.period.name().into(),
            days: self.period.days(),
            timezone: self.timezone.name().to_string(),
            spent: self.limit.shown(spent),
            percent: if limit > 0 {
                spent as f64 * 100.0 / limit as f64
            } else if spent > 0 {
                100.0
            } else {
                0.0
            },
            period_start: ms_to_rfc3339(window.start_ms),
            resets_at: ms_to_rfc3339(window.resets_at_ms),
            created_at: ms_to_rfc3339(self.created_at_ms),
        }
    }
}

fn limit_of(usd: Option<f64>, tokens: Option<i64>) -> Result<Limit, String> {
    match (usd, tokens) {
        (Some(usd), None) if usd.is_finite() && (0.0..=MAX_LIMIT_USD).contains(&usd) => {
            Ok(Limit::MicroUsd((usd * 1e6).round() as i64))
        }
        (Some(_), None) => Err(format!(
            "limit_usd must be a number from 0 to {MAX_LIMIT_USD}"
        )),
        (None, Some(tokens)) if (0..=MAX_LIMIT_TOKENS).contains(&tokens) => {
            Ok(Limit::Tokens(tokens))
        }
        (None, Some(_)) => Err(format!("limit_tokens must be 0 to {MAX_LIMIT_TOKENS}")),
        _ => Err("give exactly one of limit_usd and limit_tokens".into()),
    }
}

/// A new budget from `input`, checked.
pub fn new_budget(input: &BudgetInput, now_ms: i64) -> Result<Budget, String> {
    let scope_id = input
        .scope_id
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    if let Some(id) = scope_id {
        if id.chars().count() > 200 || id.contains('\0') {
            return Err("scope_id must be at most 200 characters, no NUL".into());
        }
    }
    let scope = match (input.scope.as_str(), scope_id) {
        ("user", None) => Scope::User,
        ("user", Some(_)) => return Err("a user budget has no scope_id".into()),
        ("key", Some(id)) => Scope::Key(id.into()),
        ("model", Some(model)) => Scope::Model(model.to_ascii_lowercase()),
        ("team", Some(team)) => Scope::Team(team.into()),
        ("key" | "model" | "team", None) => {
            return Err(format!("a {} budget needs a scope_id", input.scope))
        }
        (other, _) => {
            return Err(format!(
                "scope {other:?} is not one of user, key, model, team"
            ))
        }
    };
    Ok(Budget {
        id: format!("bud_{}", uuid::Uuid::new_v4().simple()),
        scope,
        limit: limit_of(input.limit_usd, input.limit_tokens)?,
        period: Period::parse(&input.period, input.days)?,
        timezone: timezone_of(input.timezone.as_deref())?,
        created_at_ms: now_ms,
    })
}

/// The time zone named `name` (IANA), UTC when none is given.
pub(crate) fn timezone_of(name: Option<&str>) -> Result<Tz, String> {
    match name.map(str::trim).filter(|n| !n.is_empty()) {
        None => Ok(Tz::UTC),
        Some(name) => name
            .parse()
            .map_err(|_| format!("timezone {name:?} is not an IANA time zone (Europe/Paris, UTC)")),
    }
}

/// `budget` with `patch` applied, checked.
pub fn patched(budget: &Budget, patch: &BudgetPatch) -> Result<Budget, String> {
    let mut out = budget.clone();
    if patch.limit_usd.is_some() || patch.limit_tokens.is_some() {
        out.limit = limit_of(patch.limit_usd, patch.limit_tokens)?;
    }
    if let Some(period) = &patch.period {
        out.period = Period::parse(period, patch.days)?;
    } else if patch.days.is_some() {
        out.period = Period::parse("rolling_days", patch.days)?;
    }
    if patch.timezone.is_some() {
        out.timezone = timezone_of(patch.timezone.as_deref())?;
    }
    Ok(out)
}

/// How a cost in pico-dollars becomes micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rounding {
    /// Up, and the dearer of output and reasoning for every completion token: a bound.
    Bound,
    /// To the nearest: what was used.
    Nearest,
}

/// The most a call can cost, in each unit a budget may count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallBound {
    pub micro_usd: i64,
    pub tokens: i64,
}

impl CallBound {
    /// A call of `model` at `now_ms` with a prompt of `prompt_chars` characters (at most
    /// one token each) and at most `max_output` completion tokens, at the user's prices.
    /// A model without a price costs nothing in USD (its tokens still count).
    pub fn of_call(
        prices: &UserPrices<'_>,
        model: &str,
        now_ms: i64,
        prompt_chars: usize,
        max_output: Option<i64>,
    ) -> Self {
        let prompt = i64::try_from(prompt_chars).unwrap_or(i64::MAX / 4);
        let completion = max_output
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_MAX_OUTPUT_TOKENS);
        Self::priced(prices, model, now_ms, prompt, completion, Rounding::Bound)
    }

    /// What a call of `model` at `now_ms` used, at the user's prices.
    pub fn of_usage(
        prices: &UserPrices<'_>,
        model: &str,
        now_ms: i64,
        prompt_tokens: i64,
        completion_tokens: i64,
    ) -> Self {
        Self::priced(
            prices,
            model,
            now_ms,
            prompt_tokens,
            completion_tokens,
            Rounding::Nearest,
        )
    }

    /// `prompt` and `completion` tokens of `model` at `now_ms`, in micro-dollars rounded
    /// as `rounding` says, and in tokens.
    fn priced(
        prices: &UserPrices<'_>,
        model: &str,
        now_ms: i64,
        prompt: i64,
        completion: i64,
        rounding: Rounding,
    ) -> Self {
        let micro_usd = prices.entry_at(model, now_ms).map_or(0, |entry| {
            let mut rates = entry.rates;
            if rounding == Rounding::Bound {
                // Whichever of output and reasoning is dearer bounds every completion token.
                rates.output = rates.output.max(rates.reasoning);
            }
            let quantities = Quantities {
                requests: 1,
                prompt,
                completion,
                ..Quantities::default()
            };
            let pico = cost(&rates, &quantities).pico;
            let up = match rounding {
                Rounding::Bound => 999_999,
                Rounding::Nearest => 500_000,
            };
            i64::try_from((pico + up) / 1_000_000).unwrap_or(i64::MAX)
        });
        Self {
            micro_usd,
            tokens: prompt.saturating_add(completion),
        }
    }

    /// What a finished call used: its usage row's cost and tokens.
    pub fn used(cost_usd: f64, prompt_tokens: i64, completion_tokens: i64) -> Self {
        Self {
            micro_usd: (cost_usd * 1e6).round() as i64,
            tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }

    fn in_unit(self, limit: Limit) -> i64 {
        match limit {
            Limit::MicroUsd(_) => self.micro_usd,
            Limit::Tokens(_) => self.tokens,
        }
    }
}

/// The caller's budgets, checked (rows this server cannot read are left out).
pub async fn budgets_of(store: &UserStore) -> StoreResult<Vec<Budget>> {
    Ok(store
        .list_budgets()
        .await?
        .iter()
        .filter_map(Budget::from_record)
        .collect())
}

/// Every budget that holds the caller's calls: their own and their teams' (one query).
pub async fn budgets_holding(store: &UserStore) -> StoreResult<Vec<Budget>> {
    Ok(store
        .budgets_holding()
        .await?
        .iter()
        .filter_map(Budget::from_record)
        .collect())
}

/// Why a call may not go out.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// A budget has no room for the call (`budget_exceeded`, 402).
    #[error("{message}")]
    Exceeded {
        message: String,
        details: Box<BudgetExceededDetails>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a call holds on the budgets it falls under, until [`Reservation::settle`].
#[derive(Debug)]
pub struct Reservation {
    /// (reservation id, its budget): settled in the budget's unit.
    held: Vec<(String, Budget)>,
}

/// The shares of a limit at which the user is warned, once per period each.
pub const WARNING_THRESHOLDS: [u32; 3] = [50, 80, 100];

impl Reservation {
    /// Settles to what the call `used`, then warns (once per period and threshold) of each
    /// budget now past 50, 80 or 100% of its limit: the warnings to publish with
    /// [`publish_warnings`]. A failure is logged (a reservation not settled stops counting
    /// when it expires).
    pub async fn settle(self, store: &UserStore, used: CallBound) -> Vec<BudgetWarning> {
        let settlements: Vec<(String, i64)> = self
            .held
            .iter()
            .map(|(id, budget)| (id.clone(), used.in_unit(budget.limit)))
            .collect();
        if let Err(err) = store.settle_reservations(&settlements).await {
            tracing::warn!(error = %err, "could not settle a budget reservation");
            return Vec::new();
        }
        let now = crate::clock::now_ms();
        let mut warnings = Vec::new();
        for (_, budget) in &self.held {
            let window = budget.window(now);
            let limit = budget.limit.amount();
            let spent = match store
                .budget_spent(&budget.id, window.start_ms, window.end_ms, now)
                .await
            {
                Ok(spent) => spent,
                Err(err) => {
                    tracing::warn!(error = %err, "could not read a budget's spending");
                    continue;
                }
            };
            for threshold in WARNING_THRESHOLDS {
                // spent / limit >= threshold %, in integers.
                if i128::from(spent) * 100 < i128::from(limit) * i128::from(threshold) {
                    continue;
                }
                match store
                    .claim_budget_notice(&budget.id, window.start_ms, i64::from(threshold))
                    .await
                {
                    Ok(true) => warnings.push(BudgetWarning {
                        budget_id: budget.id.clone(),
                        scope: budget.scope.name().into(),
                        scope_id: budget.scope.id(),
                        threshold,
                        unit: budget.limit.unit().into(),
                        limit: budget.limit.shown(limit),
                        spent: budget.limit.shown(spent),
                        resets_at: ms_to_rfc3339(window.resets_at_ms),
                    }),
                    Ok(false) => {}
                    Err(err) => tracing::warn!(error = %err, "could not record a budget warning"),
                }
            }
        }
        warnings
    }
}

/// Sends `warnings` to `user`'s open sockets as `budget_warning` frames.
pub fn publish_warnings(bus: &dyn EventBus, user: UserId, warnings: Vec<BudgetWarning>) {
    for warning in warnings {
        metrics::counter!("apex_budget_warnings_total", "threshold" => warning.threshold.to_string())
            .increment(1);
        let mut frame = serde_json::to_value(&warning).unwrap_or_default();
        frame["type"] = serde_json::Value::String("budget_warning".into());
        bus.publish(std::sync::Arc::new(BusEvent::notice(
            user,
            frame.to_string(),
        )));
    }
}

/// Reserves `bound` on every budget of the caller that counts a call with `key` to
/// `model`. `Ok(None)` when none does; `budget_exceeded` (402) when one has no room.
pub async fn reserve(
    store: &UserStore,
    key: Option<&str>,
    model: &str,
    bound: CallBound,
    now_ms: i64,
) -> Result<Option<Reservation>, BudgetError> {
    let budgets: Vec<Budget> = budgets_holding(store)
        .await?
        .into_iter()
        .filter(|b| b.counts(key, model))
        .collect();
    if budgets.is_empty() {
        return Ok(None);
    }
    let bucket_ms = bucket_of(now_ms);
    let charges: Vec<BudgetCharge> = budgets
        .iter()
        .map(|b| {
            let window = b.window(now_ms);
            BudgetCharge {
                budget_id: b.id.clone(),
                reservation_id: format!("res_{}", uuid::Uuid::new_v4().simple()),
                amount: bound.in_unit(b.limit),
                limit: b.limit.amount(),
                window_start_ms: window.start_ms,
                window_end_ms: window.end_ms,
                bucket_ms,
            }
        })
        .collect();
    match store
        .reserve_budgets(&charges, now_ms, now_ms + RESERVATION_TTL_MS)
        .await?
    {
        ReserveOutcome::Reserved => Ok(Some(Reservation {
            held: charges
                .into_iter()
                .zip(budgets.iter().cloned())
                .map(|(c, b)| (c.reservation_id, b))
                .collect(),
        })),
        ReserveOutcome::Exceeded { budget_id, spent } => {
            // The store refuses only on a budget it was given.
            let budget = budgets
                .iter()
                .find(|b| b.id == budget_id)
                .unwrap_or(&budgets[0]);
            metrics::counter!("apex_budget_rejections_total", "scope" => budget.scope.name())
                .increment(1);
            Err(exceeded(budget, spent, bound, now_ms))
        }
    }
}

fn exceeded(budget: &Budget, spent: i64, bound: CallBound, now_ms: i64) -> BudgetError {
    let limit = budget.limit;
    let window = budget.window(now_ms);
    let details = BudgetExceededDetails {
        budget_id: budget.id.clone(),
        scope: budget.scope.name().into(),
        scope_id: budget.scope.id(),
        unit: limit.unit().into(),
        limit: limit.shown(limit.amount()),
        spent: limit.shown(spent),
        requested: limit.shown(bound.in_unit(limit)),
        resets_at: ms_to_rfc3339(window.resets_at_ms),
    };
    let what = match &budget.scope {
        Scope::User => "your".to_string(),
        Scope::Key(id) => format!("the API key {id}'s"),
        Scope::Model(model) => format!("the {model}"),
        Scope::Team(team) => format!("the team {team}'s"),
    };
    BudgetError::Exceeded {
        message: format!(
            "this call could cost up to {} {} and would go past {what} {} budget ({} of {} spent); it resets at {}",
            details.requested,
            details.unit,
            budget.period.name(),
            details.spent,
            details.limit,
            details.resets_at
        ),
        details: Box::new(details),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::parse_rfc3339_ms;

    fn at(ts: &str) -> i64 {
        parse_rfc3339_ms(ts).unwrap()
    }

    #[test]
    fn periods_are_utc_days_weeks_months_and_rolling_windows() {
        // Wednesday 2026-12-02 15:00 UTC.
        let now = at("2026-12-02T15:00:00Z");
        let w = Period::Day.window(now, Tz::UTC);
        assert_eq!(
            (w.start_ms, w.end_ms),
            (at("2026-12-02T00:00:00Z"), at("2026-12-03T00:00:00Z"))
        );
        let w = Period::Week.window(now, Tz::UTC);
        assert_eq!(
            (w.start_ms, w.end_ms),
            (at("2026-11-30T00:00:00Z"), at("2026-12-07T00:00:00Z"))
        );
        let w = Period::Month.window(now, Tz::UTC);
        assert_eq!(
            (w.start_ms, w.end_ms),
            (at("2026-12-01T00:00:00Z"), at("2027-01-01T00:00:00Z"))
        );
        let w = Period::RollingDays(7).window(now, Tz::UTC);
        assert_eq!(
            (w.start_ms, w.end_ms),
            (at("2026-11-26T00:00:00Z"), at("2026-12-03T00:00:00Z"))
        );
        assert!(Period::parse("rolling_days", None).is_err());
        // In a time zone, its midnights: Kolkata is UTC+5:30, so its 2 December starts at
        // 18:30 UTC on the 1st; at 20:00 UTC on the 2nd it is already the 3rd there.
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let w = Period::Day.window(now, kolkata);
        assert_eq!(
            (w.start_ms, w.end_ms),
            (at("2026-12-01T18:30:00Z"), at("2026-12-02T18:30:00Z"))
        );
        let w = Period::Day.window(at("2026-12-02T20:00:00Z"), kolkata);
        assert_eq!(w.start_ms, at("2026-12-02T18:30:00Z"));
        // A day with a daylight-saving change is 23 hours long: New York, 8 March 2026.
        let new_york: Tz = "America/New_York".parse().unwrap();
        let w = Period::Day.window(at("2026-03-08T12:00:00Z"), new_york);
        assert_eq!(
            (w.start_ms, w.end_ms),
            (at("2026-03-08T05:00:00Z"), at("2026-03-09T04:00:00Z"))
        );
        let w = Period::Month.window(at("2026-03-31T23:00:00Z"), new_york);
        assert_eq!(
            (w.start_ms, w.end_ms),
            (at("2026-03-01T05:00:00Z"), at("2026-04-01T04:00:00Z"))
        );
        // Every window starts on a usage bucket's boundary.
        for tz in [
            Tz::UTC,
            kolkata,
            new_york,
            "Asia/Kathmandu".parse().unwrap(),
        ] {
            let w = Period::Week.window(now, tz);
            assert_eq!(bucket_of(w.start_ms), w.start_ms, "{tz}");
        }
        assert!(Period::parse("day", Some(3)).is_err());
        assert!(Period::parse("fortnight", None).is_err());
    }

    #[test]
    fn a_budget_counts_its_own_calls_only() {
        let input = |scope: &str, id: Option<&str>| BudgetInput {
            scope: scope.into(),
            scope_id: id.map(str::to_string),
            limit_usd: Some(1.0),
            limit_tokens: None,
            period: "day".into(),
            days: None,
            timezone: None,
        };
        let user = new_budget(&input("user", None), 0).unwrap();
        let key = new_budget(&input("key", Some("key_1")), 0).unwrap();
        let model = new_budget(&input("model", Some("GPT-4o")), 0).unwrap();
        assert!(user.counts(None, "anything"));
        assert!(
            key.counts(Some("key_1"), "x")
                && !key.counts(Some("key_2"), "x")
                && !key.counts(None, "x")
        );
        assert!(model.counts(None, "gpt-4o-2024-08-06") && !model.counts(None, "gpt-4o-mini"));
        assert!(new_budget(&input("key", None), 0).is_err());
        assert!(new_budget(&input("team", None), 0).is_err());
        assert!(new_budget(&input("org", Some("x")), 0).is_err());
        let both = BudgetInput {
            limit_tokens: Some(5),
            ..input("user", None)
        };
        assert!(new_budget(&both, 0).is_err());
        // Stored and read back unchanged.
        assert_eq!(Budget::from_record(&model.record(1)), Some(model));
        let paris = BudgetInput {
            timezone: Some("Europe/Paris".into()),
            ..input("user", None)
        };
        assert_eq!(
            new_budget(&paris, 0).unwrap().timezone,
            chrono_tz::Europe::Paris
        );
        let nowhere = BudgetInput {
            timezone: Some("Mars/Olympus".into()),
            ..input("user", None)
        };
        assert!(new_budget(&nowhere, 0).unwrap_err().contains("timezone"));
    }

    #[test]
    fn a_calls_bound_is_its_prompt_at_a_token_a_character_and_its_max_output() {
        let book = crate::usage::price_book::PriceBook::builtin(
            &crate::usage::pricing::PricingTable::builtin(),
        );
        let prices = book.for_user(&[]);
        let now = at("2026-12-02T15:00:00Z");
        // gpt-4o-mini: $0.15 in, $0.60 out. 1,000 chars + 500 out = 150 + 300 µ$.
        let bound = CallBound::of_call(&prices, "gpt-4o-mini", now, 1000, Some(500));
        assert_eq!(
            bound,
            CallBound {
                micro_usd: 450,
                tokens: 1500
            }
        );
        let default = CallBound::of_call(&prices, "gpt-4o-mini", now, 0, None);
        assert_eq!(default.tokens, DEFAULT_MAX_OUTPUT_TOKENS);
        // Unknown model: no USD, tokens still counted.
        let unknown = CallBound::of_call(&prices, "my-model", now, 10, Some(10));
        assert_eq!(
            unknown,
            CallBound {
                micro_usd: 0,
                tokens: 20
            }
        );
    }
}
