//! Client → server frames, parsed leniently: fields may sit at top level or inside
//! `payload`, and the aliases of the original system are accepted.

use serde_json::Value;

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `user_message` / `chat` / `chat_message` / `start_agent`.
    StartRun {
        text: Option<String>,
        thread_id: Option<String>,
        /// As sent (checked by the handler); a non-string is kept as its JSON text, so it
        /// is refused rather than ignored.
        multitask_strategy: Option<String>,
        /// As sent (checked by the handler: a non-boolean is refused).
        require_approval: Option<Value>,
    },
    /// `approval`: the answer to a run's request for approval of its plan.
    Approval {
        run_id: Option<String>,
        /// `approval_id`, `decision` and `plan` as sent (checked by the handler).
        answer: Value,
    },
    StopRun {
        run_id: Option<String>,
    },
    /// `regenerate`: answer the thread's last message again.
    Regenerate {
        thread_id: Option<String>,
    },
    Resume {
        run_id: Option<String>,
        after_seq: Option<u64>,
    },
    ThreadHistory {
        thread_id: Option<String>,
    },
    SwitchThread {
        thread_id: Option<String>,
    },
    SessionRestore,
    /// The client is leaving (the original web client sends it on page unload, with a
    /// `reason`); answered by a normal close.
    Disconnect,
    Ping,
    Heartbeat,
    Unknown(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum FrameError {
    /// Not JSON at all.
    Parse(String),
    /// JSON, but not an object with a string `type`.
    Shape(String),
}

/// `payload.name` if present, else top-level `name`.
fn field<'a>(frame: &'a Value, name: &str) -> Option<&'a Value> {
    frame
        .get("payload")
        .and_then(|p| p.get(name))
        .filter(|v| !v.is_null())
        .or_else(|| frame.get(name).filter(|v| !v.is_null()))
}

/// An id field: absent, null or empty counts as absent; a non-string is kept as its JSON
/// text so that it is looked up (and not found) instead of silently ignored.
fn id_field(frame: &Value, name: &str) -> Option<String> {
    match field(frame, name)? {
        Value::String(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
        other => Some(other.to_string()),
    }
}

/// A string field; empty strings count as absent.
fn text(frame: &Value, names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        field(frame, name)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    })
}

