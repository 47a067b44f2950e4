//! Teacher-forced perplexity of a token sequence under a model: the quality check that a
//! lower-precision bundle (fp16, int8, int4) is compared with its fp32 source on.

use ndarray::Array2;
use serde::Serialize;

use crate::chain::{CausalLm, FixedDeltas, ModelError, Step};
use crate::generate::LogSoftmax;

/// Mean negative log-likelihood of each next token, and its exponential.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Perplexity {
    /// Tokens scored (the sequence length minus the first token).
    pub tokens: usize,
    /// Mean negative log-likelihood per scored token, in nats.
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
}

/// Score `ids` one token per step (the decode path, so the KV cache is exercised as in generation).
///
/// Use at least two ids; `progress` is called once per scored token.
pub fn perplexity(
    model: &mut dyn CausalLm,
    ids: &[u32],
    mut progress: impl FnMut(),
) -> Result<Perplexity, ModelError> {
    if ids.len() < 2 {
        return Err(ModelError::Shape(format!(
            "perplexity needs at least 2 tokens, got {}",
            ids.len()
        )));
    }
    let mut cache = model.new_cache(1)?;
    let mut hook = FixedDeltas(Vec::new());
    let mut total = 0.0f64;
    for (position, pair) in ids.windows(2).enumerate() {
        let step = Step {
            input_ids: Array2::from_elem((1, 1), i64::from(pair[0])),
            position_ids: Array2::from_elem((1, 1), position as i64),
            attention_mask: Array2::ones((1, position + 1)),
            images: Vec::new(),
        };
        let logits = model.forward(&step, &mut cache, &mut hook)?;
        total += negative_log_likelihood(logits.row(0).as_slice().unwrap_or(&[]), pair[1])?;
        progress();
    }
    let tokens = ids.len() - 1;
    let mean_nll = total / tokens as f64;
    Ok(Perplexity {
        tokens,
        mean_nll,
        perplexity: mean_nll.exp(),
    })
}

/// `-log softmax(logits)[target]`, computed stably in f64.
fn negative_log_likelihood(logits: &[f32], target: u32) -> Result<f64, ModelError> {
    let softmax = LogSoftmax::new(logits)
        .ok_or_else(|| ModelError::NotFinite(format!("logits before token {target}")))?;
    let logprob = softmax.of(target).ok_or_else(|| {
        ModelError::Shape(format!(
            "token {target} is outside the {} logits",
            logits.len()
        ))
    })?;
    Ok(-logprob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_target_and_nan_are_errors() {
        assert!(negative_log_likelihood(&[0.0; 3], 3).is_err());
        assert!(negative_log_likelihood(&[f32::NAN, 0.0], 1).is_err());
        assert!(negative_log_likelihood(&[30.0, 0.0], 1).unwrap() > 29.0);
    }
}
