//! Decoding selected rows by column position, whichever driver read them: sqlx's rows
//! (both engines) and the SQLite reader threads' `rusqlite` rows (`sqlite_reads`) go
//! through the same decoder for each record, so the two reads of a record cannot drift
//! apart. A query that a decoder here reads selects that decoder's column list first; a
//! query both drivers run is written here once.

use crate::engine::Backend;
use crate::ids::{IdError, MessageId, RunId, ThreadId};
use crate::records::{
    parse_json_column, MessageRecord, RunRecord, StoreError, StoreResult, StoredUsageRow, UsageRow,
};
use apex_protocol::threads::RunStatus;

/// The columns of `workload_events` [`decode_usage_row`] reads, in its order.
pub(crate) const ROW_COLUMNS: &str = "id, provider, model, workload, ts, prompt_tokens, \
     completion_tokens, latency_ms, status, cost_usd, requests, cached_tokens, \
     cache_write_tokens, reasoning_tokens, source, source_ref, price_version";

/// A selected row's columns by position, whichever driver read it: one decoder per record
/// for sqlx's rows and `rusqlite`'s. Text is borrowed from the row.
pub(crate) trait Columns {
    fn int(&self, i: usize) -> StoreResult<i64>;
    fn optional_int(&self, i: usize) -> StoreResult<Option<i64>>;
    fn real(&self, i: usize) -> StoreResult<f64>;
    fn text(&self, i: usize) -> StoreResult<&str>;
    fn optional_text(&self, i: usize) -> StoreResult<Option<&str>>;
}

/// A stored id that does not parse is corrupt data, not the client's error.
pub(crate) fn parse_stored_id<T>(
    raw: &str,
    parse: fn(&str) -> Result<T, IdError>,
) -> StoreResult<T> {
    parse(raw).map_err(|e| StoreError::Corrupt(format!("id {raw:?}: {e}")))
}

/// A row selected as [`ROW_COLUMNS`].
pub(crate) fn decode_usage_row(row: &impl Columns) -> StoreResult<StoredUsageRow> {
    Ok(StoredUsageRow {
        id: row.int(0)?,
        row: UsageRow {
            provider: row.text(1)?.to_owned(),
            model: row.text(2)?.to_owned(),
            workload: row.text(3)?.to_owned(),
            ts_ms: row.int(4)?,
            prompt_tokens: row.int(5)?,
            completion_tokens: row.int(6)?,
            latency_ms: row.int(7)?,
            status: row.text(8)?.to_owned(),
            cost_usd: row.real(9)?,
            requests: row.int(10)?,
            cached_tokens: row.int(11)?,
            cache_write_tokens: row.int(12)?,
            reasoning_tokens: row.int(13)?,
            source: row.text(14)?.to_owned(),
            source_ref: row.optional_text(15)?.map(str::to_owned),
            price_version: row.optional_text(16)?.map(str::to_owned),
        },
    })
}

/// The columns of `messages` [`decode_message`] reads, in its order.
pub(crate) const MESSAGE_COLUMNS: &str =
    "id, thread_id, role, content, metadata, created_at, superseded_by";

/// A row selected as [`MESSAGE_COLUMNS`] (more columns may follow).
pub(crate) fn decode_message(row: &impl Columns) -> StoreResult<MessageRecord> {
    Ok(MessageRecord {
        id: parse_stored_id(row.text(0)?, MessageId::parse)?,
        thread_id: parse_stored_id(row.text(1)?, ThreadId::parse)?,
        role: row.text(2)?.to_owned(),
        content: row.text(3)?.to_owned(),
        metadata: parse_json_column(row.text(4)?)?,
        created_at_ms: row.int(5)?,
        superseded_by: row
            .optional_text(6)?
            .map(|raw| parse_stored_id(raw, RunId::parse))
            .transpose()?,
    })
}

/// The columns of `runs` [`decode_run`] reads, in its order.
pub(crate) const RUN_COLUMNS: &str =
    "id, thread_id, status, created_at, started_at, finished_at, error, last_seq";

/// How many columns [`RUN_COLUMNS`] are.
pub(crate) const RUN_FIELDS: usize = 8;

/// A run selected as [`RUN_COLUMNS`] from the column `at` on.
pub(crate) fn decode_run(row: &impl Columns, at: usize) -> StoreResult<RunRecord> {
    let status = row.text(at + 2)?;
    Ok(RunRecord {
        id: parse_stored_id(row.text(at)?, RunId::parse)?,
        thread_id: parse_stored_id(row.text(at + 1)?, ThreadId::parse)?,
        status: RunStatus::parse(status)
            .ok_or_else(|| StoreError::Corrupt(format!("run status {status:?}")))?,
        created_at_ms: row.int(at + 3)?,
        started_at_ms: row.optional_int(at + 4)?,
        finished_at_ms: row.optional_int(at + 5)?,
        error: row.optional_text(at + 6)?.map(str::to_owned),
        last_seq: u64::try_from(row.int(at + 7)?).unwrap_or(0),
    })
}

/// The SQL of an ended run (see `Runs::settle_ended_run`): [`RUN_COLUMNS`], then whether
/// it was superseded and how, and whether a queued run of its thread waits for it. Binds
/// the run and the owner.
pub(crate) fn ended_run_sql() -> String {
    format!(
        "SELECT {RUN_COLUMNS}, superseded, EXISTS (SELECT 1 FROM runs w \
         WHERE w.thread_id = runs.thread_id AND w.status = 'queued' \
         AND w.instance_id IS NULL) AS successor_waiting \
         FROM runs WHERE id = $1 AND user_id = $2 \
         AND status NOT IN ('queued', 'running', 'awaiting_approval')"
    )
    // (The statuses of an unfinished run: the shared SQL's `unfinished!`.)
}

/// The SQL of the user's (model, workload, spend) since a day, by model and workload:
/// binds the owner and the first day.
pub(crate) fn usage_names_sql(engine: Backend) -> String {
    format!(
        "SELECT model, workload, {} AS cost FROM usage_rollups \
         WHERE user_id = $1 AND day >= $2 GROUP BY model, workload ORDER BY model, workload",
        engine.money_sum("cost_usd")
    )
}

/// The SQL of a thread's latest messages, newest first: binds the thread, the owner and
/// the limit.
pub(crate) const LATEST_MESSAGES_SQL: &str = "SELECT id, thread_id, role, content, metadata, \
     created_at, superseded_by FROM messages WHERE thread_id = $1 AND user_id = $2 \
     ORDER BY position DESC LIMIT $3";
