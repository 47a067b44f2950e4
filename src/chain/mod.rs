//! The model as a chain of segment sessions (embed → layer 0 … layer N-1 → norm → head), its KV cache,
//! and the monolithic `full.onnx` baseline behind the same [`CausalLm`] interface.
//!
//! - [`step`]: what one forward step feeds ([`Step`], [`Prompt`] with images);
//! - [`kv_cache`]: per-layer keys and values kept between steps;
//! - [`hook`]: where steering takes part in a step ([`LayerHook`], [`Site`]);
//! - [`segmented`]: the production chain, one session per segment; [`monolithic`]: the baseline;
//! - [`profile`]: per-segment timing for `onnx-steer bench`.
//!
//! Activations and caches stay as ONNX Runtime values between segments, so their element type
//! (fp32 or fp16) and their device are whatever the provider produced.

pub mod hook;
pub mod kv_cache;
pub mod monolithic;
pub mod profile;
pub(crate) mod segment;
pub mod segmented;
pub mod step;

use ndarray::{Array2, ArrayView2};

use crate::bundle::{BundleError, Dtype, ModelConfig};
use crate::runtime::RuntimeError;
pub use hook::{FixedDeltas, LayerHook, Site};
pub use kv_cache::KvCache;
pub use monolithic::Monolithic;
pub use profile::SegmentProfile;
pub use segmented::SegmentChain;
pub use step::{ImageEmbeds, Prompt, Step};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The bundle could not be opened, or one of its files could not be read.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// ONNX Runtime could not set up a session or convert a tensor.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// A segment graph's inputs or outputs differ from the manifest's, or lack one the runtime
    /// needs.
    #[error("segment {file} does not have the interface the manifest promises: {problem}; re-export the bundle")]
    Interface {
        /// The segment file (`manifest.json` when a segment is missing altogether).
        file: String,
        /// What differs.
        problem: String,
    },
    /// [`Monolithic`] was asked for, but the bundle has no `full.onnx`.
    #[error("bundle has no monolithic full.onnx; export it with --monolithic")]
    NoMonolithic,
    /// A session run failed.
    #[error("{segment} failed: {source}")]
    Run {
        /// The segment (or graph) that failed.
        segment: String,
        /// ONNX Runtime's error.
        #[source]
        source: ort::Error,
    },
    /// A step would write past the end of a fixed KV cache's slots.
    #[error("the KV cache holds {capacity} positions per row and a step needs {positions}; raise --max-context")]
    SlotFull {
        /// Positions the step needs per row.
        positions: usize,
        /// Positions each slot holds.
        capacity: usize,
    },
    /// A joining group does not fit a fixed KV cache: too few free slots, or too short.
    #[error("{rows} rows of up to {positions} positions cannot join: {free} KV slots are free, of {capacity} positions each (raise --max-batch or --max-context)")]
    NoFreeSlot {
        /// Rows asked for.
        rows: usize,
        /// Slots free.
        free: usize,
        /// Positions each row needs.
        positions: usize,
        /// Positions each slot holds.
        capacity: usize,
    },
    /// Step inputs, the KV cache or steering deltas have sizes that do not fit together.
    #[error("step inputs disagree: {0}")]
    Shape(String),
    /// Steering was asked of the monolithic baseline, which has no steering inputs.
    #[error("the monolithic full.onnx has no steering inputs; steer the segment chain instead")]
    SteeringUnsupported,
    /// A steering intervention's graph or decision failed.
    #[error("steering intervention failed: {0}")]
    Intervention(String),
    /// The model produced NaN or infinite values where finite ones were needed.
    #[error("the model produced non-finite values: {0}")]
    NotFinite(String),
    /// Logits at every position were asked of the monolithic baseline, which returns the last.
    #[error("the monolithic full.onnx returns the last position's logits only; score with the segment chain")]
    PositionLogitsUnsupported,
    /// An image prompt was given to the monolithic baseline, which takes token ids only.
    #[error(
        "the monolithic full.onnx takes token ids only; run image prompts on the segment chain"
    )]
    ImagesUnsupported,
}

/// Host memory, where outputs the runtime reads next (hidden states, logits) are bound.
pub(crate) fn host_memory() -> Result<ort::memory::MemoryInfo<'static>, ModelError> {
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )
    .map_err(run_error("host memory"))
}

pub(crate) fn run_error(segment: &str) -> impl FnOnce(ort::Error) -> ModelError + '_ {
    move |source| ModelError::Run {
        segment: segment.to_string(),
        source,
    }
}

/// What [`CausalLm::forward_positions`] hands each position's logits `[B, vocab]` to.
pub type PositionVisitor<'a> = dyn FnMut(usize, ArrayView2<'_, f32>) -> Result<(), ModelError> + 'a;

/// A causal LM that maps a step to last-position logits `[B, vocab]` and updates its cache.
///
/// Implemented by the segmented [`SegmentChain`] and the monolithic [`Monolithic`] baseline, so
/// generation and benchmarks drive both the same way.
pub trait CausalLm {
    /// Hyper-parameters of the model.
    fn config(&self) -> &ModelConfig;
    /// Element type of activations and cache.
    fn dtype(&self) -> Dtype;
    /// An empty KV cache for `batch` rows.
    fn new_cache(&self, batch: usize) -> Result<KvCache, ModelError> {
        KvCache::empty(self.config(), self.dtype(), batch)
    }
    /// Run one step and return fp32 logits of each row's last position; `hook` steers it
    /// (`FixedDeltas::default()` for an unsteered step, [`crate::steer::BatchSteering`] for specs).
    fn forward(
        &mut self,
        step: &Step,
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
    ) -> Result<Array2<f32>, ModelError>;
    /// Run `step` into `cache` without computing logits: a prompt chunk whose next token is not
    /// needed yet. The chain stops after its last layer.
    fn extend(
        &mut self,
        step: &Step,
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
    ) -> Result<(), ModelError> {
        self.forward(step, cache, hook).map(|_| ())
    }
    /// Run one step and hand `visit(t, logits)` the fp32 logits `[B, vocab]` at every position
    /// `t` of the step, in order: what teacher-forced scoring needs. Only the segment chain can
    /// (the monolithic graph returns the last position only).
    fn forward_positions(
        &mut self,
        _step: &Step,
        _cache: &mut KvCache,
        _hook: &mut dyn LayerHook,
        _visit: &mut PositionVisitor<'_>,
    ) -> Result<(), ModelError> {
        Err(ModelError::PositionLogitsUnsupported)
    }
    /// Start timing each segment call (`onnx-steer bench` reports the breakdown); a model of one
    /// graph has no segments and ignores this.
    fn start_profile(&mut self) {}
    /// Stop timing and return what was measured since [`CausalLm::start_profile`].
    fn take_profile(&mut self) -> Option<SegmentProfile> {
        None
    }
}
