//! `apex config show`: the effective configuration as TOML, secrets redacted, each line
//! saying which layer its value came from.

use super::keys::{keys_in, Scope};
use super::layers::{Layers, Source};
use super::{Config, CONFIG_ENV, DEFAULT_CONFIG_FILE};

/// The value at the dotted `path` of `table`.
pub(super) fn lookup<'a>(table: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.')
        .try_fold(table, |value, part| value.get(part))
}

/// The lines of `config show`. Values are printed as they serialise (secrets as `"***"`,
/// URLs without their password); unset keys without a default are comments.
pub(super) fn render(config: &Config, layers: &Layers) -> anyhow::Result<String> {
    let shown = toml::Value::try_from(config)?;
    let mut out = String::from(
        "# Effective configuration: defaults < configuration file < APEX_* variables < flags.\n",
    );
    match &layers.file {
        Some(path) => out.push_str(&format!("# Configuration file: {}\n", path.display())),
        None => out.push_str(&format!(
            "# Configuration file: none (--config, {CONFIG_ENV} or ./{DEFAULT_CONFIG_FILE})\n"
        )),
    }
    for key in keys_in(Scope::Serve) {
        match lookup(&shown, key.path) {
            Some(value) => {
                let source = layers.source(key).unwrap_or(Source::Default);
                out.push_str(&format!("{} = {value}  # {}\n", key.name, source.label()));
            }
            None => out.push_str(&format!(
                "# {} unset: {} (set {} or the file key)\n",
                key.name, key.unset_means, key.env
            )),
        }
    }
    Ok(out)
}