pub fn parse(raw: &str) -> Result<ClientFrame, FrameError> {
    let frame: Value = serde_json::from_str(raw).map_err(|e| FrameError::Parse(e.to_string()))?;
    let kind = frame.get("type").and_then(Value::as_str).ok_or_else(|| {
        FrameError::Shape("frame must be a JSON object with a string \"type\"".into())
    })?;
    Ok(match kind {
        "user_message" | "chat" | "chat_message" => ClientFrame::StartRun {
            text: text(&frame, &["text", "content", "message"]),
            thread_id: id_field(&frame, "thread_id"),
            multitask_strategy: id_field(&frame, "multitask_strategy"),
            require_approval: field(&frame, "require_approval").cloned(),
        },
        "start_agent" => ClientFrame::StartRun {
            text: text(&frame, &["user_request", "text", "content", "message"]),
            thread_id: id_field(&frame, "thread_id"),
            multitask_strategy: id_field(&frame, "multitask_strategy"),
            require_approval: field(&frame, "require_approval").cloned(),
        },
        "approval" => ClientFrame::Approval {
            run_id: id_field(&frame, "run_id"),
            answer: {
                let mut answer = serde_json::Map::new();
                for name in ["approval_id", "decision", "plan"] {
                    if let Some(value) = field(&frame, name) {
                        answer.insert(name.into(), value.clone());
                    }
                }
                Value::Object(answer)
            },
        },
        "regenerate" => ClientFrame::Regenerate {
            thread_id: id_field(&frame, "thread_id"),
        },
        "stop_agent" => ClientFrame::StopRun {
            run_id: id_field(&frame, "run_id"),
        },
        "resume" => ClientFrame::Resume {
            run_id: id_field(&frame, "run_id"),
            after_seq: field(&frame, "after_seq").and_then(Value::as_u64),
        },
        "get_thread_history" => ClientFrame::ThreadHistory {
            thread_id: id_field(&frame, "thread_id"),
        },
        "switch_thread" => ClientFrame::SwitchThread {
            thread_id: id_field(&frame, "thread_id").or_else(|| id_field(&frame, "threadId")),
        },
        "session_restore" => ClientFrame::SessionRestore,
        "disconnect" => ClientFrame::Disconnect,
        "ping" => ClientFrame::Ping,
        "heartbeat" => ClientFrame::Heartbeat,
        other => ClientFrame::Unknown(other.chars().take(64).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_flat_and_payload_fields_and_aliases() {
        assert_eq!(
            parse(r#"{"type":"chat","payload":{"content":"hi","thread_id":"t"}}"#).unwrap(),
            ClientFrame::StartRun {
                text: Some("hi".into()),
                thread_id: Some("t".into()),
                multitask_strategy: None,
                require_approval: None
            }
        );
        assert_eq!(
            parse(r#"{"type":"start_agent","user_request":"go"}"#).unwrap(),
            ClientFrame::StartRun {
                text: Some("go".into()),
                thread_id: None,
                multitask_strategy: None,
                require_approval: None
            }
        );
        assert_eq!(
            parse(r#"{"type":"resume","payload":{"run_id":"r","after_seq":4}}"#).unwrap(),
            ClientFrame::Resume {
                run_id: Some("r".into()),
                after_seq: Some(4)
            }
        );
        assert_eq!(
            parse(r#"{"type":"disconnect","payload":{"connectionId":"c","reason":"page_unload"}}"#)
                .unwrap(),
            ClientFrame::Disconnect
        );
        assert_eq!(
            parse(r#"{"type":"regenerate","payload":{"thread_id":" t "}}"#).unwrap(),
            ClientFrame::Regenerate {
                thread_id: Some("t".into())
            }
        );
        assert_eq!(
            parse(r#"{"type":"regenerate","thread_id":""}"#).unwrap(),
            ClientFrame::Regenerate { thread_id: None }
        );
        assert_eq!(
            parse(r#"{"type":"user_message","text":"  ","thread_id":""}"#).unwrap(),
            ClientFrame::StartRun {
                text: None,
                thread_id: None,
                multitask_strategy: None,
                require_approval: None
            }
        );
    }

    #[test]
    fn keeps_the_multitask_strategy_as_sent() {
        let strategy = |raw: &str| match parse(raw).unwrap() {
            ClientFrame::StartRun {
                multitask_strategy, ..
            } => multitask_strategy,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            strategy(r#"{"type":"user_message","text":"hi","multitask_strategy":"interrupt"}"#),
            Some("interrupt".into())
        );
        assert_eq!(
            strategy(
                r#"{"type":"start_agent","payload":{"user_request":"go","multitask_strategy":"rollback"}}"#
            ),
            Some("rollback".into())
        );
        // A non-string is kept as its JSON text, so the handler refuses it.
        assert_eq!(
            strategy(r#"{"type":"chat","text":"hi","multitask_strategy":3}"#),
            Some("3".into())
        );
        assert_eq!(strategy(r#"{"type":"chat","text":"hi"}"#), None);
    }

    #[test]
    fn reports_bad_json_and_shapes() {
        assert!(matches!(parse("{nope"), Err(FrameError::Parse(_))));
        assert!(matches!(parse("[1,2]"), Err(FrameError::Shape(_))));
        assert!(matches!(parse(r#"{"type":7}"#), Err(FrameError::Shape(_))));
        assert_eq!(
            parse(r#"{"type":"dance"}"#).unwrap(),
            ClientFrame::Unknown("dance".into())
        );
    }
}
