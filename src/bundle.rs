//! The bundle directory written by `export/`: `manifest.json` plus the files it lists.
//!
//! [`Manifest`] mirrors the JSON that `onnx_steer_export.bundle` writes; [`Bundle::open`] parses and
//! validates it so that everything after it can trust the shapes and file names.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest format this runtime reads.
pub const FORMAT_VERSION: u32 = 3;

/// Why a bundle could not be opened or one of its files could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle directory {0} does not exist; export one with `python -m onnx_steer_export export --source default --out {0}`")]
    MissingDir(PathBuf),
    #[error(
        "{0} has no manifest.json; is it a bundle directory written by `onnx_steer_export export`?"
    )]
    MissingManifest(PathBuf),
    #[error("manifest {path} is not valid: {source}")]
    ManifestSyntax {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("bundle file {0} is missing; re-export the bundle")]
    MissingFile(PathBuf),
    #[error("bundle file {path} is corrupt: sha256 is {actual}, manifest says {expected}; re-export the bundle")]
    Sha256Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("could not read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

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
    #[serde(default)]
    pub rope_type: Option<String>,
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
    pub positions: String,
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
    /// `int4` or `int8` (ONNX Runtime `MatMulNBits`).
    pub format: String,
    /// Weights sharing one scale.
    pub block_size: usize,
    /// MatMulNBits compute type (4: int8 activations).
    pub accuracy_level: u32,
    /// Blocks without zero points.
    #[serde(default)]
    pub symmetric: bool,
    /// The LM head's format where it differs (`int8` in an int4 bundle).
    #[serde(default)]
    pub head: Option<String>,
    /// The float bundle this one was quantized from.
    #[serde(default)]
    pub quantized_from: String,
}

/// An opened, validated bundle directory.
///
/// Use [`Bundle::open`] before anything else touches a bundle; [`Bundle::read_verified`] is how
/// the runtime reads a file, so a corrupt file is reported before ONNX Runtime sees it.
#[derive(Debug, Clone)]
pub struct Bundle {
    dir: PathBuf,
    manifest: Manifest,
}

