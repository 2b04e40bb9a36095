//! `SessionWatch`: ends long-lived streams (WebSockets, SSE) when their session ends or
//! their credential expires, on every instance.
//!
//! A request is authenticated once; a socket lives for hours. Without this, a socket opened
//! with a stolen access token kept receiving the victim's events after the token expired and
//! after the victim logged out. Each stream holds a [`SessionGuard`] and selects on
//! [`SessionGuard::ended`], which resolves when
//! - the credential it was opened with expires (a timer, no I/O), or
//! - its session ends: at once when the logout happened on this instance
//!   ([`SessionWatch::mark_ended`]), and otherwise when the watch's poll finds it ended in
//!   the store. One query per [`POLL_EVERY`] covers every session with an open stream on this
//!   instance, so a logout on another instance closes the streams here within a second, with
//!   no bus message to lose.
//!
//! The map holds session ids and counters only (no user data), and an entry exists only
//! while a stream of that session is open on this instance.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_protocol::error::ErrorCode;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::AuthenticatedUser;
use crate::clock::now_ms;
use crate::store::Store;

/// How often the store is asked which watched sessions ended elsewhere. Half the
/// one-second bound on closing a logged-out session's streams, leaving room for the query.
pub const POLL_EVERY: Duration = Duration::from_millis(400);

/// Why a stream must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// The access token the stream was opened with (or that bought its ticket) expired:
    /// reconnect with a fresh one.
    CredentialExpired,
    /// The session was ended (logout, logout-all, revoked, replayed refresh token).
    SessionEnded,
}

impl SessionEnd {
    pub fn code(self) -> ErrorCode {
        match self {
            SessionEnd::CredentialExpired => ErrorCode::TokenExpired,
            SessionEnd::SessionEnded => ErrorCode::SessionEnded,
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            SessionEnd::CredentialExpired => {
                "the access token of this connection expired; reconnect with a fresh one and resume"
            }
            SessionEnd::SessionEnded => "the session of this connection ended; log in again",
        }
    }

    /// The close frame's reason: the code first, for programs; then the word "ticket",
    /// which the original web client takes as "fetch a new ticket and reconnect" (with its
    /// refreshed token that works; after a logout its refresh fails and it shows the login).
    pub fn close_reason(self) -> &'static str {
        match self {
            SessionEnd::CredentialExpired => "token_expired: reconnect with a new ticket or token",
            SessionEnd::SessionEnded => "session_ended: log in again for a new ticket or token",
        }
    }
}

/// One watched session: a flag its streams wait on, and how many streams there are.
struct Watched {
    ended: watch::Sender<bool>,
    streams: usize,
}

/// The sessions with open streams on this instance (shared infrastructure: ids and counts).
pub struct SessionWatch {
    store: Arc<dyn Store>,
    /// Session id → its flag. Guards add and remove themselves.
    open: Mutex<HashMap<String, Watched>>,
}

impl SessionWatch {
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Binds a stream to `user`'s session and credential; hold the guard as long as the
    /// stream is open.
    pub fn bind(self: &Arc<Self>, user: &AuthenticatedUser) -> SessionGuard {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let watched = open
            .entry(user.session_id().to_string())
            .or_insert_with(|| Watched {
                ended: watch::Sender::new(false),
                streams: 0,
            });
        watched.streams += 1;
        let remaining_ms = (user.credential_expires_at_ms() - now_ms()).max(0);
        SessionGuard {
            watch: Arc::clone(self),
            session_id: user.session_id().to_string(),
            ended: watched.ended.subscribe(),
            expires_at: tokio::time::Instant::now()
                + Duration::from_millis(u64::try_from(remaining_ms).unwrap_or(0)),
        }
    }

    /// Ends the streams of `sessions` on this instance now (the session was ended here;
    /// other instances learn it from the store).
    pub fn mark_ended<'a>(&self, sessions: impl IntoIterator<Item = &'a str>) {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        for id in sessions {
            if let Some(watched) = open.get(id) {
                watched.ended.send_replace(true);
            }
        }
    }

    /// Sessions with at least one open stream here (for tests and metrics).
    pub fn watched_sessions(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Asks the store which watched sessions are no longer active, and ends their streams.
    async fn check(&self) -> anyhow::Result<()> {
        let ids: Vec<String> = {
            let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            open.iter()
                .filter(|(_, watched)| !*watched.ended.borrow())
                .map(|(id, _)| id.clone())
                .collect()
        };
        if ids.is_empty() {
            return Ok(());
        }
        let inactive = self.store.inactive_sessions(&ids, now_ms()).await?;
        self.mark_ended(inactive.iter().map(String::as_str));
        Ok(())
    }

    /// Polls until `stop` is cancelled (a background task of the server).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL_EVERY) => {}
            }
            match self.check().await {
                Ok(()) => failing = false,
                // Logged once per outage: the poll runs every few hundred milliseconds.
                Err(err) if !failing => {
                    failing = true;
                    tracing::error!(error = %err, "checking the sessions of open streams failed");
                }
                Err(_) => {}
            }
        }
    }
}

/// A stream's binding to its session; dropping it unwatches the session when it was the
/// last stream of it here.
pub struct SessionGuard {
    watch: Arc<SessionWatch>,
    session_id: String,
    ended: watch::Receiver<bool>,
    expires_at: tokio::time::Instant,
}

impl SessionGuard {
    /// Resolves when the stream must end. Cancel-safe: use it in a `select!` loop.
    pub async fn ended(&mut self) -> SessionEnd {
        let expired = tokio::time::sleep_until(self.expires_at);
        tokio::select! {
            _ = expired => SessionEnd::CredentialExpired,
            // An error means the sender is gone, which the guard's own entry prevents; treat
            // it as ended rather than keep a stream nobody can end.
            _ = self.ended.wait_for(|ended| *ended) => SessionEnd::SessionEnded,
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut open = self.watch.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(watched) = open.get_mut(&self.session_id) {
            watched.streams -= 1;
            if watched.streams == 0 {
                open.remove(&self.session_id);
            }
        }
    }
}
