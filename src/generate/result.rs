//! What a generated row returns.

use super::logprobs::PositionLogprobs;
use crate::steer::Decision;

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop id was produced (it is not included in the output), or the text reached a stop
    /// string.
    Stop,
    /// `max_new_tokens` or the model context was reached.
    Length,
}

/// One row's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generated {
    /// The generated ids, stop id excluded (with a stop string, up to the token that completed it).
    pub token_ids: Vec<u32>,
    /// Each generated token's log-probability and alternatives, when the request asked for them
    /// ([`crate::generate::RowRequest::logprobs`]); a row that stopped on an end-of-sequence
    /// token reports that token last, one more entry than `token_ids`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<PositionLogprobs>,
    /// The prompt tokens' log-probabilities after the first, when the request asked for them
    /// ([`crate::generate::RowRequest::prompt_logprobs`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prompt_logprobs: Vec<PositionLogprobs>,
    /// Why the row stopped.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Time of the prefill step this row took part in.
    pub prefill_ms: f64,
    /// Time of the decode steps while this row was generating.
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
