//! The model weights: loading the GGUF file (requantizing it once where this CPU needs it),
//! per-request sequences.
//!
//! On a CPU with AVX-512 VNNI, Apex's own products (`apex_kernels::quantized_matmul`) take
//! the Q4_1 blocks the file ships with as they are, and the file is read directly. Elsewhere
//! candle has no fast CPU kernel for Q4_1 but a fast one for Q8_0, so every Q4_x/Q5_x tensor
//! is requantized to Q8_0 once and the result is cached next to the original
//! (`<name>.Q8_0.gguf`, tagged with the source's size so a changed source is noticed). If
//! the folder is not writable the requantized weights are used from memory.
//!
//! [`LocalModel`] holds the weights (immutable, shared by every request) and the tokenizer.
//! A [`Sequence`] is one request's state: its own KV cache and position, so requests never
//! see each other's state. [`LocalModel::forward`] advances any number of sequences in one
//! pass over the weights (see [`super::transformer`]).

use std::io::{Cursor, Seek, Write};
use std::path::{Path, PathBuf};

use apex_kernels::PackedMatrix;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

use super::tokenizer::Tokenizer;
use super::transformer::{KvCache, Step, Transformer, MAX_SEQ_LEN};

/// Bumped when the cached file's layout or content rules change.
const REQUANT_VERSION: u32 = 1;
const META_SOURCE_SIZE: &str = "apex.requantized_from_size";
const META_VERSION: &str = "apex.requant_version";
/// `general.file_type` of a mostly-Q8_0 file.
const FILE_TYPE_Q8_0: u32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model file {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("inference failed: {0}")]
    Inference(String),
}

impl From<candle_core::Error> for ModelError {
    fn from(err: candle_core::Error) -> Self {
        ModelError::Inference(err.to_string())
    }
}

fn load_err(path: &Path, message: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Where the requantized copy of `source` is cached.
pub fn cache_path(source: &Path) -> PathBuf {
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    source.with_file_name(format!("{stem}.Q8_0.gguf"))
}

/// Whether a tensor of `dtype` and shape `dims` is converted to Q8_0: the 4- and 5-bit
/// formats candle has no fast CPU product for, except where Apex's own product takes the
/// matrix as it is on this CPU (Q4_1 with AVX-512 VNNI, in whole tiles: half the bytes of
/// Q8_0 to read per token, and the file's own weights rather than a rounding of them).
fn needs_requant(dtype: GgmlDType, dims: &[usize]) -> bool {
    matches!(
        dtype,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1
    ) && dims.last().is_some_and(|width| width % 32 == 0)
        && !PackedMatrix::takes(dtype, dims)
}

/// Is `cache` a requantized copy of a source of `source_size` bytes, by this version, with
/// nothing left that this CPU would requantize (a copy made where Apex's own product kept
/// Q4_1 is not used on a CPU without it)?
fn cache_is_current(cache: &Path, source_size: u64) -> bool {
    let Ok(mut file) = std::fs::File::open(cache) else {
        return false;
    };
    let Ok(content) = gguf_file::Content::read(&mut file) else {
        return false;
    };
    let size = content
        .metadata
        .get(META_SOURCE_SIZE)
        .and_then(|v| v.to_u64().ok());
    let version = content
        .metadata
        .get(META_VERSION)
        .and_then(|v| v.to_u32().ok());
    size == Some(source_size)
        && version == Some(REQUANT_VERSION)
        && !content
            .tensor_infos
            .values()
            .any(|t| needs_requant(t.ggml_dtype, t.shape.dims()))
}

/// Requantizes every Q4/Q5 tensor of `source` to Q8_0 and returns the new GGUF file's bytes.
fn requantize(source: &Path, source_size: u64) -> Result<Vec<u8>, ModelError> {
    let mut file = std::fs::File::open(source).map_err(|e| load_err(source, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| load_err(source, e))?;
    let device = Device::Cpu;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let tensor = content
            .tensor(&mut file, name, &device)
            .map_err(|e| load_err(source, e))?;
        let tensor = if needs_requant(tensor.dtype(), tensor.shape().dims()) {
            let values = tensor.dequantize(&device)?;
            QTensor::quantize(&values, GgmlDType::Q8_0)?
        } else {
            tensor
        };
        tensors.push((name.clone(), tensor));
    }
    let mut metadata: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.sort_by(|a, b| a.0.cmp(&b.0));
    metadata.push((
        "general.file_type".into(),
        gguf_file::Value::U32(FILE_TYPE_Q8_0),
    ));
    metadata.push((META_SOURCE_SIZE.into(), gguf_file::Value::U64(source_size)));
    metadata.push((META_VERSION.into(), gguf_file::Value::U32(REQUANT_VERSION)));
    let metadata_refs: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = Cursor::new(Vec::new());
    gguf_file::write(&mut out, &metadata_refs, &tensor_refs)?;
    Ok(out.into_inner())
}

/// The model's name from its file: `SmolLM2-135M-Instruct.Q4_1.gguf` is
/// `SmolLM2-135M-Instruct` (the quantization is how it is stored, not which model it is).
/// This is the id `/v1/models` offers and the model recorded with token usage.
fn model_name(path: &Path) -> String {
    let Some(file) = path.file_name() else {
        return "local".into();
    };
    let file = file.to_string_lossy();
    let stem = file.trim_end_matches(".gguf");
    match stem.rsplit_once('.') {
        Some((base, quant))
            if !base.is_empty()
                && quant.starts_with(['Q', 'q', 'F', 'f', 'B', 'b'])
                && quant.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            base.to_string()
        }
        _ => stem.to_string(),
    }
}

