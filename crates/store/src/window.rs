//! Reading a window `[since, until]` of a user's usage: which days come whole from the
//! rollups, which edge ranges from the rows, and how the pieces are put together.
//!
//! Engine- and driver-independent, so that both reads of a window agree by construction:
//! `rollups_sql::read_window_and_after` (sqlx, both engines) and `sqlite_reads` (SQLite's
//! reader threads, which skip sqlx's per-value copies on the read every run makes) ask a
//! [`WindowRead`] what to select, hand it the rows they got (decoded through
//! [`Columns`]), and take the result from it.
//!
//! A window is read as its whole UTC days from the rollups and its partial days at either
//! edge from the rows, unless the edge day's rollups settle it: an edge day's groups say,
//! by their latest instant, whether any of its rows can be in the window at all, or whether
//! all of them are (the window ends after the last row of its last day, which is the usual
//! case for a window ending now). Only an edge day neither of those settles has its rows
//! read.

use crate::columns::Columns;
use crate::records::{StoreError, StoreResult, UsageRow};
use crate::rollups::{day_of, Group, GroupKey, Rollup, Sketches};

const DAY_MS: i128 = 24 * 3600 * 1000;

/// The columns of `usage_rollups` after its key, in [`decode_group`]'s order.
pub(crate) const GROUP_COLUMNS: &str = "row_count, requests, errors, timed_requests, \
     prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_usd, last_ts, \
     short_requests, short_prompt_tokens, short_completion_tokens, short_cost_usd, \
     latency_sketch, completion_sketch";

/// A row selected as `day, provider, model, workload, source, {GROUP_COLUMNS}`.
pub(crate) fn decode_group(row: &impl Columns) -> StoreResult<(GroupKey, Group)> {
    let key = GroupKey {
        day: row.int(0)?,
        provider: row.text(1)?.to_owned(),
        model: row.text(2)?.to_owned(),
        workload: row.text(3)?.to_owned(),
        source: row.text(4)?.to_owned(),
    };
    let mut group = Group {
        rows: row.int(5)?,
        requests: row.int(6)?,
        errors: row.int(7)?,
        timed_requests: row.int(8)?,
        prompt_tokens: row.int(9)?,
        completion_tokens: row.int(10)?,
        cached_tokens: row.int(11)?,
        reasoning_tokens: row.int(12)?,
        cost_usd: row.real(13)?,
        last_ts_ms: row.int(14)?,
        short_requests: row.int(15)?,
        short_prompt_tokens: row.int(16)?,
        short_completion_tokens: row.int(17)?,
        short_cost_usd: row.real(18)?,
        ..Group::default()
    };
    group
        .read_sketches(row.text(19)?, row.text(20)?)
        .ok_or_else(|| StoreError::Corrupt("usage rollup sketch".into()))?;
    Ok((key, group))
}

/// How a window splits: whole days read from the rollups, ranges of rows at its edges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WindowSplit {
    /// First and last whole day, if any.
    pub(crate) days: Option<(i64, i64)>,
    /// Inclusive ranges of instants read from the rows.
    pub(crate) edges: Vec<(i64, i64)>,
}

/// Splits `[since, until]` (inclusive) into whole UTC days and the partial days' ranges.
pub(crate) fn split_window(since: i64, until: i64) -> WindowSplit {
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
    if since.div_euclid(DAY_MS) == until.div_euclid(DAY_MS) && first > last {
        // Part of one day: a single edge.
        return WindowSplit {
            days: None,
            edges: vec![(clamp(since), clamp(until))],
        };
    }
    // Otherwise each edge lies within its own day, because a day's rollups settle only the
    // rows of that day; a window across one midnight (a day-long window ending mid-day) has
    // two edges and no whole day.
    let mut edges = Vec::new();
    if since < first * DAY_MS {
        edges.push((clamp(since), clamp(first * DAY_MS - 1)));
    }
    if (last + 1) * DAY_MS <= until {
        edges.push((clamp((last + 1) * DAY_MS), clamp(until)));
    }
    WindowSplit {
        days: (first <= last).then(|| (clamp(first), clamp(last))),
        edges,
    }
}

