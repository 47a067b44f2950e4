//! Learned, input-dependent interventions: L2S (a net predicts the vector), W2S (a router picks
//! the layer) and AutoSteer (a prober gates a refusal head). Each runs its small ONNX graph once
//! per row at prefill, on the last prompt token's state at its read layer, and turns the result
//! into additions at later layers or a gate on the head.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ndarray::{Array2, ArrayView1};
use ort::session::Session;
use ort::value::TensorRef;
use serde::Serialize;

use super::field::FieldGraph;
use super::files::{read_pinned, NetFile};
use super::resolve::{check_delta, check_direction, check_finite, check_layer, LayerAddition};
use super::spec::{AutoSteerIntervention, L2sIntervention, Pooling, Positions, W2sIntervention};
use super::vector::{VectorFormat, MAX_VECTOR_FILE_BYTES};
use super::{Directions, SteerError};
use crate::bundle::ModelConfig;
use crate::runtime::Runtime;

/// Which learned intervention made a [`Decision`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DecisionKind {
    /// Learning to Steer: the net predicted the vector.
    L2s,
    /// Where to Steer: the router picked the layers.
    W2s,
    /// AutoSteer: the prober gated the refusal head.
    Autosteer,
}

/// What a learned intervention decided for one row, reported with the generation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Which intervention decided.
    pub kind: DecisionKind,
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

/// Where a learned net reads, and how its additions apply.
struct Reading {
    layer: usize,
    pool: Pooling,
    scale: f32,
    positions: Positions,
}

impl Reading {
    fn at(layer: usize, scale: f32, positions: Positions) -> Self {
        Self {
            layer,
            pool: Pooling::Last,
            scale,
            positions,
        }
    }
}

/// A learned intervention checked against the model, with its session, ready to run.
pub(crate) struct Learned {
    reading: Reading,
    net: Arc<Mutex<Session>>,
    net_path: PathBuf,
    /// Bytes this intervention holds: its net file and any vectors.
    pub(crate) bytes: usize,
    /// The output the net's decision is read from (`vector` or `probs`).
    output: &'static str,
    /// The width of `[1, width]` that output must really have (its declared shape may be symbolic
    /// or wrong, so every run is checked).
    width: usize,
    action: Action,
}

impl std::fmt::Debug for Learned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Learned")
            .field("net", &self.net_path)
            .field("read_layer", &self.reading.layer)
            .finish_non_exhaustive()
    }
}

/// A router's or prober's output must be a probability distribution: each value in [0, 1] and the
/// sum 1 (to float tolerance), or the gate and the layer weights mean nothing.
fn check_probabilities(probs: ArrayView1<'_, f32>) -> Result<(), String> {
    if let Some(bad) = probs.iter().position(|p| !(0.0..=1.0).contains(p)) {
        return Err(format!(
            "output {} at index {bad} is not a probability in [0, 1]",
            probs[bad]
        ));
    }
    let sum: f32 = probs.sum();
    if (sum - 1.0).abs() > 1e-3 {
        return Err(format!(
            "outputs sum to {sum}, not 1: they are not probabilities (apply softmax in the graph)"
        ));
    }
    Ok(())
}

