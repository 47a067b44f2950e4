//! Images in: decoding and HF-exact preprocessing ([`preprocess`]), the vision and projector
//! graphs, and splicing image embeddings over the prompt's placeholders ([`encoder`]).
//!
//! Data flows file bytes → [`decode`] → [`ImageProcessor::preprocess`] → [`VisionEncoder::embed`]
//! → [`VisionEncoder::prompt`] (a [`crate::chain::Prompt`] whose images replace the placeholder
//! embeddings before layer 0, so every steering intervention sees the spliced residual stream).

pub mod encoder;
pub mod preprocess;

pub use encoder::VisionEncoder;
pub use preprocess::{decode, ImageProcessor, MAX_IMAGE_PIXELS};

use crate::chain::ModelError;

/// Why an image could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("image {name} could not be decoded (truncated or corrupt?): {source}")]
    Decode {
        name: String,
        #[source]
        source: image::ImageError,
    },
    #[error("image {name} is not PNG, JPEG or WebP (detected: {})", format.as_deref().unwrap_or("unknown"))]
    UnsupportedFormat {
        name: String,
        format: Option<String>,
    },
    #[error("image {name} is empty ({width}x{height} pixels)")]
    Empty {
        name: String,
        width: u32,
        height: u32,
    },
    #[error("image {name} is {width}x{height} pixels, more than the limit of {limit} pixels")]
    TooLarge {
        name: String,
        width: u32,
        height: u32,
        limit: u64,
    },
    #[error("could not read image {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("this bundle is text-only: images need a vision-language bundle (export a LLaVA checkpoint with --source hf:DIR)")]
    TextOnlyBundle,
    #[error("{images} image(s) given but the prompt has {placeholders} image placeholder(s); with --chat each image gets one, a raw prompt needs one <image> per image")]
    PlaceholderMismatch { images: usize, placeholders: usize },
    #[error("the bundle's image processor is not supported: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
}
