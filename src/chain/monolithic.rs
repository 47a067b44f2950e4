//! The whole model as one graph (`full.onnx`): the baseline the chain is benchmarked against.

use std::borrow::Cow;

use ndarray::Array2;
use ort::session::SessionInputValue;

use super::hook::LayerHook;
use super::segment::{load_segment, logits_of, take, LoadedSegment};
use super::{run_error, CausalLm, KvCache, ModelError, Step};
use crate::bundle::{Bundle, Dtype, ModelConfig};
use crate::runtime::values::view_input;
use crate::runtime::Runtime;

/// The whole model as one graph (`full.onnx`): the baseline the chain is benchmarked against.
pub struct Monolithic {
    config: ModelConfig,
    dtype: Dtype,
    full: LoadedSegment,
}

impl Monolithic {
    /// Load `full.onnx`; fails with [`ModelError::NoMonolithic`] if the bundle was exported without it.
    pub fn load(bundle: &Bundle, runtime: &Runtime) -> Result<Self, ModelError> {
        let segment = bundle
            .manifest()
            .monolithic
            .as_ref()
            .ok_or(ModelError::NoMonolithic)?;
        let full = load_segment(
            bundle,
            runtime,
            segment,
            &["input_ids", "position_ids", "attention_mask"],
            &["logits"],
        )?;
        Ok(Self {
            config: bundle.config().clone(),
            dtype: bundle.manifest().dtype,
            full,
        })
    }
}

impl CausalLm for Monolithic {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn forward(
        &mut self,
        step: &Step,
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
    ) -> Result<Array2<f32>, ModelError> {
        if hook.steers() {
            return Err(ModelError::SteeringUnsupported);
        }
        if !step.images.is_empty() {
            return Err(ModelError::ImagesUnsupported);
        }
        step.check(cache)?;
        let full = &mut self.full;
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            (
                "input_ids".into(),
                view_input(step.input_ids.view(), &full.name)?,
            ),
            (
                "position_ids".into(),
                view_input(step.position_ids.view(), &full.name)?,
            ),
            (
                "attention_mask".into(),
                view_input(step.attention_mask.view(), &full.name)?,
            ),
        ];
        for index in 0..self.config.num_layers {
            inputs.push((
                format!("past_key.{index}").into(),
                (&cache.keys[index]).into(),
            ));
            inputs.push((
                format!("past_value.{index}").into(),
                (&cache.values[index]).into(),
            ));
        }
        let mut outputs = full.session.run(inputs).map_err(run_error(&full.name))?;
        for index in 0..self.config.num_layers {
            cache.keys[index] = take(&mut outputs, &format!("present_key.{index}"), &full.name)?;
            cache.values[index] =
                take(&mut outputs, &format!("present_value.{index}"), &full.name)?;
        }
        cache.len += step.input_ids.ncols();
        logits_of(&outputs["logits"], &full.name)
    }
}
