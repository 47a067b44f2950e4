//! The model as a chain of segment sessions (embed → layer 0 … layer N-1 → norm → head), its KV cache,
//! and the monolithic `full.onnx` baseline behind the same [`CausalLm`] interface.
//!
//! Activations and caches stay as ONNX Runtime values between segments, so their element type
//! (fp32 or fp16) and their device are whatever the provider produced.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array, Array2, Array3, ArrayView2, ArrayView3, ArrayViewD};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorRef};

use crate::bundle::{Bundle, BundleError, Dtype, ModelConfig, Segment, SegmentKind};
use crate::profile::{time_if, SegmentProfile, STEERING};
use crate::runtime::{Runtime, RuntimeError};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("segment {file} does not have the interface the manifest promises: {problem}; re-export the bundle")]
    Interface { file: String, problem: String },
    #[error("bundle has no monolithic full.onnx; export it with --monolithic")]
    NoMonolithic,
    #[error("{segment} failed: {source}")]
    Run {
        segment: String,
        #[source]
        source: ort::Error,
    },
    #[error("step inputs disagree: {0}")]
    Shape(String),
    #[error("the monolithic full.onnx has no steering inputs; steer the segment chain instead")]
    SteeringUnsupported,
    #[error("steering intervention failed: {0}")]
    Intervention(String),
    #[error("the model produced non-finite values: {0}")]
    NotFinite(String),
    #[error(
        "the monolithic full.onnx takes token ids only; run image prompts on the segment chain"
    )]
    ImagesUnsupported,
}

pub(crate) fn run_error(segment: &str) -> impl FnOnce(ort::Error) -> ModelError + '_ {
    move |source| ModelError::Run {
        segment: segment.to_string(),
        source,
    }
}

/// Image embeddings `[n, d]` that replace the token embeddings of a run of `n` image
/// placeholders starting at `start` (made by [`crate::vision::VisionEncoder`]).
#[derive(Debug, Clone)]
pub struct ImageEmbeds {
    pub start: usize,
    pub embeds: Arc<Array2<f32>>,
}

/// A tokenized prompt and the images spliced into it (none for text).
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub images: Vec<ImageEmbeds>,
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Self {
            ids,
            images: Vec::new(),
        }
    }
}

/// The tensors of one forward step: `T` new tokens for each of `B` rows.
///
/// `attention_mask` covers the cached tokens plus the new ones (`[B, P+T]`); zeros mark padding.
/// `images` are `(row, embeddings)` spliced over the token embeddings before layer 0 (prefill only).
#[derive(Debug, Clone)]
pub struct Step {
    pub input_ids: Array2<i64>,
    pub position_ids: Array2<i64>,
    pub attention_mask: Array2<i64>,
    pub images: Vec<(usize, ImageEmbeds)>,
}

impl Step {
    /// [`Step::left_padded`] for prompts with images: each image moves with its row's padding.
    pub fn for_prompts(prompts: &[Prompt], pad_id: u32) -> Self {
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let mut step = Self::left_padded(&ids, pad_id);
        let width = step.input_ids.ncols();
        for (row, prompt) in prompts.iter().enumerate() {
            let offset = width - prompt.ids.len();
            step.images.extend(prompt.images.iter().map(|image| {
                let mut image = image.clone();
                image.start += offset;
                (row, image)
            }));
        }
        step
    }

    /// The prefill step of a batch: prompts left-padded with `pad_id` to the longest, positions
    /// counted from each prompt's first real token, padding masked out.
    pub fn left_padded(prompts: &[Vec<u32>], pad_id: u32) -> Self {
        let batch = prompts.len();
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut input_ids = Array2::<i64>::from_elem((batch, width), pad_id as i64);
        let mut attention_mask = Array2::<i64>::zeros((batch, width));
        let mut position_ids = Array2::<i64>::zeros((batch, width));
        for (r, prompt) in prompts.iter().enumerate() {
            let offset = width - prompt.len();
            for (t, &id) in prompt.iter().enumerate() {
                input_ids[[r, offset + t]] = id as i64;
                attention_mask[[r, offset + t]] = 1;
                position_ids[[r, offset + t]] = t as i64;
            }
        }
        Self {
            input_ids,
            position_ids,
            attention_mask,
            images: Vec::new(),
        }
    }

