//! The four layers as figment providers, merged in order, and the errors that name a key
//! and the layer its value came from.
//!
//! Each layer is read into figment values nested like [`Config`] (the file's flat key
//! `llm_threads` becomes `llm.threads`, through the table), so figment merges them and
//! keeps, for every value, which layer set it: `config show` and error messages read that
//! back. Nothing is checked while reading except the file's key names; the winning values
//! are checked when the merged result is deserialised into the typed structs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use figment::error::Kind;
use figment::providers::{Format as _, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;

use super::flags::{FlagValue, FlagValues};
use super::keys::{find_key, keys_in, Key, Scope, KEYS};
use super::{Config, CONFIG_ENV, DEFAULT_CONFIG_FILE};

/// Reads an environment variable (injected so tests need not change the process's).
pub(super) type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Source {
    Default,
    File(PathBuf),
    Env(&'static str),
    Flag(&'static str),
}

impl Source {
    /// The prefix of an error about `key` from this layer.
    pub(super) fn locate(&self, key: &str) -> String {
        match self {
            Source::Default => format!("default {key}"),
            Source::File(path) => format!("{}: {key}", path.display()),
            Source::Env(var) => format!("{var} (environment)"),
            Source::Flag(flag) => format!("--{flag}"),
        }
    }

    /// Short label for `config show`.
    pub(super) fn label(&self) -> String {
        match self {
            Source::Default => "default".into(),
            Source::File(path) => format!("file {}", path.display()),
            Source::Env(var) => format!("env {var}"),
            Source::Flag(flag) => format!("flag --{flag}"),
        }
    }
}

/// The names of the layers' figment metadata, by which a value's layer is read back.
const DEFAULT_LAYER: &str = "built-in default";
const FILE_LAYER: &str = "configuration file";
const ENV_LAYER: &str = "environment";
const FLAG_LAYER: &str = "command line";

/// One layer: the values it sets, nested like [`Config`].
struct Layer {
    metadata: Metadata,
    values: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }
    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

/// Sets `value` at the dotted `path` of `dict`.
fn insert(dict: &mut Dict, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            dict.insert(path.to_string(), value);
        }
        Some((section, rest)) => {
            let entry = dict
                .entry(section.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert(inner, rest, value);
            }
        }
    }
}

/// Reads an environment variable; unset, empty or blank counts as unset.
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

/// The configuration file: `--config`, else `APEX_CONFIG`, else `./apex.toml` if present.
fn file_path(flags: &FlagValues, env: EnvLookup<'_>) -> anyhow::Result<Option<PathBuf>> {
    Ok(match (&flags.config, env_text(env, CONFIG_ENV)?) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(path)) => Some(PathBuf::from(path)),
        (None, None) => Some(Path::new(".").join(DEFAULT_CONFIG_FILE)).filter(|p| p.exists()),
    })
}

/// Reads the file's flat keys into values nested like [`Config`]; an unknown key is an
/// error.
fn read_file(path: &Path) -> anyhow::Result<Dict> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the configuration file {}", path.display()))?;
    let table = Toml::string(&text)
        .data()
        .map_err(|err| anyhow!("{}: not valid TOML: {}", path.display(), err.kind))?
        .remove(&Profile::Default)
        .unwrap_or_default();
    let mut values = Dict::new();
    for (name, value) in table {
        let Some(key) = find_key(&name) else {
            let suggestion = KEYS
                .iter()
                .map(|k| (distance(&name, k.name), k.name))
                .filter(|(d, _)| *d <= 3)
                .min()
                .map(|(_, k)| format!(" (did you mean {k:?}?)"))
                .unwrap_or_default();
            bail!(
                "{}: unknown key {name:?}{suggestion}; `apex serve --help` lists the keys \
                 (the flags in snake_case)",
                path.display()
            );
        };
        insert(&mut values, key.path, value);
    }
    Ok(values)
}

/// The merged layers of one command, and the configuration file that was read.
#[derive(Debug)]
pub(super) struct Layers {
    figment: Figment,
    pub(super) file: Option<PathBuf>,
}

impl Layers {
    /// Reads every layer for the keys of `scope`: the built-in defaults, the file (any
    /// known key; only the scope's are used), the scope's variables and flags.
    pub(super) fn gather(
        flags: &FlagValues,
        env: EnvLookup<'_>,
        scope: Scope,
    ) -> anyhow::Result<Layers> {
        let mut figment = Figment::from(Layer {
            metadata: Metadata::named(DEFAULT_LAYER),
            values: Config::default_values()?,
        });
        let file = file_path(flags, env)?;
        if let Some(path) = &file {
            figment = figment.merge(Layer {
                metadata: Metadata::from(FILE_LAYER, path.as_path()),
                values: read_file(path)?,
            });
        }
        let mut values = Dict::new();
        for key in keys_in(scope) {
            if let Some(text) = env_text(env, key.env)? {
                insert(&mut values, key.path, Value::from(text));
            }
        }
        figment = figment.merge(Layer {
            metadata: Metadata::named(ENV_LAYER),
            values,
        });
        let mut values = Dict::new();
        for (key, value) in flags.values.iter().filter(|(k, _)| k.in_scope(scope)) {
            let value = match value {
                FlagValue::Text(text) => Value::from(text.clone()),
                FlagValue::Switch(on) => Value::from(*on),
                FlagValue::List(items) => Value::from(items.clone()),
            };
            insert(&mut values, key.path, value);
        }
        figment = figment.merge(Layer {
            metadata: Metadata::named(FLAG_LAYER),
            values,
        });
        Ok(Layers { figment, file })
    }

    /// The merged values as `T`; a value that does not fit its field fails naming the key
    /// and its layer.
    pub(super) fn extract<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        self.figment.extract().map_err(|err| self.explain(err))
    }

    /// The layer that set `key`; `None`: it is unset.
    pub(super) fn source(&self, key: &Key) -> Option<Source> {
        let metadata = self.figment.find_metadata(key.path)?;
        Some(match metadata.name.as_ref() {
            FILE_LAYER => Source::File(
                metadata
                    .source
                    .as_ref()
                    .and_then(|source| source.file_path())
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            ),
            ENV_LAYER => Source::Env(key.env),
            FLAG_LAYER => Source::Flag(key.flag.unwrap_or(key.name)),
            _ => Source::Default,
        })
    }

    /// The prefix of an error about the key named `name`: the key and its value's layer.
    pub(super) fn locate(&self, name: &str) -> String {
        match find_key(name) {
            Some(key) => self.source(key).unwrap_or(Source::Default).locate(key.name),
            None => name.to_string(),
        }
    }

    fn explain(&self, err: figment::Error) -> anyhow::Error {
        let path = err.path.join(".");
        let key = KEYS.iter().find(|key| {
            path == key.path
                || path
                    .strip_prefix(key.path)
                    .is_some_and(|rest| rest.starts_with('.'))
        });
        let Some(key) = key else {
            // A field without a key or a key without a field: a bug in the table, which
            // the tests catch.
            return anyhow!("configuration field {path:?}: {}", err.kind);
        };
        let location = self.source(key).unwrap_or(Source::Default).locate(key.name);
        match &err.kind {
            Kind::Message(message) => anyhow!("{location}: {message}"),
            _ if key.secret => anyhow!("{location}: not a valid value"),
            other => anyhow!("{location}: {other}"),
        }
    }
}
