//! Steering: the steer spec (JSON), loading and validating what it names, and turning it into
//! per-layer additions for a batch whose rows may each carry a different spec.
//!
//! Static vectors are known before a step runs. Learned interventions ([`learned`]: L2S, W2S,
//! AutoSteer's prober) read a layer's output at prefill and decide each row's additions for the
//! later layers of the same pass, or switch on its refusal head. Rewrite graphs ([`field`]: SVF
//! fields, the refusal head) transform the state at a layer or before the LM head at every step.
//! [`PrefillSteering`] is the [`LayerHook`] of the prefill step; its [`PrefillSteering::decode`]
//! gives the [`DecodeSteering`] of every decode step.
//!
//! Layer L means the output of decoder block L (HF `hidden_states[L+1]`), as in repeng and
//! llama.cpp. The runtime adds each layer's summed delta inside that layer's graph
//! (`steer_delta` input), so activations never leave the execution provider to be steered.

pub mod field;
pub mod gguf;
pub mod learned;
pub mod vector;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ndarray::{Array1, Array2};
use ort::value::DynValue;
use serde::{Deserialize, Serialize};

use crate::bundle::ModelConfig;
use crate::model::{last_position_f32, FixedDeltas, LayerHook, ModelError, Site};
use crate::runtime::Runtime;
pub use field::SvfIntervention;
use field::{FieldGraph, FieldUse};
pub use learned::{AutoSteerIntervention, Decision, L2sIntervention, W2sIntervention};
use learned::{HeadGate, Learned};
pub use vector::Directions;

/// Why a steer spec or a file it names is unusable.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    #[error("steer spec {path} not found")]
    MissingSpec { path: PathBuf },
    #[error("steer spec {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("steer spec {spec}: intervention {index}: {problem}")]
    Invalid {
        spec: String,
        index: usize,
        problem: String,
    },
    #[error("{path} not found (paths are relative to the spec file)")]
    MissingFile { path: PathBuf },
    #[error("vector file {path}: {message}")]
    VectorFile { path: PathBuf, message: String },
    #[error("{path} has sha256 {actual}, the spec pins {expected}; retrain or fix the spec")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("steering net {path}: {message}")]
    Net { path: PathBuf, message: String },
}

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
    fn covers(self, phase: Phase) -> bool {
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

pub(crate) fn default_scale() -> f32 {
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

/// Check one direction against the model: hidden size and finite values.
pub(crate) fn check_direction(
    direction: &[f32],
    layer: usize,
    config: &ModelConfig,
) -> Result<(), String> {
    if direction.len() != config.hidden_size {
        return Err(format!(
            "direction for layer {layer} has length {}, the model's hidden size is {}",
            direction.len(),
            config.hidden_size
        ));
    }
    if let Some(bad) = direction.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "direction for layer {layer} has a non-finite value ({}) at index {bad}",
            direction[bad]
        ));
    }
    Ok(())
}

/// `what` must be a finite number (scales, strengths).
pub(crate) fn check_finite(what: &str, value: f32) -> Result<(), String> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(format!("{what} must be finite, got {value}"))
    }
}

/// `layer` must be one of the model's layers.
pub(crate) fn check_layer(layer: usize, config: &ModelConfig) -> Result<(), String> {
    if layer < config.num_layers {
        Ok(())
    } else {
        Err(format!(
            "layer {layer} is out of range; the model has layers 0..{}",
            config.num_layers - 1
        ))
    }
}

