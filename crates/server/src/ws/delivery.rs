//! Delivering a run's events to one connection: live from the bus, replayed from the
//! log (`resume`, and catching up after falling behind or a bus reconnect), never twice.
//!
//! The connection keeps, per run, which seqs it already sent ([`Delivered`]), so a replay
//! that overlaps live delivery drops the copies.
//!
//! Events relayed from another instance keep their order per instance only. A run that
//! moved (continued after approval, or recovered, on another instance) has events from
//! two, and the older instance's may arrive late: a connection opened in between would
//! get the run's early events and never its later ones, which arrived before it
//! subscribed. So the first relayed event of a run on a connection is followed by a read
//! of the log past it (one read per run and connection, only for relayed runs). On a paced connection (the original web
//! client) events join its outbox instead of the socket.

use std::sync::Arc;

use axum::extract::ws::Message;
use futures_util::SinkExt;

use super::connection::{Connection, Sent};
use super::error::WsError;
use crate::events::{log, BusEvent, BusRecvError, UserSubscription};
use crate::ids::RunId;

/// Most runs a catch-up looks at besides those this connection already saw.
const CATCH_UP_RUNS: i64 = 50;

/// Most live events written to the socket before one flush. Events already queued for the
/// connection go out in one write (one syscall) instead of one each; the bound keeps the
/// first of them from waiting long behind the others.
const MAX_EVENTS_PER_FLUSH: usize = 64;

impl Connection {
    /// Writes a stored or live event unless this client already has it. The frame is only
    /// queued on the socket (`feed`): the caller flushes once it has written what it has
    /// (any later `send` flushes it too, in order). On a paced connection it joins the
    /// outbox instead, and counts as delivered from then on: the outbox loses nothing and
    /// keeps each run's order, so a replay must not send it again.
    pub(super) async fn deliver(&mut self, run: RunId, seq: u64, json: String) -> Sent {
        if self.delivered.get(&run).is_some_and(|d| d.has(seq)) {
            tracing::debug!(%run, seq, "event already delivered on this connection; dropped");
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
        if event.is_notice() {
            // Not part of any run: not deduplicated or replayed. A paced connection (the
            // original client) does not know notices and is not sent them.
            if self.outbox.is_none() {
                self.socket
                    .feed(Message::Text(event.json.clone().into()))
                    .await?;
            }
            return Ok(true);
        }
        let first_sight = !self.delivered.contains_key(&event.run_id);
        self.deliver(event.run_id, event.seq, event.json.clone())
            .await?;
        if first_sight && event.relayed && !event.terminal {
            // The run's later events may have come from another instance before this
            // connection subscribed (see `BusEvent::relayed`): whatever the log holds past
            // this event goes now, and copies arriving later are dropped.
            match self.replay(event.run_id, event.seq).await {
                Ok(()) => {}
                Err(WsError::Socket(err)) => return Err(err),
                Err(err) => tracing::error!(error = ?err, "follow-up read of a relayed run failed"),
            }
        }
        Ok(true)
    }

    /// Writes `first` and the events already queued behind it (at most
    /// [`MAX_EVENTS_PER_FLUSH`] in all), in order, then flushes once. Returns the error
    /// the subscription gave instead of a further event, if it did, for the caller to
    /// handle exactly as one from `recv`.
    pub(super) async fn forward_queued(
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
    pub(super) async fn forward_pending(
        &mut self,
        subscription: &mut UserSubscription,
    ) -> Result<(), axum::Error> {
        while let Some(Ok(event)) = subscription.try_recv() {
            self.forward(&event).await?;
        }
        self.socket.flush().await
    }

    /// Replays stored events of `run` after `after_seq`.
    pub(super) async fn replay(&mut self, run: RunId, after_seq: u64) -> Result<(), WsError> {
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
    pub(super) async fn catch_up(&mut self) -> Sent {
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
                Err(WsError::Socket(err)) => return Err(err),
                Err(err) => tracing::error!(error = ?err, "catch-up replay failed"),
            }
        }
        Ok(())
    }
}

/// Which events of one run this connection has sent: everything up to `contiguous`, plus
/// the seqs in `ahead`. Live events that overtake a `resume` replay land in `ahead`, so
/// the replay still sends the ones before them, and nothing is ever sent twice.
#[derive(Debug, Default)]
pub(super) struct Delivered {
    pub(super) contiguous: u64,
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
    pub(super) fn has_up_to(&mut self, seq: u64) {
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
