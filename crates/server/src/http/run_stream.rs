//! Server-sent events for one run: stored events after a seq, then live ones, until the
//! terminal event. The subscription is taken before the log is read, so an event written
//! during the replay is either in the replay or arrives live, and a per-stream cursor
//! drops the copy that would otherwise arrive twice.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::auth::AuthenticatedUser;
use crate::events::{log, BusRecvError};
use crate::state::AppState;
use crate::store::{RunRecord, UserStore};

/// Backlog between the reader task and a slow HTTP client.
const BUFFER: usize = 256;

fn sse_event(seq: u64, json: String) -> Event {
    let (kind, _) = log::head(&json);
    let event = Event::default().id(seq.to_string()).data(json);
    match kind {
        Some(kind) => event.event(kind.as_str()),
        None => event,
    }
}

/// Sends stored events after `*cursor`; returns `Ok(true)` once the terminal event went.
async fn replay(
    store: &UserStore,
    run: &RunRecord,
    cursor: &mut u64,
    tx: &mpsc::Sender<Result<Event, Infallible>>,
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
            tx.send(Ok(sse_event(stored.seq, stored.json)))
                .await
                .map_err(|_| ())?;
            if terminal {
                return Ok(true);
            }
        }
    }
}

pub fn stream(
    state: &AppState,
    user: &AuthenticatedUser,
    store: UserStore,
    run: RunRecord,
    after_seq: u64,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut subscription = state.infra.bus.subscribe(user.user_id());
    // A stream never outlives the longest possible run by much.
    let limit = state.settings.run_timeout + Duration::from_secs(60);
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        let work = async {
            let mut cursor = after_seq;
            if replay(&store, &run, &mut cursor, &tx).await? || run.status.is_terminal() {
                return Ok::<(), ()>(());
            }
            loop {
                match subscription.recv().await {
                    // A hole before this event (lost between instances): fill it from the store.
                    Ok(event) if event.run_id == run.id && event.seq > cursor + 1 => {
                        if replay(&store, &run, &mut cursor, &tx).await? {
                            return Ok(());
                        }
                    }
                    Ok(event) if event.run_id == run.id && event.seq > cursor => {
                        cursor = event.seq;
                        tx.send(Ok(sse_event(event.seq, event.json.clone())))
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
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|event| (event, rx))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
