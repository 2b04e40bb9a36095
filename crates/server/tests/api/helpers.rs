//! `spawn_app()` and `TestApp`: the real server on port 0, plus typed helpers to talk to it
//! over HTTP and WebSocket; `test_database()` for tests that use a store directly.
//!
//! The same tests run against both storage engines. This file is compiled into two test
//! targets (see `crates/server/Cargo.toml`): `api` runs on a temporary SQLite file,
//! `api_postgres` on PostgreSQL at `APEX_TEST_POSTGRES_URL`, each test in a schema of its
//! own (`apex_test_<unix seconds>_<uuid>`, put first on the connection's `search_path` and
//! dropped when the test's `TestDatabase` is). Without that variable a PostgreSQL test
//! fails, naming it: a test never skips itself, because libtest counts an early return as
//! a pass. `scripts/test.sh` leaves out the tests whose prerequisites are missing instead,
//! so that nextest counts them as skipped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use apex_protocol::auth::TokenPair;
use apex_protocol::events::AgentEvent;
use apex_protocol::usage::UsageSummary;
use apex_server::auth::{AuthLifetimes, Authenticator, PasswordHasher};
use apex_server::settings::{LlmProviderKind, PasswordHashing, Secret, Settings};
use apex_server::state::AppState;
use apex_server::store::{Backend, Store};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected frame may take before a test fails.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
pub const PASSWORD: &str = "correct horse battery";
/// The signing key test servers use, so tests can forge tokens the server must refuse.
pub const JWT_SECRET: &str = "integration-test-secret-0123456789abcdef";

/// The variable naming the PostgreSQL server the `api_postgres` tests use.
pub const POSTGRES_URL_VAR: &str = "APEX_TEST_POSTGRES_URL";
/// Prefix of the per-test schemas.
const SCHEMA_PREFIX: &str = "apex_test_";
/// Schemas older than this are leftovers of killed test processes and are dropped.
const STALE_SCHEMA_SECS: u64 = 3600;

/// The engine this test binary runs against, from its target name.
pub fn backend() -> Backend {
    if env!("CARGO_CRATE_NAME") == "api_postgres" {
        Backend::Postgres
    } else {
        Backend::Sqlite
    }
}

/// One test's database: a temporary folder (the SQLite file, the JWT secret) and, on
/// PostgreSQL, a schema of its own.
pub struct TestDatabase {
    pub data_dir: tempfile::TempDir,
    /// `None` for SQLite: the default URL inside `data_dir`.
    pub database_url: Option<String>,
    _schema: Option<TestSchema>,
}

impl TestDatabase {
    /// Test settings on this database: light password hashing, fast streaming.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::embedded(self.data_dir.path());
        settings.database_url = self
            .database_url
            .clone()
            .map(apex_server::settings::Secret::new);
        settings.password_hashing = PasswordHashing::Light;
        settings.template_stream_delay = Duration::from_millis(1);
        // The fast deterministic writer; tests of the model providers opt in (tests/llm).
        settings.llm_provider = LlmProviderKind::Template;
        settings.jwt_secret = Some(apex_server::settings::Secret::new(JWT_SECRET));
        // Tests create many accounts, threads and tickets from one address in moments; the
        // abuse throttles are off here and turned on (at their defaults) by the tests of
        // them (`hostile_sessions.rs`).
        settings.limits.registrations_per_minute = 0;
        settings.limits.registrations_per_minute_total = 0;
        settings.limits.refreshes_per_minute = 0;
        settings.limits.threads_per_minute = 0;
        settings.limits.tickets_per_minute = 0;
        settings.limits.imports_per_minute = 0;
        settings
    }
}

/// Fails the calling test because `what` is missing. A test never returns early to skip
/// (libtest would report that as a pass); `scripts/test.sh` checks the prerequisites first
/// and leaves out the tests that need a missing one, and nextest counts those as skipped.
pub fn missing_prerequisite(what: &str, fix: &str) -> ! {
    panic!(
        "{what}: {fix}. To leave out the tests that need it (counted as skipped), \
         run the suite with scripts/test.sh"
    )
}

/// A fresh database for this test. On the PostgreSQL target it needs
/// `APEX_TEST_POSTGRES_URL`, and fails the test without it.
pub async fn test_database() -> TestDatabase {
    let data_dir = tempfile::tempdir().expect("temp dir");
    match backend() {
        Backend::Sqlite => TestDatabase {
            data_dir,
            database_url: None,
            _schema: None,
        },
        Backend::Postgres => {
            let base_url = postgres_url();
            let schema = TestSchema::create(&base_url).await;
            TestDatabase {
                data_dir,
                database_url: Some(schema.url()),
                _schema: Some(schema),
            }
        }
    }
}

