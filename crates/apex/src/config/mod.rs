//! Typed, layered configuration: what `apex serve` (and `migrate`, `user create`, `eval`)
//! runs with, and where each value came from.
//!
//! This module owns the settings' outside spellings and their checking, so that the rest
//! of the binary only ever sees checked, typed values: [`Resolved::serve_config`] and
//! [`ResolvedDatabase::database_settings`] fill `apex_server::settings::Settings` from the
//! fields of [`Config`], never from a key's name, so a misspelt key or a kind mismatch is
//! a compile error or a test failure rather than a silent 0 or empty value.
//!
//! Every setting is a key in one table (`keys::KEYS`) with three spellings: a flag
//! (`--llm-threads 2`), an `APEX_*` variable (`APEX_LLM_THREADS=2`) and a flat key of the
//! TOML file (`llm_threads = 2`), and the field of [`Config`] it fills (`llm.threads`).
//! The field's type is the value's kind (`kinds`), its [`Default`] the built-in value.
//! A value is taken from the highest of these layers that sets it:
//!
//! 1. the built-in default;
//! 2. the configuration file, TOML with flat keys named like the flags in snake_case; its
//!    path is `--config FILE`, else `APEX_CONFIG`, else `./apex.toml` if that file exists;
//! 3. the key's `APEX_*` environment variable (an empty variable counts as unset);
//! 4. the command-line flag.
//!
//! The layers are figment providers (`layers`) merged in that order and deserialised into
//! [`Config`] with serde, so only the winning value is checked. A bad value fails the
//! command with a message naming the key and its layer (`apex.toml: llm_threads: expected a
//! positive integer, got "abc"`), and an unknown key in the file is an error with a "did you
//! mean", so a typo is never silently ignored. Keys that hold secrets (`jwt_secret`,
//! `openai_api_key`, and the passwords inside `database_url` and `bus_url`) are kept in
//! `Secret`s, never echoed in errors, and shown redacted by `apex config show`
//! ([`Resolved::render`], `show`). `jwt_secret` and `openai_api_key` have no flag: a flag
//! would be visible in the process list.
//!
//! The flags are built from the same table (`flags`: [`ServeFlags`] for `serve`,
//! `config show` and `eval`, [`DatabaseFlags`] for `migrate` and `user create`), so a key,
//! its flag, its variable and its help text are declared once.

mod flags;
mod keys;
mod kinds;
mod layers;
mod show;

use std::net::SocketAddr;

use anyhow::{anyhow, bail};
use apex_protocol::threads::MultitaskStrategy;
use apex_server::settings::{DatabasePool, GatewayUpstream, LlmProviderKind, Settings};
use serde::{Deserialize, Serialize};

pub use flags::{DatabaseFlags, ServeFlags};
pub use kinds::LogFormat;

use keys::Scope;
use kinds::{
    Addr, BusSchemes, DatabaseSchemes, Int, List, LlmProvider, MultitaskChoice, Number, PathValue,
    SecretText, SecretUrl, Switch, Text,
};
use layers::{EnvLookup, Layers};

/// The file read when neither `--config` nor `APEX_CONFIG` names one (if it exists).
const DEFAULT_CONFIG_FILE: &str = "apex.toml";
/// The variable naming the configuration file.
const CONFIG_ENV: &str = "APEX_CONFIG";

/// Every setting, grouped by what it configures. Each field is one key of the table; the
/// sections exist in code only (the file's keys are flat).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    server: Server,
    database: Database,
    limits: Limits,
    runs: Runs,
    llm: Llm,
    openai: OpenAi,
    gateway: Gateway,
    bus: Bus,
    legacy_client: LegacyClient,
    alerts: Alerts,
}

