//! Token generation over any [`CausalLm`](crate::chain::CausalLm): the running batch that rows
//! join and leave ([`batch`]), how each next token is chosen ([`sampling`]), what a row returns
//! ([`result`]) and the one-shot [`generate`] the CLI uses ([`oneshot`]).
//!
//! Imports run one way: `oneshot` → `batch` → `sampling`, `result`.

pub mod batch;
pub mod oneshot;
pub mod result;
pub mod sampling;

use crate::chain::{ModelError, Prompt};
pub use batch::{RowId, RowRequest, RunningBatch};
pub use oneshot::generate;
pub use result::{FinishReason, Generated};
pub use sampling::Sampling;

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
