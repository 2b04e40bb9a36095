//! The authorization table: every operation of `/openapi.json` × every kind of caller →
//! the status it must answer, checked in full against the running server.
//!
//! The callers are an `owner` with a team in which `admin` and `member` were invited, a
//! `stranger` in no team, `anonymous` (no token), and two API keys of the owner: one with
//! the `usage:read` scope only, one with every scope. Every request that names a resource
//! names one of the owner's (a thread, a run, a budget, a key, a rule, a webhook and its
//! delivery, a session, a usage row, the team), so a row of the table says at once what
//! the owner may do with their own resource, what a teammate and a stranger may do with
//! it, and what each key may do.
//!
//! What it proves:
//! - every documented operation is in the table and the table names no operation the
//!   document lacks: a new route cannot ship without its authorization being decided here
//!   (the failure lists the operationIds on either side);
//! - each cell holds: the status, and where it says who was refused, the error code too
//!   (`401 unauthorized` without a token, `403 insufficient_scope` for a key outside its
//!   scopes, `403 forbidden` for a team role that may not);
//! - wherever a caller is told "not found" about one of the owner's ids, the same request
//!   with a well-formed id that names nothing gets the same status, code and message: a
//!   stranger's (or a teammate's) ids cannot be told from missing ones.
//!
//! Every mismatch is collected, and the test fails once at the end with a table of them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::{spawn_app_with, TestApp, TestUser, WsClient, PASSWORD};

const QUESTION: &str = "How can I reduce my LLM costs?";
/// The methods an operation can have in the document.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];
/// How long a run the test started may take to end.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Caller {
    Anonymous,
    Owner,
    Admin,
    Member,
    Stranger,
    /// The owner's key with the `usage:read` scope only.
    KeyRead,
    /// The owner's key with every scope.
    KeyAll,
}

use Caller::*;

impl Caller {
    /// The table's columns, in this order.
    const COLUMNS: [Caller; 7] = [Anonymous, Owner, Admin, Member, Stranger, KeyRead, KeyAll];
    /// The order the cells of a row are sent in: the owner (and the owner's key) after
    /// everyone who must be refused, so that a refusal is checked against the fixture
    /// before the owner's own request may change it (cancel, regenerate, approve).
    const SEND_ORDER: [Caller; 7] = [Anonymous, Stranger, Member, Admin, KeyRead, KeyAll, Owner];

    fn column(self) -> usize {
        Self::COLUMNS
            .iter()
            .position(|c| *c == self)
            .expect("a column")
    }

    fn is_key(self) -> bool {
        matches!(self, KeyRead | KeyAll)
    }

    fn is_user(self) -> bool {
        matches!(self, Owner | Admin | Member | Stranger)
    }
}

/// One row: the expected status for each caller, in [`Caller::COLUMNS`] order.
type Statuses = [u16; 7];

/// Public: the same answer whoever asks (a token changes nothing).
const fn public(s: u16) -> Statuses {
    [s; 7]
}
/// Login only, on the caller's own account or data: no API key may.
const fn login_only(s: u16) -> Statuses {
    [401, s, s, s, s, 403, 403]
}
/// Login only, on one of the owner's resources: anyone else's answer is a missing id's.
const fn owners_login_only(s: u16) -> Statuses {
    [401, s, 404, 404, 404, 403, 403]
}
/// The `chat` scope, on the caller's own data.
const fn chat(s: u16) -> Statuses {
    [401, s, s, s, s, 403, s]
}
/// The `chat` scope, on the owner's thread or run.
const fn owners_chat(s: u16) -> Statuses {
    [401, s, 404, 404, 404, 403, s]
}
/// The `usage:read` scope, on the caller's own data.
const fn usage_read(s: u16) -> Statuses {
    [401, s, s, s, s, s, s]
}
/// The `usage:write` scope, on the caller's own data.
const fn usage_write(s: u16) -> Statuses {
    [401, s, s, s, s, 403, s]
}

