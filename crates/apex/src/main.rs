//! The `apex` binary: `apex serve` runs the server, `apex migrate` brings the database
//! schema up to date, `apex chat` is a terminal client, `apex usage` uploads and sums up
//! usage, `apex user create` makes an account, `apex config show` prints the configuration,
//! `apex loadgen` drives a server, `apex eval` scores the answers.
//!
//! Modules: `config` (the layered configuration: defaults < `apex.toml` < `APEX_*`
//! variables < flags), `account` (signing in), `chat` and `live` (the terminal client and
//! its live view), `eval` (the answer evaluation), `usage`, `user`.

mod account;
mod alerts;
mod budgets;
mod chat;
mod config;
mod eval;
mod keys;
mod live;
mod pricebook;
mod sessions;
mod teams;
mod terminal;
mod usage;
mod user;

/// mimalloc returns freed memory to the system far better than glibc's allocator under
/// many short-lived allocations on several threads (each run loads and drops the user's
/// usage rows), which keeps the server's resident size close to what it actually uses.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "apex",
    version,
    about = "Apex: a multi-user AI agent server",
    after_help = "Every command has --help with examples. Configuration: built-in defaults < \
apex.toml (--config FILE / APEX_CONFIG) < APEX_* variables < flags; `apex config show` prints it.

Examples:
    apex serve                                   # SQLite and the local model in ./data
    apex config show --llm-provider template     # what serve would run with
    APEX_USER_PASSWORD='a long password' apex user create --email ada@example.com
    APEX_PASSWORD='a long password' apex chat --email ada@example.com"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: SQLite in the data folder by default, or PostgreSQL with --database-url.
    ///
    /// Example: apex serve --bind 127.0.0.1:8000 --data-dir ./data
    #[command(verbatim_doc_comment)]
    Serve(config::ServeFlags),
    /// Apply pending database migrations, then exit (`serve` also applies them at start).
    ///
    /// Example: apex migrate --database-url postgres://apex@db.internal/apex
    #[command(verbatim_doc_comment)]
    Migrate(config::DatabaseFlags),
    /// Talk to a server from the terminal: register or log in, ask, watch the agents work.
    ///
    /// Example: apex chat --register --email me@example.com
    ///          apex chat --email me@example.com --message "How can I reduce my LLM costs?"
    #[command(verbatim_doc_comment)]
    Chat(chat::ChatArgs),
    /// Drive a running server with many simulated users and check isolation (loopback only).
    ///
    /// Example: apex loadgen --users 200 --connections 3 --runs 2 --chaos
    #[command(verbatim_doc_comment)]
    Loadgen(LoadgenArgs),
    /// Score the answers: ask a fixed question set of several users' demo data through the
    /// real pipeline (an in-process server on a throw-away folder) and check every answer.
    ///
    /// Example: apex eval --llm-provider template
    ///          apex eval --llm-provider local --users 2 --report /tmp/local.md
    #[command(verbatim_doc_comment)]
    Eval(eval::EvalArgs),
    /// Upload your usage data or print your usage summary.
    ///
    /// Example: APEX_PASSWORD=... apex usage import --email me@example.com usage.csv
    ///          APEX_PASSWORD=... apex usage summary --email me@example.com --days 7
    #[command(subcommand, verbatim_doc_comment)]
    Usage(usage::UsageCommand),
    /// The prices that cost your usage: list them, add your negotiated rates.
    ///
    /// Example: APEX_PASSWORD=... apex pricebook import --email me@example.com rates.json
    ///          APEX_PASSWORD=... apex pricebook list --email me@example.com --model gpt-4o
    #[command(subcommand, verbatim_doc_comment)]
    Pricebook(pricebook::PricebookCommand),
    /// Administer accounts directly in the database.
    ///
    /// Example: APEX_USER_PASSWORD='a long password' apex user create --email ada@example.com
    #[command(subcommand, verbatim_doc_comment)]
    User(user::UserCommand),
    /// See where your account is logged in; end one session or every one.
    ///
    /// Example: APEX_PASSWORD=... apex sessions list --email me@example.com
    ///          APEX_PASSWORD=... apex sessions logout-all --email me@example.com
    #[command(subcommand, verbatim_doc_comment)]
    Sessions(sessions::SessionsCommand),
    /// API keys for programs: make one (printed once), list them, revoke one.
    ///
    /// Example: APEX_PASSWORD=... apex keys create --email me@example.com --key-name etl --scope usage:write
    ///          APEX_PASSWORD=... apex keys list --email me@example.com
    #[command(subcommand, verbatim_doc_comment)]
    Keys(keys::KeysCommand),
    /// Caps on what your calls through the gateway may spend: set, list, delete.
    ///
    /// Example: APEX_PASSWORD=... apex budgets create --email me@example.com --limit-usd 25 --period month
    ///          APEX_PASSWORD=... apex budgets list --email me@example.com
    #[command(subcommand, verbatim_doc_comment)]
    Budgets(budgets::BudgetsCommand),
    /// Teams: make one, invite people (apex teams add), join, members, usage per member.
    ///
    /// Example: APEX_PASSWORD=... apex teams create --email me@example.com Platform
    ///          APEX_PASSWORD=... apex teams add --email me@example.com TEAM_ID --role admin
    #[command(subcommand, verbatim_doc_comment)]
    Teams(teams::TeamsCommand),
    /// Alert rules and scheduled reports: make, list, delete, and what they raised.
    ///
    /// Example: APEX_PASSWORD=... apex alerts create --email me@example.com --kind spend_over --threshold-usd 50
    ///          APEX_PASSWORD=... apex alerts raised --email me@example.com
    #[command(subcommand, verbatim_doc_comment)]
    Alerts(alerts::AlertsCommand),
    /// Webhooks alerts and reports are posted to (Standard Webhooks), and their delivery log.
    ///
    /// Example: APEX_PASSWORD=... apex webhooks create --email me@example.com https://hooks.example.com/apex
    ///          APEX_PASSWORD=... apex webhooks deliveries --email me@example.com WEBHOOK_ID
    #[command(subcommand, verbatim_doc_comment)]
    Webhooks(alerts::WebhooksCommand),
    /// Inspect the configuration `apex serve` would run with.
    ///
    /// Example: apex config show --config /etc/apex/apex.toml
    #[command(subcommand, verbatim_doc_comment)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (defaults < apex.toml < APEX_* variables < flags)
    /// as TOML, each key with where its value came from; secrets are shown as "***".
    ///
    /// Takes the same options as `apex serve`.
    ///
    /// Example: apex config show
    ///          APEX_LLM_THREADS=4 apex config show --config /etc/apex.toml --bind 0.0.0.0:8000
    #[command(verbatim_doc_comment)]
    Show(config::ServeFlags),
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
    /// Pause between a user's runs, in milliseconds (randomised 0.5-1.5x): 0 runs them
    /// back to back and saturates the server; more gives a paced load it can keep up with.
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
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
        think_time: Duration::from_millis(args.think_ms),
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

