//! The command-line layer: a flag for every key of the table that has one, with the key's
//! help, variable and built-in default in its help text, plus `--config`.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches};

use super::keys::{keys_in, Key, Scope, Takes};
use super::{Config, CONFIG_ENV, DEFAULT_CONFIG_FILE};

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

/// A value given on the command line, as given.
#[derive(Debug, Clone)]
pub(super) enum FlagValue {
    Text(String),
    Switch(bool),
    List(Vec<String>),
}

/// The values given on the command line, and `--config`.
#[derive(Debug, Clone, Default)]
pub(super) struct FlagValues {
    pub(super) config: Option<PathBuf>,
    pub(super) values: Vec<(&'static Key, FlagValue)>,
}

/// `[default: VALUE]` for a key's help: its built-in value, unless it is a switch or empty.
fn default_help(key: &Key, defaults: &toml::Value) -> String {
    let shown = match super::show::lookup(defaults, key.path) {
        Some(toml::Value::String(text)) => text.clone(),
        Some(toml::Value::Array(_) | toml::Value::Boolean(_)) | None => return String::new(),
        Some(other) => other.to_string(),
    };
    format!(" [default: {shown}]")
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
        let defaults = Config::shown_defaults();
        keys_in(scope).fold(cmd, |cmd, key| {
            let Some(flag) = key.flag else { return cmd };
            let help = format!(
                "{} [env: {}]{}",
                key.help,
                key.env,
                default_help(key, &defaults)
            );
            let arg = Arg::new(key.name).long(flag).help(help);
            cmd.arg(match key.takes {
                Takes::Switch => arg.action(ArgAction::SetTrue),
                Takes::List => arg.action(ArgAction::Append).value_name(key.value_name),
                Takes::Value => arg.action(ArgAction::Set).value_name(key.value_name),
            })
        })
    }

    fn from_matches(matches: &ArgMatches, scope: Scope) -> FlagValues {
        let mut values = Vec::new();
        for key in keys_in(scope).filter(|key| key.flag.is_some()) {
            if matches.value_source(key.name) != Some(ValueSource::CommandLine) {
                continue;
            }
            let value = match key.takes {
                Takes::Switch => FlagValue::Switch(matches.get_flag(key.name)),
                Takes::List => FlagValue::List(
                    matches
                        .get_many::<String>(key.name)
                        .map(|v| v.cloned().collect())
                        .unwrap_or_default(),
                ),
                Takes::Value => match matches.get_one::<String>(key.name) {
                    Some(value) => FlagValue::Text(value.clone()),
                    None => continue,
                },
            };
            values.push((key, value));
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

/// `--config` and a flag for every key: `apex serve`, `apex config show`, `apex eval`.
#[derive(Debug, Clone, Default)]
pub struct ServeFlags(pub(super) FlagValues);
flags_type!(ServeFlags, Scope::Serve);

/// `--config` and the database keys' flags: `apex migrate`, `apex user create`.
#[derive(Debug, Clone, Default)]
pub struct DatabaseFlags(pub(super) FlagValues);
flags_type!(DatabaseFlags, Scope::Database);
