//! onnx-steer: run decoder LLMs exported one decoder layer per ONNX segment, chained by ONNX
//! Runtime, with steering interventions between the segments.
//!
//! The modules read as the pipeline, and imports run one way (each uses only those below it):
//!
//! | module | owns |
//! | --- | --- |
//! | [`bundle`] | what is on disk: the manifest, its validation, verified file reads |
//! | [`runtime`] | ONNX Runtime: the library, the execution provider, sessions, tensor values |
//! | [`chain`] | the model: segment sessions in order, the KV cache, where steering hooks in |
//! | [`steer`] | steer specs, resolving them against a model, per-row steering of a batch |
//! | [`generate`] | the running batch, sampling, stop rules, one-shot generation |
//! | [`text`], [`vision`] | prompts to ids and back; images to embeddings spliced into a prompt |
//! | [`tools`] | bench, perplexity and capture: library code behind CLI subcommands |
//! | [`server`] | the OpenAI-compatible HTTP server and its engine thread |
//!
//! Each module has its own error enum; [`Error`] wraps them.

#![warn(missing_docs)]

pub mod bundle;
pub mod chain;
mod error;
pub mod generate;
pub mod runtime;
pub mod server;
pub mod steer;
pub mod text;
pub mod tools;
pub mod vision;

pub use bundle::{Bundle, BundleError};
pub use chain::{CausalLm, ModelError, Monolithic, SegmentChain};
pub use error::Error;
pub use generate::{generate, GenerateError, Generated, GenerationConfig, Sampling};
pub use runtime::{ExecutionProvider, Runtime, RuntimeError, RuntimeOptions};
pub use steer::{SteerError, SteerSpec};
pub use text::{TextCodec, TextError};
pub use vision::{VisionEncoder, VisionError};
