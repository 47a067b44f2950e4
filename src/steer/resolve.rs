//! Resolving a spec against a model: every file it names is read, verified and checked, learned
//! nets get their sessions, and static vectors become per-layer additions.

use super::field::FieldUse;
use super::learned::Learned;
use super::spec::{Intervention, Phase, Positions, SteerSpec, VectorIntervention};
use super::{Directions, SteerError};
use crate::bundle::ModelConfig;
use crate::runtime::Runtime;

/// Check one direction against the model: hidden size and finite values.
pub(crate) fn check_direction(
    direction: &[f32],
    layer: usize,
    config: &ModelConfig,
) -> Result<(), SteerError> {
    if direction.len() != config.hidden_size {
        return Err(SteerError::Rule(format!(
            "direction for layer {layer} has length {}, the model's hidden size is {}",
            direction.len(),
            config.hidden_size
        )));
    }
    if let Some(bad) = direction.iter().position(|x| !x.is_finite()) {
        return Err(SteerError::Rule(format!(
            "direction for layer {layer} has a non-finite value ({}) at index {bad}",
            direction[bad]
        )));
    }
    Ok(())
}

/// The largest magnitude a steering delta may reach: beyond it the next layer's RMS norm squares
/// and sums values past `f32::MAX`, returns zeros, and the model produces garbage without any NaN
/// to show it. A finite scale times a finite direction (or a net's output) can still get there.
pub(crate) fn max_delta_magnitude(hidden: usize) -> f32 {
    (f32::MAX / hidden.max(1) as f32).sqrt()
}

/// A steering delta must stay within [`max_delta_magnitude`]; `what` says where it comes from.
pub(crate) fn check_delta(delta: &[f32], what: &str) -> Result<(), String> {
    let limit = max_delta_magnitude(delta.len());
    match delta.iter().map(|x| x.abs()).fold(0.0f32, f32::max) {
        largest if largest.is_finite() && largest <= limit => Ok(()),
        largest => Err(format!(
            "{what} overflows: it reaches {largest:e}, beyond {limit:e}, where the next layer's \
             norm overflows float32"
        )),
    }
}

/// `what` must be a finite number (scales, strengths).
pub(crate) fn check_finite(what: &str, value: f32) -> Result<(), SteerError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(SteerError::Rule(format!(
            "{what} must be finite, got {value}"
        )))
    }
}

/// `layer` must be one of the model's layers.
pub(crate) fn check_layer(layer: usize, config: &ModelConfig) -> Result<(), SteerError> {
    if layer < config.num_layers {
        Ok(())
    } else {
        Err(SteerError::Rule(format!(
            "layer {layer} is out of range; the model has layers 0..{}",
            config.num_layers - 1
        )))
    }
}

impl SteerSpec {
    /// Load every file the spec names, check it against the model and create the sessions of
    /// learned interventions on `runtime`; the result is ready to apply (and to share).
    pub fn resolve(
        &self,
        config: &ModelConfig,
        runtime: &Runtime,
    ) -> Result<ResolvedSteering, SteerError> {
        let mut resolved = ResolvedSteering::default();
        let base = &self.base_dir;
        for (index, intervention) in self.interventions.iter().enumerate() {
            let invalid = |e: SteerError| e.in_intervention(&self.origin, index);
            let learned = match intervention {
                // A vector's own file errors stand alone; its rule breaks say where they are.
                Intervention::Vector(v) => {
                    let additions = self.vector_additions(v, config).map_err(|e| match e {
                        SteerError::Rule(_) => invalid(e),
                        file => file,
                    })?;
                    resolved.add(additions).map_err(invalid)?;
                    continue;
                }
                Intervention::Svf(svf) => {
                    let field = FieldUse::svf(svf, base, config, runtime).map_err(invalid)?;
                    resolved.fields.push(field);
                    continue;
                }
                Intervention::L2s(l2s) => Learned::l2s(l2s, base, config, runtime),
                Intervention::W2s(w2s) => Learned::w2s(w2s, base, config, runtime),
                Intervention::Autosteer(a) => Learned::autosteer(a, base, config, runtime),
            };
            resolved.learned.push(learned.map_err(invalid)?);
        }
        Ok(resolved)
    }

