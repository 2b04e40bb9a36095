//! Alerts, scheduled reports and webhooks: a rule raises at most one alert per period,
//! explained by a run of its owner; ticks missed while the server was down run once;
//! webhook messages are signed (Standard Webhooks), retried until the receiver takes them,
//! one logical delivery (one `webhook-id`) however many attempts, with a delivery log and
//! redelivery; and nobody reaches another user's rules, webhooks or deliveries.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_protocol::alerts::{Alert, AlertRule, Webhook, WebhookDelivery};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};

use crate::budgets::key;
use crate::helpers::{spawn_app_with, TestApp, TestUser};

/// What a receiver got: each request's headers and body.
type Received = Arc<Mutex<Vec<(HeaderMap, String)>>>;

/// A webhook receiver on loopback that answers 500 to its first `failures` requests and
/// 204 after. Its URL, and what it received.
async fn receiver(failures: usize) -> (String, Received) {
    let received: Received = Arc::default();
    let seen = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let seen = Arc::clone(&seen);
            async move {
                let mut seen = seen.lock().unwrap();
                seen.push((headers, body));
                if seen.len() <= failures {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// Alerts ticking fast, webhooks allowed on loopback, retries 100 ms apart.
async fn app() -> TestApp {
    spawn_app_with(|s| {
        s.alerts.poll_interval = Duration::from_millis(50);
        s.alerts.webhooks.allow_private_targets = true;
        s.alerts.webhooks.retry_delays = vec![Duration::from_millis(100); 3];
    })
    .await
}

async fn create_rule(app: &TestApp, user: &TestUser, body: Value) -> AlertRule {
    let response = app
        .post_json("/api/alerts/rules", Some(user.token()), &body)
        .await;
    assert_eq!(response.status(), 201, "create {body}");
    response.json().await.unwrap()
}

async fn create_webhook(app: &TestApp, user: &TestUser, url: &str) -> Webhook {
    let response = app
        .post_json("/api/webhooks", Some(user.token()), &json!({ "url": url }))
        .await;
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

async fn rules(app: &TestApp, user: &TestUser) -> Vec<AlertRule> {
    app.get("/api/alerts/rules", user.token())
        .await
        .json()
        .await
        .unwrap()
}

async fn alerts(app: &TestApp, user: &TestUser) -> Vec<Alert> {
    app.get("/api/alerts", user.token())
        .await
        .json()
        .await
        .unwrap()
}

async fn deliveries(app: &TestApp, user: &TestUser, hook: &str) -> Vec<WebhookDelivery> {
    app.get(&format!("/api/webhooks/{hook}/deliveries"), user.token())
        .await
        .json()
        .await
        .unwrap()
}

/// Polls `check` every 50 ms for up to 15 s; fails with `what`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Makes rule `id` due again at `due_ms` through the store's own compare-and-set (what
/// a tick does, so it counts as one of the rule's `ticks`), as if its schedule said so.
async fn make_due(app: &TestApp, rule: &AlertRule, due_ms: i64) {
    let current = chrono::DateTime::parse_from_rfc3339(&rule.next_tick_at)
        .unwrap()
        .timestamp_millis();
    let moved = app
        .state
        .infra
        .store
        .claim_alert_tick(&rule.id, current, due_ms, current)
        .await
        .unwrap();
    assert!(moved, "the rule's tick moved");
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[tokio::test]
async fn a_spend_alert_is_raised_once_per_period_explained_by_a_run_and_sent_to_page_and_webhook() {
    let mut app = app().await;
    let user = app.register().await;
    let mut ws = app.ws_connect(&user).await;
    let (url, received) = receiver(0).await;
    let hook = create_webhook(&app, &user, &url).await;
    assert!(hook.secret.as_deref().unwrap().starts_with("whsec_"));
    // The demo data spends far more than a cent a month.
    let rule = create_rule(
        &app,
        &user,
        json!({"kind": "spend_over", "threshold_usd": 0.01, "period": "month", "every": "hour"}),
    )
    .await;

    // Listed once recorded; linked to its run a moment later.
    let alert = eventually("the alert and its run", || async {
        alerts(&app, &user)
            .await
            .into_iter()
            .find(|a| a.run_id.is_some())
    })
    .await;
    assert_eq!(
        (alert.rule_id.as_str(), alert.kind.as_str()),
        (rule.id.as_str(), "spend_over")
    );
    assert!(alert.value.unwrap() > 0.01 && alert.threshold == Some(0.01));
    assert!(
        alert.title.contains("this month reached $"),
        "{}",
        alert.title
    );
    // The run that explains it is the user's, and answers.
    let run_id = alert.run_id.clone().expect("an explaining run");
    let run: Value = app
        .get(&format!("/api/runs/{run_id}"), user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        run["thread_id"].as_str(),
        alert.thread_id.as_deref(),
        "{run}"
    );
    // The page hears of it.
    let frame = ws.expect_type("alert").await;
    assert_eq!(frame["id"], alert.id.as_str());
    assert_eq!(frame["run_id"], run_id.as_str());
    // So does the webhook, signed.
    let (headers, body) = eventually("the webhook message", || async {
        received.lock().unwrap().first().cloned()
    })
    .await;
    let message: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(message["type"], "alert.fired");
    assert_eq!(message["data"]["id"], alert.id.as_str());
    let id = headers["webhook-id"].to_str().unwrap();
    let timestamp: i64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        headers["webhook-signature"].to_str().unwrap(),
        apex_server::alerts::webhooks::sign(hook.secret.as_deref().unwrap(), id, timestamp, &body)
    );

    // Ticked again in the same month: nothing new.
    let rule = rules(&app, &user).await.remove(0);
    assert_eq!(rule.ticks, 1);
    make_due(&app, &rule, now_ms()).await;
    // Two ticks taken, and the one `make_due` counted.
    eventually("the second tick", || async {
        (rules(&app, &user).await[0].ticks == 3).then_some(())
    })
    .await;
    assert_eq!(alerts(&app, &user).await.len(), 1, "one alert per period");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(received.lock().unwrap().len(), 1, "one webhook message");
    app.shutdown().await;
}

#[tokio::test]
async fn a_receiver_that_fails_twice_then_succeeds_gets_one_logical_delivery() {
    let mut app = app().await;
    let user = app.register().await;
    let (url, received) = receiver(2).await;
    let hook = create_webhook(&app, &user, &url).await;
    let response = app
        .post_json(
            &format!("/api/webhooks/{}/test", hook.id),
            Some(user.token()),
            &json!({}),
        )
        .await;
    assert_eq!(response.status(), 202);
    let queued: WebhookDelivery = response.json().await.unwrap();

    let delivered = eventually("the delivery", || async {
        deliveries(&app, &user, &hook.id)
            .await
            .into_iter()
            .find(|d| d.status == "delivered")
    })
    .await;
    assert_eq!(delivered.id, queued.id);
    assert_eq!(delivered.attempts, 3);
    let codes: Vec<_> = delivered
        .attempt_log
        .iter()
        .map(|a| a.status_code)
        .collect();
    assert_eq!(codes, [Some(500), Some(500), Some(204)]);
    // Nothing more after it was taken.
    tokio::time::sleep(Duration::from_millis(400)).await;
    {
        let received = received.lock().unwrap();
        assert_eq!(received.len(), 3);
        // One logical message: the same id and body on every attempt.
        for (headers, body) in received.iter() {
            assert_eq!(headers["webhook-id"].to_str().unwrap(), queued.id);
            assert_eq!(body, &received[0].1);
        }
    }

    // Redelivered on request: the same message id once more.
    let response = app
        .post_json(
            &format!(
                "/api/webhooks/{}/deliveries/{}/redeliver",
                hook.id, queued.id
            ),
            Some(user.token()),
            &json!({}),
        )
        .await;
    assert_eq!(response.status(), 202);
    eventually("the redelivery", || async {
        (received.lock().unwrap().len() == 4).then_some(())
    })
    .await;
    let log = eventually("the redelivery logged", || async {
        deliveries(&app, &user, &hook.id)
            .await
            .into_iter()
            .find(|d| d.status == "delivered" && d.attempts == 4)
    })
    .await;
    assert_eq!(log.attempt_log.len(), 4);
    assert_eq!(
        received.lock().unwrap()[3].0["webhook-id"]
            .to_str()
            .unwrap(),
        queued.id
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_receiver_that_never_answers_well_fails_after_the_retries() {
    let mut app = app().await;
    let user = app.register().await;
    let (url, received) = receiver(usize::MAX).await;
    let hook = create_webhook(&app, &user, &url).await;
    app.post_json(
        &format!("/api/webhooks/{}/test", hook.id),
        Some(user.token()),
        &json!({}),
    )
    .await;
    let failed = eventually("the failure", || async {
        deliveries(&app, &user, &hook.id)
            .await
            .into_iter()
            .find(|d| d.status == "failed")
    })
    .await;
    // The first attempt and one per retry delay (three in this test's settings).
    assert_eq!(failed.attempts, 4);
    assert_eq!(failed.next_attempt_at, None);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(received.lock().unwrap().len(), 4);
    app.shutdown().await;
}

#[tokio::test]
async fn ticks_missed_while_down_run_once_and_each_tick_starts_one_report() {
    let mut app = app().await;
    let user = app.register().await;
    let rule = create_rule(&app, &user, json!({"kind": "report", "every": "day"})).await;
    let first = eventually("the first report and its run", || async {
        alerts(&app, &user)
            .await
            .into_iter()
            .find(|a| a.run_id.is_some())
    })
    .await;
    assert_eq!(first.kind, "report");
    assert!(first.run_id.is_some());

    // As if every instance had been down for five days since the rule was due.
    let rule = rules(&app, &user)
        .await
        .into_iter()
        .find(|r| r.id == rule.id)
        .unwrap();
    make_due(&app, &rule, now_ms() - 5 * 24 * 3600 * 1000).await;
    // `make_due` counted one tick; the server takes one more.
    eventually("the tick on return", || async {
        (rules(&app, &user).await[0].ticks == 3).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rule = rules(&app, &user).await.remove(0);
    assert_eq!(rule.ticks, 3, "five missed days are one tick");
    let next = chrono::DateTime::parse_from_rfc3339(&rule.next_tick_at)
        .unwrap()
        .timestamp_millis();
    assert!(next > now_ms(), "the next tick is in the future");
    let reports = eventually("the second report's run", || async {
        let reports = alerts(&app, &user).await;
        reports
            .iter()
            .all(|a| a.run_id.is_some())
            .then_some(reports)
    })
    .await;
    assert_eq!(reports.len(), 2, "one report per tick");
    assert_ne!(reports[0].run_id, reports[1].run_id);
    app.shutdown().await;
}

#[tokio::test]
async fn rules_webhooks_and_deliveries_are_their_owners_alone() {
    let mut app = app().await;
    let (owner, stranger) = (app.register().await, app.register().await);
    let (url, _received) = receiver(0).await;
    let hook = create_webhook(&app, &owner, &url).await;
    let rule = create_rule(
        &app,
        &owner,
        json!({"kind": "spend_change", "percent": 500, "every": "day"}),
    )
    .await;
    let sent: WebhookDelivery = app
        .post_json(
            &format!("/api/webhooks/{}/test", hook.id),
            Some(owner.token()),
            &json!({}),
        )
        .await
        .json()
        .await
        .unwrap();

    let delete = |path: String, token: String| {
        let http = app.http.clone();
        let url = app.url(&path);
        async move {
            http.delete(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // The log pages: two more messages, read two and then the rest.
    for _ in 0..2 {
        let path = format!("/api/webhooks/{}/test", hook.id);
        let status = app
            .post_json(&path, Some(owner.token()), &json!({}))
            .await
            .status();
        assert_eq!(status, 202);
    }
    let page = |query: &'static str| {
        let path = format!("/api/webhooks/{}/deliveries?{query}", hook.id);
        let app = &app;
        let token = owner.token().to_string();
        async move {
            let page: Vec<WebhookDelivery> = app.get(&path, &token).await.json().await.unwrap();
            page.into_iter().map(|d| d.id).collect::<Vec<_>>()
        }
    };
    let (first, rest) = (page("limit=2").await, page("limit=2&offset=2").await);
    assert_eq!((first.len(), rest.len()), (2, 1));
    assert!(!first.contains(&rest[0]));

    // A stranger's view: nothing there.
    assert!(rules(&app, &stranger).await.is_empty());
    let hooks: Vec<Webhook> = app
        .get("/api/webhooks", stranger.token())
        .await
        .json()
        .await
        .unwrap();
    assert!(hooks.is_empty());
    let path = format!("/api/webhooks/{}/deliveries", hook.id);
    assert_eq!(app.get(&path, stranger.token()).await.status(), 404);
    let path = format!("/api/webhooks/{}/deliveries/{}/redeliver", hook.id, sent.id);
    let status = app
        .post_json(&path, Some(stranger.token()), &json!({}))
        .await
        .status();
    assert_eq!(status, 404);
    let path = format!("/api/webhooks/{}/test", hook.id);
    let status = app
        .post_json(&path, Some(stranger.token()), &json!({}))
        .await
        .status();
    assert_eq!(status, 404);
    let stranger_token = stranger.token().to_string();
    assert_eq!(
        delete(
            format!("/api/alerts/rules/{}", rule.id),
            stranger_token.clone()
        )
        .await,
        404
    );
    assert_eq!(
        delete(format!("/api/webhooks/{}", hook.id), stranger_token).await,
        404
    );
    // An API key reaches none of it.
    let (api_key, _) = key(&app, &owner).await;
    for path in ["/api/alerts/rules", "/api/alerts", "/api/webhooks"] {
        assert_eq!(app.get(path, &api_key).await.status(), 403, "{path}");
    }
    // The owner's are still there, and theirs to delete.
    assert_eq!(rules(&app, &owner).await.len(), 1);
    let owner_token = owner.token().to_string();
    assert_eq!(
        delete(
            format!("/api/alerts/rules/{}", rule.id),
            owner_token.clone()
        )
        .await,
        204
    );
    assert_eq!(
        delete(format!("/api/webhooks/{}", hook.id), owner_token).await,
        204
    );
    app.shutdown().await;
}

#[tokio::test]
async fn team_rules_need_a_manager_and_bad_rules_and_internal_targets_are_refused() {
    // Default settings: webhooks may not target loopback.
    let mut app = spawn_app_with(|_| {}).await;
    let (owner, member) = (app.register().await, app.register().await);
    let team: Value = app
        .post_json("/api/teams", Some(owner.token()), &json!({"name": "Ops"}))
        .await
        .json()
        .await
        .unwrap();
    let team_id = team["id"].as_str().unwrap();
    let invite: Value = app
        .post_json(
            &format!("/api/teams/{team_id}/invites"),
            Some(owner.token()),
            &json!({"role": "member"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let joined = app
        .post_json(
            "/api/teams/join",
            Some(member.token()),
            &json!({"token": invite["token"]}),
        )
        .await;
    assert_eq!(joined.status(), 200);
    let team_rule = json!({"kind": "spend_over", "threshold_usd": 100, "team_id": team_id});
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(
            app.post_json("/api/alerts/rules", Some(member.token()), &team_rule)
                .await
        ),
        403
    );
    let made = create_rule(&app, &owner, team_rule.clone()).await;
    assert_eq!(made.team_id.as_deref(), Some(team_id));
    let elsewhere = json!({"kind": "spend_over", "threshold_usd": 1, "team_id": "team_nope"});
    assert_eq!(
        status(
            app.post_json("/api/alerts/rules", Some(owner.token()), &elsewhere)
                .await
        ),
        404
    );
    let no_budget = json!({"kind": "budget_forecast", "budget_id": "bud_nope"});
    assert_eq!(
        status(
            app.post_json("/api/alerts/rules", Some(owner.token()), &no_budget)
                .await
        ),
        404
    );
    for bad in [
        json!({"kind": "spend_over"}),
        json!({"kind": "spend_over", "threshold_usd": -1}),
        json!({"kind": "report", "at_hour": 24}),
        json!({"kind": "report", "timezone": "Mars/Olympus"}),
        json!({"kind": "sometimes"}),
    ] {
        let response = app
            .post_json("/api/alerts/rules", Some(owner.token()), &bad)
            .await;
        assert_eq!(response.status(), 422, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "validation_failed", "{body}");
    }
    for url in [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/",
        "ftp://example.com/",
    ] {
        let response = app
            .post_json("/api/webhooks", Some(owner.token()), &json!({ "url": url }))
            .await;
        assert_eq!(response.status(), 422, "{url}");
    }
    app.shutdown().await;
}
