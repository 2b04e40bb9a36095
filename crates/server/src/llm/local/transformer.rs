//! The llama forward pass, batched across requests: one pass advances many sequences.
//!
//! Why not candle's `quantized_llama::ModelWeights`: its `forward` takes one sequence (its
//! KV cache lives inside the weights), so N concurrent requests cost N passes and every
//! weight is read and multiplied through the slow path N times per generated token. Here
//! the rows of every sequence in a step (one token for each decoding request, a prompt
//! chunk for each prefilling one) go through each matrix product together, so each weight
//! tile is loaded once for several rows ([`Projection`] says which product does it). Only
//! attention is per sequence, against that sequence's own cache.
//!
//! Attention differs in three ways, none of which changes the arithmetic: each sequence's
//! KV cache is a plain buffer that grows by doubling ([`KvCache`]; candle's copies the
//! whole cache every token); a decoding token's rotation and attention are computed in
//! plain loops on the product's output rows (`apex_kernels::rotary`, and
//! `apex_kernels::attention::decode`, SIMD where the CPU has AVX-512), as tensor operations
//! on a handful of values cost more to set up than to compute, for every sequence in every
//! layer; and grouped-query attention over a prompt reads the shared K/V heads through a
//! reshape of the queries instead of copying K and V once per query head.
//!
//! The tests compare this pass's next-token distributions with candle's model; the
//! differences are the rounding of the quantized activations, not the model.

use apex_kernels::rotary::{rotate_heads, Pairing};
use apex_kernels::{PackedMatrix, QuantizedRows};
use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};

/// Longest sequence the rotary tables cover (candle's limit for the same models).
pub const MAX_SEQ_LEN: usize = 4096;

/// The weights: immutable after loading, shared by every request (`&self` everywhere).
pub struct Transformer {
    /// Token embeddings, dequantized (a lookup, not a product).
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: Projection,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    hidden: usize,
    /// Rotary tables, `[MAX_SEQ_LEN, rope_dim / 2]`, as tensors for prompts and as plain
    /// rows for decoding.
    cos: Tensor,
    sin: Tensor,
    cos_rows: Vec<f32>,
    sin_rows: Vec<f32>,
    /// How a head's dimensions pair up for rotation (NEOX halves or llama's neighbours).
    pairing: Pairing,
}

struct Layer {
    wq: Projection,
    wk: Projection,
    wv: Projection,
    wo: Projection,
    attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: Projection,
    up: Projection,
    down: Projection,
}

/// One weight matrix, `[out, in]`, and the product that multiplies by it.
///
/// On a CPU with AVX-512 VNNI, Q8_0 and Q4_1 weights are repacked for Apex's own product
/// ([`PackedMatrix`]: any width that is a multiple of 32, eight rows per pass over a weight
/// tile, nothing padded, Q4_1 kept 4-bit); elsewhere, or for other formats, candle's
/// `QMatMul` multiplies.
enum Projection {
    Packed(PackedMatrix),
    Candle {
        weight: std::sync::Arc<QTensor>,
        matmul: QMatMul,
    },
}

impl Projection {
    fn new(tensor: QTensor) -> Result<Self> {
        if let Some(packed) = PackedMatrix::from_qtensor(&tensor)? {
            return Ok(Self::Packed(packed));
        }
        let weight = std::sync::Arc::new(tensor);
        Ok(Self::Candle {
            matmul: QMatMul::QTensor(weight.clone()),
            weight,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Packed(packed) => Self::multiply(packed, &quantize_rows(x)?, x.device()),
            Self::Candle { matmul, .. } => matmul.forward(x),
        }
    }

    fn multiply(packed: &PackedMatrix, x: &QuantizedRows, device: &Device) -> Result<Tensor> {
        let rows = x.rows();
        Tensor::from_vec(packed.multiply(x), (rows, packed.out()), device)
    }

    /// The products of one input with several matrices of the same input width (q, k and
    /// v; gate and up): the input is quantized once for all of them.
    fn forward_shared(projections: &[&Projection], x: &Tensor) -> Result<Vec<Tensor>> {
        let packed: Vec<&PackedMatrix> = projections
            .iter()
            .filter_map(|p| match p {
                Self::Packed(packed) => Some(packed),
                Self::Candle { .. } => None,
            })
            .collect();
        if packed.len() == projections.len() {
            let rows = quantize_rows(x)?;
            return packed
                .into_iter()
                .map(|p| Self::multiply(p, &rows, x.device()))
                .collect();
        }
        let weights: Vec<&QTensor> = projections
            .iter()
            .filter_map(|p| match p {
                Self::Candle { weight, .. } => Some(weight.as_ref()),
                Self::Packed(_) => None,
            })
            .collect();
        if weights.len() == projections.len() {
            if let Some(outputs) = QTensor::gemv_fused_shared_lhs(&weights, x)? {
                return Ok(outputs);
            }
        }
        projections.iter().map(|p| p.forward(x)).collect()
    }
}

/// `x` (`[rows, width]`) quantized for [`PackedMatrix`].
fn quantize_rows(x: &Tensor) -> Result<QuantizedRows> {
    let (rows, width) = x.dims2()?;
    let values = x.flatten_all()?.to_vec1::<f32>()?;
    Ok(QuantizedRows::new(&values, rows, width))
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn new(weight: QTensor, eps: f32, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: weight.dequantize(device)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// One sequence's keys and values for every layer. Owned by one request.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

/// One layer's cached keys and values, `[position][kv_head][head_dim]` each: appending a
/// position is a copy of its rows to the end, and the buffers grow by doubling.
#[derive(Default)]
struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// One sequence's part of a pass: the tokens it feeds and where they start.
pub struct Step<'a> {
    pub cache: &'a mut KvCache,
    /// Tokens this sequence has already processed (the first new token's position).
    pub position: usize,
    pub tokens: &'a [u32],
}

fn metadata<'a>(content: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    content.metadata.get(key).ok_or_else(|| {
        candle_core::Error::Msg(format!("cannot find {key} in the model's metadata"))
    })
}

