//! Typed server settings and the `Secret` wrapper.
//!
//! One struct holds every knob; the `apex` binary fills it from its layered configuration
//! (defaults, `apex.toml`, `APEX_*` variables, flags).
//! Defaults are the embedded mode: SQLite in the data folder, in-process events (Redis
//! with `bus_url`, for several instances),
//! the embedded local model (falling back to the deterministic template writer), demo usage
//! data for new accounts.

use apex_protocol::threads::MultitaskStrategy;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The database's connection-pool limits: defined by the store, which applies them.
pub use apex_store::DatabasePool;

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

/// Which LLM writes answers (and helps triage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmProviderKind {
    /// The embedded model (SmolLM2-135M-Instruct) running in-process.
    Local,
    /// The deterministic template writer: no model at all.
    Template,
    /// Any OpenAI-compatible chat-completions server.
    OpenAi,
}

impl LlmProviderKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            LlmProviderKind::Local => "local",
            LlmProviderKind::Template => "template",
            LlmProviderKind::OpenAi => "openai",
        }
    }
}

impl FromStr for LlmProviderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "local" => Ok(Self::Local),
            "template" => Ok(Self::Template),
            "openai" => Ok(Self::OpenAi),
            other => Err(format!(
                "unknown LLM provider {other:?}; choose local, template or openai"
            )),
        }
    }
}

/// The embedded model.
#[derive(Debug, Clone)]
pub struct LocalModelSettings {
    /// The GGUF file; `None` means the per-machine cache that `scripts/fetch-model.sh`
    /// fills (or a copy in `<data_dir>/models/`); see [`default_model_path`].
    pub path: Option<PathBuf>,
    /// Dedicated inference threads.
    pub threads: usize,
    /// Requests that may wait for an inference thread before new ones wait to be queued.
    pub queue_capacity: usize,
    /// Requests one inference thread advances together, one forward pass per step.
    pub max_active_per_thread: usize,
    /// 0 means greedy decoding (the same prompt always gives the same answer).
    pub temperature: f32,
    /// Nucleus sampling mass when `temperature > 0`.
    pub top_p: f32,
    /// Sampling seed when `temperature > 0`; `None` draws one per request.
    pub seed: Option<u64>,
    /// Longest a run's request waits for the model to start on it; past it that run's
    /// answer is written by the template writer and says so. `None`: runs wait their turn.
    pub max_queue_wait: Option<Duration>,
}

impl Default for LocalModelSettings {
    fn default() -> Self {
        Self {
            path: None,
            threads: 1,
            queue_capacity: 64,
            max_active_per_thread: 16,
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            max_queue_wait: Some(Duration::from_secs(20)),
        }
    }
}

/// An OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, llama.cpp, LM Studio).
#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    /// Up to and including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub model: String,
    /// Sent as a bearer token; never logged.
    pub api_key: Option<Secret>,
    /// Longest wait for the response to start, and between two streamed chunks.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Retries after a 429, a 5xx or a connection failure, with exponential backoff.
    pub max_retries: u32,
    /// First backoff delay; doubled on each retry (a `Retry-After` header wins).
    pub retry_backoff: Duration,
    /// Ask for JSON-schema structured output where a request has a schema.
    pub structured_output: bool,
}

/// The LLM gateway: upstream providers `/v1/chat/completions` and `/v1/embeddings`
/// forward to, for keys with the `gateway` scope (see `crate::gateway`).
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// Empty: no gateway (only `apex` and the local model answer at `/v1`).
    pub upstreams: Vec<GatewayUpstream>,
    /// Longest wait for an upstream's response to start, and between two streamed chunks.
    pub timeout: Duration,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(120),
        }
    }
}

/// One OpenAI-compatible upstream of the gateway.
#[derive(Debug, Clone)]
pub struct GatewayUpstream {
    /// Its name, also the `provider` of the usage rows its calls make (`openai`), and the
    /// prefix that routes a model to it (`openai/gpt-4o`).
    pub name: String,
    /// Up to and including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Sent upstream as a bearer token; never logged.
    pub api_key: Option<Secret>,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key: None,
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            max_retries: 3,
            retry_backoff: Duration::from_millis(500),
            structured_output: true,
        }
    }
}

