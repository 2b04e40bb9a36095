//! The [`Teams`] role's SQL. A child of `shared.rs`, compiled with it for each engine.

use async_trait::async_trait;
use sqlx::Row;

use super::budgets_sql::{decode_budget, BUDGET_COLUMNS};
use super::{DbRow, Shell, ENGINE};
use crate::ids::UserId;
use crate::records::{
    BudgetRecord, MemberUsageTotals, StoreResult, TeamMemberRecord, TeamMembership,
};
use crate::roles::Teams;

/// Columns of a membership, `t` the team and `m` the member row.
const MEMBERSHIP: &str = "t.id, t.name, t.created_at, m.role, \
     (SELECT COUNT(*) FROM team_members c WHERE c.team_id = t.id)";

fn decode_membership(row: &DbRow) -> sqlx::Result<TeamMembership> {
    Ok(TeamMembership {
        team_id: row.try_get(0)?,
        name: row.try_get(1)?,
        created_at_ms: row.try_get(2)?,
        role: row.try_get(3)?,
        members: row.try_get(4)?,
    })
}

#[async_trait]
impl Teams for Shell {
    async fn create_team(
        &self,
        owner: UserId,
        id: &str,
        name: &str,
        now_ms: i64,
    ) -> StoreResult<()> {
        let mut tx = self.writes.begin().await?;
        sqlx::query("INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(name)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO team_members (team_id, user_id, role, joined_at) \
             VALUES ($1, $2, 'owner', $3)",
        )
        .bind(id)
        .bind(owner.to_string())
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn teams_of(&self, user: UserId) -> StoreResult<Vec<TeamMembership>> {
        let rows = sqlx::query(&format!(
            "SELECT {MEMBERSHIP} FROM team_members m JOIN teams t ON t.id = m.team_id \
             WHERE m.user_id = $1 ORDER BY t.created_at, t.id"
        ))
        .bind(user.to_string())
        .fetch_all(&self.reads)
        .await?;
        Ok(rows
            .iter()
            .map(decode_membership)
            .collect::<sqlx::Result<_>>()?)
    }

    async fn team_membership(
        &self,
        user: UserId,
        id: &str,
    ) -> StoreResult<Option<TeamMembership>> {
        if ENGINE.unstorable(id) {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT {MEMBERSHIP} FROM team_members m JOIN teams t ON t.id = m.team_id \
             WHERE m.user_id = $1 AND t.id = $2"
        ))
        .bind(user.to_string())
        .bind(id)
        .fetch_optional(&self.reads)
        .await?;
        Ok(row.as_ref().map(decode_membership).transpose()?)
    }

    async fn team_members(&self, id: &str) -> StoreResult<Vec<TeamMemberRecord>> {
        let rows = sqlx::query(
            "SELECT m.user_id, u.email, u.name, m.role, m.joined_at FROM team_members m \
             JOIN users u ON u.id = m.user_id WHERE m.team_id = $1 \
             ORDER BY m.joined_at, m.user_id",
        )
        .bind(id)
        .fetch_all(&self.reads)
        .await?;
        let decode = |row: &DbRow| -> sqlx::Result<TeamMemberRecord> {
            Ok(TeamMemberRecord {
                user_id: row.try_get(0)?,
                email: row.try_get(1)?,
                name: row.try_get(2)?,
                role: row.try_get(3)?,
                joined_at_ms: row.try_get(4)?,
            })
        };
        Ok(rows.iter().map(decode).collect::<sqlx::Result<_>>()?)
    }

    async fn create_team_invite(
        &self,
        id: &str,
        token_hash: &str,
        role: &str,
        created_by: UserId,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO team_invites (token_hash, team_id, role, created_by, created_at, \
             expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(token_hash)
        .bind(id)
        .bind(role)
        .bind(created_by.to_string())
        .bind(now_ms)
        .bind(expires_at_ms)
        .execute(&self.writes)
        .await?;
        Ok(())
    }

    async fn redeem_team_invite(
        &self,
        token_hash: &str,
        user: UserId,
        now_ms: i64,
    ) -> StoreResult<Option<String>> {
        if ENGINE.unstorable(token_hash) {
            return Ok(None);
        }
        let mut tx = self.writes.begin().await?;
        // One statement takes the invite: two redemptions at once cannot both use it.
        let row = sqlx::query(
            "UPDATE team_invites SET used_by = $2, used_at = $3 \
             WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $3 \
             RETURNING team_id, role",
        )
        .bind(token_hash)
        .bind(user.to_string())
        .bind(now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (team, role): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        sqlx::query(
            "INSERT INTO team_members (team_id, user_id, role, joined_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (team_id, user_id) DO NOTHING",
        )
        .bind(&team)
        .bind(user.to_string())
        .bind(&role)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(team))
    }

    async fn set_team_role(&self, id: &str, user: UserId, role: &str) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE team_members SET role = $1 WHERE team_id = $2 AND user_id = $3")
                .bind(role)
                .bind(id)
                .bind(user.to_string())
                .execute(&self.writes)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_team_member(&self, id: &str, user: UserId) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM team_members WHERE team_id = $1 AND user_id = $2")
            .bind(id)
            .bind(user.to_string())
            .execute(&self.writes)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn team_usage(
        &self,
        id: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<MemberUsageTotals>> {
        let rows = sqlx::query(&format!(
            "SELECT m.user_id, u.email, CAST(COALESCE(SUM(e.requests), 0) AS BIGINT), \
             CAST(COALESCE(SUM(e.prompt_tokens), 0) AS BIGINT), \
             CAST(COALESCE(SUM(e.completion_tokens), 0) AS BIGINT), \
             COALESCE({}, 0) \
             FROM team_members m JOIN users u ON u.id = m.user_id \
             LEFT JOIN workload_events e ON e.user_id = m.user_id AND e.ts >= $2 AND e.ts <= $3 \
             WHERE m.team_id = $1 GROUP BY m.user_id, u.email ORDER BY u.email",
            ENGINE.money_sum("e.cost_usd")
        ))
        .bind(id)
        .bind(since_ms)
        .bind(until_ms)
        .fetch_all(&self.reads)
        .await?;
        let decode = |row: &DbRow| -> sqlx::Result<MemberUsageTotals> {
            Ok(MemberUsageTotals {
                user_id: row.try_get(0)?,
                email: row.try_get(1)?,
                requests: row.try_get(2)?,
                prompt_tokens: row.try_get(3)?,
                completion_tokens: row.try_get(4)?,
                cost_usd: row.try_get(5)?,
            })
        };
        Ok(rows.iter().map(decode).collect::<sqlx::Result<_>>()?)
    }

    async fn budgets_holding(&self, user: UserId) -> StoreResult<Vec<BudgetRecord>> {
        let columns = BUDGET_COLUMNS
            .split(", ")
            .map(|c| format!("b.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        // One statement for what every call it makes reads first: the user's own budgets,
        // then those of their teams that someone else set (one they set is theirs already).
        let rows = sqlx::query(&format!(
            "SELECT {columns}, 0 AS theirs FROM budgets b WHERE b.user_id = $1 \
             UNION ALL \
             SELECT {columns}, 1 AS theirs FROM budgets b JOIN team_members m \
             ON b.scope = 'team' AND b.scope_id = m.team_id \
             WHERE m.user_id = $1 AND b.user_id <> $1 \
             ORDER BY theirs, created_at, id"
        ))
        .bind(user.to_string())
        .fetch_all(&self.reads)
        .await?;
        Ok(rows
            .iter()
            .map(decode_budget)
            .collect::<sqlx::Result<_>>()?)
    }
}
