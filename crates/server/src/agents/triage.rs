//! Triage: what is the user asking about, for which models, workloads and time window, and
//! how it follows from the thread's earlier turns.
//!
//! Three sources, combined so that a 135M model can never produce an invalid
//! classification:
//! - **Rules** ([`classify_by_rules`]): keyword stems, tolerant of one typo in longer words.
//!   When they find the topic, they decide it.
//! - **The model, by constrained choice** ([`crate::llm::LlmProvider::choose`]): when the
//!   rules find nothing, the model picks one of the fixed labels (the local model scores
//!   each label's likelihood; other providers answer a one-field schema). Whatever it does,
//!   the result is one of the labels or nothing.
//! - **Entities by rules** ([`Entities`]): models from the pricing table and the user's own
//!   model names, the user's own workload names, the window ("last 7 days", "this week") and
//!   a plan step ("explain step 2").
//!
//! Follow-ups ("and gpt-4o?", "what about last week?") inherit what the new message does not
//! say from the thread's previous question, resolved the same way. The labelled set in
//! `triage_labelled.tsv` measures rules, model and the combination (docs/quality.md).

use async_trait::async_trait;
use serde_json::{json, Value};

use super::{period_phrase, Agent, AgentContext, AgentError, RequestCategory, RunState, Triage};
use crate::llm::{ChatMessage, LlmError};
use crate::usage::pricing::PricingTable;
use crate::usage::{DEFAULT_WINDOW_DAYS, MAX_WINDOW_DAYS};

pub struct TriageAgent;

/// The labelled requests the accuracy figures in docs/quality.md are measured on:
/// `category<TAB>request`, one per line; `#` starts a comment. A line whose request
/// starts with `> ` is a follow-up to the line before it.
pub const LABELLED_SET: &str = include_str!("triage_labelled.tsv");

/// Keyword stems per category. A stem matches a word that starts with it; stems of six
/// letters or more also match with one letter wrong, missing, extra or swapped ("redcue",
/// "latncy"). Shorter stems do not: "speed" would take "spend", "batch" "match".
const RULES: &[(RequestCategory, &[&str])] = &[
    (
        RequestCategory::CostOptimization,
        &[
            "cost",
            "cheap",
            "save",
            "saving",
            "reduce",
            "cut",
            "cutting",
            "lower",
            "bill",
            "price",
            "pricing",
            "budget",
            "expens",
            "money",
            "afford",
            "overspend",
            "wast",
            "optimi",
            "economi",
            "trim",
            "spend less",
            "spending less",
            "pay less",
            "smaller bill",
            "discount",
            "cach",
            "batch",
        ],
    ),
    (
        RequestCategory::LatencyPerformance,
        &[
            "latenc",
            "slow",
            "fast",
            "speed",
            "perform",
            "p50",
            "p95",
            "p99",
            "timeout",
            "throughput",
            "respons time",
            "response time",
            "lag",
            "quick",
            "delay",
            "wait",
            "error",
            "fail",
        ],
    ),
    (
        RequestCategory::ModelSelection,
        &[
            "which model",
            "what model",
            "model choice",
            "switch",
            "compare",
            "comparison",
            "best model",
            "alternativ",
            "migrat",
            "replace",
            "instead of",
            "better model",
            "move to",
            "vs",
            "versus",
            "downgrade",
            "upgrade",
            "modle",
            "recommend a model",
            "a model for",
            "good enough",
            "value for money",
            "which llm",
            "should i move",
        ],
    ),
    (
        RequestCategory::UsageReport,
        &[
            "usage",
            "report",
            "summar",
            "how much",
            "how many",
            "breakdown",
            "stats",
            "statistic",
            "overview",
            "spend",
            "spent",
            "total",
            "tokens",
            "requests",
            "what did",
            "what was",
            "calls",
            "show me",
            "list",
            "top",
            "biggest",
            "most",
            "trend",
            "daily",
        ],
    ),
];

/// Stems that, when present, decide over the usage-report words: "how much did I spend"
/// is a report, "how much could I save" is cost optimization.
const STRONG: &[(RequestCategory, &[&str])] = &[
    // First: on a tie ("a cheaper alternative to X") the question is about the model.
    (
        RequestCategory::ModelSelection,
        &[
            "which model",
            "what model",
            "which llm",
            "switch",
            "compare",
            "alternativ",
            "migrat",
            "instead of",
            "best model",
            "better model",
            "value for money",
            "good enough",
            "should i move",
        ],
    ),
    (
        RequestCategory::CostOptimization,
        &[
            "save",
            "saving",
            "reduce",
            "cut",
            "cutting",
            "lower",
            "cheap",
            "optimi",
            "wast",
            "trim",
            "pay less",
            "spend less",
        ],
    ),
    (
        RequestCategory::LatencyPerformance,
        &[
            "latenc",
            "slow",
            "fast",
            "speed",
            "p95",
            "p99",
            "timeout",
            "throughput",
            "fail",
            "error",
            "how long",
        ],
    ),
];

/// Phrases that decide the topic before any stem is counted, checked in this order: "how
/// much could I save" is about saving, "how much did I spend on the model I use most" is a
/// report even though it names a model.
const PHRASES: &[(RequestCategory, &[&str])] = &[
    (
        RequestCategory::CostOptimization,
        &[
            "spend less",
            "pay less",
            "how much could",
            "how much would",
            "how much can i save",
            "could save",
            "would save",
        ],
    ),
    (
        RequestCategory::UsageReport,
        &[
            "spend the most",
            "spent the most",
            "cost me",
            "did i spend",
            "do i spend",
            "have i spent",
            "am i spending",
            "how much did",
            "how much does",
            "how much do i",
            "how much have",
            "what did",
            "what was my",
        ],
    ),
];

