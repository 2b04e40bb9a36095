//! The answer a person reads: composed from the computed report, with the model's prose
//! in bounded slots.
//!
//! A 135M model asked to "quote the figures" drops them, repeats itself or echoes the
//! prompt; a large one may round or invent. So the facts are never left to the model:
//! [`compose`] lays the answer out as fixed text built from the report (total spend and
//! period, top models and workloads, each recommendation with its monthly savings, the plan,
//! or the figures of the model, workload or plan step the question is about) and leaves a
//! few [`Slot`]s for prose: a summary sentence or two, a short why per recommendation or
//! step. Each slot has its own prompt, token bound and template text; [`check_slot`]
//! decides whether what the model wrote may be shown (no loop, no echoed labels or chat
//! markers, no figure that is not in the report, not too long), else the template text is.
//!
//! Whatever writes the slots (the template, the local model, an OpenAI-compatible server),
//! the answer states the user's total, top model and every saving.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde_json::Value;

use super::{period_phrase, RequestCategory};
use crate::llm::ChatMessage;

/// One piece of the answer, in reading order.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    /// Text built from the report; shown as is.
    Fixed(String),
    /// Prose a model may write.
    Slot(Slot),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// `summary`, `why_1`, `why_step` ...: names the slot in notes and the result.
    pub name: String,
    pub messages: Vec<ChatMessage>,
    /// Shown when no model writes the slot or its text is not usable (may be empty).
    pub fallback: String,
    pub max_tokens: u32,
    /// Longest accepted text, in characters.
    pub max_chars: usize,
    /// Text placed before the slot's content when it is not empty (a space, a newline).
    pub lead: String,
    /// Text placed after it when it is not empty.
    pub trail: String,
    /// The user's own figures and names (a total as written, "$1.75"; a model's name) of
    /// which the text must state at least one; empty when any text may do. A small model
    /// can write a fluent sentence that says nothing of the user's data ("The answer to
    /// your question is: 1."); the summary must not.
    pub anchors: Vec<String>,
    /// Word stems (lower case) of which the text must contain one, saying it is on the
    /// slot's topic; empty when any topic may do. A "why this lowers the cost" that speaks
    /// of neither cost, price, tokens nor savings ("The change is an example of how code
    /// review can be improved.") explains nothing.
    pub topic: &'static [&'static str],
}

/// What a sentence about why a change lowers the cost speaks of (see [`Slot::topic`]).
const COST_TOPIC: &[&str] = &[
    "cost", "cheap", "price", "pric", "bill", "spend", "spent", "sav", "token", "pay", "$", "less",
    "fewer", "lower", "reduc", "rate", "expens",
];

/// Texts that end a slot: prompt labels and chat markers a small model writes back.
pub const SLOT_STOPS: &[&str] = &[
    "\n\n",
    "Question:",
    "Answer:",
    "Facts:",
    "Analysis",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "My question",
    "User:",
    "Assistant:",
];

pub fn money(v: f64) -> String {
    let cents = (v * 100.0).round() as i64;
    let sign = if cents < 0 { "-" } else { "" };
    format!(
        "{sign}${}.{:02}",
        thousands(cents.abs() / 100),
        cents.abs() % 100
    )
}

pub fn thousands(n: i64) -> String {
    let digits = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// How a usage source is named in an answer.
fn source_name(source: &str) -> String {
    match source {
        "upload" => "your uploads".into(),
        "demo" => "demo data".into(),
        "apex" => "Apex's own LLM calls".into(),
        "otlp" => "OpenTelemetry spans".into(),
        "gateway" => "calls through Apex's LLM gateway".into(),
        "openai-usage" => "OpenAI's usage export".into(),
        "anthropic-usage" => "Anthropic's usage report".into(),
        "litellm-spend" => "LiteLLM's spend logs".into(),
        other => other.to_string(),
    }
}

fn share(part: f64, total: f64) -> String {
    if total > 0.0 {
        format!("{:.0}%", part / total * 100.0)
    } else {
        "0%".into()
    }
}

const SLOT_SYSTEM: &str = "You are Apex, an assistant that explains a person's AI usage and \
     costs. Reply in plain words with one or two short sentences. Use only the facts given. \
     Do not write lists, headings or questions.";

fn slot(name: &str, facts: String, task: &str, fallback: String, max_tokens: u32) -> Slot {
    Slot {
        name: name.into(),
        messages: vec![
            ChatMessage::system(SLOT_SYSTEM),
            ChatMessage::user(format!("{facts}\n{task}")),
        ],
        fallback,
        max_tokens,
        max_chars: (max_tokens as usize) * 5,
        lead: String::new(),
        trail: String::new(),
        anchors: Vec::new(),
        topic: &[],
    }
}

/// The report's figures as the sentences every data answer starts from.
struct Figures<'a> {
    report: &'a Value,
    usage: &'a Value,
    /// The window as sentences name it ("the last 30 days"; see `period_phrase`).
    period: String,
    total: f64,
}

impl<'a> Figures<'a> {
    fn new(report: &'a Value) -> Self {
        let usage = &report["usage"];
        Self {
            report,
            usage,
            period: period_phrase(
                usage["days"].as_u64().unwrap_or(30),
                report["ends_days_ago"].as_u64().unwrap_or(0),
            ),
            total: num(&usage["total_cost_usd"]),
        }
    }

