//! The real `apex` binary: `apex serve` on port 0, `apex chat` shows a full run live,
//! SIGTERM shuts the server down cleanly; `apex migrate` on SQLite and PostgreSQL.
//!
//! The PostgreSQL test needs `APEX_TEST_POSTGRES_URL` (see `crates/server/tests/api`) and
//! fails without it; `scripts/test.sh` leaves it out (counted as skipped) when PostgreSQL
//! is missing, except under `CI`.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    address: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod plain_http {
    /// A plain HTTP GET over a TCP socket (the test is synchronous).
    pub fn blocking_get(url: &str) -> String {
        use std::io::{Read, Write};
        let rest = url.strip_prefix("http://").unwrap();
        let (host, path) = rest.split_once('/').unwrap();
        let mut stream = std::net::TcpStream::connect(host).unwrap();
        write!(
            stream,
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }
}

fn start_server(data_dir: &std::path::Path) -> Server {
    start_server_with(data_dir, &[])
}

fn start_server_with(data_dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut command = support::serve_command(data_dir);
    command.args(extra).stderr(Stdio::inherit());
    let (child, address) = support::spawn_serve(command);
    Server { child, address }
}

#[test]
fn serve_and_chat_show_a_full_run_then_sigterm_stops_the_server() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut server = start_server(data_dir.path());
    assert!(data_dir.path().join("apex.db").exists());
    assert!(data_dir.path().join("jwt_secret").exists());

    let output = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args([
            "chat",
            "--server",
            &server.address,
            "--register",
            "--email",
            "cli@example.com",
        ])
        .args(["--message", "How can I reduce my LLM costs?"])
        .env("APEX_PASSWORD", "a long enough password")
        .output()
        .expect("run apex chat");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chat failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for agent in ["triage", "data", "optimization", "actions", "reporting"] {
        assert!(
            stdout.contains(&format!("▶ {agent}")),
            "{agent} start shown:\n{stdout}"
        );
        assert!(
            stdout.contains(&format!("✔ {agent} completed")),
            "{agent} end shown:\n{stdout}"
        );
    }
    assert!(stdout.contains("⚙ usage_summary"), "{stdout}");
    assert!(stdout.contains("You could save about $"), "{stdout}");
    assert!(stdout.contains("— run completed"), "{stdout}");

    // Metrics saw the run, by route and status, with no user ids as labels.
    let metrics = plain_http::blocking_get(&format!("{}/metrics", server.address));
    assert!(
        metrics.contains("apex_runs_finished_total{status=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "apex_http_requests_total{route=\"/auth/register\",method=\"POST\",status=\"201\"} 1"
        ),
        "{metrics}"
    );
    // Histograms with their own buckets (sub-millisecond for delivery), not summaries.
    assert!(
        metrics.contains("apex_event_delivery_latency_seconds_bucket{le=\"0.0001\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("apex_run_duration_seconds_bucket{status=\"completed\",le=\"600\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("quantile="), "no summaries: {metrics}");
    assert!(
        metrics.contains("apex_websocket_connections_open"),
        "{metrics}"
    );
    assert!(metrics.contains("apex_agent_duration_seconds"), "{metrics}");
    let user_id = stdout
        .split('(')
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap();
    assert!(!metrics.contains(user_id), "no user ids in metrics");

    // A wrong password is a clear error, not a crash.
    let denied = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args([
            "chat",
            "--server",
            &server.address,
            "--email",
            "cli@example.com",
            "--message",
            "hi",
        ])
        .env("APEX_PASSWORD", "wrong password")
        .output()
        .unwrap();
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("invalid_credentials"));

    let pid = server.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "apex serve exited with {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "apex serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_reports_a_bad_bind_address_clearly() {
    let output = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["serve", "--bind", "not-an-address"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--bind"));
}

/// Secrets never reach the logs, even at debug level for every crate: not the password,
/// not the access or refresh token, not a WebSocket ticket (which travels in a URL).
#[test]
fn logs_never_contain_passwords_tokens_or_tickets() {
    let data_dir = tempfile::tempdir().unwrap();
    let log_path = data_dir.path().join("server.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--llm-provider",
            "template",
            "--data-dir",
        ])
        .arg(data_dir.path())
        .env("APEX_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let server = Server {
        child,
        address: base.clone(),
    };

    let password = "s3cret-Password-that-must-not-leak";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (access, refresh, ticket) = runtime.block_on(async {
        let http = reqwest::Client::new();
        let pair: serde_json::Value = http
            .post(format!("{base}/auth/register"))
            .json(&serde_json::json!({"email": "logs@example.com", "password": password}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let access = pair["access_token"].as_str().unwrap().to_string();
        let refresh = pair["refresh_token"].as_str().unwrap().to_string();
        let ticket: serde_json::Value = http
            .post(format!("{base}/api/websocket/ticket"))
            .bearer_auth(&access)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ticket = ticket["ticket_id"].as_str().unwrap().to_string();
        let url = format!("{}/ws?ticket={ticket}", base.replacen("http", "ws", 1));
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        use futures_util::{SinkExt, StreamExt};
        socket
            .send(tokio_tungstenite::tungstenite::Message::Text(
                r#"{"type":"user_message","text":"How can I reduce my LLM costs?"}"#.into(),
            ))
            .await
            .unwrap();
        while let Some(Ok(message)) = socket.next().await {
            let text = message.to_text().unwrap_or("").to_string();
            if text.contains("\"agent_name\":\"supervisor\"") && text.contains("\"final_response\"") {
                break;
            }
        }
        // Refresh and a failed login exercise the other secret-carrying paths.
        http.post(format!("{base}/auth/refresh"))
            .json(&serde_json::json!({"refresh_token": refresh}))
            .send()
            .await
            .unwrap();
        http.post(format!("{base}/auth/login"))
            .json(&serde_json::json!({"email": "logs@example.com", "password": "wrong-Password-also-secret"}))
            .send()
            .await
            .unwrap();
        (access, refresh, ticket)
    });
    drop(server);
    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logs.contains("run finished"),
        "debug logs were captured:\n{logs}"
    );
    for (name, secret) in [
        ("password", password),
        ("wrong password", "wrong-Password-also-secret"),
        ("access token", access.as_str()),
        ("refresh token", refresh.as_str()),
        ("ticket", ticket.as_str()),
    ] {
        assert!(!logs.contains(secret), "the {name} appears in the logs");
    }
}

fn apex(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(args)
        .env("APEX_LOG", "warn")
        .env_remove("APEX_DATABASE_URL")
        .output()
        .expect("run apex")
}

#[test]
fn migrate_creates_the_sqlite_database_and_can_run_again() {
    let data_dir = tempfile::tempdir().unwrap();
    let dir = data_dir.path().join("nested");
    let dir = dir.to_str().unwrap();
    for _ in 0..2 {
        let output = apex(&["migrate", "--data-dir", dir]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("SQLite database is up to date"));
    }
    assert!(data_dir.path().join("nested/apex.db").exists());
}

#[test]
fn an_unreachable_postgres_is_a_clear_error_without_the_password() {
    let data_dir = tempfile::tempdir().unwrap();
    let output = apex(&[
        "migrate",
        "--data-dir",
        data_dir.path().to_str().unwrap(),
        "--database-url",
        "postgres://apex:s3cret-pw@127.0.0.1:1/apex",
    ]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("PostgreSQL"), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(!stderr.contains("s3cret-pw"), "{stderr}");
}

/// `APEX_TEST_POSTGRES_URL`; fails the test without it (a test never returns early to skip:
/// libtest would count that as a pass; `scripts/test.sh` leaves the test out instead).
fn postgres_url() -> String {
    const VAR: &str = "APEX_TEST_POSTGRES_URL";
    std::env::var(VAR)
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{VAR} is not set, and this PostgreSQL test needs it: set it (e.g. \
                 {VAR}=postgres://postgres@127.0.0.1:5432/test). To leave out the tests \
                 that need it (counted as skipped), run the suite with scripts/test.sh"
            )
        })
}

/// A schema of its own for one test, dropped at the end.
struct Schema {
    base_url: String,
    name: String,
}

impl Schema {
    fn run(base_url: &str, sql: String) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(base_url)
                .await
                .expect("connect to APEX_TEST_POSTGRES_URL");
            sqlx::query(&sql).execute(&mut conn).await.expect(&sql);
            let _ = conn.close().await;
        });
    }

    fn create(base_url: &str) -> Schema {
        let name = format!("apex_cli_test_{}", uuid::Uuid::new_v4().simple());
        Schema::run(base_url, format!("CREATE SCHEMA \"{name}\""));
        Schema {
            base_url: base_url.to_string(),
            name,
        }
    }

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

impl Drop for Schema {
    fn drop(&mut self) {
        Schema::run(
            &self.base_url,
            format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name),
        );
    }
}