/// Architectures whose rotary embedding pairs dimension `i` with `i + d/2` (as llama.cpp's
/// `llama_model_rope_type`); llama and its kind pair neighbours.
fn rope_is_neox(architecture: &str) -> bool {
    matches!(
        architecture,
        "qwen"
            | "qwen2"
            | "qwen3"
            | "falcon"
            | "phi2"
            | "phi3"
            | "stablelm"
            | "starcoder2"
            | "olmo2"
    )
}

fn rotary_tables(rope_dim: usize, base: f32, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..rope_dim)
        .step_by(2)
        .map(|i| 1f32 / base.powf(i as f32 / rope_dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let angles = Tensor::arange(0, MAX_SEQ_LEN as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((MAX_SEQ_LEN, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl Transformer {
    /// Reads a llama-architecture GGUF model (dense feed-forward; mixtures of experts are
    /// refused).
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        content: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
    ) -> Result<Self> {
        let count = |key: &str| -> Result<usize> { Ok(metadata(content, key)?.to_u32()? as usize) };
        if content
            .metadata
            .get("llama.expert_count")
            .and_then(|v| v.to_u32().ok())
            .is_some_and(|n| n > 1)
        {
            candle_core::bail!("mixture-of-experts models are not supported");
        }
        let n_head = count("llama.attention.head_count")?;
        let n_kv_head = count("llama.attention.head_count_kv")?;
        let blocks = count("llama.block_count")?;
        let hidden = count("llama.embedding_length")?;
        let rope_dim = count("llama.rope.dimension_count")?;
        let eps = metadata(content, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?;
        let rope_base = content
            .metadata
            .get("llama.rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10_000.0);
        let architecture = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if n_kv_head == 0 || n_head % n_kv_head != 0 {
            candle_core::bail!("{n_head} query heads cannot share {n_kv_head} key/value heads");
        }
        let (cos, sin) = rotary_tables(rope_dim, rope_base, device)?;
        let mut tensor = |name: &str| content.tensor(reader, name, device);
        let embeddings_q = tensor("token_embd.weight")?;
        let embeddings = embeddings_q.dequantize(device)?;
        let norm = RmsNorm::new(tensor("output_norm.weight")?, eps, device)?;
        // Models with tied embeddings have no output matrix: the embeddings are reused.
        let output = match tensor("output.weight") {
            Ok(output) => output,
            Err(_) => embeddings_q,
        };
        let mut layers = Vec::with_capacity(blocks);
        for index in 0..blocks {
            let mut matrix =
                |suffix: &str| Projection::new(tensor(&format!("blk.{index}.{suffix}.weight"))?);
            let wq = matrix("attn_q")?;
            let wk = matrix("attn_k")?;
            let wv = matrix("attn_v")?;
            let wo = matrix("attn_output")?;
            let gate = matrix("ffn_gate")?;
            let up = matrix("ffn_up")?;
            let down = matrix("ffn_down")?;
            layers.push(Layer {
                wq,
                wk,
                wv,
                wo,
                gate,
                up,
                down,
                attention_norm: RmsNorm::new(
                    tensor(&format!("blk.{index}.attn_norm.weight"))?,
                    eps,
                    device,
                )?,
                ffn_norm: RmsNorm::new(
                    tensor(&format!("blk.{index}.ffn_norm.weight"))?,
                    eps,
                    device,
                )?,
            });
        }
        Ok(Self {
            embeddings,
            layers,
            norm,
            output: Projection::new(output)?,
            n_head,
            n_kv_head,
            head_dim: hidden / n_head,
            hidden,
            cos_rows: cos.flatten_all()?.to_vec1()?,
            sin_rows: sin.flatten_all()?.to_vec1()?,
            cos,
            sin,
            pairing: if rope_is_neox(&architecture) {
                Pairing::Halves
            } else {
                Pairing::Interleaved
            },
        })
    }

    /// Advances every step's sequence by its tokens in one pass; returns, per step, the
    /// logits that predict the token after its last one. Each step's cache grows by its
    /// tokens; the caller advances its position.
    pub fn forward(&self, steps: &mut [Step<'_>]) -> Result<Vec<Vec<f32>>> {
        if steps.is_empty() {
            return Ok(Vec::new());
        }
        let device = self.embeddings.device().clone();
        let tokens: Vec<u32> = steps
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        if steps.iter().any(|s| s.tokens.is_empty()) {
            candle_core::bail!("a sequence has no tokens to process");
        }
        if let Some(step) = steps
            .iter()
            .find(|s| s.position + s.tokens.len() > MAX_SEQ_LEN)
        {
            candle_core::bail!(
                "{} tokens exceed the model's {MAX_SEQ_LEN}",
                step.position + step.tokens.len()
            );
        }
        let ids = Tensor::new(tokens.as_slice(), &device)?;
        let mut x = self.embeddings.index_select(&ids, 0)?;
        for (index, layer) in self.layers.iter().enumerate() {
            let normed = layer.attention_norm.forward(&x)?;
            let [q, k, v]: [Tensor; 3] =
                Projection::forward_shared(&[&layer.wq, &layer.wk, &layer.wv], &normed)?
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("q, k and v products".into()))?;
            let attended = self.attend(index, steps, &q, &k, &v)?;
            let x1 = (layer.wo.forward(&attended)? + &x)?;
            let normed = layer.ffn_norm.forward(&x1)?;
            let [gate, up]: [Tensor; 2] =
                Projection::forward_shared(&[&layer.gate, &layer.up], &normed)?
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("gate and up products".into()))?;
            let gated = (candle_nn::ops::silu(&gate)? * up)?;
            x = (layer.down.forward(&gated)? + x1)?;
        }
        // Only each sequence's last row predicts anything.
        let mut last = Vec::with_capacity(steps.len());
        let mut row = 0u32;
        for step in steps.iter() {
            row += step.tokens.len() as u32;
            last.push(row - 1);
        }
        let last = Tensor::new(last.as_slice(), &device)?;
        let x = self.norm.forward(&x.index_select(&last, 0)?)?;
        self.output
            .forward(&x)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()
    }

    /// Rotary position embedding of `[heads, len, head_dim]` rows starting at `position`.
    fn rotate(&self, x: &Tensor, position: usize) -> Result<Tensor> {
        let len = x.dim(1)?;
        let cos = self.cos.narrow(0, position, len)?;
        let sin = self.sin.narrow(0, position, len)?;
        let x = x.contiguous()?.unsqueeze(0)?;
        let rotated = match self.pairing {
            Pairing::Halves => candle_nn::rotary_emb::rope(&x, &cos, &sin)?,
            Pairing::Interleaved => candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?,
        };
        rotated.squeeze(0)
    }

    /// Every sequence's attention in layer `index`: `q`, `k` and `v` hold all the pass's
    /// rows (`[rows, heads × head_dim]`, `[rows, kv_heads × head_dim]`), sequence after
    /// sequence; returns `[rows, hidden]` in the same order.
    fn attend(
        &self,
        index: usize,
        steps: &mut [Step<'_>],
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let rows = q.dim(0)?;
        let (q_width, kv_width) = (self.hidden, self.n_kv_head * self.head_dim);
        let queries = q.flatten_all()?.to_vec1::<f32>()?;
        let keys = k.flatten_all()?.to_vec1::<f32>()?;
        let values = v.flatten_all()?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(rows * self.hidden);
        let mut row = 0;
        for step in steps.iter_mut() {
            let len = step.tokens.len();
            if len == 1 {
                out.extend(self.decode_attention(
                    self.layer_cache(step.cache, index),
                    step.position,
                    &queries[row * q_width..(row + 1) * q_width],
                    &keys[row * kv_width..(row + 1) * kv_width],
                    &values[row * kv_width..(row + 1) * kv_width],
                ));
            } else {
                let attended = self.attention(
                    index,
                    step,
                    &q.narrow(0, row, len)?,
                    &k.narrow(0, row, len)?,
                    &v.narrow(0, row, len)?,
                )?;
                out.extend(attended.flatten_all()?.to_vec1::<f32>()?);
            }
            row += len;
        }
        Tensor::from_vec(out, (rows, self.hidden), q.device())
    }

    /// `cache`, layer `index`'s part of a sequence's cache (made on its first use).
    fn layer_cache<'c>(&self, cache: &'c mut KvCache, index: usize) -> &'c mut LayerCache {
        if cache.layers.len() <= index {
            cache
                .layers
                .resize_with(self.layers.len(), LayerCache::default);
        }
        &mut cache.layers[index]
    }

    /// A decoding token's attention: its query, key and value rows as the products made
    /// them (`[heads × head_dim]`, `[kv_heads × head_dim]` twice) are rotated for
    /// `position`, the key and value appended to `cache`, and the query attends to every
    /// cached position; returns `[hidden]`.
    fn decode_attention(
        &self,
        cache: &mut LayerCache,
        position: usize,
        query: &[f32],
        key: &[f32],
        value: &[f32],
    ) -> Vec<f32> {
        let (heads, kv_heads, dim) = (self.n_head, self.n_kv_head, self.head_dim);
        let half = self.cos_rows.len() / MAX_SEQ_LEN;
        let angles = position * half..(position + 1) * half;
        let (cos, sin) = (&self.cos_rows[angles.clone()], &self.sin_rows[angles]);
        let mut query = query.to_vec();
        rotate_heads(&mut query, dim, cos, sin, self.pairing);
        let start = cache.keys.len();
        cache.keys.extend_from_slice(key);
        rotate_heads(&mut cache.keys[start..], dim, cos, sin, self.pairing);
        cache.values.extend_from_slice(value);
        apex_kernels::attention::decode(&query, &cache.keys, &cache.values, heads, kv_heads, dim)
    }

    /// One sequence's prompt attention in layer `index`: `q`, `k`, `v` are its `[len, heads
    /// × head_dim]` rows; returns `[len, hidden]`.
    fn attention(
        &self,
        index: usize,
        step: &mut Step<'_>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let len = step.tokens.len();
        let (heads, kv_heads, dim) = (self.n_head, self.n_kv_head, self.head_dim);
        let group = heads / kv_heads;
        let q = self.rotate(
            &q.reshape((len, heads, dim))?.transpose(0, 1)?,
            step.position,
        )?;
        let k = self.rotate(
            &k.reshape((len, kv_heads, dim))?.transpose(0, 1)?,
            step.position,
        )?;
        let cache = self.layer_cache(step.cache, index);
        // Stored as [position][kv_head][dim]: k back from [kv_head, len, dim], v as it came.
        cache
            .keys
            .extend(k.transpose(0, 1)?.flatten_all()?.to_vec1::<f32>()?);
        cache.values.extend(v.flatten_all()?.to_vec1::<f32>()?);
        let total = step.position + len;
        let keys = Tensor::from_slice(&cache.keys, (total, kv_heads, dim), q.device())?
            .transpose(0, 1)?
            .contiguous()?;
        let values = Tensor::from_slice(&cache.values, (total, kv_heads, dim), q.device())?
            .transpose(0, 1)?
            .contiguous()?;
        // Query head h uses key/value head h / group, so the queries of a group sit next to
        // each other: [kv_heads, group × len, dim] against that head's [total, dim] keys.
        let q = q.reshape((kv_heads, group * len, dim))?;
        let scores = (q.matmul(&keys.t()?)? / (dim as f64).sqrt())?;
        let scores = scores.broadcast_add(&causal_mask(group, len, step.position, q.device())?)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights.matmul(&values)?; // [kv_heads, group × len, dim]
        out.reshape((heads, len, dim))?
            .transpose(0, 1)?
            .reshape((len, self.hidden))
    }
}

/// Additive mask for `len` new queries at `position` (`group` copies, one per query head
/// sharing a key head): query `i` sees keys `0..=position + i`.
fn causal_mask(group: usize, len: usize, position: usize, device: &Device) -> Result<Tensor> {
    let total = position + len;
    let mask: Vec<f32> = (0..group * len)
        .flat_map(|row| {
            let i = row % len;
            (0..total).map(move |j| {
                if j > position + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (group * len, total), device)
}
