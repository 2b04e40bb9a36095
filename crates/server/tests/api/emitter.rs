//! `UserEmitter` against the real store and the in-process bus. Events are pipelined: `emit`
//! queues, and the run's courier stores then publishes what has queued in one append. These
//! tests pin down what that must never change: every event is stored before anyone receives
//! it, a run's events arrive in seq order, the log has no hole when an append fails, and the
//! terminal event comes last and is delivered even when the store refuses it.

use std::sync::Arc;
use std::time::Duration;

use apex_protocol::events::EventBody;
use apex_protocol::threads::RunStatus;
use apex_server::auth::AuthenticatedUser;
use apex_server::context::UserExecutionContext;
use apex_server::events::{
    BusEvent, EmitError, EventBus, InProcessBus, UserEmitter, UserSubscription,
};
use apex_server::ids::{RequestId, RunId, ThreadId};
use apex_server::store::{RunRecord, Store, ThreadRecord};
use apex_server::user_store::UserStore;
use serde_json::json;

use crate::helpers::{authenticator, test_database, TestDatabase};

struct Fixture {
    store: Arc<dyn Store>,
    bus: Arc<InProcessBus>,
    user: AuthenticatedUser,
    thread: ThreadId,
    _database: TestDatabase,
}

impl Fixture {
    async fn new() -> Self {
        let database = test_database().await;
        let store = apex_server::open_store(&database.settings())
            .await
            .expect("open the store");
        let auth = authenticator(&store);
        let email = format!("emitter-{}@example.com", RunId::generate());
        let (_, user) = auth
            .register(&email, "a long enough password", None, None)
            .await
            .expect("register");
        let thread = ThreadId::generate();
        UserStore::for_user(Arc::clone(&store), &user)
            .create_thread(&ThreadRecord {
                id: thread,
                title: "emitter".into(),
                metadata: json!({}),
                created_at_ms: 0,
                updated_at_ms: 0,
                message_count: 0,
            })
            .await
            .expect("create thread");
        Self {
            store,
            bus: Arc::new(InProcessBus::new()),
            user,
            thread,
            _database: database,
        }
    }

    fn user_store(&self) -> UserStore {
        UserStore::for_user(Arc::clone(&self.store), &self.user)
    }