/// operationId → expected status per caller. Rows run in this order; `logout_all` must be
/// last (it ends every session of every user who sends it).
///
/// Columns:                  anonymous, owner, admin, member, stranger, key:usage:read, key:all
const TABLE: &[(&str, Statuses)] = &[
    // Pages, the document, health: public.
    ("chat_page", public(200)),
    ("docs_page", public(200)),
    ("asset", public(200)),
    ("openapi_document", public(200)),
    ("health", public(200)),
    ("ready", public(200)),
    // Test servers install no metrics recorder: the documented 404, for everyone.
    ("metrics", public(404)),
    ("auth_config", public(200)),
    // Off unless `--development-mode --dev-login`: the route answers as if absent.
    ("dev_login", public(404)),
    ("websocket_beacon", public(204)),
    // Always 200; whether the token was valid is in the body (checked as the detail).
    ("validate_token", public(200)),
    ("register", public(201)),
    ("login", public(200)),
    ("refresh", public(200)),
    // Every caller gets the upgrade; the first frame says who was let in (the detail).
    ("open_websocket", public(101)),
    // The account: login only.
    ("me", login_only(200)),
    ("get_settings", login_only(200)),
    ("update_settings", login_only(200)),
    ("websocket_ticket", login_only(200)),
    ("list_sessions", login_only(200)),
    ("revoke_session", owners_login_only(204)),
    // Each user logs out a session of their own (a fresh login; see `request`).
    ("logout", login_only(204)),
    ("create_api_key", login_only(201)),
    ("list_api_keys", login_only(200)),
    ("revoke_api_key", owners_login_only(204)),
    // Threads and runs: the chat scope.
    ("list_threads", chat(200)),
    ("create_thread", chat(201)),
    ("get_thread", owners_chat(200)),
    ("update_thread", owners_chat(200)),
    ("put_thread", owners_chat(200)),
    ("list_messages", owners_chat(200)),
    ("delete_thread", owners_chat(204)),
    ("start_run", owners_chat(202)),
    ("regenerate", owners_chat(202)),
    ("get_run", owners_chat(200)),
    ("run_events", owners_chat(200)),
    // The fixture run has finished: its owner is told so (409), others not that it exists.
    ("cancel_run", owners_chat(409)),
    ("answer_approval", owners_chat(202)),
    // The original client's route, sent with the owner's thread: no API key scope covers it.
    ("agent_v2_execute", [401, 200, 404, 404, 404, 403, 403]),
    // The OpenAI-compatible API: chat scope (`gateway` for embeddings).
    ("openai_models", chat(200)),
    ("openai_chat_completions", chat(200)),
    // No upstream is configured: `model_not_found`, once past the scope check.
    ("openai_embeddings", chat(404)),
    // Usage: the usage scopes.
    ("usage_summary", usage_read(200)),
    ("usage_daily", usage_read(200)),
    ("usage_rows", usage_read(200)),
    ("price_book", usage_read(200)),
    // `?row=` the owner's row: another user's row answers like a missing one.
    ("usage_explain", [401, 200, 404, 404, 404, 200, 200]),
    ("import_usage", usage_write(201)),
    ("otlp_traces", usage_write(200)),
    ("import_prices", usage_write(201)),
    // Budgets, alerts, webhooks: login only, each user's own.
    ("create_budget", login_only(201)),
    ("list_budgets", login_only(200)),
    ("get_budget", owners_login_only(200)),
    ("update_budget", owners_login_only(200)),
    ("delete_budget", owners_login_only(204)),
    ("create_alert_rule", login_only(201)),
    ("list_alert_rules", login_only(200)),
    ("list_alerts", login_only(200)),
    ("delete_alert_rule", owners_login_only(204)),
    ("create_webhook", login_only(201)),
    ("list_webhooks", login_only(200)),
    ("list_webhook_deliveries", owners_login_only(200)),
    ("test_webhook", owners_login_only(202)),
    ("redeliver_webhook", owners_login_only(202)),
    ("delete_webhook", owners_login_only(204)),
    // Teams: login only; by role inside the team, not found outside it.
    ("create_team", login_only(201)),
    ("list_teams", login_only(200)),
    ("team_members", [401, 200, 200, 200, 404, 403, 403]),
    ("team_usage", [401, 200, 200, 403, 404, 403, 403]),
    // Inviting a member: owners and admins.
    ("invite_to_team", [401, 201, 201, 403, 404, 403, 403]),
    // Removing another member: owners and admins.
    ("remove_team_member", [401, 204, 204, 403, 404, 403, 403]),
    // Making a member an admin: the owner only.
    ("change_team_role", [401, 200, 403, 403, 404, 403, 403]),
    // An invite is the capability: whoever holds one joins (members stay as they are).
    ("join_team", login_only(200)),
    // Last: it ends every session of the user who sends it.
    ("logout_all", login_only(204)),
];

/// The code (or, for the two operations that answer 200/101 either way, the outcome) a
/// cell must show, where its status alone does not say why.
fn expected_detail(op: &str, caller: Caller, status: u16) -> Option<String> {
    let detail = match (op, status) {
        ("open_websocket", 101) if caller.is_user() => "connection_established".to_string(),
        ("open_websocket", 101) => "AUTH_FAILED".to_string(),
        ("validate_token", 200) => format!("valid={}", caller.is_user()),
        (_, 401) => "unauthorized".to_string(),
        (_, 403) if caller.is_key() => "insufficient_scope".to_string(),
        (_, 403) => "forbidden".to_string(),
        _ => return None,
    };
    Some(detail)
}

