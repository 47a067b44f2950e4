//! The steer spec: the JSON schema of every intervention kind, and the one list of the fields that
//! name files (what path confinement checks).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::files::read_regular;
use super::SteerError;
pub use crate::runtime::values::Pooling;

/// Which token positions an intervention touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Positions {
    /// Prompt tokens and generated tokens.
    #[default]
    All,
    /// Only the prompt (the prefill step).
    Prompt,
    /// Only generated tokens (decode steps).
    Generated,
}

impl Positions {
    pub(crate) fn covers(self, phase: Phase) -> bool {
        matches!(
            (self, phase),
            (Positions::All, _)
                | (Positions::Prompt, Phase::Prefill)
                | (Positions::Generated, Phase::Decode)
        )
    }
}

/// The step kind a delta is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The prompt, all at once.
    Prefill,
    /// One generated token per row.
    Decode,
}

fn default_scale() -> f32 {
    1.0
}

/// Add `scale * direction` at the given layers (a static steering vector).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorIntervention {
    /// A `.safetensors` or `.gguf` file of `direction.{layer}` tensors (relative to the spec file).
    pub path: PathBuf,
    /// Strength; negative values steer the other way.
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Layers to steer; default: every layer the file has a direction for.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// Which token positions are steered.
    #[serde(default)]
    pub positions: Positions,
    /// Rescale each direction to unit L2 norm before applying `scale`.
    #[serde(default)]
    pub normalize: bool,
}

/// One entry of a steer spec; `kind` selects the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Intervention {
    /// A static vector (mean difference, PCA, repeng / llama.cpp control vector).
    Vector(VectorIntervention),
    /// Learning to Steer: a net predicts the vector from the prompt.
    L2s(L2sIntervention),
    /// Where to Steer: a router picks the layer from the prompt.
    W2s(W2sIntervention),
    /// Steering Vector Field: a concept scorer's normalised gradient, re-evaluated at every token.
    Svf(SvfIntervention),
    /// AutoSteer: a prober gates a refusal head before the LM head.
    Autosteer(AutoSteerIntervention),
}

/// L2S: add `scale * net(state at read_layer)` at `layer`; `net` is `state [B, d] -> vector [B, d]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L2sIntervention {
    /// The net's ONNX file (relative to the spec file).
    pub path: PathBuf,
    /// Expected sha256 of `path`; checked at load when given.
    #[serde(default)]
    pub sha256: Option<String>,
    /// L′: the layer whose last prompt token the net reads (below `layer`).
    pub read_layer: usize,
    /// L*: the layer the predicted vector is added to.
    pub layer: usize,
    /// Multiplies the predicted vector.
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Which token positions are steered.
    #[serde(default)]
    pub positions: Positions,
}

fn default_top_k() -> usize {
    1
}

/// W2S: a router `state [B, d] -> probs [B, K]` over the bank's layers (ascending) picks where
/// the bank's vector for that layer is added; `top_k > 1` mixes the k best, weighted by probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct W2sIntervention {
    /// The router's ONNX file (relative to the spec file).
    pub router: PathBuf,
    /// Expected sha256 of `router`; checked at load when given.
    #[serde(default)]
    pub router_sha256: Option<String>,
    /// Vector file with `direction.{L}` for every candidate layer.
    pub bank: PathBuf,
    /// Expected sha256 of `bank`; checked at load when given.
    #[serde(default)]
    pub bank_sha256: Option<String>,
    /// The early layer whose last prompt token the router reads (below every candidate layer).
    pub read_layer: usize,
    /// How many of the router's most probable layers are steered (default 1).
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Multiplies the bank's vector.
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Which token positions are steered.
    #[serde(default)]
    pub positions: Positions,
}

fn default_threshold() -> f32 {
    0.5
}