/// A steer spec: which interventions run, where and how strong. Several compose by summing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteerSpec {
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
        let text = std::fs::read_to_string(path).map_err(|_| SteerError::MissingSpec {
            path: path.to_path_buf(),
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::parse(&text, &base, &path.display().to_string())
    }

    /// Parse spec JSON; `origin` names it in errors.
    pub fn parse(text: &str, base_dir: &Path, origin: &str) -> Result<Self, SteerError> {
        let mut spec: SteerSpec = serde_json::from_str(text).map_err(|e| SteerError::Syntax {
            path: PathBuf::from(origin),
            message: e.to_string(),
        })?;
        spec.base_dir = base_dir.to_path_buf();
        spec.origin = origin.to_string();
        Ok(spec)
    }

    /// Load every file the spec names, check it against the model and create the sessions of
    /// learned interventions on `runtime`; the result is ready to apply (and to share).
    pub fn resolve(
        &self,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<ResolvedSteering, SteerError> {
        let mut resolved = ResolvedSteering::default();
        for (index, intervention) in self.interventions.iter().enumerate() {
            let invalid = |problem: String| SteerError::Invalid {
                spec: self.origin.clone(),
                index,
                problem,
            };
            match intervention {
                Intervention::Vector(v) => {
                    resolved
                        .additions
                        .extend(self.vector_additions(v, config).map_err(|e| match e {
                            VectorProblem::File(e) => e,
                            VectorProblem::Invalid(problem) => invalid(problem),
                        })?)
                }
                Intervention::L2s(l2s) => resolved
                    .learned
                    .push(Learned::l2s(l2s, &self.base_dir, config, runtime).map_err(invalid)?),
                Intervention::W2s(w2s) => resolved
                    .learned
                    .push(Learned::w2s(w2s, &self.base_dir, config, runtime).map_err(invalid)?),
                Intervention::Svf(svf) => resolved
                    .fields
                    .push(FieldUse::svf(svf, &self.base_dir, config, runtime).map_err(invalid)?),
                Intervention::Autosteer(autosteer) => resolved.learned.push(
                    Learned::autosteer(autosteer, &self.base_dir, config, runtime)
                        .map_err(invalid)?,
                ),
            }
        }
        Ok(resolved)
    }

    fn vector_additions(
        &self,
        v: &VectorIntervention,
        config: &ModelConfig,
    ) -> Result<Vec<LayerAddition>, VectorProblem> {
        check_finite("scale", v.scale).map_err(VectorProblem::Invalid)?;
        let path = self.base_dir.join(&v.path);
        let directions = Directions::load(&path).map_err(VectorProblem::File)?;
        let layers = match &v.layers {
            Some(layers) => layers.clone(),
            None => directions.layers().ok_or_else(|| {
                VectorProblem::Invalid(
                    "the file holds a single direction; say which \"layers\" to steer".into(),
                )
            })?,
        };
        let mut additions = Vec::with_capacity(layers.len());
        for layer in layers {
            if layer >= config.num_layers {
                return Err(VectorProblem::Invalid(format!(
                    "layer {layer} is out of range; the model has layers 0..{}",
                    config.num_layers - 1
                )));
            }
            let direction = directions.for_layer(layer).ok_or_else(|| {
                VectorProblem::Invalid(format!(
                    "{} has no direction for layer {layer}",
                    path.display()
                ))
            })?;
            check_direction(direction, layer, config).map_err(VectorProblem::Invalid)?;
            let norm = if v.normalize {
                direction
                    .iter()
                    .map(|x| x * x)
                    .sum::<f32>()
                    .sqrt()
                    .max(f32::MIN_POSITIVE)
            } else {
                1.0
            };
            additions.push(LayerAddition {
                layer,
                positions: v.positions,
                delta: direction.iter().map(|x| x * v.scale / norm).collect(),
            });
        }
        Ok(additions)
    }
}

enum VectorProblem {
    File(SteerError),
    Invalid(String),
}

/// A vector added at one layer's output on the positions it covers.
#[derive(Debug, Clone)]
pub(crate) struct LayerAddition {
    layer: usize,
    positions: Positions,
    delta: Vec<f32>,
}

/// Sum of the `additions` at `layer` that apply in `phase`, if any.
fn sum_at<'a>(
    additions: impl Iterator<Item = &'a LayerAddition>,
    layer: usize,
    phase: Phase,
) -> Option<Vec<f32>> {
    let mut sum: Option<Vec<f32>> = None;
    for add in additions.filter(|a| a.layer == layer && a.positions.covers(phase)) {
        match &mut sum {
            Some(total) => total.iter_mut().zip(&add.delta).for_each(|(t, d)| *t += d),
            None => sum = Some(add.delta.clone()),
        }
    }
    sum
}

