//! Layered configuration: one table of keys, four layers.
//!
//! Every setting of `apex serve` is a key in [`KEYS`]. Its value is taken from the highest
//! of these layers that sets it:
//!
//! 1. the built-in default;
//! 2. the configuration file, TOML with flat keys named like the flags in snake_case
//!    (`bind = "127.0.0.1:8000"`, `llm_threads = 2`); its path is `--config FILE`, else
//!    `APEX_CONFIG`, else `./apex.toml` if that file exists;
//! 3. the key's `APEX_*` environment variable (an empty variable counts as unset);
//! 4. the command-line flag.
//!
//! Only the winning value is parsed. A bad value fails the command with a message naming
//! the key and its layer (`apex.toml: llm_threads: expected a positive integer, got "abc"`),
//! and an unknown key in the file is an error, so a typo is never silently ignored. Keys
//! that hold secrets (`jwt_secret`, `openai_api_key`, and the passwords inside
//! `database_url` and `bus_url`) are kept in [`Secret`]s, never echoed in errors, and shown
//! redacted by `apex config show` ([`Resolved::render`]). Secrets have no flag: a flag
//! would be visible in the process list.
//!
//! The flags are built from the same table ([`ServeFlags`] for `serve` and `config show`,
//! [`DatabaseFlags`] for `migrate` and `user create`), so a key, its flag, its variable and
//! its help text are declared once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use apex_server::settings::{DatabasePool, LlmProviderKind, Secret, Settings};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches};

/// The file read when neither `--config` nor `APEX_CONFIG` names one (if it exists).
pub const DEFAULT_CONFIG_FILE: &str = "apex.toml";
/// The variable naming the configuration file.
pub const CONFIG_ENV: &str = "APEX_CONFIG";

/// What a key's value must look like.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Any non-empty text.
    Text,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// A file or folder path.
    Path,
    /// `HOST:PORT`.
    Addr,
    /// A whole number in `min..=max`.
    Int { min: u64, max: u64 },
    /// A number in `min..=max`.
    Float { min: f64, max: f64 },
    /// `true` or `false` (also 1/0, yes/no, on/off).
    Bool,
    /// Several texts: an array in the file, comma-separated in a variable, a repeatable flag.
    List,
    /// A URL with one of these prefixes that may carry a password; kept secret, shown with
    /// the password masked.
    SecretUrl(&'static [&'static str]),
    /// A secret of at least `min_len` characters; never shown.
    Secret { min_len: usize },
}

/// Which commands read a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `serve`, `config show`, `migrate`, `user create`.
    Database,
    /// `serve` and `config show`.
    Serve,
}

/// One configuration key: its file name, flag, variable, default and help.
#[derive(Debug)]
pub struct Key {
    /// The name in the file (the flag in snake_case).
    pub name: &'static str,
    /// The long flag without `--`; `None` for secrets (environment or file only).
    pub flag: Option<&'static str>,
    /// The environment variable.
    pub env: &'static str,
    kind: Kind,
    /// The built-in default, parsed like any other value; `None`: unset unless given.
    default: Option<&'static str>,
    /// Shown by `config show` for an unset key without a default.
    unset_means: &'static str,
    scope: Scope,
    help: &'static str,
    value_name: &'static str,
}

const fn key(
    name: &'static str,
    env: &'static str,
    kind: Kind,
    default: Option<&'static str>,
    scope: Scope,
    help: &'static str,
) -> Key {
    Key {
        name,
        flag: None,
        env,
        kind,
        default,
        unset_means: "",
        scope,
        help,
        value_name: "VALUE",
    }
}

impl Key {
    const fn flag(mut self, flag: &'static str, value_name: &'static str) -> Key {
        self.flag = Some(flag);
        self.value_name = value_name;
        self
    }
    const fn unset(mut self, means: &'static str) -> Key {
        self.unset_means = means;
        self
    }
    fn is_secret(&self) -> bool {
        matches!(self.kind, Kind::Secret { .. } | Kind::SecretUrl(_))
    }
}

use Scope::{Database as Db, Serve as Sv};

