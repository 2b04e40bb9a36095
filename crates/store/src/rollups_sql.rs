//! The rollups' SQL (see [`crate::rollups`]): storing what rows add or take away, in the
//! transaction that adds or takes them, and reading a window back. A child of `shared.rs`,
//! compiled with it for each engine.
//!
//! A window `[since, until]` is read as its whole UTC days from the rollups and its partial
//! days at either edge from the rows (unless the edge day's rollups settle it), as
//! [`crate::window`] plans it, folded in memory with the same code that folds rows on their
//! way in; so a figure is the same whichever way its rows were counted.

use std::collections::BTreeSet;

use sqlx::{Pool, QueryBuilder};

use super::usage_sql::usage_rows;
use super::{Db, SqlxColumns, ENGINE};
use crate::ids::UserId;
use crate::records::{StoreResult, UsageRow};
use crate::rollups::{Group, GroupKey, Rollup, Sketches};
use crate::columns::ROW_COLUMNS;
use crate::window::{decode_group, WindowRead, GROUP_COLUMNS};

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
        let (key, group) = decode_group(&SqlxColumns(&row))?;
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

/// `owner`'s rollup of the rows dated in `[since, until]`, and with `after`, from the same
/// read of the rollups, the rollup of the rows dated after `until` when the rollups settle
/// it: `None` when some row of `until`'s day is dated after `until` (or `after` is false).
/// See [`WindowRead`].
///
/// SQLite reads windows on its reader threads (`sqlite_reads`) instead.
pub(crate) async fn read_window_and_after(
    pool: &Pool<Db>,
    owner: UserId,
    since: i64,
    until: i64,
    sketches: Sketches,
    after: bool,
) -> StoreResult<(Rollup, Option<Rollup>)> {
    let Some(mut read) = WindowRead::new(since, until, sketches, after) else {
        return Ok((Rollup::default(), None));
    };
    let (first_day, last_day) = read.days();
    let mut q = QueryBuilder::new(format!(
        "SELECT day, provider, model, workload, source, {} FROM usage_rollups \
         WHERE user_id = ",
        read.group_columns()
    ));
    q.push_bind(owner.to_string())
        .push(" AND day >= ")
        .push_bind(first_day);
    if let Some(last_day) = last_day {
        q.push(" AND day <= ").push_bind(last_day);
    }
    for row in q.build().fetch_all(pool).await? {
        let (key, group) = decode_group(&SqlxColumns(&row))?;
        read.add_group(key, group);
    }
    let unsettled = read.unsettled();
    let mut rows = Vec::new();
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
        q.push(") ORDER BY ts, id");
        rows = usage_rows(&q.build().fetch_all(pool).await?)?;
    }
    Ok(read.finish(&rows))
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
