//! Reading a run's event log back: gap detection and paging, shared by WebSocket
//! `resume` and the REST / server-sent-events replay.

use apex_protocol::events::{EventKind, SUPERVISOR};
use serde::Deserialize;

use crate::ids::RunId;
use crate::store::{RunRecord, StoreResult, StoredEvent};
use crate::user_store::UserStore;

/// Page size when replaying a run's stored events.
pub const REPLAY_PAGE: i64 = 500;

/// `true` when events after `after_seq` existed but are no longer stored (retention).
pub async fn has_gap(store: &UserStore, run: &RunRecord, after_seq: u64) -> StoreResult<bool> {
    if after_seq >= run.last_seq {
        return Ok(false);
    }
    let first = store.list_events(run.id, after_seq, 1).await?;
    Ok(first.first().map(|e| e.seq) != Some(after_seq + 1))
}

/// The next page of stored events after `after_seq`.
pub async fn page_after(
    store: &UserStore,
    run: RunId,
    after_seq: u64,
) -> StoreResult<Vec<StoredEvent>> {
    store.list_events(run, after_seq, REPLAY_PAGE).await
}

#[derive(Deserialize)]
struct Head {
    #[serde(rename = "type")]
    kind: EventKind,
    agent_name: String,
}

/// Event type and whether it is the terminal event, read from stored JSON.
pub fn head(json: &str) -> (Option<EventKind>, bool) {
    match serde_json::from_str::<Head>(json) {
        Ok(head) => (
            Some(head.kind),
            head.kind == EventKind::AgentCompleted && head.agent_name == SUPERVISOR,
        ),
        Err(_) => (None, false),
    }
}
