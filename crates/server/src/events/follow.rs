//! Following one run: its stored events after a cursor, then its live ones, until the
//! terminal event. Used by every reader that is not a WebSocket connection (the SSE stream
//! of `/api/runs/{id}/events`, the OpenAI-compatible `/v1/chat/completions`).
//!
//! The subscription is taken before the log is read, so an event written during the replay
//! is either in the replay or arrives live, and the cursor drops the copy that would
//! otherwise arrive twice. A subscriber that falls behind the bus, or whose bus reconnected
//! (events may have been lost between instances), catches up from the log.
//!
//! Following ends at the run's end whatever the cursor: a cursor at or past the terminal
//! event's seq (a client's `after_seq=999999`) must not hold the stream, and the user's
//! connection slot with it, open until the follow limit. So the run's terminal event ends
//! following even when its seq is not after the cursor (it is then not sent), and a run
//! found ended once subscribed ends it at once.

use std::time::Duration;

use tokio::sync::mpsc;

use super::{log, BusRecvError, EventBus};
use crate::auth::AuthenticatedUser;
use crate::store::RunRecord;
use crate::user_store::UserStore;

/// Backlog between the reader task and a slow consumer.
const BUFFER: usize = 256;

/// One event of the followed run, as stored.
#[derive(Debug, Clone)]
pub struct RunEvent {
    pub seq: u64,
    pub json: String,
    pub terminal: bool,
}

/// Sends stored events after `*cursor`; returns `Ok(true)` once the terminal event went.
async fn replay(
    store: &UserStore,
    run: &RunRecord,
    cursor: &mut u64,
    tx: &mpsc::Sender<RunEvent>,
) -> Result<bool, ()> {
    loop {
        let page = log::page_after(store, run.id, *cursor)
            .await
            .map_err(|err| {
                tracing::error!(error = %err, "event replay failed");
            })?;
        if page.is_empty() {
            return Ok(false);
        }
        for stored in page {
            let (_, terminal) = log::head(&stored.json);
            *cursor = stored.seq;
            tx.send(RunEvent {
                seq: stored.seq,
                json: stored.json,
                terminal,
            })
            .await
            .map_err(|_| ())?;
            if terminal {
                return Ok(true);
            }
        }
    }
}

/// Whether `run`'s terminal event is in its log (the terminal event is always its last),
/// or the run is gone: either way no event of it is still to come.
async fn terminal_stored(store: &UserStore, run: &RunRecord) -> Result<bool, ()> {
    let failed = |err: crate::store::StoreError| {
        tracing::error!(error = %err, "reading the followed run failed");
    };
    let Some(now) = store.get_run(run.id).await.map_err(failed)? else {
        return Ok(true);
    };
    if !now.status.is_terminal() || now.last_seq == 0 {
        return Ok(false);
    }
    let last = store
        .list_events(run.id, now.last_seq - 1, 1)
        .await
        .map_err(failed)?;
    Ok(last.first().is_some_and(|event| log::head(&event.json).1))
}

/// The events of `run` after `after_seq`, in seq order, ending with the terminal event (or
/// earlier, if the log cannot be read or following takes longer than `limit`: the longest
/// run plus a margin).
/// The channel closes when the follower task ends; dropping the receiver stops it.
pub fn follow_run(
    bus: &dyn EventBus,
    user: &AuthenticatedUser,
    store: UserStore,
    run: RunRecord,
    after_seq: u64,
    limit: Duration,
) -> mpsc::Receiver<RunEvent> {
    let mut subscription = bus.subscribe(user.user_id());
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let work = async {
            let mut cursor = after_seq;
            if replay(&store, &run, &mut cursor, &tx).await? || run.status.is_terminal() {
                return Ok::<(), ()>(());
            }
            // `run` was read before the subscription was taken: the run may have ended in
            // between, its terminal event published before we listened.
            if terminal_stored(&store, &run).await? {
                // The log has the rest (nothing, if the cursor is past the end).
                replay(&store, &run, &mut cursor, &tx).await?;
                return Ok(());
            }
            // Not stored yet: the terminal event is published after it is stored, and we are
            // subscribed, so it arrives below.
            loop {
                match subscription.recv().await {
                    // The run's end ends following, even when the cursor is past it.
                    Ok(event)
                        if event.run_id == run.id && event.terminal && event.seq <= cursor =>
                    {
                        return Ok(());
                    }
                    // A hole before this event (lost between instances): fill it from the store.
                    Ok(event) if event.run_id == run.id && event.seq > cursor + 1 => {
                        if replay(&store, &run, &mut cursor, &tx).await? {
                            return Ok(());
                        }
                    }
                    Ok(event) if event.run_id == run.id && event.seq > cursor => {
                        cursor = event.seq;
                        tx.send(RunEvent {
                            seq: event.seq,
                            json: event.json.clone(),
                            terminal: event.terminal,
                        })
                        .await
                        .map_err(|_| ())?;
                        if event.terminal {
                            return Ok(());
                        }
                    }
                    Ok(_) => {}
                    Err(BusRecvError::Lagged(_) | BusRecvError::Resync) => {
                        if replay(&store, &run, &mut cursor, &tx).await? {
                            return Ok(());
                        }
                    }
                    Err(BusRecvError::Closed) => return Ok(()),
                }
            }
        };
        let _ = tokio::time::timeout(limit, work).await;
    });
    rx
}
