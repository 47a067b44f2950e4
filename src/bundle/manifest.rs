//! The types of `manifest.json`, mirroring what `onnx_steer_export` writes (see
//! [`validate`](super::validate) for the checks they must pass).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The manifest format this runtime reads.
pub const FORMAT_VERSION: u32 = 3;

/// Weight and activation precision of a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Fp32,
    Fp16,
}

/// Model hyper-parameters, named as in HF `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// HF `rope_scaling.rope_type` (the positions graph already applies it).
    #[serde(default)]
    pub rope_type: Option<RopeType>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

/// Where the tokenizer and chat template live inside the bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerFiles {
    pub file: String,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub bos_token: Option<String>,
    #[serde(default)]
    pub eos_token: Option<String>,
}

/// The vision side of a vision-language bundle (LLaVA): what the runtime needs to turn images into
/// embeddings and splice them into the prompt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VisionConfig {
    /// HF `model_type` of the whole model (`llava`).
    pub architecture: String,
    /// The placeholder token the chat template emits once per image.
    pub image_token_id: u32,
    /// Embeddings per image: each placeholder expands to this many image tokens.
    pub image_tokens: usize,
    /// How positions count over image tokens: `sequential` (1-D, the text layer interface) is the
    /// one this runtime runs; M-RoPE models would declare another and need another layer interface.
    pub positions: VisionPositions,
    /// The HF image processor's settings.
    pub processor: ImageProcessorConfig,
}

/// HF image-processor settings (`preprocessor_config.json`), the steps [`crate::vision`] reproduces.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageProcessorConfig {
    #[serde(default = "yes")]
    pub do_convert_rgb: bool,
    /// Pad to a square filled with the mean colour before resizing (LLaVA's `do_pad`).
    #[serde(default)]
    pub do_pad: bool,
    pub do_resize: bool,
    pub size: ImageSize,
    pub resample: Resample,
    pub do_center_crop: bool,
    #[serde(default)]
    pub crop_size: Option<ImageSize>,
    pub do_rescale: bool,
    pub rescale_factor: f64,
    pub do_normalize: bool,
    #[serde(default)]
    pub image_mean: Vec<f32>,
    #[serde(default)]
    pub image_std: Vec<f32>,
}

fn yes() -> bool {
    true
}

/// A resize or crop size as HF writes it: `shortest_edge`, or `height` and `width`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageSize {
    #[serde(default)]
    pub shortest_edge: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub width: Option<u32>,
}

impl ImageSize {
    /// `(height, width)` when both are given.
    pub fn fixed(&self) -> Option<(u32, u32)> {
        self.height.zip(self.width)
    }
}

/// Resampling filter of the resize (Pillow's, which HF uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resample {
    Bilinear,
    Bicubic,
}

/// What a segment graph computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegmentKind {
    Embed,
    /// The attention mask and rotary tables of a step, computed once and fed to every layer.
    Positions,
    Layer,
    /// The final norm of the last position (between the layers and the LM head).
    Norm,
    Head,
    Full,
    Vision,
    Projector,
}

/// A graph input or output: symbolic dims are strings, fixed dims are numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<serde_json::Value>,
}

/// One ONNX graph of the chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Segment {
    pub kind: SegmentKind,
    #[serde(default)]
    pub index: Option<usize>,
    pub file: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Size and digest of one bundle file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub sha256: String,
    pub bytes: u64,
}

/// The parsed `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    #[serde(default)]
    pub source: String,
    pub dtype: Dtype,
    #[serde(default)]
    pub opset: Option<u32>,
    pub model: ModelConfig,
    pub tokenizer: TokenizerFiles,
    /// Present in vision-language bundles: image processing and the image placeholder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionConfig>,
    pub segments: Vec<Segment>,
    #[serde(default)]
    pub monolithic: Option<Segment>,
    pub files: BTreeMap<String, FileEntry>,
    /// Set when MatMul weights were quantized after export (`python -m onnx_steer_export quantize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<QuantizedWeights>,
}

/// How a quantized bundle's MatMul weights are stored (activations keep [`Manifest::dtype`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantizedWeights {
    /// ONNX Runtime `MatMulNBits` bits.
    pub format: WeightFormat,
    /// Weights sharing one scale.
    pub block_size: usize,
    /// MatMulNBits compute type (4: int8 activations).
    pub accuracy_level: u32,
    /// Blocks without zero points.
    #[serde(default)]
    pub symmetric: bool,
    /// The LM head's format where it differs (`int8` in an int4 bundle).
    #[serde(default)]
    pub head: Option<WeightFormat>,
    /// The float bundle this one was quantized from.
    #[serde(default)]
    pub quantized_from: String,
}

/// HF's rotary-embedding variants (`ROPE_INIT_FUNCTIONS` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeType {
    /// Plain RoPE.
    Default,
    /// Position interpolation.
    Linear,
    /// Dynamic NTK scaling.
    Dynamic,
    /// YaRN.
    Yarn,
    /// LongRoPE (Phi-3).
    Longrope,
    /// Llama 3.1 frequency scaling.
    Llama3,
}

/// How quantized MatMul weights are stored (ONNX Runtime `MatMulNBits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// 4-bit blocks.
    Int4,
    /// 8-bit blocks.
    Int8,
}

/// How positions count over a prompt's image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VisionPositions {
    /// 1-D positions, one per token (LLaVA): the text layer interface runs them.
    Sequential,
    /// Qwen2-VL's 3-D M-RoPE, which needs another layer interface; declared so that a bundle can
    /// say it, and refused by [`Manifest::validate`].
    Mrope,
}
