//! One WebSocket connection: its state lives in this task and dies with it.
//!
//! The task owns the socket, the connection's bus subscription (keyed by the connection's
//! authenticated user) and a small map of the last seq delivered per run, used to drop
//! duplicates when a `resume` replay overlaps live delivery. Client frames name threads and
//! runs only as things to look up under the connection's own user.
//!
//! A connection of the original web client also owns an [`Outbox`]: its frames are queued
//! there and sent on the schedule of [`super::pacing`] by this same task, between reading
//! client frames and taking events from the bus. Every other connection writes its frames
//! at once.

use std::collections::HashMap;
use std::sync::Arc;

use apex_protocol::error::ws_codes;
use apex_protocol::ws::{
    ConnectionInfo, ControlFrame, CLOSE_GOING_AWAY, CLOSE_MESSAGE_TOO_BIG, CLOSE_NORMAL,
};
use apex_protocol::PROTOCOL_VERSION;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use tokio::time::Instant;

use super::frames::{self, ClientFrame, FrameError};
use super::pacing::{Outbox, Pacing};
use crate::auth::AuthenticatedUser;
use crate::clock::now_rfc3339;
use crate::events::{log, BusEvent, BusRecvError, UserSubscription};
use crate::ids::{RequestId, RunId, ThreadId};
use crate::limits::ConnectionGuard;
use crate::run::{StopOutcome, SubmitError};
use crate::state::AppState;
use crate::user_store::UserStore;
use crate::views::message_view;

struct Connection {
    socket: WebSocket,
    state: AppState,
    user: AuthenticatedUser,
    store: UserStore,
    /// run → highest seq this client already has.
    delivered: HashMap<RunId, Delivered>,
    /// The run most recently started from this connection (`stop_agent` without an id).
    last_started: Option<RunId>,
    /// When the connection opened: a catch-up replays the user's runs active since.
    opened_at_ms: i64,
    /// Frames waiting for their time on a paced connection; `None`: frames go out at once.
    outbox: Option<Outbox>,
}

/// Most runs a catch-up looks at besides those this connection already saw.
const CATCH_UP_RUNS: i64 = 50;

/// Most live events written to the socket before one flush. Events already queued for the
/// connection go out in one write (one syscall) instead of one each; the bound keeps the
/// first of them from waiting long behind the others.
const MAX_EVENTS_PER_FLUSH: usize = 64;

/// On shutdown, longest a paced connection spends sending the frames still queued before
/// it closes (the server waits about 2 s for connections to close).
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_millis(1500);

