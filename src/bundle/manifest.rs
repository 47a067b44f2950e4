//! The types of `manifest.json`, mirroring what `onnx_steer_export` writes (see
//! [`validate`](super::validate) for the checks they must pass).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The manifest format this runtime reads.
pub const FORMAT_VERSION: u32 = 4;

/// Weight and activation precision of a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float (`float32`) graphs.
    Fp32,
    /// 16-bit float (`float16`) graphs; the head still returns fp32 logits.
    Fp16,
}

/// Model hyper-parameters, named as in HF `config.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    /// HF `model_type` (`llama`, `qwen2`; `llava` for a vision-language bundle).
    pub architecture: String,
    /// Width of the residual stream (HF `hidden_size`).
    pub hidden_size: usize,
    /// Decoder layers (HF `num_hidden_layers`), one layer segment each.
    pub num_layers: usize,
    /// Query heads per layer.
    pub num_attention_heads: usize,
    /// Key-value heads per layer (fewer than query heads under grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Tokens in the vocabulary: rows of the embedding, columns of the logits.
    pub vocab_size: usize,
    /// The context length: prompt plus generated tokens must fit in it.
    pub max_position_embeddings: usize,
    /// Base of the rotary frequencies, when the config gives one (the positions graph already
    /// applies it).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// HF `rope_scaling.rope_type` (the positions graph already applies it).
    #[serde(default)]
    pub rope_type: Option<RopeType>,
    /// Beginning-of-sequence token id, if the model has one.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// Token ids that end generation (from the generation config, else the tokenizer); never empty.
    pub eos_token_ids: Vec<u32>,
    /// The tokenizer's padding token id, if it has one.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

/// Where the tokenizer and chat template live inside the bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerFiles {
    /// The HF `tokenizer.json`, relative to the bundle directory.
    pub file: String,
    /// The Jinja chat template file, if the model has a template.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Text of the BOS token, passed to the chat template as `bos_token`.
    #[serde(default)]
    pub bos_token: Option<String>,
    /// Text of the EOS token, passed to the chat template as `eos_token`.
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
    /// Convert to RGB first (default true; [`crate::vision::decode`] always yields RGB).
    #[serde(default = "yes")]
    pub do_convert_rgb: bool,
    /// Pad to a square filled with the mean colour before resizing (LLaVA's `do_pad`).
    #[serde(default)]
    pub do_pad: bool,
    /// Resize to `size` with `resample`.
    pub do_resize: bool,
    /// Resize target: `shortest_edge` (aspect ratio kept) or a fixed `height` and `width`.
    pub size: ImageSize,
    /// Resampling filter of the resize.
    pub resample: Resample,
    /// Crop the centre to `crop_size` after resizing.
    pub do_center_crop: bool,
    /// Centre-crop size (`height` and `width`).
    #[serde(default)]
    pub crop_size: Option<ImageSize>,
    /// Multiply pixel values by `rescale_factor`.
    pub do_rescale: bool,
    /// Pixel scale, usually 1/255.
    pub rescale_factor: f64,
    /// Subtract `image_mean` and divide by `image_std`, per channel.
    pub do_normalize: bool,
    /// Per-channel (RGB) mean, in rescaled units; also the `do_pad` fill colour.
    #[serde(default)]
    pub image_mean: Vec<f32>,
    /// Per-channel (RGB) standard deviation, in rescaled units.
    #[serde(default)]
    pub image_std: Vec<f32>,
}

fn yes() -> bool {
    true
}

/// A resize or crop size as HF writes it: `shortest_edge`, or `height` and `width`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageSize {
    /// Scale the shorter edge to this many pixels, keeping the aspect ratio.
    #[serde(default)]
    pub shortest_edge: Option<u32>,
    /// Fixed height in pixels (with `width`).
    #[serde(default)]
    pub height: Option<u32>,
    /// Fixed width in pixels (with `height`).
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
    /// Pillow's `BILINEAR` (HF `resample=2`).
    Bilinear,
    /// Pillow's `BICUBIC` (HF `resample=3`).
    Bicubic,
}

/// What a segment graph computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SegmentKind {
    /// Token ids to embeddings (`embed.onnx`).
    Embed,
    /// The attention mask and rotary tables of a step, computed once and fed to every layer.
    Positions,
    /// One decoder layer, with its KV cache and steering delta (`layer_NN.onnx`).
    Layer,
    /// The final norm of the last position (between the layers and the LM head).
    Norm,
    /// The LM head: the normed last position to logits (`head.onnx`).
    Head,
    /// The whole model in one graph, the monolithic baseline (`full.onnx`).
    Full,
    /// The vision tower: pixel values to image features (`vision.onnx`).
    Vision,
    /// Image features to image embeddings of the text model's width (`projector.onnx`).
    Projector,
}

/// A graph input or output: symbolic dims are strings, fixed dims are numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Name of the input or output in the graph.
    pub name: String,
    /// ONNX element type (`float32`, `float16`, `int64`).
    pub dtype: String,
    /// Dimensions: a string names a symbolic dim (`batch`), a number is fixed.
    pub shape: Vec<serde_json::Value>,
}

/// One ONNX graph of the chain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Segment {
    /// What the graph computes.
    pub kind: SegmentKind,
    /// The layer number; set for [`SegmentKind::Layer`] segments only.
    #[serde(default)]
    pub index: Option<usize>,
    /// The ONNX file, relative to the bundle directory.
    pub file: String,
    /// The file beside it that holds the graph's large initializers (ONNX external data, each at
    /// a page-aligned offset, which ONNX Runtime maps instead of copying); `None` when the
    /// weights are inside the graph file (bundles exported before weights files, tiny graphs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// Graph inputs, in graph order.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs, in graph order.
    pub outputs: Vec<TensorSpec>,
}

impl Segment {
    /// The graph file and, where there is one, its weights file.
    pub fn files(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.file).chain(self.weights.iter())
    }
}

/// Size and digest of one bundle file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    /// Hex sha256 of the contents, checked when the file is read.
    pub sha256: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// The parsed `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format; must equal [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Bundle name (the export directory's name).
    pub name: String,
    /// What the bundle was exported from (`gguf:PATH`, `hf:DIR`); empty if not recorded.
    #[serde(default)]
    pub source: String,
    /// Precision of the graphs.
    pub dtype: Dtype,
    /// ONNX opset the graphs were exported with.
    #[serde(default)]
    pub opset: Option<u32>,
    /// Model hyper-parameters.
    pub model: ModelConfig,
    /// Tokenizer and chat template files.
    pub tokenizer: TokenizerFiles,
    /// Present in vision-language bundles: image processing and the image placeholder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vision: Option<VisionConfig>,
    /// The chain's graphs: embed, positions, layers, norm and head, plus vision and projector in a
    /// vision-language bundle.
    pub segments: Vec<Segment>,
    /// The whole model as one graph (`full.onnx`), when exported with `--monolithic`.
    #[serde(default)]
    pub monolithic: Option<Segment>,
    /// Every bundle file by name, with its digest and size.
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

/// A model of `num_layers` layers with d=3, one head and a vocabulary of 5, for unit tests that
/// need a [`ModelConfig`] and no weights.
#[cfg(test)]
pub(crate) fn tiny_config(num_layers: usize) -> ModelConfig {
    serde_json::from_value(serde_json::json!({
        "architecture": "llama", "hidden_size": 3, "num_layers": num_layers, "num_attention_heads": 1,
        "num_key_value_heads": 1, "head_dim": 3, "vocab_size": 5, "max_position_embeddings": 8,
        "eos_token_ids": [0]
    }))
    .expect("the tiny test config parses")
}