/// AutoSteer: a prober `state [B, d] -> probs [B, 2]` reads the prompt at `read_layer` (its last
/// token, or the mean over its tokens: `pool`);
/// rows whose p(toxic) exceeds `threshold` get the refusal head `n ← n + ε·S·n` (ε = epsilon ·
/// strength) between the final norm and the LM head for the whole generation; other rows run untouched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoSteerIntervention {
    /// The prober's ONNX file (relative to the spec file).
    pub prober: PathBuf,
    /// Expected sha256 of `prober`; checked at load when given.
    #[serde(default)]
    pub prober_sha256: Option<String>,
    /// The layer the prober reads (chosen by the Safety Awareness Score at training).
    pub read_layer: usize,
    /// How the prompt's states at `read_layer` become the prober's input; as at training.
    #[serde(default)]
    pub pool: Pooling,
    /// The refusal head's rewrite graph (`state [B, d]` → `steered`).
    pub head: PathBuf,
    /// Expected sha256 of `head`; checked at load when given.
    #[serde(default)]
    pub head_sha256: Option<String>,
    /// Gate: p(toxic) above this turns the refusal head on for the row.
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    /// ε₀, the head strength the refusal head was trained with.
    pub epsilon: f32,
    /// Multiplies ε₀; 0 disables the head while still reporting p(toxic).
    #[serde(default = "default_scale")]
    pub strength: f32,
}

/// Steering Vector Field: at every token of each listed layer, `h ← h + scale · ∇s(h)/‖∇s(h)‖`,
/// where `s` is a learned concept scorer and `path` its exported field graph. Several SVF entries
/// (one per concept) sum, each with its own scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvfIntervention {
    /// The field graph's ONNX file (relative to the spec file).
    pub path: PathBuf,
    /// Expected sha256 of `path`; checked at load when given.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Layers to steer; each must be one the scorer was trained on (the graph's `layers` metadata).
    pub layers: Vec<usize>,
    /// Step length along the unit field; negative values move against the concept.
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Which token positions are steered.
    #[serde(default)]
    pub positions: Positions,
}

/// The fields of a spec entry that name files, over every kind; path confinement (`serve
/// --steer-dir`) checks each one, and the Python client's `SPEC_PATH_KEYS` must equal it.
pub const FILE_FIELDS: [&str; 5] = ["path", "router", "bank", "prober", "head"];

impl Intervention {
    /// Every file this entry names, with the field that names it (relative to the spec's directory).
    pub fn paths(&self) -> Vec<(&'static str, &Path)> {
        match self {
            Intervention::Vector(v) => vec![("path", v.path.as_path())],
            Intervention::L2s(l2s) => vec![("path", l2s.path.as_path())],
            Intervention::W2s(w2s) => vec![
                ("router", w2s.router.as_path()),
                ("bank", w2s.bank.as_path()),
            ],
            Intervention::Svf(svf) => vec![("path", svf.path.as_path())],
            Intervention::Autosteer(autosteer) => vec![
                ("prober", autosteer.prober.as_path()),
                ("head", autosteer.head.as_path()),
            ],
        }
    }
}

/// Largest spec file read (a spec of [`MAX_INTERVENTIONS`] entries takes a few KB).
pub const MAX_SPEC_FILE_BYTES: u64 = 1 << 20;

/// Most interventions one spec may list: each costs a file read at resolve time and a term at every
/// step, and a spec of thousands is an attack, not a use.
pub const MAX_INTERVENTIONS: usize = 64;

/// A steer spec: which interventions run, where and how strong. Several compose by summing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerSpec {
    /// The interventions to run; their effects sum.
    pub interventions: Vec<Intervention>,
    /// Directory relative paths resolve against (the spec file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// Where the spec came from, for error messages.
    #[serde(skip)]
    pub origin: String,
}

impl SteerSpec {
    /// Read and parse a spec file; relative vector paths resolve against its directory.
    pub fn load(path: &Path) -> Result<Self, SteerError> {
        Self::load_text(path).map(|(spec, _)| spec)
    }

    /// Every file the interventions name, in order, resolved against [`SteerSpec::base_dir`].
    pub fn files(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.interventions
            .iter()
            .flat_map(|entry| entry.paths())
            .map(|(_, path)| self.base_dir.join(path))
    }

