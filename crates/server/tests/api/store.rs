//! The `Store` implementations directly: the guarantees the server relies on when requests
//! race (a refresh token or single-use ticket is spent once, concurrent appends to a thread
//! all land in order) and the owner filter of every user-data method. Runs on SQLite in the
//! `api` target and on PostgreSQL in `api_postgres`, so both engines answer alike.

use std::sync::Arc;

use apex_protocol::threads::RunStatus;
use apex_server::ids::{MessageId, RunId, ThreadId, UserId};
use apex_server::store::{
    MessageRecord, RedeemedTicket, RefreshRotation, RunRecord, RunSubmission, SessionEndReason,
    SessionRecord, Store, StoreError, SubmitOutcome, ThreadRecord, TicketRecord, UsageRow,
    UserRecord,
};
use serde_json::json;

use crate::helpers::{test_database, TestDatabase};

const NOW: i64 = 1_700_000_000_000;
/// How many tasks race for one resource.
const RACERS: usize = 16;

struct TestStore {
    store: Arc<dyn Store>,
    _database: TestDatabase,
}

async fn test_store() -> TestStore {
    let database = test_database().await;
    let store = apex_server::open_store(&database.settings())
        .await
        .expect("open the store");
    TestStore {
        store,
        _database: database,
    }
}

async fn user(store: &dyn Store) -> UserId {
    let id = UserId::generate();
    store
        .create_user(&UserRecord {
            id,
            email: format!("{id}@example.com"),
            name: None,
            password_hash: "hash".into(),
            created_at_ms: NOW,
        })
        .await
        .expect("create user");
    id
}

async fn thread(store: &dyn Store, owner: UserId) -> ThreadId {
    let id = ThreadId::generate();
    store
        .create_thread(
            owner,
            &ThreadRecord {
                id,
                title: "t".into(),
                metadata: json!({"k": "v"}),
                created_at_ms: NOW,
                updated_at_ms: NOW,
                message_count: 0,
            },
        )
        .await
        .expect("create thread");
    id
}

fn message(thread_id: ThreadId, content: &str) -> MessageRecord {
    MessageRecord {
        id: MessageId::generate(),
        thread_id,
        role: "user".into(),
        content: content.into(),
        metadata: json!({}),
        created_at_ms: NOW,
        superseded_by: None,
    }
}

async fn run(store: &dyn Store, owner: UserId, thread_id: ThreadId) -> RunId {
    let id = RunId::generate();
    store
        .create_run(
            owner,
            &RunRecord {
                id,
                thread_id,
                status: RunStatus::Queued,
                created_at_ms: NOW,
                started_at_ms: None,
                finished_at_ms: None,
                error: None,
                last_seq: 0,
            },
        )
        .await
        .expect("create run");
    id
}

/// Starts a session of `owner` lasting a minute from [`NOW`], with refresh token `jti`.
async fn session(store: &dyn Store, owner: UserId, id: &str, jti: &str) -> SessionRecord {
    let record = SessionRecord {
        id: id.to_string(),
        user_id: owner,
        created_at_ms: NOW,
        expires_at_ms: NOW + 60_000,
        last_used_at_ms: NOW,
        ended_at_ms: None,
        user_agent: Some("test".into()),
    };
    store
        .create_session(&record, jti, NOW + 120_000)
        .await
        .expect("create session");
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_rotated_concurrently_is_rotated_once_and_the_rest_is_reuse() {
    let db = test_store().await;
    let owner = user(&*db.store).await;
    session(&*db.store, owner, "s-1", "jti-1").await;
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let store = Arc::clone(&db.store);
        tasks.push(tokio::spawn(async move {
            store
                .rotate_refresh_token("jti-1", owner, &format!("next-{i}"), NOW + 60_000, NOW)
                .await
        }));
    }
    let (mut rotated, mut reused) = (0, 0);
    for task in tasks {
        match task.await.unwrap().expect("rotate") {
            RefreshRotation::Rotated { session } => {
                assert_eq!(session.id, "s-1");
                rotated += 1;
            }
            RefreshRotation::Reused { session_id } => {
                assert_eq!(session_id, "s-1");
                reused += 1;
            }
            RefreshRotation::Invalid => panic!("a known token is rotated or reused"),
        }
    }
    assert_eq!(rotated, 1, "exactly one concurrent refresh wins");
    assert_eq!(reused, RACERS - 1, "the others are reuse");
    let ended = db.store.get_session("s-1").await.unwrap().unwrap();
    assert!(!ended.is_active(NOW), "reuse ends the session");
}

#[tokio::test]
async fn refresh_rotation_refuses_unknown_expired_foreign_and_ended_tokens() {
    let db = test_store().await;
    let owner = user(&*db.store).await;
    let other = user(&*db.store).await;
    session(&*db.store, owner, "s-2", "jti-2").await;
    let rotate = |jti: &'static str, who: UserId, now: i64| {
        let store = Arc::clone(&db.store);
        async move {
            store
                .rotate_refresh_token(jti, who, "new", NOW + 60_000, now)
                .await
                .unwrap()
        }
    };
    assert_eq!(rotate("nope", owner, NOW).await, RefreshRotation::Invalid);
    assert_eq!(rotate("jti-2", other, NOW).await, RefreshRotation::Invalid);
    assert_eq!(
        rotate("jti-2", owner, NOW + 60_000).await,
        RefreshRotation::Invalid,
        "the refresh token expires with its session (capped at a minute)"
    );
    let RefreshRotation::Rotated { session } = rotate("jti-2", owner, NOW).await else {
        panic!("a live token rotates");
    };
    assert_eq!(session.last_used_at_ms, NOW);
    // The new token works once the session is live, and not after it ended.
    assert!(db
        .store
        .end_session(owner, "s-2", SessionEndReason::Logout, NOW)
        .await
        .unwrap());
    assert!(
        !db.store
            .end_session(owner, "s-2", SessionEndReason::Logout, NOW)
            .await
            .unwrap(),
        "ending twice is a no-op"
    );
    assert_eq!(rotate("new", owner, NOW).await, RefreshRotation::Invalid);
}