/// Alert rules and webhooks (see `crate::alerts`).
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// How often each instance looks for due ticks and webhook messages.
    pub poll_interval: Duration,
    pub webhooks: WebhookSettings,
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(5),
            webhooks: WebhookSettings::default(),
        }
    }
}

/// How webhooks are delivered (see `crate::alerts::webhooks`).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// Wait after each failed attempt before the next; the delivery fails after the last.
    pub retry_delays: Vec<Duration>,
    /// Longest wait for a receiver's answer.
    pub timeout: Duration,
    /// Allow targets on loopback and private networks (tests; a private deployment).
    pub allow_private_targets: bool,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        let s = Duration::from_secs;
        Self {
            // Standard Webhooks' suggested schedule.
            retry_delays: vec![
                s(5),
                s(5 * 60),
                s(30 * 60),
                s(2 * 3600),
                s(5 * 3600),
                s(10 * 3600),
                s(10 * 3600),
            ],
            timeout: Duration::from_secs(15),
            allow_private_targets: false,
        }
    }
}

/// Made only by [`Settings::dev_login_enabled`]: holding one proves that the server runs
/// with `--development-mode --dev-login`.
#[derive(Debug, Clone, Copy)]
pub struct DevLoginEnabled(());

/// Delivery to clients of the original system (`docs/protocol.md` §9). Its web client keeps
/// only the first of several frames that arrive close together, so its connections get
/// their frames spaced out; every other connection is sent frames as fast as they come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyClientSettings {
    /// Browser origins the original web client is served from. A WebSocket whose `Origin`
    /// is one of them (and is allowed at all, see `cors_allowed_origins`) is paced.
    pub origins: Vec<String>,
    /// Least time between two frames on a paced connection.
    pub frame_gap: Duration,
    /// Least time before `final_report`, `error` and the terminal event on a paced
    /// connection (the frames that end a run on the client's screen).
    pub final_gap: Duration,
}

