//! One call that generates for a batch of prompts and returns when every row is done.

use super::batch::{RowId, RowRequest, RunningBatch};
use super::{GenerateError, Generated, GenerationConfig};
use crate::chain::{CausalLm, ModelError, Prompt};
use crate::steer::BatchSteering;

/// Generate for a batch of tokenized prompts; each row's output equals what it gives alone.
///
/// `steering` gives each row its own interventions (or none). `on_token(row, id)` fires for
/// every kept token as soon as it is chosen (for streaming). The rows run as one group of a
/// [`RunningBatch`], and each leaves it as soon as it finishes. A row that fails (non-finite
/// logits) fails the call.
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
            stop_strings: Vec::new(),
            steering: steering.clone(),
            penalties: config.penalties,
            logprobs: config.logprobs,
            prompt_logprobs: false,
        })
        .collect();
    let mut on_row_token = |id: RowId, token: u32, _: Option<&_>| on_token(id as usize, token);
    let mut batch = RunningBatch::new(config.pad_id);
    batch.join(model, requests, &mut on_row_token)?;
    let mut done = batch.take_finished()?;
    while batch.has_unfinished() {
        batch.step(model, &mut on_row_token)?;
        done.extend(batch.take_finished()?);
    }
    done.sort_by_key(|(id, _)| *id);
    // Row ids count from 0 in a fresh batch, so a failed row's error names its prompt.
    done.into_iter().map(|(_, result)| result).collect()
}
