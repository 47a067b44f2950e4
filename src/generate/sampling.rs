//! How the next token is chosen from a row's logits: greedy, or temperature, top-k and top-p with a
//! seeded generator.

use rand::rngs::StdRng;
use rand::Rng;

use super::GenerateError;

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Argmax (first maximum on ties, as torch does).
    Greedy,
    /// Temperature, then top-k, then nucleus (top-p) filtering, sampled with a seeded RNG.
    Random {
        /// Logits are divided by this; below [`MIN_TEMPERATURE`] the pick is greedy.
        temperature: f32,
        /// Keep the smallest set of tokens with this much probability (1 keeps all).
        top_p: f32,
        /// Keep only the k most likely tokens (0 keeps all).
        top_k: usize,
        /// Seed of the row's generator: the same seed gives the same tokens.
        seed: u64,
    },
}

/// Temperatures below this sample greedily: dividing logits by less overflows f32 to infinities
/// whose softmax is NaN (vLLM treats temperatures under 1e-5 the same way).
pub const MIN_TEMPERATURE: f32 = 1e-5;

impl Sampling {
    /// Random sampling with these settings, or [`Sampling::Greedy`] when `temperature` is below
    /// [`MIN_TEMPERATURE`] (0 included).
    pub fn with_temperature(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> Self {
        if (0.0..MIN_TEMPERATURE).contains(&temperature) {
            Sampling::Greedy
        } else {
            Sampling::Random {
                temperature,
                top_p,
                top_k,
                seed,
            }
        }
    }

    /// The next token from one row's logits; `rng` is that row's seeded generator (random
    /// sampling without one, or below [`MIN_TEMPERATURE`], is greedy).
    pub fn pick(&self, logits: &[f32], rng: Option<&mut StdRng>) -> u32 {
        match (*self, rng) {
            (
                Sampling::Random {
                    temperature,
                    top_p,
                    top_k,
                    ..
                },
                Some(rng),
            ) if temperature >= MIN_TEMPERATURE => sample(logits, temperature, top_p, top_k, rng),
            _ => argmax(logits),
        }
    }

    /// Temperature must be positive and finite, top-p in (0, 1].
    pub fn validate(&self) -> Result<(), GenerateError> {
        if let Sampling::Random {
            temperature, top_p, ..
        } = *self
        {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(GenerateError::Sampling(format!(
                    "temperature must be > 0, got {temperature}"
                )));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(GenerateError::Sampling(format!(
                    "top-p must be in (0, 1], got {top_p}"
                )));
            }
        }
        Ok(())
    }
}

/// OpenAI's presence and frequency penalties: before a row picks, each token's logit is lowered
/// by `frequency` for every time the row generated it and by `presence` once if it did (the
/// prompt does not count, as in OpenAI's and vLLM's). Both in [-2, 2]; 0 leaves logits alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Penalties {
    /// Lowered once for any token the row generated.
    pub presence: f32,
    /// Lowered per time the row generated the token.
    pub frequency: f32,
}

impl Penalties {
    /// True when neither penalty changes anything.
    pub fn is_zero(&self) -> bool {
        self.presence == 0.0 && self.frequency == 0.0
    }

