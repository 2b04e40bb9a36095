//! Alerts before the bill: rules on a user's (or their team's) analysed usage, evaluated
//! on a schedule, and scheduled reports, delivered to the page and to webhooks.
//!
//! - This file: what a rule is ([`Rule`], its [`Kind`] and [`Schedule`]), checked from
//!   what a client sent ([`new_rule`]), and the API's views.
//! - [`evaluate`]: what a rule finds at a tick (spend over a threshold, a day far above
//!   the trailing baseline, a budget that runs out before its period ends, a report).
//! - [`ticker`]: the background task that takes due ticks (exactly one instance takes
//!   each, by compare-and-set on the rule's next tick), records what a rule raised (at
//!   most once per rule and period), starts the run that explains it, and tells the
//!   user's sockets and webhooks.
//! - [`webhooks`]: Standard Webhooks: signing, the delivery queue with retries for a day,
//!   the delivery log and redelivery.
//!
//! A rule acts for the user who made it, as that user: its ticks read only their usage
//! (or, while they still manage it, their team's aggregates) and its runs are theirs.

pub mod evaluate;
pub mod ticker;
pub mod webhooks;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use serde_json::{json, Value};

use crate::budgets::{timezone_of, Period};
use crate::clock::ms_to_rfc3339;
use crate::ids::UserId;
use crate::store::{AlertRecord, AlertRuleRecord};
use apex_protocol::alerts::{Alert, AlertRule, AlertRuleInput};

pub use ticker::Alerting;

/// What the report run is asked when a `report` rule names no message.
pub const DEFAULT_REPORT_MESSAGE: &str =
    "Write my cost report: what my AI usage cost this week, which models and workloads \
     drove it, and the most valuable ways to cut it.";

/// What a rule watches.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Spend in the current `period` reached `threshold_usd`.
    SpendOver { threshold_usd: f64, period: Period },
    /// The last whole day's spend is `percent` above the average day of the
    /// `baseline_days` days before it.
    SpendChange { percent: f64, baseline_days: u32 },
    /// At the pace of its period so far, budget `budget_id` passes its limit before the
    /// period ends.
    BudgetForecast { budget_id: String },
    /// A pipeline run asked `message`, at every tick.
    Report { message: String },
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::SpendOver { .. } => "spend_over",
            Kind::SpendChange { .. } => "spend_change",
            Kind::BudgetForecast { .. } => "budget_forecast",
            Kind::Report { .. } => "report",
        }
    }

    /// The kind's settings as stored (and shown).
    fn params(&self, explain: bool) -> Value {
        let mut params = match self {
            Kind::SpendOver {
                threshold_usd,
                period,
            } => json!({ "threshold_usd": threshold_usd, "period": period.name() }),
            Kind::SpendChange {
                percent,
                baseline_days,
            } => json!({ "percent": percent, "baseline_days": baseline_days }),
            Kind::BudgetForecast { budget_id } => json!({ "budget_id": budget_id }),
            Kind::Report { message } => json!({ "message": message }),
        };
        params["explain"] = Value::Bool(explain);
        params
    }

    fn from_params(kind: &str, p: &Value) -> Option<Self> {
        Some(match kind {
            "spend_over" => Kind::SpendOver {
                threshold_usd: p["threshold_usd"].as_f64()?,
                period: Period::parse(p["period"].as_str()?, None).ok()?,
            },
            "spend_change" => Kind::SpendChange {
                percent: p["percent"].as_f64()?,
                baseline_days: u32::try_from(p["baseline_days"].as_u64()?).ok()?,
            },
            "budget_forecast" => Kind::BudgetForecast {
                budget_id: p["budget_id"].as_str()?.to_string(),
            },
            "report" => Kind::Report {
                message: p["message"].as_str()?.to_string(),
            },
            _ => return None,
        })
    }
}

/// How often a rule is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Every {
    Hour,
    Day,
    /// Mondays.
    Week,
}

