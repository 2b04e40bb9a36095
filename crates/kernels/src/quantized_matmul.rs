//! Apex's own products of quantized weights (Q8_0 and Q4_1) and activation rows, for CPUs
//! with AVX-512 VNNI, for any input width that is a multiple of 32, with up to eight
//! activation rows per pass over a weight tile.
//!
//! Why not candle's: its tiled VNNI kernel takes Q8_0 only (a Q4_1 model had to be
//! requantized to Q8_0 at load, doubling the bytes every token reads) and needs the input
//! width to be a multiple of 256 (its activations are quantized in blocks of 256), and small
//! models have widths such as 576, so every input had to be widened with zeros; it corrects
//! the weights' +128 offset per activation row and block, which costs about as many
//! instructions as the dot products themselves; it takes at most four rows per weight tile;
//! and it keeps its tiled copy beside the row-major weights. Here activations are quantized
//! per 32 values (the weights' own block size, so nothing is padded), the offset is moved to
//! the activations, whose correction depends on the weights only and is computed once at
//! load, Q4_1 weights stay 4-bit (unpacked in registers once per tile for all the rows of a
//! pass), and only the tiles are kept.
//!
//! Arithmetic: a Q8_0 weight block is `d_w × q_w` (`q_w` in −127..=127), a Q4_1 block
//! `d_w × q_w + m_w` (`q_w` in 0..=15), an activation block `d_a × q_a`. `vpdpbusd`
//! multiplies unsigned by signed bytes, so activations are stored as `q_a + 128`:
//! `Σ (q_a + 128) q_w = Σ q_a q_w + 128 Σ q_w`, and the second term is the tile's `offset`
//! (negated), the starting value of every block's integer sum. Q4_1's weights are unsigned
//! already, so they take the unsigned side and the activations go in as they are (no
//! offset); its `m_w` adds `m_w × d_a × Σ q_a`, and `d_a × Σ q_a` is kept with each
//! activation block.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Output rows per tile: one 512-bit register of f32 results.
const TILE_ROWS: usize = 16;
/// Input values per block (Q8_0's and Q4_1's block).
const BLOCK: usize = 32;
/// Activation rows multiplied per pass over a weight tile (registers: 8 weight vectors, 8
/// accumulators and the sums).
const MAX_ACTIVATION_ROWS: usize = 8;
/// How many tiles ahead the kernels ask for weights.
const PREFETCH_TILES: usize = 4;

/// One Q8_0 block of 32 input values for 16 output rows, laid out for `vpdpbusd`: the
/// bytes `qs[g][r][0..4]` are row `r`'s weights for inputs `4g .. 4g + 4`.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Q8Tile {
    qs: [i8; BLOCK * TILE_ROWS],
    /// Each row's block scale.
    scale: [f32; TILE_ROWS],
    /// `−128 × Σ q_w` per row: undoes the activations' +128 shift.
    offset: [i32; TILE_ROWS],
}

/// One Q4_1 block of 32 input values for 16 output rows, two weights per byte: the low
/// nibbles of `qs[p][r][0..4]` are row `r`'s weights for inputs `4p .. 4p + 4`, the high
/// nibbles for inputs `16 + 4p .. 16 + 4p + 4` (GGML's own pairing of `j` with `j + 16`).
/// The weights are unsigned (0..=15), so they are `vpdpbusd`'s unsigned operand and the
/// activations its signed one: no offset to undo. Five cache lines, nothing padded.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Q41Tile {
    qs: [u8; BLOCK * TILE_ROWS / 2],
    /// Each row's block scale `d_w`, as the file stores it (f16 bits).
    scale: [u16; TILE_ROWS],
    /// Each row's block minimum `m_w` (f16 bits).
    min: [u16; TILE_ROWS],
}

/// The tiles of one matrix, in its format.
enum Tiles {
    Q8(Vec<Q8Tile>),
    Q41(Vec<Q41Tile>),
}

/// A Q8_0 or Q4_1 matrix `[out, in]` repacked into tiles (`[out / 16][in / 32]`).
pub struct PackedMatrix {
    tiles: Tiles,
    out: usize,
    width: usize,
}

