//! The [`Budgets`] role's SQL. A child of `shared.rs`, compiled with it for each engine.
//!
//! A reservation is exact under concurrency: the transaction that checks a budget's room
//! first takes the budget (PostgreSQL: a transaction-scoped advisory lock on its id, taken
//! in id order so two calls under the same budgets cannot deadlock; SQLite: its one writer
//! connection), so no other reservation on it can commit between the check and the
//! insert, on this instance or another.

use async_trait::async_trait;
use sqlx::Row;

use super::{Db, DbRow, Shell, ENGINE};
use crate::ids::UserId;
use crate::records::{BudgetCharge, BudgetRecord, ReserveOutcome, StoreResult};
use crate::roles::Budgets;

pub(super) const BUDGET_COLUMNS: &str = "id, scope, scope_id, limit_micro_usd, limit_tokens, period, days, \
     timezone, created_at, updated_at";

pub(super) fn decode_budget(row: &DbRow) -> sqlx::Result<BudgetRecord> {
    Ok(BudgetRecord {
        id: row.try_get(0)?,
        scope: row.try_get(1)?,
        scope_id: row.try_get(2)?,
        limit_micro_usd: row.try_get(3)?,
        limit_tokens: row.try_get(4)?,
        period: row.try_get(5)?,
        days: row.try_get(6)?,
        timezone: row.try_get(7)?,
        created_at_ms: row.try_get(8)?,
        updated_at_ms: row.try_get(9)?,
    })
}

/// What budget `id` used and has reserved in `[start, end)` on the connection `conn`.
/// One statement, so one snapshot: a settlement committing meanwhile (which moves an
/// amount from the reservations to the usage) is seen whole or not at all.
async fn spent_on(
    conn: &mut <Db as sqlx::Database>::Connection,
    id: &str,
    start: i64,
    end: i64,
    now: i64,
) -> StoreResult<i64> {
    let spent: i64 = sqlx::query_scalar(
        "SELECT CAST(COALESCE((SELECT SUM(used) FROM budget_usage \
         WHERE budget_id = $1 AND bucket >= $2 AND bucket < $3), 0) \
         + COALESCE((SELECT SUM(amount) FROM budget_reservations \
         WHERE budget_id = $1 AND bucket >= $2 AND bucket < $3 AND expires_at > $4), 0) AS BIGINT)",
    )
    .bind(id)
    .bind(start)
    .bind(end)
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    Ok(spent)
}

