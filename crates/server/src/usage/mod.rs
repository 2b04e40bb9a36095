//! A user's AI usage: the built-in pricing table, demo data, the usage summary, the
//! daily series behind the web page's chart, [`exports`]: provider usage exports read into
//! rows, [`llm_calls`]: Apex's own LLM requests recorded as the requesting user's usage,
//! [`price_book`]: the price every row is costed with (built in, or the user's negotiated
//! rates), and [`explain`]: the arithmetic of a row's or a summary cell's cost.
//!
//! The summary is computed by one function, [`summary_for`], used both by
//! `GET /api/usage/summary` and by the data agent's `usage_summary` tool, so the numbers in
//! an answer are exactly the numbers the API reports for the same user.

mod daily;
pub mod demo;
pub mod explain;
pub mod exports;
pub mod import;
pub mod llm_calls;
pub mod otlp;
pub mod price_book;
pub mod pricing;
mod summary;

pub use daily::{daily_for, group_daily};
pub use summary::{
    summarize, summary_and_window, summary_for, window_start_ms, ReadWindow, DEFAULT_WINDOW_DAYS,
    MAX_WINDOW_DAYS,
};

/// Text from a source as stored in a usage row: trimmed, at most 200 characters, no NUL
/// (PostgreSQL cannot store U+0000 in text). Sources that refuse such text instead use
/// `import::text_field`.
pub(crate) fn stored_label(value: &str) -> String {
    value
        .trim()
        .chars()
        .filter(|c| *c != '\0')
        .take(200)
        .collect()
}