impl Every {
    fn parse(name: &str) -> Result<Self, String> {
        match name {
            "hour" => Ok(Every::Hour),
            "day" => Ok(Every::Day),
            "week" => Ok(Every::Week),
            other => Err(format!("every {other:?} is not one of hour, day, week")),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Every::Hour => "hour",
            Every::Day => "day",
            Every::Week => "week",
        }
    }
}

/// When a rule's ticks fall: every hour, or every day or Monday at `at_hour` in `tz`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub every: Every,
    pub at_hour: u32,
    pub tz: Tz,
}

impl Schedule {
    /// The first tick strictly after `now_ms`. A rule whose ticks were missed (every
    /// instance was down) is taken once on return and then moves here: never once per
    /// missed tick.
    pub fn next_after(&self, now_ms: i64) -> i64 {
        const HOUR_MS: i64 = 3600 * 1000;
        if self.every == Every::Hour {
            return (now_ms.div_euclid(HOUR_MS) + 1) * HOUR_MS;
        }
        let now = Utc
            .timestamp_millis_opt(now_ms)
            .single()
            .unwrap_or(DateTime::UNIX_EPOCH);
        let today = now.with_timezone(&self.tz).date_naive();
        // Today's slot or a later one; a week has at most 7 candidate days, and a day
        // whose hour a daylight-saving change skips has its slot an hour later.
        (0..=8)
            .map(|d| today + Duration::days(d))
            .filter(|day| self.every == Every::Day || day.weekday() == chrono::Weekday::Mon)
            .map(|day| self.slot_on(day))
            .find(|&slot| slot > now_ms)
            .unwrap_or(now_ms + 7 * 24 * HOUR_MS)
    }

    /// `at_hour` on `day` in the schedule's zone, in unix ms.
    fn slot_on(&self, day: NaiveDate) -> i64 {
        let at = day
            .and_hms_opt(self.at_hour, 0, 0)
            .unwrap_or_else(|| day.and_hms_opt(0, 0, 0).unwrap_or_default());
        (0..=2)
            .find_map(|h| {
                self.tz
                    .from_local_datetime(&(at + Duration::hours(h)))
                    .earliest()
            })
            .map(|t| t.timestamp_millis())
            .unwrap_or_else(|| at.and_utc().timestamp_millis())
    }
}

/// A rule as the server works with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub team_id: Option<String>,
    pub kind: Kind,
    pub schedule: Schedule,
    /// Start a run that explains each alert.
    pub explain: bool,
}

impl Rule {
    /// `None` for a row this server cannot read (written by a newer version).
    pub fn from_record(r: &AlertRuleRecord) -> Option<Self> {
        Some(Rule {
            id: r.id.clone(),
            team_id: r.team_id.clone(),
            kind: Kind::from_params(&r.kind, &r.params)?,
            schedule: Schedule {
                every: Every::parse(&r.every).ok()?,
                at_hour: u32::try_from(r.at_hour).ok().filter(|h| *h < 24)?,
                tz: r.timezone.parse().ok()?,
            },
            explain: r.params["explain"].as_bool().unwrap_or(true),
        })
    }
}

fn positive(value: Option<f64>, name: &str) -> Result<Option<f64>, String> {
    match value {
        Some(v) if !v.is_finite() || v <= 0.0 || v > 1e9 => {
            Err(format!("{name} must be a positive number (at most 1e9)"))
        }
        other => Ok(other),
    }
}

/// Longest report message, in characters.
const MAX_MESSAGE_CHARS: usize = 2_000;