/// The labels the model chooses among, in [`RequestCategory`] order.
const CHOICES: &[(RequestCategory, &str)] = &[
    (RequestCategory::CostOptimization, "cost"),
    (RequestCategory::LatencyPerformance, "latency"),
    (RequestCategory::ModelSelection, "model"),
    (RequestCategory::UsageReport, "usage"),
    (RequestCategory::General, "other"),
];

fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '.' || c == '_'))
        .map(|w| w.trim_matches(|c: char| c == '.' || c == '-' || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// One edit (substitution, insertion, deletion or swap of neighbours) apart, or equal.
fn within_one_edit(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let (ra, rb) = (&a[prefix..], &b[prefix..]);
    if ra.is_empty() || rb.is_empty() {
        return ra.len() + rb.len() <= 1;
    }
    ra[1..] == rb[1..]
        || ra[1..] == rb[..]
        || ra[..] == rb[1..]
        || (ra.len() >= 2
            && rb.len() >= 2
            && ra[0] == rb[1]
            && ra[1] == rb[0]
            && ra[2..] == rb[2..])
}

/// Does `stem` occur in the request (its words `words`, its lower-cased text `text`)?
fn stem_matches(stem: &str, text: &str, words: &[String]) -> bool {
    if stem.contains(' ') {
        return text.contains(stem);
    }
    words.iter().any(|w| {
        if w.starts_with(stem) {
            // "vs" or "lag" must be whole words, not the start of "vsphere" or "language".
            return stem.len() >= 4 || w.len() == stem.len();
        }
        let n = stem.chars().count();
        n >= 6 && w.chars().count() + 1 >= n && {
            // The word's start with the stem's length, one letter more (an extra letter)
            // or one less (a missing letter).
            (n - 1..=n + 1).any(|len| {
                let head: String = w.chars().take(len).collect();
                head.chars().count() == len && within_one_edit(&head, stem)
            })
        }
    })
}

/// The category the rules find, and how many stems matched (0: the rules do not know).
pub fn classify_by_rules(text: &str) -> (RequestCategory, usize) {
    let lower = format!("{} ", text.to_lowercase());
    let words = words(text);
    let score = |table: &[(RequestCategory, &[&str])]| {
        table
            .iter()
            .map(|(category, stems)| {
                let hits = stems
                    .iter()
                    .filter(|s| stem_matches(s, &lower, &words))
                    .count();
                (*category, hits)
            })
            .filter(|(_, hits)| *hits > 0)
            // Highest score wins; on a tie the earlier rule (max_by_key keeps the last max).
            .rev()
            .max_by_key(|(_, hits)| *hits)
    };
    for (category, phrases) in PHRASES {
        let hits = phrases.iter().filter(|p| lower.contains(*p)).count();
        if hits > 0 {
            return (*category, hits);
        }
    }
    if let Some((category, hits)) = score(STRONG) {
        return (category, hits);
    }
    score(RULES).unwrap_or((RequestCategory::General, 0))
}

pub fn classify(text: &str) -> RequestCategory {
    classify_by_rules(text).0
}

/// Window from phrases like "last 14 days", "past week", "this month", "yesterday";
/// `None` when the request names no window.
pub fn explicit_window(text: &str) -> Option<u32> {
    let words = words(text);
    let number = |w: &str| -> Option<u32> {
        w.parse().ok().or(match w {
            "one" | "a" | "an" | "last" | "past" => Some(1),
            "two" => Some(2),
            "three" => Some(3),
            "four" => Some(4),
            "five" => Some(5),
            "six" => Some(6),
            "seven" => Some(7),
            "ten" => Some(10),
            "fourteen" => Some(14),
            "thirty" => Some(30),
            _ => None,
        })
    };
    for pair in words.windows(2) {
        if let Some(n) = number(&pair[0]) {
            let days = match pair[1].as_str() {
                "day" | "days" => Some(n),
                "week" | "weeks" => Some(n.saturating_mul(7)),
                "fortnight" => Some(n.saturating_mul(14)),
                "month" | "months" => Some(n.saturating_mul(30)),
                "quarter" => Some(n.saturating_mul(90)),
                "year" => Some(n.saturating_mul(365)),
                _ => None,
            };
            if let Some(days) = days {
                return Some(days.clamp(1, MAX_WINDOW_DAYS));
            }
        }
    }
    let has = |w: &str| words.iter().any(|x| x == w);
    if has("today") || has("yesterday") || has("daily") && has("last") {
        Some(1)
    } else if has("week") || has("weekly") {
        Some(7)
    } else if has("fortnight") {
        Some(14)
    } else if has("month") || has("monthly") {
        Some(30)
    } else if has("quarter") {
        Some(90)
    } else if has("year") {
        Some(365)
    } else {
        None
    }
}

/// Does the message ask about the period before the one discussed ("the week before",
/// "the previous month", "the 14 days prior", "and before that?")? Only a follow-up is
/// read this way: on its own, "the previous week" is last week.
pub fn asks_for_earlier_period(text: &str) -> bool {
    let words = words(text);
    let earlier = |w: &str| matches!(w, "previous" | "prior" | "preceding");
    words.windows(2).any(|p| {
        (is_time_unit(&p[0]) && matches!(p[1].as_str(), "before" | "prior" | "earlier"))
            || (earlier(&p[0]) && is_time_unit(&p[1]))
            || (p[0] == "before" && matches!(p[1].as_str(), "that" | "then"))
    }) || words
        .windows(3)
        .any(|p| earlier(&p[0]) && p[1].parse::<u32>().is_ok() && is_time_unit(&p[2]))
}

/// The window a thread's questions (oldest first) arrive at, as (days, ends days ago): a
/// question naming a window sets it, ending now; one asking for the period before moves
/// back past the window so far, keeping its length unless it names one; others keep it.
fn thread_window<'a>(questions: impl Iterator<Item = &'a Entities>) -> (Option<u32>, u32) {
    let (mut days, mut ago) = (None, 0u32);
    for question in questions {
        if question.earlier_period {
            let before = days.unwrap_or(DEFAULT_WINDOW_DAYS);
            ago = ago.saturating_add(before).min(MAX_WINDOW_DAYS);
            days = Some(question.days.unwrap_or(before));
        } else if question.days.is_some() {
            days = question.days;
            ago = 0;
        }
    }
    (days, ago)
}

/// Window in days: the one the request names, else the default.
pub fn window_days(text: &str) -> u32 {
    explicit_window(text).unwrap_or(DEFAULT_WINDOW_DAYS)
}

/// Keeps only the longest of overlapping names ("gpt-4o-mini" also contains "gpt-4o").
fn longest_only(mut found: Vec<String>) -> Vec<String> {
    let all = found.clone();
    found.retain(|m| {
        !all.iter()
            .any(|other| other != m && other.contains(m.as_str()))
    });
    found
}

/// Model names the request contains, among `known` (lower-case names), in the order they
/// appear in the request. "4o mini" and "gpt4o" count as "gpt-4o-mini" and "gpt-4o".
pub fn mentioned_in(text: &str, known: &[String]) -> Vec<String> {
    let text = text.to_lowercase();
    let squashed: String = text
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '_'))
        .collect();
    let mut found: Vec<(usize, String)> = Vec::new();
    for name in known {
        let at = text.find(name.as_str()).or_else(|| {
            let flat: String = name
                .chars()
                .filter(|c| !matches!(c, '-' | ' ' | '_'))
                .collect();
            (flat.len() >= 5).then(|| squashed.find(&flat)).flatten()
        });
        if let Some(at) = at {
            if !found.iter().any(|(_, n)| n == name) {
                found.push((at, name.clone()));
            }
        }
    }
    found.sort();
    longest_only(found.into_iter().map(|(_, n)| n).collect())
}