/// Why the connection loop ended.
enum Exit {
    ClientGone,
    Close(u16, &'static str),
}

/// Sleeps until `due`, or forever without one (a `select!` branch that never fires).
async fn sleep_until_due(due: Option<Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Serves one authenticated connection; `slot` is the user's connection slot, freed when
/// this returns. With `pacing`, frames leave on that schedule (the original web client).
pub async fn serve(
    socket: WebSocket,
    state: AppState,
    user: AuthenticatedUser,
    slot: ConnectionGuard,
    pacing: Option<Pacing>,
) {
    let connection_id = uuid::Uuid::new_v4();
    let _gauge = crate::telemetry::ConnectionGauge::open();
    let span = tracing::info_span!("ws", %connection_id, paced = pacing.is_some());
    tracing::Instrument::instrument(
        serve_connection(socket, state, user, connection_id, pacing),
        span,
    )
    .await;
    drop(slot);
}

async fn serve_connection(
    socket: WebSocket,
    state: AppState,
    user: AuthenticatedUser,
    connection_id: uuid::Uuid,
    pacing: Option<Pacing>,
) {
    // Subscribe before announcing the connection, so nothing published afterwards is missed.
    let mut subscription = state.infra.bus.subscribe(user.user_id());
    let store = UserStore::for_user(Arc::clone(&state.infra.store), &user);
    let lifecycle = state.lifecycle.clone();
    let mut told_shutdown = false;
    let mut conn = Connection {
        socket,
        state,
        user,
        store,
        delivered: HashMap::new(),
        last_started: None,
        opened_at_ms: crate::clock::now_ms(),
        outbox: pacing.map(Outbox::new),
    };

    let hello = ControlFrame::ConnectionEstablished {
        data: ConnectionInfo {
            connection_id: connection_id.to_string(),
            user_id: conn.user.user_id().to_string(),
            protocol_version: PROTOCOL_VERSION,
        },
        timestamp: now_rfc3339(),
    };
    if conn.send_control(&hello).await.is_err() {
        return;
    }

    let exit = loop {
        // A paced connection takes no more events while its outbox is full; events the bus
        // then drops for it come back from the log (`Lagged` below).
        let room = conn.outbox.as_ref().is_none_or(Outbox::has_room);
        let due = conn
            .outbox
            .as_ref()
            .and_then(|outbox| outbox.next_due(Instant::now()));
        tokio::select! {
            incoming = conn.socket.recv() => match incoming {
                None => break Exit::ClientGone,
                // The library refuses messages past its own limit (4x ours) before we see
                // them; answer those with 1009 too. Other errors mean the peer is gone.
                Some(Err(err)) if err.to_string().contains("too long") => {
                    break Exit::Close(CLOSE_MESSAGE_TOO_BIG, "frame exceeds the size limit");
                }
                Some(Err(_)) => break Exit::ClientGone,
                Some(Ok(Message::Close(_))) => break Exit::ClientGone,
                Some(Ok(Message::Text(text))) => {
                    if text.len() > conn.state.settings.max_frame_bytes {
                        break Exit::Close(CLOSE_MESSAGE_TOO_BIG, "frame exceeds the size limit");
                    }
                    match conn.handle_frame(text.as_str()).await {
                        Err(_) => break Exit::ClientGone,
                        Ok(Some(exit)) => break exit,
                        Ok(None) => {}
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    if bytes.len() > conn.state.settings.max_frame_bytes {
                        break Exit::Close(CLOSE_MESSAGE_TOO_BIG, "frame exceeds the size limit");
                    }
                    let handled = match std::str::from_utf8(&bytes) {
                        Ok(text) => conn.handle_frame(text).await,
                        Err(_) => conn
                            .send_error(ws_codes::JSON_PARSE_ERROR, "binary frames must be UTF-8 JSON")
                            .await
                            .map(|()| None),
                    };
                    match handled {
                        Err(_) => break Exit::ClientGone,
                        Ok(Some(exit)) => break exit,
                        Ok(None) => {}
                    }
                }
                // Pings are answered by the library.
                Some(Ok(_)) => {}
            },
            _ = sleep_until_due(due), if due.is_some() => {
                if conn.send_due().await.is_err() {
                    break Exit::ClientGone;
                }
            }
            event = subscription.recv(), if room => match event {
                Ok(event) => match conn.forward_queued(event, &mut subscription).await {
                    Err(_) => break Exit::ClientGone,
                    Ok(None) => {}
                    // Met while taking the queued events: handled as if `recv` had said so.
                    Ok(Some(BusRecvError::Lagged(missed))) => {
                        tracing::warn!(missed, "connection fell behind; catching up from the event log");
                        if conn.catch_up().await.is_err() {
                            break Exit::ClientGone;
                        }
                    }
                    Ok(Some(BusRecvError::Resync)) => {
                        tracing::info!("event bus reconnected; catching up from the event log");
                        if conn.catch_up().await.is_err() {
                            break Exit::ClientGone;
                        }
                    }
                    Ok(Some(BusRecvError::Closed)) => break Exit::Close(CLOSE_GOING_AWAY, "server is shutting down"),
                },
                Err(BusRecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "connection fell behind; catching up from the event log");
                    if conn.catch_up().await.is_err() {
                        break Exit::ClientGone;
                    }
                }
                Err(BusRecvError::Resync) => {
                    tracing::info!("event bus reconnected; catching up from the event log");
                    if conn.catch_up().await.is_err() {
                        break Exit::ClientGone;
                    }
                }
                Err(BusRecvError::Closed) => break Exit::Close(CLOSE_GOING_AWAY, "server is shutting down"),
            },
            _ = lifecycle.draining.cancelled(), if !told_shutdown => {
                told_shutdown = true;
                if conn.send_control(&ControlFrame::ServerShutdown { timestamp: now_rfc3339() }).await.is_err() {
                    break Exit::ClientGone;
                }
            }
            _ = lifecycle.close_sockets.cancelled() => {
                // Every run here has published its terminal event by now; what is already
                // queued for this connection goes out before the close.
                if conn.forward_pending(&mut subscription).await.is_err() {
                    break Exit::ClientGone;
                }
                break Exit::Close(CLOSE_GOING_AWAY, "server is shutting down");
            }
        }
    };
    if let Exit::Close(code, reason) = exit {
        if code == CLOSE_GOING_AWAY {
            // The server is stopping: what the paced client is still owed (often its
            // runs' last frames) goes first, for a bounded time.
            conn.drain(SHUTDOWN_DRAIN).await;
        }
        let _ = conn
            .socket
            .send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })))
            .await;
    }
    // `subscription` and `conn` drop here: the connection leaves no state behind.
}