fn postgres_url() -> String {
    std::env::var(POSTGRES_URL_VAR)
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| {
            missing_prerequisite(
                &format!("{POSTGRES_URL_VAR} is not set, and the api_postgres tests need it"),
                &format!("set it, e.g. {POSTGRES_URL_VAR}=postgres://postgres@127.0.0.1:5432/test"),
            )
        })
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A PostgreSQL schema owned by one test; dropped (with everything in it) on drop.
struct TestSchema {
    base_url: String,
    name: String,
}

impl TestSchema {
    async fn create(base_url: &str) -> TestSchema {
        let name = format!(
            "{SCHEMA_PREFIX}{}_{}",
            unix_seconds(),
            uuid::Uuid::new_v4().simple()
        );
        let mut conn = PgConnection::connect(base_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to {POSTGRES_URL_VAR}: {e}"));
        drop_stale_schemas(&mut conn).await;
        sqlx::query(&format!("CREATE SCHEMA \"{name}\""))
            .execute(&mut conn)
            .await
            .expect("create the test schema");
        let _ = conn.close().await;
        TestSchema {
            base_url: base_url.to_string(),
            name,
        }
    }

    /// The base URL with this schema first on the search path of every connection.
    fn url(&self) -> String {
        let separator = if self.base_url.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{separator}options[search_path]={}",
            self.base_url, self.name
        )
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Drop runs inside the test's runtime, which cannot be blocked on; a short-lived
        // thread with its own runtime does the work while the server keeps running.
        let base_url = self.base_url.clone();
        let name = self.name.clone();
        let outcome = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&base_url)
                    .await
                    .map_err(|e| e.to_string())?;
                drop_schema(&mut conn, &name).await?;
                let _ = conn.close().await;
                Ok::<(), String>(())
            })
        })
        .join();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("could not drop test schema {}: {err}", self.name),
            Err(_) => eprintln!("could not drop test schema {}: cleanup panicked", self.name),
        }
    }
}

async fn drop_schema(conn: &mut PgConnection, name: &str) -> Result<(), String> {
    // A run still writing when its test ends may hold a lock briefly; do not wait forever.
    sqlx::query("SET lock_timeout = '5s'")
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Drops test schemas left behind by test processes that were killed.
async fn drop_stale_schemas(conn: &mut PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
            .bind(SCHEMA_PREFIX)
            .fetch_all(&mut *conn)
            .await
            .unwrap_or_default();
    let now = unix_seconds();
    for name in names {
        let created = name
            .strip_prefix(SCHEMA_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|created| now.saturating_sub(created) > STALE_SCHEMA_SECS) {
            let _ = drop_schema(conn, &name).await;
        }
    }
}

pub struct TestApp {
    pub address: String,
    pub settings: Settings,
    pub ws_address: String,
    pub http: reqwest::Client,
    pub state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _database: TestDatabase,
}

/// Starts the server on a fresh database (see [`test_database`]).
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the server with test settings adjusted by `configure`.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let database = test_database().await;
    let mut settings = database.settings();
    configure(&mut settings);
    let state = apex_server::build_state(settings.clone())
        .await
        .expect("server state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(apex_server::serve(listener, state.clone(), async move {
        let _ = rx.await;
    }));
    TestApp {
        settings,
        address: format!("http://127.0.0.1:{port}"),
        ws_address: format!("ws://127.0.0.1:{port}/ws"),
        http: reqwest::Client::new(),
        state,
        shutdown: Some(tx),
        server: Some(server),
        _database: database,
    }
}

/// A registered user and their tokens.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub email: String,
    pub id: String,
    pub tokens: TokenPair,
}

impl TestUser {
    pub fn token(&self) -> &str {
        &self.tokens.access_token
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: &Value,
    ) -> reqwest::Response {
        let mut request = self.http.post(self.url(path)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("request")
    }

    pub async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request")
    }

    pub async fn register_raw(&self, email: &str, password: &str) -> reqwest::Response {
        self.post_json(
            "/auth/register",
            None,
            &json!({"email": email, "password": password, "name": "Test"}),
        )
        .await
    }

    /// Registers a fresh user with a unique email.
    pub async fn register(&self) -> TestUser {
        let email = format!("user-{}@example.com", uuid::Uuid::new_v4().simple());
        let response = self.register_raw(&email, PASSWORD).await;
        assert_eq!(response.status(), 201, "register");
        let tokens: TokenPair = response.json().await.expect("token pair");
        TestUser {
            email,
            id: tokens.user.id.clone(),
            tokens,
        }
    }