pub fn mentioned_models(text: &str, pricing: &PricingTable) -> Vec<String> {
    let known: Vec<String> = pricing
        .models()
        .iter()
        .map(|p| p.model.to_string())
        .collect();
    mentioned_in(text, &known)
}

/// Workload names the request contains: "support-chat", "support chat" and
/// "support_chat" all name the workload `support-chat`.
pub fn mentioned_workloads(text: &str, workloads: &[String]) -> Vec<String> {
    let lower = text.to_lowercase();
    let spaced = |s: &str| s.replace(['-', '_'], " ");
    let text_spaced = spaced(&lower);
    let mut found: Vec<(usize, String)> = workloads
        .iter()
        .filter_map(|w| {
            let name = w.to_lowercase();
            lower
                .find(&name)
                .or_else(|| text_spaced.find(&spaced(&name)))
                .map(|at| (at, w.clone()))
        })
        .collect();
    found.sort();
    longest_only(found.into_iter().map(|(_, w)| w).collect())
}

/// Words that look like identifiers but name no model or workload.
const NOT_NAMES: &[&str] = &[
    "real-time",
    "step-by-step",
    "follow-up",
    "e-mail",
    "long-term",
    "short-term",
    "built-in",
    "multi-model",
    "open-source",
    "re-run",
    "day-to-day",
    "per-user",
    "per-model",
    "cost-efficient",
    "cost-effective",
    "high-quality",
    "low-latency",
    "non-urgent",
    "well-known",
];

/// Model families: an unknown name starting with one of these is a model, not a workload.
const MODEL_FAMILIES: &[&str] = &[
    "gpt", "claude", "gemini", "llama", "mistral", "mixtral", "o1", "o3", "o4", "deepseek", "qwen",
    "command", "phi", "gemma",
];

/// Identifier-like words (`support-chat`, `my_batch_job`, `gemini-2.5-pro`) that are not
/// among `known`: the user asks about a model or workload their data may not have, and the
/// answer should say so rather than answer something else. Returns (models, workloads).
pub fn unknown_names(text: &str, known: &[String]) -> (Vec<String>, Vec<String>) {
    let mut models = Vec::new();
    let mut workloads = Vec::new();
    for word in words(text) {
        let identifier = word.len() >= 5
            && (word.contains('-') || word.contains('_'))
            && word.chars().filter(|c| c.is_ascii_alphabetic()).count() >= 3
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        let time = ["day", "days", "week", "weeks", "month", "months"]
            .iter()
            .any(|unit| word.ends_with(&format!("-{unit}")));
        let known_already = known
            .iter()
            .any(|k| k.contains(&word) || word.contains(k.as_str()));
        if !identifier || time || NOT_NAMES.contains(&word.as_str()) || known_already {
            continue;
        }
        if MODEL_FAMILIES.iter().any(|f| word.starts_with(f)) {
            models.push(word);
        } else {
            workloads.push(word);
        }
    }
    (models, workloads)
}

