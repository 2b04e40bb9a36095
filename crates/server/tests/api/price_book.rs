//! The price book: every cost Apex computes names the price it used, `GET /api/usage/explain`
//! reproduces it to the micro-dollar (per row and per summary cell), and a user's
//! negotiated rates (`POST /api/pricebook`) cost their rows from the rates' date on without
//! rewriting a cost stored before.

use apex_protocol::prices::{PriceBook, PriceOverrideResult, UsageExplanation, UsageRowsPage};
use chrono::{Duration, Utc};
use serde_json::{json, Value};

use crate::helpers::{spawn_app, TestApp, TestUser};

fn days_ago(days: i64) -> String {
    (Utc::now() - Duration::days(days)).to_rfc3339()
}

async fn import(app: &TestApp, user: &TestUser, format: &str, body: &Value) -> Value {
    let response = app
        .post_json(
            &format!("/api/usage/events?format={format}"),
            Some(user.token()),
            body,
        )
        .await;
    assert_eq!(response.status(), 201, "import {format}");
    response.json().await.unwrap()
}

async fn rows(app: &TestApp, user: &TestUser, query: &str) -> UsageRowsPage {
    let response = app
        .get(&format!("/api/usage/rows?{query}"), user.token())
        .await;
    assert_eq!(response.status(), 200, "rows {query}");
    response.json().await.unwrap()
}

async fn explain(app: &TestApp, token: &str, query: &str) -> UsageExplanation {
    let response = app.get(&format!("/api/usage/explain?{query}"), token).await;
    assert_eq!(response.status(), 200, "explain {query}");
    response.json().await.unwrap()
}

/// One uploaded row (Apex's JSON rows), with the upload's id `id`.
fn row(id: &str, model: &str, prompt: i64, cached: i64, completion: i64, reasoning: i64) -> Value {
    json!({
        "id": id, "provider": "any", "model": model, "workload": "golden",
        "timestamp": days_ago(1), "prompt_tokens": prompt, "completion_tokens": completion,
        "latency_ms": 100, "cached_tokens": cached, "reasoning_tokens": reasoning,
    })
}

/// The explanation of the one row of `model` from `source`, found with `GET /api/usage/rows`.
async fn explain_model(
    app: &TestApp,
    user: &TestUser,
    source: &str,
    model: &str,
) -> UsageExplanation {
    let page = rows(app, user, &format!("source={source}&model={model}")).await;
    assert_eq!(page.rows.len(), 1, "one {model} row of {source}");
    explain(app, user.token(), &format!("row={}", page.rows[0].id)).await
}

/// (source, model, micro-dollars, price version, [(class, quantity, micro-dollars)]).
type Golden = (
    &'static str,
    &'static str,
    i64,
    &'static str,
    &'static [(&'static str, i64, i64)],
);

fn micro(cost_usd: f64) -> i64 {
    (cost_usd * 1e6).round() as i64
}

