//! The usage aggregation queries, written once for both engines.
//!
//! The summary, the daily series and the savings simulation used to load every usage row
//! of the window (about 1,800 per user per run) through sqlx, one row at a time: that
//! decoding, and for SQLite the hand-off of every row from the connection's thread, was
//! the largest CPU cost of a run. These queries group in the database instead and return
//! a handful of rows. The SQL is portable between SQLite and PostgreSQL: placeholders come
//! from [`QueryBuilder`], sums of `BIGINT` columns are cast back to `BIGINT` (PostgreSQL
//! sums them as `NUMERIC`), and constants of other types are bound, not written inline
//! (PostgreSQL reads `1000000.0` as `NUMERIC`).
//!
//! Every query filters by the owner first, like every user-data query of the store.
//!
//! Sums of money must not depend on the order the database visits the rows in, or two
//! reads of the same rows could round to different micro-dollars (the answer of a run and
//! the summary would disagree). SQLite visits them in the order of the `(user_id, ts)`
//! index, always, and sums with compensation; PostgreSQL's order changes with the plan it
//! picks (index or bitmap scan, as its statistics change), so there the costs are summed as
//! `NUMERIC`, exactly. Groups come back ordered, so adding them up in Rust is repeatable too.

use sqlx::{ColumnIndex, Database, Decode, Encode, QueryBuilder, Row, Type};

use crate::engine::Backend;
use crate::ids::UserId;
use crate::records::{
    CompletionRank, SavingsQuery, SavingsTotals, StoreResult, UsageDayTotals, UsageTotals,
};

/// Appends ` WHERE user_id = _ AND ts >= _ AND ts <= _` for the table `alias`.
fn push_window<'q, DB>(
    q: &mut QueryBuilder<'q, DB>,
    alias: &str,
    owner: UserId,
    since: i64,
    until: i64,
) where
    DB: Database,
    String: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
{
    q.push(format!(" WHERE {alias}user_id = "))
        .push_bind(owner.to_string())
        .push(format!(" AND {alias}ts >= "))
        .push_bind(since)
        .push(format!(" AND {alias}ts <= "))
        .push_bind(until);
}

/// Totals per (provider, model, workload) of the rows dated in `[since, until]`.
pub(crate) fn totals<'q, DB>(
    engine: Backend,
    owner: UserId,
    since: i64,
    until: i64,
) -> QueryBuilder<'q, DB>
where
    DB: Database,
    DB::Arguments<'q>: Default,
    String: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new(format!(
        "SELECT provider, model, workload, COUNT(*), \
         CAST(SUM(CASE WHEN status <> 'ok' THEN 1 ELSE 0 END) AS BIGINT), \
         CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT), \
         {} FROM workload_events",
        engine.money_sum("cost_usd")
    ));
    push_window(&mut q, "", owner, since, until);
    q.push(" GROUP BY provider, model, workload ORDER BY provider, model, workload");
    q
}

pub(crate) fn totals_from_row<R>(row: &R) -> StoreResult<UsageTotals>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(UsageTotals {
        provider: row.try_get(0)?,
        model: row.try_get(1)?,
        workload: row.try_get(2)?,
        requests: row.try_get(3)?,
        errors: row.try_get(4)?,
        prompt_tokens: row.try_get(5)?,
        completion_tokens: row.try_get(6)?,
        cost_usd: row.try_get(7)?,
    })
}

/// The latency at each 1-based rank of the window's rows ordered by latency, as
/// (rank, latency) pairs. `ranks` must not be empty.
pub(crate) fn latency_at_ranks<'q, DB>(
    owner: UserId,
    since: i64,
    until: i64,
    ranks: &[i64],
) -> QueryBuilder<'q, DB>
where
    DB: Database,
    DB::Arguments<'q>: Default,
    String: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new(
        "SELECT t.rn, t.latency_ms FROM (SELECT latency_ms, \
         ROW_NUMBER() OVER (ORDER BY latency_ms) AS rn FROM workload_events",
    );
    push_window(&mut q, "", owner, since, until);
    q.push(") t WHERE t.rn IN (");
    let mut list = q.separated(", ");
    for rank in ranks {
        list.push_bind(*rank);
    }
    q.push(")");
    q
}

/// Spend and requests per (UTC day, model) of the rows dated in `[since, until]`. The day
/// is the floor of `ts / 86,400,000` (also for instants before 1970).
pub(crate) fn daily<'q, DB>(
    engine: Backend,
    owner: UserId,
    since: i64,
    until: i64,
) -> QueryBuilder<'q, DB>
where
    DB: Database,
    DB::Arguments<'q>: Default,
    String: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new(format!(
        "SELECT (ts - ((ts % 86400000) + 86400000) % 86400000) / 86400000 AS day, model, \
         COUNT(*), {} FROM workload_events",
        engine.money_sum("cost_usd")
    ));
    push_window(&mut q, "", owner, since, until);
    q.push(" GROUP BY day, model ORDER BY day, model");
    q
}

