//! Server-sent events for one run: stored events after a seq, then live ones, until the
//! terminal event (see [`follow_run`], which does the ordering and de-duplication, and ends
//! the stream at the run's end whatever the cursor).
//!
//! A stream is a connection like a WebSocket: it holds one of the user's
//! `max_connections_per_user` slots until it ends or its client goes away.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;

use crate::auth::AuthenticatedUser;
use crate::events::follow::follow_run;
use crate::events::log;
use crate::limits::ConnectionGuard;
use crate::state::AppState;
use crate::store::RunRecord;
use crate::user_store::UserStore;

fn sse_event(seq: u64, json: String) -> Event {
    let (kind, _) = log::head(&json);
    let event = Event::default().id(seq.to_string()).data(json);
    match kind {
        Some(kind) => event.event(kind.as_str()),
        None => event,
    }
}

/// The stream, holding `slot` (the user's connection slot) for as long as it lasts.
pub fn stream(
    state: &AppState,
    user: &AuthenticatedUser,
    store: UserStore,
    run: RunRecord,
    after_seq: u64,
    slot: ConnectionGuard,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = follow_run(
        state.infra.bus.as_ref(),
        user,
        store,
        run,
        after_seq,
        super::follow_limit(state),
    );
    // The slot lives in the stream's state: it is freed when the stream ends (the state is
    // dropped) or when the server drops the response because the client went away.
    let events = futures_util::stream::unfold((events, slot), |(mut events, slot)| async move {
        let event = events.recv().await?;
        Some((Ok(sse_event(event.seq, event.json)), (events, slot)))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