/// A spec checked against a model: static vectors per layer, learned interventions and SVF fields
/// with their sessions. Share it across requests (`Arc`).
#[derive(Debug, Default)]
pub struct ResolvedSteering {
    additions: Vec<LayerAddition>,
    learned: Vec<Learned>,
    fields: Vec<FieldUse>,
}

/// The rewrite graphs to run at one site, each with every row's scale (0 leaves a row untouched).
type Plan = Vec<(Arc<FieldGraph>, Array1<f32>)>;

/// Add `scale` for `row` to `graph`'s entry of `plan`.
fn add_to_plan(plan: &mut Plan, graph: &Arc<FieldGraph>, row: usize, rows: usize, scale: f32) {
    match plan.iter_mut().find(|(g, _)| Arc::ptr_eq(g, graph)) {
        Some((_, scales)) => scales[row] += scale,
        None => {
            let mut scales = Array1::zeros(rows);
            scales[row] = scale;
            plan.push((graph.clone(), scales));
        }
    }
}

/// What runs at `site` in `phase`: the rows' SVF fields at a layer, their open gates at the head.
fn plan_at(
    rows: &[Option<Arc<ResolvedSteering>>],
    gates: &[Option<HeadGate>],
    site: Site,
    phase: Phase,
) -> Plan {
    let mut plan = Plan::new();
    match site {
        Site::Layer(layer) => {
            for (r, row) in rows.iter().enumerate() {
                for field in row.iter().flat_map(|s| s.fields.iter()) {
                    if field.layers.contains(&layer) && field.positions.covers(phase) {
                        add_to_plan(&mut plan, &field.graph, r, rows.len(), field.scale);
                    }
                }
            }
        }
        Site::Head => {
            for (r, gate) in gates.iter().enumerate() {
                if let Some(gate) = gate {
                    add_to_plan(&mut plan, &gate.graph, r, rows.len(), gate.epsilon);
                }
            }
        }
    }
    plan
}

/// Run `plan` on `state`: each graph adds its term, all evaluated at the same incoming state.
fn apply_plan(plan: &Plan, site: Site, state: DynValue) -> Result<DynValue, ModelError> {
    let mut steered: Option<DynValue> = None;
    for (graph, scales) in plan {
        let base = steered.as_ref().unwrap_or(&state);
        steered = Some(graph.run(&state, base, scales.view(), site)?);
    }
    Ok(steered.unwrap_or(state))
}

impl ResolvedSteering {
    /// Several resolved specs applied together, as if their interventions were listed in one spec.
    pub fn compose(parts: impl IntoIterator<Item = ResolvedSteering>) -> Self {
        parts.into_iter().fold(Self::default(), |mut all, part| {
            all.additions.extend(part.additions);
            all.learned.extend(part.learned);
            all.fields.extend(part.fields);
            all
        })
    }

    /// Sum of the static additions at `layer` that apply in `phase`, if any.
    pub fn delta(&self, layer: usize, phase: Phase) -> Option<Vec<f32>> {
        sum_at(self.additions.iter(), layer, phase)
    }
}

/// The steering of each row of a batch (rows may differ, or have none).
#[derive(Debug, Clone, Default)]
pub struct BatchSteering {
    rows: Vec<Option<Arc<ResolvedSteering>>>,
}

impl BatchSteering {
    /// One entry per row; `None` leaves that row unsteered.
    pub fn new(rows: Vec<Option<Arc<ResolvedSteering>>>) -> Self {
        Self { rows }
    }

    /// The same steering for every row.
    pub fn uniform(steering: Option<Arc<ResolvedSteering>>, batch: usize) -> Self {
        Self {
            rows: vec![steering; batch],
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Each row's steering.
    pub fn rows(&self) -> &[Option<Arc<ResolvedSteering>>] {
        &self.rows
    }

    /// True for a batch of no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The hook for the prefill step: static prompt deltas, and learned interventions reading
    /// their layer and deciding each row's additions. Afterwards, [`PrefillSteering::decode`]
    /// gives the fixed deltas of every decode step.
    pub fn prefill(&self, config: &ModelConfig) -> PrefillSteering<'_> {
        PrefillSteering {
            batch: self,
            num_layers: config.num_layers,
            hidden: config.hidden_size,
            decided: vec![Vec::new(); self.rows.len()],
            decisions: vec![Vec::new(); self.rows.len()],
            gates: vec![None; self.rows.len()],
            current: None,
        }
    }
}

/// Prefill-time steering of a batch (a [`LayerHook`]): see [`BatchSteering::prefill`].
pub struct PrefillSteering<'a> {
    batch: &'a BatchSteering,
    num_layers: usize,
    hidden: usize,
    /// Additions learned interventions decided, per row.
    decided: Vec<Vec<LayerAddition>>,
    decisions: Vec<Vec<Decision>>,
    /// Refusal heads AutoSteer switched on, per row.
    gates: Vec<Option<HeadGate>>,
    current: Option<Array2<f32>>,
}