    fn check(&self, cache: &KvCache) -> Result<(), ModelError> {
        let (batch, tokens) = self.input_ids.dim();
        if self.position_ids.dim() != (batch, tokens) {
            return Err(ModelError::Shape(format!(
                "position_ids is {:?}, input_ids is {:?}",
                self.position_ids.dim(),
                (batch, tokens)
            )));
        }
        if self.attention_mask.dim() != (batch, cache.len + tokens) {
            return Err(ModelError::Shape(format!(
                "attention_mask is {:?}, expected ({batch}, {} cached + {tokens} new)",
                self.attention_mask.dim(),
                cache.len
            )));
        }
        if cache.batch != batch {
            return Err(ModelError::Shape(format!(
                "cache holds {} rows, step has {batch}",
                cache.batch
            )));
        }
        for (row, image) in &self.images {
            if *row >= batch || image.start + image.embeds.nrows() > tokens {
                return Err(ModelError::Shape(format!(
                    "image embeddings at row {row}, tokens {}..{} fall outside the {batch}x{tokens} step",
                    image.start,
                    image.start + image.embeds.nrows()
                )));
            }
        }
        Ok(())
    }
}

/// `hidden` `[B, T, d]` with each image's embeddings written over its placeholder positions.
fn splice_images(
    hidden: &DynValue,
    images: &[(usize, ImageEmbeds)],
    dtype: Dtype,
) -> Result<DynValue, ModelError> {
    let mut array = hidden_to_f32(hidden)?;
    for (row, image) in images {
        let (count, width) = image.embeds.dim();
        if width != array.dim().2 {
            return Err(ModelError::Shape(format!(
                "image embeddings are {width} wide, the model's hidden size is {}",
                array.dim().2
            )));
        }
        array
            .slice_mut(ndarray::s![*row, image.start..image.start + count, ..])
            .assign(&*image.embeds);
    }
    value_in(array, dtype, "image splice")
}

/// Per-layer key and value tensors `[B, kv_heads, P, head_dim]` kept between steps.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<DynValue>,
    values: Vec<DynValue>,
    batch: usize,
    len: usize,
}

impl KvCache {
    /// An empty cache (P = 0) for `batch` rows.
    pub fn empty(config: &ModelConfig, dtype: Dtype, batch: usize) -> Result<Self, ModelError> {
        let shape = [batch, config.num_key_value_heads, 0, config.head_dim];
        let empty = || -> Result<DynValue, ort::Error> {
            Ok(match dtype {
                Dtype::Fp32 => Tensor::<f32>::from_array((shape, Vec::<f32>::new()))?.into_dyn(),
                Dtype::Fp16 => {
                    Tensor::<half::f16>::from_array((shape, Vec::<half::f16>::new()))?.into_dyn()
                }
            })
        };
        let make = || {
            (0..config.num_layers)
                .map(|_| empty())
                .collect::<Result<Vec<_>, _>>()
                .map_err(run_error("empty KV cache"))
        };
        Ok(Self {
            keys: make()?,
            values: make()?,
            batch,
            len: 0,
        })
    }