    fn totals(&self) -> String {
        let mut out = format!(
            "Over {} you made {} LLM requests costing {} in total ({} prompt and {} completion tokens).\n",
            self.period,
            thousands(int(&self.usage["total_requests"])),
            money(self.total),
            thousands(int(&self.usage["total_prompt_tokens"])),
            thousands(int(&self.usage["total_completion_tokens"])),
        );
        let cached = int(&self.usage["total_cached_tokens"]);
        if cached > 0 {
            let prompt = int(&self.usage["total_prompt_tokens"]);
            let _ = writeln!(
                out,
                "{} of the prompt tokens ({}) were served from a prompt cache.",
                thousands(cached),
                share(cached as f64, prompt as f64),
            );
        }
        // Said only when there is more than one place the figures come from.
        if let Some(sources) = self.usage["sources"].as_array().filter(|s| s.len() > 1) {
            let listed: Vec<String> = sources
                .iter()
                .map(|s| {
                    format!(
                        "{} ({} requests)",
                        source_name(s["source"].as_str().unwrap_or("?")),
                        thousands(int(&s["requests"]))
                    )
                })
                .collect();
            let _ = writeln!(out, "These figures come from {}.", listed.join(", "));
        }
        out
    }

    fn top_model(&self) -> Option<&'a Value> {
        self.usage["top_models"].as_array().and_then(|m| m.first())
    }

    fn top_workload(&self) -> Option<&'a Value> {
        self.usage["top_workloads"]
            .as_array()
            .and_then(|w| w.first())
    }

    fn where_it_goes(&self) -> String {
        let mut out = String::new();
        if let Some(top) = self.top_model() {
            let cost = num(&top["cost_usd"]);
            let _ = write!(
                out,
                "Most of it goes to {} ({}, {} of spend)",
                text(&top["model"]),
                money(cost),
                share(cost, self.total)
            );
            if let Some(w) = self.top_workload() {
                let _ = write!(
                    out,
                    ", and your most expensive workload is {} ({})",
                    text(&w["workload"]),
                    money(num(&w["cost_usd"]))
                );
            }
            out.push_str(".\n");
        }
        out
    }

    fn ranking(&self, key: &str, name: &str, label: &str) -> String {
        let items: Vec<String> = self.usage[key]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|m| {
                        let cost = num(&m["cost_usd"]);
                        format!(
                            "{} {} ({}, {} requests)",
                            text(&m[name]),
                            money(cost),
                            share(cost, self.total),
                            thousands(int(&m["requests"]))
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if items.is_empty() {
            String::new()
        } else {
            format!("{label}: {}.\n", items.join("; "))
        }
    }

    fn latency(&self) -> String {
        let l = &self.usage["latency_ms"];
        let requests = int(&self.usage["total_requests"]);
        let errors = int(&self.usage["error_requests"]);
        format!(
            "Latency: p50 {} ms, p95 {} ms, p99 {} ms; {} of {} requests failed ({}).\n",
            thousands(int(&l["p50"])),
            thousands(int(&l["p95"])),
            thousands(int(&l["p99"])),
            thousands(errors),
            thousands(requests),
            share(errors as f64, requests as f64),
        )
    }

    fn savings(&self) -> f64 {
        num(&self.report["potential_monthly_savings_usd"])
    }

    fn recommendations(&self) -> Vec<&'a Value> {
        self.report["recommendations"]
            .as_array()
            .map(|r| r.iter().collect())
            .unwrap_or_default()
    }

    fn plan(&self) -> Vec<&'a Value> {
        self.report["action_plan"]
            .as_array()
            .map(|p| p.iter().collect())
            .unwrap_or_default()
    }

    /// The facts a slot's model is given: the headline figures in plain sentences.
    fn headline(&self) -> String {
        let mut out = format!(
            "Facts: In {} I spent {} on {} LLM requests.",
            self.period,
            money(self.total),
            thousands(int(&self.usage["total_requests"]))
        );
        if let Some(top) = self.top_model() {
            let _ = write!(
                out,
                " The model I spent most on is {}.",
                text(&top["model"])
            );
        }
        if let Some(w) = self.top_workload() {
            let _ = write!(
                out,
                " My most expensive workload is {}.",
                text(&w["workload"])
            );
        }
        if let Some(best) = self.recommendations().first() {
            let _ = write!(
                out,
                " The biggest saving is: {} (about {} a month).",
                text(&best["title"]).to_lowercase(),
                money(num(&best["monthly_savings_usd"]))
            );
        }
        out
    }
}