/// A new rule from what a client sent, checked. Its first tick is now: a rule is
/// evaluated as soon as it is made, then on its schedule.
pub fn new_rule(
    input: &AlertRuleInput,
    id: String,
    owner: UserId,
    now_ms: i64,
) -> Result<(Rule, AlertRuleRecord), String> {
    let kind = match input.kind.as_str() {
        "spend_over" => Kind::SpendOver {
            threshold_usd: positive(input.threshold_usd, "threshold_usd")?
                .ok_or("spend_over needs threshold_usd")?,
            period: Period::parse(input.period.as_deref().unwrap_or("month"), None).and_then(
                |p| match p {
                    Period::RollingDays(_) => Err("period must be day, week or month".into()),
                    p => Ok(p),
                },
            )?,
        },
        "spend_change" => Kind::SpendChange {
            percent: positive(input.percent, "percent")?.unwrap_or(50.0),
            baseline_days: match input.baseline_days.unwrap_or(7) {
                days @ 1..=90 => days,
                _ => return Err("baseline_days must be from 1 to 90".into()),
            },
        },
        "budget_forecast" => Kind::BudgetForecast {
            budget_id: input
                .budget_id
                .clone()
                .filter(|b| !b.trim().is_empty())
                .ok_or("budget_forecast needs budget_id")?,
        },
        "report" => {
            if input.team_id.is_some() {
                return Err(
                    "a report is a run over your own usage; team reports are not supported".into(),
                );
            }
            let message = input
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .unwrap_or(DEFAULT_REPORT_MESSAGE);
            if message.chars().count() > MAX_MESSAGE_CHARS || message.contains('\0') {
                return Err(format!(
                    "message must be at most {MAX_MESSAGE_CHARS} characters, without NUL"
                ));
            }
            Kind::Report {
                message: message.to_string(),
            }
        }
        other => {
            return Err(format!(
                "kind {other:?} is not one of spend_over, spend_change, budget_forecast, report"
            ))
        }
    };
    if matches!(kind, Kind::BudgetForecast { .. }) && input.team_id.is_some() {
        return Err("budget_forecast watches one of your budgets; give no team_id".into());
    }
    let schedule = Schedule {
        every: Every::parse(input.every.as_deref().unwrap_or("day"))?,
        at_hour: match input.at_hour.unwrap_or(9) {
            h @ 0..=23 => h,
            _ => return Err("at_hour must be from 0 to 23".into()),
        },
        tz: timezone_of(input.timezone.as_deref())?,
    };
    // A team's alerts are about the team: a run over the maker's own usage would not
    // explain them.
    let explain = matches!(kind, Kind::Report { .. })
        || (input.team_id.is_none() && input.explain.unwrap_or(true));
    let rule = Rule {
        id,
        team_id: input.team_id.clone(),
        kind,
        schedule,
        explain,
    };
    let record = AlertRuleRecord {
        id: rule.id.clone(),
        user_id: owner,
        team_id: rule.team_id.clone(),
        kind: rule.kind.name().into(),
        params: rule.kind.params(rule.explain),
        every: rule.schedule.every.name().into(),
        at_hour: i64::from(rule.schedule.at_hour),
        timezone: rule.schedule.tz.name().into(),
        next_tick_at_ms: now_ms,
        last_tick_at_ms: None,
        ticks: 0,
        created_at_ms: now_ms,
    };
    Ok((rule, record))
}

/// The API's view of a stored rule.
pub fn rule_view(r: &AlertRuleRecord) -> AlertRule {
    AlertRule {
        id: r.id.clone(),
        kind: r.kind.clone(),
        team_id: r.team_id.clone(),
        every: r.every.clone(),
        at_hour: u32::try_from(r.at_hour).unwrap_or_default(),
        timezone: r.timezone.clone(),
        params: r.params.clone(),
        next_tick_at: ms_to_rfc3339(r.next_tick_at_ms),
        last_tick_at: r.last_tick_at_ms.map(ms_to_rfc3339),
        ticks: r.ticks,
        created_at: ms_to_rfc3339(r.created_at_ms),
    }
}