#[tokio::test]
async fn every_cost_is_explained_to_the_micro_dollar_by_token_class() {
    let mut app = spawn_app().await;
    let user = app.register().await;
    let upload = json!([
        // gpt-4o $2.50 / $10: 1,234 × 2.5 + 567 × 10 = 8,755 µ$.
        row("plain", "gpt-4o", 1234, 0, 567, 0),
        // Cached tokens are part of the prompt, billed once at $1.25: 1,000 × 2.5 +
        // 1,000 × 1.25 = 3,750 µ$ (not 5,000 + 1,250).
        row("cached", "gpt-4o-2024-08-06", 2000, 1000, 0, 0),
        // Reasoning tokens are part of the completion, billed as output ($4.40):
        // 1,000 × 4.4 = 4,400 µ$ (not 1,800 × 4.4).
        row("reasoning", "o3-mini", 0, 0, 1000, 800),
        // A fee per request: sonar $1 / $1 + $0.005 = 1,000 + 500 + 5,000 µ$.
        row("fee", "sonar", 1000, 0, 500, 0),
    ]);
    let result = import(&app, &user, "rows", &upload).await;
    assert_eq!(result["inserted"], 4);
    // Cache writes come from Anthropic's report: claude-3-5-sonnet $3 in, reads 10%,
    // writes 1.25×, $15 out. 6,000 × 3 + 3,000 × 0.3 + 1,000 × 3.75 + 2,000 × 15 =
    // 52,650 µ$.
    let anthropic = json!({"data": [{"starting_at": days_ago(1), "results": [{
        "uncached_input_tokens": 6000, "cache_read_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 1000}, "output_tokens": 2000,
        "model": "claude-3-5-sonnet-20241022",
    }]}]});
    import(&app, &user, "anthropic-usage", &anthropic).await;

    let golden: [Golden; 5] = [
        (
            "upload",
            "gpt-4o",
            8_755,
            "builtin:openai/gpt-4o@2024-10-02",
            &[("input", 1234, 3085), ("output", 567, 5670)],
        ),
        (
            "upload",
            "gpt-4o-2024-08-06",
            3_750,
            "builtin:openai/gpt-4o@2024-10-02",
            &[("input", 1000, 2500), ("cached_input", 1000, 1250)],
        ),
        (
            "upload",
            "o3-mini",
            4_400,
            "builtin:openai/o3-mini",
            &[("output", 200, 880), ("reasoning", 800, 3520)],
        ),
        (
            "upload",
            "sonar",
            6_500,
            "builtin:perplexity/sonar",
            &[
                ("input", 1000, 1000),
                ("output", 500, 500),
                ("requests", 1, 5000),
            ],
        ),
        (
            "anthropic-usage",
            "claude-3-5-sonnet-20241022",
            52_650,
            "builtin:anthropic/claude-3-5-sonnet",
            &[
                ("input", 6000, 18_000),
                ("cached_input", 3000, 900),
                ("cache_write", 1000, 3750),
                ("output", 2000, 30_000),
            ],
        ),
    ];
    let mut total_micro = 0;
    for (source, model, want_micro, version, lines) in golden {
        let x = explain_model(&app, &user, source, model).await;
        let stored = x.row.as_ref().unwrap();
        assert_eq!(stored.price_version.as_deref(), Some(version), "{model}");
        assert_eq!(x.computed_cost_micro_usd, want_micro, "{model}");
        assert_eq!(
            micro(stored.cost_usd),
            want_micro,
            "{model}: the stored cost"
        );
        assert_eq!(
            x.computed_cost_usd, stored.cost_usd,
            "{model}: recomputed exactly"
        );
        let group = &x.groups[0];
        assert_eq!(group.price.as_ref().unwrap().version, version);
        let got: Vec<(&str, i64, i64)> = group
            .lines
            .iter()
            .map(|l| (l.class.as_str(), l.quantity, l.cost_micro_usd))
            .collect();
        assert_eq!(got, lines.to_vec(), "{model}: tokens × rate per class");
        total_micro += want_micro;
    }

    // The whole window as one cell: the golden rows plus the demo data of registration,
    // each group's arithmetic adding up to what the summary reports.
    let all = explain(&app, user.token(), "days=30").await;
    let summary = app.usage_summary(&user).await;
    assert!((all.computed_cost_usd - summary.total_cost_usd).abs() < 1e-6);
    assert!((all.stored_cost_usd - summary.total_cost_usd).abs() < 1e-6);
    assert_eq!(all.requests, summary.total_requests as i64);
    assert!(all.groups.iter().all(|g| g.price.is_some()));
    // The golden rows as a cell of their own (their workload).
    let cell = explain(&app, user.token(), "workload=golden").await;
    assert_eq!(cell.rows, 4);
    assert_eq!(
        cell.computed_cost_micro_usd,
        total_micro - 52_650,
        "the uploaded rows' cell is the sum of their costs"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_cost_the_source_sent_is_kept_and_said_to_be_sent() {
    let mut app = spawn_app().await;
    let user = app.register().await;
    let mut sent = row("sent", "my-finetune", 10, 0, 10, 0);
    sent["cost_usd"] = json!(0.25);
    import(&app, &user, "rows", &json!([sent])).await;
    let x = explain_model(&app, &user, "upload", "my-finetune").await;
    assert_eq!(x.row.as_ref().unwrap().price_version, None);
    assert_eq!(x.groups[0].price, None);
    assert!(x.groups[0].lines.is_empty());
    assert_eq!(x.computed_cost_micro_usd, 250_000);
    // A cell with no rows costs nothing (not -0).
    let none = explain(&app, user.token(), "model=nothing-here").await;
    assert_eq!((none.rows, none.groups.len()), (0, 0));
    assert!(none.stored_cost_usd == 0.0 && none.stored_cost_usd.is_sign_positive());
    app.shutdown().await;
}

#[tokio::test]
async fn negotiated_rates_cost_new_rows_and_never_rewrite_stored_ones() {
    let mut app = spawn_app().await;
    let user = app.register().await;
    let other = app.register().await;
    // A row costed at the list price before any negotiated rate.
    let before = json!([row("before", "gpt-4o", 1_000_000, 0, 0, 0)]);
    import(&app, &user, "rows", &before).await;
    let listed = explain_model(&app, &user, "upload", "gpt-4o").await;
    assert_eq!(listed.computed_cost_micro_usd, 2_500_000);

    // Negotiated: $1 in, $4 out, from ten days ago.
    let response = app
        .post_json(
            "/api/pricebook",
            Some(user.token()),
            &json!({"prices": [{
                "model": "gpt-4o", "effective_from": days_ago(10),
                "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 4.0, "note": "2026 contract",
            }]}),
        )
        .await;
    assert_eq!(response.status(), 201);
    let stored: PriceOverrideResult = response.json().await.unwrap();
    assert_eq!(stored.imported, 1);
    let version = stored.entries[0].version.clone();
    assert!(version.starts_with("override:"), "{version}");
    assert_eq!(stored.entries[0].provider, "openai");
    assert_eq!(stored.entries[0].cached_input_usd_per_mtok, 1.0);

    // The stored row keeps its cost and version...
    let again = explain(
        &app,
        user.token(),
        &format!("row={}", listed.row.as_ref().unwrap().id),
    )
    .await;
    assert_eq!(again, listed);
    // ...a new row of the same model and day is costed with the negotiated rate.
    let mut after = row("after", "gpt-4o", 1_000_000, 0, 0, 0);
    after["workload"] = json!("after");
    import(&app, &user, "rows", &json!([after])).await;
    let page = rows(&app, &user, "workload=after").await;
    let x = explain(&app, user.token(), &format!("row={}", page.rows[0].id)).await;
    assert_eq!(x.groups[0].price_version.as_deref(), Some(version.as_str()));
    assert_eq!(
        x.groups[0].price.as_ref().unwrap().note.as_deref(),
        Some("2026 contract")
    );
    assert_eq!(x.computed_cost_micro_usd, 1_000_000);
    // A cell spanning both prices shows each with its own arithmetic.
    let cell = explain(&app, user.token(), "model=gpt-4o&source=upload").await;
    assert_eq!(cell.groups.len(), 2);
    assert_eq!(cell.computed_cost_micro_usd, 3_500_000);

    // The price book lists the user's rate first; another user has none and pays list.
    let book: PriceBook = app
        .get("/api/pricebook", user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(book.entries[0].version, version);
    let theirs: PriceBook = app
        .get("/api/pricebook", other.token())
        .await
        .json()
        .await
        .unwrap();
    assert!(theirs.entries.iter().all(|e| e.origin == "builtin"));
    import(&app, &other, "rows", &before).await;
    let list_price = explain_model(&app, &other, "upload", "gpt-4o").await;
    assert_eq!(list_price.computed_cost_micro_usd, 2_500_000);

    // Another user's row answers like a missing one.
    let response = app
        .get(
            &format!(
                "/api/usage/explain?row={}",
                list_price.row.as_ref().unwrap().id
            ),
            user.token(),
        )
        .await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    // A bad entry refuses the whole import; nothing is stored.
    let response = app
        .post_json(
            "/api/pricebook",
            Some(user.token()),
            &json!({"prices": [
                {"model": "gpt-4o-mini", "input_usd_per_mtok": 0.1, "output_usd_per_mtok": 0.4},
                {"model": "gpt-4o-mini", "input_usd_per_mtok": -1, "output_usd_per_mtok": 0.4},
            ]}),
        )
        .await;
    assert_eq!(response.status(), 422);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "validation_failed");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("prices[1]"));
    let book_after: PriceBook = app
        .get("/api/pricebook", user.token())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(book_after, book);
    app.shutdown().await;
}

#[tokio::test]
async fn keys_read_explanations_with_usage_read_and_add_rates_with_usage_write() {
    let mut app = spawn_app().await;
    let user = app.register().await;
    let key = |scopes: Value| {
        let app = &app;
        let user = &user;
        async move {
            let response = app
                .post_json(
                    "/api/keys",
                    Some(user.token()),
                    &json!({"name": "finops", "scopes": scopes}),
                )
                .await;
            assert_eq!(response.status(), 201);
            let body: Value = response.json().await.unwrap();
            body["key"].as_str().unwrap().to_string()
        }
    };
    let reader = key(json!(["usage:read"])).await;
    let writer = key(json!(["usage:write"])).await;
    for path in [
        "/api/usage/explain?days=7",
        "/api/usage/rows",
        "/api/pricebook",
    ] {
        assert_eq!(app.get(path, &reader).await.status(), 200, "{path}");
        assert_eq!(app.get(path, &writer).await.status(), 403, "{path}");
    }
    let rates = json!({"prices": [
        {"model": "gpt-4o", "input_usd_per_mtok": 2, "output_usd_per_mtok": 8},
    ]});
    let response = app.post_json("/api/pricebook", Some(&reader), &rates).await;
    assert_eq!(response.status(), 403);
    let response = app.post_json("/api/pricebook", Some(&writer), &rates).await;
    assert_eq!(response.status(), 201);
    app.shutdown().await;
}

#[tokio::test]
async fn rows_are_listed_newest_first_a_page_at_a_time() {
    let mut app = spawn_app().await;
    let user = app.register().await;
    let upload: Vec<Value> = (0..5)
        .map(|i| row(&format!("r{i}"), "gpt-4o-mini", 100 + i, 0, 10, 0))
        .collect();
    import(&app, &user, "rows", &json!(upload)).await;
    let first = rows(&app, &user, "workload=golden&limit=3").await;
    assert_eq!(first.rows.len(), 3);
    let before = first.next_before.expect("a second page");
    let second = rows(
        &app,
        &user,
        &format!("workload=golden&limit=3&before={before}"),
    )
    .await;
    assert_eq!(second.rows.len(), 2);
    assert_eq!(second.next_before, None);
    let ids: Vec<i64> = first
        .rows
        .iter()
        .chain(&second.rows)
        .map(|r| r.id)
        .collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let response = app.get("/api/usage/rows?limit=0", user.token()).await;
    assert_eq!(response.status(), 422);
    app.shutdown().await;
}
