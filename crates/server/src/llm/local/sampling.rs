//! Choosing the next token from the model's logits.
//!
//! Greedy (argmax) by default, so the same prompt always gives the same text; with a
//! temperature above zero, nucleus (top-p) sampling from a per-request seeded generator, so
//! a run is still reproducible given its seed. One `Sampler` per request: no shared state.
//!
//! Before a token is chosen, the request's [`Repetition`] controls reshape the logits: a
//! repetition penalty over the recently generated tokens and a ban on completing an n-gram
//! the answer already contains. A 135M model decoding greedily otherwise falls into loops
//! ("765 tokens" sixty times); both controls keep greedy decoding deterministic.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::llm::Repetition;

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
    repetition: Repetition,
    /// The tokens this request generated so far (what the repetition controls look at).
    generated: Vec<u32>,
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
    pub fn new(config: SamplingConfig, repetition: Repetition, seed: u64) -> Self {
        Self {
            config,
            repetition,
            generated: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            candidates: Vec::new(),
        }
    }

    /// Picks the next token (the logits are reshaped in place by the repetition controls)
    /// and remembers it as generated.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.penalize(logits);
        let token = self.choose(logits);
        self.generated.push(token);
        token
    }

    /// Applies the repetition penalty (llama.cpp's rule: a positive logit is divided by the
    /// penalty, a negative one multiplied, once per distinct token in the window) and bans
    /// every token that would complete an n-gram already generated (the rule of Hugging
    /// Face's `no_repeat_ngram_size`).
    fn penalize(&self, logits: &mut [f32]) {
        let Repetition {
            penalty,
            window,
            no_repeat_ngram,
        } = self.repetition;
        if penalty > 1.0 && window > 0 {
            let start = self.generated.len().saturating_sub(window);
            let mut seen: Vec<u32> = self.generated[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for token in seen {
                if let Some(logit) = logits.get_mut(token as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / penalty
                    } else {
                        *logit * penalty
                    };
                }
            }
        }
        let n = no_repeat_ngram;
        if n >= 2 && self.generated.len() >= n {
            let prefix = &self.generated[self.generated.len() - (n - 1)..];
            for start in 0..=self.generated.len() - n {
                if &self.generated[start..start + n - 1] == prefix {
                    let banned = self.generated[start + n - 1];
                    if let Some(logit) = logits.get_mut(banned as usize) {
                        *logit = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
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
        let mut s = Sampler::new(SamplingConfig::default(), Repetition::OFF, 1);
        assert_eq!(s.sample(&mut [0.1, 3.0, 2.0, 3.0]), 1);
    }

    #[test]
    fn no_repeat_ngram_breaks_a_greedy_loop() {
        // Logits that always prefer 1, 2, 1, 2, ...: with 3-grams banned, "1 2 1" may not be
        // followed by 2 again once "1 2" ... "2 1 2" exists.
        let prefer = |last: u32| -> Vec<f32> {
            let mut l = vec![0.0; 4];
            l[if last == 1 { 2 } else { 1 }] = 5.0;
            l[3] = 1.0;
            l
        };
        let run = |repetition: Repetition| {
            let mut s = Sampler::new(SamplingConfig::default(), repetition, 1);
            let mut last = 2;
            (0..8)
                .map(|_| {
                    last = s.sample(&mut prefer(last));
                    last
                })
                .collect::<Vec<u32>>()
        };
        assert_eq!(run(Repetition::OFF), vec![1, 2, 1, 2, 1, 2, 1, 2]);
        let controlled = run(Repetition {
            penalty: 1.0,
            window: 0,
            no_repeat_ngram: 3,
        });
        for i in 0..controlled.len() - 2 {
            for j in i + 1..controlled.len() - 2 {
                assert_ne!(
                    controlled[i..i + 3],
                    controlled[j..j + 3],
                    "a 3-gram repeats in {controlled:?}"
                );
            }
        }
    }

    #[test]
    fn the_repetition_penalty_lowers_recent_tokens() {
        let mut s = Sampler::new(
            SamplingConfig::default(),
            Repetition {
                penalty: 2.0,
                window: 8,
                no_repeat_ngram: 0,
            },
            1,
        );
        assert_eq!(s.sample(&mut [3.0, 2.0]), 0);
        // 3.0 / 2 = 1.5 < 2.0: the token just generated loses to the other one.
        assert_eq!(s.sample(&mut [3.0, 2.0]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus_and_is_seeded() {
        let config = SamplingConfig {
            temperature: 1.0,
            top_p: 0.5,
        };
        let logits = [10.0, 0.0, 0.0, 0.0];
        let mut s = Sampler::new(config, Repetition::OFF, 7);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits.clone()), 0);
        }
        let spread = [1.0, 1.0, 1.0, 1.0];
        let a: Vec<u32> = {
            let mut s = Sampler::new(
                SamplingConfig {
                    top_p: 1.0,
                    ..config
                },
                Repetition::OFF,
                42,
            );
            (0..20).map(|_| s.sample(&mut spread.clone())).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(
                SamplingConfig {
                    top_p: 1.0,
                    ..config
                },
                Repetition::OFF,
                42,
            );
            (0..20).map(|_| s.sample(&mut spread.clone())).collect()
        };
        assert_eq!(a, b, "same seed, same tokens");
        assert!(a.iter().any(|t| *t != a[0]), "sampling varies: {a:?}");
    }
}