/// One read of a window, driven by its reader: [`WindowRead::new`], then select the rollup
/// rows of [`WindowRead::days`] with [`WindowRead::group_columns`] and hand each to
/// [`WindowRead::add_group`]; then select the rows of [`WindowRead::unsettled`] (if any),
/// in `ts, id` order, and [`WindowRead::finish`] with them.
#[derive(Debug)]
pub(crate) struct WindowRead {
    split: WindowSplit,
    since: i64,
    until: i64,
    sketches: Sketches,
    /// Whether the rollup of the rows after `until` is wanted too.
    after: bool,
    rollup: Rollup,
    later: Rollup,
    /// The groups of the partial days at the window's edges.
    edge_days: Vec<(GroupKey, Group)>,
}

impl WindowRead {
    /// The read of `[since, until]`, and with `after` of what follows `until` as well;
    /// `None` when the window is empty (nothing to read).
    pub(crate) fn new(since: i64, until: i64, sketches: Sketches, after: bool) -> Option<Self> {
        let split = split_window(since, until);
        if split.days.is_none() && split.edges.is_empty() {
            return None;
        }
        Some(Self {
            split,
            since,
            until,
            sketches,
            after,
            rollup: Rollup::default(),
            later: Rollup::default(),
            edge_days: Vec::new(),
        })
    }

    /// The rollup columns to select after the key: a sketch not asked for is selected as
    /// `''`, neither sent nor parsed.
    pub(crate) fn group_columns(&self) -> String {
        GROUP_COLUMNS
            .replace(
                "latency_sketch",
                if self.sketches.latency {
                    "latency_sketch"
                } else {
                    "''"
                },
            )
            .replace(
                "completion_sketch",
                if self.sketches.completion {
                    "completion_sketch"
                } else {
                    "''"
                },
            )
    }

    /// The days whose rollup rows to select: from the first, to the last (`None`: every
    /// later day, when the rows after the window are wanted too).
    pub(crate) fn days(&self) -> (i64, Option<i64>) {
        (
            day_of(self.since),
            (!self.after).then(|| day_of(self.until)),
        )
    }

    /// Takes one selected rollup row.
    pub(crate) fn add_group(&mut self, key: GroupKey, group: Group) {
        let whole = self
            .split
            .days
            .is_some_and(|(first, last)| first <= key.day && key.day <= last);
        if whole {
            self.rollup.groups.insert(key, group);
        } else if key.day > day_of(self.until) {
            self.later.groups.insert(key, group);
        } else {
            self.edge_days.push((key, group));
        }
    }

    /// After the rollup rows: the inclusive ranges of instants whose rows must be read
    /// (edge days the rollups do not settle), empty when none must be.
    pub(crate) fn unsettled(&mut self) -> Vec<(i64, i64)> {
        let mut unsettled = Vec::new();
        for &(from, to) in &self.split.edges {
            let day = day_of(from);
            let groups = || self.edge_days.iter().filter(move |(key, _)| key.day == day);
            if groups().all(|(_, g)| g.last_ts_ms < from) {
                // No row of that day is at or after `from` (or the day has none).
                continue;
            }
            let starts_its_day = i128::from(from) == i128::from(day) * DAY_MS;
            if starts_its_day && groups().all(|(_, g)| g.last_ts_ms <= to) {
                // The range starts with its day and ends after the day's last row.
                for (key, group) in groups() {
                    self.rollup.groups.insert(key.clone(), group.clone());
                }
                continue;
            }
            unsettled.push((from, to));
        }
        unsettled
    }

