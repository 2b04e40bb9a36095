//! The local model's numeric kernels: the inner loops of inference, written with SIMD
//! intrinsics where the compiler's own vectorization or candle's kernels leave most of the
//! CPU unused.
//!
//! Why a crate of their own: they are the workspace's only `unsafe` code (every other crate
//! forbids it), kept small and tested against plain f32 arithmetic; and the test suite is a
//! debug build, where intrinsics at opt-level 0 run tens of times slower, so this crate is
//! optimized in every profile (`[profile.dev.package.apex-kernels]`), as candle is.
//!
//! - [`quantized_matmul`]: Q8_0 and Q4_1 weights × activation rows on AVX-512 VNNI
//!   ([`PackedMatrix`]);
//! - [`attention`]: one decoding position's attention against its cached keys and values;
//! - [`rotary`]: one decoding position's rotary embedding, in place (plain loops: what it
//!   saves is candle's per-call set-up, and in a debug build it still runs optimized).

pub mod attention;
pub mod quantized_matmul;
pub mod rotary;

pub use quantized_matmul::{PackedMatrix, QuantizedRows};

/// Deterministic test inputs (a small LCG: no test needs real randomness).
#[cfg(test)]
pub(crate) fn test_values(count: usize, seed: u64, spread: f32) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * spread
        })
        .collect()
}