/// Activation rows quantized per block of 32: shifted to unsigned bytes for signed weights
/// (Q8_0), and as they are for unsigned ones (Q4_1).
pub struct QuantizedRows {
    values: Vec<u8>,
    /// `values` without the shift (`q_a`).
    signed: Vec<i8>,
    /// `[row][block]`: `d_a`.
    scales: Vec<f32>,
    /// `[row][block]`: `d_a × Σ q_a`, the block's sum as quantized (Q4_1's minimum term).
    sums: Vec<f32>,
    rows: usize,
    width: usize,
}

impl PackedMatrix {
    /// Whether this CPU has the instructions the products need.
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

    /// Whether matrices of `dtype` are multiplied here on this CPU, given a shape the tiles
    /// fit (so a model need not be converted to another format for speed).
    pub fn handles(dtype: GgmlDType) -> bool {
        matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q4_1) && Self::available()
    }

    /// Whether a matrix of `dtype` and shape `dims` (`[out, in]`) is multiplied here on this
    /// CPU: [`Self::handles`] its format, and whole tiles cover it.
    pub fn takes(dtype: GgmlDType, dims: &[usize]) -> bool {
        let fits = match *dims {
            [out, width] => {
                out.is_multiple_of(TILE_ROWS) && width.is_multiple_of(BLOCK) && width > 0
            }
            _ => false,
        };
        fits && Self::handles(dtype)
    }

    /// Repacks `tensor` when it is Q8_0 or Q4_1 with a shape the tiles fit and the CPU has
    /// VNNI; `None` otherwise (the caller keeps candle's product).
    pub fn from_qtensor(tensor: &QTensor) -> candle_core::Result<Option<Self>> {
        if !Self::takes(tensor.dtype(), tensor.shape().dims()) {
            return Ok(None);
        }
        let (out, width) = tensor.shape().dims2()?;
        let data = tensor.data()?;
        let blocks_per_row = width / BLOCK;
        // Q8_0: the scale as f16, then 32 signed bytes. Q4_1: the scale and the minimum as
        // f16, then 16 bytes of two 4-bit weights (`j` low, `j + 16` high).
        let block_bytes = match tensor.dtype() {
            GgmlDType::Q8_0 => 2 + BLOCK,
            _ => 4 + BLOCK / 2,
        };
        if data.len() != out * blocks_per_row * block_bytes {
            return Ok(None);
        }
        // Row `r` of tile row `t`'s block `b`.
        let block = |t: usize, b: usize, r: usize| {
            let at = ((t * TILE_ROWS + r) * blocks_per_row + b) * block_bytes;
            &data[at..at + block_bytes]
        };
        let half =
            |bytes: &[u8], at: usize| f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32();
        let tile_count = out / TILE_ROWS * blocks_per_row;
        let tiles = if tensor.dtype() == GgmlDType::Q8_0 {
            let mut tiles = Vec::with_capacity(tile_count);
            for t in 0..out / TILE_ROWS {
                for b in 0..blocks_per_row {
                    let mut tile = Q8Tile {
                        qs: [0; BLOCK * TILE_ROWS],
                        scale: [0.0; TILE_ROWS],
                        offset: [0; TILE_ROWS],
                    };
                    for r in 0..TILE_ROWS {
                        let bytes = block(t, b, r);
                        tile.scale[r] = half(bytes, 0);
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
            Tiles::Q8(tiles)
        } else {
            let mut tiles = Vec::with_capacity(tile_count);
            for t in 0..out / TILE_ROWS {
                for b in 0..blocks_per_row {
                    let mut tile = Q41Tile {
                        qs: [0; BLOCK * TILE_ROWS / 2],
                        scale: [0; TILE_ROWS],
                        min: [0; TILE_ROWS],
                    };
                    for r in 0..TILE_ROWS {
                        let bytes = block(t, b, r);
                        tile.scale[r] = u16::from_le_bytes([bytes[0], bytes[1]]);
                        tile.min[r] = u16::from_le_bytes([bytes[2], bytes[3]]);
                        // Byte `j` holds inputs `j` (low) and `j + 16` (high), as the tile
                        // wants them: the same byte, moved to its row's place.
                        for (j, &pair) in bytes[4..].iter().enumerate() {
                            tile.qs[(j / 4 * TILE_ROWS + r) * 4 + j % 4] = pair;
                        }
                    }
                    tiles.push(tile);
                }
            }
            Tiles::Q41(tiles)
        };
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
            // SAFETY: `from_qtensor` made this only on a CPU with the features the kernels
            // enable; `each_pass` keeps them within one tile row, `x`'s rows and `out`.
            unsafe {
                match &self.tiles {
                    Tiles::Q8(tiles) => kernel::each_pass(tiles, blocks, x, &mut out, self.out),
                    Tiles::Q41(tiles) => kernel::each_pass(tiles, blocks, x, &mut out, self.out),
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
        let mut sums = Vec::with_capacity(x.len() / BLOCK);
        quantize(x, &mut values, &mut scales, &mut sums);
        // `q_a + 128` with its top bit flipped is `q_a` in two's complement.
        let signed = values.iter().map(|&v| (v ^ 0x80) as i8).collect();
        Self {
            values,
            signed,
            scales,
            sums,
            rows,
            width,
        }
    }
}

/// [`QuantizedRows::new`]'s blocks: sixteen values per instruction where the CPU has
/// AVX-512F (it does wherever [`PackedMatrix`] is used), plain loops elsewhere.
fn quantize(x: &[f32], values: &mut [u8], scales: &mut Vec<f32>, sums: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; `new` asserted the lengths.
        return unsafe { kernel::quantize(x, values, scales, sums) };
    }
    quantize_portable(x, values, scales, sums)
}

/// [`QuantizedRows::new`]'s blocks in plain loops.
fn quantize_portable(x: &[f32], values: &mut [u8], scales: &mut Vec<f32>, sums: &mut Vec<f32>) {
    for (block, quantized) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)) {
        let max = block.iter().fold(0f32, |max, v| max.max(v.abs()));
        let scale = max / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in quantized.iter_mut().zip(block) {
            // In −127..=127 by construction; +128 makes it an unsigned byte.
            let signed = (v * inverse).round() as i32;
            sum += signed;
            *q = (signed + 128) as u8;
        }
        scales.push(scale);
        sums.push(scale * sum as f32);
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use super::{
        Q41Tile, Q8Tile, QuantizedRows, BLOCK, MAX_ACTIVATION_ROWS, PREFETCH_TILES, TILE_ROWS,
    };
    use std::arch::x86_64::*;

    /// [`QuantizedRows::new`]'s blocks, sixteen values per instruction (rounding to
    /// nearest, ties to even: the rows carry their own values, so products agree with
    /// whatever rounding made them).
    ///
    /// # Safety
    /// The CPU must have AVX-512F; `values` is as long as `x`, a multiple of 32.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize(
        x: &[f32],
        values: &mut [u8],
        scales: &mut Vec<f32>,
        sums: &mut Vec<f32>,
    ) {
        debug_assert!(x.len() == values.len() && x.len().is_multiple_of(BLOCK));
        let shift = _mm512_set1_epi32(128);
        for (block, quantized) in x.chunks_exact(BLOCK).zip(values.chunks_exact_mut(BLOCK)) {
            let low = _mm512_loadu_ps(block.as_ptr());
            let high = _mm512_loadu_ps(block.as_ptr().add(16));
            let max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(low), _mm512_abs_ps(high)));
            let scale = max / 127.0;
            let inverse = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let mut sum = _mm512_setzero_si512();
            for (half, part) in [low, high].into_iter().enumerate() {
                let signed = _mm512_cvtps_epi32(_mm512_mul_ps(part, inverse));
                sum = _mm512_add_epi32(sum, signed);
                // 1..=255: the low byte of each 32-bit value is the quantized byte.
                _mm_storeu_si128(
                    quantized.as_mut_ptr().add(half * 16).cast(),
                    _mm512_cvtepi32_epi8(_mm512_add_epi32(signed, shift)),
                );
            }
            scales.push(scale);
            sums.push(scale * _mm512_reduce_add_epi32(sum) as f32);
        }
    }

    /// A tile format's kernel: rows `first .. first + M` of the activations against one
    /// tile row of the weights (16 outputs each).
    pub(super) trait TileRows: Sized {
        /// # Safety
        /// The CPU must have AVX-512 F, BW and VNNI; `tiles` holds `width / 32` tiles, the
        /// activations have rows `first .. first + M`, and `out` has `(first + M) × n`
        /// values.
        unsafe fn tile_rows<const M: usize>(args: Args<'_, Self>);
    }

    /// `(tiles of one output tile row, activations, first activation row, output, output
    /// width, tile row)`.
    pub(super) type Args<'a, T> = (
        &'a [T],
        &'a QuantizedRows,
        usize,
        &'a mut [f32],
        usize,
        usize,
    );

    /// Every tile row against every group of up to eight activation rows.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI; `tiles` holds `blocks` tiles per tile row,
    /// `x` is `blocks × 32` wide and `out` has `x.rows × n` values.
    pub(super) unsafe fn each_pass<T: TileRows>(
        tiles: &[T],
        blocks: usize,
        x: &QuantizedRows,
        out: &mut [f32],
        n: usize,
    ) {
        for (tile_row, tiles) in tiles.chunks_exact(blocks).enumerate() {
            let mut first = 0;
            while first < x.rows {
                let rows = (x.rows - first).min(MAX_ACTIVATION_ROWS);
                let args = (tiles, x, first, &mut out[..], n, tile_row);
                match rows {
                    1 => T::tile_rows::<1>(args),
                    2 => T::tile_rows::<2>(args),
                    3 => T::tile_rows::<3>(args),
                    4 => T::tile_rows::<4>(args),
                    5 => T::tile_rows::<5>(args),
                    6 => T::tile_rows::<6>(args),
                    7 => T::tile_rows::<7>(args),
                    _ => T::tile_rows::<8>(args),
                }
                first += rows;
            }
        }
    }

    impl TileRows for Q8Tile {
        unsafe fn tile_rows<const M: usize>(args: Args<'_, Self>) {
            q8_tile_rows::<M>(args)
        }
    }

    impl TileRows for Q41Tile {
        unsafe fn tile_rows<const M: usize>(args: Args<'_, Self>) {
            q41_tile_rows::<M>(args)
        }
    }

    /// Row `row`'s integer dot product with one tile's eight weight vectors, starting from
    /// `offset`: with the shifted activations against signed weights, or (`UNSIGNED_WEIGHTS`)
    /// with the activations as they are against unsigned ones. Two chains of sums so
    /// consecutive `vpdpbusd`s do not wait on each other when there are few rows.
    #[inline(always)]
    unsafe fn block_sum<const UNSIGNED_WEIGHTS: bool>(
        x: &QuantizedRows,
        row: usize,
        block: usize,
        w: &[__m512i; 8],
        offset: __m512i,
    ) -> __m512 {
        let at = row * x.width + block * BLOCK;
        let a: *const u8 = if UNSIGNED_WEIGHTS {
            x.signed.as_ptr().add(at).cast()
        } else {
            x.values.as_ptr().add(at)
        };
        let product = |sum: __m512i, g: usize| {
            let a = _mm512_set1_epi32(std::ptr::read_unaligned(a.add(g * 4).cast()));
            if UNSIGNED_WEIGHTS {
                _mm512_dpbusd_epi32(sum, w[g], a)
            } else {
                _mm512_dpbusd_epi32(sum, a, w[g])
            }
        };
        let mut even = offset;
        let mut odd = _mm512_setzero_si512();
        for g in (0..8).step_by(2) {
            even = product(even, g);
            odd = product(odd, g + 1);
        }
        _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd))
    }

    /// Asks for the tile `PREFETCH_TILES` ahead of `tile`, every cache line of it: at one
    /// or two rows a pass spends most of its time waiting for weights, and the hardware
    /// prefetcher alone keeps too few lines in flight.
    #[inline(always)]
    unsafe fn prefetch<T>(tile: &T) {
        let ahead = (tile as *const T).wrapping_add(PREFETCH_TILES).cast::<i8>();
        for line in 0..std::mem::size_of::<T>() / 64 {
            // A prefetch never faults, so an address past the matrix's end is harmless.
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64));
        }
    }

    /// Stores the accumulators of rows `first .. first + M` at tile row `tile_row`.
    #[inline(always)]
    unsafe fn store<const M: usize>(
        acc: &[__m512; M],
        out: &mut [f32],
        first: usize,
        n: usize,
        tile_row: usize,
    ) {
        for (m, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(
                out.as_mut_ptr().add((first + m) * n + tile_row * TILE_ROWS),
                *acc,
            );
        }
    }

    /// [`TileRows::tile_rows`] for Q8_0 tiles. `M` is a constant so the accumulators stay
    /// in registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q8_tile_rows<const M: usize>((tiles, x, first, out, n, tile_row): Args<'_, Q8Tile>) {
        debug_assert!(first + M <= x.rows && out.len() >= (first + M) * n);
        let blocks = x.width / BLOCK;
        let mut acc = [_mm512_setzero_ps(); M];
        for (block, tile) in tiles.iter().enumerate() {
            prefetch(tile);
            let w: [__m512i; 8] =
                std::array::from_fn(|g| _mm512_load_si512(tile.qs.as_ptr().add(g * 64).cast()));
            let offset = _mm512_load_si512(tile.offset.as_ptr().cast());
            let scale = _mm512_load_ps(tile.scale.as_ptr());
            for (m, acc) in acc.iter_mut().enumerate() {
                let row = first + m;
                let sum = block_sum::<false>(x, row, block, &w, offset);
                let activation_scale = *x.scales.get_unchecked(row * blocks + block);
                *acc = _mm512_fmadd_ps(
                    sum,
                    _mm512_mul_ps(scale, _mm512_set1_ps(activation_scale)),
                    *acc,
                );
            }
        }
        store(&acc, out, first, n, tile_row);
    }

    /// [`TileRows::tile_rows`] for Q4_1 tiles: the nibbles are unpacked and the f16 scales
    /// widened once per tile for all `M` rows, and each row adds `m_w × d_a Σ q_a` to
    /// `d_w d_a Σ q_a q_w`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn q41_tile_rows<const M: usize>(
        (tiles, x, first, out, n, tile_row): Args<'_, Q41Tile>,
    ) {
        debug_assert!(first + M <= x.rows && out.len() >= (first + M) * n);
        let blocks = x.width / BLOCK;
        let nibble = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); M];
        for (block, tile) in tiles.iter().enumerate() {
            prefetch(tile);
            let packed: [__m512i; 4] =
                std::array::from_fn(|p| _mm512_load_si512(tile.qs.as_ptr().add(p * 64).cast()));
            let w: [__m512i; 8] = std::array::from_fn(|g| {
                if g < 4 {
                    _mm512_and_si512(packed[g], nibble)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(packed[g - 4]), nibble)
                }
            });
            let scale = _mm512_cvtph_ps(_mm256_load_si256(tile.scale.as_ptr().cast()));
            let min = _mm512_cvtph_ps(_mm256_load_si256(tile.min.as_ptr().cast()));
            for (m, acc) in acc.iter_mut().enumerate() {
                let row = first + m;
                let sum = block_sum::<true>(x, row, block, &w, _mm512_setzero_si512());
                let at = row * blocks + block;
                let activation_scale = *x.scales.get_unchecked(at);
                let activation_sum = *x.sums.get_unchecked(at);
                *acc = _mm512_fmadd_ps(
                    sum,
                    _mm512_mul_ps(scale, _mm512_set1_ps(activation_scale)),
                    *acc,
                );
                *acc = _mm512_fmadd_ps(min, _mm512_set1_ps(activation_sum), *acc);
            }
        }
        store(&acc, out, first, n, tile_row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn values(count: usize, seed: u64) -> Vec<f32> {
        crate::test_values(count, seed, 1.0)
    }

    /// For each format, the product equals the f32 product of the dequantized weights and
    /// the dequantized activations (so only f32 rounding differs), and stays within the
    /// activations' rounding of the product with the unquantized activations, for every row
    /// count up to twice the rows per pass (every `M` and more than one row group) and a
    /// width that is not a multiple of 256.
    #[test]
    fn the_product_matches_the_f32_product_of_the_dequantized_operands() {
        let (out, width) = (48, 576);
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let weights =
                Tensor::from_vec(values(out * width, 7), (out, width), &Device::Cpu).unwrap();
            let quantized = QTensor::quantize(&weights, dtype).unwrap();
            if !PackedMatrix::available() {
                assert!(PackedMatrix::from_qtensor(&quantized).unwrap().is_none());
                continue;
            }
            let dequantized = quantized.dequantize(&Device::Cpu).unwrap();
            let packed = PackedMatrix::from_qtensor(&quantized)
                .unwrap()
                .expect("packed");
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
                        "{dtype:?}, {rows} rows, value {i}: {got} against {} (same operands)",
                        exact[i]
                    );
                    // Each activation is off by at most half a step (max/254); over 576
                    // products the sum's error stays within 0.2 (measured: ≤ 0.11).
                    assert!(
                        (got - unquantized[i]).abs() < 0.2,
                        "{dtype:?}, {rows} rows, value {i}: {got} against {} (unquantized)",
                        unquantized[i]
                    );
                }
            }
        }
    }

    /// The SIMD quantization and the plain loops agree: same scales, bytes at most one step
    /// apart, each block's sum that of its bytes (ties round to even in one, away from zero in the other).
    #[test]
    fn both_quantizations_agree() {
        let x = values(4 * 576, 5);
        let (mut portable, mut portable_scales, mut portable_sums) =
            (vec![0u8; x.len()], Vec::new(), Vec::new());
        quantize_portable(&x, &mut portable, &mut portable_scales, &mut portable_sums);
        let rows = QuantizedRows::new(&x, 4, 576);
        assert_eq!(rows.scales, portable_scales);
        // Each block's sum as quantized: the bytes' own sum, and the plain loops' within
        // the bytes' rounding differences.
        for (block, (sum, portable_sum)) in rows.sums.iter().zip(&portable_sums).enumerate() {
            let bytes = &rows.values[block * BLOCK..(block + 1) * BLOCK];
            let own: i32 = bytes.iter().map(|&q| i32::from(q) - 128).sum();
            assert!((sum - own as f32 * rows.scales[block]).abs() < 1e-4);
            assert!((sum - portable_sum).abs() <= BLOCK as f32 * rows.scales[block]);
        }
        for (a, b) in rows.values.iter().zip(&portable) {
            assert!(a.abs_diff(*b) <= 1, "{a} against {b}");
        }
        let zeros = QuantizedRows::new(&[0.0; 32], 1, 32);
        assert_eq!(zeros.values, vec![128u8; 32], "zero is the byte 128");
        assert_eq!(zeros.sums, vec![0.0]);
    }

    #[test]
    fn shapes_the_tiles_do_not_fit_are_left_to_candle() {
        let weights = Tensor::from_vec(values(8 * 64, 3), (8, 64), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&weights, GgmlDType::Q8_0).unwrap();
        assert!(
            PackedMatrix::from_qtensor(&q).unwrap().is_none(),
            "8 output rows are not a whole tile"
        );
        assert!(!PackedMatrix::takes(GgmlDType::Q4_1, &[8, 64]));
        assert!(!PackedMatrix::takes(GgmlDType::Q4_1, &[16, 64, 1]));
        assert_eq!(
            PackedMatrix::takes(GgmlDType::Q4_1, &[16, 64]),
            PackedMatrix::available()
        );
        let weights = Tensor::from_vec(values(16 * 64, 3), (16, 64), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::F32, GgmlDType::Q4_0, GgmlDType::Q5_1] {
            let other = QTensor::quantize(&weights, dtype).unwrap();
            assert!(
                PackedMatrix::from_qtensor(&other).unwrap().is_none(),
                "{dtype:?}"
            );
        }
    }
}