#[tokio::test]
async fn sessions_are_listed_ended_and_watched_per_owner() {
    let db = test_store().await;
    let owner = user(&*db.store).await;
    let other = user(&*db.store).await;
    session(&*db.store, owner, "a", "ra").await;
    session(&*db.store, owner, "b", "rb").await;
    session(&*db.store, other, "c", "rc").await;
    let listed: Vec<String> = db
        .store
        .list_sessions(owner, NOW)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(
        !db.store
            .end_session(other, "a", SessionEndReason::Revoked, NOW)
            .await
            .unwrap(),
        "another user's session is not theirs to end"
    );
    let ids = ["a", "b", "c", "gone"].map(String::from);
    assert_eq!(
        db.store.inactive_sessions(&ids, NOW).await.unwrap(),
        vec!["gone".to_string()]
    );
    let mut ended = db
        .store
        .end_all_sessions(owner, SessionEndReason::LogoutAll, NOW)
        .await
        .unwrap();
    ended.sort();
    assert_eq!(ended, ["a", "b"]);
    let mut inactive = db.store.inactive_sessions(&ids, NOW).await.unwrap();
    inactive.sort();
    assert_eq!(inactive, ["a", "b", "gone"]);
    assert_eq!(
        db.store
            .inactive_sessions(&ids, NOW + 60_000)
            .await
            .unwrap()
            .len(),
        4,
        "past its lifetime a session is inactive too"
    );
}