/// One documented operation.
struct Operation {
    method: String,
    path: String,
}

/// operationId → operation, for every operation of the document.
fn operations(document: &Value) -> BTreeMap<String, Operation> {
    let mut ops = BTreeMap::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"))
                .to_string();
            let previous = ops.insert(
                id.clone(),
                Operation {
                    method: method.to_ascii_uppercase(),
                    path: path.clone(),
                },
            );
            assert!(previous.is_none(), "operationId {id} is used twice");
        }
    }
    ops
}

enum Body {
    None,
    Json(Value),
}

/// How one cell's request is made: the path parameters, query, body and bearer token.
struct Request {
    params: Vec<(&'static str, String)>,
    query: String,
    body: Body,
    token: Option<String>,
}

impl Request {
    fn param(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.params.push((name, value.into()));
        self
    }

    fn json(mut self, body: Value) -> Self {
        self.body = Body::Json(body);
        self
    }

    /// Everything that can carry an id, for [`World::ghost`].
    fn text(&self) -> String {
        let body = match &self.body {
            Body::None => String::new(),
            Body::Json(value) => value.to_string(),
        };
        let params: Vec<&str> = self.params.iter().map(|(_, v)| v.as_str()).collect();
        format!("{} ? {} {}", params.join("/"), self.query, body)
    }
}

/// What a cell answered.
struct Answer {
    status: u16,
    /// The error code, the first frame of a socket, or `valid=` of `validate_token`.
    detail: Option<String>,
    message: Option<String>,
    body: Value,
    text: String,
}

impl Answer {
    fn summary(&self) -> String {
        let mut text: String = self.text.chars().take(160).collect();
        if self.text.chars().count() > 160 {
            text.push('…');
        }
        format!(
            "{} {} {}",
            self.status,
            self.detail.as_deref().unwrap_or("-"),
            text.replace('\n', " ")
        )
    }
}

/// The owner's resources the requests name; the non-owners' cells all use these, so a
/// wrongful success would show on the fixture itself.
struct Fixtures {
    team: String,
    /// A thread with a finished run.
    thread: String,
    run: String,
    /// A run parked awaiting approval, and the id of its request.
    parked_run: String,
    parked_approval: String,
    budget: String,
    /// A key no caller uses, to revoke.
    spare_key: String,
    rule: String,
    webhook: String,
    delivery: String,
    /// A session of the owner's other than the one the owner's requests use.
    session: String,
    usage_row: i64,
    /// An account only the `login` row logs into.
    login_email: String,
}

struct World<'a> {
    app: &'a TestApp,
    owner: TestUser,
    admin: TestUser,
    member: TestUser,
    stranger: TestUser,
    key_read: String,
    key_all: String,
    fx: Fixtures,
    /// (real, made-up) pairs: each fixture id and a well-formed id that names nothing.
    ghosts: Vec<(String, String)>,
}

/// A well-formed id that names nothing: `id` with each hex digit after its prefix
/// (`team_`, `wh_`, …) replaced by a random one.
fn ghost_of(id: &str) -> String {
    let (prefix, rest) = match id.rfind('_') {
        Some(i) => id.split_at(i + 1),
        None => ("", id),
    };
    let random = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let mut digits = random.chars().cycle();
    let rest: String = rest
        .chars()
        .map(|c| {
            if c.is_ascii_hexdigit() {
                digits.next().expect("cycle")
            } else {
                c
            }
        })
        .collect();
    format!("{prefix}{rest}")
}

async fn body_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// `POST path` as `token`, asserting `expected`; the body.
async fn post_ok(app: &TestApp, path: &str, token: &str, body: Value, expected: u16) -> Value {
    let (status, answer) = body_of(app.post_json(path, Some(token), &body).await).await;
    assert_eq!(status, expected, "set-up: POST {path}: {answer}");
    answer
}

fn string(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("expected a string, got {value}"))
        .to_string()
}

