use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::flags::{FlagValue, FlagValues};
use super::keys::{find_key, keys_in, Scope, Takes, KEYS};
use super::kinds::redact_url;
use super::show::lookup;
use super::*;

fn env_of<'a>(pairs: &'a [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
    move |var| {
        pairs
            .iter()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| OsString::from(v))
    }
}

fn flags(pairs: &[(&str, &str)]) -> FlagValues {
    FlagValues {
        config: None,
        values: pairs
            .iter()
            .map(|(name, value)| {
                let key = find_key(name).expect("a key of the table");
                (key, FlagValue::Text(value.to_string()))
            })
            .collect(),
    }
}

fn serve(flags: &FlagValues, env: &[(&'static str, &'static str)]) -> anyhow::Result<Resolved> {
    Resolved::resolve(flags, &env_of(env))
}

fn serve_err(flags: &FlagValues, env: &[(&'static str, &'static str)]) -> String {
    serve(flags, env).unwrap_err().to_string()
}

/// A configuration file with `text` in a fresh folder, and flags that name it.
fn file(text: &str) -> (tempfile::TempDir, PathBuf, FlagValues) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("apex.toml");
    std::fs::write(&path, text).unwrap();
    let flags = FlagValues {
        config: Some(path.clone()),
        values: Vec::new(),
    };
    (dir, path, flags)
}

#[test]
fn defaults_match_the_servers_embedded_settings() {
    let config = serve(&FlagValues::default(), &[]).unwrap().serve_config();
    assert_eq!(
        format!("{:?}", config.settings),
        format!("{:?}", Settings::embedded("./data"))
    );
    assert_eq!(config.bind.to_string(), "127.0.0.1:8000");
    assert_eq!(config.log_format, LogFormat::Human);
    assert!(config.metrics_bind.is_none());
}

