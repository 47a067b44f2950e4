//! Learned, input-dependent interventions: L2S (a net predicts the vector), W2S (a router picks
//! the layer) and AutoSteer (a prober gates a refusal head). Each runs its small ONNX graph once
//! per row at prefill, on the last prompt token's state at its read layer, and turns the result
//! into additions at later layers or a gate on the head.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ndarray::{Array2, ArrayView1};
use ort::session::Session;
use ort::value::TensorRef;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::field::FieldGraph;
use super::{
    check_finite, check_layer, default_scale, Directions, LayerAddition, Positions, SteerError,
};
use crate::bundle::ModelConfig;
use crate::runtime::Runtime;

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
    #[serde(default = "default_scale")]
    pub scale: f32,
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
    #[serde(default)]
    pub router_sha256: Option<String>,
    /// Vector file with `direction.{L}` for every candidate layer.
    pub bank: PathBuf,
    #[serde(default)]
    pub bank_sha256: Option<String>,
    /// The early layer whose last prompt token the router reads (below every candidate layer).
    pub read_layer: usize,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    #[serde(default = "default_scale")]
    pub scale: f32,
    #[serde(default)]
    pub positions: Positions,
}

fn default_threshold() -> f32 {
    0.5
}

/// AutoSteer: a prober `state [B, d] -> probs [B, 2]` reads the last prompt token at `read_layer`;
/// rows whose p(toxic) exceeds `threshold` get the refusal head `n ← n + ε·S·n` (ε = epsilon ·
/// strength) between the final norm and the LM head for the whole generation; other rows run untouched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoSteerIntervention {
    /// The prober's ONNX file (relative to the spec file).
    pub prober: PathBuf,
    #[serde(default)]
    pub prober_sha256: Option<String>,
    /// The layer the prober reads (chosen by the Safety Awareness Score at training).
    pub read_layer: usize,
    /// The refusal head's rewrite graph (`state [B, d]` → `steered`).
    pub head: PathBuf,
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

/// What a learned intervention decided for one row, reported with the generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// `l2s`, `w2s` or `autosteer`.
    pub kind: &'static str,
    /// Layers steered for this row (none for AutoSteer, which acts before the head).
    pub layers: Vec<usize>,
    /// Weight of each layer (W2S router probability renormalised over the top k; 1 for L2S).
    pub weights: Vec<f32>,
    /// L2 norm of the added vector (after scale), summed over layers.
    pub norm: f32,
    /// AutoSteer: the prober's p(toxic).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_toxic: Option<f32>,
    /// AutoSteer: whether the refusal head was switched on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gated: Option<bool>,
}

/// A refusal head switched on for a row, with its ε.
#[derive(Debug, Clone)]
pub(crate) struct HeadGate {
    pub(crate) graph: Arc<FieldGraph>,
    pub(crate) epsilon: f32,
}

/// Everything a learned intervention decided for one row.
pub(crate) struct Outcome {
    pub(crate) additions: Vec<LayerAddition>,
    pub(crate) gate: Option<HeadGate>,
    pub(crate) decision: Decision,
}

enum Action {
    Predict {
        layer: usize,
    },
    Route {
        bank: Vec<(usize, Vec<f32>)>,
        top_k: usize,
    },
    Gate {
        head: Arc<FieldGraph>,
        threshold: f32,
        epsilon: f32,
    },
}

/// A learned intervention checked against the model, with its session, ready to run.
pub(crate) struct Learned {
    read_layer: usize,
    scale: f32,
    positions: Positions,
    net: Mutex<Session>,
    net_name: String,
    action: Action,
}

impl std::fmt::Debug for Learned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learned")
            .field("net", &self.net_name)
            .field("read_layer", &self.read_layer)
            .finish_non_exhaustive()
    }
}