    /// Number of cached positions P.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first step.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Keep the rows `keep`, in that order, and drop the others (a finished request leaves a
    /// running batch).
    pub fn retain_rows(&mut self, keep: &[usize]) -> Result<(), ModelError> {
        if let Some(&bad) = keep.iter().find(|&&r| r >= self.batch) {
            return Err(ModelError::Shape(format!(
                "row {bad} is not in a cache of {} rows",
                self.batch
            )));
        }
        for value in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let (array, fp16) = kv_to_f32(value)?;
            *value = kv_from_f32(array.select(ndarray::Axis(0), keep), fp16)?;
        }
        self.batch = keep.len();
        Ok(())
    }

    /// Append the rows of `other` (a group prefilled on its own) below these. The shorter cache is
    /// left-padded with zeros so that both share one length; returns how many positions were
    /// padded in front of (these rows, `other`'s rows), which their attention masks must mask out.
    pub fn append_rows(&mut self, other: KvCache) -> Result<(usize, usize), ModelError> {
        if self.keys.len() != other.keys.len() {
            return Err(ModelError::Shape(format!(
                "caches of {} and {} layers cannot be merged",
                self.keys.len(),
                other.keys.len()
            )));
        }
        let len = self.len.max(other.len);
        let pads = (len - self.len, len - other.len);
        let pairs = self
            .keys
            .iter_mut()
            .zip(other.keys)
            .chain(self.values.iter_mut().zip(other.values));
        for (mine, theirs) in pairs {
            *mine = stack_padded(mine, &theirs, len)?;
        }
        self.batch += other.batch;
        self.len = len;
        Ok(pads)
    }
}

/// A KV tensor as an fp32 array, and whether it was fp16 (joins and leaves copy through the host;
/// they are rare next to decode steps).
fn kv_to_f32(value: &DynValue) -> Result<(ndarray::ArrayD<f32>, bool), ModelError> {
    if let Ok(view) = value.try_extract_array::<f32>() {
        return Ok((view.to_owned(), false));
    }
    let view = value
        .try_extract_array::<half::f16>()
        .map_err(run_error("KV cache"))?;
    Ok((view.mapv(half::f16::to_f32), true))
}

fn kv_from_f32(array: ndarray::ArrayD<f32>, fp16: bool) -> Result<DynValue, ModelError> {
    let value = if fp16 {
        Tensor::from_array(array.mapv(half::f16::from_f32)).map(Tensor::into_dyn)
    } else {
        Tensor::from_array(array).map(Tensor::into_dyn)
    };
    value.map_err(run_error("KV cache"))
}

/// `a` over `b` along the batch axis, each left-padded with zeros to `len` positions (axis 2).
fn stack_padded(a: &DynValue, b: &DynValue, len: usize) -> Result<DynValue, ModelError> {
    let pad = |array: ndarray::ArrayD<f32>| {
        let mut shape = array.shape().to_vec();
        let own = shape[2];
        shape[2] = len;
        let mut padded = ndarray::ArrayD::<f32>::zeros(shape);
        padded
            .slice_axis_mut(ndarray::Axis(2), ndarray::Slice::from(len - own..))
            .assign(&array);
        padded
    };
    let ((mine, fp16), (theirs, _)) = (kv_to_f32(a)?, kv_to_f32(b)?);
    let stacked = ndarray::concatenate(ndarray::Axis(0), &[pad(mine).view(), pad(theirs).view()])
        .map_err(|e| ModelError::Shape(format!("KV caches do not stack: {e}")))?;
    kv_from_f32(stacked, fp16)
}

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
    /// Called with `layer`'s steered output `[B, T, d]`.
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

/// Keeps fp32 copies of chosen layers' outputs (for `capture`).
struct Capture<'a> {
    layers: &'a [usize],
    captured: Vec<Option<Array3<f32>>>,
}

impl LayerHook for Capture<'_> {
    fn delta(&mut self, _layer: usize) -> Option<&Array2<f32>> {
        None
    }

    fn observes(&self, layer: usize) -> bool {
        self.layers.contains(&layer)
    }

    fn observe(&mut self, layer: usize, hidden: &DynValue) -> Result<(), ModelError> {
        let array = hidden_to_f32(hidden)?;
        for (slot, _) in self.layers.iter().enumerate().filter(|(_, &l)| l == layer) {
            self.captured[slot] = Some(array.clone());
        }
        Ok(())
    }

    fn steers(&self) -> bool {
        false
    }
}

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
    /// Start timing each segment call (`onnx-steer bench` reports the breakdown); a model of one
    /// graph has no segments and ignores this.
    fn start_profile(&mut self) {}
    /// Stop timing and return what was measured since [`CausalLm::start_profile`].
    fn take_profile(&mut self) -> Option<SegmentProfile> {
        None
    }
}