/// The summary sentence the template writes for each kind of question.
fn summary_fallback(f: &Figures, category: RequestCategory) -> String {
    let top = f.top_model().map(|m| text(&m["model"]).to_string());
    let on_top = top
        .as_deref()
        .map(|m| format!(", most of it on {m}"))
        .unwrap_or_default();
    match category {
        RequestCategory::LatencyPerformance => {
            let l = &f.usage["latency_ms"];
            format!(
                "Half of your requests in {} finished within {} ms and 99% within {} ms.",
                f.period,
                thousands(int(&l["p50"])),
                thousands(int(&l["p99"]))
            )
        }
        RequestCategory::ModelSelection => match &top {
            Some(m) => format!(
                "{m} takes the largest share of your spend; moving short, simple requests to a \
                 cheaper model of the same provider is where a model change saves most."
            ),
            None => "Your spend is spread over several models.".into(),
        },
        RequestCategory::UsageReport => {
            format!("You spent {} in {}{on_top}.", money(f.total), f.period)
        }
        _ if f.savings() > 0.0 => format!(
            "You spent {} in {}{on_top}, and the changes below could save about {} a month.",
            money(f.total),
            f.period,
            money(f.savings())
        ),
        _ => format!("You spent {} in {}{on_top}.", money(f.total), f.period),
    }
}

fn summary_slot(f: &Figures, category: RequestCategory, request: &str) -> Slot {
    let mut s = slot(
        "summary",
        f.headline(),
        &format!(
            "My question: {request}\nAnswer my question in one or two sentences, using the facts."
        ),
        summary_fallback(f, category),
        64,
    );
    s.trail = "\n\n".into();
    s.anchors = summary_anchors(f);
    s
}

/// What a summary may anchor on: the total, the savings, the top model and workload, the
/// median and tail latency (see [`Slot::anchors`]).
fn summary_anchors(f: &Figures) -> Vec<String> {
    let mut anchors = vec![money(f.total)];
    if f.savings() > 0.0 {
        anchors.push(money(f.savings()));
    }
    if let Some(m) = f.top_model() {
        anchors.push(text(&m["model"]).to_string());
    }
    if let Some(w) = f.top_workload() {
        anchors.push(text(&w["workload"]).to_string());
    }
    let latency = &f.usage["latency_ms"];
    for p in ["p50", "p99"] {
        if int(&latency[p]) > 0 {
            anchors.push(thousands(int(&latency[p])));
        }
    }
    anchors.retain(|a| !a.is_empty());
    anchors
}

/// Whether `text` states `anchor`: a name as written, a figure as a number of the text
/// (so "1750 ms" states "1,750", and "1.75 dollars" states "$1.75").
fn states(text: &str, anchor: &str) -> bool {
    let figure: String = anchor
        .trim_start_matches('$')
        .chars()
        .filter(|c| *c != ',')
        .collect();
    let is_figure = !figure.is_empty() && figure.chars().all(|c| c.is_ascii_digit() || c == '.');
    if is_figure {
        numbers_in(text).contains(&figure)
    } else {
        text.to_lowercase().contains(&anchor.to_lowercase())
    }
}

fn why_slot(index: usize, rec: &Value) -> Slot {
    let mut s = slot(
        &format!("why_{index}"),
        format!(
            "Facts: The change is: {}. {}",
            text(&rec["title"]),
            text(&rec["description"])
        ),
        "Explain in one sentence why this change lowers the cost.",
        String::new(),
        40,
    );
    s.lead = " ".into();
    s.topic = COST_TOPIC;
    s
}

fn recommendation_lines(parts: &mut Vec<Part>, f: &Figures, with_why: bool) {
    let recs = f.recommendations();
    if recs.is_empty() {
        parts.push(Part::Fixed(
            "\nI found no clear savings: your traffic already uses cost-efficient settings.\n"
                .into(),
        ));
        return;
    }
    parts.push(Part::Fixed(format!(
        "\nYou could save about {} per month:\n",
        money(f.savings())
    )));
    for (i, r) in recs.iter().enumerate() {
        parts.push(Part::Fixed(format!(
            "{}. {}: about {}/month ({} effort). {}",
            i + 1,
            text(&r["title"]),
            money(num(&r["monthly_savings_usd"])),
            text(&r["effort"]),
            text(&r["description"]),
        )));
        if with_why && i < 3 {
            parts.push(Part::Slot(why_slot(i + 1, r)));
        }
        parts.push(Part::Fixed("\n".into()));
    }
}

fn plan_lines(f: &Figures) -> String {
    let plan = f.plan();
    if plan.is_empty() {
        return String::new();
    }
    let mut out = "\nNext steps:\n".to_string();
    for step in plan {
        let _ = writeln!(
            out,
            "{}. {} ({} effort)",
            step["order"],
            text(&step["title"]),
            text(&step["effort"])
        );
    }
    out
}

fn focus_lines(f: &Figures) -> String {
    let mut out = String::new();
    let focus = &f.report["focus"];
    let known = |key: &str| -> Vec<String> {
        focus[key]
            .as_array()
            .map(|a| a.iter().map(|v| text(v).to_string()).collect())
            .unwrap_or_default()
    };
    for (key, label, known_key) in [
        ("models", "model", "known_models"),
        ("workloads", "workload", "known_workloads"),
    ] {
        for item in focus[key].as_array().into_iter().flatten() {
            let name = text(&item["name"]);
            if item["found"].as_bool() == Some(true) {
                let cost = num(&item["cost_usd"]);
                let _ = writeln!(
                    out,
                    "{name}: {} over {} ({} requests, {} prompt and {} completion tokens), {} of your {} total.",
                    money(cost),
                    f.period,
                    thousands(int(&item["requests"])),
                    thousands(int(&item["prompt_tokens"])),
                    thousands(int(&item["completion_tokens"])),
                    share(cost, f.total),
                    money(f.total),
                );
            } else {
                let shown = known(known_key);
                let _ = writeln!(
                    out,
                    "Your data does not show any requests to the {label} {name} in {}; the {label}s it shows are {}.",
                    f.period,
                    if shown.is_empty() { "none".to_string() } else { shown.join(", ") },
                );
            }
        }
    }
    out
}