/// Read a file named by a spec, checking the pinned sha256 when there is one.
pub(crate) fn read_pinned(path: &Path, sha256: Option<&str>) -> Result<Vec<u8>, SteerError> {
    let bytes = std::fs::read(path).map_err(|_| SteerError::MissingFile {
        path: path.to_path_buf(),
    })?;
    if let Some(expected) = sha256 {
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(SteerError::HashMismatch {
                path: path.to_path_buf(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok(bytes)
}

/// A net a spec names: its file, pinned hash, and the `[batch, width]` output it must have.
struct NetFile<'a> {
    path: PathBuf,
    sha256: Option<&'a str>,
    output: &'static str,
    width: usize,
}

impl NetFile<'_> {
    /// Verify and load the net, and check it maps `state [B, hidden]` to `output [B, width]`.
    fn load(&self, runtime: &Runtime, hidden: usize) -> Result<Session, SteerError> {
        let bytes = read_pinned(&self.path, self.sha256)?;
        let bad = |message: String| SteerError::Net {
            path: self.path.clone(),
            message,
        };
        let session = runtime
            .session(&bytes, &self.path.display().to_string())
            .map_err(|e| bad(e.to_string()))?;
        let shape_of =
            |outlets: &[ort::value::Outlet], name: &str| -> Result<Vec<i64>, SteerError> {
                let outlet = outlets
                    .iter()
                    .find(|o| o.name() == name)
                    .ok_or_else(|| bad(format!("the graph has no tensor named {name:?}")))?;
                outlet
                    .dtype()
                    .tensor_shape()
                    .map(|shape| shape.to_vec())
                    .ok_or_else(|| bad(format!("{name:?} is not a tensor")))
            };
        for (name, shape, want) in [
            ("state", shape_of(session.inputs(), "state")?, hidden),
            (
                self.output,
                shape_of(session.outputs(), self.output)?,
                self.width,
            ),
        ] {
            if shape.len() != 2 || shape[1] != want as i64 {
                return Err(bad(format!(
                "{name:?} has shape {shape:?}, expected [batch, {want}] (is it for another model?)"
            )));
            }
        }
        Ok(session)
    }
}

impl Learned {
    pub(crate) fn l2s(
        spec: &L2sIntervention,
        base_dir: &Path,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<Self, String> {
        check_finite("scale", spec.scale)?;
        check_layer(spec.layer, config)?;
        if spec.read_layer >= spec.layer {
            return Err(format!(
                "read_layer {} must be below layer {}: the state is read before it is steered",
                spec.read_layer, spec.layer
            ));
        }
        let net = NetFile {
            path: base_dir.join(&spec.path),
            sha256: spec.sha256.as_deref(),
            output: "vector",
            width: config.hidden_size,
        };
        let action = Action::Predict { layer: spec.layer };
        Self::load(
            runtime,
            config,
            net,
            spec.read_layer,
            spec.scale,
            spec.positions,
            action,
        )
    }

    pub(crate) fn w2s(
        spec: &W2sIntervention,
        base_dir: &Path,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<Self, String> {
        check_finite("scale", spec.scale)?;
        let bank_path = base_dir.join(&spec.bank);
        read_pinned(&bank_path, spec.bank_sha256.as_deref()).map_err(|e| e.to_string())?;
        let directions = Directions::load(&bank_path).map_err(|e| e.to_string())?;
        let layers = directions.layers().ok_or_else(|| {
            format!(
                "bank {} must name its layers (direction.{{L}})",
                bank_path.display()
            )
        })?;
        let mut bank = Vec::with_capacity(layers.len());
        for layer in layers {
            check_layer(layer, config)?;
            if layer <= spec.read_layer {
                return Err(format!(
                    "bank layer {layer} is not above read_layer {}: the router reads before it steers",
                    spec.read_layer
                ));
            }
            let vector = directions.for_layer(layer).unwrap_or_default();
            super::check_direction(vector, layer, config)?;
            bank.push((layer, vector.to_vec()));
        }
        if spec.top_k == 0 || spec.top_k > bank.len() {
            return Err(format!(
                "top_k must be between 1 and the bank's {} layers, got {}",
                bank.len(),
                spec.top_k
            ));
        }
        let net = NetFile {
            path: base_dir.join(&spec.router),
            sha256: spec.router_sha256.as_deref(),
            output: "probs",
            width: bank.len(),
        };
        let action = Action::Route {
            bank,
            top_k: spec.top_k,
        };
        Self::load(
            runtime,
            config,
            net,
            spec.read_layer,
            spec.scale,
            spec.positions,
            action,
        )
    }

    pub(crate) fn autosteer(
        spec: &AutoSteerIntervention,
        base_dir: &Path,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<Self, String> {
        check_layer(spec.read_layer, config)?;
        if !(0.0..=1.0).contains(&spec.threshold) {
            return Err(format!(
                "threshold must be a probability in [0, 1], got {}",
                spec.threshold
            ));
        }
        check_finite("epsilon", spec.epsilon)?;
        check_finite("strength", spec.strength)?;
        let head = FieldGraph::load(
            &base_dir.join(&spec.head),
            spec.head_sha256.as_deref(),
            config,
            runtime,
        )
        .map_err(|e| e.to_string())?;
        let net = NetFile {
            path: base_dir.join(&spec.prober),
            sha256: spec.prober_sha256.as_deref(),
            output: "probs",
            width: 2,
        };
        let action = Action::Gate {
            head: Arc::new(head),
            threshold: spec.threshold,
            epsilon: spec.epsilon * spec.strength,
        };
        Self::load(
            runtime,
            config,
            net,
            spec.read_layer,
            1.0,
            Positions::All,
            action,
        )
    }

    fn load(
        runtime: &Runtime,
        config: &ModelConfig,
        net: NetFile<'_>,
        read_layer: usize,
        scale: f32,
        positions: Positions,
        action: Action,
    ) -> Result<Self, String> {
        let session = net
            .load(runtime, config.hidden_size)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            read_layer,
            scale,
            positions,
            net: Mutex::new(session),
            net_name: net.path.display().to_string(),
            action,
        })
    }

    /// The layer whose output this intervention reads.
    pub(crate) fn read_layer(&self) -> usize {
        self.read_layer
    }

    /// Run the net on one row's state and return what it decides for that row.
    pub(crate) fn decide(&self, state: ArrayView1<'_, f32>) -> Result<Outcome, String> {
        let input = state
            .to_owned()
            .into_shape_with_order((1, state.len()))
            .map_err(|e| e.to_string())?;
        let output = self.run(input)?;
        let output = output.row(0);
        if let Some(bad) = output.iter().position(|x| !x.is_finite()) {
            return Err(format!(
                "{} produced a non-finite value at index {bad}",
                self.net_name
            ));
        }
        let chosen: Vec<(usize, f32, Vec<f32>)> = match &self.action {
            Action::Gate {
                head,
                threshold,
                epsilon,
            } => {
                let p_toxic = output[1];
                let gated = p_toxic > *threshold;
                return Ok(Outcome {
                    additions: Vec::new(),
                    gate: gated.then(|| HeadGate {
                        graph: head.clone(),
                        epsilon: *epsilon,
                    }),
                    decision: Decision {
                        kind: "autosteer",
                        layers: Vec::new(),
                        weights: Vec::new(),
                        norm: 0.0,
                        p_toxic: Some(p_toxic),
                        gated: Some(gated),
                    },
                });
            }
            Action::Predict { layer } => vec![(*layer, 1.0, output.to_vec())],
            Action::Route { bank, top_k } => {
                let mut order: Vec<usize> = (0..bank.len()).collect();
                order.sort_by(|&a, &b| output[b].total_cmp(&output[a]));
                order.truncate(*top_k);
                let mass: f32 = order
                    .iter()
                    .map(|&k| output[k])
                    .sum::<f32>()
                    .max(f32::MIN_POSITIVE);
                order
                    .into_iter()
                    .map(|k| (bank[k].0, output[k] / mass, bank[k].1.clone()))
                    .collect()
            }
        };
        let mut additions = Vec::with_capacity(chosen.len());
        let mut decision = Decision {
            kind: if matches!(self.action, Action::Predict { .. }) {
                "l2s"
            } else {
                "w2s"
            },
            layers: Vec::new(),
            weights: Vec::new(),
            norm: 0.0,
            p_toxic: None,
            gated: None,
        };
        for (layer, weight, vector) in chosen {
            let factor = self.scale * weight;
            let delta: Vec<f32> = vector.iter().map(|x| x * factor).collect();
            decision.layers.push(layer);
            decision.weights.push(weight);
            decision.norm += delta.iter().map(|x| x * x).sum::<f32>().sqrt();
            additions.push(LayerAddition {
                layer,
                positions: self.positions,
                delta,
            });
        }
        Ok(Outcome {
            additions,
            gate: None,
            decision,
        })
    }

    fn run(&self, input: Array2<f32>) -> Result<Array2<f32>, String> {
        let error = |e: ort::Error| format!("{}: {e}", self.net_name);
        let mut net = self
            .net
            .lock()
            .map_err(|_| format!("{}: session lock poisoned", self.net_name))?;
        let value = TensorRef::from_array_view(input.view()).map_err(error)?;
        let outputs = net.run(ort::inputs!["state" => value]).map_err(error)?;
        let array = outputs[0].try_extract_array::<f32>().map_err(error)?;
        array
            .into_dimensionality::<ndarray::Ix2>()
            .map(|a| a.to_owned())
            .map_err(|e| format!("{}: output is not [batch, width]: {e}", self.net_name))
    }
}