fn expect_io(session: &Session, segment: &Segment) -> Result<(), ModelError> {
    let names = |outlets: &[ort::value::Outlet]| -> Vec<String> {
        outlets.iter().map(|o| o.name().to_string()).collect()
    };
    let promised = |specs: &[crate::bundle::TensorSpec]| -> Vec<String> {
        specs.iter().map(|s| s.name.clone()).collect()
    };
    let (got_in, got_out) = (names(session.inputs()), names(session.outputs()));
    let (want_in, want_out) = (promised(&segment.inputs), promised(&segment.outputs));
    if got_in != want_in || got_out != want_out {
        return Err(ModelError::Interface {
            file: segment.file.clone(),
            problem: format!(
                "graph has inputs {got_in:?} and outputs {got_out:?}, manifest lists {want_in:?} and {want_out:?}"
            ),
        });
    }
    Ok(())
}

fn require_names(segment: &Segment, inputs: &[&str], outputs: &[&str]) -> Result<(), ModelError> {
    let has =
        |specs: &[crate::bundle::TensorSpec], name: &str| specs.iter().any(|s| s.name == name);
    for name in inputs {
        if !has(&segment.inputs, name) {
            return Err(ModelError::Interface {
                file: segment.file.clone(),
                problem: format!("no input named {name}"),
            });
        }
    }
    for name in outputs {
        if !has(&segment.outputs, name) {
            return Err(ModelError::Interface {
                file: segment.file.clone(),
                problem: format!("no output named {name}"),
            });
        }
    }
    Ok(())
}

/// A session together with the manifest entry it was built from.
pub(crate) struct LoadedSegment {
    pub(crate) session: Session,
    pub(crate) name: String,
}

pub(crate) fn load_segment(
    bundle: &Bundle,
    runtime: &Runtime,
    segment: &Segment,
    inputs: &[&str],
    outputs: &[&str],
) -> Result<LoadedSegment, ModelError> {
    require_names(segment, inputs, outputs)?;
    let bytes = bundle.read_verified(&segment.file)?;
    let session = runtime.session(&bytes, &segment.file)?;
    expect_io(&session, segment)?;
    Ok(LoadedSegment {
        session,
        name: segment.file.clone(),
    })
}

pub(crate) fn take(
    outputs: &mut ort::session::SessionOutputs<'_>,
    name: &str,
    segment: &str,
) -> Result<DynValue, ModelError> {
    outputs.remove(name).ok_or_else(|| ModelError::Interface {
        file: segment.to_string(),
        problem: format!("output {name} missing at run time"),
    })
}

fn logits_of(value: &DynValue, segment: &str) -> Result<Array2<f32>, ModelError> {
    let view = value
        .try_extract_array::<f32>()
        .map_err(run_error(segment))?;
    view.into_dimensionality::<ndarray::Ix2>()
        .map(|v| v.to_owned())
        .map_err(|e| ModelError::Interface {
            file: segment.to_string(),
            problem: format!("logits are not [batch, vocab]: {e}"),
        })
}

fn view_input<'a>(
    array: ArrayView2<'a, i64>,
    what: &str,
) -> Result<SessionInputValue<'a>, ModelError> {
    Ok(TensorRef::from_array_view(array)
        .map_err(run_error(what))?
        .into())
}

/// A `[B, d]` delta as the layer graph's `steer_delta` input `[B, 1, d]` in the bundle's dtype.
fn steer_value(delta: Array2<f32>, dtype: Dtype) -> Result<DynValue, ModelError> {
    let (batch, hidden) = delta.dim();
    let delta = delta
        .into_shape_with_order((batch, 1, hidden))
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    value_in(delta, dtype, "steer_delta")
}

/// An fp32 array as a graph input of the bundle's dtype (`what` names it in errors).
pub(crate) fn value_in<D: ndarray::Dimension + 'static>(
    array: Array<f32, D>,
    dtype: Dtype,
    what: &str,
) -> Result<DynValue, ModelError> {
    let value = match dtype {
        Dtype::Fp32 => Tensor::from_array(array).map(Tensor::into_dyn),
        Dtype::Fp16 => Tensor::from_array(array.mapv(half::f16::from_f32)).map(Tensor::into_dyn),
    };
    value.map_err(run_error(what))
}

