//! Attention of one new position against a sequence's cached keys and values (decoding).
//!
//! Every decoding step reads every cached row of every layer for each request, so with
//! several requests in a pass this is the part of the work that grows with the number of
//! requests and the length of their answers (a third of a step's time at 8 requests of 256
//! tokens). Portable loops ([`decode_portable`]) keep the nine heads' 64-value outputs in
//! memory and load and store them for every cached position; on a CPU with AVX-512 and
//! 64-value heads, the heads that share a key/value head are taken together with their
//! queries and outputs held in registers, so each cached row is loaded once per group and
//! nothing else is.

/// `query` is `[heads][dim]` (rotated), `keys` and `values` hold `[position][kv_head][dim]`
/// for every position including the new one; returns `[heads][dim]`. Query heads
/// `kv × group .. (kv + 1) × group` share key/value head `kv` (`group = heads / kv_heads`).
pub fn decode(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    heads: usize,
    kv_heads: usize,
    dim: usize,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if dim == simd::DIM && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above); `decode_avx512` checks the shapes
        // its loads rely on.
        return unsafe { simd::decode_avx512(query, keys, values, heads, kv_heads) };
    }
    decode_portable(query, keys, values, heads, kv_heads, dim)
}

/// [`decode`] in plain loops: the reference, and the path on other CPUs and head sizes.
pub fn decode_portable(
    query: &[f32],
    keys: &[f32],
    values: &[f32],
    heads: usize,
    kv_heads: usize,
    dim: usize,
) -> Vec<f32> {
    let group = heads / kv_heads;
    let row = kv_heads * dim;
    let total = keys.len() / row;
    let scale = 1.0 / (dim as f32).sqrt();
    let mut out = vec![0f32; heads * dim];
    // [head][position]
    let mut weights = vec![0f32; heads * total];
    for kv in 0..kv_heads {
        let queries = &query[kv * group * dim..(kv + 1) * group * dim];
        for (position, key) in keys.chunks_exact(row).enumerate() {
            let key = &key[kv * dim..(kv + 1) * dim];
            for (g, query) in queries.chunks_exact(dim).enumerate() {
                weights[(kv * group + g) * total + position] = dot(query, key) * scale;
            }
        }
    }
    softmax_rows(&mut weights, total);
    for kv in 0..kv_heads {
        let outs = &mut out[kv * group * dim..(kv + 1) * group * dim];
        for (position, value) in values.chunks_exact(row).enumerate() {
            let value = &value[kv * dim..(kv + 1) * dim];
            for (g, out) in outs.chunks_exact_mut(dim).enumerate() {
                let weight = weights[(kv * group + g) * total + position];
                for (out, value) in out.iter_mut().zip(value) {
                    *out += weight * value;
                }
            }
        }
    }
    out
}

/// Softmax of each `len`-long row of `weights`, in place.
fn softmax_rows(weights: &mut [f32], len: usize) {
    for weights in weights.chunks_exact_mut(len) {
        let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for weight in weights.iter_mut() {
            *weight = (*weight - max).exp();
            sum += *weight;
        }
        for weight in weights.iter_mut() {
            *weight /= sum;
        }
    }
}