fn ticket(id: &str, owner: UserId, session: &str, max_uses: u32) -> TicketRecord {
    TicketRecord {
        id: id.to_string(),
        user_id: owner,
        session_id: session.to_string(),
        expires_at_ms: NOW + 30_000,
        access_expires_at_ms: NOW + 45_000,
        max_uses,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_redeemed_concurrently_never_exceed_their_uses() {
    let db = test_store().await;
    let owner = user(&*db.store).await;
    session(&*db.store, owner, "s", "r").await;
    db.store
        .insert_ticket(&ticket("single", owner, "s", 1))
        .await
        .unwrap();
    db.store
        .insert_ticket(&ticket("multi", owner, "s", 3))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..RACERS * 2 {
        let store = Arc::clone(&db.store);
        let ticket = if i % 2 == 0 { "single" } else { "multi" };
        tasks.push(tokio::spawn(async move {
            (ticket, store.redeem_ticket(ticket, NOW).await)
        }));
    }
    let (mut single, mut multi) = (0, 0);
    for task in tasks {
        let (ticket, redeemed) = task.await.unwrap();
        if let Some(redeemed) = redeemed.expect("redeem") {
            assert_eq!(
                redeemed,
                RedeemedTicket {
                    user_id: owner,
                    session_id: "s".into(),
                    access_expires_at_ms: NOW + 45_000,
                }
            );
            match ticket {
                "single" => single += 1,
                _ => multi += 1,
            }
        }
    }
    assert_eq!(single, 1, "a single-use ticket is redeemed once");
    assert_eq!(multi, 3, "a multi-use ticket up to its uses");
    db.store
        .insert_ticket(&ticket("late", owner, "s", 3))
        .await
        .unwrap();
    assert_eq!(
        db.store.redeem_ticket("late", NOW + 30_000).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(db.store.redeem_ticket("unknown", NOW).await.unwrap(), None);
    // A ticket of an ended session opens nothing.
    db.store
        .end_session(owner, "s", SessionEndReason::Logout, NOW)
        .await
        .unwrap();
    assert_eq!(db.store.redeem_ticket("late", NOW).await.unwrap(), None);
}

#[tokio::test]
async fn pruning_removes_expired_credentials_and_old_sessions_only() {
    let db = test_store().await;
    let owner = user(&*db.store).await;
    session(&*db.store, owner, "live", "r-live").await;
    session(&*db.store, owner, "ended", "r-ended").await;
    db.store
        .insert_ticket(&ticket("t", owner, "live", 1))
        .await
        .unwrap();
    db.store
        .end_session(owner, "ended", SessionEndReason::Logout, NOW)
        .await
        .unwrap();
    // Nothing has expired yet, and the session ended less than the kept window ago.
    assert_eq!(db.store.prune_sessions(NOW, NOW - 1).await.unwrap(), 0);
    // The ticket (30 s) expired; the ended session is past the window (with its token).
    assert_eq!(
        db.store
            .prune_sessions(NOW + 31_000, NOW + 1)
            .await
            .unwrap(),
        2
    );
    assert!(db.store.get_session("ended").await.unwrap().is_none());
    assert!(db.store.get_session("live").await.unwrap().is_some());
    assert!(matches!(
        db.store
            .rotate_refresh_token("r-live", owner, "r-next", NOW + 60_000, NOW + 31_000)
            .await
            .unwrap(),
        RefreshRotation::Rotated { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_to_a_thread_all_land_in_order_of_commit() {
    let db = test_store().await;
    let owner = user(&*db.store).await;
    let thread_id = thread(&*db.store, owner).await;
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let store = Arc::clone(&db.store);
        tasks.push(tokio::spawn(async move {
            store
                .insert_message(owner, &message(thread_id, &format!("m{i}")))
                .await
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().expect("insert message"));
    }
    let (messages, total) = db
        .store
        .list_messages(owner, thread_id, 100, 0)
        .await
        .unwrap();
    assert_eq!(total, RACERS as i64);
    let mut contents: Vec<_> = messages.iter().map(|m| m.content.clone()).collect();
    contents.sort();
    contents.dedup();
    assert_eq!(contents.len(), RACERS, "every message stored once");

    // Sequential appends keep their order, even within one millisecond.
    let later = thread(&*db.store, owner).await;
    for i in 0..5 {
        db.store
            .insert_message(owner, &message(later, &format!("{i}")))
            .await
            .unwrap();
    }
    let (messages, _) = db.store.list_messages(owner, later, 100, 0).await.unwrap();
    let order: Vec<_> = messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(order, ["0", "1", "2", "3", "4"]);
    let thread = db.store.get_thread(owner, later).await.unwrap().unwrap();
    assert_eq!(thread.message_count, 5);
    // A run's context reads the newest few in one query, still oldest first.
    let latest = db.store.latest_messages(owner, later, 3).await.unwrap();
    let order: Vec<_> = latest.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(order, ["2", "3", "4"]);
    let all = db.store.latest_messages(owner, later, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|m| m.id).collect::<Vec<_>>(),
        messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        "fewer messages than asked: all of them"
    );
    // An append moves the thread's updated_at to the message's time (on SQLite a trigger
    // does it, in the INSERT's statement); a refused append moves nothing.
    let mut late = message(later, "5");
    late.created_at_ms = NOW + 5;
    assert!(db.store.insert_message(owner, &late).await.unwrap());
    let stranger = user(&*db.store).await;
    let mut refused = message(later, "not yours");
    refused.created_at_ms = NOW + 9;
    assert!(!db.store.insert_message(stranger, &refused).await.unwrap());
    let touched = db.store.get_thread(owner, later).await.unwrap().unwrap();
    assert_eq!(touched.updated_at_ms, NOW + 5);
    assert_eq!(touched.message_count, 6);
}

/// An append of several events (what a run's emitter hands over) is stored whole or not at
/// all, whatever batch it shares with other runs' appends: one taken seq refuses it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_of_several_events_is_stored_whole_or_not_at_all() {
    const APPENDS: u64 = 20;
    const PER_APPEND: u64 = 5;
    let db = test_store().await;
    let owner = user(&*db.store).await;
    let stranger = user(&*db.store).await;
    let thread_id = thread(&*db.store, owner).await;
    let mut tasks = Vec::new();
    for _ in 0..RACERS {
        let run_id = run(&*db.store, owner, thread_id).await;
        let store = Arc::clone(&db.store);
        tasks.push(tokio::spawn(async move {
            for append in 0..APPENDS {
                let first = append * PER_APPEND + 1;
                let events = (first..first + PER_APPEND)
                    .map(|seq| (seq, format!(r#"{{"seq":{seq}}}"#)))
                    .collect();
                store
                    .append_events(owner, run_id, events, NOW)
                    .await
                    .expect("a run's next events are stored");
                // Overlaps the last event just stored: refused whole, so its new seqs
                // are not stored either.
                let last = first + PER_APPEND - 1;
                let overlapping = (last..last + 3).map(|seq| (seq, "{}".to_owned())).collect();
                assert!(store
                    .append_events(owner, run_id, overlapping, NOW)
                    .await
                    .is_err());
                let foreign = vec![(last + 1, "{}".to_owned()), (last + 2, "{}".to_owned())];
                assert!(store
                    .append_events(stranger, run_id, foreign, NOW)
                    .await
                    .is_err());
            }
            run_id
        }));
    }
    for task in tasks {
        let run_id = task.await.unwrap();
        let stored = db.store.list_events(owner, run_id, 0, 1000).await.unwrap();
        let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=APPENDS * PER_APPEND).collect::<Vec<_>>());
        assert!(stored
            .iter()
            .all(|e| e.json == format!(r#"{{"seq":{}}}"#, e.seq)));
        let record = db.store.get_run(owner, run_id).await.unwrap().unwrap();
        assert_eq!(record.last_seq, APPENDS * PER_APPEND);
    }
    let run_id = run(&*db.store, owner, thread_id).await;
    assert!(
        db.store
            .append_events(owner, run_id, Vec::new(), NOW)
            .await
            .is_err(),
        "an append of nothing is refused"
    );
    let too_many = (1..=apex_server::store::MAX_EVENTS_PER_APPEND as u64 + 1)
        .map(|seq| (seq, "{}".to_owned()))
        .collect();
    assert!(db
        .store
        .append_events(owner, run_id, too_many, NOW)
        .await
        .is_err());
    assert!(db
        .store
        .list_events(owner, run_id, 0, 10)
        .await
        .unwrap()
        .is_empty());
}

/// Many runs appending at once share transactions (the event log's group commit); a
/// refused event among them (a seq written twice, a run of another user) fails alone, the
/// rest land in seq order with `last_seq` set, and other writes racing the appends
/// (messages, here) land too: neither waits on the other forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_appended_together_succeed_or_fail_each_on_their_own() {
    const EVENTS: u64 = 40;
    let db = test_store().await;
    let owner = user(&*db.store).await;
    let stranger = user(&*db.store).await;
    let thread_id = thread(&*db.store, owner).await;
    let mut runs = Vec::new();
    for _ in 0..RACERS {
        runs.push(run(&*db.store, owner, thread_id).await);
    }
    let mut tasks = Vec::new();
    for (i, &run_id) in runs.iter().enumerate() {
        let store = Arc::clone(&db.store);
        tasks.push(tokio::spawn(async move {
            let mut refused = 0;
            for seq in 1..=EVENTS {
                let json = format!(r#"{{"run":{i},"seq":{seq}}}"#);
                store
                    .append_event(owner, run_id, seq, &json, NOW)
                    .await
                    .expect("an event of the run's owner is written");
                // Refused, whichever batch they share with the events around them.
                if seq % 10 == 0 {
                    refused += u64::from(
                        store
                            .append_event(owner, run_id, seq, "{}", NOW)
                            .await
                            .is_err(),
                    );
                    refused += u64::from(
                        store
                            .append_event(stranger, run_id, seq + 1, "{}", NOW)
                            .await
                            .is_err(),
                    );
                }
            }
            refused
        }));
    }
    let writer = {
        let store = Arc::clone(&db.store);
        tokio::spawn(async move {
            for i in 0..RACERS * 4 {
                store
                    .insert_message(owner, &message(thread_id, &format!("m{i}")))
                    .await
                    .expect("a message written while events are appended");
            }
        })
    };
    for task in tasks {
        assert_eq!(
            task.await.unwrap(),
            EVENTS / 10 * 2,
            "every bad event refused"
        );
    }
    writer.await.unwrap();
    for (i, &run_id) in runs.iter().enumerate() {
        let stored = db.store.list_events(owner, run_id, 0, 1000).await.unwrap();
        let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=EVENTS).collect::<Vec<_>>(),
            "run {i}: every seq once, in order"
        );
        assert!(stored
            .iter()
            .all(|e| e.json == format!(r#"{{"run":{i},"seq":{}}}"#, e.seq)));
        let record = db.store.get_run(owner, run_id).await.unwrap().unwrap();
        assert_eq!(record.last_seq, EVENTS);
    }
    let (_, messages) = db
        .store
        .list_messages(owner, thread_id, 1, 0)
        .await
        .unwrap();
    assert_eq!(messages, (RACERS * 4) as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_rows_are_indistinguishable_from_missing_ones() {
    let db = test_store().await;
    let store = &*db.store;
    let alice = user(store).await;
    let bob = user(store).await;
    let thread_id = thread(store, alice).await;
    assert!(store
        .insert_message(alice, &message(thread_id, "hi"))
        .await
        .unwrap());
    let run_id = run(store, alice, thread_id).await;
    store
        .append_event(alice, run_id, 1, r#"{"seq":1}"#, NOW)
        .await
        .unwrap();

    assert!(store.get_thread(bob, thread_id).await.unwrap().is_none());
    assert!(store.list_threads(bob, 10, 0).await.unwrap().is_empty());
    assert!(!store
        .update_thread(bob, thread_id, "mine", &json!({}), NOW)
        .await
        .unwrap());
    assert!(!store
        .insert_message(bob, &message(thread_id, "sneaky"))
        .await
        .unwrap());
    let (messages, total) = store.list_messages(bob, thread_id, 10, 0).await.unwrap();
    assert!(messages.is_empty());
    assert_eq!(total, 0);
    assert!(store
        .latest_messages(bob, thread_id, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(store.get_run(bob, run_id).await.unwrap().is_none());
    assert!(store
        .list_events(bob, run_id, 0, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        store.append_event(bob, run_id, 2, "{}", NOW).await,
        Err(StoreError::Corrupt(_))
    ));
    store
        .set_run_status(bob, run_id, RunStatus::Failed, Some("x"), NOW)
        .await
        .unwrap();
    assert!(!store.delete_thread(bob, thread_id).await.unwrap());

    // Alice's data is untouched by all of that.
    let thread = store.get_thread(alice, thread_id).await.unwrap().unwrap();
    assert_eq!(thread.title, "t");
    assert_eq!(thread.message_count, 1);
    let run = store.get_run(alice, run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Queued);
    assert_eq!(run.last_seq, 1);
    assert_eq!(
        store.list_events(alice, run_id, 0, 10).await.unwrap().len(),
        1
    );
    assert!(store.delete_thread(alice, thread_id).await.unwrap());
    assert!(
        store.get_run(alice, run_id).await.unwrap().is_none(),
        "runs go with their thread"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_engines_answer_alike_on_edge_cases() {
    let db = test_store().await;
    let store = &*db.store;
    let owner = user(store).await;

    // A taken email is a conflict.
    let existing = store.get_user(owner).await.unwrap().unwrap();
    let again = UserRecord {
        id: UserId::generate(),
        ..existing.clone()
    };
    assert!(matches!(
        store.create_user(&again).await,
        Err(StoreError::Conflict)
    ));
    let found = store
        .find_user_by_email(&existing.email)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.id, owner);
    assert!(store
        .find_user_by_email(&existing.email.to_uppercase())
        .await
        .unwrap()
        .is_none());

    // Events come back byte for byte (key order and spacing kept), after `after_seq`.
    let thread_id = thread(store, owner).await;
    let run_id = run(store, owner, thread_id).await;
    let events = [r#"{"z": 1, "a": "\u0000é"}"#, r#"{"b":2,"a":1}"#, "{}"];
    for (i, json) in events.iter().enumerate() {
        store
            .append_event(owner, run_id, i as u64 + 1, json, NOW)
            .await
            .unwrap();
    }
    let stored = store.list_events(owner, run_id, 0, 10).await.unwrap();
    let texts: Vec<_> = stored.iter().map(|e| e.json.as_str()).collect();
    assert_eq!(texts, events);
    let after_one = store.list_events(owner, run_id, 1, 1).await.unwrap();
    assert_eq!(after_one.len(), 1);
    assert_eq!(after_one[0].seq, 2);
    assert!(
        store
            .append_event(owner, run_id, 2, "{}", NOW)
            .await
            .is_err(),
        "a seq is stored once"
    );

    // Run status timestamps: started once, finished once, error kept.
    store
        .set_run_status(owner, run_id, RunStatus::Running, None, NOW + 1)
        .await
        .unwrap();
    store
        .set_run_status(owner, run_id, RunStatus::Running, None, NOW + 2)
        .await
        .unwrap();
    store
        .set_run_status(owner, run_id, RunStatus::Failed, Some("boom"), NOW + 3)
        .await
        .unwrap();
    store
        .set_run_status(owner, run_id, RunStatus::Failed, None, NOW + 4)
        .await
        .unwrap();
    let finished = store.get_run(owner, run_id).await.unwrap().unwrap();
    assert_eq!(finished.started_at_ms, Some(NOW + 1));
    assert_eq!(finished.finished_at_ms, Some(NOW + 4));
    assert_eq!(finished.error.as_deref(), Some("boom"));
    assert!(store
        .recent_runs(owner, i64::MAX, 100)
        .await
        .unwrap()
        .iter()
        .all(|r| r.id != run_id));

    // Thread metadata round-trips; paging: negative limit means no limit, negative offset 0.
    for i in 0..3 {
        store
            .update_thread(
                owner,
                thread_id,
                "renamed",
                &json!({"i": i, "nested": [1, {"x": null}]}),
                NOW + i,
            )
            .await
            .unwrap();
    }
    let renamed = store.get_thread(owner, thread_id).await.unwrap().unwrap();
    assert_eq!(
        renamed.metadata,
        json!({"i": 2, "nested": [1, {"x": null}]})
    );
    assert_eq!(renamed.updated_at_ms, NOW + 2);
    thread(store, owner).await;
    thread(store, owner).await;
    assert_eq!(store.list_threads(owner, -1, 0).await.unwrap().len(), 3);
    assert_eq!(store.list_threads(owner, 10, -5).await.unwrap().len(), 3);
    assert_eq!(store.list_threads(owner, 2, 2).await.unwrap().len(), 1);

    // Usage: exact floats, the owner's rows only, in time order.
    let rows: Vec<UsageRow> = (0..3)
        .map(|i| UsageRow {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            workload: "chat".into(),
            ts_ms: NOW - i * 1000,
            prompt_tokens: 1_000_000 + i,
            completion_tokens: i,
            latency_ms: 10,
            status: "ok".into(),
            cost_usd: 0.1 + 0.2 * i as f64,
            ..UsageRow::default()
        })
        .collect();
    assert_eq!(store.insert_usage(owner, &rows).await.unwrap(), 3);
    let other = user(store).await;
    assert_eq!(store.insert_usage(other, &rows[..1]).await.unwrap(), 1);
    let mut expected = rows.clone();
    expected.reverse();
    assert_eq!(store.usage_rows_since(owner, 0).await.unwrap(), expected);
    assert_eq!(
        store.usage_rows_since(owner, NOW - 1000).await.unwrap(),
        expected[1..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_logouts_all_succeed_and_end_their_sessions() {
    let db = test_store().await;
    let owner = user(&*db.store).await;
    for i in 0..RACERS {
        session(&*db.store, owner, &format!("s-{i}"), &format!("r-{i}")).await;
    }
    let mut tasks = Vec::new();
    for i in 0..RACERS {
        let store = Arc::clone(&db.store);
        tasks.push(tokio::spawn(async move {
            store
                .end_session(owner, &format!("s-{i}"), SessionEndReason::Logout, NOW)
                .await
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().expect("logout"));
    }
    for i in 0..RACERS {
        assert_eq!(
            db.store
                .rotate_refresh_token(&format!("r-{i}"), owner, "x", NOW + 60_000, NOW)
                .await
                .unwrap(),
            RefreshRotation::Invalid
        );
    }
    assert!(db.store.list_sessions(owner, NOW).await.unwrap().is_empty());
}

/// Submits a run answering a new message on `thread_id`, within `max_unfinished`.
async fn submit(
    store: &dyn Store,
    owner: UserId,
    thread_id: ThreadId,
    created_at_ms: i64,
    max_unfinished: usize,
) -> (RunId, SubmitOutcome) {
    submit_as(store, owner, thread_id, created_at_ms, max_unfinished, None).await
}

/// [`submit`], claiming the run for `claim_by` in the same transaction when given.
async fn submit_as(
    store: &dyn Store,
    owner: UserId,
    thread_id: ThreadId,
    created_at_ms: i64,
    max_unfinished: usize,
    claim_by: Option<&str>,
) -> (RunId, SubmitOutcome) {
    let id = RunId::generate();
    let message = MessageRecord {
        id: MessageId::generate(),
        thread_id,
        role: "user".into(),
        content: format!("question for {id}"),
        metadata: json!({}),
        created_at_ms,
        superseded_by: None,
    };
    let run = RunRecord {
        id,
        thread_id,
        status: RunStatus::Queued,
        created_at_ms,
        started_at_ms: None,
        finished_at_ms: None,
        error: None,
        last_seq: 0,
    };
    let request_id = format!("request-{id}");
    let outcome = store
        .submit_run(
            owner,
            &RunSubmission {
                message: &message,
                run: &run,
                request_id: &request_id,
                max_unfinished,
                claim_by,
                new_thread: None,
                // The store's refusal is what these tests race for.
                strategy: apex_protocol::threads::MultitaskStrategy::Reject,
                require_approval: None,
            },
        )
        .await
        .expect("submit run");
    (id, outcome)
}

/// The limits `submit_run` enforces are exact when one user's messages race: of many
/// concurrent submissions on separate threads exactly `max` are queued, and of many on one
/// thread exactly one; a refused submission leaves no message behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_respect_the_run_limits_exactly() {
    let db = test_store().await;
    let store = &*db.store;
    let owner = user(store).await;
    let mut threads = Vec::new();
    for _ in 0..RACERS {
        threads.push(thread(store, owner).await);
    }
    const MAX: usize = 3;
    let outcomes = futures_util::future::join_all(threads.iter().map(|&thread_id| {
        let store = Arc::clone(&db.store);
        async move { submit(&*store, owner, thread_id, NOW, MAX).await.1 }
    }))
    .await;
    let queued = outcomes
        .iter()
        .filter(|o| **o == SubmitOutcome::Queued)
        .count();
    assert_eq!(queued, MAX, "{outcomes:?}");
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, SubmitOutcome::Queued | SubmitOutcome::TooManyRuns)));
    let mut messages = 0;
    for &thread_id in &threads {
        messages += store
            .list_messages(owner, thread_id, 10, 0)
            .await
            .unwrap()
            .1;
    }
    assert_eq!(
        messages, MAX as i64,
        "refused submissions stored no message"
    );

    // One thread: exactly one of many racing submissions gets it.
    let other = user(store).await;
    let shared = thread(store, other).await;
    let outcomes = futures_util::future::join_all((0..RACERS).map(|_| {
        let store = Arc::clone(&db.store);
        async move { submit(&*store, other, shared, NOW, 100).await.1 }
    }))
    .await;
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == SubmitOutcome::Queued)
            .count(),
        1,
        "{outcomes:?}"
    );
    assert!(outcomes
        .iter()
        .all(|o| matches!(o, SubmitOutcome::Queued | SubmitOutcome::ThreadBusy)));
    // Someone else's thread is not found, whatever the limits.
    let (_, outcome) = submit(store, owner, shared, NOW, 100).await;
    assert_eq!(outcome, SubmitOutcome::ThreadNotFound);
}

/// Many claimers racing over the queue (as instances do) each get distinct runs, every
/// queued run is claimed exactly once, oldest first, with what is needed to execute it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claimers_take_every_queued_run_exactly_once() {
    let db = test_store().await;
    let store = &*db.store;
    const RUNS: usize = 40;
    let mut submitted = Vec::new();
    for i in 0..RUNS {
        let owner = user(store).await;
        let thread_id = thread(store, owner).await;
        let (id, outcome) = submit(store, owner, thread_id, NOW + i as i64, 3).await;
        assert_eq!(outcome, SubmitOutcome::Queued);
        submitted.push((owner, id));
    }
    let claims = futures_util::future::join_all((0..RACERS).map(|i| {
        let store = Arc::clone(&db.store);
        async move {
            let mut mine = Vec::new();
            loop {
                let batch = store
                    .claim_queued_runs(&format!("instance-{i}"), 3, NOW + 100)
                    .await
                    .unwrap();
                if batch.is_empty() {
                    return mine;
                }
                mine.extend(batch.into_iter().map(|entry| (i, entry)));
            }
        }
    }))
    .await;
    let mut claimed: Vec<_> = claims.into_iter().flatten().collect();
    assert_eq!(claimed.len(), RUNS, "every run claimed once");
    for (i, entry) in &claimed {
        assert_eq!(
            entry.instance.as_deref(),
            Some(format!("instance-{i}").as_str())
        );
        assert_eq!(entry.attempts, 1);
        assert_eq!(entry.run.status, RunStatus::Running);
        assert_eq!(entry.run.started_at_ms, Some(NOW + 100));
        let (owner, _) = submitted
            .iter()
            .find(|(_, id)| *id == entry.run.id)
            .unwrap();
        assert_eq!(entry.owner, *owner);
        assert_eq!(
            entry.input.as_deref(),
            Some(format!("question for {}", entry.run.id).as_str())
        );
        assert_eq!(entry.request_id, Some(format!("request-{}", entry.run.id)));
    }
    claimed.sort_by_key(|(_, entry)| entry.run.id.to_string());
    claimed.dedup_by_key(|(_, entry)| entry.run.id);
    assert_eq!(claimed.len(), RUNS, "no run claimed twice");

    // Oldest first: a single claimer gets them in submission order.
    let owner = user(store).await;
    let mut order = Vec::new();
    for i in 0..3 {
        let thread_id = thread(store, owner).await;
        order.push(submit(store, owner, thread_id, NOW + 10 - i, 3).await.0);
    }
    let batch = store.claim_queued_runs("solo", 10, NOW).await.unwrap();
    let got: Vec<RunId> = batch.iter().map(|entry| entry.run.id).collect();
    order.reverse();
    assert_eq!(got, order);
}

/// A claimed run's heartbeat keeps it off the sweep; once stale it is found, queued again
/// by exactly one of many racing sweepers, claimed as a second attempt with its log
/// position, and a queued run can be ended only while no instance has claimed it.
/// A run claimed as it is submitted (its instance has room) is the instance's from the
/// start: running, first attempt, never handed to another claimer, counted against the
/// user's limits, and recovered like any claimed run if its instance goes silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_claimed_at_submission_belongs_to_its_instance_alone() {
    let db = test_store().await;
    let store = &*db.store;
    let owner = user(store).await;
    let thread_id = thread(store, owner).await;
    let (id, outcome) = submit_as(store, owner, thread_id, NOW, 1, Some("here")).await;
    assert_eq!(
        outcome,
        SubmitOutcome::Claimed {
            approval_required: false
        }
    );
    let run = store.get_run(owner, id).await.unwrap().expect("stored");
    assert_eq!(run.status, RunStatus::Running);
    assert_eq!(run.started_at_ms, Some(NOW));
    assert!(store
        .claim_queued_runs("elsewhere", 10, NOW + 1)
        .await
        .unwrap()
        .is_empty());
    // It counts: with a limit of one, the user's next run is refused.
    let (_, second) = submit(store, owner, thread(store, owner).await, NOW + 2, 1).await;
    assert_eq!(second, SubmitOutcome::TooManyRuns);
    // Its heartbeat starts at submission; silent since, it is stale and can be requeued.
    assert!(store.stale_runs(NOW).await.unwrap().is_empty());
    let stale = store.stale_runs(NOW + 1).await.unwrap();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].run.id, id);
    assert_eq!(stale[0].attempts, 1);
    assert_eq!(stale[0].instance.as_deref(), Some("here"));
    assert!(store.requeue_run(id, Some("here")).await.unwrap());
    let again = store
        .claim_queued_runs("elsewhere", 10, NOW + 3)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].run.id, id);
    assert_eq!(again[0].attempts, 2);
    assert_eq!(
        again[0].input.as_deref(),
        Some(&*format!("question for {id}"))
    );
}

/// While runs wait in the queue a new run is not claimed at submission, even with room:
/// it queues behind them, so the waiting are not overtaken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_run_does_not_overtake_runs_waiting_in_the_queue() {
    let db = test_store().await;
    let store = &*db.store;
    let owner = user(store).await;
    let (waiting, first) = submit(store, owner, thread(store, owner).await, NOW, 10).await;
    assert_eq!(first, SubmitOutcome::Queued);
    let (newer, outcome) = submit_as(
        store,
        owner,
        thread(store, owner).await,
        NOW + 1,
        10,
        Some("here"),
    )
    .await;
    assert_eq!(outcome, SubmitOutcome::Queued);
    let claimed: Vec<RunId> = store
        .claim_queued_runs("here", 10, NOW + 2)
        .await
        .unwrap()
        .iter()
        .map(|e| e.run.id)
        .collect();
    assert_eq!(claimed, vec![waiting, newer]);
    // The queue is empty again: the next submission with room is claimed at once.
    let (_, next) = submit_as(
        store,
        owner,
        thread(store, owner).await,
        NOW + 3,
        10,
        Some("here"),
    )
    .await;
    assert_eq!(
        next,
        SubmitOutcome::Claimed {
            approval_required: false
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_runs_are_requeued_once_and_claimed_again() {
    let db = test_store().await;
    let store = &*db.store;
    let owner = user(store).await;
    let thread_id = thread(store, owner).await;
    let (id, _) = submit(store, owner, thread_id, NOW, 3).await;
    let (waiting, _) = submit(store, owner, thread(store, owner).await, NOW + 1, 3).await;
    let first = store
        .claim_queued_runs("doomed", 1, NOW + 10)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].run.id, id);
    // Unclaimed queued runs are never stale: they are waiting, not lost.
    assert!(store
        .stale_runs(NOW + 1_000_000)
        .await
        .unwrap()
        .iter()
        .all(|e| e.run.id != waiting));

    store
        .append_event(owner, id, 1, "{\"seq\":1}", NOW + 11)
        .await
        .unwrap();
    store
        .append_event(owner, id, 2, "{\"seq\":2}", NOW + 12)
        .await
        .unwrap();
    // An appended event is proof of life too.
    assert!(store.stale_runs(NOW + 12).await.unwrap().is_empty());
    assert_eq!(store.stale_runs(NOW + 13).await.unwrap().len(), 1);
    store
        .heartbeat_runs("doomed", &[id], NOW + 500)
        .await
        .unwrap();
    // Another instance's heartbeat cannot refresh it.
    store
        .heartbeat_runs("impostor", &[id], NOW + 5_000)
        .await
        .unwrap();
    assert!(store.stale_runs(NOW + 400).await.unwrap().is_empty());
    let stale = store.stale_runs(NOW + 1_000).await.unwrap();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].run.id, id);
    assert_eq!(stale[0].instance.as_deref(), Some("doomed"));
    assert_eq!(stale[0].attempts, 1);

    let wins = futures_util::future::join_all((0..RACERS).map(|_| {
        let store = Arc::clone(&db.store);
        async move { store.requeue_run(id, Some("doomed")).await.unwrap() }
    }))
    .await;
    assert_eq!(wins.iter().filter(|w| **w).count(), 1);
    let requeued = store.get_run(owner, id).await.unwrap().unwrap();
    assert_eq!(requeued.status, RunStatus::Queued);
    assert!(store.stale_runs(i64::MAX).await.unwrap().is_empty());

    let again = store
        .claim_queued_runs("survivor", 1, NOW + 2_000)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].run.id, id, "the older run first");
    assert_eq!(again[0].attempts, 2);
    assert_eq!(
        again[0].run.last_seq, 2,
        "the next attempt continues the log"
    );
    assert_eq!(
        again[0].run.started_at_ms,
        Some(NOW + 10),
        "first start kept"
    );

    // Ending a queued run: only while unclaimed, and only by its owner.
    let stranger = user(store).await;
    assert!(!store
        .finish_unclaimed_run(stranger, waiting, RunStatus::Cancelled, "x", NOW)
        .await
        .unwrap());
    assert!(
        !store
            .finish_unclaimed_run(owner, id, RunStatus::Cancelled, "x", NOW)
            .await
            .unwrap(),
        "claimed runs are stopped by their instance"
    );
    assert!(store
        .finish_unclaimed_run(
            owner,
            waiting,
            RunStatus::Cancelled,
            "CANCELLED: stopped",
            NOW + 3_000
        )
        .await
        .unwrap());
    let cancelled = store.get_run(owner, waiting).await.unwrap().unwrap();
    assert_eq!(cancelled.status, RunStatus::Cancelled);
    assert_eq!(cancelled.finished_at_ms, Some(NOW + 3_000));
    assert!(store
        .claim_queued_runs("late", 10, NOW + 4_000)
        .await
        .unwrap()
        .is_empty());

    // A run stored without its input (before the queue) is never queued again.
    let legacy = run_on(store, owner, Some("gone")).await;
    let stale = store.stale_runs(i64::MAX).await.unwrap();
    let entry = stale.iter().find(|e| e.run.id == legacy).unwrap();
    assert!(entry.input.is_none());
    assert!(!store.requeue_run(legacy, Some("gone")).await.unwrap());
    assert!(store
        .claim_run(legacy, Some("gone"), "survivor")
        .await
        .unwrap());
}

async fn run_on(store: &dyn Store, owner: UserId, instance: Option<&str>) -> RunId {
    let id = RunId::generate();
    let thread_id = thread(store, owner).await;
    store
        .create_run_on(
            owner,
            &RunRecord {
                id,
                thread_id,
                status: RunStatus::Running,
                created_at_ms: NOW,
                started_at_ms: None,
                finished_at_ms: None,
                error: None,
                last_seq: 0,
            },
            instance,
        )
        .await
        .expect("create run");
    id
}

/// Submits a message on `thread_id` with `strategy`, its metadata naming its run as the
/// server's do.
async fn submit_with(
    store: &dyn Store,
    owner: UserId,
    thread_id: ThreadId,
    strategy: apex_protocol::threads::MultitaskStrategy,
) -> (RunId, SubmitOutcome) {
    let id = RunId::generate();
    let mut message = message(thread_id, &format!("question for {id}"));
    message.metadata = json!({ "run_id": id.to_string() });
    let run = RunRecord {
        id,
        thread_id,
        status: RunStatus::Queued,
        created_at_ms: NOW,
        started_at_ms: None,
        finished_at_ms: None,
        error: None,
        last_seq: 0,
    };
    let outcome = store
        .submit_run(
            owner,
            &RunSubmission {
                message: &message,
                run: &run,
                request_id: "request",
                max_unfinished: 3,
                claim_by: None,
                new_thread: None,
                strategy,
                require_approval: None,
            },
        )
        .await
        .expect("submit run");
    (id, outcome)
}

/// A run rolled back by a newer message is removed right after its end (`settle`); when
/// its process stopped in between, the sweep removes it later with its answer and events,
/// and leaves every other run alone.
#[tokio::test]
async fn rolled_back_runs_left_behind_are_swept_with_their_answer_and_events() {
    use apex_protocol::threads::MultitaskStrategy;
    let db = test_store().await;
    let store = db.store.as_ref();
    let owner = user(store).await;
    let thread_id = thread(store, owner).await;
    let (first, _) = submit_with(store, owner, thread_id, MultitaskStrategy::Enqueue).await;
    store
        .append_event(owner, first, 1, "{\"seq\":1}", NOW)
        .await
        .unwrap();
    let (second, outcome) = submit_with(store, owner, thread_id, MultitaskStrategy::Rollback).await;
    assert!(matches!(outcome, SubmitOutcome::Superseding(ref runs) if runs.len() == 1));
    // The first run answered and ended, but its process stopped before removing it.
    let mut answer = message(thread_id, "the rolled-back answer");
    answer.role = "assistant".into();
    answer.metadata = json!({ "run_id": first.to_string() });
    assert!(store.insert_message(owner, &answer).await.unwrap());
    store
        .set_run_status(
            owner,
            first,
            RunStatus::Cancelled,
            Some("CANCELLED"),
            NOW + 10,
        )
        .await
        .unwrap();
    // Another user's ended run, and the new run, are not the sweep's.
    let other = user(store).await;
    let other_thread = thread(store, other).await;
    let bystander = run(store, other, other_thread).await;
    store
        .set_run_status(other, bystander, RunStatus::Cancelled, Some("x"), NOW + 10)
        .await
        .unwrap();

    assert_eq!(
        store.sweep_rolled_back_runs(NOW).await.unwrap(),
        0,
        "not ended before"
    );
    assert_eq!(store.sweep_rolled_back_runs(NOW + 1000).await.unwrap(), 1);
    assert!(store.get_run(owner, first).await.unwrap().is_none());
    assert!(store
        .list_events(owner, first, 0, 100)
        .await
        .unwrap()
        .is_empty());
    let (messages, total) = store.list_messages(owner, thread_id, 100, 0).await.unwrap();
    assert_eq!(total, 1, "{messages:?}");
    assert_eq!(messages[0].metadata["run_id"], second.to_string());
    assert!(store.get_run(owner, second).await.unwrap().is_some());
    assert!(store.get_run(other, bystander).await.unwrap().is_some());
    assert_eq!(store.sweep_rolled_back_runs(NOW + 1000).await.unwrap(), 0);
}
