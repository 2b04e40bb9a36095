//! One WebSocket connection: its state lives in this task and dies with it.
//!
//! The task owns the socket, the connection's bus subscription (keyed by the connection's
//! authenticated user) and a small map of the last seq delivered per run, used to drop
//! duplicates when a `resume` replay overlaps live delivery. This module holds the loop
//! (client frames, bus events, pacing, shutdown) and sending; [`super::requests`] answers
//! client frames and [`super::delivery`] delivers run events.
//!
//! A connection of the original web client also owns an [`Outbox`]: its frames are queued
//! there and sent on the schedule of [`super::pacing`] by this same task, between reading
//! client frames and taking events from the bus. Every other connection writes its frames
//! at once.

use std::collections::HashMap;
use std::sync::Arc;

use apex_protocol::error::ErrorCode;
use apex_protocol::ws::{
    ConnectionInfo, ControlFrame, CLOSE_GOING_AWAY, CLOSE_MESSAGE_TOO_BIG, CLOSE_POLICY_VIOLATION,
};
use apex_protocol::PROTOCOL_VERSION;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use tokio::time::Instant;

use super::delivery::Delivered;
use super::error::WsError;
use super::pacing::{Outbox, Pacing};
use crate::auth::AuthenticatedUser;
use crate::clock::now_rfc3339;
use crate::events::BusRecvError;
use crate::ids::RunId;
use crate::limits::ConnectionGuard;
use crate::state::AppState;
use crate::user_store::UserStore;

/// One connection's state, owned by its task. Its methods are split by concern: this
/// module has the loop and sending, [`super::requests`] the client frames,
/// [`super::delivery`] the run events.
pub(super) struct Connection {
    pub(super) socket: WebSocket,
    pub(super) state: AppState,
    pub(super) user: AuthenticatedUser,
    pub(super) store: UserStore,
    /// Per run, which events this client already has.
    pub(super) delivered: HashMap<RunId, Delivered>,
    /// The run most recently started from this connection (`stop_agent` without an id).
    pub(super) last_started: Option<RunId>,
    /// When the connection opened: a catch-up replays the user's runs active since.
    pub(super) opened_at_ms: i64,
    /// Frames waiting for their time on a paced connection; `None`: frames go out at once.
    pub(super) outbox: Option<Outbox>,
}

/// On shutdown, longest a paced connection spends sending the frames still queued before
/// it closes (the server waits about 2 s for connections to close).
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_millis(1500);

/// Why the connection loop ended.
#[derive(Debug)]
pub(super) enum Exit {
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
    // The connection lives while its credential and session do, not a moment longer.
    let mut session = state.auth.sessions().bind(&user);
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
                        Err(_) => conn.refuse(ErrorCode::InvalidJson, "binary frames must be UTF-8 JSON").await.map(|()| None),
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
            end = session.ended() => {
                // Straight to the socket, past a paced connection's queue: nothing more of
                // this user's goes to a connection whose session is over.
                let frame = ControlFrame::ErrorMessage {
                    error_code: end.code().ws().into(),
                    error_message: end.message().into(),
                    retry_after_ms: None,
                    timestamp: now_rfc3339(),
                };
                if let Ok(text) = serde_json::to_string(&frame) {
                    let _ = conn.socket.send(Message::Text(text.into())).await;
                }
                break Exit::Close(CLOSE_POLICY_VIOLATION, end.close_reason());
            }
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
    // At debug: one line per connection is noise in production, and what a test that
    // finds a connection missing its events needs to know.
    tracing::debug!(?exit, "connection closed");
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

/// A socket write: `Err` when the peer is gone.
pub(super) type Sent = Result<(), axum::Error>;

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

    /// Tells the client its frame was refused (an `error_message` frame with `code`).
    pub(super) async fn refuse(&mut self, code: ErrorCode, message: &str) -> Sent {
        match WsError::refused(code, message).into_frame() {
            Some(frame) => self.send_control(&frame).await,
            None => Ok(()),
        }
    }

    pub(super) async fn send_control(&mut self, frame: &ControlFrame) -> Sent {
        match serde_json::to_string(frame) {
            Ok(text) => self.send_text(text).await,
            Err(err) => {
                tracing::error!(error = %err, "could not serialize a control frame");
                Ok(())
            }
        }
    }
}
