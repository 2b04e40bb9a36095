//! Micro-benchmarks of the per-event hot paths (`cargo bench -p apex-server`):
//!
//! - `encode_event`: building an event and serialising it to its wire JSON and to the shorter
//!   form the event log keeps (once per event);
//! - `emit`: `UserEmitter::emit` and `flush` end to end against a temporary SQLite
//!   database — persist (group commit), then publish to two subscribed connections — one
//!   run alone, one run emitting a burst of 8 (one append), and 50 runs emitting at once
//!   (where group commit batches);
//! - `client_frame`: parsing client frames;
//! - `analysis`: what a run's data and optimization agents read of the user's usage (the
//!   30-day summary and the savings simulation's input), on a month of demo data and on a
//!   month twenty times as busy, from the store's rollups.
//!
//! See docs/benchmarks.md for the figures and for the whole-server benchmark.

use std::sync::Arc;
use std::time::Duration;

use apex_protocol::events::EventBody;
use apex_protocol::threads::RunStatus;
use apex_server::auth::{AuthLifetimes, Authenticator, PasswordHasher};
use apex_server::context::UserExecutionContext;
use apex_server::events::{encode_event, EventBus, InProcessBus, UserEmitter};
use apex_server::ids::{RequestId, RunId, ThreadId, UserId};
use apex_server::settings::{PasswordHashing, Secret};
use apex_server::store::{sqlite::SqliteStore, RunRecord, Store, ThreadRecord};
use apex_server::user_store::UserStore;
use apex_server::ws::frames;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use serde_json::json;

fn thinking() -> EventBody {
    EventBody::AgentThinking {
        reasoning: "Simulating routing, caching, batching and output caps on your traffic".into(),
        step_number: 2,
        total_steps: 3,
    }
}

fn tool_completed() -> EventBody {
    EventBody::ToolCompleted {
        tool_name: "usage_summary".into(),
        tool_call_id: "call_0123456789abcdef0123456789abcdef".into(),
        result: json!({
            "total_requests": 1834, "total_cost_usd": 41.237512, "models": 4, "workloads": 4,
            "by_model": [{"model": "gpt-4o", "cost_usd": 30.1}, {"model": "gpt-4o-mini", "cost_usd": 2.2}],
        }),
        execution_time_ms: 3,
        success: true,
    }
}

fn partial() -> EventBody {
    EventBody::PartialResult {
        content: "Over the last 30 ".into(),
    }
}

fn encode(c: &mut Criterion) {
    let ids = (UserId::generate(), ThreadId::generate(), RunId::generate());
    let mut group = c.benchmark_group("encode_event");
    for (name, body) in [
        ("partial_result", partial as fn() -> EventBody),
        ("agent_thinking", thinking),
        ("tool_completed", tool_completed),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                body,
                |body| encode_event(ids, 7, "optimization", body).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// A store in a temporary folder, a bus, and a way to make runs of one registered user.
struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    bus: Arc<dyn EventBus>,
    user: apex_server::auth::AuthenticatedUser,
    thread: ThreadId,
}

impl Fixture {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&url).await.unwrap());
        let auth = Authenticator::new(
            Arc::clone(&store),
            &Secret::new("a benchmark secret of at least 32 characters"),
            PasswordHasher::new(PasswordHashing::Light),
            AuthLifetimes {
                access: Duration::from_secs(900),
                refresh: Duration::from_secs(3600),
                ticket: Duration::from_secs(60),
                session: Duration::from_secs(3600),
            },
        );
        let (_, user) = auth
            .register("bench@example.com", "a long password", None, None)
            .await
            .unwrap();
        let thread = ThreadId::generate();
        UserStore::for_user(Arc::clone(&store), &user)
            .create_thread(&ThreadRecord {
                id: thread,
                title: "bench".into(),
                metadata: json!({}),
                created_at_ms: 0,
                updated_at_ms: 0,
                message_count: 0,
            })
            .await
            .unwrap();
        Self {
            _dir: dir,
            store,
            bus: Arc::new(InProcessBus::new()),
            user,
            thread,
        }
    }

    async fn emitter(&self) -> UserEmitter {
        let run = RunId::generate();
        let ctx = UserExecutionContext::new(
            &self.user,
            self.thread,
            run,
            RequestId::generate(),
            Duration::from_secs(3600),
            Duration::from_secs(3600),
        );
        UserStore::for_user(Arc::clone(&self.store), &self.user)
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
            .unwrap();
        UserEmitter::new(&ctx, Arc::clone(&self.store), Arc::clone(&self.bus))
    }

    /// Two connections of the user, draining their feed like a socket would.
    fn subscribe(&self) {
        for _ in 0..2 {
            let mut subscription = self.bus.subscribe(self.user.user_id());
            tokio::spawn(async move { while subscription.recv().await.is_ok() {} });
        }
    }
}

