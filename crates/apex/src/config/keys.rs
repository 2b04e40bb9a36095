//! The table of keys: for every setting its file key, `APEX_*` variable, flag, help text
//! and the field of [`super::Config`] it fills. The value's kind and default are the
//! field's type and [`Default`]; the table says how the outside world spells the setting.

/// Which commands read a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scope {
    /// `migrate` and `user create`: the keys of the `database` section only.
    Database,
    /// `serve`, `config show` and `eval`: every key.
    Serve,
}

/// How a key's flag takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Takes {
    /// `--flag VALUE`.
    Value,
    /// `--flag` alone sets it to true.
    Switch,
    /// `--flag VALUE`, repeatable.
    List,
}

/// One key: its three spellings, where it goes in [`super::Config`], and its help.
#[derive(Debug)]
pub(super) struct Key {
    /// The name in the file (the flag in snake_case).
    pub(super) name: &'static str,
    /// The field it fills, as `section.field`.
    pub(super) path: &'static str,
    /// The environment variable.
    pub(super) env: &'static str,
    /// The long flag without `--`; `None` for secrets (environment or file only).
    pub(super) flag: Option<&'static str>,
    pub(super) takes: Takes,
    pub(super) value_name: &'static str,
    /// Its value is a secret, never quoted or shown.
    pub(super) secret: bool,
    /// Shown by `config show` when the key is unset (it has no built-in default).
    pub(super) unset_means: &'static str,
    pub(super) help: &'static str,
}

const fn key(name: &'static str, path: &'static str, env: &'static str, help: &'static str) -> Key {
    Key {
        name,
        path,
        env,
        flag: None,
        takes: Takes::Value,
        value_name: "VALUE",
        secret: false,
        unset_means: "",
        help,
    }
}

impl Key {
    const fn flag(mut self, flag: &'static str, value_name: &'static str) -> Key {
        self.flag = Some(flag);
        self.value_name = value_name;
        self
    }
    const fn switch(mut self, flag: &'static str) -> Key {
        self.flag = Some(flag);
        self.takes = Takes::Switch;
        self
    }
    const fn list(mut self, flag: &'static str, value_name: &'static str) -> Key {
        self.flag = Some(flag);
        self.takes = Takes::List;
        self.value_name = value_name;
        self
    }
    const fn secret(mut self) -> Key {
        self.secret = true;
        self
    }
    const fn unset(mut self, means: &'static str) -> Key {
        self.unset_means = means;
        self
    }

    pub(super) fn scope(&self) -> Scope {
        if self.path.starts_with("database.") {
            Scope::Database
        } else {
            Scope::Serve
        }
    }

    /// Whether a command of `scope` reads this key.
    pub(super) fn in_scope(&self, scope: Scope) -> bool {
        scope == Scope::Serve || self.scope() == scope
    }
}

/// The keys a command of `scope` reads, in the order `config show` prints them.
pub(super) fn keys_in(scope: Scope) -> impl Iterator<Item = &'static Key> {
    KEYS.iter().filter(move |key| key.in_scope(scope))
}

/// The key named `name` in the file.
pub(super) fn find_key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|key| key.name == name)
}