fn step_parts(parts: &mut Vec<Part>, f: &Figures, step: u64) {
    let plan = f.plan();
    let index = if step == u64::from(u32::MAX) {
        plan.len().checked_sub(1)
    } else {
        usize::try_from(step).ok().and_then(|s| s.checked_sub(1))
    };
    match index.and_then(|i| plan.get(i)) {
        Some(s) => {
            let saving = num(&s["expected_monthly_savings_usd"]);
            let saving = if saving > 0.0 {
                format!(", about {}/month", money(saving))
            } else {
                String::new()
            };
            parts.push(Part::Fixed(format!(
                "Step {} of your plan: {} ({} effort{saving}). {}",
                s["order"],
                text(&s["title"]),
                text(&s["effort"]),
                text(&s["details"])
            )));
            let mut why = slot(
                "why_step",
                format!(
                    "Facts: The step is: {}. {}",
                    text(&s["title"]),
                    text(&s["details"])
                ),
                "Explain in one sentence why this step helps.",
                String::new(),
                40,
            );
            why.lead = " ".into();
            parts.push(Part::Slot(why));
            parts.push(Part::Fixed("\n\n".into()));
        }
        None => {
            parts.push(Part::Fixed(format!(
                "Your plan has {} steps, so there is no step {step}.\n",
                plan.len()
            )));
        }
    }
    parts.push(Part::Fixed(plan_lines(f).trim_start().to_string()));
}

/// Lays out the answer to the report's question. `request` is the user's message.
pub fn compose(report: &Value, request: &str) -> Vec<Part> {
    let f = Figures::new(report);
    let category: RequestCategory =
        serde_json::from_value(report["category"].clone()).unwrap_or(RequestCategory::General);
    let requests = int(&f.usage["total_requests"]);
    let focus = &report["focus"];
    let has_focus = ["models", "workloads"]
        .iter()
        .any(|k| focus[k].as_array().is_some_and(|a| !a.is_empty()));
    let step = focus["step"].as_u64();
    let mut parts = Vec::new();
    if requests == 0 {
        // Said as figures (no requests, $0.00), not as "nothing to analyse": a user with
        // usage elsewhere in time asked about an empty day or week, and that is the answer.
        let mut out = format!(
            "I found no AI usage in your account for {}: no requests and $0.00 spent. If you \
             expected some, upload your usage with POST /api/usage/events (JSON or CSV), or \
             ask about a longer period.\n",
            f.period
        );
        if has_focus {
            out = focus_lines(&f) + &out;
        }
        parts.push(Part::Fixed(out));
        return parts;
    }
    if let Some(step) = step {
        step_parts(&mut parts, &f, step);
        return parts;
    }
    if has_focus {
        parts.push(Part::Fixed(focus_lines(&f) + "\n"));
        parts.push(Part::Fixed(f.totals()));
        parts.push(Part::Fixed(f.where_it_goes()));
        match category {
            RequestCategory::CostOptimization | RequestCategory::ModelSelection => {
                recommendation_lines(&mut parts, &f, false);
            }
            RequestCategory::LatencyPerformance => parts.push(Part::Fixed(f.latency())),
            _ => {}
        }
        return parts;
    }
    if category == RequestCategory::General && !report["follow_up"].as_bool().unwrap_or(false) {
        parts.push(Part::Fixed(format!(
            "I can answer questions about your own AI usage: what you spend and where, \
             latency and failures, which models to use, and how to cut costs. For example: \
             \"How can I reduce my LLM costs?\" or \"How much did I spend on {} last week?\"\n\n",
            f.top_model().map_or("gpt-4o", |m| text(&m["model"]))
        )));
        parts.push(Part::Fixed(f.totals()));
        parts.push(Part::Fixed(f.where_it_goes()));
        return parts;
    }
    parts.push(Part::Slot(summary_slot(&f, category, request)));
    parts.push(Part::Fixed(f.totals()));
    parts.push(Part::Fixed(f.where_it_goes()));
    match category {
        RequestCategory::UsageReport => {
            parts.push(Part::Fixed(f.ranking(
                "top_models",
                "model",
                "Top models by cost",
            )));
            parts.push(Part::Fixed(f.ranking(
                "top_workloads",
                "workload",
                "Top workloads by cost",
            )));
            parts.push(Part::Fixed(f.latency()));
            if f.savings() > 0.0 {
                parts.push(Part::Fixed(format!(
                    "\nYou could save about {} per month; ask \"How can I reduce my costs?\" for the plan.\n",
                    money(f.savings())
                )));
            }
        }
        RequestCategory::LatencyPerformance => {
            parts.push(Part::Fixed(f.latency()));
            parts.push(Part::Fixed(f.ranking(
                "top_models",
                "model",
                "Top models by cost",
            )));
            recommendation_lines(&mut parts, &f, false);
        }
        RequestCategory::ModelSelection => {
            parts.push(Part::Fixed(f.ranking(
                "top_models",
                "model",
                "Top models by cost",
            )));
            recommendation_lines(&mut parts, &f, true);
            parts.push(Part::Fixed(plan_lines(&f)));
        }
        _ => {
            parts.push(Part::Fixed(f.latency()));
            recommendation_lines(&mut parts, &f, true);
            parts.push(Part::Fixed(plan_lines(&f)));
        }
    }
    parts
}