impl<'a> World<'a> {
    async fn new(app: &'a TestApp) -> World<'a> {
        let (owner, admin, member, stranger) = (
            app.register().await,
            app.register().await,
            app.register().await,
            app.register().await,
        );
        let team = post_ok(
            app,
            "/api/teams",
            owner.token(),
            json!({"name": "Table"}),
            201,
        )
        .await;
        let team = string(&team["id"]);
        for (user, role) in [(&admin, "admin"), (&member, "member")] {
            let invite = post_ok(
                app,
                &format!("/api/teams/{team}/invites"),
                owner.token(),
                json!({"role": role}),
                201,
            )
            .await;
            post_ok(
                app,
                "/api/teams/join",
                user.token(),
                json!({"token": invite["token"]}),
                200,
            )
            .await;
        }
        let key = |scopes: Value| {
            let token = owner.token().to_string();
            async move {
                post_ok(
                    app,
                    "/api/keys",
                    &token,
                    json!({"name": "table", "scopes": scopes}),
                    201,
                )
                .await
            }
        };
        let key_read = string(&key(json!(["usage:read"])).await["key"]);
        let key_all =
            string(&key(json!(["chat", "usage:read", "usage:write", "gateway"])).await["key"]);
        let spare_key = string(&key(json!(["chat"])).await["id"]);

        let mut world = World {
            app,
            owner,
            admin,
            member,
            stranger,
            key_read,
            key_all,
            fx: Fixtures {
                team,
                thread: String::new(),
                run: String::new(),
                parked_run: String::new(),
                parked_approval: String::new(),
                budget: String::new(),
                spare_key,
                rule: String::new(),
                webhook: String::new(),
                delivery: String::new(),
                session: String::new(),
                usage_row: 0,
                login_email: app.register().await.email,
            },
            ghosts: Vec::new(),
        };
        let owner = world.owner.token().to_string();

        world.fx.thread = world.new_thread().await;
        let started = post_ok(
            app,
            &format!("/api/threads/{}/runs", world.fx.thread),
            &owner,
            json!({"message": QUESTION}),
            202,
        )
        .await;
        world.fx.run = string(&started["run_id"]);
        world.settle(&world.fx.run.clone()).await;
        (world.fx.parked_run, world.fx.parked_approval) = world.parked_run().await;
        world.fx.budget = world.new_budget().await;
        world.fx.rule = world.new_rule().await;
        world.fx.webhook = world.new_webhook().await;
        let delivery = post_ok(
            app,
            &format!("/api/webhooks/{}/test", world.fx.webhook),
            &owner,
            Value::Null,
            202,
        )
        .await;
        world.fx.delivery = string(&delivery["id"]);
        world.fx.session = world.owner_session().await;
        // A row of the owner's own, whatever demo data the account has.
        let hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
        post_ok(
            app,
            "/api/usage/events",
            &owner,
            json!([{"provider": "openai", "model": "gpt-4o", "workload": "table",
                    "timestamp": hour_ago, "prompt_tokens": 100, "completion_tokens": 10,
                    "latency_ms": 50}]),
            201,
        )
        .await;
        let (status, rows) = body_of(app.get("/api/usage/rows?limit=1", &owner).await).await;
        assert_eq!(status, 200, "set-up: usage rows: {rows}");
        world.fx.usage_row = rows["rows"][0]["id"].as_i64().expect("a usage row id");

        let fx = &world.fx;
        let mut ghosts: Vec<(String, String)> = [
            &fx.team,
            &fx.thread,
            &fx.run,
            &fx.parked_run,
            &fx.budget,
            &fx.spare_key,
            &fx.rule,
            &fx.webhook,
            &fx.delivery,
            &fx.session,
        ]
        .into_iter()
        .map(|id| (id.clone(), ghost_of(id)))
        .collect();
        // Row ids are integers: one far past any row this test stores.
        ghosts.push((
            format!("row={}", fx.usage_row),
            format!("row={}", fx.usage_row + 1_000_000_000),
        ));
        world.ghosts = ghosts;
        world
    }

    fn user(&self, caller: Caller) -> Option<&TestUser> {
        match caller {
            Owner => Some(&self.owner),
            Admin => Some(&self.admin),
            Member => Some(&self.member),
            Stranger => Some(&self.stranger),
            Anonymous | KeyRead | KeyAll => None,
        }
    }

    fn token(&self, caller: Caller) -> Option<String> {
        match caller {
            Anonymous => None,
            KeyRead => Some(self.key_read.clone()),
            KeyAll => Some(self.key_all.clone()),
            user => self.user(user).map(|u| u.token().to_string()),
        }
    }

    fn owner_token(&self) -> String {
        self.owner.token().to_string()
    }

    async fn new_thread(&self) -> String {
        let thread = post_ok(
            self.app,
            "/api/threads",
            &self.owner_token(),
            json!({"title": "Table"}),
            201,
        )
        .await;
        string(&thread["id"])
    }

    async fn new_budget(&self) -> String {
        let budget = post_ok(
            self.app,
            "/api/budgets",
            &self.owner_token(),
            json!({"scope": "user", "limit_usd": 5, "period": "month"}),
            201,
        )
        .await;
        string(&budget["id"])
    }

    /// A rule far above any demo spend: it never fires, so it starts no run of the
    /// owner's that could take a run slot or busy a thread mid-table.
    async fn new_rule(&self) -> String {
        let rule = post_ok(
            self.app,
            "/api/alerts/rules",
            &self.owner_token(),
            json!({"kind": "spend_over", "threshold_usd": 1_000_000, "every": "day"}),
            201,
        )
        .await;
        string(&rule["id"])
    }

    async fn new_webhook(&self) -> String {
        let hook = post_ok(
            self.app,
            "/api/webhooks",
            &self.owner_token(),
            json!({"url": "https://hooks.example.com/x"}),
            201,
        )
        .await;
        string(&hook["id"])
    }

    async fn new_key(&self) -> String {
        let key = post_ok(
            self.app,
            "/api/keys",
            &self.owner_token(),
            json!({"name": "to revoke", "scopes": ["chat"]}),
            201,
        )
        .await;
        string(&key["id"])
    }

    /// A fresh login of `user`: its access token.
    async fn fresh_login(&self, user: &TestUser) -> String {
        let (status, pair) = body_of(self.app.login(&user.email, PASSWORD).await).await;
        assert_eq!(status, 200, "set-up: login: {pair}");
        string(&pair["access_token"])
    }

    /// A new session of the owner's, not the one the owner's requests use: its id.
    async fn owner_session(&self) -> String {
        let token = self.fresh_login(&self.owner).await;
        let (status, sessions) = body_of(self.app.get("/auth/sessions", &token).await).await;
        assert_eq!(status, 200, "set-up: sessions: {sessions}");
        let current = sessions
            .as_array()
            .expect("sessions")
            .iter()
            .find(|s| s["current"] == true)
            .expect("the current session");
        string(&current["id"])
    }

    /// A run of the owner's parked awaiting approval: (run id, approval id).
    async fn parked_run(&self) -> (String, String) {
        let thread = self.new_thread().await;
        let started = post_ok(
            self.app,
            &format!("/api/threads/{thread}/runs"),
            &self.owner_token(),
            json!({"message": QUESTION, "require_approval": true}),
            202,
        )
        .await;
        let run = string(&started["run_id"]);
        let deadline = tokio::time::Instant::now() + RUN_DEADLINE;
        loop {
            let view = self.run_view(&run).await;
            if view["status"] == "awaiting_approval" && view["approval"]["approval_id"].is_string()
            {
                return (run, string(&view["approval"]["approval_id"]));
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "set-up: run {run} never parked: {view}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn run_view(&self, run: &str) -> Value {
        let (status, view) = body_of(
            self.app
                .get(&format!("/api/runs/{run}"), self.owner.token())
                .await,
        )
        .await;
        assert_eq!(status, 200, "run {run}: {view}");
        view
    }

    /// Waits for the owner's run to end, so that the next request finds its thread idle
    /// (a busy thread answers 409 to `regenerate` and to the original client's route).
    async fn settle(&self, run: &str) {
        let deadline = tokio::time::Instant::now() + RUN_DEADLINE;
        loop {
            let view = self.run_view(run).await;
            let status = view["status"].as_str().unwrap_or("");
            if !matches!(status, "queued" | "running" | "awaiting_approval") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "run {run} did not end: {view}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A new member of the team (invited by the owner): their user id.
    async fn new_member(&self) -> String {
        let user = self.app.register().await;
        let token = self.invite().await;
        post_ok(
            self.app,
            "/api/teams/join",
            user.token(),
            json!({"token": token}),
            200,
        )
        .await;
        user.id
    }

    /// An unused member invite to the team.
    async fn invite(&self) -> String {
        let invite = post_ok(
            self.app,
            &format!("/api/teams/{}/invites", self.fx.team),
            &self.owner_token(),
            json!({"role": "member"}),
            201,
        )
        .await;
        string(&invite["token"])
    }

    /// The request of `op` for `caller`. `fresh`: the cell is expected to succeed, so an
    /// operation that would use up or destroy the fixture gets a new resource of the
    /// owner's instead (the refused cells all aim at the fixture).
    async fn request(&self, op: &str, caller: Caller, fresh: bool) -> Request {
        let fx = &self.fx;
        let r = Request {
            params: Vec::new(),
            query: String::new(),
            body: Body::None,
            token: self.token(caller),
        };
        match op {
            "chat_page" | "docs_page" | "openapi_document" | "health" | "ready" | "metrics"
            | "auth_config" | "websocket_beacon" | "validate_token" | "open_websocket" | "me"
            | "get_settings" | "list_sessions" | "list_api_keys" | "list_threads"
            | "openai_models" | "usage_summary" | "usage_daily" | "usage_rows" | "price_book"
            | "list_budgets" | "list_alert_rules" | "list_alerts" | "list_webhooks"
            | "list_teams" | "logout_all" => r,
            // An empty body asks for a default ticket.
            "websocket_ticket" => r,
            "asset" => r.param("name", "docs.js"),
            "dev_login" => r.json(json!({"email": "dev@example.com", "password": PASSWORD})),
            "register" => r.json(json!({
                "email": format!("table-{}@example.com", uuid::Uuid::new_v4().simple()),
                "password": PASSWORD,
            })),
            "login" => r.json(json!({"email": fx.login_email, "password": PASSWORD})),
            "refresh" => {
                let pair = self.app.register().await.tokens;
                r.json(json!({"refresh_token": pair.refresh_token}))
            }
            "update_settings" => r.json(json!({"require_approval": false})),
            "revoke_session" => {
                let session = match fresh {
                    true => self.owner_session().await,
                    false => fx.session.clone(),
                };
                r.param("session_id", session)
            }
            // Logging out ends the session of the token used: each user logs out a fresh
            // session of their own, keeping the one the other rows use.
            "logout" => match self.user(caller) {
                Some(user) => Request {
                    token: Some(self.fresh_login(user).await),
                    ..r
                },
                None => r,
            },
            "create_api_key" => r.json(json!({"name": "created", "scopes": ["chat"]})),
            "revoke_api_key" => {
                let key = match fresh {
                    true => self.new_key().await,
                    false => fx.spare_key.clone(),
                };
                r.param("key_id", key)
            }
            "create_thread" => r.json(json!({"title": "Created"})),
            "get_thread" | "list_messages" => r.param("id", &fx.thread),
            "update_thread" | "put_thread" => {
                r.param("id", &fx.thread).json(json!({"title": "Renamed"}))
            }
            "delete_thread" => {
                let thread = match fresh {
                    true => self.new_thread().await,
                    false => fx.thread.clone(),
                };
                r.param("id", thread)
            }
            "start_run" => r.param("id", &fx.thread).json(json!({"message": QUESTION})),
            "regenerate" => r.param("id", &fx.thread),
            "get_run" | "run_events" | "cancel_run" => r.param("id", &fx.run),
            "answer_approval" => {
                let (run, approval) = match fresh {
                    true => self.parked_run().await,
                    false => (fx.parked_run.clone(), fx.parked_approval.clone()),
                };
                r.param("id", run)
                    .json(json!({"approval_id": approval, "decision": "reject"}))
            }
            "agent_v2_execute" => r.json(json!({"message": QUESTION, "thread_id": fx.thread})),
            "openai_chat_completions" => r.json(json!({
                "model": "apex",
                "messages": [{"role": "user", "content": QUESTION}],
            })),
            "openai_embeddings" => {
                r.json(json!({"model": "text-embedding-3-small", "input": "hello"}))
            }
            "usage_explain" => Request {
                query: format!("row={}", fx.usage_row),
                ..r
            },
            "import_usage" => {
                let hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
                r.json(
                    json!([{"provider": "openai", "model": "gpt-4o", "workload": "table",
                               "timestamp": hour_ago, "prompt_tokens": 10,
                               "completion_tokens": 1, "latency_ms": 5}]),
                )
            }
            "otlp_traces" => r.json(json!({"resourceSpans": []})),
            "import_prices" => r.json(json!({"prices": [{
                "model": "gpt-4o", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 4.0,
            }]})),
            "create_budget" => r.json(json!({"scope": "user", "limit_usd": 5, "period": "month"})),
            "get_budget" => r.param("budget_id", &fx.budget),
            "update_budget" => r
                .param("budget_id", &fx.budget)
                .json(json!({"limit_usd": 6})),
            "delete_budget" => {
                let budget = match fresh {
                    true => self.new_budget().await,
                    false => fx.budget.clone(),
                };
                r.param("budget_id", budget)
            }
            "create_alert_rule" => r.json(json!({
                "kind": "spend_over", "threshold_usd": 1_000_000, "every": "day",
            })),
            "delete_alert_rule" => {
                let rule = match fresh {
                    true => self.new_rule().await,
                    false => fx.rule.clone(),
                };
                r.param("rule_id", rule)
            }
            "create_webhook" => r.json(json!({"url": "https://hooks.example.com/created"})),
            "delete_webhook" => {
                let hook = match fresh {
                    true => self.new_webhook().await,
                    false => fx.webhook.clone(),
                };
                r.param("webhook_id", hook)
            }
            "list_webhook_deliveries" | "test_webhook" => r.param("webhook_id", &fx.webhook),
            "redeliver_webhook" => r
                .param("webhook_id", &fx.webhook)
                .param("delivery_id", &fx.delivery),
            "create_team" => r.json(json!({"name": "Another"})),
            "team_members" | "team_usage" => r.param("team_id", &fx.team),
            "invite_to_team" => r.param("team_id", &fx.team).json(json!({"role": "member"})),
            // Always a fresh member to remove: the member caller removing the cast's member
            // would be that member leaving, which is allowed.
            "remove_team_member" => r
                .param("team_id", &fx.team)
                .param("user_id", self.new_member().await),
            // A fresh member each time, so every cell asks the same change (member → admin).
            "change_team_role" => r
                .param("team_id", &fx.team)
                .param("user_id", self.new_member().await)
                .json(json!({"role": "admin"})),
            "join_team" => r.json(json!({"token": self.invite().await})),
            other => {
                panic!("{other} is in the table but `request` does not say how to send it: add it")
            }
        }
    }

    /// `request` with every fixture id in it replaced by a well-formed id that names
    /// nothing; `None` when it names no fixture.
    fn ghost(&self, request: &Request) -> Option<Request> {
        let text = request.text();
        if !self
            .ghosts
            .iter()
            .any(|(real, _)| text.contains(real.as_str()))
        {
            return None;
        }
        let swap = |s: &str| {
            self.ghosts
                .iter()
                .fold(s.to_string(), |s, (real, ghost)| s.replace(real, ghost))
        };
        Some(Request {
            params: request
                .params
                .iter()
                .map(|(name, value)| (*name, swap(value)))
                .collect(),
            query: swap(&request.query),
            body: match &request.body {
                Body::None => Body::None,
                Body::Json(value) => {
                    Body::Json(serde_json::from_str(&swap(&value.to_string())).expect("json"))
                }
            },
            token: request.token.clone(),
        })
    }

    /// `text` with the made-up ids turned back into the real ones, to compare messages.
    fn unghost(&self, text: &str) -> String {
        self.ghosts
            .iter()
            .fold(text.to_string(), |s, (real, ghost)| s.replace(ghost, real))
    }

    async fn send(&self, op: &str, operation: &Operation, request: &Request) -> Answer {
        let mut path = operation.path.clone();
        for (name, value) in &request.params {
            path = path.replace(&format!("{{{name}}}"), value);
        }
        assert!(
            !path.contains('{'),
            "{op}: path parameters left unfilled in {path}"
        );
        if op == "open_websocket" {
            return self.open_socket(request.token.as_deref()).await;
        }
        if !request.query.is_empty() {
            path = format!("{path}?{}", request.query);
        }
        let method = reqwest::Method::from_bytes(operation.method.as_bytes()).expect("method");
        let mut builder = self.app.http.request(method, self.app.url(&path));
        if let Some(token) = &request.token {
            builder = builder.bearer_auth(token);
        }
        if let Body::Json(body) = &request.body {
            builder = builder.json(body);
        }
        let response = builder.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let detail = if op == "validate_token" {
            Some(format!("valid={}", body["valid"]))
        } else {
            body["error"]["code"].as_str().map(str::to_string)
        };
        Answer {
            status,
            detail,
            message: body["error"]["message"].as_str().map(str::to_string),
            body,
            text,
        }
    }

    /// A WebSocket handshake with `token` as the bearer: 101 and the first frame's type
    /// (or its error code), or the refusal's status.
    async fn open_socket(&self, token: Option<&str>) -> Answer {
        let mut request = self
            .app
            .ws_address
            .as_str()
            .into_client_request()
            .expect("ws request");
        if let Some(token) = token {
            request.headers_mut().insert(
                "Authorization",
                format!("Bearer {token}").parse().expect("header"),
            );
        }
        match WsClient::connect(request).await {
            Ok(mut client) => {
                let frame = client.next_json().await;
                let detail = ["error_code", "data.error_code", "payload.error_code"]
                    .iter()
                    .find_map(|path| {
                        path.split('.')
                            .fold(&frame, |v, key| &v[key])
                            .as_str()
                            .map(str::to_string)
                    })
                    .or_else(|| frame["type"].as_str().map(str::to_string));
                let _ = client.socket.close(None).await;
                Answer {
                    status: 101,
                    detail,
                    message: None,
                    text: frame.to_string(),
                    body: frame,
                }
            }
            Err(tungstenite::Error::Http(response)) => Answer {
                status: response.status().as_u16(),
                detail: None,
                message: None,
                body: Value::Null,
                text: String::new(),
            },
            Err(err) => panic!("open_websocket: {err}"),
        }
    }
}

/// One failed check.
struct Mismatch {
    op: String,
    caller: String,
    expected: String,
    got: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_answers_every_caller_as_the_authorization_table_says() {
    let mut app = spawn_app_with(|settings| {
        // The owner starts a dozen runs within moments (each run row, and the owner's key
        // after it); the message rate is tested in `limits.rs`, not here.
        settings.limits.message_burst = 1_000;
        settings.limits.messages_per_minute = 1_000;
    })
    .await;
    let response = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    let document: Value = response.json().await.expect("the document");
    let documented = operations(&document);

    // Drift: the document and the table name the same operations, both ways.
    let tabled: BTreeSet<&str> = TABLE.iter().map(|(op, _)| *op).collect();
    assert_eq!(
        tabled.len(),
        TABLE.len(),
        "an operation is in the table twice"
    );
    let untabled: Vec<&str> = documented
        .keys()
        .map(String::as_str)
        .filter(|op| !tabled.contains(op))
        .collect();
    let undocumented: Vec<&str> = tabled
        .iter()
        .copied()
        .filter(|op| !documented.contains_key(*op))
        .collect();
    assert_eq!(
        TABLE.last().map(|(op, _)| *op),
        Some("logout_all"),
        "logout_all ends the cast's sessions: it must be the table's last row"
    );

    let world = World::new(&app).await;
    let mut mismatches: Vec<Mismatch> = Vec::new();
    let mut cells = 0;
    let mut twins = 0;
    for (op, statuses) in TABLE {
        let Some(operation) = documented.get(*op) else {
            continue;
        };
        for caller in Caller::SEND_ORDER {
            let expected = statuses[caller.column()];
            let fresh = (200..300).contains(&expected);
            let request = world.request(op, caller, fresh).await;
            let answer = world.send(op, operation, &request).await;
            cells += 1;
            // A run the request started ends before the next request (same thread).
            let run = answer.body["run_id"]
                .as_str()
                .or_else(|| answer.body["result"]["run_id"].as_str());
            if let (true, Some(run)) = ((200..300).contains(&answer.status), run) {
                if matches!(caller, Owner | KeyAll) {
                    world.settle(run).await;
                }
            }
            let want_detail = expected_detail(op, caller, expected);
            let detail_ok = want_detail.is_none() || want_detail == answer.detail;
            if answer.status != expected || !detail_ok {
                mismatches.push(Mismatch {
                    op: op.to_string(),
                    caller: format!("{caller:?}"),
                    expected: format!("{expected} {}", want_detail.as_deref().unwrap_or("")),
                    got: answer.summary(),
                });
            }
            // Told "not found" about the owner's id: exactly what a made-up id gets.
            if expected != 404 || fresh {
                continue;
            }
            let Some(ghost) = world.ghost(&request) else {
                continue;
            };
            let missing = world.send(op, operation, &ghost).await;
            twins += 1;
            let seen = (answer.status, answer.detail.clone(), answer.message.clone());
            let unseen = (
                missing.status,
                missing.detail.clone(),
                missing.message.as_deref().map(|m| world.unghost(m)),
            );
            if seen != unseen {
                mismatches.push(Mismatch {
                    op: op.to_string(),
                    caller: format!("{caller:?}"),
                    expected: format!("like a missing id: {}", missing.summary()),
                    got: answer.summary(),
                });
            }
        }
        if *op == "join_team" {
            // The stranger joined with an invite of their own; out again, so that the
            // stranger stays a stranger for anything after this row.
            let path = format!("/api/teams/{}/members/{}", world.fx.team, world.stranger.id);
            let _ = app
                .http
                .delete(app.url(&path))
                .bearer_auth(world.owner.token())
                .send()
                .await
                .expect("request");
        }
    }
    drop(world);
    app.shutdown().await;

    let mut report = String::new();
    if !untabled.is_empty() || !undocumented.is_empty() {
        let _ = writeln!(
            report,
            "the table and /openapi.json disagree:\n  documented, not in the table (decide \
             who may call them): {untabled:?}\n  in the table, not documented: {undocumented:?}"
        );
    }
    if !mismatches.is_empty() {
        let _ = writeln!(
            report,
            "{} of {cells} cells and {twins} missing-id comparisons disagree:",
            mismatches.len()
        );
        let _ = writeln!(
            report,
            "  {:<26} {:<10} {:<40} got",
            "operationId", "caller", "expected"
        );
        for m in &mismatches {
            let _ = writeln!(
                report,
                "  {:<26} {:<10} {:<40} {}",
                m.op, m.caller, m.expected, m.got
            );
        }
    }
    assert!(report.is_empty(), "{report}");
    // Not vacuous: every documented operation × every caller, and the missing-id twins.
    assert_eq!(cells, documented.len() * Caller::COLUMNS.len());
    assert!(twins >= 40, "only {twins} missing-id comparisons were made");
}