/// The segmented model: one ONNX Runtime session per embed, decoder layer, final norm and head.
///
/// This is the production path; steering interventions run at its layer boundaries.
pub struct SegmentChain {
    config: ModelConfig,
    dtype: Dtype,
    embed: LoadedSegment,
    positions: LoadedSegment,
    layers: Vec<LoadedSegment>,
    norm: LoadedSegment,
    head: LoadedSegment,
    profile: Option<SegmentProfile>,
}

/// Inputs and outputs every layer segment has (the manifest contract).
pub const LAYER_INPUTS: [&str; 7] = [
    "hidden_in",
    "attention_bias",
    "cos",
    "sin",
    "past_key",
    "past_value",
    "steer_delta",
];
/// Outputs every layer segment has.
pub const LAYER_OUTPUTS: [&str; 3] = ["hidden_out", "present_key", "present_value"];
/// What the positions segment computes once per step for every layer.
const POSITION_OUTPUTS: [&str; 3] = ["attention_bias", "cos", "sin"];

impl SegmentChain {
    /// Build one session per segment, verifying each file's sha256 as it is read.
    pub fn load(bundle: &Bundle, runtime: &Runtime) -> Result<Self, ModelError> {
        let find = |kind| {
            bundle.segment(kind).ok_or_else(|| ModelError::Interface {
                file: "manifest.json".into(),
                problem: format!("no {kind:?} segment"),
            })
        };
        let embed = load_segment(
            bundle,
            runtime,
            find(SegmentKind::Embed)?,
            &["input_ids"],
            &["hidden"],
        )?;
        let positions = load_segment(
            bundle,
            runtime,
            find(SegmentKind::Positions)?,
            &["position_ids", "attention_mask"],
            &POSITION_OUTPUTS,
        )?;
        let layers = bundle
            .layers()
            .into_iter()
            .map(|segment| load_segment(bundle, runtime, segment, &LAYER_INPUTS, &LAYER_OUTPUTS))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = load_segment(
            bundle,
            runtime,
            find(SegmentKind::Norm)?,
            &["hidden_in"],
            &["normed"],
        )?;
        let head = load_segment(
            bundle,
            runtime,
            find(SegmentKind::Head)?,
            &["normed"],
            &["logits"],
        )?;
        Ok(Self {
            config: bundle.config().clone(),
            dtype: bundle.manifest().dtype,
            embed,
            positions,
            layers,
            norm,
            head,
            profile: None,
        })
    }
}

