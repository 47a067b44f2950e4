//! Teacher-forced scoring: the log-probability of given continuations after their prompts
//! (`onnx-steer score`, the server's `echo`), steered exactly as generation steers them.
//!
//! A group of rows is scored in two forward steps. The prompts prefill as in generation (the
//! prefill-phase steering, learned interventions reading the prompt and deciding), once per
//! distinct prompt and steering; the last position scores each continuation's first token. The rest of each continuation is fed as one
//! step with the decode-phase steering that generating those tokens one at a time would apply,
//! and each position scores the next token.

use std::sync::Arc;

use ndarray::{Array2, ArrayView1};
use serde::Serialize;

use super::logprobs::{LogSoftmax, PositionLogprobs};
use super::GenerateError;
use crate::chain::{CausalLm, KvCache, LayerHook, ModelError, Prompt, Step};
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
    // Rows with the same text prompt and steering share one prefill (the choices of a
    // multiple-choice question); the cache rows are then repeated for each.
    let mut unique: Vec<usize> = Vec::new();
    let source: Vec<usize> = requests
        .iter()
        .enumerate()
        .map(|(row, request)| {
            let same = |&&u: &&usize| {
                let other = &requests[u];
                request.prompt.images.is_empty()
                    && other.prompt.images.is_empty()
                    && other.prompt.ids == request.prompt.ids
                    && same_steering(&other.steering, &request.steering)
            };
            match unique.iter().position(|u| same(&u)) {
                Some(index) => index,
                None => {
                    unique.push(row);
                    unique.len() - 1
                }
            }
        })
        .collect();
    let prompts: Vec<Prompt> = unique.iter().map(|&u| requests[u].prompt.clone()).collect();
    let group = BatchSteering::new(
        unique
            .iter()
            .map(|&u| requests[u].steering.clone())
            .collect(),
    );
    let mut cache = model.new_cache(unique.len())?;
    let step = Step::for_prompts(&prompts, pad_id);
    let width = step.input_ids.ncols();
    let top = options.top_logprobs;

    let ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    let lengths: Vec<usize> = ids.iter().map(|ids| ids.len()).collect();
    let mut prefill = group.prefill(model.config(), &lengths);
    let echo = vec![options.prompt_logprobs.then_some(top); unique.len()];
    let (last, echoed) = prefill_logits(model, &step, &mut cache, &mut prefill, &ids, &echo)?;
    let mut scored = Vec::with_capacity(requests.len());
    for (row, (request, &from)) in requests.iter().zip(&source).enumerate() {
        let mut row_scores = Scored {
            prompt: echoed[from].clone(),
            continuation: Vec::new(),
            steering: prefill.decisions()[from].clone(),
        };
        if let Some(&id) = request.continuation.first() {
            row_scores
                .continuation
                .push(position(last.row(from), id, top, row, 0)?);
        }
        scored.push(row_scores);
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
                step.attention_mask[[source[r], c]]
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
        if source.len() != unique.len() {
            cache = cache.select_rows(&source)?;
            decode.retain_rows(&source);
        }
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

fn same_steering(a: &Option<Arc<ResolvedSteering>>, b: &Option<Arc<ResolvedSteering>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

/// Run the prefill `step` of left-padded `prompts`: the last position's logits `[B, vocab]`, and
/// for each row with `Some(k)` in `echo` the log-probabilities of its prompt tokens after the
/// first, with `k` alternatives (empty for the others; without any, one plain forward).
pub(crate) fn prefill_logits(
    model: &mut dyn CausalLm,
    step: &Step,
    cache: &mut KvCache,
    hook: &mut dyn LayerHook,
    prompts: &[&[u32]],
    echo: &[Option<usize>],
) -> Result<(Array2<f32>, Vec<Vec<PositionLogprobs>>), ModelError> {
    let mut echoed = vec![Vec::new(); prompts.len()];
    if echo.iter().all(Option::is_none) {
        return Ok((model.forward(step, cache, hook)?, echoed));
    }
    let width = step.input_ids.ncols();
    let mut last = None;
    model.forward_positions(step, cache, hook, &mut |t, logits| {
        for (row, (ids, top)) in prompts.iter().zip(echo).enumerate() {
            // Position t predicts padded position t + 1: prompt token t + 1 - offset.
            let next = (t + 1).checked_sub(width - ids.len());
            let target = next.filter(|&i| i >= 1).and_then(|i| ids.get(i));
            if let (Some(&id), Some(top)) = (target, top) {
                echoed[row].push(position(logits.row(row), id, *top, row, t + 1)?);
            }
        }
        if t + 1 == width {
            last = Some(logits.to_owned());
        }
        Ok(())
    })?;
    let last = last.ok_or_else(|| ModelError::Shape("the prefill step has no positions".into()))?;
    Ok((last, echoed))
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