    /// A running run of the user, and the context its emitters are made from.
    async fn run(&self) -> UserExecutionContext {
        let run = RunId::generate();
        self.user_store()
            .create_run(&RunRecord {
                id: run,
                thread_id: self.thread,
                status: RunStatus::Running,
                created_at_ms: 0,
                started_at_ms: None,
                finished_at_ms: None,
                error: None,
                last_seq: 0,
            })
            .await
            .expect("create run");
        UserExecutionContext::new(
            &self.user,
            self.thread,
            run,
            RequestId::generate(),
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
    }

    fn emitter(&self, ctx: &UserExecutionContext, last_seq: u64) -> UserEmitter {
        let bus: Arc<dyn EventBus> = Arc::clone(&self.bus) as Arc<dyn EventBus>;
        UserEmitter::resuming(ctx, Arc::clone(&self.store), bus, last_seq)
    }

    async fn stored_seqs(&self, run: RunId) -> Vec<u64> {
        let events = self.user_store().list_events(run, 0, 1000).await.unwrap();
        events.iter().map(|e| e.seq).collect()
    }
}

fn thinking(step: u32) -> EventBody {
    EventBody::AgentThinking {
        reasoning: format!("step {step}"),
        step_number: step,
        total_steps: 0,
    }
}

fn finished() -> EventBody {
    EventBody::RunFinished {
        status: RunStatus::Completed,
        final_response: "done".into(),
        result: json!({}),
        execution_time_ms: 1,
        error: None,
    }
}

/// Receives until the terminal event, checking that each event is already stored when it
/// arrives.
async fn receive_until_terminal(
    mut subscription: UserSubscription,
    store: UserStore,
) -> Vec<Arc<BusEvent>> {
    let mut received = Vec::new();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), subscription.recv())
            .await
            .expect("an event in time")
            .expect("no lag, no resync");
        let stored = store
            .list_events(event.run_id, event.seq - 1, 1)
            .await
            .unwrap();
        if !event.terminal {
            assert_eq!(
                stored.first().map(|e| e.seq),
                Some(event.seq),
                "event {} was delivered before it was stored",
                event.seq
            );
        }
        let terminal = event.terminal;
        received.push(event);
        if terminal {
            return received;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_events_is_stored_before_it_is_delivered_in_seq_order() {
    // More than one append holds (`MAX_EVENTS_PER_APPEND`), and more than `emit` queues
    // before it waits.
    const EVENTS: u32 = 300;
    let fixture = Fixture::new().await;
    let ctx = fixture.run().await;
    let run = ctx.run_id();
    let receiver = tokio::spawn(receive_until_terminal(
        fixture.bus.subscribe(fixture.user.user_id()),
        fixture.user_store(),
    ));
    let emitter = fixture.emitter(&ctx, 0);
    for step in 1..=EVENTS {
        assert_eq!(
            emitter.emit("data", thinking(step)).await.unwrap(),
            u64::from(step),
            "seqs are handed out in order"
        );
    }
    let terminal = emitter
        .emit_terminal("supervisor", finished())
        .await
        .unwrap();
    assert_eq!(terminal, u64::from(EVENTS) + 1);

    let received = receiver.await.unwrap();
    let seqs: Vec<u64> = received.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=terminal).collect::<Vec<_>>(),
        "every event once, in order"
    );
    assert!(received.iter().all(|e| e.run_id == run));
    for (event, step) in received.iter().zip(1..=EVENTS) {
        assert!(
            event.json.contains(&format!("\"step {step}\"")),
            "event {} carries its own body",
            event.seq
        );
    }
    assert_eq!(
        fixture.stored_seqs(run).await,
        (1..=terminal).collect::<Vec<_>>()
    );
    let record = fixture.user_store().get_run(run).await.unwrap().unwrap();
    assert_eq!(record.last_seq, terminal);

    assert!(matches!(
        emitter.emit("data", thinking(0)).await,
        Err(EmitError::RunFinished)
    ));
    assert!(matches!(
        emitter.emit_terminal("supervisor", finished()).await,
        Err(EmitError::RunFinished)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_fails_is_dropped_whole_and_the_terminal_event_follows_the_stored_log() {
    let fixture = Fixture::new().await;
    let ctx = fixture.run().await;
    let run = ctx.run_id();
    let mut subscription = fixture.bus.subscribe(fixture.user.user_id());

    let first = fixture.emitter(&ctx, 0);
    for step in 1..=3 {
        first.emit("data", thinking(step)).await.unwrap();
    }
    first.flush().await.expect("stored");
    for seq in 1..=3 {
        assert_eq!(subscription.recv().await.unwrap().seq, seq);
    }

    // A second emitter that believes the log holds two events: its first append collides
    // with seq 3 and the store refuses it. Nothing of it is stored or delivered, and the
    // events queued behind it are dropped rather than stored after a hole.
    let second = fixture.emitter(&ctx, 2);
    assert_eq!(second.emit("data", thinking(10)).await.unwrap(), 3);
    for step in 11..13 {
        // Queued, or refused if the courier already met the failure: either way not stored.
        match second.emit("data", thinking(step)).await {
            Ok(_) | Err(EmitError::EarlierFailed(_)) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(matches!(
        second.flush().await,
        Err(EmitError::EarlierFailed(_))
    ));
    assert!(
        matches!(
            second.emit("data", thinking(20)).await,
            Err(EmitError::EarlierFailed(_))
        ),
        "after a failure the run emits nothing more"
    );
    assert_eq!(fixture.stored_seqs(run).await, vec![1, 2, 3]);
    let stored = fixture.user_store().list_events(run, 2, 1).await.unwrap();
    assert!(
        stored[0].json.contains("step 3"),
        "the first emitter's event 3 stands"
    );
    assert!(
        subscription.try_recv().is_none(),
        "nothing of the failed append was delivered"
    );

    // The terminal event takes the seq after the last one the emitter knows stored (3,
    // which is taken: refused too), and is delivered all the same.
    assert!(matches!(
        second.emit_terminal("supervisor", finished()).await,
        Err(EmitError::Storage(_))
    ));
    let terminal = subscription.recv().await.unwrap();
    assert!(terminal.terminal);
    assert_eq!(terminal.seq, 3);
    assert_eq!(fixture.stored_seqs(run).await, vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_emitting_at_once_each_keep_their_order() {
    const RUNS: usize = 8;
    const EVENTS: u32 = 40;
    let fixture = Fixture::new().await;
    let receiver = tokio::spawn({
        let mut subscription = fixture.bus.subscribe(fixture.user.user_id());
        async move {
            let mut by_run: std::collections::HashMap<RunId, Vec<u64>> = Default::default();
            let mut ended = 0;
            while ended < RUNS {
                let event = tokio::time::timeout(Duration::from_secs(30), subscription.recv())
                    .await
                    .expect("an event in time")
                    .expect("no lag");
                ended += usize::from(event.terminal);
                by_run.entry(event.run_id).or_default().push(event.seq);
            }
            by_run
        }
    });
    let mut tasks = Vec::new();
    for _ in 0..RUNS {
        let ctx = fixture.run().await;
        let emitter = fixture.emitter(&ctx, 0);
        tasks.push(tokio::spawn(async move {
            for step in 1..=EVENTS {
                emitter.emit("data", thinking(step)).await.unwrap();
                if step % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            emitter
                .emit_terminal("supervisor", finished())
                .await
                .unwrap();
            ctx.run_id()
        }));
    }
    let mut runs = Vec::new();
    for task in tasks {
        runs.push(task.await.unwrap());
    }
    let by_run = receiver.await.unwrap();
    for run in runs {
        let expected: Vec<u64> = (1..=u64::from(EVENTS) + 1).collect();
        assert_eq!(by_run[&run], expected, "run {run}: in order, none twice");
        assert_eq!(fixture.stored_seqs(run).await, expected);
    }
}
