//! The `apex` binary: `apex serve` runs the server, `apex migrate` brings the database
//! schema up to date, `apex chat` is a terminal client.

mod account;
mod chat;
mod usage;

/// mimalloc returns freed memory to the system far better than glibc's allocator under
/// many short-lived allocations on several threads (each run loads and drops the user's
/// usage rows), which keeps the server's resident size close to what it actually uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "apex", version, about = "Apex: a multi-user AI agent server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: SQLite in the data folder by default, or PostgreSQL with --database-url.
    ///
    /// Example: apex serve --bind 127.0.0.1:8000 --data-dir ./data
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations, then exit (`serve` also applies them at start).
    ///
    /// Example: apex migrate --database-url postgres://apex@db.internal/apex
    Migrate(MigrateArgs),
    /// Talk to a server from the terminal: register or log in, ask, watch the agents work.
    ///
    /// Example: apex chat --register --email me@example.com
    ///          apex chat --email me@example.com --message "How can I reduce my LLM costs?"
    Chat(chat::ChatArgs),
    /// Drive a running server with many simulated users and check isolation (loopback only).
    ///
    /// Example: apex loadgen --users 200 --connections 3 --runs 2 --chaos
    Loadgen(LoadgenArgs),
    /// Upload your usage data or print your usage summary.
    #[command(subcommand)]
    Usage(usage::UsageCommand),
}

#[derive(clap::Args)]
struct LoadgenArgs {
    /// Base URL of the server (must be a loopback address).
    #[arg(long, env = "APEX_SERVER", default_value = "http://127.0.0.1:8000")]
    server: String,
    /// Another instance of the same deployment (repeatable): connections are spread over
    /// --server and these.
    #[arg(long = "also-server")]
    also_servers: Vec<String>,
    /// Simulated users.
    #[arg(long, default_value_t = 50)]
    users: usize,
    /// Each user opens between 1 and this many connections.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Runs per user, one after another.
    #[arg(long, default_value_t = 2)]
    runs: usize,
    /// Upper bound on the whole load, in seconds.
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Seed of every random choice (printed, to reproduce a run).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Disconnect/resume, stop mid-run, invented thread ids, foreign run ids.
    #[arg(long)]
    chaos: bool,
    /// Print the report as one JSON object (for scripts such as bench/side_by_side.py).
    #[arg(long)]
    json: bool,
    /// Say `load starts` on stderr once every user is registered.
    #[arg(long)]
    announce: bool,
    /// Instead of runs: open this many idle authenticated WebSockets spread over the
    /// users, announce `registered` and `connected` on stderr, hold them for --hold seconds.
    #[arg(long)]
    idle_connections: Option<usize>,
    /// With --idle-connections: how long to keep them open, in seconds.
    #[arg(long, default_value_t = 10)]
    hold: u64,
}

async fn loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    let config = apex_loadgen::LoadConfig {
        base_url: args.server,
        also_servers: args.also_servers,
        users: args.users,
        max_connections_per_user: args.connections,
        runs_per_user: args.runs,
        seed: args.seed,
        chaos: args.chaos,
        max_duration: std::time::Duration::from_secs(args.duration),
        announce_start: args.announce,
        ..apex_loadgen::LoadConfig::default()
    };
    if let Some(connections) = args.idle_connections {
        let report =
            apex_loadgen::hold_idle(config, connections, Duration::from_secs(args.hold)).await?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let report = apex_loadgen::run(config).await?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{}", report.render());
    }
    for violation in report.violations.iter().take(20) {
        println!("violation: {violation}");
    }
    anyhow::ensure!(
        report.is_clean(),
        "isolation or delivery problems found (seed {})",
        report.seed
    );
    Ok(())
}

/// Where the data lives: shared by `serve` and `migrate`.
#[derive(clap::Args)]
struct DatabaseArgs {
    /// Folder for the SQLite database and the generated JWT secret.
    #[arg(long, env = "APEX_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Database URL: `postgres://user:password@host:5432/db` (or `postgresql://`) for
    /// PostgreSQL, `sqlite://path`; default `sqlite://<data-dir>/apex.db`.
    #[arg(long, env = "APEX_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Most database connections this instance holds open.
    #[arg(long, env = "APEX_DATABASE_MAX_CONNECTIONS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    database_max_connections: u32,
    /// Seconds a query waits for a free database connection before failing.
    #[arg(long, env = "APEX_DATABASE_ACQUIRE_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    database_acquire_timeout_secs: u64,
}

impl DatabaseArgs {
    fn settings(&self) -> apex_server::settings::Settings {
        let mut settings = apex_server::settings::Settings::embedded(&self.data_dir);
        settings.database_url = self.database_url.clone();
        settings.database_pool = apex_server::settings::DatabasePool {
            max_connections: self.database_max_connections,
            acquire_timeout: Duration::from_secs(self.database_acquire_timeout_secs),
        };
        settings
    }
}