type Sent = Result<(), axum::Error>;

impl Connection {
    /// Sends a control frame now, or queues it behind the frames waiting on a paced
    /// connection (so it keeps its place in the order).
    async fn send_text(&mut self, text: String) -> Sent {
        match self.outbox.as_mut() {
            Some(outbox) => {
                outbox.push_control(text);
                Ok(())
            }
            None => self.socket.send(Message::Text(text.into())).await,
        }
    }

    /// On a paced connection: sends the next queued frame if its time has come.
    async fn send_due(&mut self) -> Sent {
        let Some(ready) = self
            .outbox
            .as_mut()
            .and_then(|outbox| outbox.pop_due(Instant::now()))
        else {
            return Ok(());
        };
        self.socket.send(Message::Text(ready.text.into())).await?;
        if let Some(outbox) = self.outbox.as_mut() {
            outbox.sent(ready.class, Instant::now());
        }
        Ok(())
    }

    /// Sends the queued frames of a paced connection on their schedule, for at most
    /// `limit`; what is left then is not sent (the client can `resume`).
    async fn drain(&mut self, limit: std::time::Duration) {
        let deadline = Instant::now() + limit;
        while let Some(due) = self
            .outbox
            .as_ref()
            .and_then(|outbox| outbox.next_due(Instant::now()))
        {
            if due > deadline {
                break;
            }
            tokio::time::sleep_until(due).await;
            if self.send_due().await.is_err() {
                break;
            }
        }
    }

    async fn send_control(&mut self, frame: &ControlFrame) -> Sent {
        match serde_json::to_string(frame) {
            Ok(text) => self.send_text(text).await,
            Err(err) => {
                tracing::error!(error = %err, "could not serialize a control frame");
                Ok(())
            }
        }
    }

    async fn send_error(&mut self, code: &str, message: impl Into<String>) -> Sent {
        self.send_control(&ControlFrame::ErrorMessage {
            error_code: code.to_string(),
            error_message: message.into(),
            retry_after_ms: None,
            timestamp: now_rfc3339(),
        })
        .await
    }