fn emit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (fixture, one, many) = runtime.block_on(async {
        let fixture = Fixture::new().await;
        fixture.subscribe();
        let one = fixture.emitter().await;
        let mut many = Vec::new();
        for _ in 0..50 {
            many.push(Arc::new(fixture.emitter().await));
        }
        (fixture, one, many)
    });
    let mut group = c.benchmark_group("emit");
    group.sample_size(20);
    group.throughput(Throughput::Elements(1));
    // Each iteration waits until its events are stored and published (`flush`): `emit`
    // alone only queues them.
    group.bench_function("one_run", |b| {
        b.to_async(&runtime).iter(|| async {
            one.emit("data", thinking()).await.unwrap();
            one.flush().await.unwrap()
        })
    });
    group.throughput(Throughput::Elements(8));
    group.bench_function("one_run_burst_of_8", |b| {
        b.to_async(&runtime).iter(|| async {
            for _ in 0..8 {
                one.emit("data", thinking()).await.unwrap();
            }
            one.flush().await.unwrap()
        })
    });
    group.throughput(Throughput::Elements(many.len() as u64));
    group.bench_function("50_runs_at_once", |b| {
        b.to_async(&runtime).iter(|| async {
            let tasks: Vec<_> = many
                .iter()
                .map(|emitter| {
                    let emitter = Arc::clone(emitter);
                    tokio::spawn(async move {
                        emitter.emit("data", thinking()).await.unwrap();
                        emitter.flush().await.unwrap()
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        })
    });
    group.finish();
    drop(fixture);
}

fn client_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_frame");
    for (name, raw) in [
        (
            "user_message",
            r#"{"type":"user_message","payload":{"text":"How can I reduce my LLM costs?","thread_id":"0d6f1c2e-3b7a-4f7e-9a51-2f8d9c0b1e42"}}"#,
        ),
        (
            "resume",
            r#"{"type":"resume","run_id":"55fa590a-8c55-4b18-9b75-6944c1ef1cad","after_seq":12}"#,
        ),
        ("ping", r#"{"type":"ping"}"#),
    ] {
        group.bench_function(name, |b| b.iter(|| frames::parse(raw).unwrap()));
    }
    group.finish();
}

fn analysis(c: &mut Criterion) {
    use apex_server::agents::optimization::gather;
    use apex_server::usage::price_book::PriceBook;
    use apex_server::usage::pricing::PricingTable;
    use apex_server::usage::{demo, summary_for};

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pricing = PricingTable::builtin();
    let book = PriceBook::builtin(&pricing);
    // 2025-11-20T13:00:00Z: mid-day, so the window has partial days at both edges.
    let now = 1_763_643_600_000_i64;
    let mut group = c.benchmark_group("analysis");
    for (name, copies) in [("demo_month", 1), ("busy_month", 20)] {
        let fixture = runtime.block_on(Fixture::new());
        let users = UserStore::for_user(Arc::clone(&fixture.store), &fixture.user);
        // Demo data is drawn from the user's id: a fixed one gives every build the same rows.
        let seed = UserId::parse("00000000-0000-4000-8000-00000000a9e8").unwrap();
        let month = demo::generate(seed, now, &book);
        let rows: Vec<_> = (0..copies)
            .flat_map(|copy| {
                month.iter().map(move |row| {
                    let mut row = row.clone();
                    row.ts_ms -= copy;
                    row.source_ref = None;
                    row
                })
            })
            .collect();
        runtime.block_on(users.insert_usage(&rows)).unwrap();
        let since = now - 30 * 24 * 3600 * 1000;
        group.bench_function(format!("{name}_{}_rows", rows.len()), |b| {
            b.to_async(&runtime).iter(|| async {
                summary_for(&users, 30, now).await.unwrap();
                gather(&users, since, &pricing).await.unwrap();
            })
        });
    }
    group.finish();
}

criterion_group!(benches, encode, emit, client_frame, analysis);
criterion_main!(benches);
