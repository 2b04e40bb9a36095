//! Apex's own Q8_0 matrix product for CPUs with AVX-512 VNNI, for any input width that is a
//! multiple of 32, with up to eight activation rows per pass over a weight tile.
//!
//! Why not candle's: its tiled VNNI kernel needs the input width to be a multiple of 256
//! (its activations are quantized in blocks of 256), and small models have widths such as
//! 576, so every input had to be widened with zeros (a third more multiplies, a third more
//! weight bytes read per token); it corrects the weights' +128 offset per activation row
//! and block, which costs about as many instructions as the dot products themselves; it
//! takes at most four rows per weight tile; and it keeps its tiled copy beside the
//! row-major weights. Here activations are quantized per 32 values (the weights' own block
//! size, so nothing is padded), the offset is moved to the activations, whose correction
//! depends on the weights only and is computed once at load, and only the tiles are kept.
//!
//! Arithmetic: a Q8_0 weight block is `d_w × q_w` (`q_w` in −127..=127), an activation
//! block `d_a × q_a`. `vpdpbusd` multiplies unsigned by signed bytes, so activations are
//! stored as `q_a + 128`: `Σ (q_a + 128) q_w = Σ q_a q_w + 128 Σ q_w`, and the second term is
//! the tile's `offset` (negated), the starting value of every block's integer sum.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Output rows per tile: one 512-bit register of f32 results.
const TILE_ROWS: usize = 16;
/// Input values per block (Q8_0's block).
const BLOCK: usize = 32;
/// Activation rows multiplied per pass over a weight tile (registers: 8 weight vectors, 8
/// accumulators and the sums).
const MAX_ACTIVATION_ROWS: usize = 8;

/// One block of 32 input values for 16 output rows, laid out for `vpdpbusd`: the bytes
/// `qs[g][r][0..4]` are row `r`'s weights for inputs `4g .. 4g + 4`.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Tile {
    qs: [i8; BLOCK * TILE_ROWS],
    /// Each row's block scale.
    scale: [f32; TILE_ROWS],
    /// `−128 × Σ q_w` per row: undoes the activations' +128 shift.
    offset: [i32; TILE_ROWS],
}

/// A Q8_0 matrix `[out, in]` repacked into tiles (`[out / 16][in / 32]`).
pub struct PackedQ8 {
    tiles: Vec<Tile>,
    out: usize,
    width: usize,
}

/// Activation rows quantized per block of 32, shifted to unsigned bytes.
pub struct QuantizedRows {
    values: Vec<u8>,
    /// `[row][block]`
    scales: Vec<f32>,
    rows: usize,
    width: usize,
}

impl PackedQ8 {
    /// Whether this CPU has the instructions the product needs.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Repacks `tensor` when it is Q8_0 with a shape the tiles fit and the CPU has VNNI;
    /// `None` otherwise (the caller keeps candle's product).
    pub fn from_qtensor(tensor: &QTensor) -> candle_core::Result<Option<Self>> {
        if tensor.dtype() != GgmlDType::Q8_0 || !Self::available() {
            return Ok(None);
        }
        let (out, width) = tensor.shape().dims2()?;
        if !out.is_multiple_of(TILE_ROWS) || !width.is_multiple_of(BLOCK) || width == 0 {
            return Ok(None);
        }
        let data = tensor.data()?;
        // A Q8_0 block: the scale as f16, then 32 signed bytes.
        const BLOCK_BYTES: usize = 2 + BLOCK;
        let blocks_per_row = width / BLOCK;
        if data.len() != out * blocks_per_row * BLOCK_BYTES {
            return Ok(None);
        }
        let mut tiles = Vec::with_capacity(out / TILE_ROWS * blocks_per_row);
        for tile_row in 0..out / TILE_ROWS {
            for block in 0..blocks_per_row {
                let mut tile = Tile {
                    qs: [0; BLOCK * TILE_ROWS],
                    scale: [0.0; TILE_ROWS],
                    offset: [0; TILE_ROWS],
                };
                for r in 0..TILE_ROWS {
                    let at = ((tile_row * TILE_ROWS + r) * blocks_per_row + block) * BLOCK_BYTES;
                    let bytes = &data[at..at + BLOCK_BYTES];
                    tile.scale[r] = f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
                    let mut sum = 0i32;
                    for (i, &q) in bytes[2..].iter().enumerate() {
                        let q = q as i8;
                        sum += i32::from(q);
                        tile.qs[(i / 4 * TILE_ROWS + r) * 4 + i % 4] = q;
                    }
                    tile.offset[r] = -128 * sum;
                }
                tiles.push(tile);
            }
        }
        Ok(Some(Self { tiles, out, width }))
    }

    /// The matrix's output width (its row count).
    pub fn out(&self) -> usize {
        self.out
    }

