//! Rewrite graphs: small ONNX graphs that transform the residual stream on the layers' execution
//! provider, `(state, base, scale[, layer]) -> steered = base + scale · g(state)`.
//!
//! SVF exports its vector field this way (`g` = the normalised gradient of a concept scorer at a
//! layer, in closed form), and AutoSteer its refusal head (`g(n) = S·n` on the final-normed state).
//! `base` lets several graphs at one site add their terms to the same unsteered `state`, so a
//! multi-attribute SVF is the sum of its fields, as in the paper. Rows with scale 0 skip the graph
//! and come out as they went in. The graphs run in fp32 whatever the bundle's dtype.

use std::path::Path;
use std::sync::{Arc, Mutex};

use ndarray::{Array1, ArrayD, ArrayView1, ArrayViewD, Axis, CowArray, IxDyn};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, TensorRef};

use super::files::{read_pinned, MAX_NET_FILE_BYTES};
use super::resolve::{check_finite, check_layer};
use super::spec::{Positions, SvfIntervention};
use super::SteerError;
use crate::bundle::ModelConfig;
use crate::chain::{ModelError, Site};
use crate::runtime::values::{to_f32, value_in};
use crate::runtime::Runtime;

/// A loaded rewrite graph, shared by every row and request that uses it.
pub(crate) struct FieldGraph {
    session: Arc<Mutex<Session>>,
    /// The graph file's size.
    pub(crate) bytes: usize,
    name: String,
    /// Whether the graph takes a `layer` input (SVF: per-layer normalisation inside the graph).
    takes_layer: bool,
    /// Layers the graph was trained for (its `layers` metadata), if it says.
    layers: Option<Vec<usize>>,
}

impl std::fmt::Debug for FieldGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FieldGraph")
            .field("name", &self.name)
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}