/// Every key, in the order `config show` prints them.
pub static KEYS: &[Key] = &[
    key(
        "bind",
        "APEX_BIND",
        Kind::Addr,
        Some("127.0.0.1:8000"),
        Sv,
        "Address to listen on; port 0 picks a free port (printed on start).",
    )
    .flag("bind", "HOST:PORT"),
    key(
        "data_dir",
        "APEX_DATA_DIR",
        Kind::Path,
        Some("./data"),
        Db,
        "Folder for the SQLite database and the generated JWT secret.",
    )
    .flag("data-dir", "DIR"),
    key(
        "database_url",
        "APEX_DATABASE_URL",
        Kind::SecretUrl(&["sqlite:", "postgres://", "postgresql://"]),
        None,
        Db,
        "Database URL: `postgres://user:password@host:5432/db` (or `postgresql://`) for \
         PostgreSQL, `sqlite://path`; default `sqlite://<data-dir>/apex.db`. Prefer the \
         variable or the file when the URL has a password.",
    )
    .flag("database-url", "URL")
    .unset("sqlite://<data-dir>/apex.db"),
    key(
        "database_max_connections",
        "APEX_DATABASE_MAX_CONNECTIONS",
        Kind::Int {
            min: 1,
            max: 10_000,
        },
        Some("10"),
        Db,
        "Most database connections this instance holds open.",
    )
    .flag("database-max-connections", "N"),
    key(
        "database_acquire_timeout_secs",
        "APEX_DATABASE_ACQUIRE_TIMEOUT_SECS",
        Kind::Int { min: 1, max: 3600 },
        Some("10"),
        Db,
        "Seconds a query waits for a free database connection before failing.",
    )
    .flag("database-acquire-timeout-secs", "SECS"),
    key(
        "no_demo_data",
        "APEX_NO_DEMO_DATA",
        Kind::Bool,
        Some("false"),
        Sv,
        "Do not give new accounts 30 days of demo usage data.",
    )
    .flag("no-demo-data", ""),
    key(
        "cors_origin",
        "APEX_CORS_ALLOWED_ORIGINS",
        Kind::List,
        Some(""),
        Sv,
        "Browser origin allowed to call the API and open the WebSocket (repeatable; \
         comma-separated in the variable; an array in the file). None by default.",
    )
    .flag("cors-origin", "URL"),
    key(
        "development_mode",
        "APEX_DEVELOPMENT_MODE",
        Kind::Bool,
        Some("false"),
        Sv,
        "A development deployment (reported by /auth/config; needed by dev_login).",
    )
    .flag("development-mode", ""),
    key(
        "dev_login",
        "APEX_DEV_LOGIN",
        Kind::Bool,
        Some("false"),
        Sv,
        "Enable POST /auth/dev/login (log in or register in one call). Development only; \
         needs development_mode.",
    )
    .flag("dev-login", ""),
    key(
        "legacy_client_origin",
        "APEX_LEGACY_CLIENT_ORIGINS",
        Kind::List,
        Some(""),
        Sv,
        "Browser origin the original web client is served from (repeatable; comma-separated \
         in the variable; an array in the file); its WebSocket frames are paced. Each must \
         also be a cors_origin. None by default.",
    )
    .flag("legacy-client-origin", "URL"),
    key(
        "legacy_frame_gap_ms",
        "APEX_LEGACY_FRAME_GAP_MS",
        Kind::Int { min: 1, max: 1000 },
        Some("15"),
        Sv,
        "Least time between two WebSocket frames to the original web client, in milliseconds.",
    )
    .flag("legacy-frame-gap-ms", "MS"),
    key(
        "legacy_final_gap_ms",
        "APEX_LEGACY_FINAL_GAP_MS",
        Kind::Int {
            min: 0,
            max: 10_000,
        },
        Some("100"),
        Sv,
        "Least time before final_report, error and the terminal event on a connection of the \
         original web client, in milliseconds.",
    )
    .flag("legacy-final-gap-ms", "MS"),
    key(
        "max_runs_per_user",
        "APEX_MAX_RUNS_PER_USER",
        Kind::Int {
            min: 1,
            max: 100_000,
        },
        Some("3"),
        Sv,
        "Runs one user may have executing at once.",
    )
    .flag("max-runs-per-user", "N"),
    key(
        "messages_per_minute",
        "APEX_MESSAGES_PER_MINUTE",
        Kind::Int {
            min: 1,
            max: u32::MAX as u64,
        },
        Some("30"),
        Sv,
        "Run-starting messages per user per minute, after the burst.",
    )
    .flag("messages-per-minute", "N"),
    key(
        "message_burst",
        "APEX_MESSAGE_BURST",
        Kind::Int {
            min: 1,
            max: u32::MAX as u64,
        },
        Some("10"),
        Sv,
        "Run-starting messages a user may send at once before the per-minute rate applies.",
    )
    .flag("message-burst", "N"),
    key(
        "max_connections_per_user",
        "APEX_MAX_CONNECTIONS_PER_USER",
        Kind::Int {
            min: 1,
            max: 100_000,
        },
        Some("10"),
        Sv,
        "Open WebSocket connections per user.",
    )
    .flag("max-connections-per-user", "N"),
    key(
        "template_stream_delay_ms",
        "APEX_TEMPLATE_STREAM_DELAY_MS",
        Kind::Int {
            min: 0,
            max: 60_000,
        },
        Some("15"),
        Sv,
        "Delay between streamed answer chunks of the template writer, in milliseconds.",
    )
    .flag("template-stream-delay-ms", "MS"),
    key(
        "metrics_bind",
        "APEX_METRICS_BIND",
        Kind::Addr,
        None,
        Sv,
        "Also serve `/metrics` on this separate address (it is always on the main one).",
    )
    .flag("metrics-bind", "HOST:PORT")
    .unset("only on the main address"),
    key(
        "log_format",
        "APEX_LOG_FORMAT",
        Kind::Choice(&["human", "json"]),
        Some("human"),
        Sv,
        "Log format: `human` or `json` (the filter is APEX_LOG, `info` by default).",
    )
    .flag("log-format", "FORMAT"),
    key(
        "llm_provider",
        "APEX_LLM_PROVIDER",
        Kind::Choice(&["local", "template", "openai"]),
        Some("local"),
        Sv,
        "Who writes the answers: `local` (the embedded model), `template` (no model) or \
         `openai` (any OpenAI-compatible server). The template writer stands in if it fails.",
    )
    .flag("llm-provider", "PROVIDER"),
    key(
        "model_path",
        "APEX_MODEL_PATH",
        Kind::Path,
        None,
        Sv,
        "The local model's GGUF file (installed once per machine by scripts/fetch-model.sh).",
    )
    .flag("model-path", "FILE")
    .unset("$XDG_CACHE_HOME/apex/models/SmolLM2-135M-Instruct.Q4_1.gguf (else ~/.cache/...; a copy in <data-dir>/models/ is used first)"),
    key(
        "llm_threads",
        "APEX_LLM_THREADS",
        Kind::Int { min: 1, max: 1024 },
        Some("1"),
        Sv,
        "Dedicated inference threads for the local model.",
    )
    .flag("llm-threads", "N"),
    key(
        "llm_temperature",
        "APEX_LLM_TEMPERATURE",
        Kind::Float { min: 0.0, max: 2.0 },
        Some("0.0"),
        Sv,
        "Sampling temperature of the local model; 0 is greedy (deterministic).",
    )
    .flag("llm-temperature", "T"),
    key(
        "llm_top_p",
        "APEX_LLM_TOP_P",
        Kind::Float { min: 0.0, max: 1.0 },
        Some("1.0"),
        Sv,
        "Nucleus sampling mass of the local model when the temperature is above 0.",
    )
    .flag("llm-top-p", "P"),
    key(
        "openai_base_url",
        "APEX_OPENAI_BASE_URL",
        Kind::Text,
        Some("https://api.openai.com/v1"),
        Sv,
        "OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:11434/v1.",
    )
    .flag("openai-base-url", "URL"),
    key(
        "openai_model",
        "APEX_OPENAI_MODEL",
        Kind::Text,
        Some("gpt-4o-mini"),
        Sv,
        "Model name for the OpenAI-compatible provider.",
    )
    .flag("openai-model", "MODEL"),
    key(
        "openai_api_key",
        "APEX_OPENAI_API_KEY",
        Kind::Secret { min_len: 1 },
        None,
        Sv,
        "API key of the OpenAI-compatible provider (variable or file only; never logged).",
    )
    .unset("no key sent"),
    key(
        "openai_timeout_secs",
        "APEX_OPENAI_TIMEOUT_SECS",
        Kind::Int { min: 1, max: 3600 },
        Some("60"),
        Sv,
        "Seconds to wait for the provider's response to start and between streamed chunks.",
    )
    .flag("openai-timeout-secs", "SECS"),
    key(
        "openai_max_retries",
        "APEX_OPENAI_MAX_RETRIES",
        Kind::Int { min: 0, max: 100 },
        Some("3"),
        Sv,
        "Retries on 429/5xx/connection failures, with exponential backoff.",
    )
    .flag("openai-max-retries", "N"),
    key(
        "jwt_secret",
        "APEX_JWT_SECRET",
        Kind::Secret { min_len: 32 },
        None,
        Sv,
        "Token signing key, at least 32 characters, the same on every instance (variable or \
         file only; never logged).",
    )
    .unset("generated into <data-dir>/jwt_secret"),
    key(
        "bus_url",
        "APEX_BUS_URL",
        Kind::SecretUrl(&["redis://"]),
        None,
        Sv,
        "Run as one of several instances: `redis://[:password@]host:6379[/db]` carries \
         events and stop requests between them (needs a shared PostgreSQL and a shared \
         jwt_secret). Prefer the variable or the file when the URL has a password.",
    )
    .flag("bus-url", "URL")
    .unset("one instance, in-process events"),
    key(
        "bus_channel_prefix",
        "APEX_BUS_CHANNEL_PREFIX",
        Kind::Text,
        Some("apex"),
        Sv,
        "Prefix of the Redis channel names (deployments sharing one Redis need different ones).",
    )
    .flag("bus-channel-prefix", "PREFIX"),
    key(
        "instance_heartbeat_ms",
        "APEX_INSTANCE_HEARTBEAT_MS",
        Kind::Int {
            min: 50,
            max: 600_000,
        },
        Some("2000"),
        Sv,
        "With bus_url: how often this instance records that it is alive, in milliseconds.",
    )
    .flag("instance-heartbeat-ms", "MS"),
    key(
        "instance_stale_after_ms",
        "APEX_INSTANCE_STALE_AFTER_MS",
        Kind::Int {
            min: 200,
            max: 3_600_000,
        },
        Some("15000"),
        Sv,
        "With bus_url: a run whose instance has not refreshed it for this long (ms) is taken \
         as orphaned and recovered by another instance (see run_max_attempts). Keep it several \
         heartbeats long.",
    )
    .flag("instance-stale-after-ms", "MS"),
    key(
        "shutdown_grace_ms",
        "APEX_SHUTDOWN_GRACE_MS",
        Kind::Int {
            min: 0,
            max: 3_600_000,
        },
        Some("10000"),
        Sv,
        "On SIGTERM/Ctrl-C: how long (ms) running runs may go on to finish. After it, runs end \
         `interrupted`; with bus_url they go back to the queue for another instance instead \
         (while they have attempts left).",
    )
    .flag("shutdown-grace-ms", "MS"),
    key(
        "max_runs_per_instance",
        "APEX_MAX_RUNS_PER_INSTANCE",
        Kind::Int {
            min: 1,
            max: 100_000,
        },
        Some("256"),
        Sv,
        "Runs this instance executes at once; more wait in the run queue for a free slot here \
         or on any other instance.",
    )
    .flag("max-runs-per-instance", "N"),
    key(
        "queue_poll_interval_ms",
        "APEX_QUEUE_POLL_INTERVAL_MS",
        Kind::Int {
            min: 10,
            max: 600_000,
        },
        Some("1000"),
        Sv,
        "How often an idle instance checks the run queue unprompted (ms); submissions wake it \
         at once.",
    )
    .flag("queue-poll-interval-ms", "MS"),
    key(
        "run_max_attempts",
        "APEX_RUN_MAX_ATTEMPTS",
        Kind::Int { min: 1, max: 10 },
        Some("2"),
        Sv,
        "How many times a run may be started: a run whose server died (crash, kill, lost \
         instance) runs again from the start while it has attempts left, and ends \
         `interrupted` after the last. 1: never re-run.",
    )
    .flag("run-max-attempts", "N"),
];