/// The listener, the log, browsers and sign-in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Server {
    bind: Addr,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics_bind: Option<Addr>,
    log_format: LogFormat,
    no_demo_data: Switch,
    cors_origins: List,
    public_origins: List,
    development_mode: Switch,
    dev_login: Switch,
    #[serde(skip_serializing_if = "Option::is_none")]
    jwt_secret: Option<SecretText<32>>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            bind: Addr::new(SocketAddr::from(([127, 0, 0, 1], 8000))),
            metrics_bind: None,
            log_format: LogFormat::Human,
            no_demo_data: Switch::OFF,
            cors_origins: List::default(),
            public_origins: List::default(),
            development_mode: Switch::OFF,
            dev_login: Switch::OFF,
            jwt_secret: None,
        }
    }
}

/// The database: the only section `migrate` and `user create` read.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Database {
    data_dir: PathValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<SecretUrl<DatabaseSchemes>>,
    max_connections: Int<1, 10_000>,
    acquire_timeout_secs: Int<1, 3600>,
}

impl Default for Database {
    fn default() -> Self {
        Database {
            data_dir: PathValue::new("./data"),
            url: None,
            max_connections: Int::new(10),
            acquire_timeout_secs: Int::new(10),
        }
    }
}

/// What one user may do at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Limits {
    max_runs_per_user: Int<1, 100_000>,
    messages_per_minute: Int<1, { u32::MAX as u64 }>,
    message_burst: Int<1, { u32::MAX as u64 }>,
    max_connections_per_user: Int<1, 100_000>,
    registrations_per_minute: Int<0, { u32::MAX as u64 }>,
    registrations_per_minute_total: Int<0, { u32::MAX as u64 }>,
    refreshes_per_minute: Int<0, { u32::MAX as u64 }>,
    threads_per_minute: Int<0, { u32::MAX as u64 }>,
    tickets_per_minute: Int<0, { u32::MAX as u64 }>,
    imports_per_minute: Int<0, { u32::MAX as u64 }>,
    max_completions_per_user: Int<1, 100_000>,
    import_row_quota: Int<1, 1_000_000_000_000>,
}

impl Default for Limits {
    fn default() -> Self {
        // The abuse limits' defaults are the server's own.
        let server = apex_server::settings::LimitSettings::default();
        Limits {
            max_runs_per_user: Int::new(3),
            messages_per_minute: Int::new(30),
            message_burst: Int::new(10),
            max_connections_per_user: Int::new(10),
            registrations_per_minute: Int::new(server.registrations_per_minute.into()),
            registrations_per_minute_total: Int::new(server.registrations_per_minute_total.into()),
            refreshes_per_minute: Int::new(server.refreshes_per_minute.into()),
            threads_per_minute: Int::new(server.threads_per_minute.into()),
            tickets_per_minute: Int::new(server.tickets_per_minute.into()),
            imports_per_minute: Int::new(server.imports_per_minute.into()),
            max_completions_per_user: Int::new(2),
            import_row_quota: Int::new(1_000_000),
        }
    }
}

/// How this instance executes runs, and stops.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Runs {
    max_per_instance: Int<1, 100_000>,
    queue_poll_interval_ms: Int<10, 600_000>,
    max_attempts: Int<1, 10>,
    shutdown_grace_ms: Int<0, 3_600_000>,
    default_multitask_strategy: MultitaskChoice,
    /// One second to 30 days.
    approval_timeout_ms: Int<1_000, 2_592_000_000>,
}

impl Default for Runs {
    fn default() -> Self {
        Runs {
            max_per_instance: Int::new(256),
            queue_poll_interval_ms: Int::new(1000),
            max_attempts: Int::new(2),
            shutdown_grace_ms: Int::new(10_000),
            default_multitask_strategy: MultitaskChoice::Enqueue,
            approval_timeout_ms: Int::new(24 * 3600 * 1000),
        }
    }
}

/// Who writes the answers, and the local model.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Llm {
    provider: LlmProvider,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_path: Option<PathValue>,
    threads: Int<1, 1024>,
    /// Requests one inference thread advances together.
    max_batch: Int<1, 64>,
    temperature: Number<0, 2>,
    top_p: Number<0, 1>,
    template_stream_delay_ms: Int<0, 60_000>,
    /// 0: runs wait their turn for the local model.
    max_queue_wait_ms: Int<0, 3_600_000>,
}

