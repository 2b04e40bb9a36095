//! Rotary position embedding of one position's heads, in place (decoding).
//!
//! Why here and not candle's `rope`/`rope_i`: for a decoding token the tensor route is a
//! reshape, a transpose, a copy to contiguous memory, the rotation and a squeeze, for the
//! queries and the keys of every sequence in every layer, each allocating; the rotation
//! itself is a few dozen multiplies. This is the same arithmetic (candle's formulas, in the
//! same order, so results are bit-identical) on the row as it came out of the product.

/// How a head's dimensions are paired for rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pairing {
    /// Neighbours `2i`, `2i + 1` (llama; candle's `rope_i`).
    Interleaved,
    /// Halves `i`, `i + d/2` (NEOX; candle's `rope`).
    Halves,
}

/// Rotates every `dim`-long head of `row` (`[heads][dim]`) by the angles whose cosines and
/// sines are `cos` and `sin` (`dim / 2` each: the table's row for this position).
pub fn rotate_heads(row: &mut [f32], dim: usize, cos: &[f32], sin: &[f32], pairing: Pairing) {
    let half = dim / 2;
    assert!(
        cos.len() == half && sin.len() == half && row.len().is_multiple_of(dim),
        "one position's tables for whole heads"
    );
    for head in row.chunks_exact_mut(dim) {
        match pairing {
            Pairing::Interleaved => {
                for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * cos[i] - b * sin[i];
                    pair[1] = a * sin[i] + b * cos[i];
                }
            }
            Pairing::Halves => {
                let (low, high) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (low[i], high[i]);
                    low[i] = a * cos[i] - b * sin[i];
                    high[i] = a * sin[i] + b * cos[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quarter turn maps (1, 0) to (0, 1) in both pairings, and a rotation keeps each
    /// pair's length.
    #[test]
    fn rotations_turn_each_pair_and_keep_its_length() {
        let (cos, sin) = ([0.0, 1.0], [1.0, 0.0]);
        let mut interleaved = [1.0, 0.0, 3.0, 4.0];
        rotate_heads(&mut interleaved, 4, &cos, &sin, Pairing::Interleaved);
        assert_eq!(interleaved, [0.0, 1.0, 3.0, 4.0]);
        let mut halves = [1.0, 3.0, 0.0, 4.0];
        rotate_heads(&mut halves, 4, &cos, &sin, Pairing::Halves);
        assert_eq!(halves, [0.0, 3.0, 1.0, 4.0]);

        let angle = 0.7f32;
        let row = crate::test_values(3 * 8, 9, 2.0);
        for pairing in [Pairing::Interleaved, Pairing::Halves] {
            let mut rotated = row.clone();
            rotate_heads(
                &mut rotated,
                8,
                &[angle.cos(); 4],
                &[angle.sin(); 4],
                pairing,
            );
            let length = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
            assert!((length(&rotated) - length(&row)).abs() < 1e-4);
            assert_ne!(rotated, row);
        }
    }
}