    /// [`SteerSpec::load`], also returning the file's text (what a digest of the spec covers).
    pub fn load_text(path: &Path) -> Result<(Self, String), SteerError> {
        let bytes = read_regular(path, MAX_SPEC_FILE_BYTES).map_err(|e| match e {
            SteerError::MissingFile { path } => SteerError::MissingSpec { path },
            other => other,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| SteerError::Syntax {
            path: path.to_path_buf(),
            message: "the file is not UTF-8 text".into(),
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let spec = Self::parse(&text, &base, &path.display().to_string())?;
        Ok((spec, text))
    }

    /// Parse spec JSON; `origin` names it in errors.
    pub fn parse(text: &str, base_dir: &Path, origin: &str) -> Result<Self, SteerError> {
        let mut spec: SteerSpec = serde_json::from_str(text).map_err(|e| SteerError::Syntax {
            path: PathBuf::from(origin),
            message: e.to_string(),
        })?;
        if spec.interventions.len() > MAX_INTERVENTIONS {
            return Err(SteerError::Syntax {
                path: PathBuf::from(origin),
                message: format!(
                    "{} interventions, more than the limit of {MAX_INTERVENTIONS}",
                    spec.interventions.len()
                ),
            });
        }
        spec.base_dir = base_dir.to_path_buf();
        spec.origin = origin.to_string();
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry of each kind with every field set.
    fn examples() -> Vec<serde_json::Value> {
        vec![
            serde_json::json!({"kind": "vector", "path": "v.gguf", "scale": 1.0, "layers": [1],
                               "positions": "all", "normalize": true}),
            serde_json::json!({"kind": "l2s", "path": "net.onnx", "sha256": "00", "read_layer": 1,
                               "layer": 2, "scale": 1.0, "positions": "all"}),
            serde_json::json!({"kind": "w2s", "router": "r.onnx", "router_sha256": "00",
                               "bank": "b.safetensors", "bank_sha256": "00", "read_layer": 1,
                               "top_k": 1, "scale": 1.0, "positions": "all"}),
            serde_json::json!({"kind": "svf", "path": "f.onnx", "sha256": "00", "layers": [1],
                               "scale": 1.0, "positions": "all"}),
            serde_json::json!({"kind": "autosteer", "prober": "p.onnx", "prober_sha256": "00",
                               "read_layer": 1, "head": "h.onnx", "head_sha256": "00",
                               "threshold": 0.5, "epsilon": 1.0, "strength": 1.0}),
        ]
    }

    #[test]
    fn paths_name_every_file_field_of_every_kind() {
        let mut named = std::collections::BTreeSet::new();
        for example in examples() {
            let entry: Intervention = serde_json::from_value(example.clone()).unwrap();
            let paths: Vec<&str> = entry.paths().iter().map(|(field, _)| *field).collect();
            // Every string field but the kind, the positions and the pinned hashes names a file.
            let strings: Vec<&str> = example
                .as_object()
                .unwrap()
                .iter()
                .filter(|(key, value)| {
                    value.is_string()
                        && !["kind", "positions"].contains(&key.as_str())
                        && !key.ends_with("sha256")
                })
                .map(|(key, _)| key.as_str())
                .collect();
            let (mut paths_sorted, mut strings_sorted) = (paths.clone(), strings.clone());
            paths_sorted.sort_unstable();
            strings_sorted.sort_unstable();
            assert_eq!(paths_sorted, strings_sorted, "{example}");
            for (field, path) in entry.paths() {
                assert_eq!(example[field].as_str(), path.to_str());
            }
            named.extend(paths);
        }
        let all: std::collections::BTreeSet<&str> = FILE_FIELDS.into_iter().collect();
        assert_eq!(named, all);
    }

    #[test]
    fn python_client_checks_the_same_file_fields() {
        let client = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/export/onnx_steer_export/runtime_client.py"
        );
        let text = std::fs::read_to_string(client).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("SPEC_PATH_KEYS = ("))
            .expect("runtime_client.py defines SPEC_PATH_KEYS on one line");
        let keys: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert_eq!(keys, FILE_FIELDS);
    }

    #[test]
    fn files_that_cannot_be_read_keep_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = SteerSpec::load(&dir.path().join("nope.json")).unwrap_err();
        let missing_vector =
            super::super::Directions::load(&dir.path().join("v.gguf")).unwrap_err();
        assert!(
            matches!(missing, SteerError::MissingSpec { .. }),
            "{missing}"
        );
        assert!(matches!(missing_vector, SteerError::MissingFile { .. }));
        // A directory is there but is not readable as a file: not "not found".
        let spec = SteerSpec::load(dir.path()).unwrap_err();
        let vector = super::super::Directions::load(dir.path()).unwrap_err();
        for error in [spec, vector] {
            assert!(matches!(error, SteerError::Io { .. }), "{error}");
            assert!(error.to_string().contains("is a directory"), "{error}");
        }
    }
}