impl Bundle {
    /// Parse `DIR/manifest.json` and check that it is complete and consistent.
    ///
    /// File contents are hashed later, when they are read ([`Bundle::read_verified`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(BundleError::MissingDir(dir));
        }
        let path = dir.join("manifest.json");
        if !path.is_file() {
            return Err(BundleError::MissingManifest(dir));
        }
        let text = std::fs::read_to_string(&path).map_err(|source| BundleError::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|source| BundleError::ManifestSyntax {
                path: path.clone(),
                source,
            })?;
        manifest
            .validate()
            .map_err(|problem| BundleError::Invalid { path, problem })?;
        let bundle = Self { dir, manifest };
        for name in bundle.manifest.files.keys() {
            let file = bundle.dir.join(name);
            if !file.is_file() {
                return Err(BundleError::MissingFile(file));
            }
        }
        Ok(bundle)
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Model hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.manifest.model
    }

    /// Absolute path of a file named in the manifest.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The segment of `kind` (the first one, for kinds that occur once).
    pub fn segment(&self, kind: SegmentKind) -> Option<&Segment> {
        self.manifest.segments.iter().find(|s| s.kind == kind)
    }

    /// Decoder layer segments, ordered by index.
    pub fn layers(&self) -> Vec<&Segment> {
        let mut layers: Vec<&Segment> = self
            .manifest
            .segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Layer)
            .collect();
        layers.sort_by_key(|s| s.index);
        layers
    }

    /// Bytes of the graphs a decode step streams in full (layers, final norm, head): the weight
    /// traffic per token at batch 1. The embedding is left out, as a step reads one row of it.
    pub fn decode_weight_bytes(&self) -> u64 {
        let streamed = [SegmentKind::Layer, SegmentKind::Norm, SegmentKind::Head];
        self.manifest
            .segments
            .iter()
            .filter(|s| streamed.contains(&s.kind))
            .filter_map(|s| self.manifest.files.get(&s.file))
            .map(|entry| entry.bytes)
            .sum()
    }

    /// Read a manifest-listed file and check its sha256; the bytes go straight to ONNX Runtime.
    pub fn read_verified(&self, file: &str) -> Result<Vec<u8>, BundleError> {
        let path = self.path(file);
        let entry = self
            .manifest
            .files
            .get(file)
            .ok_or_else(|| BundleError::Invalid {
                path: self.dir.join("manifest.json"),
                problem: format!("{file} is used but not listed under \"files\""),
            })?;
        let mut bytes = Vec::with_capacity(entry.bytes as usize);
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => BundleError::MissingFile(path.clone()),
                _ => BundleError::Io {
                    path: path.clone(),
                    source,
                },
            })?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&entry.sha256) {
            return Err(BundleError::Sha256Mismatch {
                path,
                expected: entry.sha256.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

impl Manifest {
    /// Structural checks; returns the first problem in words a user can act on.
    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported (this runtime reads {FORMAT_VERSION}); re-export the bundle",
                self.format_version
            ));
        }
        let m = &self.model;
        if m.hidden_size == 0 || m.num_layers == 0 || m.head_dim == 0 || m.vocab_size == 0 {
            return Err(
                "model sizes (hidden_size, num_layers, head_dim, vocab_size) must be positive"
                    .into(),
            );
        }
        if m.num_key_value_heads == 0
            || !m.num_attention_heads.is_multiple_of(m.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} must be a multiple of num_key_value_heads {}",
                m.num_attention_heads, m.num_key_value_heads
            ));
        }
        if m.eos_token_ids.is_empty() {
            return Err("model.eos_token_ids is empty".into());
        }
        for kind in [
            SegmentKind::Embed,
            SegmentKind::Positions,
            SegmentKind::Norm,
            SegmentKind::Head,
        ] {
            let count = self.segments.iter().filter(|s| s.kind == kind).count();
            if count != 1 {
                return Err(format!(
                    "expected exactly one {kind:?} segment, found {count}"
                ));
            }
        }
        let mut indices: Vec<usize> = Vec::new();
        for segment in self
            .segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Layer)
        {
            indices.push(
                segment
                    .index
                    .ok_or_else(|| format!("layer segment {} has no index", segment.file))?,
            );
        }
        indices.sort_unstable();
        if indices != (0..m.num_layers).collect::<Vec<_>>() {
            return Err(format!(
                "layer segments must be numbered 0..{} once each, found {indices:?}",
                m.num_layers
            ));
        }
        let listed = self.segments.iter().chain(self.monolithic.iter());
        for segment in listed {
            if !self.files.contains_key(&segment.file) {
                return Err(format!(
                    "segment file {} is not listed under \"files\"",
                    segment.file
                ));
            }
        }
        if !self.files.contains_key(&self.tokenizer.file) {
            return Err(format!(
                "tokenizer file {} is not listed under \"files\"",
                self.tokenizer.file
            ));
        }
        self.validate_vision()
    }

    /// A vision section needs its two graphs and 1-D positions; graphs without a section are unusable.
    fn validate_vision(&self) -> Result<(), String> {
        let count = |kind| self.segments.iter().filter(|s| s.kind == kind).count();
        let graphs = (count(SegmentKind::Vision), count(SegmentKind::Projector));
        match &self.vision {
            None if graphs == (0, 0) => Ok(()),
            None => Err("vision or projector segments without a \"vision\" section".into()),
            Some(_) if graphs != (1, 1) => Err(format!(
                "a vision bundle needs one vision and one projector segment, found {} and {}",
                graphs.0, graphs.1
            )),
            Some(vision) if vision.positions != "sequential" => Err(format!(
                "vision.positions {:?} is not supported: this runtime runs 1-D (sequential) positions",
                vision.positions
            )),
            Some(vision) if vision.image_tokens == 0 => {
                Err("vision.image_tokens must be positive".into())
            }
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_json(layers: usize) -> serde_json::Value {
        let io = serde_json::json!([]);
        let mut segments = vec![
            serde_json::json!({"kind": "embed", "file": "embed.onnx", "inputs": io, "outputs": io}),
        ];
        let mut files = serde_json::json!({
            "embed.onnx": {"sha256": "00", "bytes": 1},
            "positions.onnx": {"sha256": "00", "bytes": 1},
            "norm.onnx": {"sha256": "00", "bytes": 1},
            "head.onnx": {"sha256": "00", "bytes": 1},
            "tokenizer.json": {"sha256": "00", "bytes": 1},
        });
        for i in 0..layers {
            let file = format!("layer_{i:02}.onnx");
            segments.push(serde_json::json!({"kind": "layer", "index": i, "file": file, "inputs": io, "outputs": io}));
            files[file] = serde_json::json!({"sha256": "00", "bytes": 1});
        }
        for kind in ["positions", "norm", "head"] {
            segments.push(serde_json::json!({"kind": kind, "file": format!("{kind}.onnx"), "inputs": io, "outputs": io}));
        }
        serde_json::json!({
            "format_version": FORMAT_VERSION, "name": "t", "dtype": "fp32",
            "model": {"architecture": "llama", "hidden_size": 8, "num_layers": layers, "num_attention_heads": 2,
                      "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 10, "max_position_embeddings": 16,
                      "eos_token_ids": [2]},
            "tokenizer": {"file": "tokenizer.json"},
            "segments": segments, "files": files,
        })
    }

    fn parse(value: serde_json::Value) -> Manifest {
        serde_json::from_value(value).expect("test manifest parses")
    }

    #[test]
    fn valid_manifest_passes() {
        assert_eq!(parse(manifest_json(2)).validate(), Ok(()));
    }

    #[test]
    fn missing_layer_is_reported() {
        let mut value = manifest_json(3);
        value["model"]["num_layers"] = 4.into();
        let err = parse(value).validate().unwrap_err();
        assert!(err.contains("numbered 0..4"), "{err}");
    }

    #[test]
    fn unsupported_format_version_is_reported() {
        let mut value = manifest_json(1);
        value["format_version"] = 99.into();
        assert!(parse(value)
            .validate()
            .unwrap_err()
            .contains("format_version 99"));
    }

    #[test]
    fn unlisted_segment_file_is_reported() {
        let mut value = manifest_json(1);
        value["files"].as_object_mut().unwrap().remove("head.onnx");
        assert!(parse(value).validate().unwrap_err().contains("head.onnx"));
    }

    #[test]
    fn bad_head_grouping_is_reported() {
        let mut value = manifest_json(1);
        value["model"]["num_key_value_heads"] = 3.into();
        assert!(parse(value).validate().unwrap_err().contains("multiple"));
    }
}
