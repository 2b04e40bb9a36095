//! The [`Usage`] role's SQL: a user's usage rows, and the figures computed from them. A
//! child of `shared.rs`, compiled with it for each engine.
//!
//! Rows are written with their rollups (`rollups_sql::apply`, same transaction; a row sent
//! twice is neither stored nor counted again), and an import undone takes its rows out of
//! both. The summary, the daily series, the percentiles and the savings simulation read
//! the rollups of the window's whole days and only the rows of its partial edge days (a
//! run's analysis read the whole window's rows six times before). Every query filters by
//! the owner first.
//!
//! Sums of money must not depend on the order rows are visited in, or two reads of the
//! same rows could round to different micro-dollars (the answer of a run and the summary
//! would disagree): the window's groups are added up in key order (day by day), and edge
//! rows are folded in time order. What is still summed by the database (totals per price
//! version) is summed as `NUMERIC` on PostgreSQL, whose visiting order changes with its plan.

use async_trait::async_trait;
use sqlx::{Pool, QueryBuilder, Row};

use super::rollups_sql::{apply, read_window_and_after, Change};
use super::{Db, DbRow, Shell, SqlxColumns, ENGINE};
use crate::ids::UserId;
use crate::records::{
    ImportOutcome, ImportPlan, PriceOverrideRecord, PriceVersionTotals,
    StoreResult, StoredUsageRow, UsageDayTotals, UsageFilter,
    UsageRow, UsageTotals,
};
use crate::roles::Usage;
use crate::columns::{decode_usage_row, usage_names_sql, ROW_COLUMNS};
use crate::rollups::{self, Rollup, Sketches};

/// Appends ` WHERE user_id = _ AND ts >= _ AND ts <= _` for the table `alias`.
fn push_window(q: &mut QueryBuilder<'_, Db>, alias: &str, owner: UserId, since: i64, until: i64) {
    q.push(format!(" WHERE {alias}user_id = "))
        .push_bind(owner.to_string())
        .push(format!(" AND {alias}ts >= "))
        .push_bind(since)
        .push(format!(" AND {alias}ts <= "))
        .push_bind(until);
}

/// The rows of the query `q`, each decoded by `decode`.
async fn fetch_rows<T>(
    pool: &Pool<Db>,
    mut q: QueryBuilder<'_, Db>,
    decode: fn(&DbRow) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let rows = q.build().fetch_all(pool).await?;
    rows.iter().map(decode).collect()
}

/// A row selected with [`ROW_COLUMNS`].
pub(super) fn decode_row(row: &DbRow) -> StoreResult<StoredUsageRow> {
    decode_usage_row(&SqlxColumns(row))
}

/// The usage rows of `rows`, selected (or returned) as [`ROW_COLUMNS`].
pub(super) fn usage_rows(rows: &[DbRow]) -> StoreResult<Vec<UsageRow>> {
    rows.iter().map(|row| Ok(decode_row(row)?.row)).collect()
}

/// Appends the window of `filter` and each of its fields that is set, for `owner`.
fn push_filter(q: &mut QueryBuilder<'_, Db>, owner: UserId, filter: &UsageFilter) {
    push_window(q, "", owner, filter.since_ms, filter.until_ms);
    for (column, value) in [
        ("provider", &filter.provider),
        ("model", &filter.model),
        ("workload", &filter.workload),
        ("source", &filter.source),
    ] {
        if let Some(value) = value {
            q.push(format!(" AND {column} = ")).push_bind(value.clone());
        }
    }
}

/// Inserts `rows` of `owner` (tagged with `import`, if any) on the connection `conn`.
/// A row whose `(source, source_ref)` the user already has is skipped (the unique index
/// `workload_events_source_ref`); the count returned is of the rows stored.
async fn insert_rows(
    conn: &mut <Db as sqlx::Database>::Connection,
    owner: UserId,
    import: Option<&str>,
    rows: &[UsageRow],
) -> StoreResult<u64> {
    let mut inserted = 0;
    // 18 bound parameters a row: SQLite allows 32,766 a statement, PostgreSQL 65,535.
    for chunk in rows.chunks(1000) {
        let mut builder: QueryBuilder<Db> = QueryBuilder::new(
            "INSERT INTO workload_events (user_id, provider, model, workload, ts, \
             prompt_tokens, completion_tokens, latency_ms, status, cost_usd, import_id, \
             requests, cached_tokens, cache_write_tokens, reasoning_tokens, source, \
             source_ref, price_version) ",
        );
        builder.push_values(chunk, |mut b, row| {
            b.push_bind(owner.to_string())
                .push_bind(&row.provider)
                .push_bind(&row.model)
                .push_bind(&row.workload)
                .push_bind(row.ts_ms)
                .push_bind(row.prompt_tokens)
                .push_bind(row.completion_tokens)
                .push_bind(row.latency_ms)
                .push_bind(&row.status)
                .push_bind(row.cost_usd)
                .push_bind(import.map(str::to_string))
                .push_bind(row.requests)
                .push_bind(row.cached_tokens)
                .push_bind(row.cache_write_tokens)
                .push_bind(row.reasoning_tokens)
                .push_bind(&row.source)
                .push_bind(&row.source_ref)
                .push_bind(&row.price_version);
        });
        builder.push(format!(" ON CONFLICT DO NOTHING RETURNING {ROW_COLUMNS}"));
        // What was stored (a row sent twice is not), folded into the rollups in the same
        // transaction.
        let stored = usage_rows(&builder.build().fetch_all(&mut *conn).await?)?;
        apply(conn, owner, &stored, Change::Add).await?;
        inserted += stored.len() as u64;
    }
    Ok(inserted)
}

