//! Token generation over any [`CausalLm`]: left-padded batches, KV-cached decode, sampling
//! (greedy, temperature, top-k, top-p, seeded), stop rules and per-token callbacks for streaming.

use std::time::Instant;

use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::model::{CausalLm, ModelError, Step};
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

    fn validate(&self) -> Result<(), GenerateError> {
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

/// Per-row state while a batch decodes.
struct Row {
    prompt_len: usize,
    next_position: i64,
    tokens: Vec<u32>,
    finish: Option<FinishReason>,
    rng: Option<StdRng>,
    decode_ms: f64,
}

/// Check a batch before any model work: non-empty, and every prompt fits the context.
pub fn validate_prompts(prompts: &[Vec<u32>], context: usize) -> Result<(), GenerateError> {
    if prompts.is_empty() {
        return Err(GenerateError::EmptyBatch);
    }
    for (row, prompt) in prompts.iter().enumerate() {
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
/// every kept token as soon as it is chosen (for streaming).
pub fn generate(
    model: &mut dyn CausalLm,
    prompts: &[Vec<u32>],
    config: &GenerationConfig,
    steering: &BatchSteering,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generated>, GenerateError> {
    config.sampling.validate()?;
    let context = model.config().max_position_embeddings;
    validate_prompts(prompts, context)?;
    let batch = prompts.len();
    let mut rows: Vec<Row> = prompts
        .iter()
        .map(|prompt| Row {
            prompt_len: prompt.len(),
            next_position: prompt.len() as i64,
            tokens: Vec::new(),
            finish: (config.max_new_tokens == 0).then_some(FinishReason::Length),
            rng: match config.sampling {
                Sampling::Greedy => None,
                Sampling::Random { seed, .. } => Some(StdRng::seed_from_u64(seed)),
            },
            decode_ms: 0.0,
        })
        .collect();
    if steering.len() != batch {
        return Err(ModelError::Shape(format!(
            "{} steering rows for {batch} prompts",
            steering.len()
        ))
        .into());
    }
    let mut cache = model.new_cache(batch)?;
    let mut step = Step::left_padded(prompts, config.pad_id);
    let started = Instant::now();
    let mut prefill = steering.prefill(model.config());
    let mut logits = model.forward(&step, &mut cache, &mut prefill)?;
    let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut decode_deltas = prefill.decode();
    let decisions = prefill.decisions().to_vec();

    loop {
        let mut next_ids = Array2::<i64>::from_elem((batch, 1), config.pad_id as i64);
        for (r, row) in rows.iter_mut().enumerate() {
            if row.finish.is_some() {
                continue;
            }
            let scores = logits.row(r);
            let id = config
                .sampling
                .pick(scores.as_slice().unwrap_or(&[]), row.rng.as_mut());
            if config.stop_ids.contains(&id) {
                row.finish = Some(FinishReason::Stop);
                continue;
            }
            row.tokens.push(id);
            on_token(r, id);
            next_ids[[r, 0]] = id as i64;
            let full = row.next_position as usize + 1 > context;
            if row.tokens.len() >= config.max_new_tokens || full {
                row.finish = Some(FinishReason::Length);
            }
        }
        if rows.iter().all(|row| row.finish.is_some()) {
            break;
        }
        let positions: Vec<i64> = rows.iter().map(|row| row.next_position).collect();
        step.position_ids = Array2::from_shape_vec((batch, 1), positions)
            .map_err(|e| ModelError::Shape(e.to_string()))?;
        step.input_ids = next_ids;
        let seen = step.attention_mask.ncols();
        step.attention_mask = Array2::from_shape_fn((batch, seen + 1), |(r, c)| {
            if c < seen {
                step.attention_mask[[r, c]]
            } else {
                1
            }
        });
        let started = Instant::now();
        logits = model.forward(&step, &mut cache, &mut decode_deltas)?;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        for row in rows.iter_mut() {
            if row.finish.is_none() {
                row.decode_ms += elapsed;
            }
            row.next_position += 1;
        }
    }

    Ok(rows
        .into_iter()
        .zip(decisions)
        .map(|(row, steering)| Generated {
            token_ids: row.tokens,
            finish_reason: row.finish.unwrap_or(FinishReason::Length),
            prompt_tokens: row.prompt_len,
            prefill_ms,
            decode_ms: row.decode_ms,
            steering,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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