fn find_key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(&'static str),
    Flag(&'static str),
}

impl Source {
    /// The prefix of an error about `key` from this layer.
    fn locate(&self, key: &str) -> String {
        match self {
            Source::Default => format!("default {key}"),
            Source::File(path) => format!("{}: {key}", path.display()),
            Source::Env(var) => format!("{var} (environment)"),
            Source::Flag(flag) => format!("--{flag}"),
        }
    }

    /// Short label for `config show`.
    fn label(&self) -> String {
        match self {
            Source::Default => "default".into(),
            Source::File(path) => format!("file {}", path.display()),
            Source::Env(var) => format!("env {var}"),
            Source::Flag(flag) => format!("flag --{flag}"),
        }
    }
}

/// A value as given, before parsing.
#[derive(Debug, Clone)]
enum Input {
    /// One value; `shown` is how to quote it in an error.
    Scalar {
        text: String,
        shown: String,
    },
    List(Vec<String>),
}

impl Input {
    fn text(text: impl Into<String>) -> Input {
        let text = text.into();
        let shown = format!("{text:?}");
        Input::Scalar { text, shown }
    }

    fn from_toml(value: &toml::Value) -> Result<Input, String> {
        Ok(match value {
            toml::Value::String(s) => Input::text(s.clone()),
            toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                Input::Scalar {
                    text: value.to_string(),
                    shown: value.to_string(),
                }
            }
            toml::Value::Array(items) => Input::List(
                items
                    .iter()
                    .map(|item| match item {
                        toml::Value::String(s) => Ok(s.clone()),
                        other => Err(format!(
                            "expected an array of strings, got an element {other}"
                        )),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            toml::Value::Datetime(_) => return Err("expected a plain value, got a date".into()),
            toml::Value::Table(_) => {
                return Err("expected a plain value, got a table (keys are flat)".into())
            }
        })
    }
}

/// A parsed value.
#[derive(Debug, Clone)]
enum Value {
    Text(String),
    Int(u64),
    Float(f64),
    Bool(bool),
    List(Vec<String>),
    Addr(SocketAddr),
    Secret(Secret),
}

fn expected(what: &str, input: &Input, secret: bool) -> String {
    match input {
        _ if secret => format!("expected {what}"),
        Input::Scalar { shown, .. } => format!("expected {what}, got {shown}"),
        Input::List(_) => format!("expected {what}, got an array"),
    }
}

/// Parses `input` as `kind`; the error says what was expected and (unless secret) what came.
fn parse(kind: Kind, input: &Input) -> Result<Value, String> {
    let secret = matches!(kind, Kind::Secret { .. } | Kind::SecretUrl(_));
    if let Kind::List = kind {
        return Ok(Value::List(match input {
            Input::List(items) => items
                .iter()
                .flat_map(|item| item.split(','))
                .map(|item| item.trim().to_string())
                .filter(|item| !item.is_empty())
                .collect(),
            Input::Scalar { text, .. } => text
                .split(',')
                .map(|item| item.trim().to_string())
                .filter(|item| !item.is_empty())
                .collect(),
        }));
    }
    let what = match kind {
        Kind::Text => "a non-empty text".to_string(),
        Kind::Choice(words) => format!("one of {}", words.join(", ")),
        Kind::Path => "a path".into(),
        Kind::Addr => "HOST:PORT, e.g. 127.0.0.1:8000".into(),
        Kind::Int { min: 1, max } if max >= u64::from(u32::MAX) => "a positive integer".into(),
        Kind::Int { min: 1, max } => format!("a positive integer up to {max}"),
        Kind::Int { min, max } => format!("an integer from {min} to {max}"),
        Kind::Float { min, max } => format!("a number from {min} to {max}"),
        Kind::Bool => "true or false".into(),
        Kind::List => unreachable!("handled above"),
        Kind::SecretUrl(prefixes) => format!("a URL starting with {}", prefixes.join(" or ")),
        Kind::Secret { min_len } if min_len > 1 => format!("at least {min_len} characters"),
        Kind::Secret { .. } => "a non-empty text".into(),
    };
    let Input::Scalar { text, .. } = input else {
        return Err(expected(&what, input, secret));
    };
    let fail = || expected(&what, input, secret);
    let trimmed = text.trim();
    Ok(match kind {
        Kind::Text | Kind::Path => {
            if trimmed.is_empty() {
                return Err(fail());
            }
            Value::Text(text.clone())
        }
        Kind::Choice(words) => {
            let word = trimmed.to_ascii_lowercase();
            if !words.contains(&word.as_str()) {
                return Err(fail());
            }
            Value::Text(word)
        }
        Kind::Addr => Value::Addr(trimmed.parse().map_err(|_| fail())?),
        Kind::Int { min, max } => {
            let n: u64 = trimmed.parse().map_err(|_| fail())?;
            if !(min..=max).contains(&n) {
                return Err(fail());
            }
            Value::Int(n)
        }
        Kind::Float { min, max } => {
            let x: f64 = trimmed.parse().map_err(|_| fail())?;
            if !x.is_finite() || x < min || x > max {
                return Err(fail());
            }
            Value::Float(x)
        }
        Kind::Bool => Value::Bool(match trimmed.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(fail()),
        }),
        Kind::SecretUrl(prefixes) => {
            if !prefixes.iter().any(|p| trimmed.starts_with(p)) {
                return Err(fail());
            }
            Value::Secret(Secret::new(trimmed))
        }
        Kind::Secret { min_len } => {
            if trimmed.chars().count() < min_len {
                return Err(fail());
            }
            Value::Secret(Secret::new(trimmed))
        }
        Kind::List => unreachable!("handled above"),
    })
}

/// The end of `apex serve --help`: the layers, the keys without a flag, a file example.
const SERVE_AFTER_HELP: &str = "\
Each value comes from the highest layer that sets it: built-in default < configuration file \
< APEX_* variable < flag. `apex config show` prints the result and where each value came from.

Secrets have no flag (it would show in `ps`): APEX_JWT_SECRET / jwt_secret (at least 32 \
characters) and APEX_OPENAI_API_KEY / openai_api_key. APEX_LOG sets the log filter.

Example apex.toml (flat keys, the flags in snake_case; unknown keys are an error):
    bind = \"0.0.0.0:8000\"
    data_dir = \"/var/lib/apex\"
    llm_provider = \"openai\"
    openai_base_url = \"http://127.0.0.1:11434/v1\"
    cors_origin = [\"https://chat.example.com\"]

Examples:
    apex serve --bind 127.0.0.1:8000 --data-dir ./data
    APEX_DATABASE_URL=postgres://apex:secret@db/apex apex serve --config /etc/apex/apex.toml";

/// The values given on the command line, by key name, and `--config`.
#[derive(Debug, Clone, Default)]
pub struct FlagValues {
    pub config: Option<PathBuf>,
    values: BTreeMap<&'static str, Input>,
}

impl FlagValues {
    fn augment(cmd: clap::Command, scope: Scope) -> clap::Command {
        let cmd = cmd.arg(
            Arg::new("config")
                .long("config")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help(format!(
                    "Configuration file (TOML, keys named like the flags in snake_case) \
                     [env: {CONFIG_ENV}] [default: ./{DEFAULT_CONFIG_FILE} if it exists]"
                )),
        );
        let cmd = if scope == Scope::Serve {
            cmd.after_long_help(SERVE_AFTER_HELP)
        } else {
            cmd
        };
        KEYS.iter()
            .filter(|k| scope == Scope::Serve || k.scope == scope)
            .fold(cmd, |cmd, key| {
                let Some(flag) = key.flag else { return cmd };
                let default = match key.default {
                    Some(d) if !d.is_empty() && !matches!(key.kind, Kind::Bool) => {
                        format!(" [default: {d}]")
                    }
                    _ => String::new(),
                };
                let help = format!("{} [env: {}]{default}", key.help, key.env);
                let arg = Arg::new(key.name).long(flag).help(help);
                cmd.arg(match key.kind {
                    Kind::Bool => arg.action(ArgAction::SetTrue),
                    Kind::List => arg.action(ArgAction::Append).value_name(key.value_name),
                    _ => arg.action(ArgAction::Set).value_name(key.value_name),
                })
            })
    }

    fn from_matches(matches: &ArgMatches, scope: Scope) -> FlagValues {
        let mut values = BTreeMap::new();
        for key in KEYS
            .iter()
            .filter(|k| k.flag.is_some() && (scope == Scope::Serve || k.scope == scope))
        {
            if matches.value_source(key.name) != Some(ValueSource::CommandLine) {
                continue;
            }
            let input = match key.kind {
                Kind::Bool => Input::text(matches.get_flag(key.name).to_string()),
                Kind::List => Input::List(
                    matches
                        .get_many::<String>(key.name)
                        .map(|v| v.cloned().collect())
                        .unwrap_or_default(),
                ),
                _ => match matches.get_one::<String>(key.name) {
                    Some(value) => Input::text(value.clone()),
                    None => continue,
                },
            };
            values.insert(key.name, input);
        }
        FlagValues {
            config: matches.get_one::<PathBuf>("config").cloned(),
            values,
        }
    }
}

macro_rules! flags_type {
    ($name:ident, $scope:expr) => {
        impl clap::FromArgMatches for $name {
            fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
                Ok($name(FlagValues::from_matches(matches, $scope)))
            }
            fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
                *self = $name(FlagValues::from_matches(matches, $scope));
                Ok(())
            }
        }
        impl clap::Args for $name {
            fn augment_args(cmd: clap::Command) -> clap::Command {
                FlagValues::augment(cmd, $scope)
            }
            fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
                FlagValues::augment(cmd, $scope)
            }
        }
    };
}