/// "step 2", "the second step", "#3": the plan step the request asks about. Asking where
/// to start ("what should I do first?", "where do I begin?") asks for the first step.
pub fn mentioned_step(text: &str) -> Option<u32> {
    let words = words(text);
    let ordinal = |w: &str| match w {
        "first" | "1st" => Some(1),
        "second" | "2nd" => Some(2),
        "third" | "3rd" => Some(3),
        "fourth" | "4th" => Some(4),
        "fifth" | "5th" => Some(5),
        "last" => Some(u32::MAX),
        _ => None,
    };
    if let Some(step) = asks_where_to_start(&words, ordinal) {
        return Some(step);
    }
    for (i, w) in words.iter().enumerate() {
        if w == "step" || w == "steps" || w == "recommendation" || w == "point" {
            if let Some(n) = words
                .get(i + 1)
                .and_then(|n| n.trim_start_matches('#').parse().ok())
            {
                return Some(n);
            }
            if let Some(n) = i.checked_sub(1).and_then(|p| ordinal(&words[p])) {
                return Some(n);
            }
        }
        if let Some(n) = w.strip_prefix('#').and_then(|n| n.parse().ok()) {
            return Some(n);
        }
    }
    None
}

/// "what should I do first?", "which one do I tackle first?", "what do I change last?"
/// (an ordinal right after a verb of acting on the plan), "where do I start?", "what
/// should I begin with?": the plan step asked for, by its place.
fn asks_where_to_start(words: &[String], ordinal: impl Fn(&str) -> Option<u32>) -> Option<u32> {
    const ACTING: &[&str] = &[
        "do",
        "change",
        "fix",
        "tackle",
        "try",
        "implement",
        "pick",
        "one",
        "prioritize",
        "prioritise",
        "address",
    ];
    for (i, pair) in words.windows(2).enumerate() {
        // "What did I do last week?" names a window, not a step.
        let window_follows = words.get(i + 2).is_some_and(|w| is_time_unit(w));
        if ACTING.contains(&pair[0].as_str()) && !window_follows {
            if let Some(step) = ordinal(&pair[1]) {
                return Some(step);
            }
        }
    }
    let starting = words
        .iter()
        .any(|w| matches!(w.as_str(), "start" | "begin" | "started"));
    let asking = words
        .iter()
        .any(|w| matches!(w.as_str(), "where" | "what" | "which" | "how"));
    (starting && asking).then_some(1)
}

/// A unit of time as windows are named ("week", "months", "quarter").
fn is_time_unit(word: &str) -> bool {
    matches!(
        word,
        "day" | "days" | "week" | "weeks" | "fortnight" | "month" | "months" | "quarter" | "year"
    )
}

/// "and after that?", "what next?", "then what?": asks for the plan step after the one
/// being discussed. "Next" before a unit of time ("next week") is a window, not a step.
fn asks_for_next_step(text: &str) -> bool {
    let lower = text.to_lowercase();
    let words = words(text);
    ["after that", "after this", "and then", "then what"]
        .iter()
        .any(|p| lower.contains(p))
        || words.iter().enumerate().any(|(i, w)| {
            w == "next"
                && !words
                    .get(i + 1)
                    .is_some_and(|after| is_time_unit(after) || after == "time")
        })
}

/// "why?", "how much will that save?", "explain it": about what the last answer said.
fn refers_back(text: &str) -> bool {
    text.trim().to_lowercase().starts_with("why")
        || words(text)
            .iter()
            .any(|w| matches!(w.as_str(), "that" | "it" | "this"))
}

/// The plan step an answer was about: the reporting agent starts such an answer with
/// "Step N of your plan:".
pub fn answered_step(answer: &str) -> Option<u32> {
    let rest = answer.trim_start().strip_prefix("Step ")?;
    let (number, rest) = rest.split_once(' ')?;
    rest.starts_with("of your plan")
        .then(|| number.parse().ok())
        .flatten()
}

/// The plan step the thread's questions (oldest first) had reached: the last one's step,
/// where each question either names a step or asks for the one after the previous.
fn thread_step(questions: &[String]) -> Option<u32> {
    questions.iter().fold(None, |previous, question| {
        mentioned_step(question).or_else(|| {
            asks_for_next_step(question)
                .then_some(previous)
                .flatten()
                .map(|step: u32| step.saturating_add(1))
        })
    })
}

/// Does this message lean on the one before it ("and gpt-4o?", "what about last week?",
/// "explain step 2", "why?")?
pub fn looks_like_follow_up(text: &str) -> bool {
    let lower = text.trim().to_lowercase();
    let words = words(text);
    const OPENERS: &[&str] = &[
        "and ",
        "what about",
        "how about",
        "and what",
        "same for",
        "same but",
        "also ",
        "why",
        "explain",
        "tell me more",
        "more about",
        "what if",
        "ok ",
        "okay",
        "then ",
        "what does that",
        "and for",
        "only ",
        "just ",
    ];
    OPENERS.iter().any(|o| lower.starts_with(o))
        || mentioned_step(text).is_some()
        || words.len() <= 4
        || words.iter().any(|w| {
            matches!(
                w.as_str(),
                "that" | "it" | "those" | "them" | "this" | "these"
            )
        })
}

/// What the rules read in one message, given the user's own model and workload names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Entities {
    pub models: Vec<String>,
    pub workloads: Vec<String>,
    pub days: Option<u32>,
    pub step: Option<u32>,
    /// The message asks for the period before the one discussed (see
    /// [`asks_for_earlier_period`]).
    pub earlier_period: bool,
}

impl Entities {
    pub fn read(text: &str, known_models: &[String], workloads: &[String]) -> Self {
        let mut models = mentioned_in(text, known_models);
        let mut named = mentioned_workloads(text, workloads);
        let known: Vec<String> = known_models
            .iter()
            .chain(workloads)
            .map(|n| n.to_lowercase())
            .collect();
        let (other_models, other_workloads) = unknown_names(text, &known);
        models.extend(other_models);
        named.extend(other_workloads);
        Self {
            models,
            workloads: named,
            days: explicit_window(text),
            step: mentioned_step(text),
            earlier_period: asks_for_earlier_period(text),
        }
    }

