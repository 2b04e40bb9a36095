//! What a connection does with each client frame: start, regenerate, stop and resume runs, send a
//! thread's history, answer pings. Every handler returns `Result<(), WsError>`; the
//! connection renders a refusal or an internal error as one `error_message` frame.
//!
//! Client frames name threads and runs only as things to look up under the connection's
//! own user: a malformed id, someone else's id and a missing one get the same answer.

use apex_protocol::approval::ApprovalRequest;
use apex_protocol::error::ErrorCode;
use apex_protocol::threads::{MultitaskStrategy, RunStatus};
use apex_protocol::ws::{ControlFrame, CLOSE_NORMAL};

use super::connection::{Connection, Exit};
use super::error::WsError;
use super::frames::{self, ClientFrame, FrameError};
use crate::clock::now_rfc3339;
use crate::events::log;
use crate::ids::{RequestId, RunId, ThreadId};
use crate::run::{Steering, StopOutcome};
use crate::views::message_view;

type Handled = Result<(), WsError>;

impl Connection {
    /// Handles one client frame; `Some` when the connection is to end. `Err` only when
    /// the socket failed.
    pub(super) async fn handle_frame(&mut self, raw: &str) -> Result<Option<Exit>, axum::Error> {
        let handled = match frames::parse(raw) {
            Err(FrameError::Parse(e)) => Err(WsError::refused(
                ErrorCode::InvalidJson,
                format!("invalid JSON: {e}"),
            )),
            Err(FrameError::Shape(e)) => Err(WsError::refused(ErrorCode::ValidationFailed, e)),
            // The client says it is leaving (the original web client, on page unload): no
            // answer, a normal close. Its runs go on; frames still queued are not sent.
            Ok(ClientFrame::Disconnect) => {
                return Ok(Some(Exit::Close(CLOSE_NORMAL, "client disconnected")))
            }
            Ok(frame) => self.dispatch(frame).await,
        };
        match handled {
            Ok(()) => Ok(None),
            Err(WsError::Socket(err)) => Err(err),
            Err(err) => {
                if let Some(frame) = err.into_frame() {
                    self.send_control(&frame).await?;
                }
                Ok(None)
            }
        }
    }