    /// `x · Wᵀ` for quantized rows `x` (`[rows, width]`): `[rows, out]`, row-major.
    pub fn multiply(&self, x: &QuantizedRows) -> Vec<f32> {
        assert_eq!(x.width, self.width, "input width");
        let mut out = vec![0f32; x.rows * self.out];
        #[cfg(target_arch = "x86_64")]
        {
            let blocks = self.width / BLOCK;
            for (tile_row, tiles) in self.tiles.chunks_exact(blocks).enumerate() {
                let mut first = 0;
                while first < x.rows {
                    let rows = (x.rows - first).min(MAX_ACTIVATION_ROWS);
                    // SAFETY: `from_qtensor` made this only on a CPU with the features the
                    // kernels enable; the kernels stay within `tiles`, `x`'s rows
                    // `first..first + rows` and those rows of `out` (asserted shapes).
                    unsafe {
                        let args = (tiles, x, first, &mut out[..], self.out, tile_row);
                        match rows {
                            1 => kernel::tile_rows::<1>(args),
                            2 => kernel::tile_rows::<2>(args),
                            3 => kernel::tile_rows::<3>(args),
                            4 => kernel::tile_rows::<4>(args),
                            5 => kernel::tile_rows::<5>(args),
                            6 => kernel::tile_rows::<6>(args),
                            7 => kernel::tile_rows::<7>(args),
                            _ => kernel::tile_rows::<8>(args),
                        }
                    }
                    first += rows;
                }
            }
        }
        out
    }
}

impl QuantizedRows {
    /// How many rows were quantized.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Quantizes `rows` rows of `width` values (`width` a multiple of 32).
    pub fn new(x: &[f32], rows: usize, width: usize) -> Self {
        assert_eq!(x.len(), rows * width, "rows × width values");
        assert!(width.is_multiple_of(BLOCK), "width is a multiple of 32");
        let mut values = vec![0u8; x.len()];
        let mut scales = Vec::with_capacity(x.len() / BLOCK);
        quantize(x, &mut values, &mut scales);
        Self {
            values,
            scales,
            rows,
            width,
        }
    }
}

/// [`QuantizedRows::new`]'s blocks: sixteen values per instruction where the CPU has
/// AVX-512F (it does wherever [`PackedQ8`] is used), plain loops elsewhere.
fn quantize(x: &[f32], values: &mut [u8], scales: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; `new` asserted the lengths.
        return unsafe { kernel::quantize(x, values, scales) };
    }
    quantize_portable(x, values, scales)
}