    fn is_empty(&self) -> bool {
        self.models.is_empty()
            && self.workloads.is_empty()
            && self.days.is_none()
            && self.step.is_none()
            && !self.earlier_period
    }
}

/// The names triage recognises: the pricing table's models and the user's own.
#[derive(Debug, Clone, Default)]
pub struct KnownNames {
    pub models: Vec<String>,
    pub workloads: Vec<String>,
}

impl KnownNames {
    pub fn new(pricing: &PricingTable, user_models: &[String], user_workloads: &[String]) -> Self {
        let mut models: Vec<String> = pricing
            .models()
            .iter()
            .map(|p| p.model.to_string())
            .collect();
        for m in user_models {
            let m = m.to_lowercase();
            if !models.contains(&m) {
                models.push(m);
            }
        }
        Self {
            models,
            workloads: user_workloads.to_vec(),
        }
    }
}

/// Combines the rules, the model's choice and the thread's earlier questions (`earlier`,
/// oldest first) into the triage. `model_choice` is consulted only when the rules do not
/// know the topic and the message does not follow up an earlier one.
pub fn resolve(
    request: &str,
    earlier: &[String],
    names: &KnownNames,
    model_choice: Option<RequestCategory>,
) -> (Triage, &'static str) {
    resolve_in_thread(request, earlier, None, names, model_choice)
}

