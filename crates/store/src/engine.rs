//! [`Backend`]: the engine a database URL selects, and every spot where SQLite's and
//! PostgreSQL's SQL or rules differ. Most SQL needs no help: both take `$1` placeholders
//! (SQLite binds them by number, so one may repeat), `IS NOT DISTINCT FROM`, `NOT` on a
//! boolean column (0/1 on SQLite) and `CAST(... AS BIGINT)`. The rest is below, with why.

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

    /// The sum of the money-valued `expr`, as a `DOUBLE PRECISION` that does not depend on
    /// the order rows are visited in (see `usage_sql`).
    pub(crate) fn money_sum(self, expr: &str) -> String {
        match self {
            Backend::Sqlite => format!("CAST(SUM({expr}) AS DOUBLE PRECISION)"),
            // Capped below the largest double: a sum of rows stored before imports were
            // bounded (1.7e308 each, say) would otherwise fail the cast, and the query.
            Backend::Postgres => {
                format!("CAST(LEAST(SUM(CAST({expr} AS NUMERIC)), 1e300) AS DOUBLE PRECISION)")
            }
        }
    }

    /// Whether no row can hold `key`: PostgreSQL text cannot hold U+0000, so a lookup by such
    /// a key (a client-supplied ticket, say) must find nothing, as on SQLite, instead of
    /// failing. Input validation refuses such text before it reaches a write.
    pub(crate) fn unstorable(self, key: &str) -> bool {
        self == Backend::Postgres && key.contains('\0')
    }

    /// `limit` as bound to a `LIMIT`: SQLite reads a negative one as "no limit" and rejects
    /// `LIMIT NULL`, which is PostgreSQL's "no limit" (it rejects a negative one).
    pub(crate) fn limit(self, limit: i64) -> Option<i64> {
        match self {
            Backend::Sqlite => Some(limit),
            Backend::Postgres => (limit >= 0).then_some(limit),
        }
    }

    /// Ends a subquery that picks rows to change. On PostgreSQL, whose writers run in
    /// parallel, rows another transaction is changing are passed over instead of waited for.
    /// SQLite's one writer never meets a row locked by another (and has no such clause).
    pub(crate) fn skip_locked(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        }
    }

    /// [`Backend::skip_locked`] for a subquery that joins other relations: only the rows of
    /// `alias` are locked (PostgreSQL refuses to lock the rows of a subquery with window
    /// functions, and there is no need to).
    pub(crate) fn skip_locked_of(self, alias: &str) -> String {
        match self {
            Backend::Sqlite => String::new(),
            Backend::Postgres => format!(" FOR UPDATE OF {alias} SKIP LOCKED"),
        }
    }

    /// A statement, bound to the owner's id, after which the user's other submissions wait
    /// until commit (on every instance): two messages arriving together cannot both take
    /// the last run slot. SQLite's one writer already serialises them.
    pub(crate) fn serialise_user(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => {
                Some("SELECT pg_advisory_xact_lock(hashtextextended('apex.submit_run:' || $1, 0))")
            }
        }
    }

    /// A statement, bound to a user's id, after which other transactions changing that
    /// user's usage rollups wait until commit (on every instance): a rollup is read,
    /// changed and written back. SQLite's one writer already serialises them.
    pub(crate) fn serialise_rollups(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some(
                "SELECT pg_advisory_xact_lock(hashtextextended('apex.usage_rollups:' || $1, 0))",
            ),
        }
    }

    /// A statement, bound to a budget's id, after which other transactions reserving on
    /// that budget wait until commit (on every instance). SQLite's one writer already
    /// serialises them.
    pub(crate) fn serialise_budget(self) -> Option<&'static str> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => {
                Some("SELECT pg_advisory_xact_lock(hashtextextended('apex.budget:' || $1, 0))")
            }
        }
    }

    /// Whether inserting a message also touches its thread's `updated_at` (a trigger, SQLite
    /// migration 0017), so an append is one statement. On PostgreSQL the store touches the
    /// thread first itself: that UPDATE takes the thread's row lock, which orders concurrent
    /// appends to one thread (their positions); SQLite's one writer orders them already.
    pub(crate) fn touches_thread_on_insert(self) -> bool {
        match self {
            Backend::Sqlite => true,
            Backend::Postgres => false,
        }
    }
}