/// The fixed text of an answer, all slots left empty (what every slot's numbers are
/// checked against).
pub fn fixed_text(parts: &[Part]) -> String {
    parts
        .iter()
        .filter_map(|p| match p {
            Part::Fixed(t) => Some(t.as_str()),
            Part::Slot(_) => None,
        })
        .collect()
}

/// The answer with every slot written by its template text.
pub fn template_answer(parts: &[Part]) -> String {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Fixed(t) => out.push_str(t),
            Part::Slot(s) => out.push_str(&placed(s, &s.fallback)),
        }
    }
    out
}

/// A slot's text with its lead and trail, or nothing for an empty text.
pub fn placed(slot: &Slot, text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!("{}{text}{}", slot.lead, slot.trail)
    }
}

/// Why a slot's text is not shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotProblem {
    Empty,
    Repeats(String),
    Echo(String),
    UnknownFigure(String),
    /// It states none of the slot's anchors (the first is named).
    NoneOfYourFigures(String),
    /// It speaks of none of the slot's topic (see [`Slot::topic`]).
    OffTopic,
    /// It gives a dollar figure for a model or workload that the figures give it nowhere
    /// ("claude-3-5-sonnet costs $2.98" when $2.98 is a saving from caching).
    Misattributed {
        figure: String,
        name: String,
    },
}

impl std::fmt::Display for SlotProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotProblem::Empty => write!(f, "it wrote nothing usable"),
            SlotProblem::Repeats(what) => write!(f, "it started repeating \"{what}\""),
            SlotProblem::Echo(what) => write!(f, "it echoed the prompt (\"{what}\")"),
            SlotProblem::UnknownFigure(what) => {
                write!(f, "it stated {what}, which is not one of your figures")
            }
            SlotProblem::NoneOfYourFigures(first) => {
                write!(f, "it stated none of your figures, such as {first}")
            }
            SlotProblem::OffTopic => write!(f, "it did not say how the change lowers the cost"),
            SlotProblem::Misattributed { figure, name } => {
                write!(f, "it gave {figure} for {name}, which your figures do not")
            }
        }
    }
}

/// Numbers as written ("1,234.56", "93"): what a slot may state. Digits that are part of
/// a name ("gpt-4o", "claude-3-5-sonnet", "p99") are not numbers.
pub fn numbers_in(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len()
            && (chars[i].is_ascii_digit()
                || (matches!(chars[i], ',' | '.')
                    && chars.get(i + 1).is_some_and(|c| c.is_ascii_digit())))
        {
            i += 1;
        }
        let glued_before =
            start > 0 && (chars[start - 1].is_alphabetic() || chars[start - 1] == '-');
        let glued_after = chars.get(i).is_some_and(|c| {
            c.is_alphabetic()
                || (*c == '-' && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric()))
        });
        if !glued_before && !glued_after {
            out.push(chars[start..i].iter().filter(|c| **c != ',').collect());
        }
    }
    out
}

/// A 4-word sequence seen three times, or any sentence written twice, is a loop.
/// The words of `text` as repetition is counted: lower-case, punctuation trimmed.
pub fn words_of(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect()
}

fn repetition(text: &str) -> Option<String> {
    let words = words_of(text);
    let mut seen: HashMap<&[String], usize> = HashMap::new();
    for gram in words.windows(4) {
        let count = seen.entry(gram).or_default();
        *count += 1;
        if *count >= 2 {
            return Some(gram.join(" "));
        }
    }
    let mut sentences = HashSet::new();
    for s in text
        .split(['.', '!', '?', '\n'])
        .map(str::trim)
        .filter(|s| s.len() > 12)
    {
        if !sentences.insert(s.to_lowercase()) {
            return Some(s.to_string());
        }
    }
    None
}