    fn vector_additions(
        &self,
        v: &VectorIntervention,
        config: &ModelConfig,
    ) -> Result<Vec<LayerAddition>, SteerError> {
        check_finite("scale", v.scale)?;
        let path = self.base_dir.join(&v.path);
        let directions = Directions::load(&path)?;
        let layers = match &v.layers {
            Some(layers) => layers.clone(),
            None => directions.layers().ok_or_else(|| {
                SteerError::Rule(
                    "the file holds a single direction; say which \"layers\" to steer".into(),
                )
            })?,
        };
        let mut additions = Vec::with_capacity(layers.len());
        for layer in layers {
            check_layer(layer, config)?;
            let direction = directions.for_layer(layer).ok_or_else(|| {
                SteerError::Rule(format!(
                    "{} has no direction for layer {layer}",
                    path.display()
                ))
            })?;
            check_direction(direction, layer, config)?;
            let norm = if v.normalize {
                l2_norm(direction).ok_or_else(|| {
                    SteerError::Rule(format!(
                        "direction for layer {layer} is zero; it cannot be normalized"
                    ))
                })?
            } else {
                1.0
            };
            let delta: Vec<f32> = direction.iter().map(|x| x * (v.scale / norm)).collect();
            check_delta(
                &delta,
                &format!("scale {} times the direction for layer {layer}", v.scale),
            )
            .map_err(SteerError::Rule)?;
            additions.push(LayerAddition {
                layer,
                positions: v.positions,
                delta,
            });
        }
        Ok(additions)
    }
}

/// The L2 norm of `v`, scaled by its largest component first so that neither tiny nor huge values
/// under- or overflow in the squares; `None` for a zero vector.
fn l2_norm(v: &[f32]) -> Option<f32> {
    let largest = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    if largest == 0.0 {
        return None;
    }
    let sum: f32 = v.iter().map(|x| (x / largest).powi(2)).sum();
    Some(largest * sum.sqrt())
}

/// A vector added at one layer's output on the positions it covers.
#[derive(Debug, Clone)]
pub(crate) struct LayerAddition {
    pub(crate) layer: usize,
    pub(crate) positions: Positions,
    pub(crate) delta: Vec<f32>,
}

/// Sum of the `additions` at `layer` that apply in `phase`, if any.
pub(crate) fn sum_at<'a>(
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
    pub(super) additions: Vec<LayerAddition>,
    pub(super) learned: Vec<Learned>,
    pub(super) fields: Vec<FieldUse>,
}

impl ResolvedSteering {
    /// Several resolved specs applied together, as if their interventions were listed in one spec.
    pub fn compose(parts: impl IntoIterator<Item = ResolvedSteering>) -> Result<Self, SteerError> {
        let mut all = Self::default();
        for part in parts {
            all.add(part.additions)?;
            all.learned.extend(part.learned);
            all.fields.extend(part.fields);
        }
        Ok(all)
    }

    /// A digest of what this steering does to prompt positions: rows with equal digests get
    /// identical KV caches for identical prompts, so a cached prompt prefix may be shared between
    /// them (steering of generated positions only shares the unsteered digest). `None` when it
    /// cannot be told without running the prompt: learned nets decide per input, and rewrite
    /// graphs that act on the prompt.
    pub fn prompt_fingerprint(&self) -> Option<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let rewrites = self
            .fields
            .iter()
            .any(|field| field.positions.covers(Phase::Prefill));
        if !self.learned.is_empty() || rewrites {
            return None;
        }
        let mut digest = Sha256::new();
        for addition in self
            .additions
            .iter()
            .filter(|addition| addition.positions.covers(Phase::Prefill))
        {
            digest.update((addition.layer as u64).to_le_bytes());
            for value in &addition.delta {
                digest.update(value.to_le_bytes());
            }
        }
        Some(digest.finalize().into())
    }

    /// Fold static additions in: entries for the same layer and positions are summed at once, so
    /// a spec holds at most one delta per layer and phase however many vectors it lists.
    fn add(&mut self, additions: Vec<LayerAddition>) -> Result<(), SteerError> {
        for addition in additions {
            let same = self
                .additions
                .iter_mut()
                .find(|a| a.layer == addition.layer && a.positions == addition.positions);
            match same {
                Some(existing) => {
                    existing
                        .delta
                        .iter_mut()
                        .zip(&addition.delta)
                        .for_each(|(t, d)| *t += d);
                    check_delta(
                        &existing.delta,
                        &format!("the sum of the vectors added at layer {}", addition.layer),
                    )
                    .map_err(SteerError::Rule)?;
                }
                None => self.additions.push(addition),
            }
        }
        Ok(())
    }

    /// Bytes this steering holds (deltas, vectors, net and graph files), which the server counts
    /// against its steering memory budget. Sessions shared with other specs are counted in each.
    pub fn memory_bytes(&self) -> usize {
        let deltas: usize = self.additions.iter().map(|a| a.delta.len() * 4).sum();
        let learned: usize = self.learned.iter().map(|l| l.bytes).sum();
        let fields: usize = self.fields.iter().map(|f| f.graph.bytes).sum();
        deltas + learned + fields
    }

    /// Sum of the static additions at `layer` that apply in `phase`, if any.
    pub fn delta(&self, layer: usize, phase: Phase) -> Option<Vec<f32>> {
        sum_at(self.additions.iter(), layer, phase)
    }
}
