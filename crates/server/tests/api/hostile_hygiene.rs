//! Attacks on the server's hygiene (security review, issue 22): money and token values that
//! would break the usage figures, imports past the per-user quota or big enough to hold the
//! database's writer, frames injected into the Redis bus, and WebSocket upgrades from a
//! DNS-rebound page.

use std::time::Duration;

use apex_server::ids::{RunId, UserId};
use apex_server::settings::Secret;
use apex_server::store::{ImportOutcome, ImportPlan, UsageRow};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{spawn_app_with, TestApp, TestUser, JWT_SECRET};

/// One usage row as the upload takes it, an hour ago.
fn row(model: &str, workload: &str, cost: Value) -> Value {
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    json!({
        "provider": "acme", "model": model, "workload": workload,
        "timestamp": hour_ago.to_rfc3339(),
        "prompt_tokens": 10, "completion_tokens": 5, "latency_ms": 100,
        "cost_usd": cost,
    })
}

fn rows(n: usize, workload: &str) -> Value {
    Value::Array(
        (0..n)
            .map(|_| row("acme-1", workload, json!(0.01)))
            .collect(),
    )
}

async fn import(app: &TestApp, user: &TestUser, body: &Value) -> (u16, Value) {
    let response = app
        .post_json("/api/usage/events", Some(user.token()), body)
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn stored(app: &TestApp, user: &TestUser) -> u64 {
    let owner = UserId::parse(&user.id).unwrap();
    app.state.infra.store.count_usage(owner).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_cost_of_1_7e308_is_refused_and_the_summary_stays_finite() {
    let app = spawn_app_with(|s| s.demo_data = false).await;
    let user = app.register().await;
    // serde_json reads 1.7e308 as a finite f64: the bound, not the parser, refuses it.
    let body = json!([
        row("acme-1", "w", json!(1.0)),
        row("acme-1", "w", json!(1.7e308))
    ]);
    let (status, refused) = import(&app, &user, &body).await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(refused["error"]["code"], "validation_failed");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("row 1") && message.contains("cost_usd"),
        "names the row and the field: {message}"
    );
    assert_eq!(
        stored(&app, &user).await,
        0,
        "nothing of the batch was stored"
    );
    let csv = app
        .http
        .post(app.url("/api/usage/events"))
        .bearer_auth(user.token())
        .header("Content-Type", "text/csv")
        .body(
            "provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms,status,cost_usd\n\
             acme,acme-1,w,2026-11-01T10:00:00Z,1,1,1,ok,1e309\n",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 422, "infinity from CSV is refused too");
    let huge_tokens = json!([{
        "provider": "acme", "model": "acme-1", "workload": "w",
        "timestamp": "2026-11-01T10:00:00Z", "prompt_tokens": 10_000_000_000i64,
        "completion_tokens": 1, "latency_ms": 1, "cost_usd": 1.0
    }]);
    let (status, refused) = import(&app, &user, &huge_tokens).await;
    assert_eq!(status, 422);
    assert!(refused["error"]["message"]
        .as_str()
        .unwrap()
        .contains("row 0: prompt_tokens"));

    // Rows stored before the bound existed (written here past the validation) must not
    // turn the figures into `null`, or fail them.
    let owner = UserId::parse(&user.id).unwrap();
    let legacy = UsageRow {
        provider: "acme".into(),
        model: "legacy".into(),
        workload: "w".into(),
        ts_ms: apex_server::clock::now_ms() - 3_600_000,
        prompt_tokens: 1,
        completion_tokens: 1,
        latency_ms: 1,
        status: "ok".into(),
        cost_usd: 1.7e308,
        ..UsageRow::default()
    };
    app.state
        .infra
        .store
        .insert_usage(owner, &[legacy.clone(), legacy])
        .await
        .unwrap();
    let summary = app.get("/api/usage/summary?days=7", user.token()).await;
    assert_eq!(summary.status(), 200);
    let summary: Value = summary.json().await.unwrap();
    let total = summary["total_cost_usd"].as_f64();
    assert!(
        total.is_some_and(|t| t.is_finite() && t > 1e12),
        "a finite, huge total, not null or zero: {summary}"
    );
    for model in summary["by_model"].as_array().unwrap() {
        assert!(model["cost_usd"].as_f64().is_some(), "{model}");
    }
    let daily = app.get("/api/usage/daily?days=7", user.token()).await;
    assert_eq!(daily.status(), 200);
    let daily: Value = daily.json().await.unwrap();
    for day in daily["series"].as_array().unwrap() {
        assert!(day["cost_usd"].as_f64().is_some(), "{day}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_past_the_row_quota_is_refused_whole_and_stores_nothing() {
    let app = spawn_app_with(|s| {
        s.demo_data = false;
        s.limits.import_row_quota = 2_500;
    })
    .await;
    let user = app.register().await;
    let other = app.register().await;
    // Three chunks of 1,000 (the last short): within the quota.
    let (status, body) = import(&app, &user, &rows(2_400, "first")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["inserted"], 2_400);
    let (status, body) = import(&app, &user, &rows(101, "second")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "import_quota_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("2500") && message.contains("2400 stored"),
        "{message}"
    );
    assert_eq!(stored(&app, &user).await, 2_400, "nothing of it was stored");
    // Exactly up to the quota is fine; one more is not.
    let (status, _) = import(&app, &user, &rows(100, "third")).await;
    assert_eq!(status, 201);
    let (status, _) = import(&app, &user, &rows(1, "fourth")).await;
    assert_eq!(status, 409);
    assert_eq!(stored(&app, &user).await, 2_500);
    // The quota is per user.
    let (status, _) = import(&app, &user, &rows(1, "x")).await;
    assert_eq!(status, 409);
    let (status, _) = import(&app, &other, &rows(2_000, "x")).await;
    assert_eq!(status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_imports_of_one_user_never_pass_the_quota_or_store_half() {
    let app = spawn_app_with(|s| s.demo_data = false).await;
    let user = app.register().await;
    let owner = UserId::parse(&user.id).unwrap();
    let plan = ImportPlan {
        quota: 5_000,
        chunk_rows: 500,
        now_ms: apex_server::clock::now_ms(),
    };
    let batch: Vec<UsageRow> = (0..2_000)
        .map(|i| UsageRow {
            provider: "acme".into(),
            model: "acme-1".into(),
            workload: "w".into(),
            ts_ms: plan.now_ms - i,
            prompt_tokens: 1,
            completion_tokens: 1,
            latency_ms: 1,
            status: "ok".into(),
            cost_usd: 0.01,
            ..UsageRow::default()
        })
        .collect();
    // Four imports of 2,000 rows at once: at most two fit. Each checks the quota before
    // its first chunk and again after its last; which ones are kept depends on how their
    // chunks interleave (even none, if all see the others' chunks at their last check).
    let imports = (0..4).map(|_| {
        let store = app.state.infra.store.clone();
        let batch = batch.clone();
        tokio::spawn(async move { store.import_usage(owner, &batch, &plan).await.unwrap() })
    });
    let mut kept = 0;
    for outcome in futures_util::future::join_all(imports).await {
        match outcome.unwrap() {
            ImportOutcome::Stored(n) => {
                assert_eq!(n, 2_000);
                kept += n;
            }
            ImportOutcome::OverQuota { quota, .. } => assert_eq!(quota, 5_000),
        }
    }
    assert_eq!(
        stored(&app, &user).await,
        kept,
        "every import is stored whole or not at all"
    );
    assert!(kept <= 4_000, "at most two fit: {kept}");
    // The refused ones left nothing behind that counts: the rest of the quota is usable.
    let rest = usize::try_from(5_000 - kept).unwrap();
    let fill = &batch[..1]
        .iter()
        .cycle()
        .take(rest)
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(
        app.state
            .infra
            .store
            .import_usage(owner, fill, &plan)
            .await
            .unwrap(),
        ImportOutcome::Stored(rest as u64)
    );
    assert_eq!(stored(&app, &user).await, 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_big_import_does_not_hold_the_writer_against_another_users_small_write() {
    let app = spawn_app_with(|s| s.demo_data = false).await;
    let (big, small) = (app.register().await, app.register().await);
    let total = apex_server::usage::import::MAX_ROWS_PER_UPLOAD;
    let body = rows(total, "big");
    let request = app
        .http
        .post(app.url("/api/usage/events"))
        .bearer_auth(big.token())
        .json(&body)
        .send();
    let upload = tokio::spawn(request);
    // Wait until the big import is being written: its first chunks are visible.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while stored(&app, &big).await == 0 {
        assert!(
            !upload.is_finished(),
            "the import ended before any of its rows was seen"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the import never started"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Another user's one-row write goes through between two chunks, not after the import.
    let (status, body) = import(&app, &small, &rows(1, "small")).await;
    assert_eq!(status, 201, "{body}");
    let big_rows_then = stored(&app, &big).await;
    assert!(
        big_rows_then < total as u64,
        "the small write waited for the whole import ({big_rows_then} rows of it stored)"
    );
    let response = upload.await.unwrap().unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(stored(&app, &big).await, total as u64);
}

type HmacSha256 = Hmac<Sha256>;

/// What an instance of the deployment whose JWT secret is `secret` publishes: the MAC,
/// computed here from the documented scheme, not with the server's code.
fn sealed(secret: &str, channel: &str, body: &str) -> String {
    let mut derive = HmacSha256::new_from_slice(secret.as_bytes()).unwrap();
    derive.update(b"apex-bus-v1");
    let key = derive.finalize().into_bytes();
    let mut mac = HmacSha256::new_from_slice(&key).unwrap();
    mac.update(format!("{channel}\n{body}").as_bytes());
    let tag: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("v1.{tag}\n{body}")
}

fn redis_url() -> String {
    std::env::var("APEX_TEST_REDIS_URL").unwrap_or_else(|_| {
        crate::helpers::missing_prerequisite(
            "Redis",
            "set APEX_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379)",
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frames_without_a_valid_mac_never_reach_a_socket() {
    let url = redis_url();
    // Each test runs in a process of its own (nextest): this recorder sees this test only.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("no other recorder in this process");
    let prefix = format!("hygiene-{}", uuid::Uuid::new_v4().simple());
    let app = {
        let prefix = prefix.clone();
        let url = url.clone();
        spawn_app_with(move |s| {
            s.bus_url = Some(Secret::new(url));
            s.bus_channel_prefix = prefix;
        })
        .await
    };
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !app.state.infra.bus.health().connected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bus never connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = format!("{prefix}:events");
    let control = format!("{prefix}:control");
    let body = |marker: &str| {
        format!(
            "intruder\n{}\n{}\n1\n0\n{}",
            user.id,
            RunId::generate(),
            json!({"type": marker})
        )
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let forged = [
        // No MAC: the frame format of before.
        body("forged"),
        // A MAC under another deployment's secret.
        sealed(
            "another deployment's secret, 32+ chars",
            &events,
            &body("forged"),
        ),
        // The right key, for the other channel.
        sealed(JWT_SECRET, &control, &body("forged")),
        // A right MAC, for another body.
        sealed(JWT_SECRET, &events, &body("genuine")).replace("genuine", "forged"),
    ];
    for payload in forged
        .iter()
        .chain([&sealed(JWT_SECRET, &events, &body("genuine"))])
    {
        redis::cmd("PUBLISH")
            .arg(&events)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await
            .unwrap();
    }
    // Redis keeps one publisher's order: any forged frame delivered would come first.
    loop {
        let frame = ws.next_json().await;
        assert_ne!(frame["type"], "forged", "an injected frame was delivered");
        if frame["type"] == "genuine" {
            break;
        }
    }
    // Handled in order, so the four were counted before the genuine one was delivered.
    let rendered = metrics.render();
    let rejected = rendered
        .lines()
        .find_map(|line| line.strip_prefix("apex_bus_frames_rejected_total "))
        .and_then(|value| value.trim().parse::<f64>().ok());
    assert_eq!(rejected, Some(4.0), "{rendered}");
}

/// Opens `/ws` as a browser page of `origin` whose request names `host`; the HTTP status
/// of a refusal, `None` if it opened.
async fn upgrade_status(app: &TestApp, user: &TestUser, origin: &str, host: &str) -> Option<u16> {
    let mut request = app.ws_address.as_str().into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "Authorization",
        format!("Bearer {}", user.token()).parse().unwrap(),
    );
    headers.insert("Origin", origin.parse().unwrap());
    headers.insert("Host", host.parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => None,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Some(response.status().as_u16())
        }
        Err(other) => panic!("unexpected failure: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_rebound_page_cannot_open_the_websocket_and_loopback_pages_can() {
    let app = spawn_app_with(|_| {}).await;
    let user = app.register().await;
    let port = app.address.rsplit(':').next().unwrap().to_string();
    let evil = format!("evil.example:{port}");
    assert_eq!(
        upgrade_status(&app, &user, &format!("http://{evil}"), &evil).await,
        Some(403),
        "the page's own name in Origin and Host proves nothing"
    );
    let loopback = format!("127.0.0.1:{port}");
    for origin in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
        format!("http://[::1]:{port}"),
    ] {
        assert_eq!(
            upgrade_status(&app, &user, &origin, &loopback).await,
            None,
            "{origin}"
        );
    }
    // The ticket names a public origin, whatever the Host says.
    let ticket: Value = app
        .http
        .post(app.url("/api/websocket/ticket"))
        .bearer_auth(user.token())
        .header("Host", &evil)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ticket["websocket_url"], format!("ws://127.0.0.1:{port}/ws"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_public_origins_replace_the_loopback_default() {
    let app = spawn_app_with(|s| {
        s.public_origins = vec!["https://apex.example.com/".into()];
        s.cors_allowed_origins = vec!["https://partner.example".into()];
    })
    .await;
    let user = app.register().await;
    let port = app.address.rsplit(':').next().unwrap().to_string();
    let host = format!("127.0.0.1:{port}");
    assert_eq!(
        upgrade_status(&app, &user, "https://apex.example.com", &host).await,
        None
    );
    assert_eq!(
        upgrade_status(&app, &user, "https://partner.example", &host).await,
        None
    );
    assert_eq!(
        upgrade_status(&app, &user, &format!("http://{host}"), &host).await,
        Some(403)
    );
    let ticket = app.ticket(&user, json!({})).await;
    assert_eq!(ticket["websocket_url"], "wss://apex.example.com/ws");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_whose_later_chunk_fails_leaves_none_of_its_rows() {
    let app = spawn_app_with(|s| s.demo_data = false).await;
    let user = app.register().await;
    let owner = UserId::parse(&user.id).unwrap();
    let plan = ImportPlan {
        quota: 1_000_000,
        chunk_rows: 100,
        now_ms: apex_server::clock::now_ms(),
    };
    let mut batch: Vec<UsageRow> = (0..350)
        .map(|i| UsageRow {
            provider: "acme".into(),
            model: "acme-1".into(),
            workload: "w".into(),
            ts_ms: plan.now_ms - i,
            prompt_tokens: 1,
            completion_tokens: 1,
            latency_ms: 1,
            status: "ok".into(),
            cost_usd: 0.01,
            ..UsageRow::default()
        })
        .collect();
    // PostgreSQL cannot store U+0000 in text: the fourth chunk fails there, after three
    // were committed. (Uploads refuse NUL before the store; this row goes around that.)
    batch[320].model = "bad\0model".into();
    let outcome = app
        .state
        .infra
        .store
        .import_usage(owner, &batch, &plan)
        .await;
    match crate::helpers::backend() {
        apex_server::store::Backend::Postgres => {
            assert!(outcome.is_err(), "{outcome:?}");
            assert_eq!(
                stored(&app, &user).await,
                0,
                "the committed chunks were undone"
            );
        }
        apex_server::store::Backend::Sqlite => {
            assert_eq!(outcome.unwrap(), ImportOutcome::Stored(350));
            assert_eq!(stored(&app, &user).await, 350);
        }
    }
    // Nothing is left listed as unfinished for the sweep either way.
    assert_eq!(
        app.state
            .infra
            .store
            .sweep_abandoned_imports(i64::MAX)
            .await
            .unwrap(),
        0
    );
}