/// `--config` and a flag for every key: `apex serve`, `apex config show`.
#[derive(Debug, Clone, Default)]
pub struct ServeFlags(pub FlagValues);
flags_type!(ServeFlags, Scope::Serve);

/// `--config` and the database keys' flags: `apex migrate`, `apex user create`.
#[derive(Debug, Clone, Default)]
pub struct DatabaseFlags(pub FlagValues);
flags_type!(DatabaseFlags, Scope::Database);

/// Reads an environment variable; unset, empty or blank counts as unset.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<std::ffi::OsString>;

fn env_text(env: EnvLookup<'_>, var: &'static str) -> anyhow::Result<Option<String>> {
    match env(var) {
        None => Ok(None),
        Some(value) => match value.into_string() {
            Ok(text) if text.trim().is_empty() => Ok(None),
            Ok(text) => Ok(Some(text)),
            Err(_) => bail!("{var} (environment): not valid UTF-8"),
        },
    }
}

/// The effective value of every key in scope, with its source.
#[derive(Debug)]
pub struct Resolved {
    /// The configuration file that was read, if any.
    pub file: Option<PathBuf>,
    values: BTreeMap<&'static str, (Value, Source)>,
    scope: Scope,
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}

/// Reads the configuration file: `--config`, else `APEX_CONFIG`, else `./apex.toml` if
/// present. Checks that every key is known.
fn read_file(
    flags: &FlagValues,
    env: EnvLookup<'_>,
) -> anyhow::Result<Option<(PathBuf, toml::Table)>> {
    let path = match (&flags.config, env_text(env, CONFIG_ENV)?) {
        (Some(path), _) => path.clone(),
        (None, Some(path)) => PathBuf::from(path),
        (None, None) => {
            let default = Path::new(".").join(DEFAULT_CONFIG_FILE);
            if !default.exists() {
                return Ok(None);
            }
            default
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the configuration file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|err| anyhow::anyhow!("{}: not valid TOML: {}", path.display(), err.message()))?;
    for name in table.keys() {
        if find_key(name).is_none() {
            let suggestion = KEYS
                .iter()
                .map(|k| (distance(name, k.name), k.name))
                .filter(|(d, _)| *d <= 3)
                .min()
                .map(|(_, k)| format!(" (did you mean {k:?}?)"))
                .unwrap_or_default();
            bail!(
                "{}: unknown key {name:?}{suggestion}; `apex serve --help` lists the keys \
                 (the flags in snake_case)",
                path.display()
            );
        }
    }
    Ok(Some((path, table)))
}

fn resolve(flags: &FlagValues, env: EnvLookup<'_>, scope: Scope) -> anyhow::Result<Resolved> {
    let file = read_file(flags, env)?;
    let mut values = BTreeMap::new();
    for key in KEYS
        .iter()
        .filter(|k| scope == Scope::Serve || k.scope == scope)
    {
        let mut winner: Option<(Input, Source)> =
            key.default.map(|d| (Input::text(d), Source::Default));
        if let Some((path, table)) = &file {
            if let Some(value) = table.get(key.name) {
                let input = Input::from_toml(value).map_err(|e| {
                    anyhow::anyhow!("{}: {e}", Source::File(path.clone()).locate(key.name))
                })?;
                winner = Some((input, Source::File(path.clone())));
            }
        }
        if let Some(text) = env_text(env, key.env)? {
            winner = Some((Input::text(text), Source::Env(key.env)));
        }
        if let (Some(input), Some(flag)) = (flags.values.get(key.name), key.flag) {
            winner = Some((input.clone(), Source::Flag(flag)));
        }
        let Some((input, source)) = winner else {
            continue;
        };
        let value = parse(key.kind, &input)
            .map_err(|e| anyhow::anyhow!("{}: {e}", source.locate(key.name)))?;
        values.insert(key.name, (value, source));
    }
    let resolved = Resolved {
        file: file.map(|(path, _)| path),
        values,
        scope,
    };
    resolved.check()?;
    Ok(resolved)
}

/// `postgres://user:***@host/db`: the password of a URL masked (in the user-info part and
/// in a `password=` query parameter).
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some(parts) => parts,
        None => return url.to_string(),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                        format!("{name}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl Resolved {
    /// From the process's flags and environment.
    pub fn serve(flags: &ServeFlags) -> anyhow::Result<Resolved> {
        resolve(&flags.0, &|var| std::env::var_os(var), Scope::Serve)
    }

    /// The database keys only, from the process's flags and environment.
    pub fn database(flags: &DatabaseFlags) -> anyhow::Result<Resolved> {
        resolve(&flags.0, &|var| std::env::var_os(var), Scope::Database)
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name).map(|(value, _)| value)
    }

    fn source(&self, name: &str) -> String {
        self.values
            .get(name)
            .map(|(_, source)| source.locate(name))
            .unwrap_or_else(|| name.to_string())
    }

    // The accessors below read keys whose kind the table fixes; a mismatch is a bug in the
    // table, not bad input, and reads as the key being unset.
    fn text(&self, name: &str) -> Option<String> {
        match self.get(name) {
            Some(Value::Text(text)) => Some(text.clone()),
            _ => None,
        }
    }
    fn int(&self, name: &str) -> u64 {
        match self.get(name) {
            Some(Value::Int(n)) => *n,
            _ => 0,
        }
    }
    fn float(&self, name: &str) -> f64 {
        match self.get(name) {
            Some(Value::Float(x)) => *x,
            _ => 0.0,
        }
    }
    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some(Value::Bool(true)))
    }
    fn list(&self, name: &str) -> Vec<String> {
        match self.get(name) {
            Some(Value::List(items)) => items.clone(),
            _ => Vec::new(),
        }
    }
    fn addr(&self, name: &str) -> Option<SocketAddr> {
        match self.get(name) {
            Some(Value::Addr(addr)) => Some(*addr),
            _ => None,
        }
    }
    fn secret(&self, name: &str) -> Option<Secret> {
        match self.get(name) {
            Some(Value::Secret(secret)) => Some(secret.clone()),
            _ => None,
        }
    }

    /// Rules that involve more than one key.
    fn check(&self) -> anyhow::Result<()> {
        if self.scope != Scope::Serve {
            return Ok(());
        }
        if self.flag("dev_login") && !self.flag("development_mode") {
            bail!(
                "{}: dev_login needs development_mode (--development-mode)",
                self.source("dev_login")
            );
        }
        let allowed = self.list("cors_origin");
        let same = |a: &str, b: &str| {
            a.trim_end_matches('/')
                .eq_ignore_ascii_case(b.trim_end_matches('/'))
        };
        if let Some(origin) = self
            .list("legacy_client_origin")
            .into_iter()
            .find(|origin| !allowed.iter().any(|a| same(a, origin)))
        {
            // Paced delivery is only for origins that may open a socket at all; say so
            // rather than leave the client refused with 403.
            bail!(
                "{}: legacy_client_origin {origin:?} is not a cors_origin (--cors-origin {origin})",
                self.source("legacy_client_origin")
            );
        }
        if self.get("bus_url").is_some() {
            let url = self.database_url();
            if apex_server::store::Backend::from_url(url.expose())
                != apex_server::store::Backend::Postgres
            {
                bail!(
                    "{}: bus_url needs a shared PostgreSQL database (database_url postgres://...)",
                    self.source("bus_url")
                );
            }
            let heartbeat = self.int("instance_heartbeat_ms");
            if self.int("instance_stale_after_ms") < 2 * heartbeat {
                bail!(
                    "{}: instance_stale_after_ms must be at least twice instance_heartbeat_ms ({heartbeat})",
                    self.source("instance_stale_after_ms")
                );
            }
        }
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        PathBuf::from(self.text("data_dir").unwrap_or_else(|| "./data".into()))
    }

    fn database_url(&self) -> Secret {
        self.database_settings().database_url()
    }

    /// The settings of the database keys, the rest at their defaults.
    pub fn database_settings(&self) -> Settings {
        let mut settings = Settings::embedded(self.data_dir());
        settings.database_url = self.secret("database_url");
        settings.database_pool = DatabasePool {
            max_connections: u32::try_from(self.int("database_max_connections"))
                .unwrap_or(u32::MAX),
            acquire_timeout: Duration::from_secs(self.int("database_acquire_timeout_secs")),
        };
        settings
    }

    /// Everything `apex serve` needs.
    pub fn serve_config(&self) -> ServeConfig {
        let mut settings = self.database_settings();
        settings.demo_data = !self.flag("no_demo_data");
        settings.limits.max_concurrent_runs_per_user =
            usize::try_from(self.int("max_runs_per_user")).unwrap_or(usize::MAX);
        settings.limits.messages_per_minute =
            u32::try_from(self.int("messages_per_minute")).unwrap_or(u32::MAX);
        settings.limits.message_burst =
            u32::try_from(self.int("message_burst")).unwrap_or(u32::MAX);
        settings.limits.max_connections_per_user =
            usize::try_from(self.int("max_connections_per_user")).unwrap_or(usize::MAX);
        settings.cors_allowed_origins = self.list("cors_origin");
        settings.development_mode = self.flag("development_mode");
        settings.dev_login = self.flag("dev_login");
        settings.legacy_client.origins = self.list("legacy_client_origin");
        settings.legacy_client.frame_gap = Duration::from_millis(self.int("legacy_frame_gap_ms"));
        settings.legacy_client.final_gap = Duration::from_millis(self.int("legacy_final_gap_ms"));
        settings.template_stream_delay =
            Duration::from_millis(self.int("template_stream_delay_ms"));
        settings.llm_provider = self
            .text("llm_provider")
            .and_then(|p| p.parse().ok())
            .unwrap_or(LlmProviderKind::Local);
        settings.local_model.path = self.text("model_path").map(PathBuf::from);
        settings.local_model.threads = usize::try_from(self.int("llm_threads")).unwrap_or(1).max(1);
        settings.local_model.temperature = self.float("llm_temperature") as f32;
        settings.local_model.top_p = self.float("llm_top_p") as f32;
        if let Some(url) = self.text("openai_base_url") {
            settings.openai.base_url = url;
        }
        if let Some(model) = self.text("openai_model") {
            settings.openai.model = model;
        }
        settings.openai.timeout = Duration::from_secs(self.int("openai_timeout_secs").max(1));
        settings.openai.max_retries =
            u32::try_from(self.int("openai_max_retries")).unwrap_or(u32::MAX);
        settings.openai.api_key = self.secret("openai_api_key");
        settings.jwt_secret = self.secret("jwt_secret");
        settings.bus_url = self.secret("bus_url");
        if let Some(prefix) = self.text("bus_channel_prefix") {
            settings.bus_channel_prefix = prefix;
        }
        settings.instance_heartbeat = Duration::from_millis(self.int("instance_heartbeat_ms"));
        settings.instance_stale_after = Duration::from_millis(self.int("instance_stale_after_ms"));
        settings.shutdown_grace = Duration::from_millis(self.int("shutdown_grace_ms"));
        settings.max_runs_per_instance =
            usize::try_from(self.int("max_runs_per_instance")).unwrap_or(usize::MAX);
        settings.queue_poll_interval = Duration::from_millis(self.int("queue_poll_interval_ms"));
        settings.run_max_attempts = u32::try_from(self.int("run_max_attempts")).unwrap_or(1);
        ServeConfig {
            bind: self
                .addr("bind")
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000))),
            metrics_bind: self.addr("metrics_bind"),
            log_format: self.text("log_format").unwrap_or_else(|| "human".into()),
            settings,
        }
    }

    /// The effective configuration as TOML, secrets redacted, each line saying where its
    /// value came from. Unset keys without a default are comments.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# Effective configuration: defaults < configuration file < APEX_* variables < flags.\n",
        );
        match &self.file {
            Some(path) => out.push_str(&format!("# Configuration file: {}\n", path.display())),
            None => out.push_str(&format!(
                "# Configuration file: none (--config, {CONFIG_ENV} or ./{DEFAULT_CONFIG_FILE})\n"
            )),
        }
        for key in KEYS
            .iter()
            .filter(|k| self.scope == Scope::Serve || k.scope == self.scope)
        {
            let Some((value, source)) = self.values.get(key.name) else {
                out.push_str(&format!(
                    "# {} unset: {} (set {} or the file key)\n",
                    key.name, key.unset_means, key.env
                ));
                continue;
            };
            let shown = match (value, key.kind) {
                (Value::Secret(_), Kind::Secret { .. }) => toml::Value::from("***"),
                (Value::Secret(url), _) => toml::Value::from(redact_url(url.expose())),
                (Value::Text(text), _) => toml::Value::from(text.as_str()),
                (Value::Int(n), _) => toml::Value::Integer(i64::try_from(*n).unwrap_or(i64::MAX)),
                (Value::Float(x), _) => toml::Value::Float(*x),
                (Value::Bool(b), _) => toml::Value::Boolean(*b),
                (Value::List(items), _) => toml::Value::Array(
                    items
                        .iter()
                        .map(|i| toml::Value::from(i.as_str()))
                        .collect(),
                ),
                (Value::Addr(addr), _) => toml::Value::from(addr.to_string()),
            };
            debug_assert!(!key.is_secret() || matches!(value, Value::Secret(_)));
            out.push_str(&format!("{} = {shown}  # {}\n", key.name, source.label()));
        }
        out
    }
}

