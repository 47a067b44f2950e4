//! Log-probabilities of tokens under the model: what `onnx-steer score`, `generate --logprobs`
//! and the server's OpenAI `logprobs` report, and what perplexity averages.
//!
//! They are taken from the model's (steered) logits as the head produced them, before
//! temperature, top-k/top-p and penalties, as vLLM's default and OpenAI's `logprobs` do.

use serde::Serialize;

/// A token and its log-probability (natural log).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TokenLogprob {
    /// The token id.
    pub id: u32,
    /// `log softmax(logits)[id]`.
    pub logprob: f32,
}

/// One position of a sequence: the log-probability of its token, and the `k` most likely tokens
/// there (empty when no alternatives were asked for).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionLogprobs {
    /// The token at this position (chosen by the sampler, or given by the caller).
    pub token: TokenLogprob,
    /// The most likely tokens at this position, most likely first (lower id first on ties).
    pub top: Vec<TokenLogprob>,
}

/// The log-softmax of one row of logits, computed stably in f64 once and read per token.
#[derive(Debug, Clone, Copy)]
pub struct LogSoftmax<'a> {
    logits: &'a [f32],
    /// The largest logit, and `ln Σ exp(l - max)`: kept apart so that huge logits keep precision.
    max: f64,
    log_sum: f64,
}

impl<'a> LogSoftmax<'a> {
    /// `None` when the logits are empty or any is NaN or infinite (the row cannot be scored).
    pub fn new(logits: &'a [f32]) -> Option<Self> {
        if logits.is_empty() || logits.iter().any(|x| !x.is_finite()) {
            return None;
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
        Some(Self {
            logits,
            max,
            log_sum: sum.ln(),
        })
    }

    fn at(&self, logit: f32) -> f64 {
        (logit as f64 - self.max) - self.log_sum
    }

    /// The log-probability of `id` (f64), or `None` if it is outside the vocabulary.
    pub fn of(&self, id: u32) -> Option<f64> {
        self.logits.get(id as usize).map(|&l| self.at(l))
    }

    /// The `k` most likely tokens, most likely first; ties keep the lower id first.
    pub fn top(&self, k: usize) -> Vec<TokenLogprob> {
        let k = k.min(self.logits.len());
        if k == 0 {
            return Vec::new();
        }
        let mut ids: Vec<u32> = (0..self.logits.len() as u32).collect();
        let order = |a: &u32, b: &u32| {
            let (la, lb) = (self.logits[*a as usize], self.logits[*b as usize]);
            lb.total_cmp(&la).then(a.cmp(b))
        };
        if k < ids.len() {
            ids.select_nth_unstable_by(k - 1, order);
            ids.truncate(k);
        }
        ids.sort_by(order);
        ids.into_iter()
            .map(|id| TokenLogprob {
                id,
                logprob: self.at(self.logits[id as usize]) as f32,
            })
            .collect()
    }

    /// `id`'s log-probability with the `k` most likely alternatives; `None` if `id` is outside
    /// the vocabulary.
    pub fn position(&self, id: u32, k: usize) -> Option<PositionLogprobs> {
        Some(PositionLogprobs {
            token: TokenLogprob {
                id,
                logprob: self.of(id)? as f32,
            },
            top: self.top(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_logits_cost_log_vocab() {
        let softmax = LogSoftmax::new(&[0.5; 4]).unwrap();
        assert!((softmax.of(2).unwrap() + 4f64.ln()).abs() < 1e-12);
        assert_eq!(softmax.of(4), None);
    }

    #[test]
    fn huge_logits_stay_finite() {
        let softmax = LogSoftmax::new(&[1e30, 0.0, 1e30]).unwrap();
        assert!((softmax.of(0).unwrap() + 2f64.ln()).abs() < 1e-9);
        assert!(softmax.of(1).unwrap() < -1e29);
    }

    #[test]
    fn top_is_sorted_with_ties_by_lower_id() {
        let logits = [1.0, 3.0, 2.0, 3.0, -1.0];
        let top = LogSoftmax::new(&logits).unwrap().top(3);
        let ids: Vec<u32> = top.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!(top[0].logprob >= top[2].logprob);
        assert_eq!(LogSoftmax::new(&logits).unwrap().top(99).len(), 5);
    }

    #[test]
    fn probabilities_sum_to_one() {
        let logits = [0.3, -2.0, 4.5, 1.25];
        let softmax = LogSoftmax::new(&logits).unwrap();
        let total: f64 = (0..4).map(|id| softmax.of(id).unwrap().exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn non_finite_logits_cannot_be_scored() {
        assert!(LogSoftmax::new(&[0.0, f32::NAN]).is_none());
        assert!(LogSoftmax::new(&[f32::INFINITY]).is_none());
        assert!(LogSoftmax::new(&[]).is_none());
    }
}