    /// Writes a stored or live event unless this client already has it. The frame is only
    /// queued on the socket (`feed`): the caller flushes once it has written what it has
    /// (any later `send` flushes it too, in order). On a paced connection it joins the
    /// outbox instead, and counts as delivered from then on: the outbox loses nothing and
    /// keeps each run's order, so a replay must not send it again.
    async fn deliver(&mut self, run: RunId, seq: u64, json: String) -> Sent {
        if self.delivered.get(&run).is_some_and(|d| d.has(seq)) {
            return Ok(());
        }
        match self.outbox.as_mut() {
            Some(outbox) => outbox.push_event(run, seq, json),
            None => self.socket.feed(Message::Text(json.into())).await?,
        }
        // Kept after the terminal event too, so a replay overlapping live delivery of a
        // finished run still sends nothing twice. One entry per run seen on this socket.
        self.delivered.entry(run).or_default().record(seq);
        Ok(())
    }

    /// Writes one live event (not flushed, see [`Self::deliver`]); `false` if it was
    /// dropped as another user's.
    async fn forward(&mut self, event: &BusEvent) -> Result<bool, axum::Error> {
        // The bus only hands us our own user's events; this check makes a routing bug
        // fail closed instead of leaking.
        if event.user_id != self.user.user_id() {
            tracing::error!("event for another user reached a connection; dropped");
            return Ok(false);
        }
        self.deliver(event.run_id, event.seq, event.json.clone())
            .await?;
        Ok(true)
    }

    /// Writes `first` and the events already queued behind it (at most
    /// [`MAX_EVENTS_PER_FLUSH`] in all), in order, then flushes once. Returns the error
    /// the subscription gave instead of a further event, if it did, for the caller to
    /// handle exactly as one from `recv`.
    async fn forward_queued(
        &mut self,
        first: Arc<BusEvent>,
        subscription: &mut UserSubscription,
    ) -> Result<Option<BusRecvError>, axum::Error> {
        // Delivery latency is recorded once the frames are flushed, as before (on a paced
        // connection: once they are queued, so pacing does not count as latency).
        let mut emitted_at = Vec::with_capacity(4);
        if self.forward(&first).await? {
            emitted_at.push(first.emitted_at);
        }
        let mut stopped = None;
        while emitted_at.len() < MAX_EVENTS_PER_FLUSH {
            match subscription.try_recv() {
                None => break,
                Some(Ok(event)) => {
                    if self.forward(&event).await? {
                        emitted_at.push(event.emitted_at);
                    }
                }
                Some(Err(err)) => {
                    stopped = Some(err);
                    break;
                }
            }
        }
        self.socket.flush().await?;
        for at in emitted_at {
            crate::telemetry::event_delivered(at);
        }
        Ok(stopped)
    }

    /// Forwards the events already queued in `subscription`, without waiting for more.
    async fn forward_pending(
        &mut self,
        subscription: &mut UserSubscription,
    ) -> Result<(), axum::Error> {
        while let Some(Ok(event)) = subscription.try_recv() {
            self.forward(&event).await?;
        }
        self.socket.flush().await
    }

    /// Replays stored events of `run` after `after_seq`.
    async fn replay(&mut self, run: RunId, after_seq: u64) -> Result<(), ReplayError> {
        let mut cursor = after_seq;
        loop {
            let page = log::page_after(&self.store, run, cursor).await?;
            let Some(last) = page.last().map(|e| e.seq) else {
                break;
            };
            for event in page {
                self.deliver(run, event.seq, event.json).await?;
            }
            // One write per page of the log instead of one per event.
            self.socket.flush().await?;
            cursor = last;
        }
        Ok(())
    }