#[test]
fn migrate_then_serve_and_chat_on_postgres() {
    let base_url = postgres_url();
    let schema = Schema::create(&base_url);
    let url = schema.url();
    let data_dir = tempfile::tempdir().unwrap();
    let dir = data_dir.path().to_str().unwrap();
    for _ in 0..2 {
        let output = apex(&["migrate", "--data-dir", dir, "--database-url", &url]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("PostgreSQL database is up to date")
        );
    }

    // An administrator creates an account in the same database.
    let created = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["user", "create", "--email", "pg-admin@example.com"])
        .args(["--data-dir", dir, "--database-url", &url])
        .env("APEX_USER_PASSWORD", "an admin password")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );

    let server = start_server_with(data_dir.path(), &["--database-url", &url]);
    let admin = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["chat", "--server", &server.address])
        .args(["--email", "pg-admin@example.com", "--message", "hi"])
        .env("APEX_PASSWORD", "an admin password")
        .output()
        .expect("run apex chat");
    let admin_out = String::from_utf8_lossy(&admin.stdout);
    assert!(
        admin_out.contains(&format!(
            "signed in as pg-admin@example.com ({})",
            String::from_utf8_lossy(&created.stdout).trim()
        )),
        "{admin_out}{}",
        String::from_utf8_lossy(&admin.stderr)
    );
    assert!(
        !data_dir.path().join("apex.db").exists(),
        "no SQLite file when the data is in PostgreSQL"
    );
    let output = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["chat", "--server", &server.address, "--register"])
        .args(["--email", "pg-cli@example.com"])
        .args(["--message", "How can I reduce my LLM costs?"])
        .env("APEX_PASSWORD", "a long enough password")
        .output()
        .expect("run apex chat");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chat failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("— run completed"), "{stdout}");
    drop(server);
}

