//! Server-sent events for one run: stored events after a seq, then live ones, until the
//! terminal event (see [`follow_run`], which does the ordering and de-duplication, and ends
//! the stream at the run's end whatever the cursor).
//!
//! A stream is a connection like a WebSocket: it holds one of the user's
//! `max_connections_per_user` slots until it ends or its client goes away, and it is bound
//! to its session like a socket ([`SessionGuard`]): when the session ends or the access
//! token it was opened with expires, an `error` event with `session_ended` or
//! `token_expired` is sent and the stream ends.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;

use crate::auth::{AuthenticatedUser, SessionGuard};
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
    let session = state.auth.sessions().bind(user);
    // The slot and the session binding live in the stream's state: they are released when
    // the stream ends (the state is dropped) or when the server drops the response because
    // the client went away. `None` for the session: it ended, the error event went out.
    let events = futures_util::stream::unfold(
        (events, Some(session), slot),
        |(mut events, session, slot): (_, Option<SessionGuard>, _)| async move {
            let mut session = session?;
            tokio::select! {
                event = events.recv() => {
                    let event = event?;
                    Some((Ok(sse_event(event.seq, event.json)), (events, Some(session), slot)))
                }
                end = session.ended() => {
                    let error = Event::default().event("error").data(
                        serde_json::json!({
                            "error": {"code": end.code().rest(), "message": end.message()}
                        })
                        .to_string(),
                    );
                    Some((Ok(error), (events, None, slot)))
                }
            }
        },
    );
    Sse::new(events).keep_alive(KeepAlive::default())
}
