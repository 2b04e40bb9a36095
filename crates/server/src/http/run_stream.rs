//! Server-sent events for one run: stored events after a seq, then live ones, until the
//! terminal event (see [`follow_run`], which does the ordering and de-duplication).

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;

use crate::auth::AuthenticatedUser;
use crate::events::follow::follow_run;
use crate::events::log;
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

pub fn stream(
    state: &AppState,
    user: &AuthenticatedUser,
    store: UserStore,
    run: RunRecord,
    after_seq: u64,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let events = follow_run(
        state.infra.bus.as_ref(),
        user,
        store,
        run,
        after_seq,
        super::follow_limit(state),
    );
    let events = futures_util::stream::unfold(events, |mut events| async move {
        let event = events.recv().await?;
        Some((Ok(sse_event(event.seq, event.json)), events))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