impl FieldGraph {
    /// Verify and load a rewrite graph and check its interface against the model.
    pub(crate) fn load(
        path: &Path,
        sha256: Option<&str>,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<Self, SteerError> {
        let bytes = read_pinned(path, sha256, MAX_NET_FILE_BYTES)?;
        let bad = |message: String| SteerError::Net {
            path: path.to_path_buf(),
            message,
        };
        let shared = runtime
            .shared_session(&bytes, &path.display().to_string())
            .map_err(|e| bad(e.to_string()))?;
        let session = shared
            .lock()
            .map_err(|_| bad("session lock poisoned".into()))?;
        let input = |name: &str| session.inputs().iter().find(|o| o.name() == name);
        for name in ["state", "base", "scale"] {
            if input(name).is_none() {
                return Err(bad(format!(
                    "the graph has no input {name:?}; a rewrite graph takes state, base and scale"
                )));
            }
        }
        if !session.outputs().iter().any(|o| o.name() == "steered") {
            return Err(bad("the graph has no output \"steered\"".into()));
        }
        let width = input("state")
            .and_then(|o| o.dtype().tensor_shape())
            .and_then(|shape| shape.last().copied());
        if width != Some(config.hidden_size as i64) {
            return Err(bad(format!(
                "\"state\" ends in width {width:?}, the model's hidden size is {} (is it for another model?)",
                config.hidden_size
            )));
        }
        let takes_layer = input("layer").is_some();
        let layers = session
            .metadata()
            .ok()
            .and_then(|m| m.custom("layers"))
            .map(|text| {
                serde_json::from_str::<Vec<usize>>(&text)
                    .map_err(|e| bad(format!("metadata \"layers\" is not a list of layers: {e}")))
            })
            .transpose()?;
        if takes_layer && layers.is_none() {
            return Err(bad(
                "the graph takes a layer but has no \"layers\" metadata saying which".into(),
            ));
        }
        drop(session);
        Ok(Self {
            session: shared,
            bytes: bytes.len(),
            name: path.display().to_string(),
            takes_layer,
            layers,
        })
    }

    /// Check that the graph can steer `layer` (it was trained there).
    fn supports(&self, layer: usize) -> Result<(), SteerError> {
        match &self.layers {
            Some(trained) if !trained.contains(&layer) => Err(SteerError::Rule(format!(
                "{} was trained for layers {trained:?}, not layer {layer}",
                self.name
            ))),
            _ => Ok(()),
        }
    }

    /// `base + scales[row] · g(state)` for each row, computed on the graph's execution provider.
    ///
    /// Only the rows with a nonzero scale go through the graph (in a batch that mixes specs, the
    /// others are other requests'); the rest come out as `base`.
    pub(crate) fn run(
        &self,
        state: &DynValue,
        base: &DynValue,
        scales: ArrayView1<'_, f32>,
        site: Site,
    ) -> Result<DynValue, ModelError> {
        let (state, _) = to_f32(state, &self.name)?;
        let (mut out, dtype) = to_f32(base, &self.name)?;
        if out.shape().first() != Some(&scales.len()) {
            return Err(ModelError::Intervention(format!(
                "{}: {} scales for a state of shape {:?}",
                self.name,
                scales.len(),
                out.shape()
            )));
        }
        let active: Vec<usize> = (0..scales.len()).filter(|&r| scales[r] != 0.0).collect();
        if active.is_empty() {
            return Ok(value_in(out, dtype, &self.name)?);
        }
        let steered = self
            .run_rows(
                rows_of(&state, &active).view(),
                rows_of(&out, &active).view(),
                scales.select(Axis(0), &active).view(),
                site,
            )
            .and_then(|steered| {
                let expected = [&[active.len()], &out.shape()[1..]].concat();
                if steered.shape() == expected.as_slice() {
                    Ok(steered)
                } else {
                    Err(ModelError::Intervention(format!(
                        "{} returned shape {:?} for a state of {:?}",
                        self.name,
                        steered.shape(),
                        out.shape()
                    )))
                }
            });
        // A graph that fails or returns another shape poisons only the rows that use it (their
        // state becomes NaN, so they end with an error at the logits), never the batch.
        match steered {
            Ok(steered) => {
                for (i, &row) in active.iter().enumerate() {
                    out.index_axis_mut(Axis(0), row)
                        .assign(&steered.index_axis(Axis(0), i));
                }
            }
            Err(e) => {
                tracing::warn!("rewrite graph failed; its rows end: {e}");
                for &row in &active {
                    out.index_axis_mut(Axis(0), row).fill(f32::NAN);
                }
            }
        }
        Ok(value_in(out, dtype, &self.name)?)
    }

    /// The graph on fp32 rows that all take it: `steered` for each.
    fn run_rows(
        &self,
        state: ArrayViewD<'_, f32>,
        base: ArrayViewD<'_, f32>,
        scales: ArrayView1<'_, f32>,
        site: Site,
    ) -> Result<ArrayD<f32>, ModelError> {
        let error = |e: ort::Error| ModelError::Intervention(format!("{}: {e}", self.name));
        let layer = Array1::from_elem(
            1,
            match site {
                Site::Layer(layer) => layer as i64,
                Site::Head => -1,
            },
        );
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> = vec![
            (
                "state",
                TensorRef::from_array_view(state).map_err(error)?.into(),
            ),
            (
                "base",
                TensorRef::from_array_view(base).map_err(error)?.into(),
            ),
            (
                "scale",
                TensorRef::from_array_view(scales).map_err(error)?.into(),
            ),
        ];
        if self.takes_layer {
            inputs.push((
                "layer",
                TensorRef::from_array_view(layer.view())
                    .map_err(error)?
                    .into(),
            ));
        }
        let mut session = self.session.lock().map_err(|_| {
            ModelError::Intervention(format!("{}: session lock poisoned", self.name))
        })?;
        let outputs = session.run(inputs).map_err(error)?;
        let steered = outputs.get("steered").ok_or_else(|| {
            ModelError::Intervention(format!("{}: no output \"steered\"", self.name))
        })?;
        Ok(to_f32(steered, &self.name)?.0)
    }
}

/// The `rows` of `array` (along its first axis), borrowed when they are all of them.
fn rows_of<'a>(array: &'a ArrayD<f32>, rows: &[usize]) -> CowArray<'a, f32, IxDyn> {
    if rows.len() == array.len_of(Axis(0)) {
        CowArray::from(array.view())
    } else {
        CowArray::from(array.select(Axis(0), rows))
    }
}

/// An SVF entry checked against the model: its graph, layers, scale and positions.
#[derive(Debug)]
pub(crate) struct FieldUse {
    pub(crate) graph: std::sync::Arc<FieldGraph>,
    pub(crate) layers: Vec<usize>,
    pub(crate) scale: f32,
    pub(crate) positions: Positions,
}

impl FieldUse {
    pub(crate) fn svf(
        spec: &SvfIntervention,
        base_dir: &Path,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<Self, SteerError> {
        check_finite("scale", spec.scale)?;
        if spec.layers.is_empty() {
            return Err(SteerError::Rule(
                "an svf entry needs at least one layer".into(),
            ));
        }
        for &layer in &spec.layers {
            check_layer(layer, config)?;
        }
        let graph = FieldGraph::load(
            &base_dir.join(&spec.path),
            spec.sha256.as_deref(),
            config,
            runtime,
        )?;
        if !graph.takes_layer {
            return Err(SteerError::Rule(format!(
                "{} takes no layer input; it is not an SVF field graph",
                graph.name
            )));
        }
        for &layer in &spec.layers {
            graph.supports(layer)?;
        }
        Ok(Self {
            graph: std::sync::Arc::new(graph),
            layers: spec.layers.clone(),
            scale: spec.scale,
            positions: spec.positions,
        })
    }
}