/// How many usage rows `owner` has stored.
async fn count_rows(
    conn: &mut <Db as sqlx::Database>::Connection,
    owner: UserId,
) -> StoreResult<u64> {
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM workload_events WHERE user_id = $1")
        .bind(owner.to_string())
        .fetch_one(&mut *conn)
        .await?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// Rows deleted per statement when an import is undone: short transactions again.
const UNDO_CHUNK: i64 = 1000;

impl Shell {
    /// Deletes every row of the import `import`, a chunk per transaction, then forgets the
    /// import. Returns the rows deleted.
    async fn undo_import(&self, import: &str) -> StoreResult<u64> {
        let owner: Option<String> =
            sqlx::query_scalar("SELECT user_id FROM usage_imports WHERE id = $1")
                .bind(import)
                .fetch_optional(&self.writes)
                .await?;
        let owner = match owner.map(|o| UserId::parse(&o)) {
            Some(Ok(owner)) => owner,
            // Not listed (or not a user's): no row carries the import's id.
            _ => return Ok(0),
        };
        let mut deleted = 0;
        loop {
            let mut tx = self.writes.begin().await?;
            let deleted_rows = sqlx::query(&format!(
                "DELETE FROM workload_events WHERE id IN (SELECT id FROM workload_events \
                 WHERE import_id = $1 LIMIT $2) RETURNING {ROW_COLUMNS}"
            ))
            .bind(import)
            .bind(UNDO_CHUNK)
            .fetch_all(&mut *tx)
            .await?;
            let rows = usage_rows(&deleted_rows)?;
            apply(&mut tx, owner, &rows, Change::Remove).await?;
            tx.commit().await?;
            deleted += rows.len() as u64;
            if rows.is_empty() {
                break;
            }
        }
        sqlx::query("DELETE FROM usage_imports WHERE id = $1")
            .bind(import)
            .execute(&self.writes)
            .await?;
        Ok(deleted)
    }

    /// The chunks of an import, after the first; then the quota check and completion.
    async fn import_rest(
        &self,
        owner: UserId,
        import: &str,
        rest: &[UsageRow],
        plan: &ImportPlan,
    ) -> StoreResult<ImportOutcome> {
        let mut inserted = 0;
        for chunk in rest.chunks(plan.chunk_rows.max(1)) {
            let mut tx = self.writes.begin().await?;
            inserted += insert_rows(&mut tx, owner, Some(import), chunk).await?;
            tx.commit().await?;
        }
        let mut tx = self.writes.begin().await?;
        let stored = count_rows(&mut tx, owner).await?;
        if stored > plan.quota {
            // Another import of this user's ran at the same time: neither checked the
            // other's rows at its start. The one that finds the quota exceeded backs out.
            return Ok(ImportOutcome::OverQuota {
                stored,
                quota: plan.quota,
            });
        }
        sqlx::query("DELETE FROM usage_imports WHERE id = $1")
            .bind(import)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ImportOutcome::Stored(inserted))
    }
}

impl Shell {
    /// `owner`'s usage window (see `rollups_sql::read_window_and_after`): on SQLite's
    /// reader threads, else on the pool.
    async fn window_of(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        sketches: Sketches,
        after: bool,
    ) -> StoreResult<(Rollup, Option<Rollup>)> {
        match self.readers() {
            Some(readers) => readers.window(owner, since_ms, until_ms, sketches, after).await,
            None => {
                read_window_and_after(&self.reads, owner, since_ms, until_ms, sketches, after)
                    .await
            }
        }
    }
}