/// Every leaf path of a table, dotted.
fn leaves(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(table) => {
            for (name, value) in table {
                let path = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                leaves(value, &path, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn every_key_fills_one_field_and_has_its_own_spellings() {
    let (mut names, mut flags, mut vars, mut paths) = (
        HashSet::new(),
        HashSet::new(),
        HashSet::new(),
        HashSet::new(),
    );
    let defaults = Config::shown_defaults();
    for key in KEYS {
        assert!(names.insert(key.name), "{}", key.name);
        assert!(vars.insert(key.env), "{}", key.env);
        assert!(paths.insert(key.path), "{}", key.path);
        match key.flag {
            Some(flag) => {
                assert_eq!(
                    flag.replace('-', "_"),
                    key.name,
                    "the flag is the key in kebab-case"
                );
                assert!(flags.insert(flag));
            }
            None => assert!(key.secret, "only secrets have no flag: {}", key.name),
        }
        match lookup(&defaults, key.path) {
            Some(default) => {
                assert!(key.unset_means.is_empty(), "{}", key.name);
                match key.takes {
                    Takes::Switch => assert!(default.is_bool(), "{}", key.name),
                    Takes::List => assert!(default.is_array(), "{}", key.name),
                    Takes::Value => assert!(!default.is_bool() && !default.is_array()),
                }
            }
            None => assert!(
                !key.unset_means.is_empty(),
                "{} says what unset means",
                key.name
            ),
        }
        // The key's path is a field of `Config`: a value there is checked by the field's
        // type (or accepted), never refused as an unknown field.
        let env = [(key.env, "x")];
        if let Err(err) = serve(&FlagValues::default(), &env) {
            let err = err.to_string();
            assert!(
                err.starts_with(&format!("{} (environment): ", key.env)),
                "{}: {err}",
                key.name
            );
            assert!(!err.contains("unknown field"), "{err}");
        }
    }
    // Every field with a built-in value has a key.
    let mut fields = Vec::new();
    leaves(&defaults, "", &mut fields);
    for field in fields {
        assert!(paths.contains(field.as_str()), "{field} has no key");
    }
}

#[test]
fn flags_beat_variables_and_bad_values_name_their_source() {
    let env = [("APEX_LLM_THREADS", "3"), ("APEX_BIND", "127.0.0.1:9")];
    let config = serve(&flags(&[("llm_threads", "5")]), &env)
        .unwrap()
        .serve_config();
    assert_eq!(config.settings.local_model.threads, 5);
    assert_eq!(config.bind.port(), 9);

    let err = serve_err(&FlagValues::default(), &[("APEX_LLM_THREADS", "abc")]);
    assert_eq!(
        err,
        "APEX_LLM_THREADS (environment): expected a positive integer up to 1024, got \"abc\""
    );
    let err = serve_err(&flags(&[("bind", "nope")]), &[]);
    assert!(err.starts_with("--bind: expected HOST:PORT"), "{err}");
}

#[test]
fn each_layer_beats_the_ones_below_it() {
    let threads = |resolved: &Resolved| resolved.serve_config().settings.local_model.threads;
    let line = |resolved: &Resolved| {
        let shown = resolved.render().unwrap();
        shown
            .lines()
            .find(|line| line.starts_with("llm_threads = "))
            .unwrap()
            .to_string()
    };

    let resolved = serve(&FlagValues::default(), &[]).unwrap();
    assert_eq!(threads(&resolved), 1);
    assert_eq!(line(&resolved), "llm_threads = 1  # default");

    let (_dir, path, file_flags) = file("llm_threads = 2\n");
    let resolved = serve(&file_flags, &[]).unwrap();
    assert_eq!(threads(&resolved), 2);
    assert_eq!(
        line(&resolved),
        format!("llm_threads = 2  # file {}", path.display())
    );

    // An empty variable counts as unset.
    let resolved = serve(&file_flags, &[("APEX_LLM_THREADS", " ")]).unwrap();
    assert_eq!(threads(&resolved), 2);

    let resolved = serve(&file_flags, &[("APEX_LLM_THREADS", "3")]).unwrap();
    assert_eq!(threads(&resolved), 3);
    assert_eq!(line(&resolved), "llm_threads = 3  # env APEX_LLM_THREADS");

    let mut all = flags(&[("llm_threads", "4")]);
    all.config = file_flags.config.clone();
    let resolved = serve(&all, &[("APEX_LLM_THREADS", "3")]).unwrap();
    assert_eq!(threads(&resolved), 4);
    assert_eq!(line(&resolved), "llm_threads = 4  # flag --llm-threads");
}

#[test]
fn a_kind_mismatch_in_the_file_names_the_key_and_the_file() {
    for (text, message) in [
        (
            "llm_threads = \"abc\"",
            "llm_threads: expected a positive integer up to 1024, got \"abc\"",
        ),
        (
            "no_demo_data = \"maybe\"",
            "no_demo_data: expected true or false, got \"maybe\"",
        ),
        (
            "bind = 8000",
            "bind: expected HOST:PORT, e.g. 127.0.0.1:8000, got 8000",
        ),
        (
            "llm_temperature = [1]",
            "llm_temperature: expected a number from 0 to 2, got an array",
        ),
        (
            "cors_origin = [1]",
            "cors_origin: expected an array of strings, got an element 1",
        ),
        (
            "openai_model = { name = \"x\" }",
            "openai_model: expected a non-empty text, got a table (keys are flat)",
        ),
        (
            "llm_provider = \"gpt\"",
            "llm_provider: expected one of local, template, openai, got \"gpt\"",
        ),
        (
            "jwt_secret = 12345",
            "jwt_secret: expected at least 32 characters",
        ),
        (
            "bind = 1979-05-27",
            "bind: expected HOST:PORT, e.g. 127.0.0.1:8000, got a date",
        ),
    ] {
        let (_dir, path, file_flags) = file(text);
        let err = serve_err(&file_flags, &[]);
        assert_eq!(err, format!("{}: {message}", path.display()), "{text}");
    }
    let (_dir, path, file_flags) = file("llm_thread = 2");
    let err = serve_err(&file_flags, &[]);
    assert!(
        err.starts_with(&format!(
            "{}: unknown key \"llm_thread\" (did you mean \"llm_threads\"?)",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn a_kind_mismatch_in_a_variable_names_the_variable() {
    for (var, value, message) in [
        (
            "APEX_LOG_FORMAT",
            "xml",
            "expected one of human, json, got \"xml\"",
        ),
        (
            "APEX_NO_DEMO_DATA",
            "maybe",
            "expected true or false, got \"maybe\"",
        ),
        (
            "APEX_LLM_TOP_P",
            "1.5",
            "expected a number from 0 to 1, got \"1.5\"",
        ),
        (
            "APEX_MAX_RUNS_PER_USER",
            "0",
            "expected a positive integer up to 100000, got \"0\"",
        ),
        (
            "APEX_BUS_URL",
            "http://:pw-1@h",
            "expected a URL starting with redis://",
        ),
    ] {
        let err = serve_err(&FlagValues::default(), &[(var, value)]);
        assert_eq!(err, format!("{var} (environment): {message}"));
    }
}

#[test]
fn secrets_are_not_echoed_in_errors() {
    let err = serve_err(
        &FlagValues::default(),
        &[("APEX_JWT_SECRET", "short-secret-value")],
    );
    assert!(err.contains("APEX_JWT_SECRET"), "{err}");
    assert!(!err.contains("short-secret-value"), "{err}");
    let err = ResolvedDatabase::resolve(
        &flags(&[("database_url", "mysql://u:pw-123@h/db")]),
        &env_of(&[]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("--database-url: expected a URL"), "{err}");
    assert!(!err.contains("pw-123"), "{err}");
}

#[test]
fn database_commands_read_only_the_database_keys() {
    // A bad value of another key is not theirs to refuse.
    let env = [
        ("APEX_LLM_THREADS", "abc"),
        ("APEX_DATABASE_MAX_CONNECTIONS", "7"),
    ];
    let mut flags = flags(&[("data_dir", "/tmp/apex-db")]);
    let resolved = ResolvedDatabase::resolve(&flags, &env_of(&env)).unwrap();
    let settings = resolved.database_settings();
    assert_eq!(settings.database_pool.max_connections, 7);
    assert_eq!(settings.data_dir, Path::new("/tmp/apex-db"));
    let (_dir, path, file_flags) =
        file("llm_threads = \"abc\"\ndatabase_acquire_timeout_secs = 0\n");
    flags.config = file_flags.config;
    let err = ResolvedDatabase::resolve(&flags, &env_of(&env))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "{}: database_acquire_timeout_secs: expected a positive integer up to 3600, got 0",
            path.display()
        )
    );
}

#[test]
fn show_lists_every_key_with_its_source_and_redacts_secrets() {
    let (_dir, path, mut all) =
        file("database_url = \"postgres://apex:file-pw-1@db/apex\"\nopenai_model = \"m\"\n");
    all.values
        .push((find_key("no_demo_data").unwrap(), FlagValue::Switch(true)));
    let env = [
        ("APEX_JWT_SECRET", "env-jwt-secret-0123456789abcdefghijkl"),
        ("APEX_BUS_URL", "redis://:bus-pw-2@cache:6379/0"),
    ];
    let shown = serve(&all, &env).unwrap().render().unwrap();
    for key in keys_in(Scope::Serve) {
        let set = format!("{} = ", key.name);
        let unset = format!("# {} unset: ", key.name);
        assert!(
            shown
                .lines()
                .any(|line| (line.starts_with(&set) && line.contains("  # "))
                    || line.starts_with(&unset)),
            "{} missing in\n{shown}",
            key.name
        );
    }
    for line in [
        format!(
            "database_url = \"postgres://apex:***@db/apex\"  # file {}",
            path.display()
        ),
        format!("openai_model = \"m\"  # file {}", path.display()),
        "no_demo_data = true  # flag --no-demo-data".to_string(),
        "jwt_secret = \"***\"  # env APEX_JWT_SECRET".to_string(),
        "bus_url = \"redis://:***@cache:6379/0\"  # env APEX_BUS_URL".to_string(),
        "llm_temperature = 0.0  # default".to_string(),
        "# openai_api_key unset: no key sent (set APEX_OPENAI_API_KEY or the file key)".to_string(),
    ] {
        assert!(
            shown.lines().any(|l| l == line),
            "missing {line:?} in\n{shown}"
        );
    }
    for secret in ["file-pw-1", "bus-pw-2", "env-jwt-secret"] {
        assert!(!shown.contains(secret), "{secret} in\n{shown}");
    }
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
    let err = serve_err(
        &flags(&[("legacy_client_origin", "http://localhost:3000")]),
        &[],
    );
    assert!(
        err.starts_with("--legacy-client-origin: ") && err.contains("cors_origin"),
        "{err}"
    );
    let env = [
        (
            "APEX_CORS_ALLOWED_ORIGINS",
            "http://localhost:3000/,https://app.example.com",
        ),
        ("APEX_LEGACY_CLIENT_ORIGINS", "http://localhost:3000"),
        ("APEX_LEGACY_FRAME_GAP_MS", "20"),
    ];
    let settings = serve(&FlagValues::default(), &env)
        .unwrap()
        .serve_config()
        .settings;
    assert_eq!(
        settings.legacy_client.origins,
        vec!["http://localhost:3000"]
    );
    assert_eq!(settings.legacy_client.frame_gap, Duration::from_millis(20));
    assert_eq!(settings.legacy_client.final_gap, Duration::from_millis(100));
    let err = serve_err(&flags(&[("legacy_frame_gap_ms", "0")]), &[]);
    assert!(err.starts_with("--legacy-frame-gap-ms: "), "{err}");
}

#[test]
fn dev_login_needs_development_mode() {
    let err = serve_err(&flags(&[("dev_login", "true")]), &[]);
    assert!(
        err.contains("--dev-login") && err.contains("development_mode"),
        "{err}"
    );
}

#[test]
fn a_bus_needs_postgres_and_a_long_enough_staleness() {
    let err = serve_err(
        &FlagValues::default(),
        &[("APEX_BUS_URL", "redis://cache:6379")],
    );
    assert!(
        err.starts_with("APEX_BUS_URL (environment): bus_url needs a shared PostgreSQL"),
        "{err}"
    );
    let env = [
        ("APEX_BUS_URL", "redis://cache:6379"),
        ("APEX_DATABASE_URL", "postgres://apex@db/apex"),
        ("APEX_INSTANCE_HEARTBEAT_MS", "1000"),
    ];
    let err = serve_err(&flags(&[("instance_stale_after_ms", "1500")]), &env);
    assert!(
        err.starts_with("--instance-stale-after-ms: instance_stale_after_ms must be at least"),
        "{err}"
    );
    let settings = serve(&FlagValues::default(), &env)
        .unwrap()
        .serve_config()
        .settings;
    assert_eq!(settings.bus_url.unwrap().expose(), "redis://cache:6379");
    assert_eq!(settings.instance_heartbeat, Duration::from_millis(1000));
}

#[test]
fn public_origins_and_the_import_quota_reach_the_settings() {
    let defaults = serve(&FlagValues::default(), &[])
        .unwrap()
        .serve_config()
        .settings;
    assert!(
        defaults.public_origins.is_empty(),
        "empty: serve fills in the loopback origins of the bound port"
    );
    assert_eq!(defaults.limits.import_row_quota, 1_000_000);
    let env = [
        (
            "APEX_PUBLIC_ORIGINS",
            "https://apex.example.com,http://10.0.0.5:8000/",
        ),
        ("APEX_IMPORT_ROW_QUOTA", "5000"),
    ];
    let settings = serve(&FlagValues::default(), &env)
        .unwrap()
        .serve_config()
        .settings;
    assert_eq!(
        settings.public_origins,
        vec!["https://apex.example.com", "http://10.0.0.5:8000/"]
    );
    assert_eq!(settings.limits.import_row_quota, 5000);
    for bad in [
        "apex.example.com",
        "https://apex.example.com/app",
        "https://",
        "ftp://x",
    ] {
        let err = serve_err(&flags(&[("public_origin", bad)]), &[]);
        assert!(
            err.starts_with("--public-origin: ") && err.contains("not an origin"),
            "{bad}: {err}"
        );
    }
    let err = serve_err(&flags(&[("import_row_quota", "0")]), &[]);
    assert!(err.starts_with("--import-row-quota: "), "{err}");
}

#[test]
fn the_default_multitask_strategy_reaches_the_settings() {
    let strategy = |flags: &FlagValues, env: &[(&'static str, &'static str)]| {
        serve(flags, env)
            .unwrap()
            .serve_config()
            .settings
            .default_multitask_strategy
    };
    assert_eq!(
        strategy(&FlagValues::default(), &[]),
        MultitaskStrategy::Enqueue
    );
    let env = [("APEX_DEFAULT_MULTITASK_STRATEGY", "reject")];
    assert_eq!(
        strategy(&FlagValues::default(), &env),
        MultitaskStrategy::Reject
    );
    let rollback = flags(&[("default_multitask_strategy", "rollback")]);
    assert_eq!(strategy(&rollback, &env), MultitaskStrategy::Rollback);
    let err = serve_err(&flags(&[("default_multitask_strategy", "queue")]), &[]);
    assert!(
        err.starts_with(
            "--default-multitask-strategy: expected one of enqueue, interrupt, rollback, reject"
        ),
        "{err}"
    );
}