impl SegmentChain {
    /// Embed and run every layer with `hook`'s deltas, showing it the outputs it observes;
    /// returns the last layer's output.
    fn run_layers(
        &mut self,
        step: &Step,
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
    ) -> Result<DynValue, ModelError> {
        step.check(cache)?;
        let batch = step.input_ids.nrows();
        let decode = step.input_ids.ncols() == 1;
        let profile = &mut self.profile;
        let unsteered = steer_value(Array2::zeros((batch, self.config.hidden_size)), self.dtype)?;
        let embed = &mut self.embed;
        let mut outputs = time_if(profile, decode, &embed.name, || {
            embed
                .session
                .run(vec![(
                    Cow::Borrowed("input_ids"),
                    view_input(step.input_ids.view(), &embed.name)?,
                )])
                .map_err(run_error(&embed.name))
        })?;
        let mut hidden = take(&mut outputs, "hidden", &embed.name)?;
        drop(outputs);
        if !step.images.is_empty() {
            hidden = splice_images(&hidden, &step.images, self.dtype)?;
        }
        let positions = &mut self.positions;
        let mut outputs = time_if(profile, decode, &positions.name, || {
            positions
                .session
                .run(vec![
                    (
                        Cow::Borrowed("position_ids"),
                        view_input(step.position_ids.view(), &positions.name)?,
                    ),
                    (
                        Cow::Borrowed("attention_mask"),
                        view_input(step.attention_mask.view(), &positions.name)?,
                    ),
                ])
                .map_err(run_error(&positions.name))
        })?;
        let [bias, cos, sin] =
            POSITION_OUTPUTS.map(|name| take(&mut outputs, name, &positions.name));
        let (bias, cos, sin) = (bias?, cos?, sin?);
        drop(outputs);

        for (index, layer) in self.layers.iter_mut().enumerate() {
            let steered = time_if(profile, decode, STEERING, || {
                hook.delta(index)
                    .map(|delta| steer_value(delta.clone(), self.dtype))
                    .transpose()
            })?;
            let inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
                (Cow::Borrowed("hidden_in"), (&hidden).into()),
                (Cow::Borrowed("attention_bias"), (&bias).into()),
                (Cow::Borrowed("cos"), (&cos).into()),
                (Cow::Borrowed("sin"), (&sin).into()),
                (Cow::Borrowed("past_key"), (&cache.keys[index]).into()),
                (Cow::Borrowed("past_value"), (&cache.values[index]).into()),
                (
                    Cow::Borrowed("steer_delta"),
                    steered.as_ref().unwrap_or(&unsteered).into(),
                ),
            ];
            let mut outputs = time_if(profile, decode, &layer.name, || {
                layer.session.run(inputs).map_err(run_error(&layer.name))
            })?;
            let next = take(&mut outputs, "hidden_out", &layer.name)?;
            cache.keys[index] = take(&mut outputs, "present_key", &layer.name)?;
            cache.values[index] = take(&mut outputs, "present_value", &layer.name)?;
            drop(outputs);
            hidden = next;
            hidden = time_if(profile, decode, STEERING, || {
                if hook.rewrites(Site::Layer(index)) {
                    hidden = hook.rewrite(Site::Layer(index), hidden)?;
                }
                if hook.observes(index) {
                    hook.observe(index, &hidden)?;
                }
                Ok::<_, ModelError>(hidden)
            })?;
        }
        cache.len += step.input_ids.ncols();
        Ok(hidden)
    }

    /// One unsteered prefill of `step` that returns the outputs of `layers` (`[B, T, d]`, fp32).
    ///
    /// This is how `onnx-steer capture` reads the residual stream for training steering methods.
    pub fn capture(
        &mut self,
        step: &Step,
        layers: &[usize],
    ) -> Result<Vec<Array3<f32>>, ModelError> {
        let mut cache = self.new_cache(step.input_ids.nrows())?;
        let mut capture = Capture {
            layers,
            captured: vec![None; layers.len()],
        };
        self.run_layers(step, &mut cache, &mut capture)?;
        capture
            .captured
            .into_iter()
            .zip(layers)
            .map(|(array, layer)| {
                array.ok_or_else(|| ModelError::Shape(format!("layer {layer} is out of range")))
            })
            .collect()
    }
}