    async fn dispatch(&mut self, frame: ClientFrame) -> Handled {
        match frame {
            ClientFrame::StartRun {
                text,
                thread_id,
                multitask_strategy,
                require_approval,
            } => {
                self.start(text, thread_id, multitask_strategy, require_approval)
                    .await
            }
            ClientFrame::Approval { run_id, answer } => self.approval(run_id, answer).await,
            ClientFrame::StopRun { run_id } => self.stop(run_id).await,
            ClientFrame::Regenerate { thread_id } => self.regenerate(thread_id).await,
            ClientFrame::Resume { run_id, after_seq } => self.resume(run_id, after_seq).await,
            ClientFrame::ThreadHistory { thread_id } => self.history(thread_id).await,
            ClientFrame::SwitchThread { thread_id } => {
                // Switching is a courtesy: a thread it cannot show is simply not shown.
                match self.history(thread_id).await {
                    Err(WsError::Socket(err)) => Err(WsError::Socket(err)),
                    Err(WsError::Internal(cause)) => {
                        tracing::error!(error = %cause, "switch_thread failed");
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            ClientFrame::SessionRestore | ClientFrame::Disconnect => Ok(()),
            ClientFrame::Ping => Ok(self
                .send_control(&ControlFrame::Pong {
                    timestamp: now_rfc3339(),
                })
                .await?),
            ClientFrame::Heartbeat => Ok(self
                .send_control(&ControlFrame::HeartbeatAck {
                    timestamp: now_rfc3339(),
                })
                .await?),
            ClientFrame::Unknown(kind) => Err(WsError::refused(
                ErrorCode::UnknownMessageType,
                format!("unknown message type {kind:?}"),
            )),
        }
    }

    async fn start(
        &mut self,
        text: Option<String>,
        thread_id: Option<String>,
        multitask_strategy: Option<String>,
        require_approval: Option<serde_json::Value>,
    ) -> Handled {
        let text = text
            .ok_or_else(|| WsError::refused(ErrorCode::ValidationFailed, "a message needs text"))?;
        let strategy = match multitask_strategy {
            Some(name) => Some(MultitaskStrategy::parse(&name).ok_or_else(|| {
                WsError::refused(
                    ErrorCode::ValidationFailed,
                    "multitask_strategy must be one of enqueue, interrupt, rollback, reject",
                )
            })?),
            None => None,
        };
        let require_approval = match require_approval {
            None => None,
            Some(serde_json::Value::Bool(value)) => Some(value),
            Some(_) => {
                return Err(WsError::refused(
                    ErrorCode::ValidationFailed,
                    "require_approval must be true or false",
                ))
            }
        };
        let thread = match thread_id {
            Some(raw) => Some(ThreadId::parse(&raw).map_err(|_| thread_not_found())?),
            None => None,
        };
        let started = self
            .state
            .runs
            .submit(
                &self.user,
                thread,
                &text,
                Steering {
                    multitask_strategy: strategy,
                    require_approval,
                },
                RequestId::generate(),
            )
            .await?;
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
            status: RunStatus::Queued,
            timestamp: now_rfc3339(),
        })
        .await?;
        Ok(())
    }

    /// A new run for the thread's last message; answered `run_accepted` like a message
    /// (its `message_id` is the message answered again).
    async fn regenerate(&mut self, thread_id: Option<String>) -> Handled {
        let thread = thread_id
            .as_deref()
            .and_then(|raw| ThreadId::parse(raw).ok())
            .ok_or_else(thread_not_found)?;
        let started = self
            .state
            .runs
            .regenerate(&self.user, thread, RequestId::generate())
            .await?;
        self.last_started = Some(started.run_id);
        self.send_control(&ControlFrame::RunAccepted {
            run_id: started.run_id.to_string(),
            thread_id: started.thread_id.to_string(),
            message_id: started.message_id.to_string(),
            // A regenerate never waits behind another run of its thread (a busy thread is
            // refused); like every accepted run it starts queued.
            status: RunStatus::Queued,
            timestamp: now_rfc3339(),
        })
        .await?;
        Ok(())
    }

    /// The answer to a run's request for approval; `approval_accepted` once it is stored.
    async fn approval(&mut self, run_id: Option<String>, answer: serde_json::Value) -> Handled {
        let run = run_id
            .as_deref()
            .and_then(|raw| RunId::parse(raw).ok())
            .ok_or_else(run_not_found)?;
        let answer: ApprovalRequest = serde_json::from_value(answer).map_err(|e| {
            WsError::refused(
                ErrorCode::ValidationFailed,
                format!(
                    "an approval needs approval_id, decision (approve, edit or reject) and, \
                     to edit, plan: {e}"
                ),
            )
        })?;
        let accepted = self.state.runs.decide(&self.user, run, &answer).await?;
        self.send_control(&ControlFrame::ApprovalAccepted {
            run_id: accepted.run_id,
            approval_id: accepted.approval_id,
            decision: accepted.decision,
            status: accepted.status,
            timestamp: now_rfc3339(),
        })
        .await?;
        Ok(())
    }

    async fn stop(&mut self, run_id: Option<String>) -> Handled {
        let user = self.user.user_id();
        let run = match run_id {
            Some(raw) => RunId::parse(&raw).map_err(|_| run_not_found())?,
            None => match self
                .last_started
                .filter(|r| self.state.runs.is_active(user, *r))
                .or_else(|| self.state.runs.latest_for(user))
            {
                Some(run) => run,
                // Not executing here: still queued, or running on another instance.
                None => match self.store.recent_runs(i64::MAX, 1).await?.first() {
                    Some(run) => run.id,
                    None => {
                        return Err(WsError::refused(
                            ErrorCode::RunNotActive,
                            "no active run to stop",
                        ))
                    }
                },
            },
        };
        match self.state.runs.stop(&self.user, run).await? {
            StopOutcome::Stopping => Ok(self
                .send_control(&ControlFrame::StopAcknowledged {
                    run_id: run.to_string(),
                    timestamp: now_rfc3339(),
                })
                .await?),
            StopOutcome::AlreadyFinished(status) => Err(WsError::refused(
                ErrorCode::RunNotActive,
                format!("run already finished with status {}", status.as_str()),
            )),
            StopOutcome::NotFound => Err(run_not_found()),
        }
    }

    async fn resume(&mut self, run_id: Option<String>, after_seq: Option<u64>) -> Handled {
        let run = run_id
            .as_deref()
            .and_then(|r| RunId::parse(r).ok())
            .ok_or_else(run_not_found)?;
        let record = self.store.get_run(run).await?.ok_or_else(run_not_found)?;
        let after = after_seq.unwrap_or(0);
        if log::has_gap(&self.store, &record, after).await? {
            self.send_control(&ControlFrame::ResumeGap {
                run_id: run.to_string(),
                after_seq: after,
                last_seq: record.last_seq,
                message: "these events are no longer kept; reload the thread".into(),
                timestamp: now_rfc3339(),
            })
            .await?;
            return Ok(());
        }
        // The client has everything up to `after`: live copies of those are duplicates.
        self.delivered.entry(run).or_default().has_up_to(after);
        self.replay(run, after).await
    }

    /// Sends the messages of a thread of this user (`thread_history`, `switch_thread`).
    async fn history(&mut self, thread_id: Option<String>) -> Handled {
        let thread = thread_id
            .as_deref()
            .and_then(|raw| ThreadId::parse(raw).ok())
            .ok_or_else(thread_not_found)?;
        let thread = self
            .store
            .get_thread(thread)
            .await?
            .ok_or_else(thread_not_found)?
            .id;
        let (messages, _) = self.store.list_messages(thread, 500, 0).await?;
        self.send_control(&ControlFrame::ThreadData {
            thread_id: thread.to_string(),
            messages: messages.into_iter().map(message_view).collect(),
            timestamp: now_rfc3339(),
        })
        .await?;
        Ok(())
    }
}

fn thread_not_found() -> WsError {
    WsError::refused(ErrorCode::ThreadNotFound, "thread not found")
}

fn run_not_found() -> WsError {
    WsError::refused(ErrorCode::RunNotFound, "run not found")
}