    /// After falling behind the bus, or after the bus between instances reconnected:
    /// replay every run that may have had events since, including runs this connection
    /// has not seen yet (started on any instance while it opened).
    async fn catch_up(&mut self) -> Sent {
        let mut runs: Vec<(RunId, u64)> = self
            .delivered
            .iter()
            .map(|(run, d)| (*run, d.contiguous))
            .collect();
        let mut unseen: Vec<RunId> = self
            .state
            .runs
            .latest_for(self.user.user_id())
            .into_iter()
            .collect();
        match self
            .store
            .recent_runs(self.opened_at_ms, CATCH_UP_RUNS)
            .await
        {
            // Oldest first, so a client sees runs in the order they started.
            Ok(recent) => unseen.extend(recent.iter().rev().map(|r| r.id)),
            Err(err) => tracing::error!(error = %err, "catch-up could not list runs"),
        }
        for run in unseen {
            if !self.delivered.contains_key(&run) && !runs.iter().any(|(r, _)| *r == run) {
                runs.push((run, 0));
            }
        }
        for (run, after) in runs {
            match self.replay(run, after).await {
                Ok(()) => {}
                Err(ReplayError::Socket(err)) => return Err(err),
                Err(ReplayError::Store(err)) => {
                    tracing::error!(error = %err, "catch-up replay failed")
                }
            }
        }
        Ok(())
    }

    /// Handles one client frame; `Some` when the connection is to end.
    async fn handle_frame(&mut self, raw: &str) -> Result<Option<Exit>, axum::Error> {
        let frame = match frames::parse(raw) {
            Ok(frame) => frame,
            Err(FrameError::Parse(e)) => {
                return self
                    .send_error(ws_codes::JSON_PARSE_ERROR, format!("invalid JSON: {e}"))
                    .await
                    .map(|()| None)
            }
            Err(FrameError::Shape(e)) => {
                return self
                    .send_error(ws_codes::VALIDATION_ERROR, e)
                    .await
                    .map(|()| None)
            }
        };
        if matches!(frame, ClientFrame::Disconnect) {
            // The client says it is leaving (the original web client, on page unload):
            // no answer, a normal close. Its runs go on; frames still queued are not sent.
            return Ok(Some(Exit::Close(CLOSE_NORMAL, "client disconnected")));
        }
        self.dispatch(frame).await.map(|()| None)
    }

    async fn dispatch(&mut self, frame: ClientFrame) -> Sent {
        match frame {
            ClientFrame::StartRun { text, thread_id } => self.start(text, thread_id).await,
            ClientFrame::StopRun { run_id } => self.stop(run_id).await,
            ClientFrame::Resume { run_id, after_seq } => self.resume(run_id, after_seq).await,
            ClientFrame::ThreadHistory { thread_id } => self.history(thread_id, true).await,
            ClientFrame::SwitchThread { thread_id } => self.history(thread_id, false).await,
            ClientFrame::SessionRestore | ClientFrame::Disconnect => Ok(()),
            ClientFrame::Ping => {
                self.send_control(&ControlFrame::Pong {
                    timestamp: now_rfc3339(),
                })
                .await
            }
            ClientFrame::Heartbeat => {
                self.send_control(&ControlFrame::HeartbeatAck {
                    timestamp: now_rfc3339(),
                })
                .await
            }
            ClientFrame::Unknown(kind) => {
                self.send_error(
                    ws_codes::UNKNOWN_MESSAGE_TYPE,
                    format!("unknown message type {kind:?}"),
                )
                .await
            }
        }
    }

    async fn internal_error(&mut self, err: impl std::fmt::Display) -> Sent {
        tracing::error!(error = %err, "websocket request failed");
        self.send_error(ws_codes::INTERNAL_ERROR, "internal server error")
            .await
    }

    /// Looks a client-named thread up under this connection's user.
    async fn own_thread(
        &mut self,
        raw: &str,
    ) -> Result<Option<ThreadId>, crate::store::StoreError> {
        let Ok(id) = ThreadId::parse(raw) else {
            return Ok(None);
        };
        Ok(self.store.get_thread(id).await?.map(|t| t.id))
    }