/// A sentence of `text` that names one of the user's models or workloads and a dollar
/// figure that the facts never give together with that name. Every figure the model
/// writes is one of the user's (checked before), but a small model pairs them freely: "the
/// most expensive model costs you $2.98 a month, and it's claude-3-5-sonnet", where $2.98
/// is what caching would save.
///
/// Together means: on one line of the answer's fixed text (a recommendation with its
/// workloads, "most of it goes to X ($5.88 ...)"), in one sentence of the prompt's facts
/// (a single line of several unrelated sentences), or in the slot's own template text.
fn misattribution(text: &str, facts: &str, fallback: &str) -> Option<SlotProblem> {
    let facts = facts.to_lowercase();
    let fallback = fallback.to_lowercase();
    let lines: Vec<&str> = facts
        .lines()
        .flat_map(|line| {
            if line.contains("facts:") {
                line.split(". ").collect::<Vec<_>>()
            } else {
                vec![line]
            }
        })
        .chain(std::iter::once(fallback.as_str()))
        .collect();
    // A name as the facts spell it: letters with a digit or a hyphen ("gpt-4o",
    // "rag-assistant"), so ordinary words never count.
    let is_name = |w: &str| {
        w.chars().any(|c| c.is_alphabetic())
            && w.chars().any(|c| c.is_ascii_digit() || c == '-')
            && facts.contains(w)
    };
    for sentence in text
        .split_inclusive(['!', '?', '\n'])
        .flat_map(|s| s.split(". "))
    {
        let lower = sentence.to_lowercase();
        let names: Vec<&str> = lower
            .split(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | ':' | '(' | ')' | '"'))
            .map(|w| w.trim_end_matches(['.', '\'', '!', '?']))
            .map(|w| w.strip_suffix("'s").unwrap_or(w))
            .filter(|w| is_name(w))
            .collect();
        if names.is_empty() {
            continue;
        }
        let figures = lower
            .match_indices('$')
            .filter_map(|(at, _)| numbers_in(&lower[at + 1..]).into_iter().next());
        for figure in figures {
            let paired = lines.iter().any(|line| {
                numbers_in(line).contains(&figure) && names.iter().any(|n| line.contains(n))
            });
            if !paired {
                return Some(SlotProblem::Misattributed {
                    figure: format!("${figure}"),
                    name: names[0].to_string(),
                });
            }
        }
    }
    None
}

/// A 4-word sequence of `text` that the rest of the answer already has twice: the slot
/// would only restate it (a title that is also a plan step), a third or fourth time.
fn restates(text: &str, answer: &str) -> Option<String> {
    let mine = words_of(text);
    let theirs = words_of(answer);
    mine.windows(4).find_map(|gram| {
        let seen = theirs.windows(4).filter(|w| *w == gram).count();
        (seen >= 2).then(|| gram.join(" "))
    })
}