impl Learned {
    pub(crate) fn l2s(
        spec: &L2sIntervention,
        base_dir: &Path,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<Self, SteerError> {
        check_finite("scale", spec.scale)?;
        check_layer(spec.layer, config)?;
        if spec.read_layer >= spec.layer {
            return Err(SteerError::Rule(format!(
                "read_layer {} must be below layer {}: the state is read before it is steered",
                spec.read_layer, spec.layer
            )));
        }
        let net = NetFile {
            path: base_dir.join(&spec.path),
            sha256: spec.sha256.as_deref(),
            output: "vector",
            width: config.hidden_size,
        };
        let action = Action::Predict { layer: spec.layer };
        let reading = Reading::at(spec.read_layer, spec.scale, spec.positions);
        Self::load(runtime, config, net, reading, action)
    }

    pub(crate) fn w2s(
        spec: &W2sIntervention,
        base_dir: &Path,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<Self, SteerError> {
        check_finite("scale", spec.scale)?;
        let bank_path = base_dir.join(&spec.bank);
        // Parsed from the bytes that were hashed: a second read could see another file.
        let bank = read_pinned(
            &bank_path,
            spec.bank_sha256.as_deref(),
            MAX_VECTOR_FILE_BYTES,
        )?;
        let directions = Directions::parse(&bank_path, &bank, VectorFormat::of(&bank_path))?;
        let layers = directions.layers().ok_or_else(|| {
            SteerError::Rule(format!(
                "bank {} must name its layers (direction.{{L}})",
                bank_path.display()
            ))
        })?;
        let mut bank = Vec::with_capacity(layers.len());
        for layer in layers {
            check_layer(layer, config)?;
            if layer <= spec.read_layer {
                return Err(SteerError::Rule(format!(
                    "bank layer {layer} is not above read_layer {}: the router reads before it steers",
                    spec.read_layer
                )));
            }
            let vector = directions.for_layer(layer).unwrap_or_default();
            check_direction(vector, layer, config)?;
            bank.push((layer, vector.to_vec()));
        }
        if spec.top_k == 0 || spec.top_k > bank.len() {
            return Err(SteerError::Rule(format!(
                "top_k must be between 1 and the bank's {} layers, got {}",
                bank.len(),
                spec.top_k
            )));
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
        let reading = Reading::at(spec.read_layer, spec.scale, spec.positions);
        Self::load(runtime, config, net, reading, action)
    }

    pub(crate) fn autosteer(
        spec: &AutoSteerIntervention,
        base_dir: &Path,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<Self, SteerError> {
        check_layer(spec.read_layer, config)?;
        if !(0.0..=1.0).contains(&spec.threshold) {
            return Err(SteerError::Rule(format!(
                "threshold must be a probability in [0, 1], got {}",
                spec.threshold
            )));
        }
        check_finite("epsilon", spec.epsilon)?;
        check_finite("strength", spec.strength)?;
        let head = FieldGraph::load(
            &base_dir.join(&spec.head),
            spec.head_sha256.as_deref(),
            config,
            runtime,
        )?;
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
        let reading = Reading {
            pool: spec.pool,
            ..Reading::at(spec.read_layer, 1.0, Positions::All)
        };
        Self::load(runtime, config, net, reading, action)
    }

    fn load(
        runtime: &Runtime,
        config: &ModelConfig,
        net: NetFile<'_>,
        reading: Reading,
        action: Action,
    ) -> Result<Self, SteerError> {
        let (session, net_bytes) = net.load(runtime, config.hidden_size)?;
        let vector_bytes = match &action {
            Action::Route { bank, .. } => bank.iter().map(|(_, v)| v.len() * 4).sum(),
            Action::Predict { .. } => 0,
            Action::Gate { head, .. } => head.bytes,
        };
        Ok(Self {
            reading,
            net: session,
            net_path: net.path.clone(),
            bytes: net_bytes + vector_bytes,
            output: net.output,
            width: net.width,
            action,
        })
    }

    /// How the net's input condenses the prompt at [`Self::read_layer`].
    pub(crate) fn pool(&self) -> Pooling {
        self.reading.pool
    }

    /// The layer whose output this intervention reads.
    pub(crate) fn read_layer(&self) -> usize {
        self.reading.layer
    }

    /// Run the net on one row's state and return what it decides for that row.
    pub(crate) fn decide(&self, state: ArrayView1<'_, f32>) -> Result<Outcome, SteerError> {
        let input = state
            .to_owned()
            .into_shape_with_order((1, state.len()))
            .map_err(|e| self.failed(e.to_string()))?;
        let output = self.run(input)?;
        if output.dim() != (1, self.width) {
            return Err(self.failed(format!(
                "produced shape {:?} for one row, expected [1, {}]",
                output.shape(),
                self.width
            )));
        }
        let output = output.row(0);
        if let Some(bad) = output.iter().position(|x| !x.is_finite()) {
            return Err(self.failed(format!("produced a non-finite value at index {bad}")));
        }
        if matches!(self.action, Action::Route { .. } | Action::Gate { .. }) {
            check_probabilities(output).map_err(|message| self.failed(message))?;
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
                        kind: DecisionKind::Autosteer,
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
                DecisionKind::L2s
            } else {
                DecisionKind::W2s
            },
            layers: Vec::new(),
            weights: Vec::new(),
            norm: 0.0,
            p_toxic: None,
            gated: None,
        };
        for (layer, weight, vector) in chosen {
            let factor = self.reading.scale * weight;
            let delta: Vec<f32> = vector.iter().map(|x| x * factor).collect();
            check_delta(
                &delta,
                &format!("its vector for layer {layer} times the scale {factor}"),
            )
            .map_err(|message| self.failed(message))?;
            decision.layers.push(layer);
            decision.weights.push(weight);
            decision.norm += delta.iter().map(|x| x * x).sum::<f32>().sqrt();
            additions.push(LayerAddition {
                layer,
                positions: self.reading.positions,
                delta,
            });
        }
        Ok(Outcome {
            additions,
            gate: None,
            decision,
        })
    }

    fn failed(&self, message: String) -> SteerError {
        SteerError::Net {
            path: self.net_path.clone(),
            message,
        }
    }

    fn run(&self, input: Array2<f32>) -> Result<Array2<f32>, SteerError> {
        let error = |e: ort::Error| self.failed(e.to_string());
        let mut net = self
            .net
            .lock()
            .map_err(|_| self.failed("session lock poisoned".into()))?;
        let value = TensorRef::from_array_view(input.view()).map_err(error)?;
        let outputs = net.run(ort::inputs!["state" => value]).map_err(error)?;
        let output = outputs
            .get(self.output)
            .ok_or_else(|| self.failed(format!("no output {:?}", self.output)))?;
        let array = output.try_extract_array::<f32>().map_err(error)?;
        array
            .into_dimensionality::<ndarray::Ix2>()
            .map(|a| a.to_owned())
            .map_err(|e| self.failed(format!("output is not [batch, width]: {e}")))
    }
}