    pub async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        self.post_json(
            "/auth/login",
            None,
            &json!({"email": email, "password": password}),
        )
        .await
    }

    /// The run's whole stored log, as `GET /api/runs/{id}/events` gives it back.
    pub async fn stored_events(&self, user: &TestUser, run_id: &str) -> Vec<AgentEvent> {
        let response = self
            .get(
                &format!("/api/runs/{run_id}/events?after_seq=0"),
                user.token(),
            )
            .await;
        assert_eq!(response.status(), 200);
        let page: Value = response.json().await.expect("events page");
        serde_json::from_value(page["events"].clone()).expect("stored events")
    }

    pub async fn usage_summary(&self, user: &TestUser) -> UsageSummary {
        let response = self.get("/api/usage/summary?days=30", user.token()).await;
        assert_eq!(response.status(), 200);
        response.json().await.expect("summary")
    }

    /// Opens a WebSocket authenticated by the `Authorization` header and reads the hello.
    pub async fn ws_connect(&self, user: &TestUser) -> WsClient {
        let mut request = self.ws_address.as_str().into_client_request().unwrap();
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", user.token()).parse().unwrap(),
        );
        let mut client = WsClient::connect(request).await.expect("ws connect");
        let hello = client.next_json().await;
        assert_eq!(hello["type"], "connection_established", "{hello}");
        assert_eq!(hello["data"]["user_id"], user.id.as_str());
        client
    }

    pub async fn ticket(&self, user: &TestUser, body: Value) -> Value {
        let response = self
            .post_json("/api/websocket/ticket", Some(user.token()), &body)
            .await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Triggers graceful shutdown and waits for `serve` to return.
    pub async fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
        }
    }
}