    async fn start(&mut self, text: Option<String>, thread_id: Option<String>) -> Sent {
        let Some(text) = text else {
            return self
                .send_error(ws_codes::VALIDATION_ERROR, "a message needs text")
                .await;
        };
        let thread = match thread_id {
            // A malformed id names no thread of this user.
            Some(raw) => match ThreadId::parse(&raw) {
                Ok(id) => Some(id),
                Err(_) => {
                    return self
                        .send_error(ws_codes::THREAD_NOT_FOUND, "thread not found")
                        .await
                }
            },
            None => None,
        };
        let submitted = self
            .state
            .runs
            .submit(&self.user, thread, &text, RequestId::generate())
            .await;
        match submitted {
            Ok(started) => {
                if started.thread_created {
                    self.send_control(&ControlFrame::ThreadCreated {
                        thread_id: started.thread_id.to_string(),
                        timestamp: now_rfc3339(),
                    })
                    .await?;
                }
                self.last_started = Some(started.run_id);
                self.send_control(&ControlFrame::RunAccepted {
                    run_id: started.run_id.to_string(),
                    thread_id: started.thread_id.to_string(),
                    message_id: started.message_id.to_string(),
                    timestamp: now_rfc3339(),
                })
                .await
            }
            Err(SubmitError::InvalidMessage(message)) => {
                self.send_error(ws_codes::VALIDATION_ERROR, message).await
            }
            Err(SubmitError::ThreadNotFound) => {
                self.send_error(ws_codes::THREAD_NOT_FOUND, "thread not found")
                    .await
            }
            Err(SubmitError::TooManyRuns(max)) => {
                self.send_error(
                    ws_codes::TOO_MANY_RUNS,
                    format!("at most {max} runs at once; wait for one to finish"),
                )
                .await
            }
            Err(SubmitError::ThreadBusy) => {
                self.send_error(
                    ws_codes::THREAD_BUSY,
                    "this thread already has a run in progress; wait for it or stop it",
                )
                .await
            }
            Err(SubmitError::RateLimited(wait)) => {
                self.send_control(&ControlFrame::ErrorMessage {
                    error_code: ws_codes::RATE_LIMITED.into(),
                    error_message: "too many messages; slow down".into(),
                    retry_after_ms: Some(wait.as_millis() as u64),
                    timestamp: now_rfc3339(),
                })
                .await
            }
            Err(SubmitError::ShuttingDown) => {
                self.send_error(
                    ws_codes::SERVER_SHUTTING_DOWN,
                    "the server is shutting down; retry later",
                )
                .await
            }
            Err(SubmitError::Store(err)) => self.internal_error(err).await,
        }
    }

    async fn stop(&mut self, run_id: Option<String>) -> Sent {
        let user = self.user.user_id();
        let run = match run_id {
            Some(raw) => match RunId::parse(&raw) {
                Ok(id) => id,
                Err(_) => {
                    return self
                        .send_error(ws_codes::RUN_NOT_FOUND, "run not found")
                        .await
                }
            },
            None => match self
                .last_started
                .filter(|r| self.state.runs.is_active(user, *r))
                .or_else(|| self.state.runs.latest_for(user))
            {
                Some(run) => run,
                // Not executing here: still queued, or running on another instance.
                None => match self.store.recent_runs(i64::MAX, 1).await {
                    Ok(runs) => match runs.first() {
                        Some(run) => run.id,
                        None => {
                            return self
                                .send_error(ws_codes::RUN_NOT_ACTIVE, "no active run to stop")
                                .await
                        }
                    },
                    Err(err) => return self.internal_error(err).await,
                },
            },
        };
        match self.state.runs.stop(&self.user, run).await {
            Ok(StopOutcome::Stopping) => {
                self.send_control(&ControlFrame::StopAcknowledged {
                    run_id: run.to_string(),
                    timestamp: now_rfc3339(),
                })
                .await
            }
            Ok(StopOutcome::AlreadyFinished(status)) => {
                self.send_error(
                    ws_codes::RUN_NOT_ACTIVE,
                    format!("run already finished with status {}", status.as_str()),
                )
                .await
            }
            Ok(StopOutcome::NotFound) => {
                self.send_error(ws_codes::RUN_NOT_FOUND, "run not found")
                    .await
            }
            Err(err) => self.internal_error(err).await,
        }
    }