#[async_trait]
impl Usage for Shell {
    async fn insert_usage(&self, owner: UserId, rows: &[UsageRow]) -> StoreResult<u64> {
        let mut tx = self.writes.begin().await?;
        let inserted = insert_rows(&mut tx, owner, None, rows).await?;
        tx.commit().await?;
        Ok(inserted)
    }
    async fn import_usage(
        &self,
        owner: UserId,
        rows: &[UsageRow],
        plan: &ImportPlan,
    ) -> StoreResult<ImportOutcome> {
        let import = uuid::Uuid::new_v4().to_string();
        let (first, rest) = rows.split_at(plan.chunk_rows.max(1).min(rows.len()));
        // The quota check, the import's registration and its first chunk are one
        // transaction: a refused import writes nothing at all.
        let mut tx = self.writes.begin().await?;
        let stored = count_rows(&mut tx, owner).await?;
        if stored.saturating_add(rows.len() as u64) > plan.quota {
            return Ok(ImportOutcome::OverQuota {
                stored,
                quota: plan.quota,
            });
        }
        sqlx::query("INSERT INTO usage_imports (id, user_id, started_at) VALUES ($1, $2, $3)")
            .bind(&import)
            .bind(owner.to_string())
            .bind(plan.now_ms)
            .execute(&mut *tx)
            .await?;
        let mut inserted = insert_rows(&mut tx, owner, Some(&import), first).await?;
        tx.commit().await?;
        let outcome = self.import_rest(owner, &import, rest, plan).await;
        match outcome {
            Ok(ImportOutcome::Stored(more)) => {
                inserted += more;
                Ok(ImportOutcome::Stored(inserted))
            }
            Ok(ImportOutcome::OverQuota { stored, quota }) => {
                self.undo_import(&import).await?;
                Ok(ImportOutcome::OverQuota {
                    // What the user had besides this import.
                    stored: stored.saturating_sub(rows.len() as u64),
                    quota,
                })
            }
            Err(err) => {
                // Undo what was written; if that fails too, the import stays listed as
                // unfinished and the periodic sweep removes it.
                if let Err(undo) = self.undo_import(&import).await {
                    tracing::error!(error = %undo, "could not undo a failed usage import");
                }
                Err(err)
            }
        }
    }
    async fn count_usage(&self, owner: UserId) -> StoreResult<u64> {
        let mut conn = self.reads.acquire().await?;
        count_rows(&mut conn, owner).await
    }
    async fn sweep_abandoned_imports(&self, started_before_ms: i64) -> StoreResult<u64> {
        let abandoned: Vec<String> =
            sqlx::query_scalar("SELECT id FROM usage_imports WHERE started_at < $1")
                .bind(started_before_ms)
                .fetch_all(&self.writes)
                .await?;
        let mut deleted = 0;
        for import in abandoned {
            deleted += self.undo_import(&import).await?;
        }
        Ok(deleted)
    }
    async fn usage_rows_since(&self, owner: UserId, since_ms: i64) -> StoreResult<Vec<UsageRow>> {
        let mut q = QueryBuilder::new(
            format!("SELECT {ROW_COLUMNS} FROM workload_events WHERE user_id = "),
        );
        q.push_bind(owner.to_string()).push(" AND ts >= ").push_bind(since_ms);
        q.push(" ORDER BY ts, id");
        fetch_rows(&self.reads, q, |row| Ok(decode_row(row)?.row))
        .await
    }
    async fn usage_window(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        sketches: Sketches,
    ) -> StoreResult<Rollup> {
        Ok(self.window_of(owner, since_ms, until_ms, sketches, false).await?.0)
    }
    async fn usage_window_and_after(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
        sketches: Sketches,
    ) -> StoreResult<(Rollup, Option<Rollup>)> {
        self.window_of(owner, since_ms, until_ms, sketches, true).await
    }
    async fn usage_totals(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageTotals>> {
        let window = self.window_of(owner, since_ms, until_ms, Sketches::default(), false);
        Ok(rollups::totals(&window.await?.0))
    }
    async fn usage_names(
        &self,
        owner: UserId,
        since_ms: i64,
    ) -> StoreResult<Vec<(String, String, f64)>> {
        let since_day = rollups::day_of(since_ms);
        if let Some(readers) = self.readers() {
            return readers.usage_names(owner, since_day).await;
        }
        let rows = sqlx::query(&usage_names_sql(ENGINE))
            .bind(owner.to_string())
            .bind(since_day)
            .fetch_all(&self.reads)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect()
    }
    async fn usage_daily(
        &self,
        owner: UserId,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<UsageDayTotals>> {
        let window = self.window_of(owner, since_ms, until_ms, Sketches::default(), false);
        Ok(rollups::daily(&window.await?.0))
    }
    async fn usage_row(&self, owner: UserId, id: i64) -> StoreResult<Option<StoredUsageRow>> {
        let mut q = QueryBuilder::new(format!(
            "SELECT {ROW_COLUMNS} FROM workload_events WHERE user_id = "
        ));
        q.push_bind(owner.to_string()).push(" AND id = ").push_bind(id);
        Ok(fetch_rows(&self.reads, q, decode_row).await?.pop())
    }
    async fn usage_rows_page(
        &self,
        owner: UserId,
        filter: &UsageFilter,
        before_id: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<StoredUsageRow>> {
        let mut q = QueryBuilder::new(format!("SELECT {ROW_COLUMNS} FROM workload_events"));
        push_filter(&mut q, owner, filter);
        if let Some(before) = before_id {
            q.push(" AND id < ").push_bind(before);
        }
        q.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
        fetch_rows(&self.reads, q, decode_row).await
    }
    async fn usage_by_price_version(
        &self,
        owner: UserId,
        filter: &UsageFilter,
    ) -> StoreResult<Vec<PriceVersionTotals>> {
        let mut q = QueryBuilder::new(format!(
            "SELECT price_version, COUNT(*), CAST(SUM(requests) AS BIGINT), \
             CAST(SUM(prompt_tokens) AS BIGINT), CAST(SUM(cached_tokens) AS BIGINT), \
             CAST(SUM(cache_write_tokens) AS BIGINT), CAST(SUM(completion_tokens) AS BIGINT), \
             CAST(SUM(reasoning_tokens) AS BIGINT), {} FROM workload_events",
            ENGINE.money_sum("cost_usd")
        ));
        push_filter(&mut q, owner, filter);
        // NULL (costs sent by the source) sorts first on both engines with this CASE.
        q.push(
            " GROUP BY price_version \
             ORDER BY CASE WHEN price_version IS NULL THEN 0 ELSE 1 END, price_version",
        );
        fetch_rows(&self.reads, q, |row| {
            Ok(PriceVersionTotals {
                price_version: row.try_get(0)?,
                rows: row.try_get(1)?,
                requests: row.try_get(2)?,
                prompt_tokens: row.try_get(3)?,
                cached_tokens: row.try_get(4)?,
                cache_write_tokens: row.try_get(5)?,
                completion_tokens: row.try_get(6)?,
                reasoning_tokens: row.try_get(7)?,
                cost_usd: row.try_get(8)?,
            })
        })
        .await
    }
    async fn add_price_overrides(
        &self,
        owner: UserId,
        entries: &[PriceOverrideRecord],
    ) -> StoreResult<()> {
        let mut tx = self.writes.begin().await?;
        // 14 bound parameters an entry.
        for chunk in entries.chunks(1000) {
            let mut q: QueryBuilder<Db> = QueryBuilder::new(
                "INSERT INTO price_overrides (id, user_id, provider, model, effective_from, \
                 input_rate, cached_input_rate, cache_write_rate, output_rate, reasoning_rate, \
                 request_fee, note, created_at) ",
            );
            q.push_values(chunk, |mut b, e| {
                b.push_bind(&e.id)
                    .push_bind(owner.to_string())
                    .push_bind(&e.provider)
                    .push_bind(&e.model)
                    .push_bind(e.effective_from_ms)
                    .push_bind(e.input_rate)
                    .push_bind(e.cached_input_rate)
                    .push_bind(e.cache_write_rate)
                    .push_bind(e.output_rate)
                    .push_bind(e.reasoning_rate)
                    .push_bind(e.request_fee)
                    .push_bind(&e.note)
                    .push_bind(e.created_at_ms);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
    async fn price_overrides(&self, owner: UserId) -> StoreResult<Vec<PriceOverrideRecord>> {
        let mut q = QueryBuilder::new(
            "SELECT id, provider, model, effective_from, input_rate, cached_input_rate, \
             cache_write_rate, output_rate, reasoning_rate, request_fee, note, created_at \
             FROM price_overrides WHERE user_id = ",
        );
        q.push_bind(owner.to_string()).push(" ORDER BY created_at, id");
        fetch_rows(&self.reads, q, |row| {
            Ok(PriceOverrideRecord {
                id: row.try_get(0)?,
                provider: row.try_get(1)?,
                model: row.try_get(2)?,
                effective_from_ms: row.try_get(3)?,
                input_rate: row.try_get(4)?,
                cached_input_rate: row.try_get(5)?,
                cache_write_rate: row.try_get(6)?,
                output_rate: row.try_get(7)?,
                reasoning_rate: row.try_get(8)?,
                request_fee: row.try_get(9)?,
                note: row.try_get(10)?,
                created_at_ms: row.try_get(11)?,
            })
        })
        .await
    }
}
