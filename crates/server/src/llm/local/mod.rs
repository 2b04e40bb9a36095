//! The embedded local model: SmolLM2-135M-Instruct running in-process on candle.
//!
//! One module per concept:
//! - [`tokenizer`]: byte-level BPE built from the GGUF metadata (no hub file);
//! - [`chatml`]: the ChatML prompt format;
//! - [`model`]: loading the GGUF file (on CPUs without AVX-512 VNNI, the one-time Q4_1 →
//!   Q8_0 requantization and its cache), and per-request sequences (own KV cache over
//!   shared weights);
//! - [`transformer`]: the forward pass, batched: one pass advances every active request;
//! - [`sampling`]: greedy by default, temperature/top-p when configured;
//! - [`engine`]: dedicated inference threads fed by a bounded queue;
//! - [`fair_queue`]: the engine's waiting requests, taken in turn per user;
//! - [`provider`]: [`LocalProvider`], the `LlmProvider` implementation.
//!
//! The weight products on CPUs with AVX-512 VNNI are `apex_kernels::quantized_matmul`
//! (candle's elsewhere), in a crate of their own because they are SIMD intrinsics.
//!
//! The model file comes from `scripts/fetch-model.sh`, once per machine; see
//! [`default_model_path`] (defined with the settings).

pub mod chatml;
pub mod engine;
pub mod fair_queue;
pub mod model;
pub mod provider;
pub mod sampling;
pub mod tokenizer;
pub mod transformer;

pub use engine::EngineConfig;
pub use provider::{LocalOptions, LocalProvider};
pub use sampling::SamplingConfig;

// The model file's location is configuration (a leaf the settings own); re-exported here,
// where callers looking for the local model expect it.
pub use crate::settings::{
    default_model_path, machine_cache_path, DEFAULT_MODEL_FILE, MODEL_FILE_NAME,
};
