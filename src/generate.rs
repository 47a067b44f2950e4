//! Token generation over any [`CausalLm`]: left-padded batches, KV-cached decode, sampling
//! (greedy, temperature, top-k, top-p, seeded), stop rules and per-token callbacks for streaming.

use rand::rngs::StdRng;
use rand::Rng;

use crate::batch::{RowId, RowRequest, RunningBatch};
use crate::model::{CausalLm, ModelError, Prompt};
use crate::steer::{BatchSteering, Decision};

/// Why a generation request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("no prompts given")]
    EmptyBatch,
    #[error("prompt {row} is empty after tokenization")]
    EmptyPrompt { row: usize },
    #[error("prompt {row} has {tokens} tokens but the model's context is {context}; shorten it")]
    PromptTooLong {
        row: usize,
        tokens: usize,
        context: usize,
    },
    #[error("invalid sampling settings: {0}")]
    Sampling(String),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Argmax (first maximum on ties, as torch does).
    Greedy,
    /// Temperature, then top-k, then nucleus (top-p) filtering, sampled with a seeded RNG.
    Random {
        temperature: f32,
        top_p: f32,
        top_k: usize,
        seed: u64,
    },
}

impl Sampling {
    /// The next token from one row's logits; `rng` is that row's seeded generator (random
    /// sampling without one falls back to greedy).
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
            ) => sample(logits, temperature, top_p, top_k, rng),
            _ => argmax(logits),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), GenerateError> {
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

/// Settings of one generation call.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Token ids that end a row (the model's EOS ids).
    pub stop_ids: Vec<u32>,
    /// Filler for left padding and for rows that already stopped.
    pub pad_id: u32,
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop id was produced (it is not included in the output).
    Stop,
    /// `max_new_tokens` or the model context was reached.
    Length,
}

/// One row's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generated {
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// What the row's learned interventions (L2S, W2S, AutoSteer) decided at prefill.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steering: Vec<Decision>,
}

impl Generated {
    /// Decode throughput: tokens after the first (which comes from prefill) per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let decoded = self.token_ids.len().saturating_sub(1) as f64;
        if self.decode_ms > 0.0 {
            decoded / (self.decode_ms / 1000.0)
        } else {
            0.0
        }
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

/// Check a batch before any model work: non-empty, and every prompt fits the context.
pub fn validate_prompts(prompts: &[Prompt], context: usize) -> Result<(), GenerateError> {
    if prompts.is_empty() {
        return Err(GenerateError::EmptyBatch);
    }
    for (row, Prompt { ids: prompt, .. }) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt { row });
        }
        if prompt.len() > context {
            return Err(GenerateError::PromptTooLong {
                row,
                tokens: prompt.len(),
                context,
            });
        }
    }
    Ok(())
}

/// Generate for a batch of tokenized prompts; each row's output equals what it gives alone.
///
/// `steering` gives each row its own interventions (or none). `on_token(row, id)` fires for
/// every kept token as soon as it is chosen (for streaming). The rows run as one group of a
/// [`RunningBatch`], and each leaves it as soon as it finishes.
pub fn generate(
    model: &mut dyn CausalLm,
    prompts: &[Prompt],
    config: &GenerationConfig,
    steering: &BatchSteering,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generated>, GenerateError> {
    if steering.len() != prompts.len() {
        return Err(ModelError::Shape(format!(
            "{} steering rows for {} prompts",
            steering.len(),
            prompts.len()
        ))
        .into());
    }
    let requests = prompts
        .iter()
        .zip(steering.rows())
        .map(|(prompt, steering)| RowRequest {
            prompt: prompt.clone(),
            sampling: config.sampling,
            max_new_tokens: config.max_new_tokens,
            stop_ids: config.stop_ids.clone(),
            steering: steering.clone(),
        })
        .collect();
    let mut on_row_token = |id: RowId, token: u32| on_token(id as usize, token);
    let mut batch = RunningBatch::new(config.pad_id);
    batch.join(model, requests, &mut on_row_token)?;
    let mut done = batch.take_finished()?;
    while batch.has_unfinished() {
        batch.step(model, &mut on_row_token)?;
        done.extend(batch.take_finished()?);
    }
    done.sort_by_key(|(id, _)| *id);
    Ok(done.into_iter().map(|(_, generated)| generated).collect())
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