    /// Both must be finite and in [-2, 2], OpenAI's range.
    pub fn validate(&self) -> Result<(), GenerateError> {
        for (name, value) in [("presence", self.presence), ("frequency", self.frequency)] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(GenerateError::Sampling(format!(
                    "{name} penalty must be in [-2, 2], got {value}"
                )));
            }
        }
        Ok(())
    }

    /// `logits` with the penalties for the tokens in `generated` applied.
    pub fn apply(&self, logits: &[f32], generated: &[u32]) -> Vec<f32> {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &id in generated {
            *counts.entry(id).or_default() += 1;
        }
        let mut penalised = logits.to_vec();
        for (id, count) in counts {
            if let Some(logit) = penalised.get_mut(id as usize) {
                *logit -= self.presence + self.frequency * count as f32;
            }
        }
        penalised
    }
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn sample(row: &[f32], temperature: f32, top_p: f32, top_k: usize, rng: &mut StdRng) -> u32 {
    let mut candidates: Vec<(usize, f32)> = row
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, l / temperature))
        .collect();
    // Highest logit first, lower index first on ties: the order a stable sort gives.
    let order = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if top_k > 0 && top_k < candidates.len() {
        // Partition out the top k before sorting them: O(V) instead of O(V log V).
        candidates.select_nth_unstable_by(top_k - 1, order);
        candidates.truncate(top_k);
    }
    candidates.sort_by(order);
    let max = candidates[0].1;
    let mut probs: Vec<f32> = candidates.iter().map(|&(_, l)| (l - max).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    let mut cumulative = 0.0;
    let mut keep = probs.len();
    for (i, p) in probs.iter().enumerate() {
        cumulative += p;
        if cumulative >= top_p {
            keep = i + 1;
            break;
        }
    }
    let mass: f32 = probs[..keep].iter().sum();
    let mut target = rng.gen::<f32>() * mass;
    for (i, p) in probs[..keep].iter().enumerate() {
        target -= p;
        if target <= 0.0 {
            return candidates[i].0 as u32;
        }
    }
    candidates[keep - 1].0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn argmax_takes_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20 {
            assert_eq!(sample(&[0.5, 2.0, 1.9, -3.0], 1.0, 1.0, 1, &mut rng), 1);
        }
    }

    #[test]
    fn top_k_keeps_the_lowest_indices_among_ties() {
        let mut rng = StdRng::seed_from_u64(5);
        let logits = [1.0, 5.0, 5.0, 5.0, 5.0, 0.0];
        let drawn: std::collections::BTreeSet<u32> = (0..200)
            .map(|_| sample(&logits, 1.0, 1.0, 3, &mut rng))
            .collect();
        assert_eq!(drawn, [1, 2, 3].into_iter().collect());
    }

    #[test]
    fn tiny_top_p_keeps_only_the_top_token() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            assert_eq!(sample(&[0.0, 5.0, 4.0], 1.0, 0.01, 0, &mut rng), 1);
        }
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varied() {
        let logits = [1.0, 1.1, 0.9, 1.05];
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..32)
                .map(|_| sample(&logits, 1.0, 1.0, 0, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let distinct: std::collections::BTreeSet<u32> = draw(3).into_iter().collect();
        assert!(
            distinct.len() > 1,
            "uniform-ish logits should not always give one token"
        );
    }

    #[test]
    fn tiny_temperatures_are_greedy() {
        let logits = [0.5, 40.0, 39.0, -3.0];
        let tiny = Sampling::with_temperature(1e-38, 1.0, 0, 1);
        assert_eq!(tiny, Sampling::Greedy);
        let mut rng = StdRng::seed_from_u64(1);
        let raw = Sampling::Random {
            temperature: 1e-38,
            top_p: 1.0,
            top_k: 0,
            seed: 1,
        };
        for _ in 0..20 {
            assert_eq!(raw.pick(&logits, Some(&mut rng)), 1);
        }
    }

    #[test]
    fn penalties_lower_what_the_row_already_generated() {
        let penalties = Penalties {
            presence: 0.5,
            frequency: 1.0,
        };
        let logits = [3.0, 2.9, 0.0];
        let penalised = penalties.apply(&logits, &[0, 0, 2]);
        assert_eq!(penalised, vec![3.0 - 0.5 - 2.0, 2.9, -1.5]);
        assert_eq!(argmax(&penalised), 1);
        assert_eq!(Penalties::default().apply(&logits, &[0]), logits.to_vec());
        assert!(Penalties {
            presence: 2.5,
            frequency: 0.0
        }
        .validate()
        .is_err());
        assert!(Penalties {
            presence: 0.0,
            frequency: f32::NAN
        }
        .validate()
        .is_err());
    }

    #[test]
    fn bad_temperature_is_rejected() {
        let sampling = Sampling::Random {
            temperature: 0.0,
            top_p: 0.9,
            top_k: 0,
            seed: 0,
        };
        assert!(sampling
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
    }
}