/// Every key, in the order `config show` prints them.
pub(super) static KEYS: &[Key] = &[
    key(
        "bind",
        "server.bind",
        "APEX_BIND",
        "Address to listen on; port 0 picks a free port (printed on start).",
    )
    .flag("bind", "HOST:PORT"),
    key(
        "data_dir",
        "database.data_dir",
        "APEX_DATA_DIR",
        "Folder for the SQLite database and the generated JWT secret.",
    )
    .flag("data-dir", "DIR"),
    key(
        "database_url",
        "database.url",
        "APEX_DATABASE_URL",
        "Database URL: `postgres://user:password@host:5432/db` (or `postgresql://`) for \
         PostgreSQL, `sqlite://path`; default `sqlite://<data-dir>/apex.db`. Prefer the \
         variable or the file when the URL has a password.",
    )
    .flag("database-url", "URL")
    .secret()
    .unset("sqlite://<data-dir>/apex.db"),
    key(
        "database_max_connections",
        "database.max_connections",
        "APEX_DATABASE_MAX_CONNECTIONS",
        "Most database connections this instance holds open.",
    )
    .flag("database-max-connections", "N"),
    key(
        "database_acquire_timeout_secs",
        "database.acquire_timeout_secs",
        "APEX_DATABASE_ACQUIRE_TIMEOUT_SECS",
        "Seconds a query waits for a free database connection before failing.",
    )
    .flag("database-acquire-timeout-secs", "SECS"),
    key(
        "no_demo_data",
        "server.no_demo_data",
        "APEX_NO_DEMO_DATA",
        "Do not give new accounts 30 days of demo usage data.",
    )
    .switch("no-demo-data"),
    key(
        "cors_origin",
        "server.cors_origins",
        "APEX_CORS_ALLOWED_ORIGINS",
        "Browser origin allowed to call the API and open the WebSocket (repeatable; \
         comma-separated in the variable; an array in the file). None by default.",
    )
    .list("cors-origin", "URL"),
    key(
        "public_origin",
        "server.public_origins",
        "APEX_PUBLIC_ORIGINS",
        "Origin Apex's own pages are served from, e.g. https://apex.example.com (repeatable; \
         comma-separated in the variable; an array in the file): allowed to open the \
         WebSocket, and the first names the URL in WebSocket tickets. Default: the loopback \
         origins of the bound port (http://127.0.0.1:PORT, http://localhost:PORT, \
         http://[::1]:PORT).",
    )
    .list("public-origin", "URL"),
    key(
        "development_mode",
        "server.development_mode",
        "APEX_DEVELOPMENT_MODE",
        "A development deployment (reported by /auth/config; needed by dev_login).",
    )
    .switch("development-mode"),
    key(
        "dev_login",
        "server.dev_login",
        "APEX_DEV_LOGIN",
        "Enable POST /auth/dev/login (log in or register in one call). Development only; \
         needs development_mode.",
    )
    .switch("dev-login"),
    key(
        "legacy_client_origin",
        "legacy_client.origins",
        "APEX_LEGACY_CLIENT_ORIGINS",
        "Browser origin the original web client is served from (repeatable; comma-separated \
         in the variable; an array in the file); its WebSocket frames are paced. Each must \
         also be a cors_origin. None by default.",
    )
    .list("legacy-client-origin", "URL"),
    key(
        "legacy_frame_gap_ms",
        "legacy_client.frame_gap_ms",
        "APEX_LEGACY_FRAME_GAP_MS",
        "Least time between two WebSocket frames to the original web client, in milliseconds.",
    )
    .flag("legacy-frame-gap-ms", "MS"),
    key(
        "legacy_final_gap_ms",
        "legacy_client.final_gap_ms",
        "APEX_LEGACY_FINAL_GAP_MS",
        "Least time before final_report, error and the terminal event on a connection of the \
         original web client, in milliseconds.",
    )
    .flag("legacy-final-gap-ms", "MS"),
    key(
        "max_runs_per_user",
        "limits.max_runs_per_user",
        "APEX_MAX_RUNS_PER_USER",
        "Runs one user may have executing at once.",
    )
    .flag("max-runs-per-user", "N"),
    key(
        "messages_per_minute",
        "limits.messages_per_minute",
        "APEX_MESSAGES_PER_MINUTE",
        "Run-starting messages per user per minute, after the burst.",
    )
    .flag("messages-per-minute", "N"),
    key(
        "message_burst",
        "limits.message_burst",
        "APEX_MESSAGE_BURST",
        "Run-starting messages a user may send at once before the per-minute rate applies.",
    )
    .flag("message-burst", "N"),
    key(
        "max_connections_per_user",
        "limits.max_connections_per_user",
        "APEX_MAX_CONNECTIONS_PER_USER",
        "Open connections per user: WebSockets and server-sent event streams together.",
    )
    .flag("max-connections-per-user", "N"),
    key(
        "registrations_per_minute",
        "limits.registrations_per_minute",
        "APEX_REGISTRATIONS_PER_MINUTE",
        "Accounts created per client address per minute (0: no limit, for load tests).",
    )
    .flag("registrations-per-minute", "N"),
    key(
        "registrations_per_minute_total",
        "limits.registrations_per_minute_total",
        "APEX_REGISTRATIONS_PER_MINUTE_TOTAL",
        "Accounts created on this instance per minute from all addresses (0: no limit).",
    )
    .flag("registrations-per-minute-total", "N"),
    key(
        "refreshes_per_minute",
        "limits.refreshes_per_minute",
        "APEX_REFRESHES_PER_MINUTE",
        "Refresh-token exchanges per client address per minute (0: no limit).",
    )
    .flag("refreshes-per-minute", "N"),
    key(
        "threads_per_minute",
        "limits.threads_per_minute",
        "APEX_THREADS_PER_MINUTE",
        "Threads a user creates per minute with POST /api/threads (0: no limit).",
    )
    .flag("threads-per-minute", "N"),
    key(
        "tickets_per_minute",
        "limits.tickets_per_minute",
        "APEX_TICKETS_PER_MINUTE",
        "WebSocket tickets per user per minute (0: no limit).",
    )
    .flag("tickets-per-minute", "N"),
    key(
        "imports_per_minute",
        "limits.imports_per_minute",
        "APEX_IMPORTS_PER_MINUTE",
        "Usage imports per user per minute (0: no limit).",
    )
    .flag("imports-per-minute", "N"),
    key(
        "max_completions_per_user",
        "limits.max_completions_per_user",
        "APEX_MAX_COMPLETIONS_PER_USER",
        "Direct completions (`/v1/chat/completions` on the local model) one user may have in \
         progress at once; a stream holds its place until it ends.",
    )
    .flag("max-completions-per-user", "N"),
    key(
        "import_row_quota",
        "limits.import_row_quota",
        "APEX_IMPORT_ROW_QUOTA",
        "Most usage rows one user may have stored; a usage upload that would go past it is \
         refused whole.",
    )
    .flag("import-row-quota", "N"),
    key(
        "template_stream_delay_ms",
        "llm.template_stream_delay_ms",
        "APEX_TEMPLATE_STREAM_DELAY_MS",
        "Delay between streamed answer chunks of the template writer, in milliseconds.",
    )
    .flag("template-stream-delay-ms", "MS"),
    key(
        "metrics_bind",
        "server.metrics_bind",
        "APEX_METRICS_BIND",
        "Also serve `/metrics` on this separate address (it is always on the main one).",
    )
    .flag("metrics-bind", "HOST:PORT")
    .unset("only on the main address"),
    key(
        "log_format",
        "server.log_format",
        "APEX_LOG_FORMAT",
        "Log format: `human` or `json` (the filter is APEX_LOG, `info` by default).",
    )
    .flag("log-format", "FORMAT"),
    key(
        "llm_provider",
        "llm.provider",
        "APEX_LLM_PROVIDER",
        "Who writes the answers: `local` (the embedded model), `template` (no model) or \
         `openai` (any OpenAI-compatible server). The template writer stands in if it fails.",
    )
    .flag("llm-provider", "PROVIDER"),
    key(
        "model_path",
        "llm.model_path",
        "APEX_MODEL_PATH",
        "The local model's GGUF file (installed once per machine by scripts/fetch-model.sh).",
    )
    .flag("model-path", "FILE")
    .unset(
        "$XDG_CACHE_HOME/apex/models/SmolLM2-135M-Instruct.Q4_1.gguf (else ~/.cache/...; \
         a copy in <data-dir>/models/ is used first)",
    ),
    key(
        "llm_max_queue_wait_ms",
        "llm.max_queue_wait_ms",
        "APEX_LLM_MAX_QUEUE_WAIT_MS",
        "Longest a run waits for the local model to start on its request (ms, default 20000): \
         past it, that run's answer is written without the model and says so, so nobody waits \
         minutes behind other users. 0: runs wait their turn.",
    )
    .flag("llm-max-queue-wait-ms", "MS"),
    key(
        "llm_threads",
        "llm.threads",
        "APEX_LLM_THREADS",
        "Dedicated inference threads for the local model.",
    )
    .flag("llm-threads", "N"),
    key(
        "llm_max_batch",
        "llm.max_batch",
        "APEX_LLM_MAX_BATCH",
        "Requests one inference thread generates together (1 to 64, default 16): each step \
         advances all of them in one pass over the weights; more wait in the queue.",
    )
    .flag("llm-max-batch", "N"),
    key(
        "llm_temperature",
        "llm.temperature",
        "APEX_LLM_TEMPERATURE",
        "Sampling temperature of the local model; 0 is greedy (deterministic).",
    )
    .flag("llm-temperature", "T"),
    key(
        "llm_top_p",
        "llm.top_p",
        "APEX_LLM_TOP_P",
        "Nucleus sampling mass of the local model when the temperature is above 0.",
    )
    .flag("llm-top-p", "P"),
    key(
        "openai_base_url",
        "openai.base_url",
        "APEX_OPENAI_BASE_URL",
        "OpenAI-compatible base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:11434/v1.",
    )
    .flag("openai-base-url", "URL"),
    key(
        "openai_model",
        "openai.model",
        "APEX_OPENAI_MODEL",
        "Model name for the OpenAI-compatible provider.",
    )
    .flag("openai-model", "MODEL"),
    key(
        "openai_api_key",
        "openai.api_key",
        "APEX_OPENAI_API_KEY",
        "API key of the OpenAI-compatible provider (variable or file only; never logged).",
    )
    .secret()
    .unset("no key sent"),
    key(
        "openai_timeout_secs",
        "openai.timeout_secs",
        "APEX_OPENAI_TIMEOUT_SECS",
        "Seconds to wait for the provider's response to start and between streamed chunks.",
    )
    .flag("openai-timeout-secs", "SECS"),
    key(
        "openai_max_retries",
        "openai.max_retries",
        "APEX_OPENAI_MAX_RETRIES",
        "Retries on 429/5xx/connection failures, with exponential backoff.",
    )
    .flag("openai-max-retries", "N"),
    key(
        "gateway_upstream",
        "gateway.upstreams",
        "APEX_GATEWAY_UPSTREAMS",
        "An upstream of the LLM gateway, NAME=BASE_URL (e.g. openai=https://api.openai.com/v1; \
         repeatable; comma-separated in the variable; an array in the file). Keys with the \
         gateway scope reach it at /v1 by model (openai/gpt-4o, or gpt-4o by its provider). \
         None by default.",
    )
    .list("gateway-upstream", "NAME=URL"),
    key(
        "gateway_api_keys",
        "gateway.api_keys",
        "APEX_GATEWAY_API_KEYS",
        "The upstreams' API keys, NAME=KEY,NAME=KEY (variable or file only; never logged).",
    )
    .secret()
    .unset("no key sent upstream"),
    key(
        "gateway_timeout_secs",
        "gateway.timeout_secs",
        "APEX_GATEWAY_TIMEOUT_SECS",
        "Longest wait for an upstream's answer to start, and between two streamed chunks.",
    )
    .flag("gateway-timeout-secs", "SECS"),
    key(
        "jwt_secret",
        "server.jwt_secret",
        "APEX_JWT_SECRET",
        "Token signing key, at least 32 characters, the same on every instance (variable or \
         file only; never logged).",
    )
    .secret()
    .unset("generated into <data-dir>/jwt_secret"),
    key(
        "bus_url",
        "bus.url",
        "APEX_BUS_URL",
        "Run as one of several instances: `redis://[:password@]host:6379[/db]` carries \
         events and stop requests between them (needs a shared PostgreSQL and a shared \
         jwt_secret). Prefer the variable or the file when the URL has a password.",
    )
    .flag("bus-url", "URL")
    .secret()
    .unset("one instance, in-process events"),
    key(
        "bus_channel_prefix",
        "bus.channel_prefix",
        "APEX_BUS_CHANNEL_PREFIX",
        "Prefix of the Redis channel names (deployments sharing one Redis need different ones).",
    )
    .flag("bus-channel-prefix", "PREFIX"),
    key(
        "alert_poll_interval_ms",
        "alerts.poll_interval_ms",
        "APEX_ALERT_POLL_INTERVAL_MS",
        "How often each instance looks for alert rules due to tick and webhook messages due to \
         send, in milliseconds (each is taken by one instance).",
    )
    .flag("alert-poll-interval-ms", "MS"),
    key(
        "webhook_retry_delays_ms",
        "alerts.webhook_retry_delays_ms",
        "APEX_WEBHOOK_RETRY_DELAYS_MS",
        "Waits between a webhook message's failed attempts, in milliseconds (comma-separated in \
         the variable; an array in the file); it fails after the last. Default: the Standard \
         Webhooks schedule 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.",
    )
    .list("webhook-retry-delays-ms", "MS"),
    key(
        "webhook_timeout_ms",
        "alerts.webhook_timeout_ms",
        "APEX_WEBHOOK_TIMEOUT_MS",
        "Longest wait for a webhook receiver's answer, in milliseconds.",
    )
    .flag("webhook-timeout-ms", "MS"),
    key(
        "webhook_allow_private_targets",
        "alerts.webhook_allow_private_targets",
        "APEX_WEBHOOK_ALLOW_PRIVATE_TARGETS",
        "Let webhooks target loopback, private and link-local addresses (refused by default, so \
         users cannot aim Apex at the network it runs in).",
    )
    .switch("webhook-allow-private-targets"),
    key(
        "instance_heartbeat_ms",
        "bus.instance_heartbeat_ms",
        "APEX_INSTANCE_HEARTBEAT_MS",
        "With bus_url: how often this instance records that it is alive, in milliseconds.",
    )
    .flag("instance-heartbeat-ms", "MS"),
    key(
        "instance_stale_after_ms",
        "bus.instance_stale_after_ms",
        "APEX_INSTANCE_STALE_AFTER_MS",
        "With bus_url: a run whose instance has not refreshed it for this long (ms) is taken \
         as orphaned and recovered by another instance (see run_max_attempts). Keep it several \
         heartbeats long.",
    )
    .flag("instance-stale-after-ms", "MS"),
    key(
        "shutdown_grace_ms",
        "runs.shutdown_grace_ms",
        "APEX_SHUTDOWN_GRACE_MS",
        "On SIGTERM/Ctrl-C: how long (ms) running runs may go on to finish. After it, runs end \
         `interrupted`; with bus_url they go back to the queue for another instance instead \
         (while they have attempts left).",
    )
    .flag("shutdown-grace-ms", "MS"),
    key(
        "max_runs_per_instance",
        "runs.max_per_instance",
        "APEX_MAX_RUNS_PER_INSTANCE",
        "Runs this instance executes at once; more wait in the run queue for a free slot here \
         or on any other instance.",
    )
    .flag("max-runs-per-instance", "N"),
    key(
        "queue_poll_interval_ms",
        "runs.queue_poll_interval_ms",
        "APEX_QUEUE_POLL_INTERVAL_MS",
        "How often an idle instance checks the run queue unprompted (ms); submissions wake it \
         at once.",
    )
    .flag("queue-poll-interval-ms", "MS"),
    key(
        "run_max_attempts",
        "runs.max_attempts",
        "APEX_RUN_MAX_ATTEMPTS",
        "How many times a run may be started: a run whose server died (crash, kill, lost \
         instance) runs again from the start while it has attempts left, and ends \
         `interrupted` after the last. 1: never re-run.",
    )
    .flag("run-max-attempts", "N"),
    key(
        "default_multitask_strategy",
        "runs.default_multitask_strategy",
        "APEX_DEFAULT_MULTITASK_STRATEGY",
        "What a message to a thread whose run is still going does when it names no \
         `multitask_strategy`: `enqueue` (its run starts after that one), `interrupt` (that run \
         ends `interrupted`), `rollback` (that run is stopped and removed) or `reject` \
         (`THREAD_BUSY`).",
    )
    .flag("default-multitask-strategy", "STRATEGY"),
    key(
        "approval_timeout_ms",
        "runs.approval_timeout_ms",
        "APEX_APPROVAL_TIMEOUT_MS",
        "How long a run that asked its user to approve its plan waits for the answer (ms, \
         default one day); unanswered by then, it ends `timed_out`. A waiting run holds no \
         execution slot.",
    )
    .flag("approval-timeout-ms", "MS"),
];
