//! The API's views of stored records: what REST and the WebSocket send for a thread or a
//! message (the protocol crate's types), made in one place so both say the same (a
//! regenerated answer's `superseded` mark included).

use apex_protocol::threads::{Message, Thread};

use crate::clock::ms_to_rfc3339;
use crate::store::{MessageRecord, ThreadRecord};

pub fn thread_view(record: ThreadRecord) -> Thread {
    Thread {
        id: record.id.to_string(),
        title: record.title,
        created_at: ms_to_rfc3339(record.created_at_ms),
        updated_at: ms_to_rfc3339(record.updated_at_ms),
        message_count: record.message_count,
        metadata: record.metadata,
    }
}

pub fn message_view(record: MessageRecord) -> Message {
    Message {
        id: record.id.to_string(),
        role: record.role,
        content: record.content,
        created_at: record.created_at_ms / 1000,
        metadata: record.metadata,
        superseded: record.superseded_by.is_some(),
        superseded_by: record.superseded_by.map(|run| run.to_string()),
    }
}