impl PrefillSteering<'_> {
    /// `[B, d]` delta of `layer` in `phase` over all rows; `None` if no row steers it.
    fn batch_delta(&self, layer: usize, phase: Phase) -> Option<Array2<f32>> {
        let per_row: Vec<Option<Vec<f32>>> = self
            .batch
            .rows
            .iter()
            .zip(&self.decided)
            .map(|(row, decided)| {
                let static_additions = row.iter().flat_map(|s| s.additions.iter());
                sum_at(static_additions.chain(decided.iter()), layer, phase)
            })
            .collect();
        if per_row.iter().all(Option::is_none) {
            return None;
        }
        let mut deltas = Array2::<f32>::zeros((per_row.len(), self.hidden));
        for (r, delta) in per_row.into_iter().enumerate() {
            if let Some(delta) = delta {
                deltas.row_mut(r).assign(&ndarray::ArrayView1::from(&delta));
            }
        }
        Some(deltas)
    }

    /// The steering of every decode step, now that each row's learned interventions have decided.
    pub fn decode(&self) -> DecodeSteering {
        let rows = &self.batch.rows;
        DecodeSteering {
            deltas: FixedDeltas(
                (0..self.num_layers)
                    .map(|layer| self.batch_delta(layer, Phase::Decode))
                    .collect(),
            ),
            layer_plans: (0..self.num_layers)
                .map(|layer| plan_at(rows, &self.gates, Site::Layer(layer), Phase::Decode))
                .collect(),
            head_plan: plan_at(rows, &self.gates, Site::Head, Phase::Decode),
        }
    }

    /// What each row's learned interventions decided (empty for rows without any).
    pub fn decisions(&self) -> &[Vec<Decision>] {
        &self.decisions
    }
}

impl LayerHook for PrefillSteering<'_> {
    fn delta(&mut self, layer: usize) -> Option<&Array2<f32>> {
        self.current = self.batch_delta(layer, Phase::Prefill);
        self.current.as_ref()
    }

    fn observes(&self, layer: usize) -> bool {
        self.batch
            .rows
            .iter()
            .flatten()
            .any(|s| s.learned.iter().any(|l| l.read_layer() == layer))
    }

    fn observe(&mut self, layer: usize, hidden: &DynValue) -> Result<(), ModelError> {
        // Prompts are left-padded, so every row's last prompt token is the last position.
        let states = last_position_f32(hidden)?;
        for (r, row) in self.batch.rows.iter().enumerate() {
            for learned in row.iter().flat_map(|s| s.learned.iter()) {
                if learned.read_layer() != layer {
                    continue;
                }
                let outcome = learned
                    .decide(states.row(r))
                    .map_err(ModelError::Intervention)?;
                self.decided[r].extend(outcome.additions);
                self.decisions[r].push(outcome.decision);
                if outcome.gate.is_some() {
                    self.gates[r] = outcome.gate;
                }
            }
        }
        Ok(())
    }

    fn rewrites(&self, site: Site) -> bool {
        !plan_at(&self.batch.rows, &self.gates, site, Phase::Prefill).is_empty()
    }

    fn rewrite(&mut self, site: Site, state: DynValue) -> Result<DynValue, ModelError> {
        let plan = plan_at(&self.batch.rows, &self.gates, site, Phase::Prefill);
        apply_plan(&plan, site, state)
    }

    fn steers(&self) -> bool {
        self.batch.rows.iter().any(Option::is_some)
    }
}