pub(crate) fn daily_from_row<R>(row: &R) -> StoreResult<UsageDayTotals>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(UsageDayTotals {
        day: row.try_get(0)?,
        model: row.try_get(1)?,
        requests: row.try_get(2)?,
        cost_usd: row.try_get(3)?,
    })
}

/// For each wanted (workload, rank): the completion tokens of the row at that 1-based rank
/// among the workload's rows in `[since, until]` ordered by completion tokens. `wanted`
/// must not be empty.
pub(crate) fn completion_at_ranks<'q, DB>(
    owner: UserId,
    since: i64,
    until: i64,
    wanted: &[CompletionRank],
) -> QueryBuilder<'q, DB>
where
    DB: Database,
    DB::Arguments<'q>: Default,
    String: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new("WITH wanted (workload, rnk) AS (");
    q.push_values(wanted, |mut b, w| {
        b.push_bind(w.workload.clone()).push_bind(w.rank);
    });
    q.push(
        ") SELECT t.workload, t.completion_tokens FROM (SELECT workload, completion_tokens, \
         ROW_NUMBER() OVER (PARTITION BY workload ORDER BY completion_tokens) AS rn \
         FROM workload_events",
    );
    push_window(&mut q, "", owner, since, until);
    q.push(
        " AND workload IN (SELECT workload FROM wanted)) t \
         JOIN wanted w ON w.workload = t.workload AND w.rnk = t.rn",
    );
    q
}

/// Routing and output-cap figures per (workload, model) of the rows in `[since, until]`
/// (see [`SavingsQuery`]). Only rows that count for either are grouped.
pub(crate) fn savings<'q, DB>(
    engine: Backend,
    owner: UserId,
    since: i64,
    until: i64,
    query: &SavingsQuery,
) -> QueryBuilder<'q, DB>
where
    DB: Database,
    DB::Arguments<'q>: Default,
    String: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
    f64: Encode<'q, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new("WITH rates (model, input_rate, output_rate) AS (");
    if query.rates.is_empty() {
        // VALUES needs at least one row; this table has none.
        q.push(
            "SELECT CAST(NULL AS TEXT), CAST(NULL AS DOUBLE PRECISION), \
             CAST(NULL AS DOUBLE PRECISION) WHERE 1 = 0",
        );
    } else {
        q.push_values(&query.rates, |mut b, r| {
            b.push_bind(r.model.clone())
                .push_bind(r.input_per_mtok)
                .push_bind(r.output_per_mtok);
        });
    }
    q.push("), caps (workload, cap) AS (");
    if query.caps.is_empty() {
        q.push("SELECT CAST(NULL AS TEXT), CAST(NULL AS BIGINT) WHERE 1 = 0");
    } else {
        q.push_values(&query.caps, |mut b, c| {
            b.push_bind(c.workload.clone()).push_bind(c.cap);
        });
    }
    // `saved` is the row's cost minus its cost at the alternative's rates, computed with the
    // same float operations, in the same order, as `pricing::cost_at`, so the test
    // `saved > 0` decides every row exactly as the per-row simulation did.
    q.push(
        "), scored AS (SELECT e.workload, e.model, e.completion_tokens, c.cap, \
         CASE WHEN r.model IS NOT NULL AND e.prompt_tokens < ",
    )
    .push_bind(query.short_prompt)
    .push(" AND e.completion_tokens < ")
    .push_bind(query.short_completion)
    .push(
        " THEN e.cost_usd - (e.prompt_tokens * r.input_rate + e.completion_tokens * r.output_rate) / ",
    )
    .push_bind(1_000_000.0f64)
    .push(
        " END AS saved FROM workload_events e LEFT JOIN rates r ON r.model = e.model \
         LEFT JOIN caps c ON c.workload = e.workload",
    );
    push_window(&mut q, "e.", owner, since, until);
    q.push(format!(
        " AND (r.model IS NOT NULL OR c.cap IS NOT NULL)) \
         SELECT workload, model, \
         CAST(SUM(CASE WHEN saved > 0 THEN 1 ELSE 0 END) AS BIGINT), {}, \
         CAST(SUM(CASE WHEN completion_tokens > cap THEN 1 ELSE 0 END) AS BIGINT), \
         CAST(SUM(CASE WHEN completion_tokens > cap THEN completion_tokens - cap ELSE 0 END) \
         AS BIGINT) FROM scored WHERE saved > 0 OR completion_tokens > cap \
         GROUP BY workload, model ORDER BY workload, model",
        engine.money_sum("CASE WHEN saved > 0 THEN saved ELSE 0 END")
    ));
    q
}

pub(crate) fn savings_from_row<R>(row: &R) -> StoreResult<SavingsTotals>
where
    R: Row,
    usize: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(SavingsTotals {
        workload: row.try_get(0)?,
        model: row.try_get(1)?,
        routed_requests: row.try_get(2)?,
        routing_savings_usd: row.try_get(3)?,
        capped_requests: row.try_get(4)?,
        tokens_over_cap: row.try_get(5)?,
    })
}