fn init_logging(format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("APEX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        config::LogFormat::Human => builder.init(),
        config::LogFormat::Json => builder.json().init(),
    }
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

async fn serve(flags: config::ServeFlags) -> anyhow::Result<()> {
    let config = config::Resolved::serve(&flags)?.serve_config();
    init_logging(config.log_format);
    let settings = config.settings;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("binding {}", config.bind))?;
    let mut state = apex_server::build_state(settings).await?;
    let metrics = apex_server::telemetry::prometheus_builder()
        .install_recorder()
        .context("installing the metrics recorder")?;
    apex_server::telemetry::describe();
    state.metrics = Some(metrics.clone());
    // The recorder drains its histograms' samples into their buckets lazily: keep /metrics fresh.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            metrics.run_upkeep();
        }
    });
    let metrics_listener = match config.metrics_bind {
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
                axum::routing::get(apex_server::http::health::metrics),
            )
            .with_state(state.clone());
        println!("metrics on http://{}/metrics", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, metrics_app).await });
    }
    apex_server::serve(listener, state, shutdown_signal()).await
}

async fn migrate(flags: config::DatabaseFlags) -> anyhow::Result<()> {
    let settings = config::Resolved::database(&flags)?.database_settings();
    init_logging(config::LogFormat::Human);
    let backend = apex_server::store::Backend::from_url(settings.database_url().expose());
    let store = apex_server::open_store(&settings).await?;
    store.ping().await.context("checking the database")?;
    println!("{} database is up to date", backend.name());
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The local model's inference threads are the only ones that should compute: candle's
    // own worker pool would otherwise add a spinning thread per core, and its f32 matrix
    // products (attention) would hand work to rayon's pool, which yields in a loop while it
    // waits, and count the CPUs again (reading /proc/cpuinfo) on every call: 20% of decode
    // time on this machine. This runs before any other thread exists (the async runtime is
    // built below), so changing the environment is sound.
    for variable in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(variable).is_none() {
            std::env::set_var(variable, "1");
        }
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
            Command::Serve(flags) => serve(flags).await,
            Command::Migrate(flags) => migrate(flags).await,
            Command::Config(ConfigCommand::Show(flags)) => {
                print!("{}", config::Resolved::serve(&flags)?.render()?);
                Ok(())
            }
            Command::Chat(args) => chat::run(args).await,
            Command::Eval(args) => eval::run(args).await,
            Command::Loadgen(args) => loadgen(args).await,
            Command::Usage(command) => usage::run(command).await,
            Command::Pricebook(command) => pricebook::run(command).await,
            Command::User(command) => user::run(command).await,
            Command::Sessions(command) => sessions::run(command).await,
            Command::Keys(command) => keys::run(command).await,
            Command::Budgets(command) => budgets::run(command).await,
            Command::Teams(command) => teams::run(command).await,
            Command::Alerts(command) => alerts::run_alerts(command).await,
            Command::Webhooks(command) => alerts::run_webhooks(command).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The chain may quote the server (a refusal's message): never its escapes.
            eprintln!("error: {}", terminal::clean(&format!("{err:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}