/// [`resolve`], knowing also which plan step the thread's last answer was about
/// (`answered_step`, see [`answered_step`]): "and after that?" asks for the one after it,
/// however far back the question that started the walk through the plan is.
pub fn resolve_in_thread(
    request: &str,
    earlier: &[String],
    answered_step: Option<u32>,
    names: &KnownNames,
    model_choice: Option<RequestCategory>,
) -> (Triage, &'static str) {
    let (rule_category, hits) = classify_by_rules(request);
    let here = Entities::read(request, &names.models, &names.workloads);
    let follows =
        !earlier.is_empty() && (looks_like_follow_up(request) || (hits == 0 && !here.is_empty()));
    // The earlier questions, newest first, as the rules read them.
    let before: Vec<(RequestCategory, usize, Entities)> = if follows {
        earlier
            .iter()
            .rev()
            .map(|q| {
                let (category, hits) = classify_by_rules(q);
                (
                    category,
                    hits,
                    Entities::read(q, &names.models, &names.workloads),
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    let inherited = before
        .iter()
        .find(|(_, hits, _)| *hits > 0)
        .map(|(c, _, _)| *c);
    let (category, how) = match (hits, inherited) {
        (hits, _) if hits > 0 => (rule_category, "by keyword rules"),
        (_, Some(category)) => (category, "from the earlier question in this thread"),
        _ => match model_choice {
            Some(category) => (category, "by the model's choice among the categories"),
            None => (RequestCategory::General, "by keyword rules"),
        },
    };
    // A follow-up's window continues the thread's (see `thread_window`); a new question's
    // is its own, ending now.
    let (days, ends_days_ago) = if follows {
        thread_window(
            before
                .iter()
                .rev()
                .map(|(_, _, e)| e)
                .chain(std::iter::once(&here)),
        )
    } else {
        (here.days, 0)
    };
    // Before `here`'s names move into the triage.
    let names_nothing = here.is_empty();
    let (mut models, mut workloads) = (here.models, here.workloads);
    // A follow-up keeps the earlier scope and window unless it names new ones.
    if models.is_empty() && workloads.is_empty() {
        if let Some((_, _, e)) = before
            .iter()
            .find(|(_, _, e)| !e.models.is_empty() || !e.workloads.is_empty())
        {
            models = e.models.clone();
            workloads = e.workloads.clone();
        }
    }
    (
        Triage {
            category,
            models,
            days: days.unwrap_or(DEFAULT_WINDOW_DAYS),
            workloads,
            // "And after that?" asks for the step after the one the thread was on; "why?"
            // or "how much will that save?" right after a step's answer, about that step.
            step: here.step.or_else(|| {
                if !follows {
                    None
                } else if asks_for_next_step(request) {
                    answered_step
                        .or_else(|| thread_step(earlier))
                        .map(|step| step.saturating_add(1))
                } else if names_nothing && refers_back(request) {
                    answered_step
                } else {
                    None
                }
            }),
            follow_up: follows,
            ends_days_ago,
        },
        how,
    )
}

/// The labelled set as (expected category, request, the thread's earlier questions).
pub fn labelled_set() -> Vec<(RequestCategory, String, Vec<String>)> {
    let mut out = Vec::new();
    let mut thread: Vec<String> = Vec::new();
    for line in LABELLED_SET
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let Some((label, request)) = line.split_once('\t') else {
            continue;
        };
        let Ok(expected) = serde_json::from_value::<RequestCategory>(json!(label)) else {
            continue;
        };
        let request = match request.strip_prefix("> ") {
            Some(follow_up) => follow_up.to_string(),
            None => {
                thread.clear();
                request.to_string()
            }
        };
        out.push((expected, request.clone(), thread.clone()));
        thread.push(request);
    }
    out
}

/// Whether a run asks the model to choose the topic: only when the rules find none, the
/// message does not follow up an earlier question (whose topic it inherits), and it names
/// something of the user's data (a model, a workload, a window). A message with none of
/// these is a greeting or off-topic: measured on the labelled set (docs/quality.md), the
/// 135M model's choice is right for under half of all requests and almost never picks
/// "other" for off-topic ones, so it is only asked where the message is about the data.
pub fn needs_model_choice(request: &str, earlier: &[String], names: &KnownNames) -> bool {
    classify_by_rules(request).1 == 0
        && (earlier.is_empty() || !looks_like_follow_up(request))
        && !Entities::read(request, &names.models, &names.workloads).is_empty()
}

/// The instruction for the model's constrained choice of a category.
/// Most answer tokens a choice takes (the provider's `choose` asks for 16).
const CHOICE_TOKENS_BOUND: u32 = 16;

pub fn choice_prompt(request: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage::system(
            "Sort a question about a company's AI and LLM usage into one topic. Topics: \
             cost (saving money, bills, cheaper options), latency (speed, slowness, errors), \
             model (choosing or comparing models), usage (how much was used or spent, \
             reports), other (anything else). Answer with the topic word only.",
        ),
        ChatMessage::user(request),
    ]
}

/// The labels of [`choice_prompt`], in order.
pub fn choice_labels() -> Vec<String> {
    CHOICES.iter().map(|(_, label)| label.to_string()).collect()
}

pub fn category_of_choice(index: usize) -> Option<RequestCategory> {
    CHOICES.get(index).map(|(category, _)| *category)
}

impl TriageAgent {
    /// The model's choice among the categories; `None` when it has none to give.
    async fn model_choice(
        &self,
        cx: &AgentContext,
        request: &str,
    ) -> Result<Option<RequestCategory>, LlmError> {
        let started = std::time::Instant::now();
        let meter = crate::llm::TokenMeter::default();
        let prompt = choice_prompt(request);
        let prompt_chars = prompt.iter().map(|m| m.content.chars().count()).sum();
        // A choice is a few tokens of answer.
        let held = cx.hold_budget(prompt_chars, CHOICE_TOKENS_BOUND).await?;
        // Its own token: given up on after `llm_queue_wait`, the request is withdrawn
        // from the model's queue and the run goes on.
        let token = cx.ctx.cancellation().child_token();
        let choosing = cx.llm.choose(
            prompt,
            choice_labels(),
            meter.clone(),
            Some(cx.ctx.user_id()),
            token.clone(),
        );
        let choice = match cx.llm_queue_wait {
            None => choosing.await,
            Some(wait) => match tokio::time::timeout(wait, choosing).await {
                Ok(choice) => choice,
                Err(_) => {
                    token.cancel();
                    Err(LlmError::Busy("the model did not answer in time".into()))
                }
            },
        };
        cx.settle_budget(held, meter.get()).await;
        cx.record_llm_usage(
            self.name(),
            cx.llm.as_ref(),
            meter.get(),
            started.elapsed(),
            choice.is_ok(),
        )
        .await;
        Ok(choice?.and_then(category_of_choice))
    }
}

#[async_trait]
impl Agent for TriageAgent {
    fn name(&self) -> &'static str {
        "triage"
    }

    async fn run(&self, cx: &AgentContext, state: &mut RunState) -> Result<Value, AgentError> {
        cx.think(
            self.name(),
            "Classifying the request and extracting models, workloads and time range",
            1,
            2,
        )
        .await?;
        state.history =
            super::conversation::earlier_turns(&cx.store, cx.ctx.thread_id(), &state.request)
                .await?;
        let earlier: Vec<String> = state
            .history
            .iter()
            .filter(|t| t.role == "user")
            .map(|t| t.content.clone())
            .collect();
        let (user_models, user_workloads) =
            super::conversation::usage_names(&cx.store, cx.now_ms()).await?;
        let names = KnownNames::new(&cx.pricing, &user_models, &user_workloads);
        let needs_model = needs_model_choice(&state.request, &earlier, &names);
        let mut note = None;
        let model_choice = if needs_model && cx.llm_triage && cx.has_model() {
            match self.model_choice(cx, &state.request).await {
                Ok(choice) => choice,
                Err(LlmError::Cancelled) => return Err(AgentError::Llm(LlmError::Cancelled)),
                Err(LlmError::OverBudget(_)) => {
                    note = Some("your budget has no room for the model");
                    None
                }
                Err(LlmError::Busy(_)) => {
                    note = Some("the model is busy with other requests");
                    None
                }
                Err(err) => {
                    // Logged for operators; the user reads only that the rules decided.
                    tracing::warn!(error = %err, "the model's triage choice failed; using the rules");
                    note = Some("the model was not available for it");
                    None
                }
            }
        } else {
            None
        };
        let last_answer = state.history.iter().rev().find(|t| t.role == "assistant");
        let (triage, how) = resolve_in_thread(
            &state.request,
            &earlier,
            last_answer.and_then(|t| answered_step(&t.content)),
            &names,
            model_choice,
        );
        let scope = describe_scope(&triage);
        cx.think(
            self.name(),
            format!(
                "Request is about {} ({how}{}){scope}; analysing {}",
                category_words(triage.category),
                note.map(|n| format!("; {n}")).unwrap_or_default(),
                period_phrase(triage.days.into(), triage.ends_days_ago.into())
            ),
            2,
            2,
        )
        .await?;
        let result = json!(triage);
        state.triage = Some(triage);
        Ok(result)
    }
}

/// How a category reads in a sentence.
pub fn category_words(category: RequestCategory) -> &'static str {
    match category {
        RequestCategory::CostOptimization => "reducing costs",
        RequestCategory::LatencyPerformance => "latency and reliability",
        RequestCategory::ModelSelection => "choosing models",
        RequestCategory::UsageReport => "a usage report",
        RequestCategory::General => "something general",
    }
}