#[derive(clap::Args)]
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (printed on start).
    #[arg(long, env = "APEX_BIND", default_value = "127.0.0.1:8000")]
    bind: SocketAddr,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Do not give new accounts 30 days of demo usage data.
    #[arg(long, env = "APEX_NO_DEMO_DATA")]
    no_demo_data: bool,
    /// Browser origin allowed to call the API and open the WebSocket (repeatable, or
    /// comma-separated in the variable). None by default.
    #[arg(
        long = "cors-origin",
        env = "APEX_CORS_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// A development deployment (reported by /auth/config; needed by --dev-login).
    #[arg(long, env = "APEX_DEVELOPMENT_MODE")]
    development_mode: bool,
    /// Enable POST /auth/dev/login (log in or register in one call). Development only.
    #[arg(long, env = "APEX_DEV_LOGIN", requires = "development_mode")]
    dev_login: bool,
    /// Runs one user may have executing at once.
    #[arg(long, env = "APEX_MAX_RUNS_PER_USER", default_value_t = 3,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_runs_per_user: u64,
    /// Run-starting messages per user per minute, after the burst.
    #[arg(long, env = "APEX_MESSAGES_PER_MINUTE", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..))]
    messages_per_minute: u32,
    /// Run-starting messages a user may send at once before the per-minute rate applies.
    #[arg(long, env = "APEX_MESSAGE_BURST", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    message_burst: u32,
    /// Open WebSocket connections per user.
    #[arg(long, env = "APEX_MAX_CONNECTIONS_PER_USER", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    max_connections_per_user: u64,
    /// Delay between streamed answer chunks of the template writer, in milliseconds.
    #[arg(long, env = "APEX_TEMPLATE_STREAM_DELAY_MS", default_value_t = 15)]
    template_stream_delay_ms: u64,
    /// Also serve `/metrics` on this separate address (it is always on the main one).
    #[arg(long, env = "APEX_METRICS_BIND")]
    metrics_bind: Option<SocketAddr>,
    /// Log format: `human` or `json`.
    #[arg(long, env = "APEX_LOG_FORMAT", default_value = "human")]
    log_format: String,
    /// Who writes the answers: `local` (the embedded model), `template` (no model) or
    /// `openai` (any OpenAI-compatible server). The template writer stands in if it fails.
    #[arg(long, env = "APEX_LLM_PROVIDER", default_value = "local")]
    llm_provider: apex_server::settings::LlmProviderKind,
    /// The local model's GGUF file [default: <data-dir>/models/SmolLM2-135M-Instruct.Q4_1.gguf,
    /// installed by scripts/fetch-model.sh].
    #[arg(long, env = "APEX_MODEL_PATH")]
    model_path: Option<PathBuf>,
    /// Dedicated inference threads for the local model.
    #[arg(long, env = "APEX_LLM_THREADS", default_value_t = 1)]
    llm_threads: usize,
    /// Sampling temperature of the local model; 0 is greedy (deterministic).
    #[arg(long, env = "APEX_LLM_TEMPERATURE", default_value_t = 0.0)]
    llm_temperature: f32,
    /// Nucleus sampling mass of the local model when the temperature is above 0.
    #[arg(long, env = "APEX_LLM_TOP_P", default_value_t = 1.0)]
    llm_top_p: f32,
    /// OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:11434/v1.
    #[arg(
        long,
        env = "APEX_OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    openai_base_url: String,
    /// Model name for the OpenAI-compatible provider.
    #[arg(long, env = "APEX_OPENAI_MODEL", default_value = "gpt-4o-mini")]
    openai_model: String,
    /// Seconds to wait for the provider's response to start and between streamed chunks.
    #[arg(long, env = "APEX_OPENAI_TIMEOUT_SECS", default_value_t = 60)]
    openai_timeout_secs: u64,
    /// Retries on 429/5xx/connection failures, with exponential backoff.
    #[arg(long, env = "APEX_OPENAI_MAX_RETRIES", default_value_t = 3)]
    openai_max_retries: u32,
    /// Run as one of several instances: `redis://[:password@]host:6379[/db]` carries events
    /// and stop requests between them (needs a shared PostgreSQL and a shared
    /// APEX_JWT_SECRET). Unset: one instance, in-process events. Prefer the variable when
    /// the URL has a password.
    #[arg(long, env = "APEX_BUS_URL", hide_env_values = true)]
    bus_url: Option<String>,
    /// Prefix of the Redis channel names (deployments sharing one Redis need different ones).
    #[arg(long, env = "APEX_BUS_CHANNEL_PREFIX", default_value = "apex")]
    bus_channel_prefix: String,
    /// With --bus-url: how often this instance records that it is alive, in milliseconds.
    #[arg(long, env = "APEX_INSTANCE_HEARTBEAT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(50..=600_000))]
    instance_heartbeat_ms: u64,
    /// With --bus-url: an instance silent this long (ms) is taken as dead and its unfinished
    /// runs are ended `interrupted` by the others. Keep it several heartbeats long.
    #[arg(long, env = "APEX_INSTANCE_STALE_AFTER_MS", default_value_t = 15000,
          value_parser = clap::value_parser!(u64).range(200..=3_600_000))]
    instance_stale_after_ms: u64,
}

