//! Token generation over any [`CausalLm`](crate::chain::CausalLm): the running batch that rows
//! join and leave ([`batch`]), how each next token is chosen ([`sampling`]), what a row returns
//! ([`result`]), the one-shot [`generate`] the CLI uses ([`oneshot`]), and teacher-forced
//! [`score`]s of given continuations, with the [`logprobs`] both report.
//!
//! Imports run one way: `oneshot` → `batch` → `sampling`, `result`, `logprobs`; `score` →
//! `logprobs`.

pub mod batch;
pub mod logprobs;
pub mod oneshot;
pub mod prefix_cache;
pub mod result;
pub mod sampling;
pub mod score;

use crate::chain::{ModelError, Prompt};
pub use batch::{Joining, KvSlots, KvUsage, RowId, RowRequest, RowResult, RunningBatch};
pub use logprobs::{LogSoftmax, PositionLogprobs, TokenLogprob};
pub use oneshot::generate;
pub use result::{FinishReason, Generated};
pub use sampling::{Penalties, Sampling};
pub use score::{score, ScoreOptions, ScoreRequest, Scored};

/// Why a generation request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The batch has no rows.
    #[error("no prompts given")]
    EmptyBatch,
    /// A prompt has no tokens.
    #[error("prompt {row} is empty after tokenization")]
    EmptyPrompt {
        /// The row.
        row: usize,
    },
    /// A prompt leaves no room in the context for a generated token ([`check_prompt_length`]).
    #[error("prompt {row} has {tokens} tokens but the model's context is {context} and must leave room for at least one new token; shorten it")]
    PromptTooLong {
        /// The row.
        row: usize,
        /// Its tokens.
        tokens: usize,
        /// The model's context (`max_position_embeddings`).
        context: usize,
    },
    /// A prompt and its continuation to score do not fit in the context.
    #[error("row {row}: prompt and continuation have {tokens} tokens, more than the model's context of {context}")]
    SequenceTooLong {
        /// The row.
        row: usize,
        /// Prompt plus continuation tokens.
        tokens: usize,
        /// The model's context (`max_position_embeddings`).
        context: usize,
    },
    /// Temperature or top-p out of range.
    #[error("invalid sampling settings: {0}")]
    Sampling(String),
    /// The model produced NaN or infinite logits for a row; the row ends instead of sampling garbage.
    #[error("row {row}: the model produced non-finite logits at generated token {token} (steering too strong for this row, or a graph that overflows)")]
    NonFiniteLogits {
        /// The row (its index in the batch call, or its id in a running batch).
        row: u64,
        /// How many tokens the row had generated.
        token: usize,
    },
    /// Stop strings need the tokenizer to see the text: [`RunningBatch::with_text`].
    #[error("stop strings were given but the batch has no tokenizer to detect them")]
    StopStringsWithoutText,
    /// The batch's shared state was lost after an earlier failure; its rows cannot continue.
    #[error(
        "the running batch lost its KV cache after an earlier failure; its rows cannot continue"
    )]
    LostState,
    /// A group was begun while another is still being prefilled in chunks.
    #[error("a group is already being prefilled in chunks; finish it first (advance_join)")]
    JoinPending,
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Settings of one generation call.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Most tokens each row generates.
    pub max_new_tokens: usize,
    /// How each next token is chosen.
    pub sampling: Sampling,
    /// Token ids that end a row (the model's EOS ids).
    pub stop_ids: Vec<u32>,
    /// Filler for left padding and for rows that already stopped.
    pub pad_id: u32,
    /// Presence and frequency penalties.
    pub penalties: Penalties,
    /// Report each token's log-probability with this many alternatives (`None`: none).
    pub logprobs: Option<usize>,
}

/// The one prompt-length rule of the library, the engine and the server: a prompt must be
/// non-empty and leave room in the context for at least one generated token.
pub fn check_prompt_length(row: usize, tokens: usize, context: usize) -> Result<(), GenerateError> {
    if tokens == 0 {
        return Err(GenerateError::EmptyPrompt { row });
    }
    if tokens >= context {
        return Err(GenerateError::PromptTooLong {
            row,
            tokens,
            context,
        });
    }
    Ok(())
}

/// Check a batch before any model work: non-empty, and every prompt fits [`check_prompt_length`].
pub fn validate_prompts(prompts: &[Prompt], context: usize) -> Result<(), GenerateError> {
    if prompts.is_empty() {
        return Err(GenerateError::EmptyBatch);
    }
    for (row, prompt) in prompts.iter().enumerate() {
        check_prompt_length(row, prompt.ids.len(), context)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_must_leave_room_for_one_token() {
        assert!(check_prompt_length(0, 7, 8).is_ok());
        let full = check_prompt_length(0, 8, 8).unwrap_err();
        assert!(
            matches!(full, GenerateError::PromptTooLong { tokens: 8, .. }),
            "{full}"
        );
        assert!(matches!(
            check_prompt_length(3, 0, 8),
            Err(GenerateError::EmptyPrompt { row: 3 })
        ));
    }
}