impl Default for LegacyClientSettings {
    fn default() -> Self {
        Self {
            origins: Vec::new(),
            frame_gap: Duration::from_millis(15),
            final_gap: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// Folder for the SQLite database and the generated JWT secret.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...` (also `postgresql://`); defaults to
    /// `sqlite://<data_dir>/apex.db`. A PostgreSQL URL may carry a password, so it stays
    /// wrapped: never log it.
    pub database_url: Option<Secret>,
    /// Connection pool of the database, whichever the engine.
    pub database_pool: DatabasePool,
    /// HS256 signing key; generated into `<data_dir>/jwt_secret` on first start if unset.
    pub jwt_secret: Option<Secret>,
    pub access_token_ttl: Duration,
    /// How long a refresh token may go unused; each rotation issues a fresh one.
    pub refresh_token_ttl: Duration,
    /// The absolute lifetime of a login session: rotation never extends it.
    pub session_lifetime: Duration,
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
    pub limits: LimitSettings,
    /// Browser origins allowed to call the API with credentials (CORS) and to open the
    /// WebSocket. Empty: no cross-origin access.
    pub cors_allowed_origins: Vec<String>,
    /// The browser origins Apex's own pages are served from (`https://apex.example.com`),
    /// allowed to open the WebSocket besides `cors_allowed_origins`; the first also names
    /// the URL in WebSocket tickets. Empty (the default): the loopback origins of the port
    /// the server listens on (`http://127.0.0.1:PORT`, `http://localhost:PORT`,
    /// `http://[::1]:PORT`), filled in by [`crate::serve`]. A page's origin is never
    /// compared with the request's `Host` header, which DNS rebinding lets an attacker's
    /// page choose.
    pub public_origins: Vec<String>,
    /// A development deployment: enables `dev_login` and reports itself in `/auth/config`.
    pub development_mode: bool,
    /// `POST /auth/dev/login` (log in or register in one call); needs `development_mode`.
    /// Code reaches the development login only through [`Settings::dev_login_enabled`].
    pub dev_login: bool,
    /// Paced delivery for the original web client (see [`LegacyClientSettings`]).
    pub legacy_client: LegacyClientSettings,
    /// Which LLM writes the answers; the template writer stands in when it fails.
    pub llm_provider: LlmProviderKind,
    pub local_model: LocalModelSettings,
    pub openai: OpenAiSettings,
    /// Upstream providers of the LLM gateway.
    pub gateway: GatewaySettings,
    /// Let triage ask the LLM (structured output) before its keyword rules.
    pub llm_triage: bool,
    /// `redis://...`: run as one of several instances, with events and stop requests
    /// carried between them over Redis. `None` (the default): the in-process bus, one
    /// instance. May carry a password: never log it.
    pub bus_url: Option<Secret>,
    /// Prefix of the Redis channel names, so deployments (or tests) sharing one Redis
    /// stay apart.
    pub bus_channel_prefix: String,
    /// With a bus: how often this instance records that it is alive.
    pub instance_heartbeat: Duration,
    /// With a bus: a run whose executing instance has not refreshed its heartbeat for
    /// this long is taken as orphaned (the instance died) and is recovered by a survivor.
    pub instance_stale_after: Duration,
    /// How many runs this instance executes at once; further runs wait in the queue (for
    /// this instance or any other with room). See `run::dispatch`.
    pub max_runs_per_instance: usize,
    /// How often an idle dispatcher looks at the queue without being told to (a safety
    /// net: submissions and requeues wake dispatchers directly).
    pub queue_poll_interval: Duration,
    /// How many times a run may be started. A run whose instance dies is queued again
    /// while it has attempts left, and ended `interrupted` after the last; 1 means never
    /// re-run.
    pub run_max_attempts: u32,
    /// What a message does to its thread's unfinished run when it names no
    /// `multitask_strategy` (double-texting): queue behind it, by default.
    pub default_multitask_strategy: MultitaskStrategy,
    /// How long a run waits for its user to answer a request for approval of its plan;
    /// unanswered by then, it ends `timed_out`.
    pub approval_timeout: Duration,
    /// Alert rules, scheduled reports and webhooks.
    pub alerts: AlertSettings,
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
            session_lifetime: Duration::from_secs(30 * 24 * 3600),
            password_hashing: PasswordHashing::Standard,
            demo_data: true,
            max_frame_bytes: 64 * 1024,
            run_timeout: Duration::from_secs(300),
            agent_timeout: Duration::from_secs(120),
            event_retention: Duration::from_secs(7 * 24 * 3600),
            ticket_ttl: Duration::from_secs(60),
            template_stream_delay: Duration::from_millis(15),
            shutdown_grace: Duration::from_secs(10),
            limits: LimitSettings::default(),
            cors_allowed_origins: Vec::new(),
            public_origins: Vec::new(),
            development_mode: false,
            dev_login: false,
            legacy_client: LegacyClientSettings::default(),
            llm_provider: LlmProviderKind::Local,
            local_model: LocalModelSettings::default(),
            openai: OpenAiSettings::default(),
            gateway: GatewaySettings::default(),
            llm_triage: true,
            bus_url: None,
            bus_channel_prefix: "apex".into(),
            instance_heartbeat: Duration::from_secs(2),
            instance_stale_after: Duration::from_secs(15),
            max_runs_per_instance: 256,
            queue_poll_interval: Duration::from_secs(1),
            run_max_attempts: 2,
            default_multitask_strategy: MultitaskStrategy::Enqueue,
            approval_timeout: Duration::from_secs(24 * 3600),
            alerts: AlertSettings::default(),
        }
    }

    /// Proof that the development login is on: both `development_mode` and `dev_login`.
    /// The one-step login of the dev account needs this value, so no code path can reach
    /// it in any other mode.
    pub fn dev_login_enabled(&self) -> Option<DevLoginEnabled> {
        (self.development_mode && self.dev_login).then_some(DevLoginEnabled(()))
    }

    /// The local model's GGUF file.
    pub fn local_model_path(&self) -> PathBuf {
        match &self.local_model.path {
            Some(path) => path.clone(),
            None => default_model_path(&self.data_dir),
        }
    }

    /// The database URL in effect (the explicit one, else the SQLite file in the data
    /// folder). It may carry a password: expose it only to open the connection.
    pub fn database_url(&self) -> Secret {
        match &self.database_url {
            Some(url) => url.clone(),
            None => Secret::new(format!(
                "sqlite://{}",
                self.data_dir.join("apex.db").display()
            )),
        }
    }
}