/// Decode-step steering of a batch (a [`LayerHook`]): the deltas and rewrites each row's spec and
/// prefill decisions fixed. See [`PrefillSteering::decode`].
#[derive(Default)]
pub struct DecodeSteering {
    deltas: FixedDeltas,
    layer_plans: Vec<Plan>,
    head_plan: Plan,
}

impl DecodeSteering {
    fn plan(&self, site: Site) -> Option<&Plan> {
        match site {
            Site::Layer(layer) => self.layer_plans.get(layer),
            Site::Head => Some(&self.head_plan),
        }
    }

    /// The fixed `[B, d]` delta of each layer (`None` where no row steers it).
    pub fn deltas(&self) -> &FixedDeltas {
        &self.deltas
    }

    /// Keep the rows `keep`, in that order (finished requests leave a running batch); sites no
    /// remaining row steers are dropped.
    pub fn retain_rows(&mut self, keep: &[usize]) {
        let axis = ndarray::Axis(0);
        for delta in self.deltas.0.iter_mut() {
            *delta = delta
                .take()
                .map(|d| d.select(axis, keep))
                .filter(|d| d.iter().any(|&x| x != 0.0));
        }
        for plan in self.layer_plans.iter_mut().chain([&mut self.head_plan]) {
            for (_, scales) in plan.iter_mut() {
                *scales = scales.select(axis, keep);
            }
            plan.retain(|(_, scales)| scales.iter().any(|&x| x != 0.0));
        }
    }

    /// Append the steering of `other`'s rows below these `rows` (a newly prefilled group joins a
    /// running batch, in the order its KV cache is appended).
    pub fn append_rows(
        &mut self,
        rows: usize,
        other: DecodeSteering,
        other_rows: usize,
    ) -> Result<(), ModelError> {
        let stack = |mine: Option<Array2<f32>>, theirs: Option<Array2<f32>>| match (mine, theirs) {
            (None, None) => Ok(None),
            (mine, theirs) => {
                let width = mine.as_ref().or(theirs.as_ref()).map_or(0, Array2::ncols);
                let mine = mine.unwrap_or_else(|| Array2::zeros((rows, width)));
                let theirs = theirs.unwrap_or_else(|| Array2::zeros((other_rows, width)));
                ndarray::concatenate(ndarray::Axis(0), &[mine.view(), theirs.view()])
                    .map(Some)
                    .map_err(|e| ModelError::Shape(format!("steering deltas do not stack: {e}")))
            }
        };
        let layers = self.deltas.0.len().max(other.deltas.0.len());
        let mut theirs = other.deltas.0.into_iter();
        let mut mine = std::mem::take(&mut self.deltas.0).into_iter();
        self.deltas.0 = (0..layers)
            .map(|_| stack(mine.next().flatten(), theirs.next().flatten()))
            .collect::<Result<_, _>>()?;
        self.layer_plans.resize_with(
            other.layer_plans.len().max(self.layer_plans.len()),
            Plan::new,
        );
        let joined = self.layer_plans.iter_mut().zip(
            other
                .layer_plans
                .into_iter()
                .chain(std::iter::repeat_with(Plan::new)),
        );
        for (plan, theirs) in joined.chain([(&mut self.head_plan, other.head_plan)]) {
            append_plan(plan, rows, theirs, other_rows);
        }
        Ok(())
    }
}

/// `theirs` (for `other_rows` rows) below `plan` (for `rows` rows), one entry per graph.
fn append_plan(plan: &mut Plan, rows: usize, theirs: Plan, other_rows: usize) {
    let pad = |scales: &Array1<f32>, before: usize, after: usize| {
        let mut padded = Array1::zeros(before + scales.len() + after);
        padded
            .slice_mut(ndarray::s![before..before + scales.len()])
            .assign(scales);
        padded
    };
    for (_, scales) in plan.iter_mut() {
        *scales = pad(scales, 0, other_rows);
    }
    for (graph, scales) in theirs {
        match plan.iter_mut().find(|(g, _)| Arc::ptr_eq(g, &graph)) {
            Some((_, mine)) => mine.slice_mut(ndarray::s![rows..]).assign(&scales),
            None => plan.push((graph, pad(&scales, rows, 0))),
        }
    }
}

