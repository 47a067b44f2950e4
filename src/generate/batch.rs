//! A running batch (continuous batching): its rows decode together, one forward step per token;
//! a group of new rows joins after its own prefill, and finished or cancelled rows leave, without
//! stalling the others. [`crate::generate::generate`] is one group that joins once; the server
//! admits requests between steps.
//!
//! Each row keeps its own positions, sampling, stop rules and steering, so it produces exactly
//! what it produces alone: joining left-pads the shorter KV cache and masks the padding out.

use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array2, ArrayView2};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::{validate_prompts, FinishReason, GenerateError, Generated, Sampling};
use crate::chain::{CausalLm, KvCache, ModelError, Prompt, Step};
use crate::steer::{BatchSteering, Decision, DecodeSteering, ResolvedSteering};

/// One row to generate.
#[derive(Debug, Clone)]
pub struct RowRequest {
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub max_new_tokens: usize,
    /// Token ids that end the row (not included in the output).
    pub stop_ids: Vec<u32>,
    pub steering: Option<Arc<ResolvedSteering>>,
}

/// Identifies a row for its whole life in a [`RunningBatch`].
pub type RowId = u64;

struct ActiveRow {
    id: RowId,
    request: RowRequest,
    next_position: i64,
    /// The token chosen last, fed at the next step.
    pending: u32,
    tokens: Vec<u32>,
    finish: Option<FinishReason>,
    rng: Option<StdRng>,
    prefill_ms: f64,
    decode_ms: f64,
    decisions: Vec<Decision>,
}

impl ActiveRow {
    /// Choose this row's next token from its logits; `on_token` sees every kept token.
    fn pick(&mut self, logits: &[f32], context: usize, on_token: &mut dyn FnMut(RowId, u32)) {
        if self.finish.is_some() {
            return;
        }
        let id = self.request.sampling.pick(logits, self.rng.as_mut());
        if self.request.stop_ids.contains(&id) {
            self.finish = Some(FinishReason::Stop);
            return;
        }
        self.tokens.push(id);
        self.pending = id;
        on_token(self.id, id);
        let full = self.next_position as usize + 1 > context;
        if self.tokens.len() >= self.request.max_new_tokens || full {
            self.finish = Some(FinishReason::Length);
        }
    }

    fn into_generated(self) -> Generated {
        Generated {
            prompt_tokens: self.request.prompt.ids.len(),
            token_ids: self.tokens,
            finish_reason: self.finish.unwrap_or(FinishReason::Length),
            prefill_ms: self.prefill_ms,
            decode_ms: self.decode_ms,
            steering: self.decisions,
        }
    }
}

/// The KV state shared by the rows of a running batch.
struct Shared {
    cache: KvCache,
    /// `[B, P]`: 1 where a row attends (its own tokens), 0 on padding.
    mask: Array2<i64>,
    steering: DecodeSteering,
}

/// Rows decoding together; see the module docs.
pub struct RunningBatch {
    rows: Vec<ActiveRow>,
    shared: Option<Shared>,
    pad_id: u32,
    next_id: RowId,
}

/// `mask` with `pad` zero columns in front.
fn pad_mask(mask: ArrayView2<'_, i64>, pad: usize) -> Array2<i64> {
    let (rows, cols) = mask.dim();
    let mut padded = Array2::zeros((rows, pad + cols));
    padded.slice_mut(ndarray::s![.., pad..]).assign(&mask);
    padded
}

impl RunningBatch {
    /// An empty batch; `pad_id` fills left padding and the input of finished rows.
    pub fn new(pad_id: u32) -> Self {
        Self {
            rows: Vec::new(),
            shared: None,
            pad_id,
            next_id: 0,
        }
    }

    /// Rows in the batch, finished ones included until [`RunningBatch::take_finished`].
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when no row is in the batch.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// True while some row still generates.
    pub fn has_unfinished(&self) -> bool {
        self.rows.iter().any(|row| row.finish.is_none())
    }

