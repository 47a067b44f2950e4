//! Steering a batch whose rows may each carry a different spec: [`PrefillSteering`] is the
//! [`LayerHook`] of the prefill step, its [`PrefillSteering::decode`] gives the [`DecodeSteering`]
//! of every decode step.

use std::borrow::Cow;
use std::sync::Arc;

use ndarray::{Array1, Array2};
use ort::value::DynValue;

use super::field::FieldGraph;
use super::learned::{Decision, HeadGate};
use super::resolve::{sum_at, LayerAddition, ResolvedSteering};
use super::spec::Phase;
use crate::bundle::ModelConfig;
use crate::chain::{FixedDeltas, LayerHook, ModelError, Site};
use crate::runtime::values::{pooled_f32, Pooling};

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
///
/// A head state of `k·B` rows (every position's logits of a scored step, position-major) takes
/// each row's scale at each of its `k` positions.
fn apply_plan(plan: &Plan, site: Site, state: DynValue) -> Result<DynValue, ModelError> {
    let rows = state
        .dtype()
        .tensor_shape()
        .and_then(|shape| shape.first().copied())
        .unwrap_or(0) as usize;
    let mut steered: Option<DynValue> = None;
    for (graph, scales) in plan {
        let batch = scales.len();
        let scales = match rows {
            rows if rows != batch && batch > 0 && rows % batch == 0 => {
                Cow::Owned(Array1::from_iter(scales.iter().copied().cycle().take(rows)))
            }
            _ => Cow::Borrowed(scales),
        };
        let base = steered.as_ref().unwrap_or(&state);
        steered = Some(graph.run(&state, base, scales.view(), site)?);
    }
    Ok(steered.unwrap_or(state))
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
    /// gives the fixed deltas of every decode step. `prompt_lengths` are the rows' real (unpadded)
    /// prompt tokens, which a mean-pooling prober reads.
    pub fn prefill(&self, config: &ModelConfig, prompt_lengths: &[usize]) -> PrefillSteering<'_> {
        PrefillSteering {
            batch: self,
            prompt_lengths: prompt_lengths.to_vec(),
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
    prompt_lengths: Vec<usize>,
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
        // Each pooling's states are computed once, for the rows of every net that reads this layer.
        let mut pooled: Vec<(Pooling, Array2<f32>)> = Vec::new();
        for (r, row) in self.batch.rows.iter().enumerate() {
            for learned in row.iter().flat_map(|s| s.learned.iter()) {
                if learned.read_layer() != layer {
                    continue;
                }
                let pool = learned.pool();
                let index = match pooled.iter().position(|(p, _)| *p == pool) {
                    Some(index) => index,
                    None => {
                        pooled.push((pool, pooled_f32(hidden, &self.prompt_lengths, pool)?));
                        pooled.len() - 1
                    }
                };
                let outcome = learned
                    .decide(pooled[index].1.row(r))
                    .map_err(|e| ModelError::Intervention(e.to_string()))?;
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
#[derive(Clone, Default)]
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