/// The effective configuration of `apex serve`.
#[derive(Debug)]
pub struct ServeConfig {
    pub bind: SocketAddr,
    pub metrics_bind: Option<SocketAddr>,
    pub log_format: String,
    pub settings: Settings,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> {
        move |var| {
            pairs
                .iter()
                .find(|(k, _)| *k == var)
                .map(|(_, v)| OsString::from(v))
        }
    }

    fn flags(pairs: &[(&'static str, &str)]) -> FlagValues {
        FlagValues {
            config: None,
            values: pairs
                .iter()
                .map(|(k, v)| (*k, Input::text(v.to_string())))
                .collect(),
        }
    }

    #[test]
    fn defaults_match_the_servers_embedded_settings() {
        let resolved = resolve(&FlagValues::default(), &env_of(&[]), Scope::Serve).unwrap();
        let config = resolved.serve_config();
        assert_eq!(
            format!("{:?}", config.settings),
            format!("{:?}", Settings::embedded("./data"))
        );
        assert_eq!(config.bind.to_string(), "127.0.0.1:8000");
        assert_eq!(config.log_format, "human");
        assert!(config.metrics_bind.is_none());
    }

    #[test]
    fn every_key_has_a_valid_default_and_a_unique_flag_and_variable() {
        let mut flags = std::collections::HashSet::new();
        let mut vars = std::collections::HashSet::new();
        for key in KEYS {
            if let Some(default) = key.default {
                parse(key.kind, &Input::text(default)).unwrap();
            } else {
                assert!(!key.unset_means.is_empty(), "{}", key.name);
            }
            if let Some(flag) = key.flag {
                assert_eq!(
                    flag.replace('-', "_"),
                    key.name,
                    "flag is the key in kebab-case"
                );
                assert!(flags.insert(flag));
            } else {
                assert!(key.is_secret(), "only secrets have no flag: {}", key.name);
            }
            assert!(vars.insert(key.env));
        }
    }

    #[test]
    fn flags_beat_variables_and_bad_values_name_their_source() {
        let env = env_of(&[("APEX_LLM_THREADS", "3"), ("APEX_BIND", "127.0.0.1:9")]);
        let resolved = resolve(&flags(&[("llm_threads", "5")]), &env, Scope::Serve).unwrap();
        let config = resolved.serve_config();
        assert_eq!(config.settings.local_model.threads, 5);
        assert_eq!(config.bind.port(), 9);

        let err = resolve(
            &FlagValues::default(),
            &env_of(&[("APEX_LLM_THREADS", "abc")]),
            Scope::Serve,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "APEX_LLM_THREADS (environment): expected a positive integer up to 1024, got \"abc\""
        );
        let err = resolve(&flags(&[("bind", "nope")]), &env_of(&[]), Scope::Serve)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--bind: expected HOST:PORT"), "{err}");
    }

    #[test]
    fn secrets_are_not_echoed_in_errors() {
        let err = resolve(
            &FlagValues::default(),
            &env_of(&[("APEX_JWT_SECRET", "short-secret-value")]),
            Scope::Serve,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("APEX_JWT_SECRET"), "{err}");
        assert!(!err.contains("short-secret-value"), "{err}");
        let err = resolve(
            &flags(&[("database_url", "mysql://u:pw-123@h/db")]),
            &env_of(&[]),
            Scope::Database,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("--database-url: expected a URL"), "{err}");
        assert!(!err.contains("pw-123"), "{err}");
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("postgres://apex:s3cret@db:5432/apex?sslmode=disable&password=x"),
            "postgres://apex:***@db:5432/apex?sslmode=disable&password=***"
        );
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            redact_url("sqlite://./data/apex.db"),
            "sqlite://./data/apex.db"
        );
    }

