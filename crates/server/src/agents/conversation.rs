//! What a run knows of its thread and of the user's names: the earlier turns (so a
//! follow-up is read with the question before it) and the model and workload names in the
//! user's own usage data (so triage recognises "support chat" or a custom model).
//!
//! Both are read through the run's [`UserStore`], so they are this user's only.

use crate::ids::ThreadId;
use crate::store::StoreResult;
use crate::user_store::UserStore;

/// At most this many earlier messages are read...
pub const MAX_TURNS: usize = 6;
/// ...and at most this many characters of them (a 135M model's context is 2,048 tokens).
pub const MAX_CHARS: usize = 3_000;

/// One earlier message of the thread.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// The thread's messages before the run's own (the last user message equal to `request`),
/// superseded answers left out, newest [`MAX_TURNS`] within [`MAX_CHARS`], oldest first.
pub async fn earlier_turns(
    store: &UserStore,
    thread: ThreadId,
    request: &str,
) -> StoreResult<Vec<Turn>> {
    // The run's own message and whatever came after it are in the last few.
    let messages = store.latest_messages(thread, MAX_TURNS as i64 + 4).await?;
    let own = messages
        .iter()
        .rposition(|m| m.role == "user" && m.content == request)
        .unwrap_or(messages.len());
    let mut turns = Vec::new();
    let mut chars = 0;
    for message in messages[..own].iter().rev() {
        if turns.len() == MAX_TURNS || !matches!(message.role.as_str(), "user" | "assistant") {
            break;
        }
        // A regenerated answer is no longer the thread's answer: the model reads the one
        // that replaced it.
        if message.superseded_by.is_some() {
            continue;
        }
        let content: String = message.content.chars().take(MAX_CHARS - chars).collect();
        chars += content.chars().count();
        turns.push(Turn {
            role: message.role.clone(),
            content,
        });
        if chars >= MAX_CHARS {
            break;
        }
    }
    turns.reverse();
    Ok(turns)
}

/// The model and workload names in the user's usage of about the last year (whole UTC
/// days, see [`crate::store::Store::usage_names`]), most costly first.
pub async fn usage_names(
    store: &UserStore,
    now_ms: i64,
) -> StoreResult<(Vec<String>, Vec<String>)> {
    let since = crate::usage::window_start_ms(crate::usage::MAX_WINDOW_DAYS, now_ms);
    let pairs = store.usage_names(since).await?;
    let mut models: Vec<(String, f64)> = Vec::new();
    let mut workloads: Vec<(String, f64)> = Vec::new();
    for (model, workload, spend) in &pairs {
        for (list, name) in [(&mut models, model), (&mut workloads, workload)] {
            match list.iter_mut().find(|(n, _)| n == name) {
                Some((_, cost)) => *cost += spend,
                None => list.push((name.clone(), *spend)),
            }
        }
    }
    let sorted = |mut v: Vec<(String, f64)>| {
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v.into_iter().map(|(n, _)| n).collect::<Vec<_>>()
    };
    Ok((sorted(models), sorted(workloads)))
}