/// [`QuantizedRows::new`]'s blocks in plain loops.
fn quantize_portable(x: &[f32], values: &mut [u8], scales: &mut Vec<f32>) {
    for (block, quantized) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)) {
        let max = block.iter().fold(0f32, |max, v| max.max(v.abs()));
        let scale = max / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (q, v) in quantized.iter_mut().zip(block) {
            // In −127..=127 by construction; +128 makes it an unsigned byte.
            *q = ((v * inverse).round() as i32 + 128) as u8;
        }
        scales.push(scale);
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{QuantizedRows, Tile, BLOCK, TILE_ROWS};
    use std::arch::x86_64::*;

    /// [`QuantizedRows::new`]'s blocks, sixteen values per instruction (rounding to
    /// nearest, ties to even: the rows carry their own values, so products agree with
    /// whatever rounding made them).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `values` is as long as `x`, a multiple of 32.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize(x: &[f32], values: &mut [u8], scales: &mut Vec<f32>) {
        debug_assert!(x.len() == values.len() && x.len().is_multiple_of(BLOCK));
        let shift = _mm512_set1_epi32(128);
        for (block, quantized) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)) {
            let low = _mm512_loadu_ps(block.as_ptr());
            let high = _mm512_loadu_ps(block.as_ptr().add(16));
            let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
            let scale = max / 127.0;
            let inverse = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            for (half, part) in [low, high].into_iter().enumerate() {
                let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(part, inverse)), shift);
                // 1..=255: the low byte of each 32-bit value is the quantized byte.
                _mm_storeu_si128(
                    quantized.as_mut_ptr().add(half * 16).cast(),
                    _mm512_cvtepi32_epi8(q),
                );
            }
            scales.push(scale);
        }
    }

    /// `(tiles of one output tile row, activations, first activation row, output, output
    /// width, tile row)`.
    pub(super) type Args<'a> = (
        &'a [Tile],
        &'a QuantizedRows,
        usize,
        &'a mut [f32],
        usize,
        usize,
    );

    /// Rows `first .. first + M` of the activations against one tile row of the weights
    /// (16 outputs each). `M` is a constant so the accumulators stay in registers.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `tiles` holds `width / 32` tiles, the
    /// activations have rows `first .. first + M`, and `out` has `(first + M) × n` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile_rows<const M: usize>((tiles, x, first, out, n, tile_row): Args<'_>) {
        debug_assert!(first + M <= x.rows && out.len() >= (first + M) * n);
        let blocks = x.width / BLOCK;
        let mut acc = [_mm512_setzero_ps(); M];
        for (block, tile) in tiles.iter().enumerate() {
            let w: [__m512i; 8] =
                std::array::from_fn(|g| _mm512_load_si512(tile.qs.as_ptr().add(g * 64).cast()));
            let offset = _mm512_load_si512(tile.offset.as_ptr().cast());
            let scale = _mm512_load_ps(tile.scale.as_ptr());
            for (m, acc) in acc.iter_mut().enumerate() {
                let row = first + m;
                let a = x.values.as_ptr().add(row * x.width + block * BLOCK);
                let broadcast =
                    |g: usize| _mm512_set1_epi32(std::ptr::read_unaligned(a.add(g * 4).cast()));
                // Two chains of sums so consecutive `vpdpbusd`s do not wait on each other
                // when there are few rows.
                let mut even = offset;
                let mut odd = _mm512_setzero_si512();
                for g in (0..8).step_by(2) {
                    even = _mm512_dpbusd_epi32(even, broadcast(g), w[g]);
                    odd = _mm512_dpbusd_epi32(odd, broadcast(g + 1), w[g + 1]);
                }
                let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
                let activation_scale = *x.scales.get_unchecked(row * blocks + block);
                *acc = _mm512_fmadd_ps(
                    sum,
                    _mm512_mul_ps(scale, _mm512_set1_ps(activation_scale)),
                    *acc,
                );
            }
        }
        for (m, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(
                out.as_mut_ptr().add((first + m) * n + tile_row * TILE_ROWS),
                *acc,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(count: usize, seed: u64) -> Vec<f32> {
        crate::test_values(count, seed, 1.0)
    }

    /// The product equals the f32 product of the dequantized weights and the dequantized
    /// activations (so only f32 rounding differs), and stays within the activations'
    /// rounding of the unquantized product, for every row count up to twice the rows per
    /// pass (every `M` and more than one row group) and a width that is not a multiple of
    /// 256.
    #[test]
    fn the_product_matches_the_f32_product_of_the_dequantized_operands() {
        if !PackedQ8::available() {
            let weights = Tensor::from_vec(values(32 * 64, 1), (32, 64), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&weights, GgmlDType::Q8_0).unwrap();
            assert!(PackedQ8::from_qtensor(&q).unwrap().is_none());
            return;
        }
        let (out, width) = (48, 576);
        let weights = Tensor::from_vec(values(out * width, 7), (out, width), &Device::Cpu).unwrap();
        let quantized = QTensor::quantize(&weights, GgmlDType::Q8_0).unwrap();
        let dequantized = quantized.dequantize(&Device::Cpu).unwrap();
        let packed = PackedQ8::from_qtensor(&quantized).unwrap().expect("packed");
        let product = |x: Vec<f32>, rows: usize| {
            Tensor::from_vec(x, (rows, width), &Device::Cpu)
                .unwrap()
                .matmul(&dequantized.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        for rows in 1..=2 * MAX_ACTIVATION_ROWS + 1 {
            let x = values(rows * width, rows as u64 + 100);
            let quantized_rows = QuantizedRows::new(&x, rows, width);
            let as_quantized: Vec<f32> = quantized_rows
                .values
                .iter()
                .enumerate()
                .map(|(i, &q)| (f32::from(q) - 128.0) * quantized_rows.scales[i / BLOCK])
                .collect();
            let exact = product(as_quantized, rows);
            let unquantized = product(x, rows);
            let got = packed.multiply(&quantized_rows);
            assert_eq!(got.len(), rows * out);
            for (i, got) in got.iter().enumerate() {
                assert!(
                    (got - exact[i]).abs() < 1e-3,
                    "{rows} rows, value {i}: {got} against {} (same operands)",
                    exact[i]
                );
                // Each activation is off by at most half a step (max/254); over 576
                // products the sum's error stays within 0.2 (measured: ≤ 0.11).
                assert!(
                    (got - unquantized[i]).abs() < 0.2,
                    "{rows} rows, value {i}: {got} against {} (unquantized)",
                    unquantized[i]
                );
            }
        }
    }

    /// The SIMD quantization and the plain loops agree: same scales, bytes at most one step
    /// apart (ties round to even in one, away from zero in the other).
    #[test]
    fn both_quantizations_agree() {
        let x = values(4 * 576, 5);
        let (mut portable, mut portable_scales) = (vec![0u8; x.len()], Vec::new());
        quantize_portable(&x, &mut portable, &mut portable_scales);
        let rows = QuantizedRows::new(&x, 4, 576);
        assert_eq!(rows.scales, portable_scales);
        for (a, b) in rows.values.iter().zip(&portable) {
            assert!(a.abs_diff(*b) <= 1, "{a} against {b}");
        }
        let zeros = QuantizedRows::new(&[0.0; 32], 1, 32);
        assert_eq!(zeros.values, vec![128u8; 32], "zero is the byte 128");
    }

    #[test]
    fn shapes_the_tiles_do_not_fit_are_left_to_candle() {
        let weights = Tensor::from_vec(values(8 * 64, 3), (8, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&weights, GgmlDType::Q8_0).unwrap();
        assert!(
            PackedQ8::from_qtensor(&q).unwrap().is_none(),
            "8 output rows are not a whole tile"
        );
        let f32_weights = QTensor::quantize(&weights, GgmlDType::F32).unwrap();
        assert!(PackedQ8::from_qtensor(&f32_weights).unwrap().is_none());
    }
}
