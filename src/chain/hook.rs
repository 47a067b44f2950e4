//! How steering takes part in a forward step ([`LayerHook`]) and where ([`Site`]).

use ndarray::Array2;
use ort::value::DynValue;

use super::ModelError;

/// Where in the chain a hook may rewrite the residual stream with a graph of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// The output `[B, T, d]` of decoder layer L, after its `steer_delta` (SVF fields act here).
    Layer(usize),
    /// The final-normed last position `[B, d]`, just before the LM head (AutoSteer's refusal head).
    Head,
}

/// How steering takes part in a forward step: a delta per layer, a look at layer outputs, and
/// rewrites of the state at chosen sites.
///
/// Static vectors only give deltas; learned interventions (L2S, W2S, AutoSteer's prober) also read
/// a layer's output at prefill and decide what happens later in the same pass; SVF fields and the
/// refusal head rewrite the state with their own graphs.
pub trait LayerHook {
    /// The `[B, d]` vector to add to every position of `layer`'s output in this step, if any.
    /// Asked just before `layer` runs, so it may depend on what earlier layers showed.
    fn delta(&mut self, layer: usize) -> Option<&Array2<f32>>;
    /// Whether [`LayerHook::observe`] wants `layer`'s output (others are not handed over).
    fn observes(&self, _layer: usize) -> bool {
        false
    }
    /// Called with `layer`'s output `[B, T, d]` as it would be with nothing steered: the chain runs
    /// an unsteered copy of the layers from the first steered one (a fresh prefill only), so a
    /// net that reads a layer decides alike whatever else steers below it.
    fn observe(&mut self, _layer: usize, _hidden: &DynValue) -> Result<(), ModelError> {
        Ok(())
    }
    /// Whether [`LayerHook::rewrite`] transforms the state at `site` (asked when the chain gets there).
    fn rewrites(&self, _site: Site) -> bool {
        false
    }
    /// The state at `site`, transformed; only called where [`LayerHook::rewrites`] said so.
    fn rewrite(&mut self, _site: Site, state: DynValue) -> Result<DynValue, ModelError> {
        Ok(state)
    }
    /// True if this hook may change activations (the monolithic model cannot honour that).
    fn steers(&self) -> bool;
}

/// Deltas fixed before the step: `deltas[L]` is added at layer L; empty means unsteered.
#[derive(Debug, Clone, Default)]
pub struct FixedDeltas(pub Vec<Option<Array2<f32>>>);

impl LayerHook for FixedDeltas {
    fn delta(&mut self, layer: usize) -> Option<&Array2<f32>> {
        self.0.get(layer).and_then(Option::as_ref)
    }

    fn steers(&self) -> bool {
        self.0.iter().any(Option::is_some)
    }
}
