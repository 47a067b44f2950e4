//! [`Error`]: any error of the library, one variant per module.

use crate::{
    BundleError, GenerateError, ModelError, RuntimeError, SteerError, TextError, VisionError,
};

/// Any error of the library, one variant per layer of the system.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or reading a bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// Loading ONNX Runtime or creating a session.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Loading or running the model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Tokenizing or rendering the chat template.
    #[error(transparent)]
    Text(#[from] TextError),
    /// Generating.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// A steer spec or a file it names.
    #[error(transparent)]
    Steer(#[from] SteerError),
    /// Images and the vision encoder.
    #[error(transparent)]
    Vision(#[from] VisionError),
}