#[async_trait]
impl Budgets for Shell {
    async fn create_budget(&self, owner: UserId, budget: &BudgetRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO budgets (id, user_id, scope, scope_id, limit_micro_usd, limit_tokens, \
             period, days, timezone, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&budget.id)
        .bind(owner.to_string())
        .bind(&budget.scope)
        .bind(&budget.scope_id)
        .bind(budget.limit_micro_usd)
        .bind(budget.limit_tokens)
        .bind(&budget.period)
        .bind(budget.days)
        .bind(&budget.timezone)
        .bind(budget.created_at_ms)
        .bind(budget.updated_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn list_budgets(&self, owner: UserId) -> StoreResult<Vec<BudgetRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {BUDGET_COLUMNS} FROM budgets WHERE user_id = $1 ORDER BY created_at, id"
        ))
        .bind(owner.to_string())
        .fetch_all(&self.reads)
        .await?;
        Ok(rows
            .iter()
            .map(decode_budget)
            .collect::<sqlx::Result<_>>()?)
    }

    async fn update_budget(&self, owner: UserId, budget: &BudgetRecord) -> StoreResult<bool> {
        if ENGINE.unstorable(&budget.id) {
            return Ok(false);
        }
        let done = sqlx::query(
            "UPDATE budgets SET scope = $3, scope_id = $4, limit_micro_usd = $5, \
             limit_tokens = $6, period = $7, days = $8, timezone = $9, updated_at = $10 \
             WHERE id = $1 AND user_id = $2",
        )
        .bind(&budget.id)
        .bind(owner.to_string())
        .bind(&budget.scope)
        .bind(&budget.scope_id)
        .bind(budget.limit_micro_usd)
        .bind(budget.limit_tokens)
        .bind(&budget.period)
        .bind(budget.days)
        .bind(&budget.timezone)
        .bind(budget.updated_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_budget(&self, owner: UserId, id: &str) -> StoreResult<bool> {
        if ENGINE.unstorable(id) {
            return Ok(false);
        }
        let done = sqlx::query("DELETE FROM budgets WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(owner.to_string())
            .execute(&self.writes)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn budget_spent(
        &self,
        id: &str,
        start_ms: i64,
        end_ms: i64,
        now_ms: i64,
    ) -> StoreResult<i64> {
        let mut conn = self.reads.acquire().await?;
        spent_on(&mut conn, id, start_ms, end_ms, now_ms).await
    }

    async fn reserve_budgets(
        &self,
        owner: UserId,
        charges: &[BudgetCharge],
        now_ms: i64,
        expires_at_ms: i64,
    ) -> StoreResult<ReserveOutcome> {
        if charges.is_empty() {
            return Ok(ReserveOutcome::Reserved);
        }
        let mut ordered: Vec<&BudgetCharge> = charges.iter().collect();
        ordered.sort_by(|a, b| a.budget_id.cmp(&b.budget_id));
        let mut tx = self.writes.begin().await?;
        for charge in &ordered {
            if let Some(serialise) = ENGINE.serialise_budget() {
                sqlx::query(serialise)
                    .bind(&charge.budget_id)
                    .execute(&mut *tx)
                    .await?;
            }
            // The budget must hold the caller: theirs, or their team's (and still exist).
            let mine: Option<String> = sqlx::query_scalar(
                "SELECT id FROM budgets WHERE id = $1 AND (user_id = $2 OR (scope = 'team' \
                 AND scope_id IN (SELECT team_id FROM team_members WHERE user_id = $2)))",
            )
            .bind(&charge.budget_id)
            .bind(owner.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            if mine.is_none() {
                continue;
            }
            let spent = spent_on(
                &mut tx,
                &charge.budget_id,
                charge.window_start_ms,
                charge.window_end_ms,
                now_ms,
            )
            .await?;
            if spent.saturating_add(charge.amount) > charge.limit {
                tx.rollback().await?;
                return Ok(ReserveOutcome::Exceeded {
                    budget_id: charge.budget_id.clone(),
                    spent,
                });
            }
            sqlx::query(
                "INSERT INTO budget_reservations (id, budget_id, bucket, amount, expires_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&charge.reservation_id)
            .bind(&charge.budget_id)
            .bind(charge.bucket_ms)
            .bind(charge.amount)
            .bind(expires_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        // Reservations long expired are dropped on the way (a crash's leftovers).
        sqlx::query("DELETE FROM budget_reservations WHERE expires_at < $1")
            .bind(now_ms - 24 * 3600 * 1000)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ReserveOutcome::Reserved)
    }

    async fn settle_reservations(&self, settlements: &[(String, i64)]) -> StoreResult<()> {
        if settlements.is_empty() {
            return Ok(());
        }
        let mut tx = self.writes.begin().await?;
        for (reservation, used) in settlements {
            let row = sqlx::query(
                "DELETE FROM budget_reservations WHERE id = $1 RETURNING budget_id, bucket",
            )
            .bind(reservation)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                continue;
            };
            let (budget, bucket): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
            sqlx::query(
                "INSERT INTO budget_usage (budget_id, bucket, used) VALUES ($1, $2, $3) \
                 ON CONFLICT (budget_id, bucket) DO UPDATE SET used = budget_usage.used + $3",
            )
            .bind(&budget)
            .bind(bucket)
            .bind(*used)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn claim_budget_notice(
        &self,
        id: &str,
        period_start_ms: i64,
        threshold: i64,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO budget_notices (budget_id, period_start, threshold) \
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(period_start_ms)
        .bind(threshold)
        .execute(&self.writes)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