/// Dot product with eight running sums, so the compiler can keep them in one vector
/// register (a single running sum would force the additions into order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((sum, a), b) in sums.iter_mut().zip(a).zip(b) {
            *sum += a * b;
        }
    }
    sums.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::softmax_rows;
    use std::arch::x86_64::*;

    /// The head size this path handles: four 512-bit registers per row.
    pub(super) const DIM: usize = 64;
    const LANES: usize = 16;
    const PARTS: usize = DIM / LANES;
    /// Query heads taken together: their queries (or outputs) take `4 × HEADS_AT_ONCE`
    /// registers, which leaves room for the row being read.
    const HEADS_AT_ONCE: usize = 4;
    /// How many positions ahead a pass asks for cached rows.
    const PREFETCH_ROWS: usize = 8;

    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn decode_avx512(
        query: &[f32],
        keys: &[f32],
        values: &[f32],
        heads: usize,
        kv_heads: usize,
    ) -> Vec<f32> {
        let group = heads / kv_heads;
        let row = kv_heads * DIM;
        let total = keys.len() / row;
        // The loads below stay inside these lengths.
        assert!(kv_heads > 0 && group * kv_heads == heads && query.len() == heads * DIM);
        assert!(keys.len() == total * row && values.len() == keys.len());
        let scale = 1.0 / (DIM as f32).sqrt();
        let mut out = vec![0f32; heads * DIM];
        let mut weights = vec![0f32; heads * total];
        // The heads of each group, at most HEADS_AT_ONCE at a time.
        let mut chunks = Vec::new();
        for kv in 0..kv_heads {
            for first in (kv * group..(kv + 1) * group).step_by(HEADS_AT_ONCE) {
                chunks.push(Chunk {
                    keys,
                    values,
                    row,
                    kv,
                    total,
                    first,
                    count: ((kv + 1) * group - first).min(HEADS_AT_ONCE),
                });
            }
        }
        for chunk in &chunks {
            match chunk.count {
                1 => scores::<1>(chunk, query, scale, &mut weights),
                2 => scores::<2>(chunk, query, scale, &mut weights),
                3 => scores::<3>(chunk, query, scale, &mut weights),
                _ => scores::<4>(chunk, query, scale, &mut weights),
            }
        }
        softmax_rows(&mut weights, total);
        for chunk in &chunks {
            match chunk.count {
                1 => weighted_values::<1>(chunk, &weights, &mut out),
                2 => weighted_values::<2>(chunk, &weights, &mut out),
                3 => weighted_values::<3>(chunk, &weights, &mut out),
                _ => weighted_values::<4>(chunk, &weights, &mut out),
            }
        }
        out
    }

    /// Query heads `first .. first + count`, all of key/value head `kv` (the kernels'
    /// `C` is `count`).
    struct Chunk<'a> {
        keys: &'a [f32],
        values: &'a [f32],
        row: usize,
        kv: usize,
        total: usize,
        first: usize,
        count: usize,
    }

    impl Chunk<'_> {
        /// Where the chunk's key/value head starts in `position`'s row of `buffer` (its
        /// keys or values). Also asks for the same place `PREFETCH_ROWS` positions on: a
        /// pass reads one key/value head's part of each cached row, a stride the hardware
        /// prefetcher follows too slowly.
        ///
        /// # Safety
        /// `position < total` and `buffer` holds `total` rows.
        #[inline(always)]
        unsafe fn row_at(&self, buffer: &[f32], position: usize) -> *const f32 {
            let at = buffer.as_ptr().add(position * self.row + self.kv * DIM);
            let ahead = at.wrapping_add(PREFETCH_ROWS * self.row).cast::<i8>();
            for line in 0..DIM * 4 / 64 {
                // A prefetch never faults, so an address past the cache's end is harmless.
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64));
            }
            at
        }
    }

    /// `weights[h][p] = scale × q_h · k_p` for the chunk's heads and every position.
    #[target_feature(enable = "avx512f")]
    unsafe fn scores<const C: usize>(
        chunk: &Chunk<'_>,
        query: &[f32],
        scale: f32,
        weights: &mut [f32],
    ) {
        let q: [[__m512; PARTS]; C] = std::array::from_fn(|h| {
            std::array::from_fn(|j| {
                _mm512_loadu_ps(query.as_ptr().add((chunk.first + h) * DIM + j * LANES))
            })
        });
        for position in 0..chunk.total {
            let key = chunk.row_at(chunk.keys, position);
            let k: [__m512; PARTS] = std::array::from_fn(|j| _mm512_loadu_ps(key.add(j * LANES)));
            for (h, q) in q.iter().enumerate() {
                let mut sum = _mm512_mul_ps(q[0], k[0]);
                for j in 1..PARTS {
                    sum = _mm512_fmadd_ps(q[j], k[j], sum);
                }
                *weights.get_unchecked_mut((chunk.first + h) * chunk.total + position) =
                    _mm512_reduce_add_ps(sum) * scale;
            }
        }
    }

    /// `out_h = Σ_p weights[h][p] × v_p` for the chunk's heads, accumulated in registers.
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_values<const C: usize>(chunk: &Chunk<'_>, weights: &[f32], out: &mut [f32]) {
        let mut acc = [[_mm512_setzero_ps(); PARTS]; C];
        for position in 0..chunk.total {
            let value = chunk.row_at(chunk.values, position);
            let v: [__m512; PARTS] = std::array::from_fn(|j| _mm512_loadu_ps(value.add(j * LANES)));
            for (h, acc) in acc.iter_mut().enumerate() {
                let weight = _mm512_set1_ps(
                    *weights.get_unchecked((chunk.first + h) * chunk.total + position),
                );
                for j in 0..PARTS {
                    acc[j] = _mm512_fmadd_ps(weight, v[j], acc[j]);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            for (j, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(
                    out.as_mut_ptr().add((chunk.first + h) * DIM + j * LANES),
                    *acc,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(count: usize, seed: u64) -> Vec<f32> {
        crate::test_values(count, seed, 2.0)
    }

    /// The dispatched path (AVX-512 where the CPU has it) gives the portable loops' result,
    /// for groups of 1 to 9 heads per key/value head (so every chunk size and more than one
    /// chunk per group) and 1 to 40 cached positions; and the portable loops give what the
    /// definition says for one head.
    #[test]
    fn the_fast_path_matches_the_portable_loops() {
        for (heads, kv_heads) in [(1, 1), (2, 1), (9, 3), (8, 2), (9, 1), (6, 6)] {
            for total in [1, 2, 17, 40] {
                let dim = 64;
                let query = values(heads * dim, (heads * 100 + total) as u64);
                let keys = values(total * kv_heads * dim, total as u64 + 7);
                let cached_values = values(total * kv_heads * dim, total as u64 + 11);
                let fast = decode(&query, &keys, &cached_values, heads, kv_heads, dim);
                let portable = decode_portable(&query, &keys, &cached_values, heads, kv_heads, dim);
                for (i, (a, b)) in fast.iter().zip(&portable).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{heads}/{kv_heads} heads, {total} positions, value {i}: {a} against {b}"
                    );
                }
            }
        }
        // One head, two positions, by hand: weights softmax(q·k / 8).
        let dim = 64;
        let query = vec![1.0; dim];
        let mut keys = vec![0.0; 2 * dim];
        keys[dim..].fill(8.0 / dim as f32); // q·k = 8 → score 1
        let mut cached_values = vec![1.0; dim];
        cached_values.extend(vec![3.0; dim]);
        let expected_second = 1f32.exp() / (1.0 + 1f32.exp());
        let expected = 1.0 * (1.0 - expected_second) + 3.0 * expected_second;
        for out in decode(&query, &keys, &cached_values, 1, 1, dim) {
            assert!((out - expected).abs() < 1e-5, "{out} against {expected}");
        }
    }
}
