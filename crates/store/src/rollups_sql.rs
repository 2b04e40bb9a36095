//! The rollups' SQL (see [`crate::rollups`]): storing what rows add or take away, in the
//! transaction that adds or takes them, and reading a window back. A child of `shared.rs`,
//! compiled with it for each engine.
//!
//! A window `[since, until]` is read as its whole UTC days from the rollups and its partial
//! days at either edge from the rows (unless the edge day's rollups settle it: see
//! [`read_window`]), folded in memory with the same code that folds rows on their way in;
//! so a figure is the same whichever way its rows were counted.

use std::collections::BTreeSet;

use sqlx::{Pool, QueryBuilder, Row};

use super::usage_sql::{usage_rows, ROW_COLUMNS};
use super::{Db, DbRow, ENGINE};
use crate::ids::UserId;
use crate::records::{StoreError, StoreResult, UsageRow};
use crate::rollups::{day_of, Group, GroupKey, Rollup, Sketches};

type Conn = <Db as sqlx::Database>::Connection;

const DAY_MS: i128 = 24 * 3600 * 1000;

/// Whether a delta adds rows to the rollups or takes them away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    Add,
    Remove,
}

impl Change {
    fn sign(self) -> i64 {
        match self {
            Change::Add => 1,
            Change::Remove => -1,
        }
    }
}

/// The columns of `usage_rollups` after its key, in [`decode_group`]'s order.
const GROUP_COLUMNS: &str = "row_count, requests, errors, timed_requests, prompt_tokens, \
     completion_tokens, cached_tokens, reasoning_tokens, cost_usd, last_ts, short_requests, \
     short_prompt_tokens, short_completion_tokens, short_cost_usd, latency_sketch, \
     completion_sketch";

/// A row selected as `day, provider, model, workload, source, {GROUP_COLUMNS}`.
fn decode_group(row: &DbRow) -> StoreResult<(GroupKey, Group)> {
    let key = GroupKey {
        day: row.try_get(0)?,
        provider: row.try_get(1)?,
        model: row.try_get(2)?,
        workload: row.try_get(3)?,
        source: row.try_get(4)?,
    };
    let mut group = Group {
        rows: row.try_get(5)?,
        requests: row.try_get(6)?,
        errors: row.try_get(7)?,
        timed_requests: row.try_get(8)?,
        prompt_tokens: row.try_get(9)?,
        completion_tokens: row.try_get(10)?,
        cached_tokens: row.try_get(11)?,
        reasoning_tokens: row.try_get(12)?,
        cost_usd: row.try_get(13)?,
        last_ts_ms: row.try_get(14)?,
        short_requests: row.try_get(15)?,
        short_prompt_tokens: row.try_get(16)?,
        short_completion_tokens: row.try_get(17)?,
        short_cost_usd: row.try_get(18)?,
        ..Group::default()
    };
    // Borrowed from the row: a window read decodes a hundred or more of these.
    let latency: &str = row.try_get(19)?;
    let completion: &str = row.try_get(20)?;
    group
        .read_sketches(latency, completion)
        .ok_or_else(|| StoreError::Corrupt("usage rollup sketch".into()))?;
    Ok((key, group))
}

/// Appends ` WHERE user_id = _ AND day IN (_, ...)`.
fn push_days(q: &mut QueryBuilder<'_, Db>, owner: UserId, days: &BTreeSet<i64>) {
    q.push(" WHERE user_id = ")
        .push_bind(owner.to_string())
        .push(" AND day IN (");
    let mut list = q.separated(", ");
    for day in days {
        list.push_bind(*day);
    }
    q.push(")");
}

/// Groups written per statement: 22 bound parameters each, within SQLite's 32,766.
const UPSERT_CHUNK: usize = 1000;