/// Writes `bytes` to `path` atomically (temporary file, then rename).
fn persist(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The model file's bytes with Q8_0 weights: the cached copy if current, else made now.
enum Weights {
    File(std::fs::File),
    Memory(Cursor<Vec<u8>>),
}

fn open_q8(source: &Path) -> Result<Weights, ModelError> {
    let mut file = std::fs::File::open(source).map_err(|e| load_err(source, e))?;
    let source_size = file.metadata().map_err(|e| load_err(source, e))?.len();
    let content = gguf_file::Content::read(&mut file).map_err(|e| load_err(source, e))?;
    if !content
        .tensor_infos
        .values()
        .any(|t| needs_requant(t.ggml_dtype, t.shape.dims()))
    {
        file.rewind().map_err(|e| load_err(source, e))?;
        return Ok(Weights::File(file));
    }
    let cache = cache_path(source);
    if cache_is_current(&cache, source_size) {
        let file = std::fs::File::open(&cache).map_err(|e| load_err(&cache, e))?;
        return Ok(Weights::File(file));
    }
    tracing::info!(source = %source.display(), "requantizing the model to Q8_0 (once)");
    let bytes = requantize(source, source_size)?;
    match persist(&cache, &bytes) {
        Ok(()) => tracing::info!(cache = %cache.display(), "cached the requantized model"),
        Err(err) => tracing::warn!(
            cache = %cache.display(), error = %err,
            "could not cache the requantized model; using it from memory"
        ),
    }
    Ok(Weights::Memory(Cursor::new(bytes)))
}

/// The loaded model: shared weights and tokenizer. Immutable; shared by all requests.
pub struct LocalModel {
    weights: Transformer,
    pub tokenizer: Tokenizer,
    /// Tokens that end an answer (`<|im_end|>`, `<|endoftext|>`).
    pub stop_ids: Vec<u32>,
    /// Longest prompt plus answer, in tokens.
    pub context_length: usize,
    /// The model's name, for logs and `agent_completed` results.
    pub name: String,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("name", &self.name)
            .field("context_length", &self.context_length)
            .finish_non_exhaustive()
    }
}

impl LocalModel {
    /// Loads a GGUF model (llama architecture, byte-level BPE tokenizer).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        if !path.is_file() {
            return Err(load_err(path, "not found"));
        }
        let device = Device::Cpu;
        let mut reader = open_q8(path)?;
        let content = match &mut reader {
            Weights::File(file) => gguf_file::Content::read(file),
            Weights::Memory(bytes) => gguf_file::Content::read(bytes),
        }
        .map_err(|e| load_err(path, e))?;
        let tokenizer = Tokenizer::from_gguf(&content).map_err(|e| load_err(path, e))?;
        let mut stop_ids: Vec<u32> = ["<|im_end|>", "<|endoftext|>"]
            .iter()
            .filter_map(|t| tokenizer.token_id(t))
            .collect();
        if let Some(eos) = tokenizer.eos_id {
            if !stop_ids.contains(&eos) {
                stop_ids.push(eos);
            }
        }
        let context_length = content
            .metadata
            .get("llama.context_length")
            .and_then(|v| v.to_u32().ok())
            .map_or(2048, |n| n as usize)
            .min(MAX_SEQ_LEN);
        let name = model_name(path);
        let weights = match &mut reader {
            Weights::File(file) => Transformer::from_gguf(&content, file, &device),
            Weights::Memory(bytes) => Transformer::from_gguf(&content, bytes, &device),
        }
        .map_err(|e| load_err(path, e))?;
        Ok(Self {
            weights,
            tokenizer,
            stop_ids,
            context_length,
            name,
        })
    }

    /// A fresh sequence (empty KV cache).
    pub fn sequence(&self) -> Sequence {
        Sequence {
            cache: KvCache::default(),
            position: 0,
        }
    }

    /// Feeds each sequence its tokens (a prompt chunk or one generated token), all in one
    /// pass over the weights; returns, per sequence, the logits that predict the token after
    /// its last one.
    pub fn forward(
        &self,
        batch: &mut [(&mut Sequence, &[u32])],
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut steps: Vec<Step<'_>> = batch
            .iter_mut()
            .map(|(sequence, tokens)| Step {
                position: sequence.position,
                cache: &mut sequence.cache,
                tokens,
            })
            .collect();
        let logits = self.weights.forward(&mut steps)?;
        drop(steps);
        for (sequence, tokens) in batch.iter_mut() {
            sequence.position += tokens.len();
        }
        Ok(logits)
    }
}

/// One request's decoding state: its own KV cache and position.
pub struct Sequence {
    cache: KvCache,
    position: usize,
}

impl Sequence {
    /// Tokens processed so far.
    pub fn position(&self) -> usize {
        self.position
    }
}

#[cfg(test)]
mod tests {
    use super::model_name;
    use std::path::Path;

    #[test]
    fn the_model_name_drops_the_quantization() {
        let name = |p: &str| model_name(Path::new(p));
        assert_eq!(
            name("/m/SmolLM2-135M-Instruct.Q4_1.gguf"),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(
            name("SmolLM2-135M-Instruct.Q4_1.Q8_0.gguf"),
            "SmolLM2-135M-Instruct.Q4_1"
        );
        assert_eq!(name("llama-3.2-1b.F16.gguf"), "llama-3.2-1b");
        assert_eq!(name("tiny.gguf"), "tiny");
        assert_eq!(name("v1.5.gguf"), "v1.5");
    }
}
