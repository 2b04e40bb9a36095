//! The embedded local model: SmolLM2-135M-Instruct running in-process on candle.
//!
//! One module per concept:
//! - [`tokenizer`]: byte-level BPE built from the GGUF metadata (no hub file);
//! - [`chatml`]: the ChatML prompt format;
//! - [`model`]: loading the GGUF file, the one-time Q4_1 → Q8_0 requantization and its
//!   cache, and per-request sequences (own KV cache over shared weights);
//! - [`sampling`]: greedy by default, temperature/top-p when configured;
//! - [`engine`]: dedicated inference threads fed by a bounded queue;
//! - [`provider`]: [`LocalProvider`], the `LlmProvider` implementation.
//!
//! The model file comes from `scripts/fetch-model.sh`, once per machine; see
//! [`default_model_path`].

pub mod chatml;
pub mod engine;
pub mod model;
pub mod provider;
pub mod sampling;
pub mod tokenizer;

pub use engine::EngineConfig;
pub use provider::{LocalOptions, LocalProvider};
pub use sampling::SamplingConfig;

use std::path::{Path, PathBuf};

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
