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
    /// The bytes could not be decoded (truncated or corrupt).
    #[error("image {name} could not be decoded (truncated or corrupt?): {source}")]
    Decode {
        /// Which image (a file name, or `image_url[i]`).
        name: String,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// The image is not PNG, JPEG or WebP.
    #[error("image {name} is not PNG, JPEG or WebP (detected: {})", format.as_deref().unwrap_or("unknown"))]
    UnsupportedFormat {
        /// Which image.
        name: String,
        /// The format detected, if any.
        format: Option<String>,
    },
    /// The image has no pixels.
    #[error("image {name} is empty ({width}x{height} pixels)")]
    Empty {
        /// Which image.
        name: String,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The image has more pixels than [`MAX_IMAGE_PIXELS`].
    #[error("image {name} is {width}x{height} pixels, more than the limit of {limit} pixels")]
    TooLarge {
        /// Which image.
        name: String,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The pixel limit.
        limit: u64,
    },
    /// An image file could not be read.
    #[error("could not read image {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Images were given, but the bundle has no vision graphs.
    #[error("this bundle is text-only: images need a vision-language bundle (export a LLaVA checkpoint with --source hf:DIR)")]
    TextOnlyBundle,
    /// The number of images differs from the number of image placeholder tokens in the prompt.
    #[error("{images} image(s) given but the prompt has {placeholders} image placeholder(s); with --chat each image gets one, a raw prompt needs one <image> per image")]
    PlaceholderMismatch {
        /// Images given.
        images: usize,
        /// Image placeholder tokens in the prompt.
        placeholders: usize,
    },
    /// The bundle's image processor asks for a step this runtime does not reproduce.
    #[error("the bundle's image processor is not supported: {0}")]
    Unsupported(String),
    /// A vision or projector graph could not be loaded or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// ONNX Runtime could not set up a session or convert a tensor.
    #[error(transparent)]
    Runtime(#[from] crate::runtime::RuntimeError),
}
