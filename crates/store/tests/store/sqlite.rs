//! `SqliteStore`'s background work, seen from outside: what reaches the database file.

use std::time::Duration;

use apex_protocol::threads::RunStatus;
use apex_store::ids::{RunId, ThreadId, UserId};
use apex_store::prelude::*;
use apex_store::sqlite::SqliteStore;
use apex_store::{RunRecord, ThreadRecord, UserRecord};

/// Committed events reach the database file itself (not only the WAL) without any
/// commit having to checkpoint: the writer's automatic threshold (64 MiB) is far above
/// what is written here, so only the background checkpoint can have copied them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_checkpoint_copies_the_wal_into_the_database_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("apex.db");
    let store = SqliteStore::open(&format!("sqlite://{}", path.display()))
        .await
        .expect("open");
    let owner = UserId::generate();
    store
        .create_user(&UserRecord {
            id: owner,
            email: "c@example.com".into(),
            name: None,
            password_hash: "hash".into(),
            created_at_ms: 0,
        })
        .await
        .expect("user");
    let thread = ThreadId::generate();
    store
        .create_thread(
            owner,
            &ThreadRecord {
                id: thread,
                title: "t".into(),
                metadata: serde_json::json!({}),
                created_at_ms: 0,
                updated_at_ms: 0,
                message_count: 0,
            },
        )
        .await
        .expect("thread");
    let run = RunId::generate();
    store
        .create_run_on(
            owner,
            &RunRecord {
                id: run,
                thread_id: thread,
                status: RunStatus::Running,
                created_at_ms: 0,
                started_at_ms: Some(0),
                finished_at_ms: None,
                error: None,
                last_seq: 0,
            },
            None,
        )
        .await
        .expect("run");
    let before = std::fs::metadata(&path).expect("db file").len();
    let body = "x".repeat(4096);
    for seq in 1..=512 {
        store
            .append_event(
                owner,
                run,
                seq,
                &format!("{{\"pad\":\"{body}\"}}"),
                seq as i64,
            )
            .await
            .expect("append");
    }
    // 512 events of 4 KiB: at least 2 MiB must land in the file.
    let wanted = before + 2 * 1024 * 1024;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let size = std::fs::metadata(&path).expect("db file").len();
        if size >= wanted {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {size} bytes (from {before}); nothing was checkpointed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        store
            .list_events(owner, run, 0, 1000)
            .await
            .expect("list")
            .len(),
        512
    );
}
