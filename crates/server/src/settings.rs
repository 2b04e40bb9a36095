//! Typed server settings and the `Secret` wrapper.
//!
//! One struct holds every knob; the CLI fills it from flags and `APEX_*` variables.
//! Defaults are the embedded mode: SQLite in the data folder, in-process events,
//! the deterministic template writer, demo usage data for new accounts.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How expensive password hashing is. `Light` exists for tests only: argon2 with
/// production parameters takes seconds per hash in a debug build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordHashing {
    /// argon2id, 19 MiB, 2 passes (OWASP minimum).
    Standard,
    /// argon2id, 256 KiB, 1 pass. Never use in production.
    Light,
}

/// Connection-pool limits of the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabasePool {
    /// Most connections one instance holds open. With several instances on one PostgreSQL,
    /// keep `instances x max_connections` under the server's `max_connections` (100 by
    /// default).
    pub max_connections: u32,
    /// How long a query waits for a free connection before it fails (and the request
    /// answers 500, readiness 503) instead of hanging.
    pub acquire_timeout: Duration,
}

impl Default for DatabasePool {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Folder for the SQLite database and the generated JWT secret.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...` (also `postgresql://`); defaults to
    /// `sqlite://<data_dir>/apex.db`. A PostgreSQL URL may carry a password: never log it.
    pub database_url: Option<String>,
    /// Connection pool of the database, whichever the engine.
    pub database_pool: DatabasePool,
    /// HS256 signing key; generated into `<data_dir>/jwt_secret` on first start if unset.
    pub jwt_secret: Option<Secret>,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    pub password_hashing: PasswordHashing,
    /// Give each new account 30 days of generated usage data.
    pub demo_data: bool,
    /// Largest WebSocket frame a client may send; bigger ones close the socket with 1009.
    pub max_frame_bytes: usize,
    /// Longest a run may take before it ends `timed_out`.
    pub run_timeout: Duration,
    /// How long the event log of a finished run is kept for `resume` and replay. The run,
    /// its status and the thread's messages are kept regardless.
    pub event_retention: Duration,
    /// Longest one agent of a run may take before the run ends `timed_out`.
    pub agent_timeout: Duration,
    /// Default lifetime of a WebSocket ticket.
    pub ticket_ttl: Duration,
    /// Delay between streamed answer chunks of the template writer, so streaming is visible.
    pub template_stream_delay: Duration,
    /// On shutdown, how long running runs may continue before they end `interrupted`.
    pub shutdown_grace: Duration,
    /// Per-user fairness limits.
    pub limits: crate::limits::LimitSettings,
    /// Browser origins allowed to call the API with credentials (CORS) and to open the
    /// WebSocket. Empty: no cross-origin access.
    pub cors_allowed_origins: Vec<String>,
    /// A development deployment: enables `dev_login` and reports itself in `/auth/config`.
    pub development_mode: bool,
    /// `POST /auth/dev/login` (log in or register in one call); needs `development_mode`.
    pub dev_login: bool,
}

impl Settings {
    /// Embedded defaults rooted at `data_dir`.
    pub fn embedded(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            database_url: None,
            database_pool: DatabasePool::default(),
            jwt_secret: None,
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            password_hashing: PasswordHashing::Standard,
            demo_data: true,
            max_frame_bytes: 64 * 1024,
            run_timeout: Duration::from_secs(300),
            agent_timeout: Duration::from_secs(120),
            event_retention: Duration::from_secs(7 * 24 * 3600),
            ticket_ttl: Duration::from_secs(60),
            template_stream_delay: Duration::from_millis(15),
            shutdown_grace: Duration::from_secs(10),
            limits: crate::limits::LimitSettings::default(),
            cors_allowed_origins: Vec::new(),
            development_mode: false,
            dev_login: false,
        }
    }

    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("apex.db").display()),
        }
    }
}