fn describe_scope(triage: &Triage) -> String {
    let mut parts = Vec::new();
    if !triage.models.is_empty() {
        parts.push(format!("model {}", triage.models.join(", ")));
    }
    if !triage.workloads.is_empty() {
        parts.push(format!("workload {}", triage.workloads.join(", ")));
    }
    if let Some(step) = triage.step {
        parts.push(format!(
            "plan step {}",
            if step == u32::MAX {
                "last".to_string()
            } else {
                step.to_string()
            }
        ));
    }
    if triage.follow_up {
        parts.push("following up the earlier question".into());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(", about {}", parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> KnownNames {
        KnownNames::new(
            &PricingTable::builtin(),
            &["my-finetune-v2".to_string()],
            &[
                "support-chat".into(),
                "rag-assistant".into(),
                "email-classifier".into(),
            ],
        )
    }

    #[test]
    fn classifies_by_keywords_with_typos() {
        let c = |t: &str| classify(t);
        assert_eq!(
            c("How can I reduce my LLM costs?"),
            RequestCategory::CostOptimization
        );
        assert_eq!(
            c("how can i redcue my bil"),
            RequestCategory::CostOptimization
        );
        assert_eq!(
            c("why is my bot so slow"),
            RequestCategory::LatencyPerformance
        );
        assert_eq!(c("whats my latncy"), RequestCategory::LatencyPerformance);
        assert_eq!(c("give me a usage breakdown"), RequestCategory::UsageReport);
        assert_eq!(
            c("how much did I spend last week"),
            RequestCategory::UsageReport
        );
        assert_eq!(
            c("how much could I save?"),
            RequestCategory::CostOptimization
        );
        assert_eq!(
            c("which model should I use for support"),
            RequestCategory::ModelSelection
        );
        assert_eq!(c("hello"), RequestCategory::General);
        assert_eq!(
            c("what language is this in"),
            RequestCategory::General,
            "'lag' is a whole word"
        );
    }

    #[test]
    fn the_labelled_set_is_big_enough_and_the_rules_classify_most_of_it() {
        let names = names();
        let mut total = 0;
        let mut right = 0;
        let mut misses = Vec::new();
        for (expected, request, earlier) in labelled_set() {
            let (triage, _) = resolve(&request, &earlier, &names, None);
            total += 1;
            if triage.category == expected {
                right += 1;
            } else {
                misses.push(format!(
                    "{request:?}: {:?}, labelled {expected:?}",
                    triage.category
                ));
            }
        }
        assert!(total >= 150, "{total} labelled requests");
        // The rules alone: the documented figure is in docs/quality.md; this guards against
        // a rule change that loses much of it.
        assert!(
            right * 100 >= total * 85,
            "rules: {right}/{total}; misses:\n{}",
            misses.join("\n")
        );
    }

    #[test]
    fn a_follow_up_without_topic_words_has_no_rule_hits() {
        for text in [
            "what about last week?",
            "and gpt-4o?",
            "explain step 2",
            "why?",
        ] {
            assert_eq!(
                classify_by_rules(text).1,
                0,
                "{text}: {:?}",
                classify_by_rules(text)
            );
        }
    }

    #[test]
    fn the_model_is_asked_only_about_messages_that_name_the_users_data() {
        let n = names();
        assert!(!needs_model_choice(
            "what is the capital of France?",
            &[],
            &n
        ));
        assert!(
            !needs_model_choice("How can I reduce my LLM costs?", &[], &n),
            "the rules know"
        );
        assert!(needs_model_choice("gpt-4o over the last 14 days?", &[], &n));
        assert!(
            !needs_model_choice("and gpt-4o?", &["How much did I spend?".to_string()], &n),
            "a follow-up inherits the topic"
        );
    }

    #[test]
    fn follow_ups_inherit_the_earlier_scope() {
        let names = names();
        let (t, _) = resolve(
            "And how much did I spend on gpt-4o?",
            &["How can I reduce my LLM costs?".to_string()],
            &names,
            None,
        );
        assert_eq!(t.category, RequestCategory::UsageReport);
        assert_eq!(t.models, vec!["gpt-4o".to_string()]);
        assert!(t.follow_up);
        let (t, _) = resolve(
            "what about last week?",
            &[
                "How can I reduce my LLM costs?".into(),
                "And how much did I spend on gpt-4o?".into(),
            ],
            &names,
            None,
        );
        assert_eq!(t.category, RequestCategory::UsageReport);
        assert_eq!(t.days, 7);
        assert_eq!(t.models, vec!["gpt-4o".to_string()]);
        let (t, _) = resolve(
            "explain step 2",
            &["How can I reduce my LLM costs?".to_string()],
            &names,
            None,
        );
        assert_eq!(t.category, RequestCategory::CostOptimization);
        assert_eq!(t.step, Some(2));
        let (t, _) = resolve(
            "what is the capital of France?",
            &[],
            &names,
            Some(RequestCategory::General),
        );
        assert_eq!(t.category, RequestCategory::General);
        assert!(!t.follow_up);
    }

    /// "The week before" moves a follow-up's window back past the thread's, keeping its
    /// length; "before that" moves it again; a window named afresh ends now again; a new
    /// question's "previous week" is last week.
    #[test]
    fn a_follow_up_about_the_period_before_moves_the_window_back() {
        let names = names();
        let thread: Vec<String> = vec![
            "How much did I spend last week?".into(),
            "And what about the week before?".into(),
            "and before that?".into(),
            "what about the last 14 days?".into(),
            "and the previous 30 days?".into(),
        ];
        let expected = [(7, 0), (7, 7), (7, 14), (14, 0), (30, 14)];
        for (i, &(days, ago)) in expected.iter().enumerate() {
            let (t, _) = resolve(&thread[i], &thread[..i], &names, None);
            assert_eq!(
                (t.days, t.ends_days_ago),
                (days, ago),
                "{:?} after {:?}",
                thread[i],
                &thread[..i]
            );
        }
        // The default window, when the thread named none.
        let (t, _) = resolve(
            "and the month before?",
            &["How can I reduce my LLM costs?".to_string()],
            &names,
            None,
        );
        assert_eq!((t.days, t.ends_days_ago), (30, 30));
        assert_eq!(t.category, RequestCategory::CostOptimization);
        // Not a follow-up: the previous week is the last one.
        let (t, _) = resolve("What did I spend the previous week?", &[], &names, None);
        assert_eq!((t.days, t.ends_days_ago), (7, 0));
        for text in [
            "the week before",
            "the previous month",
            "14 days prior",
            "before that",
        ] {
            assert!(asks_for_earlier_period(text), "{text}");
        }
        for text in ["last week", "before I switch models", "the previous answer"] {
            assert!(!asks_for_earlier_period(text), "{text}");
        }
        assert_eq!(period_phrase(7, 7), "the 7 days before the last 7");
        assert_eq!(period_phrase(30, 0), "the last 30 days");
        assert_eq!(period_phrase(1, 0), "the last day", "not 'the last 1 days'");
        assert_eq!(period_phrase(1, 1), "the day before yesterday");
    }

    #[test]
    fn extracts_windows_models_workloads_and_steps() {
        assert_eq!(window_days("spend over the last 14 days"), 14);
        assert_eq!(window_days("this week"), 7);
        assert_eq!(window_days("past two weeks"), 14);
        assert_eq!(window_days("reduce costs"), 30);
        assert_eq!(window_days("last 9999 days"), MAX_WINDOW_DAYS);
        assert_eq!(explicit_window("yesterday"), Some(1));
        let pricing = PricingTable::builtin();
        assert_eq!(
            mentioned_models(
                "should I move gpt-4o-mini traffic to claude-3-5-haiku?",
                &pricing
            ),
            vec!["gpt-4o-mini".to_string(), "claude-3-5-haiku".to_string()]
        );
        assert_eq!(
            mentioned_models("is gpt4o worth it", &pricing),
            vec!["gpt-4o".to_string()]
        );
        let n = names();
        assert_eq!(
            mentioned_in("what does my-finetune-v2 cost", &n.models),
            vec!["my-finetune-v2".to_string()]
        );
        assert_eq!(
            mentioned_workloads("how is support chat doing", &n.workloads),
            vec!["support-chat".to_string()]
        );
        assert_eq!(
            Entities::read(
                "how much does batch-indexer cost on gemini-2.5-pro?",
                &n.models,
                &n.workloads
            ),
            Entities {
                models: vec!["gemini-2.5-pro".into()],
                workloads: vec!["batch-indexer".into()],
                days: None,
                step: None,
                earlier_period: false,
            },
            "names the data may not have are kept, to be answered honestly"
        );
        assert!(Entities::read(
            "a real-time step-by-step 14-day plan for support-chat",
            &n.models,
            &n.workloads
        )
        .models
        .is_empty());
        assert_eq!(mentioned_step("explain step 2"), Some(2));
        assert_eq!(
            mentioned_step("tell me more about the second step"),
            Some(2)
        );
        assert_eq!(mentioned_step("reduce costs"), None);
        for (text, step) in [
            ("what should I do first?", Some(1)),
            ("Which one should I tackle first", Some(1)),
            ("where do I start?", Some(1)),
            ("how do I get started", Some(1)),
            ("what do I change last?", Some(u32::MAX)),
            ("what did I spend in the first week?", None),
            ("start caching prompts", None),
            ("what did my last request cost?", None),
            ("what did I do last week?", None),
        ] {
            assert_eq!(mentioned_step(text), step, "{text}");
        }
        // The step after the one the thread was on.
        let names = KnownNames::default();
        let thread = |questions: &[&str]| -> Vec<String> {
            questions.iter().map(|q| q.to_string()).collect()
        };
        let plan = "how can I cut my LLM costs?";
        for (earlier, request, step) in [
            (
                thread(&[plan, "what should I do first?"]),
                "and after that?",
                Some(2),
            ),
            (
                thread(&[plan, "explain step 2", "and after that?"]),
                "what next?",
                Some(4),
            ),
            (thread(&[plan]), "what next?", None),
            (
                thread(&[plan, "explain step 2"]),
                "and what about next week?",
                None,
            ),
            (thread(&[]), "and after that?", None),
        ] {
            let (t, _) = resolve(request, &earlier, &names, None);
            assert_eq!(t.step, step, "{request} after {earlier:?}");
        }
        // Past the questions the run reads, the last answer still says where the walk is.
        let answer =
            "Step 4 of your plan: Route short requests to a cheaper model (medium effort).";
        assert_eq!(answered_step(answer), Some(4));
        assert_eq!(answered_step("You spent $4.00 in the last 30 days."), None);
        assert_eq!(answered_step("Step up your caching."), None);
        let earlier = thread(&["and after that?", "what next?"]);
        let (t, _) = resolve_in_thread("and then?", &earlier, answered_step(answer), &names, None);
        assert_eq!(t.step, Some(5));
        // Right after a step's answer, "why?" and "that" are about that step; a question
        // that names its own scope is not.
        for (request, step) in [
            ("why?", Some(4)),
            ("how much will that save?", Some(4)),
            ("and gpt-4o?", None),
            ("what about last week?", None),
        ] {
            let (t, _) = resolve_in_thread(request, &earlier, answered_step(answer), &names, None);
            assert_eq!(t.step, step, "{request}");
        }
        assert!(looks_like_follow_up("which of these is the least effort?"));
    }
}