pub struct WsClient {
    pub socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// One run as one connection saw it.
#[derive(Debug)]
pub struct RunTranscript {
    pub run_id: String,
    pub thread_id: String,
    pub events: Vec<AgentEvent>,
}

impl RunTranscript {
    pub fn terminal(&self) -> &AgentEvent {
        self.events.last().expect("at least one event")
    }
}

impl WsClient {
    pub async fn connect(
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<WsClient, tokio_tungstenite::tungstenite::Error> {
        let (socket, _) = tokio_tungstenite::connect_async_with_config(request, None, true).await?;
        Ok(WsClient { socket })
    }

    pub async fn send_json(&mut self, value: Value) {
        self.socket
            .send(Message::Text(value.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, text: String) {
        self.socket
            .send(Message::Text(text.into()))
            .await
            .expect("send");
    }

    /// The next frame; panics on timeout or close.
    pub async fn next_message(&mut self) -> Message {
        loop {
            let message = tokio::time::timeout(FRAME_TIMEOUT, self.socket.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("socket ended")
                .expect("socket error");
            match message {
                Message::Ping(_) | Message::Pong(_) => continue,
                other => return other,
            }
        }
    }

    pub async fn next_json(&mut self) -> Value {
        match self.next_message().await {
            Message::Text(text) => serde_json::from_str(&text).expect("json frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Reads frames until one of `type`; returns it (frames before are dropped).
    pub async fn expect_type(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next_json().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Reads the close frame: (code, reason).
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.next_message().await {
                Message::Close(Some(frame)) => {
                    return (u16::from(frame.code), frame.reason.to_string())
                }
                Message::Close(None) => return (u16::from(CloseCode::Status), String::new()),
                _ => continue,
            }
        }
    }

    /// Sends a `user_message` and collects the run's events up to and including the terminal.
    /// Sends `text` as a `user_message` (a new thread) and returns the `run_accepted`
    /// frame (frames before it, such as `thread_created`, are dropped).
    pub async fn start_run(&mut self, text: &str) -> Value {
        self.send_json(json!({"type": "user_message", "text": text}))
            .await;
        self.expect_type("run_accepted").await
    }

    /// [`WsClient::start_run`], returning only the run's id.
    pub async fn start_run_id(&mut self, text: &str) -> String {
        let accepted = self.start_run(text).await;
        accepted["run_id"]
            .as_str()
            .expect("run_accepted has a run_id")
            .to_string()
    }

    pub async fn ask(&mut self, text: &str, thread_id: Option<&str>) -> RunTranscript {
        let mut frame = json!({"type": "user_message", "text": text});
        if let Some(thread) = thread_id {
            frame["thread_id"] = json!(thread);
        }
        self.send_json(frame).await;
        let accepted = self.expect_type("run_accepted").await;
        let run_id = accepted["run_id"].as_str().unwrap().to_string();
        let thread_id = accepted["thread_id"].as_str().unwrap().to_string();
        let events = self.collect_run(&run_id).await;
        RunTranscript {
            run_id,
            thread_id,
            events,
        }
    }

    /// Collects events of `run_id` until its terminal event. Events of other runs fail.
    pub async fn collect_run(&mut self, run_id: &str) -> Vec<AgentEvent> {
        self.collect_run_besides(run_id, &[]).await
    }

    /// [`WsClient::collect_run`], skipping events of the user's own runs in `besides`: a
    /// connection opened while another of the user's runs is going (or has just parked)
    /// may still receive that run's last live events.
    pub async fn collect_run_besides(&mut self, run_id: &str, besides: &[&str]) -> Vec<AgentEvent> {
        let mut events = Vec::new();
        loop {
            let frame = self.next_json().await;
            if frame.get("seq").is_none() {
                continue;
            }
            let event: AgentEvent = serde_json::from_value(frame).expect("agent event");
            if besides.contains(&event.run_id.as_str()) {
                continue;
            }
            assert_eq!(
                event.run_id, run_id,
                "event of another run on this connection"
            );
            let terminal = event.is_terminal();
            events.push(event);
            if terminal {
                return events;
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// Asserts seqs are 1..=n without gaps or repeats and the terminal event is last and unique.
pub fn assert_contiguous_and_terminated(events: &[AgentEvent]) {
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.seq, i as u64 + 1, "seq must be contiguous from 1");
    }
    let terminals = events.iter().filter(|e| e.is_terminal()).count();
    assert_eq!(terminals, 1, "exactly one terminal event");
    assert!(
        events.last().unwrap().is_terminal(),
        "terminal event is last"
    );
}

/// Runs `tests/support/openai_check.py` (the official `openai` Python package talking to
/// `/v1`) and returns what it printed. Fails the test when Python or the package is missing.
pub async fn openai_package_check(
    app: &TestApp,
    user: &TestUser,
    model: &str,
    question: &str,
) -> Value {
    let has_package = tokio::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if !has_package {
        missing_prerequisite(
            "Python's `openai` package is missing, and this test uses it as the client",
            "pip install openai (.ci/run installs it)",
        );
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/openai_check.py");
    let output = tokio::process::Command::new("python3")
        .arg(script)
        .args([app.url(""), user.token().to_string()])
        .args([model, question])
        .output()
        .await
        .expect("run python3");
    assert!(
        output.status.success(),
        "openai_check.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("openai_check.py prints JSON")
}

/// The local model file the tests that need it load, looked for in the order
/// `scripts/test.sh` checks:
/// `APEX_TEST_MODEL` when set (only there: a wrong explicit path is an error, not a reason
/// to load another file), else the per-machine cache
/// `${XDG_CACHE_HOME:-$HOME/.cache}/apex/models/`, else `<repo>/data/models/`. Fails the
/// test, naming the places looked in, when there is none.
pub fn model_path() -> PathBuf {
    let set = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty());
    let candidates: Vec<PathBuf> = match set("APEX_TEST_MODEL") {
        Some(path) => vec![PathBuf::from(path)],
        None => {
            let cache = set("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| set("HOME").map(|home| PathBuf::from(home).join(".cache")));
            let repo_data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data");
            cache
                .map(|cache| cache.join("apex"))
                .into_iter()
                .chain([repo_data])
                .map(|dir| dir.join(apex_server::llm::local::DEFAULT_MODEL_FILE))
                .collect()
        }
    };
    if let Some(found) = candidates.iter().find(|path| path.is_file()) {
        return found.clone();
    }
    let looked_in: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    missing_prerequisite(
        &format!(
            "the local model is missing (looked for {})",
            looked_in.join(", then ")
        ),
        "run scripts/fetch-model.sh or set APEX_TEST_MODEL to the file",
    )
}

/// Registers users on `store` directly (no server needed).
pub fn authenticator(store: &Arc<dyn Store>) -> Authenticator {
    Authenticator::new(
        Arc::clone(store),
        &Secret::new("a test secret of at least thirty-two characters"),
        PasswordHasher::new(PasswordHashing::Light),
        AuthLifetimes {
            access: Duration::from_secs(900),
            refresh: Duration::from_secs(3600),
            ticket: Duration::from_secs(60),
            session: Duration::from_secs(3600),
        },
    )
}