/// Configured limits; defaults are documented in `docs/isolation.md`.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitSettings {
    /// Runs one user may have executing at once; more get `TOO_MANY_RUNS`.
    pub max_concurrent_runs_per_user: usize,
    /// Run-starting messages per user per minute (WebSocket and REST together).
    pub messages_per_minute: u32,
    /// How many messages may arrive at once before the per-minute rate applies.
    pub message_burst: u32,
    /// Open connections per user: WebSockets and server-sent event streams together.
    pub max_connections_per_user: usize,
    /// Direct completions (`/v1/chat/completions` on the local model) one user may have in
    /// progress at once; a streaming one holds its place until the stream ends.
    pub max_completions_per_user: usize,
    /// Login attempts per account per 5 minutes.
    pub login_attempts_per_account: u32,
    /// Login attempts per client address per 5 minutes.
    pub login_attempts_per_address: u32,
    /// Accounts created per client address per minute (0: no limit, for load tests).
    pub registrations_per_minute: u32,
    /// Accounts created on this instance per minute, from all addresses (0: no limit).
    pub registrations_per_minute_total: u32,
    /// Refresh-token exchanges per client address per minute (0: no limit).
    pub refreshes_per_minute: u32,
    /// Threads a user creates per minute with `POST /api/threads` (0: no limit); a message
    /// without a thread is under the message rate already.
    pub threads_per_minute: u32,
    /// WebSocket tickets per user per minute (0: no limit).
    pub tickets_per_minute: u32,
    /// Usage imports per user per minute (0: no limit).
    pub imports_per_minute: u32,
    /// Most usage rows one user may have stored; an import that would go past it is
    /// refused whole (`import_quota_exceeded`). Rows the server adds itself (demo data, its
    /// own LLM calls) count but are never refused.
    pub import_row_quota: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_concurrent_runs_per_user: 3,
            messages_per_minute: 30,
            message_burst: 10,
            max_connections_per_user: 10,
            max_completions_per_user: 2,
            login_attempts_per_account: 10,
            login_attempts_per_address: 100,
            registrations_per_minute: 20,
            registrations_per_minute_total: 300,
            refreshes_per_minute: 30,
            threads_per_minute: 60,
            tickets_per_minute: 60,
            imports_per_minute: 10,
            import_row_quota: 1_000_000,
        }
    }
}

/// The model file `scripts/fetch-model.sh` installs, relative to a data folder (the layout
/// of earlier versions, still honoured).
pub const DEFAULT_MODEL_FILE: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model's file name in the per-machine cache.
pub const MODEL_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The per-machine model cache: `$XDG_CACHE_HOME/apex/models/<file>` (an absolute
/// `XDG_CACHE_HOME`, as the XDG spec requires), else `$HOME/.cache/apex/models/<file>`.
pub fn machine_cache_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|home| home.join(".cache"))
        })?;
    Some(base.join("apex").join("models").join(MODEL_FILE_NAME))
}

/// Where the model is when no path is configured: `<data_dir>/models/<file>` if that file
/// exists (earlier versions fetched it there), else the per-machine cache, which is what
/// `scripts/fetch-model.sh` fills. So a new data folder works on a machine that has the
/// model, without fetching it again.
pub fn default_model_path(data_dir: &Path) -> PathBuf {
    model_path_in(data_dir, machine_cache_path())
}

fn model_path_in(data_dir: &Path, machine_cache: Option<PathBuf>) -> PathBuf {
    let in_data_dir = data_dir.join(DEFAULT_MODEL_FILE);
    if in_data_dir.is_file() {
        return in_data_dir;
    }
    machine_cache.unwrap_or(in_data_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_data_folder_uses_the_machine_cache_and_an_old_one_its_own_copy() {
        let data = std::env::temp_dir().join(format!("apex-model-path-{}", std::process::id()));
        let cache = PathBuf::from("/cache/apex/models").join(MODEL_FILE_NAME);
        assert_eq!(model_path_in(&data, Some(cache.clone())), cache);
        std::fs::create_dir_all(data.join("models")).unwrap();
        std::fs::write(data.join(DEFAULT_MODEL_FILE), b"gguf").unwrap();
        assert_eq!(
            model_path_in(&data, Some(cache)),
            data.join(DEFAULT_MODEL_FILE)
        );
        std::fs::remove_dir_all(&data).unwrap();
        assert_eq!(model_path_in(&data, None), data.join(DEFAULT_MODEL_FILE));
    }
}