impl LayerHook for DecodeSteering {
    fn delta(&mut self, layer: usize) -> Option<&Array2<f32>> {
        self.deltas.delta(layer)
    }

    fn rewrites(&self, site: Site) -> bool {
        self.plan(site).is_some_and(|plan| !plan.is_empty())
    }

    fn rewrite(&mut self, site: Site, state: DynValue) -> Result<DynValue, ModelError> {
        match self.plan(site) {
            Some(plan) => apply_plan(plan, site, state),
            None => Ok(state),
        }
    }

    fn steers(&self) -> bool {
        self.deltas.steers()
            || !self.head_plan.is_empty()
            || self.layer_plans.iter().any(|plan| !plan.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "architecture": "llama", "hidden_size": 3, "num_layers": 4, "num_attention_heads": 1,
            "num_key_value_heads": 1, "head_dim": 3, "vocab_size": 5, "max_position_embeddings": 8,
            "eos_token_ids": [0]
        }))
        .unwrap()
    }

    use crate::runtime::test_runtime as runtime;

    fn spec_with(
        dir: &Path,
        intervention: serde_json::Value,
    ) -> Result<ResolvedSteering, SteerError> {
        let text = serde_json::json!({ "interventions": [intervention] }).to_string();
        SteerSpec::parse(&text, dir, "test.json")?.resolve(&config(), runtime())
    }

    fn vector_dir(directions: &[(usize, Vec<f32>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let named: Vec<(String, Vec<f32>)> = directions
            .iter()
            .map(|(l, v)| (format!("direction.{l}"), v.clone()))
            .collect();
        vector::write_safetensors(&dir.path().join("v.safetensors"), &named).unwrap();
        dir
    }

    #[test]
    fn unknown_kind_is_rejected() {
        let err = SteerSpec::parse(
            r#"{"interventions": [{"kind": "magic"}]}"#,
            Path::new("."),
            "s.json",
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown variant `magic`"), "{err}");
    }

    #[test]
    fn layer_out_of_range_is_rejected() {
        let dir = vector_dir(&[(1, vec![1.0, 0.0, 0.0])]);
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "v.safetensors", "layers": [9]}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("layer 9 is out of range"), "{err}");
    }

    #[test]
    fn wrong_length_is_rejected() {
        let dir = vector_dir(&[(1, vec![1.0, 0.0])]);
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "v.safetensors"}),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("length 2, the model's hidden size is 3"),
            "{err}"
        );
    }

    #[test]
    fn non_finite_values_are_rejected() {
        let dir = vector_dir(&[(2, vec![1.0, f32::NAN, 0.0])]);
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "v.safetensors"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
    }

    #[test]
    fn missing_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "vector", "path": "nope.gguf", "layers": [1]}),
        )
        .unwrap_err();
        assert!(matches!(err, SteerError::MissingFile { .. }), "{err}");
    }

    #[test]
    fn interventions_sum_per_layer_and_respect_positions() {
        let dir = vector_dir(&[(1, vec![1.0, 2.0, 3.0])]);
        let text = serde_json::json!({"interventions": [
            {"kind": "vector", "path": "v.safetensors", "scale": 2.0},
            {"kind": "vector", "path": "v.safetensors", "scale": -0.5, "positions": "generated"},
        ]})
        .to_string();
        let steering = SteerSpec::parse(&text, dir.path(), "s")
            .unwrap()
            .resolve(&config(), runtime())
            .unwrap();
        assert_eq!(steering.delta(1, Phase::Prefill), Some(vec![2.0, 4.0, 6.0]));
        assert_eq!(steering.delta(1, Phase::Decode), Some(vec![1.5, 3.0, 4.5]));
        assert_eq!(steering.delta(0, Phase::Decode), None);
    }

    #[test]
    fn composed_specs_act_as_one() {
        let dir = vector_dir(&[(1, vec![1.0, 2.0, 3.0])]);
        let part = |scale: f32| {
            spec_with(
                dir.path(),
                serde_json::json!({"kind": "vector", "path": "v.safetensors", "scale": scale}),
            )
            .unwrap()
        };
        let composed = ResolvedSteering::compose([part(1.0), part(2.0)]);
        assert_eq!(composed.delta(1, Phase::Decode), Some(vec![3.0, 6.0, 9.0]));
        let mut decode = BatchSteering::uniform(Some(Arc::new(composed)), 1)
            .prefill(&config())
            .decode();
        assert!(decode.steers() && !decode.rewrites(Site::Head));
        assert_eq!(
            decode.delta(1).unwrap().row(0).to_vec(),
            vec![3.0, 6.0, 9.0]
        );
    }

    /// A resolved spec adding (1, 1, 1) at layer 2.
    fn ones_at_layer_2() -> Arc<ResolvedSteering> {
        let dir = vector_dir(&[(2, vec![1.0, 1.0, 1.0])]);
        let spec = serde_json::json!({"kind": "vector", "path": "v.safetensors"});
        Arc::new(spec_with(dir.path(), spec).unwrap())
    }

    #[test]
    fn decode_steering_follows_rows_that_join_and_leave() {
        let steering = ones_at_layer_2();
        let decode = |rows| BatchSteering::new(rows).prefill(&config()).decode();
        let mut running = decode(vec![None]);
        running
            .append_rows(1, decode(vec![Some(steering), None]), 2)
            .unwrap();
        let layer2 = running.delta(2).unwrap().clone();
        assert_eq!(layer2.nrows(), 3);
        assert_eq!(layer2.row(1).to_vec(), vec![1.0; 3]);
        assert_eq!(layer2.row(2).to_vec(), vec![0.0; 3]);
        running.retain_rows(&[0, 2]);
        assert!(
            running.delta(2).is_none(),
            "no remaining row steers layer 2"
        );
        assert!(!running.steers());
    }

    #[test]
    fn normalize_makes_unit_directions() {
        let dir = vector_dir(&[(0, vec![3.0, 0.0, 4.0])]);
        let steering = spec_with(dir.path(), serde_json::json!({"kind": "vector", "path": "v.safetensors", "normalize": true, "scale": 10.0})).unwrap();
        assert_eq!(steering.delta(0, Phase::Prefill), Some(vec![6.0, 0.0, 8.0]));
    }

    #[test]
    fn batch_rows_get_their_own_deltas() {
        let steering = ones_at_layer_2();
        let batch = BatchSteering::new(vec![None, Some(steering)]);
        let mut prefill = batch.prefill(&config());
        assert!(prefill.delta(1).is_none());
        let layer2 = prefill.delta(2).unwrap().clone();
        assert_eq!(layer2.row(0).to_vec(), vec![0.0; 3]);
        assert_eq!(layer2.row(1).to_vec(), vec![1.0; 3]);
        let decode = prefill.decode();
        assert_eq!(decode.deltas().0[2].as_ref().unwrap(), layer2);
    }

    #[test]
    fn l2s_must_read_below_the_steered_layer() {
        let dir = tempfile::tempdir().unwrap();
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "l2s", "path": "net.onnx", "read_layer": 2, "layer": 2}),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("read_layer 2 must be below layer 2"),
            "{err}"
        );
    }

    #[test]
    fn learned_net_with_wrong_hash_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("net.onnx"), b"not a graph").unwrap();
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "l2s", "path": "net.onnx", "sha256": "00", "read_layer": 1, "layer": 2}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("the spec pins 00"), "{err}");
    }

    #[test]
    fn learned_net_that_is_not_onnx_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("router.onnx"), b"not a graph").unwrap();
        let vectors = vector_dir(&[(2, vec![1.0, 0.0, 0.0]), (3, vec![0.0, 1.0, 0.0])]);
        std::fs::copy(
            vectors.path().join("v.safetensors"),
            dir.path().join("bank.safetensors"),
        )
        .unwrap();
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "w2s", "router": "router.onnx", "bank": "bank.safetensors", "read_layer": 1}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("steering net"), "{err}");
        let err = spec_with(
            dir.path(),
            serde_json::json!({"kind": "w2s", "router": "router.onnx", "bank": "bank.safetensors", "read_layer": 2}),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("bank layer 2 is not above read_layer 2"),
            "{err}"
        );
    }
}
