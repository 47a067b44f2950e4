//! Residual-stream capture for training steering methods: one unsteered prefill per batch of
//! prompts, keeping the chosen layers' outputs at the chosen positions.

use crate::chain::{CausalLm, ModelError, Prompt, SegmentChain, Step};
use crate::runtime::values::Pooling;
use crate::steer::vector::write_f32_tensors;
use crate::steer::SteerError;

/// Which positions of each prompt are recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureTokens {
    /// Each prompt's last token: `[N, d]` per layer.
    Last,
    /// Every real (unpadded) token: `[total, d]` per layer, plus each prompt's length.
    All,
    /// The mean over each prompt's real tokens: `[N, d]` per layer (what a mean-pooling prober reads).
    Mean,
}

/// The recorded states: for each layer, the rows of every prompt's chosen positions, in order.
#[derive(Debug)]
pub struct Captured {
    layers: Vec<usize>,
    states: Vec<Vec<f32>>,
    lengths: Vec<f32>,
    tokens: CaptureTokens,
    hidden: usize,
}

impl Captured {
    /// Prompts recorded.
    pub fn prompts(&self) -> usize {
        self.lengths.len()
    }

    /// Write tensors `layer.{L}` (and `lengths` [N] for [`CaptureTokens::All`]) to a
    /// `.safetensors` file.
    pub fn write(&self, path: &std::path::Path) -> Result<(), SteerError> {
        let d = self.hidden;
        let mut tensors: Vec<(String, Vec<usize>, &[f32])> = self
            .layers
            .iter()
            .zip(&self.states)
            .map(|(layer, data)| {
                (
                    format!("layer.{layer}"),
                    vec![data.len() / d, d],
                    data.as_slice(),
                )
            })
            .collect();
        if self.tokens == CaptureTokens::All {
            tensors.push((
                "lengths".into(),
                vec![self.prompts()],
                self.lengths.as_slice(),
            ));
        }
        write_f32_tensors(path, &tensors)
    }
}

/// Run `prompts` through `chain` in batches of `batch_size` (left-padded with `pad`) and record the
/// outputs of `layers` at `tokens`, in the prompts' order; `on_batch(n)` follows progress.
///
/// Batches are formed from the prompts sorted by length, so that little of a batch is padding.
pub fn capture(
    chain: &mut SegmentChain,
    prompts: &[Prompt],
    layers: &[usize],
    tokens: CaptureTokens,
    batch_size: usize,
    pad: u32,
    mut on_batch: impl FnMut(usize),
) -> Result<Captured, ModelError> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].ids.len());
    // Per layer, each prompt's rows, filled in batch order and read back in prompt order.
    let mut rows: Vec<Vec<Vec<f32>>> = vec![vec![Vec::new(); prompts.len()]; layers.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<Prompt> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let step = Step::for_prompts(&batch, pad);
        let captured = chain.capture(&step, layers)?;
        for (slot, layer_states) in captured.iter().enumerate() {
            let width = layer_states.dim().1;
            for (r, &index) in chunk.iter().enumerate() {
                let prompt =
                    layer_states.slice(ndarray::s![r, width - prompts[index].ids.len().., ..]);
                rows[slot][index] = match tokens {
                    CaptureTokens::Last => Pooling::Last.reduce(prompt).to_vec(),
                    CaptureTokens::All => prompt.iter().copied().collect(),
                    CaptureTokens::Mean => Pooling::Mean.reduce(prompt).to_vec(),
                };
            }
        }
        on_batch(chunk.len());
    }
    let states = rows.into_iter().map(|layer| layer.concat()).collect();
    Ok(Captured {
        layers: layers.to_vec(),
        states,
        lengths: prompts.iter().map(|p| p.ids.len() as f32).collect(),
        tokens,
        hidden: chain.config().hidden_size,
    })
}
