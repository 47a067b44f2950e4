//! onnx-steer: run decoder LLMs exported one decoder layer per ONNX segment, chained by ONNX
//! Runtime, with room for steering interventions between the segments.
//!
//! Data flows `bundle` (what is on disk) → `runtime` (ONNX Runtime and its provider) → `model`
//! (the segment chain and KV cache) → `batch` (rows that decode together, joining and leaving)
//! → `generate` (sampling, stop rules), with `text` turning prompts into ids and back and `vision`
//! turning images into embeddings spliced over the prompt's image placeholders. Each layer has its own error enum; [`Error`] wraps them.

pub mod batch;
pub mod bench;
pub mod bundle;
pub mod generate;
pub mod model;
pub mod perplexity;
pub mod profile;
pub mod runtime;
pub mod server;
pub mod steer;
pub mod text;
pub mod vision;

pub use bundle::{Bundle, BundleError};
pub use generate::{generate, GenerateError, Generated, GenerationConfig, Sampling};
pub use model::{CausalLm, ModelError, Monolithic, SegmentChain};
pub use runtime::{ExecutionProvider, Runtime, RuntimeError, RuntimeOptions};
pub use steer::{SteerError, SteerSpec};
pub use text::{TextCodec, TextError};
pub use vision::{VisionEncoder, VisionError};

/// Any error of the library, one variant per layer of the system.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error(transparent)]
    Generate(#[from] GenerateError),
    #[error(transparent)]
    Steer(#[from] SteerError),
    #[error(transparent)]
    Vision(#[from] VisionError),
}