/// Whether the model's text for a slot may be shown, trimmed to whole sentences within the
/// slot's bound; `facts` is the answer's fixed text plus the slot's prompt (every number
/// the slot states must be there), `request` the user's message (not to be echoed).
pub fn check_slot(
    raw: &str,
    slot: &Slot,
    facts: &str,
    request: &str,
) -> Result<String, SlotProblem> {
    let mut text = raw.trim().to_string();
    // Within the bound, and ending at a sentence end when there is one.
    if text.chars().count() > slot.max_chars {
        text = text.chars().take(slot.max_chars).collect();
    }
    if let Some(end) = text.rfind(['.', '!', '?']) {
        text.truncate(end + 1);
    } else if raw.trim().chars().count() > slot.max_chars {
        // Cut mid-sentence with no sentence end: not a sentence.
        return Err(SlotProblem::Empty);
    }
    let text = text.trim().to_string();
    if text.chars().filter(|c| c.is_alphabetic()).count() < 12 {
        return Err(SlotProblem::Empty);
    }
    if let Some(what) = repetition(&text) {
        return Err(SlotProblem::Repeats(what));
    }
    if let Some(what) = restates(&text, facts) {
        return Err(SlotProblem::Repeats(what));
    }
    let lower = text.to_lowercase();
    for label in SLOT_STOPS
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
    {
        if lower.contains(&label.to_lowercase()) {
            return Err(SlotProblem::Echo(label.to_string()));
        }
    }
    for marker in [
        "<|",
        "|>",
        "facts:",
        "explain in one sentence",
        "answer my question",
    ] {
        if lower.contains(marker) {
            return Err(SlotProblem::Echo(marker.to_string()));
        }
    }
    let request = request.trim().to_lowercase();
    if request.len() >= 16 && lower.contains(&request) {
        return Err(SlotProblem::Echo(request));
    }
    if text.trim_end().ends_with('?') {
        return Err(SlotProblem::Echo("a question back".into()));
    }
    let allowed: HashSet<String> = numbers_in(facts).into_iter().collect();
    for n in numbers_in(&text) {
        if !allowed.contains(&n) {
            let shown = if text.contains(&format!("${n}")) {
                format!("${n}")
            } else {
                n
            };
            return Err(SlotProblem::UnknownFigure(shown));
        }
    }
    if let Some(problem) = misattribution(&text, facts, &slot.fallback) {
        return Err(problem);
    }
    if let Some(first) = slot.anchors.first() {
        if !slot.anchors.iter().any(|a| states(&text, a)) {
            return Err(SlotProblem::NoneOfYourFigures(first.clone()));
        }
    }
    if !slot.topic.is_empty() && !slot.topic.iter().any(|stem| lower.contains(stem)) {
        return Err(SlotProblem::OffTopic);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn report(category: &str) -> Value {
        json!({
            "category": category,
            "usage": {"days": 30, "total_requests": 1234, "error_requests": 5,
                      "total_prompt_tokens": 100000, "total_completion_tokens": 20000,
                      "total_cost_usd": 11.4149, "latency_ms": {"p50": 800, "p95": 2100, "p99": 3900},
                      "top_models": [{"model": "claude-3-5-sonnet", "cost_usd": 10.58, "requests": 600},
                                     {"model": "gpt-4o", "cost_usd": 0.5, "requests": 400}],
                      "top_workloads": [{"workload": "rag-assistant", "cost_usd": 8.0, "requests": 300}]},
            "recommendations": [
                {"title": "Enable prompt caching", "description": "Cache the shared prefix of rag-assistant.",
                 "monthly_savings_usd": 2.01, "effort": "low", "strategy": "prompt_caching", "workloads": ["rag-assistant"]},
                {"title": "Route short requests to a cheaper model", "description": "Move short calls.",
                 "monthly_savings_usd": 1.2, "effort": "medium", "strategy": "model_routing", "workloads": []}],
            "potential_monthly_savings_usd": 3.21,
            "action_plan": [
                {"order": 1, "title": "Enable prompt caching", "details": "Cache it.", "effort": "low", "expected_monthly_savings_usd": 2.01},
                {"order": 2, "title": "Route short requests to a cheaper model", "details": "Move short calls.", "effort": "medium", "expected_monthly_savings_usd": 1.2},
                {"order": 3, "title": "Track the effect", "details": "Compare.", "effort": "low", "expected_monthly_savings_usd": 0.0}],
            "focus": {"models": [], "workloads": [], "known_models": ["claude-3-5-sonnet", "gpt-4o"], "known_workloads": ["rag-assistant"]},
        })
    }

    #[test]
    fn the_template_answer_states_total_top_model_and_every_saving() {
        let parts = compose(
            &report("cost_optimization"),
            "How can I reduce my LLM costs?",
        );
        let answer = template_answer(&parts);
        for expected in [
            "$11.41",
            "claude-3-5-sonnet",
            "$2.01",
            "$1.20",
            "$3.21",
            "Next steps",
            "costing $11.41 in total",
        ] {
            assert!(
                answer.contains(expected),
                "{expected} missing from:\n{answer}"
            );
        }
        assert!(matches!(parts[0], Part::Slot(ref s) if s.name == "summary"));
    }

    /// A window with no requests (a quiet day for a user who has usage on other days) is
    /// answered with its figures, no requests and $0.00, and a way on: not with
    /// "nothing to analyse".
    #[test]
    fn an_empty_window_is_answered_with_no_requests_and_zero_dollars() {
        let mut r = report("usage_report");
        r["usage"] = json!({"days": 1, "total_requests": 0, "error_requests": 0,
            "total_prompt_tokens": 0, "total_completion_tokens": 0, "total_cost_usd": 0.0,
            "latency_ms": {"p50": 0, "p95": 0, "p99": 0}, "top_models": [], "top_workloads": []});
        let answer = template_answer(&compose(&r, "how many tokens did I use yesterday"));
        assert!(answer.contains("no requests and $0.00 spent"), "{answer}");
        assert!(answer.contains("ask about a longer period"), "{answer}");
        assert!(
            !answer.contains("p95"),
            "no latency for no requests: {answer}"
        );
    }

    #[test]
    fn a_question_about_one_model_gets_its_figure_or_an_honest_no() {
        let mut r = report("usage_report");
        r["focus"]["models"] = json!([
            {"name": "gpt-4o", "found": true, "cost_usd": 0.5, "requests": 400, "prompt_tokens": 9, "completion_tokens": 1},
            {"name": "gemini-1.5-pro", "found": false}]);
        let answer = template_answer(&compose(&r, "how much on gpt-4o and gemini-1.5-pro?"));
        assert!(
            answer.starts_with("gpt-4o: $0.50 over the last 30 days"),
            "{answer}"
        );
        assert!(
            answer.contains("does not show any requests to the model gemini-1.5-pro"),
            "{answer}"
        );
        assert!(answer.contains("claude-3-5-sonnet, gpt-4o"), "{answer}");
    }

    #[test]
    fn a_step_question_explains_that_step() {
        let mut r = report("cost_optimization");
        r["focus"]["step"] = json!(2);
        let answer = template_answer(&compose(&r, "explain step 2"));
        assert!(answer.starts_with("Step 2 of your plan: Route short requests to a cheaper model (medium effort, about $1.20/month)"), "{answer}");
        r["focus"]["step"] = json!(9);
        let answer = template_answer(&compose(&r, "explain step 9"));
        assert!(
            answer.starts_with("Your plan has 3 steps, so there is no step 9."),
            "{answer}"
        );
    }

    /// A "why" must say something of cost: a fluent sentence about something else (one the
    /// embedded model wrote for "Cap output length") is not shown.
    #[test]
    fn a_why_slot_must_speak_of_cost() {
        let request = "How can I reduce my LLM costs?";
        let parts = compose(&report("cost_optimization"), request);
        let facts = fixed_text(&parts);
        let why = parts
            .iter()
            .find_map(|p| match p {
                Part::Slot(s) if s.name == "why_1" => Some(s),
                _ => None,
            })
            .expect("a why slot");
        assert_eq!(
            check_slot(
                "The change to cap the output length of a function is an example of how code \
                 review can be improved.",
                why,
                &facts,
                request
            ),
            Err(SlotProblem::OffTopic)
        );
        for on_topic in [
            "Cached prefixes are billed at a lower rate, so repeated long prompts cost less.",
            "Shorter answers mean fewer completion tokens to pay for.",
        ] {
            assert_eq!(
                check_slot(on_topic, why, &facts, request).as_deref(),
                Ok(on_topic),
                "{on_topic}"
            );
        }
        // The summary has no topic words to find: only its anchors.
        let Part::Slot(summary) = &parts[0] else {
            panic!()
        };
        assert!(summary.topic.is_empty());
    }

    #[test]
    fn slots_reject_loops_echoes_and_invented_figures() {
        let parts = compose(
            &report("cost_optimization"),
            "How can I reduce my LLM costs?",
        );
        let Part::Slot(slot) = &parts[0] else {
            panic!()
        };
        // As the reporting agent checks a slot: the fixed text, then the slot's prompt.
        let prompt: String = slot.messages.iter().map(|m| m.content.as_str()).collect();
        let facts = format!("{}\n{prompt}", fixed_text(&parts));
        let check = |t: &str| check_slot(t, slot, &facts, "How can I reduce my LLM costs?");
        assert_eq!(
            check(
                "You spend most on claude-3-5-sonnet, so caching its long prompts saves the most."
            )
            .unwrap(),
            "You spend most on claude-3-5-sonnet, so caching its long prompts saves the most."
        );
        assert!(matches!(
            check("Use 765 tokens. Use 765 tokens. Use 765 tokens."),
            Err(SlotProblem::Repeats(_))
        ));
        assert!(
            matches!(check("You could save $99 a month by caching prompts."), Err(SlotProblem::UnknownFigure(f)) if f == "$99")
        );
        assert!(matches!(
            check("Question: How can I reduce my LLM costs? Answer: cache"),
            Err(SlotProblem::Echo(_))
        ));
        assert!(matches!(
            check("<|im_start|>assistant hello there friend"),
            Err(SlotProblem::Echo(_))
        ));
        assert!(check("ok").is_err());
        // The title is already in the recommendation and the plan: a third time is a loop.
        assert!(matches!(
            check("Route short requests to a cheaper model to pay less."),
            Err(SlotProblem::Repeats(_))
        ));
        assert_eq!(
            check("You spent $11.41 in total. Caching helps. And then more text that is cut")
                .unwrap(),
            "You spent $11.41 in total. Caching helps."
        );
        // Fluent, with an allowed number, and about nothing of the user's: not a summary.
        assert_eq!(
            check("The answer to your question is: 1."),
            Err(SlotProblem::NoneOfYourFigures("$11.41".into()))
        );
        assert!(check("Caching shared prompts is the biggest change you can make.").is_err());
        // The user's figures, paired wrongly: $2.01 is caching's saving, not a model's cost.
        assert_eq!(
            check("The most expensive model costs you $2.01 a month, and it's Claude-3-5-sonnet."),
            Err(SlotProblem::Misattributed {
                figure: "$2.01".into(),
                name: "claude-3-5-sonnet".into()
            })
        );
        for paired in [
            "Most of it goes to claude-3-5-sonnet, which cost $10.58.",
            "You spent $11.41, most of it on claude-3-5-sonnet.",
            "Caching the shared prefix of rag-assistant saves about $2.01 a month.",
        ] {
            assert_eq!(check(paired).as_deref(), Ok(paired), "{paired}");
        }
        // Any one of the user's figures or names will do, as the model writes it.
        for anchored in [
            "Your total was 11.41 dollars, and caching saves the most.",
            "Your median request took 800 ms, which is fine for chat.",
            "Most of your spend goes to rag-assistant, so cache its prompt.",
            "You could save $3.21 a month with the changes below.",
        ] {
            assert_eq!(check(anchored).as_deref(), Ok(anchored), "{anchored}");
        }
    }

    #[test]
    fn the_answer_says_how_much_was_cached_and_where_the_figures_come_from() {
        let plain = template_answer(&compose(&report("usage_report"), "what did I spend?"));
        assert!(
            !plain.contains("prompt cache") && !plain.contains("come from"),
            "{plain}"
        );
        let mut r = report("usage_report");
        r["usage"]["total_cached_tokens"] = json!(25000);
        r["usage"]["sources"] = json!([{"source": "demo", "requests": 1000},
                                       {"source": "otlp", "requests": 234}]);
        let answer = template_answer(&compose(&r, "what did I spend?"));
        assert!(
            answer.contains("25,000 of the prompt tokens (25%) were served from a prompt cache."),
            "{answer}"
        );
        assert!(
            answer.contains(
                "These figures come from demo data (1,000 requests), OpenTelemetry spans (234 requests)."
            ),
            "{answer}"
        );
    }

    #[test]
    fn numbers_are_read_as_written() {
        assert_eq!(
            numbers_in("$1,234.56 on gpt-4o, 93%, p99 and claude-3-5-sonnet."),
            vec!["1234.56", "93"]
        );
    }
}
