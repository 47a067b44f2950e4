//! Teacher-forced scoring: the log-probability of given continuations after their prompts
//! (`onnx-steer score`, the server's `echo`), steered exactly as generation steers them.
//!
//! A group of rows is scored in two forward steps. The prompts prefill as in generation (the
//! prefill-phase steering, learned interventions reading the prompt and deciding); its last
//! position scores each continuation's first token. The rest of each continuation is fed as one
//! step with the decode-phase steering that generating those tokens one at a time would apply,
//! and each position scores the next token.

use std::sync::Arc;

use ndarray::{Array2, ArrayView1, ArrayView2};
use serde::Serialize;

use super::logprobs::{LogSoftmax, PositionLogprobs};
use super::GenerateError;
use crate::chain::{CausalLm, ModelError, Prompt, Step};
use crate::steer::{BatchSteering, Decision, ResolvedSteering};

/// One prompt and the continuation to score after it.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    /// The tokenized prompt, with its images.
    pub prompt: Prompt,
    /// The tokens whose log-probabilities are wanted, in order (may be empty with
    /// [`ScoreOptions::prompt_logprobs`]).
    pub continuation: Vec<u32>,
    /// The row's steering, if any.
    pub steering: Option<Arc<ResolvedSteering>>,
}

/// What to report besides each continuation token's log-probability.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScoreOptions {
    /// The most likely alternatives to report at each position (0: none).
    pub top_logprobs: usize,
    /// Also score the prompt's own tokens after its first (OpenAI's `echo` with `logprobs`).
    pub prompt_logprobs: bool,
}

/// What one row scored.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scored {
    /// Prompt tokens 1.. (the first has no context); empty unless asked for.
    pub prompt: Vec<PositionLogprobs>,
    /// Each continuation token.
    pub continuation: Vec<PositionLogprobs>,
    /// What the row's learned interventions decided from the prompt.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steering: Vec<Decision>,
}

impl Scored {
    /// The continuation's log-probability: the sum over its tokens.
    pub fn continuation_logprob(&self) -> f64 {
        self.continuation
            .iter()
            .map(|p| f64::from(p.token.logprob))
            .sum()
    }
}

/// Score a group of rows (one batch); see the module docs. `pad_id` fills padding.
pub fn score(
    model: &mut dyn CausalLm,
    requests: &[ScoreRequest],
    options: ScoreOptions,
    pad_id: u32,
) -> Result<Vec<Scored>, GenerateError> {
    if requests.is_empty() {
        return Err(GenerateError::EmptyBatch);
    }
    let context = model.config().max_position_embeddings;
    for (row, request) in requests.iter().enumerate() {
        let tokens = request.prompt.ids.len() + request.continuation.len();
        if request.prompt.ids.is_empty() {
            return Err(GenerateError::EmptyPrompt { row });
        }
        if tokens > context {
            return Err(GenerateError::SequenceTooLong {
                row,
                tokens,
                context,
            });
        }
    }
    let prompts: Vec<Prompt> = requests.iter().map(|r| r.prompt.clone()).collect();
    let group = BatchSteering::new(requests.iter().map(|r| r.steering.clone()).collect());
    let mut cache = model.new_cache(requests.len())?;
    let step = Step::for_prompts(&prompts, pad_id);
    let width = step.input_ids.ncols();
    let top = options.top_logprobs;
    let mut scored = vec![Scored::default(); requests.len()];

    let mut prefill = group.prefill(model.config());
    let first_token = |scored: &mut [Scored], logits: ArrayView2<'_, f32>| {
        for (row, request) in requests.iter().enumerate() {
            if let Some(&id) = request.continuation.first() {
                let first = position(logits.row(row), id, top, row, 0)?;
                scored[row].continuation.push(first);
            }
        }
        Ok::<_, ModelError>(())
    };
    if options.prompt_logprobs {
        model.forward_positions(&step, &mut cache, &mut prefill, &mut |t, logits| {
            for (row, request) in requests.iter().enumerate() {
                let ids = &request.prompt.ids;
                // Position t predicts padded position t + 1: prompt token t + 1 - offset.
                let next = (t + 1).checked_sub(width - ids.len());
                if let Some(&id) = next.filter(|&i| i >= 1).and_then(|i| ids.get(i)) {
                    let at = position(logits.row(row), id, top, row, t + 1)?;
                    scored[row].prompt.push(at);
                }
            }
            if t + 1 == width {
                first_token(&mut scored, logits)?;
            }
            Ok(())
        })?;
    } else {
        let logits = model.forward(&step, &mut cache, &mut prefill)?;
        first_token(&mut scored, logits.view())?;
    }
    for (row, decisions) in prefill.decisions().iter().enumerate() {
        scored[row].steering = decisions.clone();
    }

    let rest = requests
        .iter()
        .map(|r| r.continuation.len().saturating_sub(1))
        .max()
        .unwrap_or(0);
    if rest > 0 {
        let batch = requests.len();
        let input_ids = Array2::from_shape_fn((batch, rest), |(r, j)| {
            let ids = &requests[r].continuation;
            // Shorter continuations are padded on the right: causal attention keeps the padding
            // out of every position that is read.
            i64::from(*ids.get(j).filter(|_| j + 1 < ids.len()).unwrap_or(&pad_id))
        });
        let position_ids = Array2::from_shape_fn((batch, rest), |(r, j)| {
            (requests[r].prompt.ids.len() + j) as i64
        });
        let attention_mask = Array2::from_shape_fn((batch, width + rest), |(r, c)| {
            if c < width {
                step.attention_mask[[r, c]]
            } else {
                1
            }
        });
        let continued = Step {
            input_ids,
            position_ids,
            attention_mask,
            images: Vec::new(),
        };
        let mut decode = prefill.decode();
        model.forward_positions(&continued, &mut cache, &mut decode, &mut |j, logits| {
            for (row, request) in requests.iter().enumerate() {
                if let Some(&id) = request.continuation.get(j + 1) {
                    let at = position(logits.row(row), id, top, row, j + 1)?;
                    scored[row].continuation.push(at);
                }
            }
            Ok(())
        })?;
    }
    Ok(scored)
}

/// `id`'s log-probability and the `top` alternatives in one row's logits (`token` counts the
/// row's scored tokens, for errors).
fn position(
    logits: ArrayView1<'_, f32>,
    id: u32,
    top: usize,
    row: usize,
    token: usize,
) -> Result<PositionLogprobs, ModelError> {
    let logits = logits.as_standard_layout();
    let logits = logits.as_slice().unwrap_or(&[]);
    let softmax = LogSoftmax::new(logits).ok_or_else(|| {
        ModelError::NotFinite(format!("logits of row {row} before token {token}"))
    })?;
    softmax.position(id, top).ok_or_else(|| {
        ModelError::Shape(format!(
            "token id {id} is outside the model's {} logits",
            logits.len()
        ))
    })
}