impl Default for Llm {
    fn default() -> Self {
        Llm {
            provider: LlmProvider::Local,
            model_path: None,
            threads: Int::new(1),
            max_batch: Int::new(16),
            temperature: Number::new(0.0),
            top_p: Number::new(1.0),
            template_stream_delay_ms: Int::new(15),
            max_queue_wait_ms: Int::new(20_000),
        }
    }
}

/// The OpenAI-compatible provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAi {
    base_url: Text,
    model: Text,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_key: Option<SecretText<1>>,
    timeout_secs: Int<1, 3600>,
    max_retries: Int<0, 100>,
}

impl Default for OpenAi {
    fn default() -> Self {
        OpenAi {
            base_url: Text::new("https://api.openai.com/v1"),
            model: Text::new("gpt-4o-mini"),
            api_key: None,
            timeout_secs: Int::new(60),
            max_retries: Int::new(3),
        }
    }
}

/// The LLM gateway's upstreams.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Gateway {
    upstreams: List,
    #[serde(skip_serializing_if = "Option::is_none")]
    api_keys: Option<SecretText<1>>,
    timeout_secs: Int<1, 3600>,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            upstreams: List::default(),
            api_keys: None,
            timeout_secs: Int::new(120),
        }
    }
}

impl Gateway {
    /// The upstreams, each `NAME=URL`, with their keys from `api_keys` (`NAME=KEY,...`).
    /// Errors name the key at fault and the entry, never an API key.
    fn upstreams(&self) -> Result<Vec<GatewayUpstream>, (&'static str, String)> {
        let upstream_error = |message: String| ("gateway_upstream", message);
        let mut keys = std::collections::HashMap::new();
        if let Some(secret) = &self.api_keys {
            for entry in secret
                .get()
                .expose()
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
            {
                let Some((name, key)) = entry.split_once('=') else {
                    return Err(("gateway_api_keys", "each entry is NAME=KEY".into()));
                };
                keys.insert(name.trim().to_string(), key.trim().to_string());
            }
        }
        let mut upstreams: Vec<GatewayUpstream> = Vec::new();
        for entry in self.upstreams.get() {
            let Some((name, url)) = entry.split_once('=') else {
                return Err(upstream_error(format!(
                    "gateway_upstream {entry:?} is not NAME=BASE_URL"
                )));
            };
            let (name, url) = (name.trim(), url.trim());
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(upstream_error(format!(
                    "gateway_upstream {entry:?}: the name is letters, digits, '-', '_' or '.'"
                )));
            }
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(upstream_error(format!(
                    "gateway_upstream {entry:?}: the base URL must start with http:// or https://"
                )));
            }
            if upstreams.iter().any(|u| u.name == name) {
                return Err(upstream_error(format!(
                    "gateway_upstream {name:?} is given twice"
                )));
            }
            upstreams.push(GatewayUpstream {
                name: name.to_string(),
                base_url: url.to_string(),
                api_key: keys.remove(name).map(apex_server::settings::Secret::new),
            });
        }
        if let Some(name) = keys.keys().next() {
            return Err((
                "gateway_api_keys",
                format!("names {name:?}, which is not a gateway_upstream"),
            ));
        }
        Ok(upstreams)
    }
}

/// Several instances over Redis.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Bus {
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<SecretUrl<BusSchemes>>,
    channel_prefix: Text,
    instance_heartbeat_ms: Int<50, 600_000>,
    instance_stale_after_ms: Int<200, 3_600_000>,
}

impl Default for Bus {
    fn default() -> Self {
        Bus {
            url: None,
            channel_prefix: Text::new("apex"),
            instance_heartbeat_ms: Int::new(2000),
            instance_stale_after_ms: Int::new(15_000),
        }
    }
}

/// Alert rules, scheduled reports and webhooks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Alerts {
    poll_interval_ms: Int<10, 600_000>,
    /// Empty: the Standard Webhooks schedule (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h).
    webhook_retry_delays_ms: List,
    webhook_timeout_ms: Int<100, 120_000>,
    webhook_allow_private_targets: Switch,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts {
            poll_interval_ms: Int::new(5000),
            webhook_retry_delays_ms: List::default(),
            webhook_timeout_ms: Int::new(15_000),
            webhook_allow_private_targets: Switch::OFF,
        }
    }
}

