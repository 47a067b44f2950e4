//! What one forward step feeds the model: token ids, positions and the attention mask of each row,
//! and the image embeddings spliced over a prompt's placeholders.

use std::sync::Arc;

use ndarray::Array2;

use super::{KvCache, ModelError};

/// Image embeddings `[n, d]` that replace the token embeddings of a run of `n` image
/// placeholders starting at `start` (made by [`crate::vision::VisionEncoder`]).
#[derive(Debug, Clone)]
pub struct ImageEmbeds {
    /// Index of the first placeholder token it replaces.
    pub start: usize,
    /// The embeddings, `[n, hidden_size]`, one row per placeholder.
    pub embeds: Arc<Array2<f32>>,
}

/// A tokenized prompt and the images spliced into it (none for text).
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    /// Token ids, image placeholders included.
    pub ids: Vec<u32>,
    /// Image embeddings spliced over runs of placeholders, in prompt order.
    pub images: Vec<ImageEmbeds>,
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Self {
            ids,
            images: Vec::new(),
        }
    }
}

/// The tensors of one forward step: `T` new tokens for each of `B` rows.
///
/// `attention_mask` covers the cached tokens plus the new ones (`[B, P+T]`, P the longest row's
/// cached length); zeros mark padding, and a row's new token sits at its own length.
/// `images` are `(row, embeddings)` spliced over the token embeddings before layer 0 (prefill only).
#[derive(Debug, Clone)]
pub struct Step {
    /// `[B, T]` ids of the new tokens.
    pub input_ids: Array2<i64>,
    /// `[B, T]` position of each new token, counted from its row's first real token.
    pub position_ids: Array2<i64>,
    /// `[B, P+T]`: 1 for real tokens (cached and new), 0 for padding.
    pub attention_mask: Array2<i64>,
    /// `(row, embeddings)` spliced over the token embeddings before layer 0 (prefill only).
    pub images: Vec<(usize, ImageEmbeds)>,
}

impl Step {
    /// [`Step::left_padded`] for prompts with images: each image moves with its row's padding.
    pub fn for_prompts(prompts: &[Prompt], pad_id: u32) -> Self {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let mut step = Self::left_padded(&ids, pad_id);
        let width = step.input_ids.ncols();
        for (row, prompt) in prompts.iter().enumerate() {
            let offset = width - prompt.ids.len();
            step.images.extend(prompt.images.iter().map(|image| {
                let mut image = image.clone();
                image.start += offset;
                (row, image)
            }));
        }
        step
    }

    /// The prefill step of a batch: prompts left-padded with `pad_id` to the longest, positions
    /// counted from each prompt's first real token, padding masked out.
    pub fn left_padded(prompts: &[Vec<u32>], pad_id: u32) -> Self {
        let batch = prompts.len();
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut input_ids = Array2::<i64>::from_elem((batch, width), pad_id as i64);
        let mut attention_mask = Array2::<i64>::zeros((batch, width));
        let mut position_ids = Array2::<i64>::zeros((batch, width));
        for (r, prompt) in prompts.iter().enumerate() {
            let offset = width - prompt.len();
            for (t, &id) in prompt.iter().enumerate() {
                input_ids[[r, offset + t]] = id as i64;
                attention_mask[[r, offset + t]] = 1;
                position_ids[[r, offset + t]] = t as i64;
            }
        }
        Self {
            input_ids,
            position_ids,
            attention_mask,
            images: Vec::new(),
        }
    }

    pub(super) fn check(&self, cache: &KvCache) -> Result<(), ModelError> {
        let (batch, tokens) = self.input_ids.dim();
        if self.position_ids.dim() != (batch, tokens) {
            return Err(ModelError::Shape(format!(
                "position_ids is {:?}, input_ids is {:?}",
                self.position_ids.dim(),
                (batch, tokens)
            )));
        }
        let past = cache.longest();
        if self.attention_mask.dim() != (batch, past + tokens) {
            return Err(ModelError::Shape(format!(
                "attention_mask is {:?}, expected ({batch}, {past} cached + {tokens} new)",
                self.attention_mask.dim(),
            )));
        }
        // Rows of different lengths append one token each, each at its own end; several tokens
        // per row need the rows to start from one length.
        if tokens > 1 && cache.lengths().iter().any(|&length| length != past) {
            return Err(ModelError::Shape(format!(
                "{tokens} new tokens per row need rows of one cached length, not {:?}",
                cache.lengths()
            )));
        }
        if cache.batch() != batch {
            return Err(ModelError::Shape(format!(
                "cache holds {} rows, step has {batch}",
                cache.batch()
            )));
        }
        for (row, image) in &self.images {
            if *row >= batch || image.start + image.embeds.nrows() > tokens {
                return Err(ModelError::Shape(format!(
                    "image embeddings at row {row}, tokens {}..{} fall outside the {batch}x{tokens} step",
                    image.start,
                    image.start + image.embeds.nrows()
                )));
            }
        }
        Ok(())
    }
}
