//! Choosing the next token from the model's logits.
//!
//! Greedy (argmax) by default, so the same prompt always gives the same text; with a
//! temperature above zero, nucleus (top-p) sampling from a per-request seeded generator, so
//! a run is still reproducible given its seed. One `Sampler` per request: no shared state.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to pick tokens. `temperature == 0` means greedy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probabilities add up to at least this (0, 1].
    pub top_p: f32,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
        }
    }
}

impl SamplingConfig {
    pub fn is_greedy(&self) -> bool {
        !(self.temperature > 0.0 && self.temperature.is_finite())
    }
}

pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
    /// Scratch space reused between steps.
    candidates: Vec<(u32, f32)>,
}

/// Index of the largest finite value; the lowest index wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, v) in logits.iter().enumerate() {
        if *v > best_value {
            best = i;
            best_value = *v;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(config: SamplingConfig, seed: u64) -> Self {
        Self {
            config,
            rng: ChaCha8Rng::seed_from_u64(seed),
            candidates: Vec::new(),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.config.is_greedy() || logits.is_empty() {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        let t = self.config.temperature;
        self.candidates.clear();
        let mut total = 0f32;
        for (i, v) in logits.iter().enumerate() {
            let p = ((v - max) / t).exp();
            if p > 0.0 {
                self.candidates.push((i as u32, p));
                total += p;
            }
        }
        self.candidates
            .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top_p = self.config.top_p.clamp(f32::MIN_POSITIVE, 1.0);
        let mut kept = 0;
        let mut mass = 0f32;
        for (_, p) in &self.candidates {
            mass += p / total;
            kept += 1;
            if mass >= top_p {
                break;
            }
        }
        let kept = &self.candidates[..kept.max(1)];
        let kept_total: f32 = kept.iter().map(|(_, p)| p).sum();
        let mut r = self.rng.gen::<f32>() * kept_total;
        for (id, p) in kept {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        kept[kept.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingConfig::default(), 1);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, 3.0]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_is_seeded() {
        let config = SamplingConfig {
            temperature: 1.0,
            top_p: 0.5,
        };
        let logits = [10.0, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(config, 7);
        for _ in 0..50 {
            assert_eq!(s.sample(&logits), 0);
        }
        let spread = [1.0, 1.0, 1.0, 1.0];
        let a: Vec<u32> = {
            let mut s = Sampler::new(
                SamplingConfig {
                    top_p: 1.0,
                    ..config
                },
                42,
            );
            (0..20).map(|_| s.sample(&spread)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(
                SamplingConfig {
                    top_p: 1.0,
                    ..config
                },
                42,
            );
            (0..20).map(|_| s.sample(&spread)).collect()
        };
        assert_eq!(a, b, "same seed, same tokens");
        assert!(a.iter().any(|t| *t != a[0]), "sampling varies: {a:?}");
    }
}