    /// The window's rollup, given the rows of [`WindowRead::unsettled`] in `ts, id` order
    /// (the order makes the money add up the same way at every read); and, if asked for,
    /// the rollup of the rows dated after `until` when the rollups settle it: `None` when
    /// some row of `until`'s day is dated after `until`.
    pub(crate) fn finish(self, edge_rows: &[UsageRow]) -> (Rollup, Option<Rollup>) {
        let Self {
            until,
            sketches,
            after,
            mut rollup,
            later,
            edge_days,
            ..
        } = self;
        // Nothing of `until`'s day is after it when `until` ends the day, or when the day's
        // rows all precede it.
        let end_day = day_of(until);
        let ends_its_day = (i128::from(until) + 1).rem_euclid(DAY_MS) == 0;
        let after = (after
            && (ends_its_day
                || edge_days
                    .iter()
                    .filter(|(key, _)| key.day == end_day)
                    .all(|(_, g)| g.last_ts_ms <= until)))
        .then_some(later);
        if !edge_rows.is_empty() {
            let mut edges = Rollup::of(edge_rows);
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
        (rollup, after)
    }
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
        // Across one midnight with no whole day between: one edge on each side of it, so
        // that each is settled by its own day's rollups.
        assert_eq!(
            split_window(D + 7, 2 * D + 9),
            WindowSplit {
                days: None,
                edges: vec![(D + 7, 2 * D - 1), (2 * D, 2 * D + 9)],
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

    /// Reads `[since, until]` of `rows` the way the store's readers do: the rollup rows of
    /// the days asked for, then the rows of the ranges the rollups leave unsettled.
    fn read_window(rows: &[UsageRow], since: i64, until: i64) -> Rollup {
        let all = Sketches {
            latency: true,
            completion: true,
        };
        let Some(mut read) = WindowRead::new(since, until, all, false) else {
            return Rollup::default();
        };
        let (first, last) = read.days();
        let last = last.unwrap_or(i64::MAX);
        for (key, group) in Rollup::of(rows).groups {
            if first <= key.day && key.day <= last {
                read.add_group(key, group);
            }
        }
        let unsettled = read.unsettled();
        let edge_rows: Vec<UsageRow> = rows
            .iter()
            .filter(|r| unsettled.iter().any(|&(a, b)| a <= r.ts_ms && r.ts_ms <= b))
            .cloned()
            .collect();
        read.finish(&edge_rows).0
    }

    #[test]
    fn a_window_read_from_rollups_and_edge_rows_counts_exactly_the_rows_inside_it() {
        let row = |ts_ms| UsageRow {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            ts_ms,
            prompt_tokens: 10,
            requests: 1,
            ..UsageRow::default()
        };
        // Day 1 has rows only early on; day 2 has one mid-day; day 3 two; day 4 one late.
        let rows: Vec<UsageRow> = [D + 2, 2 * D + 5, 3 * D + 1, 3 * D + 8, 4 * D + 20]
            .into_iter()
            .map(row)
            .collect();
        let windows = [
            // A day-long window ending mid-day, whose first day has nothing after its
            // start: the row of its second day still counts.
            (D + 7, 2 * D + 9),
            (D + 7, 2 * D + 4),
            (D + 1, 2 * D + 9),
            (2 * D + 6, 3 * D + 1),
            (D + 7, 4 * D + 19),
            (0, 5 * D),
            (3 * D + 2, 3 * D + 7),
            (3 * D, 3 * D + 8),
        ];
        for (since, until) in windows {
            let inside: Vec<&UsageRow> = rows
                .iter()
                .filter(|r| since <= r.ts_ms && r.ts_ms <= until)
                .collect();
            assert_eq!(
                read_window(&rows, since, until),
                Rollup::of(inside),
                "window {since}..={until}"
            );
        }
    }

    #[test]
    fn a_window_selects_the_days_it_touches() {
        let read = |since, until, after| {
            WindowRead::new(since, until, Sketches::default(), after).map(|r| r.days())
        };
        assert_eq!(read(D + 7, 5 * D + 9, false), Some((1, Some(5))));
        assert_eq!(read(D + 7, 5 * D + 9, true), Some((1, None)));
        assert_eq!(read(2 * D, 5 * D - 1, false), Some((2, Some(4))));
        assert_eq!(read(D + 7, D + 9, false), Some((1, Some(1))));
        assert_eq!(read(5, 4, false), None);
    }
}
