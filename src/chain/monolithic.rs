//! The whole model as one graph (`full.onnx`): the baseline the chain is benchmarked against.

use ndarray::Array2;
use ort::value::Tensor;

use super::hook::LayerHook;
use super::kv_cache::{KvNames, Rows};
use super::segment::{load_segment, logits_of, LoadedSegment};
use super::{host_memory, run_error, CausalLm, KvCache, ModelError, Step};
use crate::bundle::{Bundle, Dtype, ModelConfig};
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
        let (batch, tokens) = step.input_ids.dim();
        if batch > 1 && tokens > 1 && cache.longest() > 0 {
            return Err(ModelError::Shape(format!(
                "the monolithic full.onnx takes several new tokens after cached ones for one row at a time, not {batch}"
            )));
        }
        cache.reserve(cache.longest() + tokens)?;
        let full = &mut self.full;
        let name = full.name.as_str();
        let mut binding = full.session.create_binding().map_err(run_error(name))?;
        let ids = [
            ("input_ids", &step.input_ids),
            ("position_ids", &step.position_ids),
            ("attention_mask", &step.attention_mask),
        ];
        for (input, array) in ids {
            let value = Tensor::from_array(array.clone()).map_err(run_error(name))?;
            binding.bind_input(input, &value).map_err(run_error(name))?;
        }
        let [seqlens, total] = cache.attention_lengths(tokens, Rows::All)?;
        binding
            .bind_input("seqlens_k", &seqlens)
            .map_err(run_error(name))?;
        binding
            .bind_input("total_sequence_length", &total)
            .map_err(run_error(name))?;
        for index in 0..self.config.num_layers {
            let names = [
                format!("past_key.{index}"),
                format!("past_value.{index}"),
                format!("present_key.{index}"),
                format!("present_value.{index}"),
            ];
            let names = KvNames {
                past_key: &names[0],
                past_value: &names[1],
                present_key: &names[2],
                present_value: &names[3],
            };
            cache.bind(&mut binding, index, names, Rows::All, name)?;
        }
        binding
            .bind_output_to_device("logits", &host_memory()?)
            .map_err(run_error(name))?;
        let outputs = full
            .session
            .run_binding(&binding)
            .map_err(run_error(name))?;
        cache.advance(tokens);
        logits_of(&outputs["logits"], name)
    }
}