    /// Prefill `requests` as one group, choose each one's first token, and add them to the batch.
    /// Returns their ids, in order.
    pub fn join(
        &mut self,
        model: &mut dyn CausalLm,
        requests: Vec<RowRequest>,
        on_token: &mut dyn FnMut(RowId, u32),
    ) -> Result<Vec<RowId>, GenerateError> {
        let context = model.config().max_position_embeddings;
        let prompts: Vec<Prompt> = requests.iter().map(|r| r.prompt.clone()).collect();
        validate_prompts(&prompts, context)?;
        for request in &requests {
            request.sampling.validate()?;
        }
        let group = BatchSteering::new(requests.iter().map(|r| r.steering.clone()).collect());
        let mut cache = model.new_cache(requests.len())?;
        let step = Step::for_prompts(&prompts, self.pad_id);
        let started = Instant::now();
        let mut prefill = group.prefill(model.config());
        let logits = model.forward(&step, &mut cache, &mut prefill)?;
        let prefill_ms = started.elapsed().as_secs_f64() * 1e3;
        let steering = prefill.decode();
        let decisions = prefill.decisions().to_vec();

        let first_id = self.next_id;
        self.next_id += requests.len() as RowId;
        let mut joined: Vec<ActiveRow> = requests
            .into_iter()
            .zip(decisions)
            .enumerate()
            .map(|(r, (request, decisions))| ActiveRow {
                id: first_id + r as RowId,
                next_position: request.prompt.ids.len() as i64,
                pending: self.pad_id,
                tokens: Vec::new(),
                finish: (request.max_new_tokens == 0).then_some(FinishReason::Length),
                rng: match request.sampling {
                    Sampling::Greedy => None,
                    Sampling::Random { seed, .. } => Some(StdRng::seed_from_u64(seed)),
                },
                prefill_ms,
                decode_ms: 0.0,
                decisions,
                request,
            })
            .collect();
        for (row, scores) in joined.iter_mut().zip(logits.rows()) {
            row.pick(scores.as_slice().unwrap_or(&[]), context, on_token);
        }
        let ids = joined.iter().map(|row| row.id).collect();
        let group_rows = joined.len();
        self.shared = Some(match self.shared.take() {
            None => Shared {
                cache,
                mask: step.attention_mask,
                steering,
            },
            Some(mut shared) => {
                let (pad_running, pad_group) = shared.cache.append_rows(&cache)?;
                let running = pad_mask(shared.mask.view(), pad_running);
                let group_mask = pad_mask(step.attention_mask.view(), pad_group);
                shared.mask =
                    ndarray::concatenate(ndarray::Axis(0), &[running.view(), group_mask.view()])
                        .map_err(|e| {
                            ModelError::Shape(format!("attention masks do not stack: {e}"))
                        })?;
                shared
                    .steering
                    .append_rows(self.rows.len(), steering, group_rows)?;
                shared
            }
        });
        self.rows.extend(joined);
        Ok(ids)
    }

    /// One decode step: every row feeds its pending token (finished rows feed padding until they
    /// are taken out) and unfinished rows choose their next token.
    pub fn step(
        &mut self,
        model: &mut dyn CausalLm,
        on_token: &mut dyn FnMut(RowId, u32),
    ) -> Result<(), GenerateError> {
        let Some(shared) = self.shared.as_mut() else {
            return Ok(());
        };
        let context = model.config().max_position_embeddings;
        let batch = self.rows.len();
        let pad = self.pad_id as i64;
        let feed = |row: &ActiveRow| row.finish.map_or(row.pending as i64, |_| pad);
        let input_ids = Array2::from_shape_fn((batch, 1), |(r, _)| feed(&self.rows[r]));
        let position_ids = Array2::from_shape_fn((batch, 1), |(r, _)| self.rows[r].next_position);
        let seen = shared.mask.ncols();
        shared.mask = Array2::from_shape_fn((batch, seen + 1), |(r, c)| {
            if c < seen {
                shared.mask[[r, c]]
            } else {
                1
            }
        });
        let step = Step {
            input_ids,
            position_ids,
            attention_mask: shared.mask.clone(),
            images: Vec::new(),
        };
        let started = Instant::now();
        let logits = model.forward(&step, &mut shared.cache, &mut shared.steering)?;
        let elapsed = started.elapsed().as_secs_f64() * 1e3;
        for (row, scores) in self.rows.iter_mut().zip(logits.rows()) {
            if row.finish.is_none() {
                row.decode_ms += elapsed;
            }
            row.next_position += 1;
            row.pick(scores.as_slice().unwrap_or(&[]), context, on_token);
        }
        Ok(())
    }

    /// Take finished rows out of the batch (their KV cache is freed) and return their results.
    pub fn take_finished(&mut self) -> Result<Vec<(RowId, Generated)>, GenerateError> {
        self.remove(|row| row.finish.is_some())
    }

    /// Take a row out whether or not it finished (a client went away); returns what it made.
    pub fn cancel(&mut self, id: RowId) -> Result<Option<Generated>, GenerateError> {
        Ok(self
            .remove(|row| row.id == id)?
            .into_iter()
            .next()
            .map(|(_, generated)| generated))
    }

    fn remove(
        &mut self,
        leaves: impl Fn(&ActiveRow) -> bool,
    ) -> Result<Vec<(RowId, Generated)>, GenerateError> {
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&r| !leaves(&self.rows[r]))
            .collect();
        if keep.len() == self.rows.len() {
            return Ok(Vec::new());
        }
        if keep.is_empty() {
            self.shared = None;
        } else if let Some(shared) = self.shared.as_mut() {
            shared.cache.retain_rows(&keep)?;
            shared.mask = shared.mask.select(ndarray::Axis(0), &keep);
            shared.steering.retain_rows(&keep);
        }
        let mut left = Vec::new();
        let mut stayed = Vec::with_capacity(keep.len());
        for row in std::mem::take(&mut self.rows) {
            if leaves(&row) {
                left.push((row.id, row.into_generated()));
            } else {
                stayed.push(row);
            }
        }
        self.rows = stayed;
        Ok(left)
    }
}