/// Folds `rows` of `owner` into the rollups (`Add`) or takes them out again (`Remove`).
/// Runs on the caller's connection, inside the transaction that wrote or deleted the rows.
///
/// The groups the rows touch are read, changed in memory (the sketches are text) and
/// written back whole. Two transactions must not do that to one user's groups at once, or
/// one's change would be lost: SQLite's one writer already serialises them; on PostgreSQL
/// the transaction first takes the user's rollup lock.
pub(super) async fn apply(
    conn: &mut Conn,
    owner: UserId,
    rows: &[UsageRow],
    change: Change,
) -> StoreResult<()> {
    if rows.is_empty() {
        return Ok(());
    }
    if let Some(lock) = ENGINE.serialise_rollups() {
        sqlx::query(lock)
            .bind(owner.to_string())
            .execute(&mut *conn)
            .await?;
    }
    let delta = Rollup::of(rows);
    let days: BTreeSet<i64> = delta.groups.keys().map(|k| k.day).collect();
    let mut q = QueryBuilder::new(format!(
        "SELECT day, provider, model, workload, source, {GROUP_COLUMNS} FROM usage_rollups"
    ));
    push_days(&mut q, owner, &days);
    let mut stored = Rollup::default();
    for row in q.build().fetch_all(&mut *conn).await? {
        let (key, group) = decode_group(&row)?;
        stored.groups.insert(key, group);
    }
    let mut changed: Vec<(GroupKey, Group)> = Vec::new();
    let mut emptied: Vec<GroupKey> = Vec::new();
    for (key, g) in delta.groups {
        let mut group = stored.groups.remove(&key).unwrap_or_else(|| Group {
            last_ts_ms: g.last_ts_ms,
            ..Group::default()
        });
        group.absorb(&g, change.sign());
        if group.rows <= 0 {
            emptied.push(key);
        } else {
            changed.push((key, group));
        }
    }
    for chunk in changed.chunks(UPSERT_CHUNK) {
        let mut q: QueryBuilder<Db> = QueryBuilder::new(format!(
            "INSERT INTO usage_rollups (user_id, day, provider, model, workload, source, \
             {GROUP_COLUMNS}) "
        ));
        q.push_values(chunk, |mut b, (key, g)| {
            b.push_bind(owner.to_string())
                .push_bind(key.day)
                .push_bind(key.provider.clone())
                .push_bind(key.model.clone())
                .push_bind(key.workload.clone())
                .push_bind(key.source.clone())
                .push_bind(g.rows)
                .push_bind(g.requests)
                .push_bind(g.errors)
                .push_bind(g.timed_requests)
                .push_bind(g.prompt_tokens)
                .push_bind(g.completion_tokens)
                .push_bind(g.cached_tokens)
                .push_bind(g.reasoning_tokens)
                .push_bind(g.cost_usd)
                .push_bind(g.last_ts_ms)
                .push_bind(g.short_requests)
                .push_bind(g.short_prompt_tokens)
                .push_bind(g.short_completion_tokens)
                .push_bind(g.short_cost_usd)
                .push_bind(g.latency_text())
                .push_bind(g.completion_text());
        });
        q.push(
            " ON CONFLICT (user_id, day, provider, model, workload, source) DO UPDATE SET \
             row_count = excluded.row_count, requests = excluded.requests, \
             errors = excluded.errors, timed_requests = excluded.timed_requests, \
             prompt_tokens = excluded.prompt_tokens, \
             completion_tokens = excluded.completion_tokens, \
             cached_tokens = excluded.cached_tokens, \
             reasoning_tokens = excluded.reasoning_tokens, cost_usd = excluded.cost_usd, \
             last_ts = excluded.last_ts, short_requests = excluded.short_requests, \
             short_prompt_tokens = excluded.short_prompt_tokens, \
             short_completion_tokens = excluded.short_completion_tokens, \
             short_cost_usd = excluded.short_cost_usd, \
             latency_sketch = excluded.latency_sketch, \
             completion_sketch = excluded.completion_sketch",
        );
        q.build().execute(&mut *conn).await?;
    }
    for key in &emptied {
        sqlx::query(
            "DELETE FROM usage_rollups WHERE user_id = $1 AND day = $2 AND provider = $3 \
             AND model = $4 AND workload = $5 AND source = $6",
        )
        .bind(owner.to_string())
        .bind(key.day)
        .bind(&key.provider)
        .bind(&key.model)
        .bind(&key.workload)
        .bind(&key.source)
        .execute(&mut *conn)
        .await?;
    }
    if change == Change::Remove {
        // Taking rows away cannot lower a latest time: it is read from the rows left.
        let mut q: QueryBuilder<Db> = QueryBuilder::new(
            "UPDATE usage_rollups SET last_ts = (SELECT MAX(e.ts) FROM workload_events e \
             WHERE e.user_id = usage_rollups.user_id AND e.provider = usage_rollups.provider \
             AND e.model = usage_rollups.model AND e.workload = usage_rollups.workload \
             AND e.source = usage_rollups.source AND e.ts >= usage_rollups.day * ",
        );
        q.push_bind(DAY_MS as i64)
            .push(" AND e.ts < (usage_rollups.day + 1) * ")
            .push_bind(DAY_MS as i64)
            .push(")");
        push_days(&mut q, owner, &days);
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// How a window splits: whole days read from the rollups, ranges of rows at its edges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WindowSplit {
    /// First and last whole day, if any.
    pub(super) days: Option<(i64, i64)>,
    /// Inclusive ranges of instants read from the rows.
    pub(super) edges: Vec<(i64, i64)>,
}

/// Splits `[since, until]` (inclusive) into whole UTC days and the partial days' ranges.
pub(super) fn split_window(since: i64, until: i64) -> WindowSplit {
    if since > until {
        return WindowSplit {
            days: None,
            edges: Vec::new(),
        };
    }
    let (since, until) = (i128::from(since), i128::from(until));
    // The first day starting at or after `since`, the last ending at or before `until`.
    let first = (since + DAY_MS - 1).div_euclid(DAY_MS);
    let last = (until + 1).div_euclid(DAY_MS) - 1;
    let clamp = |v: i128| v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
    if first > last {
        return WindowSplit {
            days: None,
            edges: vec![(clamp(since), clamp(until))],
        };
    }
    let mut edges = Vec::new();
    if since < first * DAY_MS {
        edges.push((clamp(since), clamp(first * DAY_MS - 1)));
    }
    if (last + 1) * DAY_MS <= until {
        edges.push((clamp((last + 1) * DAY_MS), clamp(until)));
    }
    WindowSplit {
        days: Some((clamp(first), clamp(last))),
        edges,
    }
}

/// `owner`'s rollup of the rows dated in `[since, until]`.
///
/// One read of the rollups of every day the window touches, its partial edge days
/// included: an edge day's groups say, by their latest instant, whether any of its rows
/// can be in the window at all, or whether all of them are (the window ends after the last
/// row of its last day, which is the usual case for a window ending now). Only an edge
/// day neither of those settles has its rows read.
pub(super) async fn read_window(
    pool: &Pool<Db>,
    owner: UserId,
    since: i64,
    until: i64,
    sketches: Sketches,
) -> StoreResult<Rollup> {
    Ok(read_window_and_after(pool, owner, since, until, sketches, false)
        .await?
        .0)
}

/// [`read_window`], and with `after`, from the same read of the rollups, the rollup of the
/// rows dated after `until` when the rollups settle it: `None` when some row of `until`'s
/// day is dated after `until` (or `after` is false).
pub(super) async fn read_window_and_after(
    pool: &Pool<Db>,
    owner: UserId,
    since: i64,
    until: i64,
    sketches: Sketches,
    after: bool,
) -> StoreResult<(Rollup, Option<Rollup>)> {
    let split = split_window(since, until);
    let mut rollup = Rollup::default();
    if split.days.is_none() && split.edges.is_empty() {
        return Ok((rollup, None));
    }
    // A sketch not asked for is neither sent nor parsed.
    let columns = GROUP_COLUMNS
        .replace(
            "latency_sketch",
            if sketches.latency { "latency_sketch" } else { "''" },
        )
        .replace(
            "completion_sketch",
            if sketches.completion { "completion_sketch" } else { "''" },
        );
    let mut q = QueryBuilder::new(format!(
        "SELECT day, provider, model, workload, source, {columns} FROM usage_rollups \
         WHERE user_id = "
    ));
    let end_day = day_of(until);
    q.push_bind(owner.to_string())
        .push(" AND day >= ")
        .push_bind(day_of(since));
    if !after {
        q.push(" AND day <= ").push_bind(end_day);
    }
    let whole = |day: i64| split.days.is_some_and(|(first, last)| first <= day && day <= last);
    let mut edge_days: Vec<(GroupKey, Group)> = Vec::new();
    let mut later = Rollup::default();
    for row in q.build().fetch_all(pool).await? {
        let (key, group) = decode_group(&row)?;
        if whole(key.day) {
            rollup.groups.insert(key, group);
        } else if key.day > end_day {
            later.groups.insert(key, group);
        } else {
            edge_days.push((key, group));
        }
    }
    // Nothing of `until`'s day is after it when `until` ends the day, or when the day's
    // rows all precede it.
    let ends_its_day = (i128::from(until) + 1).rem_euclid(DAY_MS) == 0;
    let after = (after
        && (ends_its_day
            || edge_days
                .iter()
                .filter(|(key, _)| key.day == end_day)
                .all(|(_, g)| g.last_ts_ms <= until)))
    .then_some(later);
    let mut unsettled = Vec::new();
    for &(from, to) in &split.edges {
        let day = day_of(from);
        let groups = || edge_days.iter().filter(move |(key, _)| key.day == day);
        if groups().all(|(_, g)| g.last_ts_ms < from) {
            // No row of that day is at or after `from` (or the day has none).
            continue;
        }
        if i128::from(from) == i128::from(day) * DAY_MS && groups().all(|(_, g)| g.last_ts_ms <= to) {
            // The range starts with its day and ends after the day's last row.
            for (key, group) in groups() {
                rollup.groups.insert(key.clone(), group.clone());
            }
            continue;
        }
        unsettled.push((from, to));
    }
    if !unsettled.is_empty() {
        let mut q = QueryBuilder::new(format!(
            "SELECT {ROW_COLUMNS} FROM workload_events WHERE user_id = "
        ));
        q.push_bind(owner.to_string()).push(" AND (");
        for (i, (from, to)) in unsettled.iter().enumerate() {
            if i > 0 {
                q.push(" OR ");
            }
            q.push("(ts >= ")
                .push_bind(*from)
                .push(" AND ts <= ")
                .push_bind(*to)
                .push(")");
        }
        // In a fixed order, so the money adds up the same way at every read.
        q.push(") ORDER BY ts, id");
        let rows = usage_rows(&q.build().fetch_all(pool).await?)?;
        let mut edges = Rollup::of(&rows);
        for g in edges.groups.values_mut() {
            if !sketches.latency {
                g.latency.clear();
            }
            if !sketches.completion {
                g.completion.clear();
            }
        }
        rollup.merge(edges);
    }
    Ok((rollup, after))
}

/// Folds the rows stored before the rollups existed, once: the instance that takes the
/// backfill marker does it in the same transaction, so another instance starting at the
/// same time neither repeats it nor reads half of it.
pub(crate) async fn backfill(pool: &Pool<Db>) -> StoreResult<()> {
    let mut tx = pool.begin().await?;
    let taken = sqlx::query("DELETE FROM usage_rollup_backfill")
        .execute(&mut *tx)
        .await?
        .rows_affected();
    if taken == 0 {
        return Ok(());
    }
    let owners: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT user_id FROM workload_events ORDER BY user_id")
            .fetch_all(&mut *tx)
            .await?;
    for owner in owners {
        let Ok(id) = UserId::parse(&owner) else {
            tracing::warn!("usage rows of a user id that does not parse were not rolled up");
            continue;
        };
        let rows = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM workload_events WHERE user_id = $1 ORDER BY ts, id"
        ))
        .bind(&owner)
        .fetch_all(&mut *tx)
        .await?;
        let rows = usage_rows(&rows)?;
        apply(&mut tx, id, &rows, Change::Add).await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: i64 = DAY_MS as i64;

    #[test]
    fn a_window_splits_into_whole_days_and_its_edges() {
        // Exactly days 2..=4.
        assert_eq!(
            split_window(2 * D, 5 * D - 1),
            WindowSplit {
                days: Some((2, 4)),
                edges: vec![],
            }
        );
        // From mid-day 1 to mid-day 5.
        assert_eq!(
            split_window(D + 7, 5 * D + 9),
            WindowSplit {
                days: Some((2, 4)),
                edges: vec![(D + 7, 2 * D - 1), (5 * D, 5 * D + 9)],
            }
        );
        // Within one day.
        assert_eq!(
            split_window(D + 7, D + 9),
            WindowSplit {
                days: None,
                edges: vec![(D + 7, D + 9)],
            }
        );
        // Everything after an instant, and before 1970.
        let open = split_window(-D - 5, i64::MAX);
        assert_eq!(open.days.map(|d| d.0), Some(-1));
        assert_eq!(open.edges[0], (-D - 5, -D - 1));
        assert!(split_window(5, 4).edges.is_empty());
    }
}
