//! [`Backend`]: the engine a database URL selects, and every spot where SQLite's and
//! PostgreSQL's SQL or rules differ.
//!
//! The shared queries (`shared.rs`, `usage_sql.rs`) ask the engine here instead of being
//! written twice. Most SQL needs no help: both engines take `$1`-style placeholders (SQLite
//! binds them by number, so one may repeat), `IS NOT DISTINCT FROM`, `NOT` on a boolean
//! column stored as 0/1, and `CAST(... AS BIGINT)`. What remains is below, each with why.

/// The storage engine a database URL selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `postgres://` and `postgresql://` select PostgreSQL; anything else is SQLite.
    pub fn from_url(url: &str) -> Self {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }

    /// The sum of the money-valued `expr`, as a `DOUBLE PRECISION`. Sums must not depend on
    /// the order rows are visited in (see `usage_sql`): SQLite always visits them in index
    /// order and sums with compensation; PostgreSQL's order changes with its plan, so there
    /// the costs are summed as `NUMERIC`, exactly.
    pub(crate) fn money_sum(self, expr: &str) -> String {
        match self {
            Backend::Sqlite => format!("CAST(SUM({expr}) AS DOUBLE PRECISION)"),
            Backend::Postgres => {
                format!("CAST(SUM(CAST({expr} AS NUMERIC)) AS DOUBLE PRECISION)")
            }
        }
    }

    /// Whether `key` cannot be stored. PostgreSQL text cannot hold U+0000, so no stored key
    /// contains it: a lookup by such a key (a client-supplied ticket, say) must find
    /// nothing, as on SQLite, instead of failing. Input validation refuses such text before
    /// it reaches a write.
    pub(crate) fn unstorable(self, key: &str) -> bool {
        self == Backend::Postgres && key.contains('\0')
    }

    /// `limit` as bound to a `LIMIT`: SQLite reads a negative LIMIT as "no limit" (and
    /// rejects `LIMIT NULL`); PostgreSQL rejects a negative one, and `LIMIT NULL` is its
    /// "no limit".
    pub(crate) fn limit(self, limit: i64) -> Option<i64> {
        match self {
            Backend::Sqlite => Some(limit),
            Backend::Postgres => (limit >= 0).then_some(limit),
        }
    }

    /// Ends a subquery that picks rows to change. PostgreSQL runs writers in parallel: rows
    /// another transaction is changing right now are passed over instead of waited for, so
    /// concurrent claimers proceed side by side and never take the same row. SQLite has one
    /// writer at a time, so nothing is ever locked by another (and it has no such clause).
    pub(crate) fn skip_locked(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// Whether writers run in parallel (PostgreSQL), so a transaction that touches several
    /// runs must lock them in one order to avoid deadlocks. SQLite serialises writers.
    pub(crate) fn parallel_writers(self) -> bool {
        self == Backend::Postgres
    }

    /// A statement, bound to the owner's id, that makes one user's submissions take turns
    /// until commit on every instance (a transaction-scoped advisory lock), so two messages
    /// arriving together cannot both take the user's last run slot. SQLite needs none: its
    /// one writer already serialises them.
    pub(crate) fn serialise_user(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => {
                Some("SELECT pg_advisory_xact_lock(hashtextextended('apex.submit_run:' || $1, 0))")
            }
        }
    }

    /// Logout's housekeeping, bound to now: expired revocations are useless, since the token
    /// is rejected anyway. On PostgreSQL, rows another logout is already deleting are
    /// skipped rather than waited for, so concurrent logouts never wait on or deadlock with
    /// each other.
    pub(crate) fn delete_expired_revocations(self) -> &'static str {
        match self {
            Backend::Sqlite => "DELETE FROM revoked_access_tokens WHERE expires_at < $1",
            Backend::Postgres => {
                "DELETE FROM revoked_access_tokens WHERE jti IN ( \
                 SELECT jti FROM revoked_access_tokens WHERE expires_at < $1 \
                 FOR UPDATE SKIP LOCKED)"
            }
        }
    }
}