impl Alerts {
    /// The retry delays given, each 1 ms to a day; `None` when none are (the default).
    fn retry_delays(&self) -> Result<Option<Vec<std::time::Duration>>, String> {
        let given = self.webhook_retry_delays_ms.get();
        if given.is_empty() {
            return Ok(None);
        }
        if given.len() > 20 {
            return Err("at most 20 retry delays".into());
        }
        given
            .iter()
            .map(|d| match d.trim().parse::<u64>() {
                Ok(ms @ 1..=86_400_000) => Ok(std::time::Duration::from_millis(ms)),
                _ => Err(format!("{d:?} is not a delay from 1 to 86400000 ms")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// The original web client's paced delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LegacyClient {
    origins: List,
    frame_gap_ms: Int<1, 1000>,
    final_gap_ms: Int<0, 10_000>,
}

impl Default for LegacyClient {
    fn default() -> Self {
        LegacyClient {
            origins: List::default(),
            frame_gap_ms: Int::new(15),
            final_gap_ms: Int::new(100),
        }
    }
}

/// `migrate` and `user create` read the database section only: a bad value elsewhere is
/// not theirs to refuse.
#[derive(Deserialize)]
struct DatabaseOnly {
    database: Database,
}

impl Config {
    /// The built-in values as the bottom layer.
    fn default_values() -> anyhow::Result<figment::value::Dict> {
        figment::value::Value::serialize(Config::default())?
            .into_dict()
            .ok_or_else(|| anyhow!("the built-in configuration is not a table"))
    }

    /// The built-in values as `config show` prints them, for the flags' help.
    fn shown_defaults() -> toml::Value {
        toml::Value::try_from(Config::default())
            .unwrap_or_else(|_| toml::Value::Table(toml::Table::new()))
    }

    /// Rules that involve more than one key.
    fn check(&self, layers: &Layers) -> anyhow::Result<()> {
        if self.server.dev_login.get() && !self.server.development_mode.get() {
            bail!(
                "{}: dev_login needs development_mode (--development-mode)",
                layers.locate("dev_login")
            );
        }
        if let Some(origin) = self.server.public_origins.get().iter().find(|origin| {
            let rest = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            !rest.is_some_and(|rest| {
                let host = rest.trim_end_matches('/');
                !host.is_empty() && !host.contains(['/', '?', '#', '@'])
            })
        }) {
            bail!(
                "{}: public_origin {origin:?} is not an origin (http:// or https://, a host, \
                 an optional port, no path)",
                layers.locate("public_origin")
            );
        }
        let allowed = self.server.cors_origins.get();
        let same = |a: &str, b: &str| {
            a.trim_end_matches('/')
                .eq_ignore_ascii_case(b.trim_end_matches('/'))
        };
        if let Some(origin) = self
            .legacy_client
            .origins
            .get()
            .iter()
            .find(|origin| !allowed.iter().any(|a| same(a, origin)))
        {
            // Paced delivery is only for origins that may open a socket at all; say so
            // rather than leave the client refused with 403.
            bail!(
                "{}: legacy_client_origin {origin:?} is not a cors_origin (--cors-origin {origin})",
                layers.locate("legacy_client_origin")
            );
        }
        if let Err(problem) = self.alerts.retry_delays() {
            bail!("{}: {problem}", layers.locate("webhook_retry_delays_ms"));
        }
        if let Err((key, problem)) = self.gateway.upstreams() {
            bail!("{}: {problem}", layers.locate(key));
        }
        if self.bus.url.is_some() {
            let url = self.database.settings().database_url();
            if apex_server::store::Backend::from_url(url.expose())
                != apex_server::store::Backend::Postgres
            {
                bail!(
                    "{}: bus_url needs a shared PostgreSQL database (database_url postgres://...)",
                    layers.locate("bus_url")
                );
            }
            let heartbeat = self.bus.instance_heartbeat_ms.get();
            if self.bus.instance_stale_after_ms.get() < 2 * heartbeat {
                bail!(
                    "{}: instance_stale_after_ms must be at least twice instance_heartbeat_ms ({heartbeat})",
                    layers.locate("instance_stale_after_ms")
                );
            }
        }
        Ok(())
    }

    /// Everything `apex serve` needs.
    fn serve_config(&self) -> ServeConfig {
        let mut settings = self.database.settings();
        let Config {
            server,
            limits,
            runs,
            llm,
            openai,
            gateway,
            bus,
            legacy_client,
            alerts,
            database: _,
        } = self;
        settings.demo_data = !server.no_demo_data.get();
        settings.cors_allowed_origins = server.cors_origins.get().to_vec();
        settings.public_origins = server.public_origins.get().to_vec();
        settings.development_mode = server.development_mode.get();
        settings.dev_login = server.dev_login.get();
        settings.jwt_secret = server.jwt_secret.as_ref().map(|s| s.get().clone());
        settings.limits.max_concurrent_runs_per_user = limits.max_runs_per_user.to_usize();
        settings.limits.messages_per_minute = limits.messages_per_minute.to_u32();
        settings.limits.message_burst = limits.message_burst.to_u32();
        settings.limits.max_connections_per_user = limits.max_connections_per_user.to_usize();
        settings.limits.registrations_per_minute = limits.registrations_per_minute.to_u32();
        settings.limits.registrations_per_minute_total =
            limits.registrations_per_minute_total.to_u32();
        settings.limits.refreshes_per_minute = limits.refreshes_per_minute.to_u32();
        settings.limits.threads_per_minute = limits.threads_per_minute.to_u32();
        settings.limits.tickets_per_minute = limits.tickets_per_minute.to_u32();
        settings.limits.imports_per_minute = limits.imports_per_minute.to_u32();
        settings.limits.max_completions_per_user = limits.max_completions_per_user.to_usize();
        settings.limits.import_row_quota = limits.import_row_quota.get();
        settings.max_runs_per_instance = runs.max_per_instance.to_usize();
        settings.queue_poll_interval = runs.queue_poll_interval_ms.millis();
        settings.run_max_attempts = runs.max_attempts.to_u32();
        settings.shutdown_grace = runs.shutdown_grace_ms.millis();
        settings.default_multitask_strategy = match runs.default_multitask_strategy {
            MultitaskChoice::Enqueue => MultitaskStrategy::Enqueue,
            MultitaskChoice::Interrupt => MultitaskStrategy::Interrupt,
            MultitaskChoice::Rollback => MultitaskStrategy::Rollback,
            MultitaskChoice::Reject => MultitaskStrategy::Reject,
        };
        settings.approval_timeout = runs.approval_timeout_ms.millis();
        settings.llm_provider = match llm.provider {
            LlmProvider::Local => LlmProviderKind::Local,
            LlmProvider::Template => LlmProviderKind::Template,
            LlmProvider::OpenAi => LlmProviderKind::OpenAi,
        };
        settings.local_model.path = llm.model_path.as_ref().map(|p| p.get().to_path_buf());
        settings.local_model.threads = llm.threads.to_usize();
        settings.local_model.max_active_per_thread = llm.max_batch.to_usize();
        settings.local_model.temperature = llm.temperature.get() as f32;
        settings.local_model.top_p = llm.top_p.get() as f32;
        settings.template_stream_delay = llm.template_stream_delay_ms.millis();
        settings.local_model.max_queue_wait =
            Some(llm.max_queue_wait_ms.millis()).filter(|wait| !wait.is_zero());
        settings.openai.base_url = openai.base_url.get().to_string();
        settings.openai.model = openai.model.get().to_string();
        settings.openai.api_key = openai.api_key.as_ref().map(|s| s.get().clone());
        settings.openai.timeout = openai.timeout_secs.secs();
        settings.openai.max_retries = openai.max_retries.to_u32();
        // Checked by `check` before this runs.
        settings.gateway.upstreams = gateway.upstreams().unwrap_or_default();
        settings.gateway.timeout = gateway.timeout_secs.secs();
        settings.bus_url = bus.url.as_ref().map(|s| s.get().clone());
        settings.bus_channel_prefix = bus.channel_prefix.get().to_string();
        settings.instance_heartbeat = bus.instance_heartbeat_ms.millis();
        settings.instance_stale_after = bus.instance_stale_after_ms.millis();
        settings.legacy_client.origins = legacy_client.origins.get().to_vec();
        settings.legacy_client.frame_gap = legacy_client.frame_gap_ms.millis();
        settings.legacy_client.final_gap = legacy_client.final_gap_ms.millis();
        settings.alerts.poll_interval = alerts.poll_interval_ms.millis();
        // Checked by `check` before this runs.
        if let Ok(Some(delays)) = alerts.retry_delays() {
            settings.alerts.webhooks.retry_delays = delays;
        }
        settings.alerts.webhooks.timeout = alerts.webhook_timeout_ms.millis();
        settings.alerts.webhooks.allow_private_targets = alerts.webhook_allow_private_targets.get();
        ServeConfig {
            bind: server.bind.get(),
            metrics_bind: server.metrics_bind.map(Addr::get),
            log_format: server.log_format,
            settings,
        }
    }
}

impl Database {
    /// The settings of the database keys, the rest at their defaults.
    fn settings(&self) -> Settings {
        let mut settings = Settings::embedded(self.data_dir.get());
        settings.database_url = self.url.as_ref().map(|url| url.get().clone());
        settings.database_pool = DatabasePool {
            max_connections: self.max_connections.to_u32(),
            acquire_timeout: self.acquire_timeout_secs.secs(),
        };
        settings
    }
}

/// The configuration of `apex serve`, checked, with the layers it came from.
#[derive(Debug)]
pub struct Resolved {
    config: Config,
    layers: Layers,
}

impl Resolved {
    /// From the process's flags, configuration file and environment.
    pub fn serve(flags: &ServeFlags) -> anyhow::Result<Resolved> {
        Self::resolve(&flags.0, &|var| std::env::var_os(var))
    }

    fn resolve(flags: &flags::FlagValues, env: EnvLookup<'_>) -> anyhow::Result<Resolved> {
        let layers = Layers::gather(flags, env, Scope::Serve)?;
        let config: Config = layers.extract()?;
        config.check(&layers)?;
        Ok(Resolved { config, layers })
    }

    /// The database keys only, from the process's flags, configuration file and
    /// environment.
    pub fn database(flags: &DatabaseFlags) -> anyhow::Result<ResolvedDatabase> {
        ResolvedDatabase::resolve(&flags.0, &|var| std::env::var_os(var))
    }

    /// Everything `apex serve` needs.
    pub fn serve_config(&self) -> ServeConfig {
        self.config.serve_config()
    }

    /// The effective configuration as TOML, secrets redacted, each line saying where its
    /// value came from. Unset keys without a default are comments.
    pub fn render(&self) -> anyhow::Result<String> {
        show::render(&self.config, &self.layers)
    }
}

/// The database keys of `apex migrate` and `apex user create`, checked.
#[derive(Debug)]
pub struct ResolvedDatabase {
    database: Database,
}

impl ResolvedDatabase {
    fn resolve(flags: &flags::FlagValues, env: EnvLookup<'_>) -> anyhow::Result<Self> {
        let layers = Layers::gather(flags, env, Scope::Database)?;
        let DatabaseOnly { database } = layers.extract()?;
        Ok(ResolvedDatabase { database })
    }

    /// The settings of the database keys, the rest at their defaults.
    pub fn database_settings(&self) -> Settings {
        self.database.settings()
    }
}

/// The effective configuration of `apex serve`.
#[derive(Debug)]
pub struct ServeConfig {
    pub bind: SocketAddr,
    pub metrics_bind: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub settings: Settings,
}

#[cfg(test)]
mod tests;