#[test]
fn usage_import_and_summary_from_the_command_line() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server(data_dir.path());
    let csv = data_dir.path().join("usage.csv");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // An hour ago, as RFC 3339 without pulling in a date crate: 1970-01-01 + seconds.
    let stamp = {
        let secs = now - 3600;
        let days = secs / 86_400;
        let (y, m, d) = civil_from_days(days as i64);
        let rem = secs % 86_400;
        format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60
        )
    };
    std::fs::write(
        &csv,
        format!(
            "provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms\n\
             openai,gpt-4o,cli-test,{stamp},1000000,0,900\n"
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(args)
            .args(["--server", &server.address, "--email", "usage@example.com"])
            .env("APEX_PASSWORD", "a long enough password")
            .output()
            .unwrap()
    };
    // Register (demo data on) by importing with --register.
    let imported = run(&["usage", "import", csv.to_str().unwrap(), "--register"]);
    let out = String::from_utf8_lossy(&imported.stdout);
    assert!(
        imported.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    assert!(out.contains("imported 1 rows"), "{out}");
    let summary = run(&["usage", "summary", "--days", "1"]);
    let out = String::from_utf8_lossy(&summary.stdout);
    assert!(summary.status.success(), "{out}");
    assert!(
        out.contains("cli-test"),
        "the imported workload is listed: {out}"
    );
    assert!(
        out.contains("$2.50"),
        "its cost comes from the pricing table: {out}"
    );
    let bad = run(&["usage", "summary", "--days", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("validation_failed"));
}

#[tokio::test]
async fn chat_regenerate_answers_the_threads_last_question_again() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server(data_dir.path());
    let (email, password) = ("regenerate@example.com", "a long enough password");
    let chat = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_apex"))
            .arg("chat")
            .args(["--server", &server.address, "--email", email])
            .args(args)
            .env("APEX_PASSWORD", password)
            .output()
            .unwrap()
    };
    let asked = chat(&["--register", "--message", "How can I reduce my LLM costs?"]);
    assert!(asked.status.success(), "{asked:?}");

    let http = reqwest::Client::new();
    let login: serde_json::Value = http
        .post(format!("{}/auth/login", server.address))
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_string();
    let get = |path: String| {
        let (http, token, base) = (http.clone(), token.clone(), server.address.clone());
        async move {
            http.get(format!("{base}{path}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let threads = get("/api/threads".into()).await;
    let thread = threads[0]["id"].as_str().unwrap().to_string();

    let regenerated = chat(&["--regenerate", &thread]);
    let stdout = String::from_utf8_lossy(&regenerated.stdout);
    assert!(
        regenerated.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&regenerated.stderr)
    );
    assert!(stdout.contains("▶ reporting"), "{stdout}");
    assert!(stdout.contains("— run completed"), "{stdout}");
    let page = get(format!("/api/threads/{thread}/messages")).await;
    let marks: Vec<(String, bool)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap().to_string(),
                m["superseded"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        marks,
        [
            ("user".to_string(), false),
            ("assistant".to_string(), true),
            ("assistant".to_string(), false)
        ]
    );

    // A thread that is not the user's is refused, clearly, with a failing exit.
    let missing = chat(&["--regenerate", "00000000-0000-4000-8000-000000000000"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("thread not found"),
        "{missing:?}"
    );
}

#[tokio::test]
async fn sessions_are_listed_revoked_and_ended_everywhere_from_the_command_line() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server(data_dir.path());
    let email = "sessions@example.com";
    let password = "a long enough password";
    let http = reqwest::Client::new();
    let base = server.address.clone();
    let login = |agent: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let response = http
                .post(format!("{base}/auth/login"))
                .header("User-Agent", agent)
                .json(&serde_json::json!({"email": email, "password": password}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    let me = |token: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.get(format!("{base}/auth/me"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let apex = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(args)
            .args(["--server", &server.address, "--email", email])
            .env("APEX_PASSWORD", password)
            .output()
            .unwrap()
    };
    let registered = apex(&["sessions", "list", "--register"]);
    assert!(
        registered.status.success(),
        "{}",
        String::from_utf8_lossy(&registered.stderr)
    );
    // A session whose client label tries to drive the terminal (the header cannot carry
    // control characters, so the hostile part is what a header can: bidi overrides and the
    // printable remains of a sequence are shown as text, never as escapes).
    let browser = login("Firefox on a laptop").await;
    let listed = apex(&["sessions", "list"]);
    let out = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.status.success(), "{out}");
    assert!(out.contains("Firefox on a laptop"), "{out}");
    assert!(out.contains("(this command)"), "{out}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
    let browser_token = browser["access_token"].as_str().unwrap().to_string();
    let sessions: Vec<serde_json::Value> = http
        .get(format!("{base}/auth/sessions"))
        .bearer_auth(&browser_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        sessions.len(),
        1,
        "the CLI ends the sessions it started: {sessions:?}"
    );
    let id = sessions[0]["id"].as_str().unwrap();
    let revoked = apex(&["sessions", "revoke", id]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert_eq!(
        me(browser_token).await,
        401,
        "the revoked session's token is dead"
    );
    let unknown = apex(&["sessions", "revoke", "no-such-session"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not_found"));

    let first = login("one").await;
    let second = login("two").await;
    let all = apex(&["sessions", "logout-all"]);
    assert!(all.status.success());
    for pair in [first, second] {
        assert_eq!(
            me(pair["access_token"].as_str().unwrap().to_string()).await,
            401
        );
    }
}

#[test]
fn server_supplied_text_is_printed_without_terminal_escapes() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server_with(data_dir.path(), &["--no-demo-data"]);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let stamp = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    // A model name that retitles the terminal, a workload that clears it, and a bidi
    // override; the costliest rows, so the answer about spend names them.
    let csv = data_dir.path().join("hostile.csv");
    std::fs::write(
        &csv,
        format!(
            "provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms,status,cost_usd\n\
             acme,evil\x1b]0;pwned\x07model,wipe\x1b[2Jout\u{202e}txt,{stamp},1000,100,900,ok,5000\n"
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(args)
            .args(["--server", &server.address, "--email", "escape@example.com"])
            .env("APEX_PASSWORD", "a long enough password")
            .output()
            .unwrap()
    };
    let imported = run(&["usage", "import", csv.to_str().unwrap(), "--register"]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let summary = run(&["usage", "summary", "--days", "2"]);
    let out = String::from_utf8_lossy(&summary.stdout);
    assert!(summary.status.success(), "{out}");
    assert!(
        out.contains("evilmodel"),
        "the sequence is gone, the name stays: {out}"
    );
    assert!(out.contains("wipeouttxt"), "{out}");
    let chat = run(&[
        "chat",
        "--message",
        "Which models and workloads cost me the most?",
    ]);
    let chat_out = String::from_utf8_lossy(&chat.stdout);
    assert!(chat.status.success(), "{chat_out}");
    for (name, printed) in [("usage summary", &out), ("chat", &chat_out)] {
        assert!(
            !printed.contains('\x1b') && !printed.contains('\x07') && !printed.contains('\u{202e}'),
            "{name} printed a control sequence: {printed:?}"
        );
    }
    // A refusal quotes the server's message: cleaned as well.
    let bad = data_dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        format!(
            "provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms,status\n\
             acme,x\x1b[2J,w,{stamp},1,1,1,\x1b]0;pwned\x07\n"
        ),
    )
    .unwrap();
    let refused = run(&["usage", "import", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("validation_failed"), "{err}");
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "{err:?}");
}

#[test]
fn a_provider_export_imports_once_and_the_summary_names_its_source() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server_with(data_dir.path(), &["--no-demo-data"]);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let started = format!("{y:04}-{m:02}-{d:02}T00:00:01.000000");
    // LiteLLM's spend log: one usable request, one without a model.
    let log = data_dir.path().join("spend.json");
    std::fs::write(
        &log,
        format!(
            r#"[{{"request_id": "chatcmpl-1", "spend": 0.25, "prompt_tokens": 300,
                  "completion_tokens": 50, "startTime": "{started}", "model": "gpt-4o",
                  "custom_llm_provider": "openai", "request_tags": ["triage"]}},
                {{"request_id": "chatcmpl-2", "spend": 0.1, "startTime": "{started}"}}]"#
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(args)
            .args(["--server", &server.address, "--email", "export@example.com"])
            .env("APEX_PASSWORD", "a long enough password")
            .output()
            .unwrap()
    };
    let path = log.to_str().unwrap();
    let first = run(&[
        "usage",
        "import",
        "--format",
        "litellm-spend",
        path,
        "--register",
    ]);
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        out.contains("imported 1 rows") && out.contains("1 skipped"),
        "{out}"
    );
    assert!(out.contains("skipped entry 1: no model"), "{out}");
    let second = run(&["usage", "import", "--format", "litellm-spend", path]);
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(
        out.contains("imported 0 rows") && out.contains("1 already stored"),
        "{out}"
    );
    let summary = run(&["usage", "summary", "--days", "2"]);
    let out = String::from_utf8_lossy(&summary.stdout);
    assert!(summary.status.success(), "{out}");
    assert!(out.contains("1 requests"), "{out}");
    let source_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("litellm-spend"))
        .unwrap_or_else(|| panic!("no source line: {out}"));
    assert!(source_line.contains("$0.25"), "{source_line}");
    let unknown = run(&["usage", "import", "--format", "excel", path]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown --format"));
}

#[test]
fn negotiated_rates_are_imported_and_every_cost_explained_from_the_command_line() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server_with(data_dir.path(), &["--no-demo-data"]);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 3600;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let (py, pm, pd) = civil_from_days((secs / 86_400) as i64 - 7);
    let rates = data_dir.path().join("rates.json");
    std::fs::write(
        &rates,
        format!(
            r#"[{{"model": "gpt-4o", "effective_from": "{py:04}-{pm:02}-{pd:02}",
                 "input_usd_per_mtok": 1.5, "output_usd_per_mtok": 6,
                 "note": "contract"}}]"#
        ),
    )
    .unwrap();
    let csv = data_dir.path().join("usage.csv");
    std::fs::write(
        &csv,
        format!(
            "provider,model,workload,timestamp,prompt_tokens,completion_tokens,latency_ms\n\
             openai,gpt-4o,cli-explain,{y:04}-{m:02}-{d:02}T00:00:01Z,2000000,500000,900\n"
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(args)
            .args(["--server", &server.address, "--email", "rates@example.com"])
            .env("APEX_PASSWORD", "a long enough password")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).to_string();
        let err = String::from_utf8_lossy(&output.stderr).to_string();
        (output.status.success(), out, err)
    };
    let (ok, out, err) = run(&["pricebook", "import", rates.to_str().unwrap(), "--register"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("imported 1 prices") && out.contains("override:"),
        "{out}"
    );
    let (ok, out, _) = run(&["pricebook", "list", "--model", "gpt-4o"]);
    assert!(ok);
    let first = out.lines().nth(1).unwrap_or_default();
    assert!(
        first.contains("override:") && first.contains("contract"),
        "{out}"
    );
    let (ok, out, err) = run(&["usage", "import", csv.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    // 2M × $1.50 + 0.5M × $6 = $6.
    let (ok, out, err) = run(&[
        "usage",
        "explain",
        "--workload",
        "cli-explain",
        "--days",
        "2",
    ]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("1 rows costed with override:"), "{out}");
    assert!(
        out.contains("input") && out.contains("2000000 × $1.5"),
        "{out}"
    );
    assert!(
        out.contains("output") && out.contains("500000 × $6"),
        "{out}"
    );
    assert!(
        out.contains("total: $6.000000 computed (6000000 µ$)"),
        "{out}"
    );
    let (ok, out, _) = run(&["usage", "rows", "--workload", "cli-explain", "--days", "2"]);
    assert!(ok);
    let id = out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    let (ok, out, err) = run(&["usage", "explain", "--row", &id]);
    assert!(ok, "{out}{err}");
    assert!(out.starts_with(&format!("row {id}:")), "{out}");
    let (ok, _, err) = run(&["usage", "explain", "--row", "999999999"]);
    assert!(!ok);
    assert!(err.contains("not_found"), "{err}");
}

#[test]
fn budgets_are_set_listed_and_deleted_from_the_command_line() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server_with(data_dir.path(), &["--no-demo-data"]);
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_apex"))
            .arg("budgets")
            .args(args)
            .args([
                "--server",
                &server.address,
                "--email",
                "budgets@example.com",
            ])
            .env("APEX_PASSWORD", "a long enough password")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).to_string();
        let err = String::from_utf8_lossy(&output.stderr).to_string();
        (output.status.success(), out, err)
    };
    let (ok, out, err) = run(&["create", "--limit-usd", "25", "--register"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("all your calls: $25.00 per month; $0.0000 spent (0%)"),
        "{out}"
    );
    let id = out.split_whitespace().next().unwrap().to_string();
    assert!(id.starts_with("bud_"), "{out}");
    let (ok, out, err) = run(&[
        "create",
        "--model",
        "gpt-4o",
        "--limit-tokens",
        "5000",
        "--period",
        "rolling_days",
        "--days",
        "7",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("model gpt-4o: 5000 tokens last 7 days"),
        "{out}"
    );
    let (ok, out, _) = run(&["list"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 2, "{out}");
    let (ok, _, err) = run(&["create", "--limit-usd", "5", "--period", "year"]);
    assert!(!ok);
    assert!(
        err.contains("validation_failed") && err.contains("period"),
        "{err}"
    );
    let (ok, out, err) = run(&["delete", &id]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = run(&["delete", &id]);
    assert!(!ok);
    assert!(err.contains("not_found"), "{err}");
    let (_, out, _) = run(&["list"]);
    assert_eq!(out.lines().count(), 1, "{out}");
}

#[test]
fn a_team_is_made_joined_and_its_usage_read_from_the_command_line() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server(data_dir.path());
    let run = |email: &str, args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_apex"))
            .arg("teams")
            .args(args)
            .args(["--server", &server.address, "--email", email])
            .env("APEX_PASSWORD", "a long enough password")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).to_string();
        let err = String::from_utf8_lossy(&output.stderr).to_string();
        (output.status.success(), out, err)
    };
    let (ok, out, err) = run("owner@example.com", &["create", "Platform", "--register"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("Platform (you are its owner)"), "{out}");
    let team = out.split_whitespace().next().unwrap().to_string();
    let (ok, out, err) = run("owner@example.com", &["add", &team]);
    assert!(ok, "{out}{err}");
    let token = out.trim().to_string();
    assert!(token.starts_with("apt_"), "{out}");
    let (ok, out, err) = run("member@example.com", &["join", &token, "--register"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("joined Platform") && out.contains("as member"),
        "{out}"
    );
    let (ok, _, err) = run("member@example.com", &["join", &token]);
    assert!(!ok && err.contains("not_found"), "{err}");
    let (_, out, _) = run("member@example.com", &["members", &team]);
    assert!(
        out.contains("owner@example.com") && out.contains("member@example.com"),
        "{out}"
    );
    let (ok, _, err) = run("member@example.com", &["usage", &team]);
    assert!(!ok && err.contains("forbidden"), "{err}");
    let (ok, out, err) = run("owner@example.com", &["usage", &team, "--days", "7"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.starts_with("last 7 days:") && out.contains("member@example.com"),
        "{out}"
    );
    let (_, out, _) = run("member@example.com", &["list"]);
    assert!(out.contains("2 members, you: member"), "{out}");
    // The owner makes the member an admin; the member may not change roles.
    let (_, out, _) = run("owner@example.com", &["members", &team]);
    let member_id = out
        .lines()
        .find(|l| l.contains("member@example.com"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let (ok, out, err) = run(
        "owner@example.com",
        &["role", &team, &member_id, "--role", "admin"],
    );
    assert!(
        ok && out.contains("member@example.com is now admin"),
        "{out}{err}"
    );
    let (ok, _, err) = run(
        "member@example.com",
        &["role", &team, &member_id, "--role", "member"],
    );
    assert!(!ok && err.contains("forbidden"), "{err}");
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[test]
fn serve_with_the_local_model_missing_fails_naming_the_fetch_script() {
    let data_dir = tempfile::tempdir().unwrap();
    // An empty per-machine model cache: this machine's real one may hold the model.
    let cache = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir.path())
        .env("XDG_CACHE_HOME", cache.path())
        .env("APEX_LOG", "warn")
        .env_remove("APEX_LLM_PROVIDER")
        .env_remove("APEX_MODEL_PATH")
        .output()
        .expect("run apex serve");
    assert!(
        !output.status.success(),
        "serve must fail without the model"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("scripts/fetch-model.sh") && stderr.contains("SmolLM2-135M-Instruct"),
        "the error names the model and the fetch script: {stderr}"
    );
}

#[test]
fn eval_scores_every_answer_of_the_question_set_on_the_template_writer() {
    let report = tempfile::NamedTempFile::new().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_apex"))
        .args([
            "eval",
            "--llm-provider",
            "template",
            "--users",
            "2",
            "--report",
        ])
        .arg(report.path())
        .env("APEX_LOG", "warn")
        .env_remove("APEX_DATABASE_URL")
        .output()
        .expect("run apex eval");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // Two users, every question: every check passes on every answer.
    let questions = stderr.lines().filter(|l| l.starts_with("user 0 ")).count();
    assert!(questions >= 50, "{stderr}");
    let all = format!(
        "| **every check** | **{}** | **{}** |",
        2 * questions,
        2 * questions
    );
    assert!(stdout.contains(&all), "{stdout}");
    let written = std::fs::read_to_string(report.path()).unwrap();
    assert!(
        written.contains(&all) && written.contains("Example answers"),
        "{written}"
    );
}

/// Runs `apex` in `dir` with no `APEX_*` variable from the test's environment but `env`.
fn apex_in(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_apex"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("APEX_") {
            command.env_remove(name);
        }
    }
    command
        .current_dir(dir)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run apex")
}

#[test]
fn config_show_layers_file_then_variables_then_flags_and_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = "file-jwt-secret-0123456789abcdefghijklmnop";
    std::fs::write(
        dir.path().join("apex.toml"),
        format!(
            "# the default file: ./apex.toml\n\
             bind = \"127.0.0.1:7001\"\n\
             llm_threads = 2\n\
             openai_model = \"from-file\"\n\
             database_url = \"postgres://apex:file-pw-123@db.internal:5432/apex\"\n\
             cors_origin = [\"https://a.example\", \"https://b.example\"]\n\
             jwt_secret = \"{jwt}\"\n"
        ),
    )
    .unwrap();
    let output = apex_in(
        dir.path(),
        &["config", "show", "--llm-threads", "4", "--no-demo-data"],
        &[
            ("APEX_LLM_THREADS", "3"),
            ("APEX_OPENAI_MODEL", "from-env"),
            ("APEX_OPENAI_API_KEY", "sk-env-key-456"),
            ("APEX_BUS_CHANNEL_PREFIX", "blue"),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for line in [
        "llm_threads = 4  # flag --llm-threads",
        "no_demo_data = true  # flag --no-demo-data",
        "openai_model = \"from-env\"  # env APEX_OPENAI_MODEL",
        "bus_channel_prefix = \"blue\"  # env APEX_BUS_CHANNEL_PREFIX",
        "bind = \"127.0.0.1:7001\"  # file ./apex.toml",
        "cors_origin = [\"https://a.example\", \"https://b.example\"]  # file ./apex.toml",
        "database_url = \"postgres://apex:***@db.internal:5432/apex\"  # file ./apex.toml",
        "jwt_secret = \"***\"  # file ./apex.toml",
        "openai_api_key = \"***\"  # env APEX_OPENAI_API_KEY",
        "llm_provider = \"local\"  # default",
        "data_dir = \"./data\"  # default",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{stdout}"
        );
    }
    for secret in ["file-pw-123", "sk-env-key-456", jwt] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
    }
    // The output is TOML that reads back to the same values.
    let table: toml::Table = toml::from_str(&stdout).expect("config show prints TOML");
    assert_eq!(table["llm_threads"].as_integer(), Some(4));
    assert_eq!(table["max_runs_per_user"].as_integer(), Some(3));

    // APEX_CONFIG names another file; --config beats it.
    std::fs::write(dir.path().join("other.toml"), "llm_threads = 7\n").unwrap();
    std::fs::write(dir.path().join("third.toml"), "llm_threads = 8\n").unwrap();
    let output = apex_in(
        dir.path(),
        &["config", "show"],
        &[("APEX_CONFIG", "other.toml")],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("llm_threads = 7  # file other.toml"),
        "{stdout}"
    );
    assert!(
        stdout.contains("bind = \"127.0.0.1:8000\"  # default"),
        "{stdout}"
    );
    let output = apex_in(
        dir.path(),
        &["config", "show", "--config", "third.toml"],
        &[("APEX_CONFIG", "other.toml")],
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("llm_threads = 8  # file third.toml"));
}

#[test]
fn config_errors_name_the_key_and_where_the_value_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let fails = |args: &[&str], env: &[(&str, &str)]| {
        let output = apex_in(dir.path(), args, env);
        assert!(!output.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    std::fs::write(dir.path().join("apex.toml"), "llm_threads = \"abc\"\n").unwrap();
    let stderr = fails(&["config", "show"], &[]);
    assert!(
        stderr.contains("./apex.toml: llm_threads: expected a positive integer")
            && stderr.contains("got \"abc\""),
        "{stderr}"
    );
    // A later layer that sets the key wins, so the file's bad value is not read.
    let output = apex_in(dir.path(), &["config", "show", "--llm-threads", "2"], &[]);
    assert!(output.status.success());

    std::fs::write(dir.path().join("apex.toml"), "llm_thread = 2\n").unwrap();
    let stderr = fails(&["config", "show"], &[]);
    assert!(
        stderr.contains("unknown key \"llm_thread\" (did you mean \"llm_threads\"?)"),
        "{stderr}"
    );
    // serve refuses it before doing anything else.
    let stderr = fails(&["serve", "--bind", "127.0.0.1:0"], &[]);
    assert!(stderr.contains("unknown key \"llm_thread\""), "{stderr}");
    std::fs::remove_file(dir.path().join("apex.toml")).unwrap();

    let stderr = fails(&["config", "show"], &[("APEX_MAX_RUNS_PER_USER", "0")]);
    assert!(
        stderr.contains("APEX_MAX_RUNS_PER_USER (environment): expected a positive integer"),
        "{stderr}"
    );
    let stderr = fails(&["config", "show", "--llm-provider", "gpt"], &[]);
    assert!(
        stderr.contains("--llm-provider: expected one of local, template, openai, got \"gpt\""),
        "{stderr}"
    );
    let stderr = fails(&["config", "show", "--config", "missing.toml"], &[]);
    assert!(stderr.contains("missing.toml"), "{stderr}");
    // A bad secret is named, never echoed.
    let stderr = fails(
        &["migrate"],
        &[("APEX_DATABASE_URL", "mysql://apex:pw-789@db/apex")],
    );
    assert!(stderr.contains("APEX_DATABASE_URL"), "{stderr}");
    assert!(!stderr.contains("pw-789"), "{stderr}");
    let stderr = fails(&["config", "show"], &[("APEX_JWT_SECRET", "too-short-jwt")]);
    assert!(
        stderr.contains("APEX_JWT_SECRET (environment): expected at least 32 characters"),
        "{stderr}"
    );
    assert!(!stderr.contains("too-short-jwt"), "{stderr}");
}

#[test]
fn each_layer_overrides_the_ones_below_and_a_mismatch_names_key_and_layer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("apex.toml");
    let line = |args: &[&str], env: &[(&str, &str)]| {
        let output = apex_in(dir.path(), args, env);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line = stdout
            .lines()
            .find(|line| line.starts_with("openai_timeout_secs = "));
        line.unwrap_or_default().to_string()
    };
    let show = ["config", "show"];
    let flag = ["config", "show", "--openai-timeout-secs", "63"];
    let env = [("APEX_OPENAI_TIMEOUT_SECS", "62")];
    assert_eq!(line(&show, &[]), "openai_timeout_secs = 60  # default");
    std::fs::write(&file, "openai_timeout_secs = 61\n").unwrap();
    assert_eq!(
        line(&show, &[]),
        "openai_timeout_secs = 61  # file ./apex.toml"
    );
    assert_eq!(
        line(&show, &env),
        "openai_timeout_secs = 62  # env APEX_OPENAI_TIMEOUT_SECS"
    );
    assert_eq!(
        line(&flag, &env),
        "openai_timeout_secs = 63  # flag --openai-timeout-secs"
    );
    // A value a higher layer replaces is never read, so a bad one there is no error.
    std::fs::write(&file, "openai_timeout_secs = \"soon\"\n").unwrap();
    assert_eq!(
        line(&show, &env),
        "openai_timeout_secs = 62  # env APEX_OPENAI_TIMEOUT_SECS"
    );

    let fails = |args: &[&str], env: &[(&str, &str)]| {
        let output = apex_in(dir.path(), args, env);
        assert!(!output.status.success(), "{args:?} must fail");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    std::fs::write(&file, "development_mode = \"sometimes\"\n").unwrap();
    let stderr = fails(&show, &[]);
    assert!(
        stderr.contains("./apex.toml: development_mode: expected true or false, got \"sometimes\""),
        "{stderr}"
    );
    std::fs::write(&file, "cors_origin = [\"https://a.example\", 8]\n").unwrap();
    let stderr = fails(&show, &[]);
    assert!(
        stderr.contains("./apex.toml: cors_origin: expected an array of strings, got an element 8"),
        "{stderr}"
    );
    std::fs::remove_file(&file).unwrap();
    let stderr = fails(&show, &[("APEX_LLM_TOP_P", "high")]);
    assert!(
        stderr
            .contains("APEX_LLM_TOP_P (environment): expected a number from 0 to 1, got \"high\""),
        "{stderr}"
    );
    let stderr = fails(&["config", "show", "--log-format", "xml"], &[]);
    assert!(
        stderr.contains("--log-format: expected one of human, json, got \"xml\""),
        "{stderr}"
    );

    // `migrate` reads the database keys only: another key's bad value is not its to refuse.
    std::fs::write(&file, "llm_threads = \"abc\"\ndata_dir = \"db\"\n").unwrap();
    let output = apex_in(dir.path(), &["migrate"], &[("APEX_LOG_FORMAT", "xml")]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dir.path().join("db").join("apex.db").exists());
}

/// Runs `apex user create` on `data_dir` with `stdin` as standard input.
fn user_create(
    data_dir: &std::path::Path,
    email: &str,
    password: Option<&str>,
    stdin: &str,
) -> std::process::Output {
    use std::io::Write;
    let mut command = Command::new(env!("CARGO_BIN_EXE_apex"));
    command
        .args(["user", "create", "--email", email, "--data-dir"])
        .arg(data_dir)
        .env_remove("APEX_DATABASE_URL")
        .env_remove("APEX_USER_PASSWORD")
        .env_remove("APEX_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(password) = password {
        command.env("APEX_USER_PASSWORD", password);
    }
    let mut child = command.spawn().expect("run apex user create");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

#[test]
fn user_create_makes_an_account_that_logs_in_over_http() {
    let data_dir = tempfile::tempdir().unwrap();
    let created = user_create(
        data_dir.path(),
        "Admin@Example.com",
        Some("an admin password"),
        "",
    );
    let stdout = String::from_utf8_lossy(&created.stdout).trim().to_string();
    assert!(
        created.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert!(
        uuid::Uuid::parse_str(&stdout).is_ok(),
        "prints the user id: {stdout:?}"
    );

    // The same email again, in any case: a stable refusal.
    let again = user_create(
        data_dir.path(),
        "admin@example.com",
        Some("another password"),
        "",
    );
    assert!(!again.status.success());
    assert_eq!(
        String::from_utf8_lossy(&again.stderr).trim(),
        "error: an account with this email already exists"
    );
    // Registration's rules, with registration's words.
    let bad_email = user_create(data_dir.path(), "not-an-email", Some("long enough!"), "");
    assert!(!bad_email.status.success());
    assert!(String::from_utf8_lossy(&bad_email.stderr).contains("email must be a valid address"));
    let short = user_create(data_dir.path(), "short@example.com", Some("short"), "");
    assert!(!short.status.success());
    assert!(
        String::from_utf8_lossy(&short.stderr).contains("password must be 8 to 1024 characters")
    );
    // Without the variable, the password is the first line of a piped standard input.
    let piped = user_create(
        data_dir.path(),
        "piped@example.com",
        None,
        "a piped password\n",
    );
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
    let none = user_create(data_dir.path(), "none@example.com", None, "");
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("APEX_USER_PASSWORD"));

    // A server on the same data folder lets both accounts log in.
    let server = start_server(data_dir.path());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let http = reqwest::Client::new();
        for (email, password, id) in [
            (
                "admin@example.com",
                "an admin password",
                Some(stdout.as_str()),
            ),
            ("piped@example.com", "a piped password", None),
        ] {
            let response = http
                .post(format!("{}/auth/login", server.address))
                .json(&serde_json::json!({"email": email, "password": password}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{email} logs in");
            let pair: serde_json::Value = response.json().await.unwrap();
            assert_eq!(pair["user"]["email"], email);
            if let Some(id) = id {
                assert_eq!(pair["user"]["id"], id);
            }
        }
        let wrong = http
            .post(format!("{}/auth/login", server.address))
            .json(
                &serde_json::json!({"email": "admin@example.com", "password": "another password"}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
    });
}

/// The subcommands listed under "Commands:" in a help text (without `help`).
fn listed_subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| line.starts_with("  "))
        // A name is indented by two; a wrapped description by more.
        .filter(|line| !line[2..].starts_with(' '))
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_command_has_help_with_an_example() {
    let mut pending: Vec<Vec<String>> = vec![Vec::new()];
    let mut seen = Vec::new();
    while let Some(path) = pending.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let output = apex(&args);
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "apex {args:?}");
        assert!(
            help.contains("Example"),
            "`apex {}` has no example:\n{help}",
            args.join(" ")
        );
        for sub in listed_subcommands(&help) {
            let mut child = path.clone();
            child.push(sub);
            pending.push(child);
        }
        seen.push(path.join(" "));
    }
    // The walk found the whole tree, nested commands included.
    for command in [
        "",
        "serve",
        "migrate",
        "chat",
        "loadgen",
        "usage import",
        "usage summary",
        "user create",
        "sessions list",
        "sessions revoke",
        "sessions logout-all",
        "config show",
    ] {
        assert!(seen.iter().any(|s| s == command), "{command:?} in {seen:?}");
    }
}

#[tokio::test]
async fn api_keys_are_made_listed_and_revoked_from_the_command_line() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server(data_dir.path());
    let email = "keys@example.com";
    let password = "a long enough password";
    let http = reqwest::Client::new();
    let base = server.address.clone();
    let apex = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(args)
            .args(["--server", &server.address, "--email", email])
            .env("APEX_PASSWORD", password)
            .output()
            .unwrap()
    };
    let summary = |key: String| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            http.get(format!("{base}/api/usage/summary"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let created = apex(&[
        "keys",
        "create",
        "--register",
        "--key-name",
        "reporting job",
        "--scope",
        "usage:read",
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    // The key alone on stdout (for `KEY=$(apex keys create ...)`), the note on stderr.
    let key = String::from_utf8_lossy(&created.stdout).trim().to_string();
    assert!(key.starts_with("apx_"), "{key}");
    assert!(String::from_utf8_lossy(&created.stderr).contains("only time"));
    assert_eq!(summary(key.clone()).await, 200);

    let listed = apex(&["keys", "list"]);
    let out = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.status.success(), "{out}");
    assert!(
        out.contains("reporting job") && out.contains("usage:read"),
        "{out}"
    );
    assert!(out.contains(&key[..12]), "listed by its prefix: {out}");
    assert!(!out.contains(&key[12..]), "never the key itself: {out}");
    let id = out
        .lines()
        .find(|line| line.contains("reporting job"))
        .and_then(|line| line.split_whitespace().next())
        .unwrap()
        .to_string();

    let bad = apex(&["keys", "create", "--key-name", "x", "--scope", "admin"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown scope"));

    let revoked = apex(&["keys", "revoke", &id]);
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert_eq!(summary(key).await, 401, "a revoked key is dead");
    let again = apex(&["keys", "revoke", &id]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not_found"));
}

#[test]
fn alerts_and_webhooks_are_managed_from_the_command_line() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = start_server_with(
        data_dir.path(),
        &[
            "--alert-poll-interval-ms",
            "50",
            "--webhook-allow-private-targets",
        ],
    );
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_apex"))
            .args(args)
            .args(["--server", &server.address, "--email", "alerts@example.com"])
            .env("APEX_PASSWORD", "a long enough password")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).to_string();
        let err = String::from_utf8_lossy(&output.stderr).to_string();
        (output.status.success(), out, err)
    };
    let until = |args: &[&str], wanted: &dyn Fn(&str) -> bool| {
        for _ in 0..100 {
            let (ok, out, err) = run(args);
            assert!(ok, "{out}{err}");
            if wanted(&out) {
                return out;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("{args:?} never showed what was wanted");
    };
    // Nothing listens on port 1: the attempt fails, and the log says why.
    let (ok, out, err) = run(&[
        "webhooks",
        "create",
        "http://127.0.0.1:1/hook",
        "--register",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("signing secret") && out.contains("whsec_"),
        "{out}"
    );
    let hook = out.split_whitespace().next().unwrap().to_string();
    let (ok, out, err) = run(&["webhooks", "test", &hook]);
    assert!(ok && out.contains("webhook.test"), "{out}{err}");
    let log = until(&["webhooks", "deliveries", &hook], &|out| {
        out.contains("#1 ")
    });
    assert!(log.contains("could not connect"), "{log}");

    let (ok, out, err) = run(&[
        "alerts",
        "create",
        "--kind",
        "spend_over",
        "--threshold-usd",
        "0.01",
        "--every",
        "hour",
    ]);
    assert!(ok, "{out}{err}");
    let rule = out.split_whitespace().next().unwrap().to_string();
    assert!(
        rule.starts_with("rule_") && out.contains("spend_over"),
        "{out}"
    );
    let raised = until(&["alerts", "raised"], &|out| {
        out.contains("explained by run")
    });
    assert!(raised.contains("this month reached $"), "{raised}");
    let (ok, out, err) = run(&["alerts", "create", "--kind", "sometimes"]);
    assert!(!ok && err.contains("validation_failed"), "{out}{err}");
    let (ok, out, _) = run(&["alerts", "list"]);
    assert!(ok && out.lines().count() == 1, "{out}");
    let (ok, out, err) = run(&["alerts", "delete", &rule]);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = run(&["alerts", "list"]);
    assert!(ok && out.contains("no alert rules"), "{out}");
    let (ok, out, err) = run(&["webhooks", "delete", &hook]);
    assert!(ok && out.contains("deleted"), "{out}{err}");
}