/// The API's view of what a rule raised.
pub fn alert_view(a: &AlertRecord) -> Alert {
    Alert {
        id: a.id.clone(),
        rule_id: a.rule_id.clone(),
        kind: a.kind.clone(),
        period: a.period_key.clone(),
        title: a.title.clone(),
        detail: a.detail.clone(),
        value: a.value,
        threshold: a.threshold,
        run_id: a.run_id.clone(),
        thread_id: a.thread_id.clone(),
        created_at: ms_to_rfc3339(a.created_at_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ts: &str) -> i64 {
        DateTime::parse_from_rfc3339(ts).unwrap().timestamp_millis()
    }

    #[test]
    fn the_next_tick_is_the_first_slot_after_now_however_many_were_missed() {
        let daily = Schedule {
            every: Every::Day,
            at_hour: 9,
            tz: Tz::UTC,
        };
        assert_eq!(
            daily.next_after(at("2026-12-03T08:00:00Z")),
            at("2026-12-03T09:00:00Z")
        );
        assert_eq!(
            daily.next_after(at("2026-12-03T09:00:00Z")),
            at("2026-12-04T09:00:00Z")
        );
        // Down for five days: the rule is due once, and its next tick is tomorrow's.
        assert_eq!(
            daily.next_after(at("2026-12-08T10:00:00Z")),
            at("2026-12-09T09:00:00Z")
        );
        let weekly = Schedule {
            every: Every::Week,
            at_hour: 9,
            tz: "Europe/Paris".parse().unwrap(),
        };
        // Thursday 2026-12-03 → Monday 2026-12-07 09:00 in Paris (08:00 UTC).
        assert_eq!(
            weekly.next_after(at("2026-12-03T12:00:00Z")),
            at("2026-12-07T08:00:00Z")
        );
        let hourly = Schedule {
            every: Every::Hour,
            at_hour: 0,
            tz: Tz::UTC,
        };
        assert_eq!(
            hourly.next_after(at("2026-12-03T12:59:59Z")),
            at("2026-12-03T13:00:00Z")
        );
    }

    #[test]
    fn a_slot_skipped_by_daylight_saving_moves_an_hour_later() {
        // Paris skipped 02:00–03:00 on 2026-03-29.
        let daily = Schedule {
            every: Every::Day,
            at_hour: 2,
            tz: "Europe/Paris".parse().unwrap(),
        };
        assert_eq!(
            daily.next_after(at("2026-03-29T00:00:00Z")),
            at("2026-03-29T01:00:00Z")
        );
    }

    #[test]
    fn rules_are_checked_and_read_back_as_made() {
        let input = AlertRuleInput {
            kind: "spend_over".into(),
            threshold_usd: Some(25.0),
            period: Some("week".into()),
            timezone: Some("Europe/Paris".into()),
            ..Default::default()
        };
        let (rule, record) = new_rule(&input, "r1".into(), UserId::generate(), 1_000).unwrap();
        assert_eq!(Rule::from_record(&record), Some(rule.clone()));
        assert!(rule.explain);
        assert_eq!(record.next_tick_at_ms, 1_000, "first evaluated when made");
        for (bad, why) in [
            (
                AlertRuleInput {
                    kind: "spend_over".into(),
                    ..Default::default()
                },
                "threshold",
            ),
            (
                AlertRuleInput {
                    kind: "spend_over".into(),
                    threshold_usd: Some(f64::NAN),
                    ..Default::default()
                },
                "positive",
            ),
            (
                AlertRuleInput {
                    kind: "budget_forecast".into(),
                    ..Default::default()
                },
                "budget_id",
            ),
            (
                AlertRuleInput {
                    kind: "report".into(),
                    team_id: Some("t".into()),
                    ..Default::default()
                },
                "team reports",
            ),
            (
                AlertRuleInput {
                    kind: "spend_change".into(),
                    baseline_days: Some(0),
                    ..Default::default()
                },
                "baseline_days",
            ),
            (
                AlertRuleInput {
                    kind: "report".into(),
                    every: Some("minute".into()),
                    ..Default::default()
                },
                "every",
            ),
            (
                AlertRuleInput {
                    kind: "nope".into(),
                    ..Default::default()
                },
                "kind",
            ),
        ] {
            let err = new_rule(&bad, "r".into(), UserId::generate(), 0).unwrap_err();
            assert!(err.contains(why), "{err} should mention {why}");
        }
        let team = AlertRuleInput {
            kind: "spend_change".into(),
            team_id: Some("t1".into()),
            ..Default::default()
        };
        assert!(
            !new_rule(&team, "r".into(), UserId::generate(), 0)
                .unwrap()
                .0
                .explain
        );
    }
}