fn init_logging(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("APEX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "human" => builder.init(),
        "json" => builder.json().init(),
        other => anyhow::bail!("--log-format must be `human` or `json`, not {other:?}"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received; draining");
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format)?;
    let mut settings = args.database.settings();
    settings.demo_data = !args.no_demo_data;
    settings.limits.max_concurrent_runs_per_user = args.max_runs_per_user as usize;
    settings.limits.messages_per_minute = args.messages_per_minute;
    settings.limits.message_burst = args.message_burst;
    settings.limits.max_connections_per_user = args.max_connections_per_user as usize;
    settings.cors_allowed_origins = args.cors_origins;
    settings.development_mode = args.development_mode;
    settings.dev_login = args.dev_login;
    settings.template_stream_delay =
        std::time::Duration::from_millis(args.template_stream_delay_ms);
    settings.llm_provider = args.llm_provider;
    settings.local_model.path = args.model_path;
    settings.local_model.threads = args.llm_threads.max(1);
    settings.local_model.temperature = args.llm_temperature;
    settings.local_model.top_p = args.llm_top_p;
    settings.openai.base_url = args.openai_base_url;
    settings.openai.model = args.openai_model;
    settings.openai.timeout = std::time::Duration::from_secs(args.openai_timeout_secs.max(1));
    settings.openai.max_retries = args.openai_max_retries;
    // Read from the environment only: a key on the command line would show in `ps`.
    settings.openai.api_key = std::env::var("APEX_OPENAI_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(apex_server::settings::Secret::new);
    // The same reasoning: several instances must share this key, and it is never logged.
    settings.jwt_secret = std::env::var("APEX_JWT_SECRET")
        .ok()
        .filter(|k| !k.is_empty())
        .map(apex_server::settings::Secret::new);
    if let Some(url) = args.bus_url.filter(|u| !u.trim().is_empty()) {
        anyhow::ensure!(
            url.starts_with("redis://"),
            "--bus-url must be a redis:// URL (no TLS is built in; use a trusted network or a local TLS proxy)"
        );
        anyhow::ensure!(
            apex_server::store::Backend::from_url(&settings.database_url())
                == apex_server::store::Backend::Postgres,
            "--bus-url needs a shared PostgreSQL database (--database-url postgres://...)"
        );
        anyhow::ensure!(
            args.instance_stale_after_ms >= 2 * args.instance_heartbeat_ms,
            "--instance-stale-after-ms must be at least twice --instance-heartbeat-ms"
        );
        settings.bus_url = Some(apex_server::settings::Secret::new(url));
    }
    settings.bus_channel_prefix = args.bus_channel_prefix;
    settings.instance_heartbeat = Duration::from_millis(args.instance_heartbeat_ms);
    settings.instance_stale_after = Duration::from_millis(args.instance_stale_after_ms);
    let listener = tokio::net::TcpListener::bind(args.bind)
        .await
        .with_context(|| format!("binding {}", args.bind))?;
    let mut state = apex_server::build_state(settings).await?;
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    apex_server::telemetry::describe();
    state.metrics = Some(metrics.clone());
    // Histograms are summarised lazily; keep their buckets fresh.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            metrics.run_upkeep();
        }
    });
    let metrics_listener = match args.metrics_bind {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("binding the metrics listener {address}"))?,
        ),
        None => None,
    };
    let address = listener.local_addr()?;
    // Scripts and tests read this line to find the port.
    println!("listening on http://{address}");
    if let Some(listener) = metrics_listener {
        let metrics_app = axum::Router::new()
            .route(
                "/metrics",
                axum::routing::get(apex_server::telemetry::render),
            )
            .with_state(state.clone());
        println!("metrics on http://{}/metrics", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, metrics_app).await });
    }
    apex_server::serve(listener, state, shutdown_signal()).await
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    init_logging("human")?;
    let settings = args.database.settings();
    let backend = apex_server::store::Backend::from_url(&settings.database_url());
    let store = apex_server::open_store(&settings).await?;
    store.ping().await.context("checking the database")?;
    println!("{} database is up to date", backend.name());
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The local model's inference threads are the only ones that should compute: candle's
    // own worker pool would otherwise add a spinning thread per core. This runs before any
    // other thread exists (the async runtime is built below), so changing the environment
    // is sound.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: starting the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Migrate(args) => migrate(args).await,
            Command::Chat(args) => chat::run(args).await,
            Command::Loadgen(args) => loadgen(args).await,
            Command::Usage(command) => usage::run(command).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