/// A layer output `[B, T, d]` as a 3-D view.
fn as_3d<T>(view: ArrayViewD<'_, T>) -> Result<ArrayView3<'_, T>, ModelError> {
    view.into_dimensionality::<ndarray::Ix3>()
        .map_err(|e| ModelError::Shape(format!("hidden state is not [B, T, d]: {e}")))
}

/// Apply `take` to a layer output as an fp32 or fp16 view; the result is fp32 either way.
fn with_hidden<D: ndarray::Dimension>(
    value: &DynValue,
    take: impl Fn(ArrayView3<'_, f32>) -> Array<f32, D>,
) -> Result<Array<f32, D>, ModelError> {
    match value.try_extract_array::<f32>() {
        Ok(view) => Ok(take(as_3d(view)?)),
        Err(_) => {
            let view = value
                .try_extract_array::<half::f16>()
                .map_err(run_error("hidden state"))?;
            let widened = as_3d(view)?.mapv(half::f16::to_f32);
            Ok(take(widened.view()))
        }
    }
}

/// A layer output `[B, T, d]` as fp32, whatever the bundle's dtype.
pub(crate) fn hidden_to_f32(value: &DynValue) -> Result<Array3<f32>, ModelError> {
    with_hidden(value, |view| view.to_owned())
}

/// Each row's state at the last position of a layer output, `[B, d]` fp32 (only that slice is copied).
pub(crate) fn last_position_f32(value: &DynValue) -> Result<Array2<f32>, ModelError> {
    with_hidden(value, |view| {
        let last = view.dim().1.saturating_sub(1);
        view.slice(ndarray::s![.., last, ..]).to_owned()
    })
}

impl CausalLm for SegmentChain {
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
        let started = Instant::now();
        let decode = step.input_ids.ncols() == 1;
        let hidden = self.run_layers(step, cache, hook)?;
        let profile = &mut self.profile;
        let norm = &mut self.norm;
        let mut outputs = time_if(profile, decode, &norm.name, || {
            norm.session
                .run(vec![(
                    Cow::Borrowed("hidden_in"),
                    SessionInputValue::from(&hidden),
                )])
                .map_err(run_error(&norm.name))
        })?;
        let mut normed = take(&mut outputs, "normed", &norm.name)?;
        drop(outputs);
        if hook.rewrites(Site::Head) {
            normed = time_if(profile, decode, STEERING, || {
                hook.rewrite(Site::Head, normed)
            })?;
        }
        let head = &mut self.head;
        let logits = time_if(profile, decode, &head.name, || {
            let outputs = head
                .session
                .run(vec![(
                    Cow::Borrowed("normed"),
                    SessionInputValue::from(&normed),
                )])
                .map_err(run_error(&head.name))?;
            logits_of(&outputs["logits"], &head.name)
        })?;
        if let Some(profile) = profile {
            profile.add_step(decode, started.elapsed());
        }
        Ok(logits)
    }

    fn start_profile(&mut self) {
        self.profile = Some(SegmentProfile::default());
    }

    fn take_profile(&mut self) -> Option<SegmentProfile> {
        self.profile.take()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache whose every entry is `row * 100 + position` (+ 1000 for values), `len` positions.
    fn cache(rows: usize, len: usize, first_row: usize) -> KvCache {
        crate::runtime::test_runtime();
        let tensor = |offset: f32| {
            let array = ndarray::Array4::from_shape_fn((rows, 1, len, 2), |(r, _, p, _)| {
                offset + ((first_row + r) * 100 + p) as f32
            });
            Tensor::from_array(array).unwrap().into_dyn()
        };
        KvCache {
            keys: vec![tensor(0.0)],
            values: vec![tensor(1000.0)],
            batch: rows,
            len,
        }
    }

    fn keys(cache: &KvCache) -> ndarray::ArrayD<f32> {
        cache.keys[0].try_extract_array::<f32>().unwrap().to_owned()
    }

    #[test]
    fn retained_rows_keep_their_order_and_contents() {
        let mut kv = cache(3, 2, 0);
        kv.retain_rows(&[2, 0]).unwrap();
        assert_eq!(kv.batch(), 2);
        let keys = keys(&kv);
        assert_eq!(keys[[0, 0, 1, 0]], 201.0);
        assert_eq!(keys[[1, 0, 0, 1]], 0.0);
        assert!(kv.retain_rows(&[5]).is_err());
    }

    #[test]
    fn appended_rows_are_left_padded_to_one_length() {
        let mut kv = cache(1, 3, 0);
        let pads = kv.append_rows(cache(2, 1, 1)).unwrap();
        assert_eq!(pads, (0, 2));
        assert_eq!((kv.batch(), kv.len()), (3, 3));
        let keys = keys(&kv);
        assert_eq!(keys[[0, 0, 2, 0]], 2.0);
        assert_eq!(
            keys[[1, 0, 0, 0]],
            0.0,
            "padding in front of the shorter group"
        );
        assert_eq!(keys[[2, 0, 2, 1]], 200.0);
        let values = kv.values[0].try_extract_array::<f32>().unwrap();
        assert_eq!(values[[1, 0, 2, 0]], 1100.0);
    }
}