    #[test]
    fn legacy_client_origins_must_be_allowed_origins() {
        let err = resolve(
            &flags(&[("legacy_client_origin", "http://localhost:3000")]),
            &env_of(&[]),
            Scope::Serve,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("--legacy-client-origin: ") && err.contains("cors_origin"),
            "{err}"
        );
        let env = env_of(&[
            (
                "APEX_CORS_ALLOWED_ORIGINS",
                "http://localhost:3000/,https://app.example.com",
            ),
            ("APEX_LEGACY_CLIENT_ORIGINS", "http://localhost:3000"),
            ("APEX_LEGACY_FRAME_GAP_MS", "20"),
        ]);
        let settings = resolve(&FlagValues::default(), &env, Scope::Serve)
            .unwrap()
            .serve_config()
            .settings;
        assert_eq!(
            settings.legacy_client.origins,
            vec!["http://localhost:3000"]
        );
        assert_eq!(settings.legacy_client.frame_gap, Duration::from_millis(20));
        assert_eq!(settings.legacy_client.final_gap, Duration::from_millis(100));
        let err = resolve(
            &flags(&[("legacy_frame_gap_ms", "0")]),
            &env_of(&[]),
            Scope::Serve,
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("--legacy-frame-gap-ms: "), "{err}");
    }

    #[test]
    fn dev_login_needs_development_mode() {
        let err = resolve(&flags(&[("dev_login", "true")]), &env_of(&[]), Scope::Serve)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--dev-login") && err.contains("development_mode"),
            "{err}"
        );
    }
}