    async fn resume(&mut self, run_id: Option<String>, after_seq: Option<u64>) -> Sent {
        let Some(run) = run_id.as_deref().and_then(|r| RunId::parse(r).ok()) else {
            return self
                .send_error(ws_codes::RUN_NOT_FOUND, "run not found")
                .await;
        };
        let record = match self.store.get_run(run).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                return self
                    .send_error(ws_codes::RUN_NOT_FOUND, "run not found")
                    .await
            }
            Err(err) => return self.internal_error(err).await,
        };
        let after = after_seq.unwrap_or(0);
        match log::has_gap(&self.store, &record, after).await {
            Ok(false) => {}
            Ok(true) => {
                return self
                    .send_control(&ControlFrame::ResumeGap {
                        run_id: run.to_string(),
                        after_seq: after,
                        last_seq: record.last_seq,
                        message: "these events are no longer kept; reload the thread".into(),
                        timestamp: now_rfc3339(),
                    })
                    .await
            }
            Err(err) => return self.internal_error(err).await,
        }
        // The client has everything up to `after`: live copies of those are duplicates.
        self.delivered.entry(run).or_default().has_up_to(after);
        match self.replay(run, after).await {
            Ok(()) => Ok(()),
            Err(ReplayError::Socket(err)) => Err(err),
            Err(ReplayError::Store(err)) => self.internal_error(err).await,
        }
    }

    async fn history(&mut self, thread_id: Option<String>, errors: bool) -> Sent {
        let thread = match thread_id {
            Some(raw) => self.own_thread(&raw).await,
            None => Ok(None),
        };
        let thread = match thread {
            Ok(Some(thread)) => thread,
            Ok(None) if errors => {
                return self
                    .send_error(ws_codes::THREAD_NOT_FOUND, "thread not found")
                    .await
            }
            Ok(None) => return Ok(()),
            Err(err) if errors => return self.internal_error(err).await,
            Err(err) => {
                tracing::error!(error = %err, "switch_thread lookup failed");
                return Ok(());
            }
        };
        match self.store.list_messages(thread, 500, 0).await {
            Ok((messages, _)) => {
                self.send_control(&ControlFrame::ThreadData {
                    thread_id: thread.to_string(),
                    messages: messages.into_iter().map(message_view).collect(),
                    timestamp: now_rfc3339(),
                })
                .await
            }
            Err(err) if errors => self.internal_error(err).await,
            Err(err) => {
                tracing::error!(error = %err, "switch_thread history failed");
                Ok(())
            }
        }
    }
}

/// Which events of one run this connection has sent: everything up to `contiguous`, plus
/// the seqs in `ahead`. Live events that overtake a `resume` replay land in `ahead`, so
/// the replay still sends the ones before them, and nothing is ever sent twice.
#[derive(Debug, Default)]
struct Delivered {
    contiguous: u64,
    ahead: std::collections::BTreeSet<u64>,
}

impl Delivered {
    fn has(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.ahead.contains(&seq)
    }

    fn record(&mut self, seq: u64) {
        if seq > self.contiguous {
            self.ahead.insert(seq);
        }
        self.advance();
    }

    /// The client says it already has every event up to `seq` (`resume after_seq`).
    fn has_up_to(&mut self, seq: u64) {
        self.contiguous = self.contiguous.max(seq);
        self.ahead.retain(|s| *s > seq);
        self.advance();
    }

    fn advance(&mut self) {
        while self.ahead.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
    }
}

enum ReplayError {
    Socket(axum::Error),
    Store(crate::store::StoreError),
}

impl From<axum::Error> for ReplayError {
    fn from(err: axum::Error) -> Self {
        ReplayError::Socket(err)
    }
}

impl From<crate::store::StoreError> for ReplayError {
    fn from(err: crate::store::StoreError) -> Self {
        ReplayError::Store(err)
    }
}
