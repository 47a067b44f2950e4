//! The segmented model: one ONNX Runtime session per embed, positions, decoder layer, final norm
//! and head, with steering hooks at the layer boundaries.

use std::borrow::Cow;
use std::time::Instant;

use ndarray::{Array2, Array3, Axis};
use ort::session::SessionInputValue;
use ort::value::DynValue;

use super::hook::{LayerHook, Site};
use super::kv_cache::{KvNames, Rows};
use super::profile::{time_if, SegmentProfile, STEERING};
use super::segment::{load_segment, logits_of, take, LoadedSegment};
use super::step::{ImageEmbeds, Step};
use super::{host_memory, run_error, CausalLm, KvCache, ModelError, PositionVisitor};
use crate::bundle::{Bundle, Dtype, ModelConfig, Segment, SegmentKind};
use crate::runtime::values::{hidden_to_f32, value_in, view_input};
use crate::runtime::Runtime;

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
    Ok(value_in(array, dtype, "image splice")?)
}

/// The positions graph with the names of its outputs: the attention bias and the rotary tables,
/// which layers bind by name.
struct PositionsGraph {
    segment: LoadedSegment,
    outputs: Vec<String>,
}

/// The positions graph's outputs for tokens `start..end` of `step`, after `past` cached
/// positions, in the order of [`PositionsGraph::outputs`].
fn chunk_positions(
    PositionsGraph {
        segment: positions,
        outputs: names,
    }: &mut PositionsGraph,
    profile: &mut Option<SegmentProfile>,
    step: &Step,
    past: usize,
    start: usize,
    end: usize,
) -> Result<Vec<DynValue>, ModelError> {
    let decode = step.input_ids.ncols() == 1;
    // Column slices of several rows are not contiguous, which ONNX Runtime needs: those are
    // copied (a whole-step slice is borrowed as it is).
    let position_ids = step.position_ids.slice(ndarray::s![.., start..end]);
    let position_ids = position_ids.as_standard_layout();
    let mask = step.attention_mask.slice(ndarray::s![.., ..past + end]);
    let mask = mask.as_standard_layout();
    let mut outputs = time_if(profile, decode, &positions.name, || {
        positions
            .session
            .run(vec![
                (
                    Cow::Borrowed("position_ids"),
                    view_input(position_ids.view(), &positions.name)?,
                ),
                (
                    Cow::Borrowed("attention_mask"),
                    view_input(mask.view(), &positions.name)?,
                ),
            ])
            .map_err(run_error(&positions.name))
    })?;
    names
        .iter()
        .map(|name| take(&mut outputs, name, &positions.name))
        .collect()
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

/// A `[B, d]` delta as the layer graph's `steer_delta` input `[B, 1, d]` in the bundle's dtype.
fn steer_value(delta: Array2<f32>, dtype: Dtype) -> Result<DynValue, ModelError> {
    let (batch, hidden) = delta.dim();
    let delta = delta
        .into_shape_with_order((batch, 1, hidden))
        .map_err(|e| ModelError::Shape(e.to_string()))?;
    Ok(value_in(delta, dtype, "steer_delta")?)
}

/// The segmented model: one ONNX Runtime session per embed, decoder layer, final norm and head.
///
/// This is the production path; steering interventions run at its layer boundaries.
pub struct SegmentChain {
    config: ModelConfig,
    dtype: Dtype,
    embed: LoadedSegment,
    positions: PositionsGraph,
    layers: Vec<ChainLayer>,
    norm: LoadedSegment,
    head: LoadedSegment,
    profile: Option<SegmentProfile>,
    prefill_chunk: usize,
}

/// Rows (positions × batch rows) per norm and head call when every position's logits are asked.
const HEAD_ROWS: usize = 256;

/// Query tokens per layer call of a long prefill ([`SegmentChain::with_prefill_chunk`]). 256
/// keeps an 8,000-token prefill within the weights plus its KV cache plus 13% (512: 21%, the
/// attention probabilities of a chunk being `heads x chunk x prompt`) at the same speed
/// (`make prefill-chunks`).
pub const DEFAULT_PREFILL_CHUNK: usize = 256;

/// Inputs every layer segment has besides the positions graph's outputs (the manifest contract).
pub const LAYER_INPUTS: [&str; 6] = [
    "hidden_in",
    "past_key",
    "past_value",
    "seqlens_k",
    "total_sequence_length",
    "steer_delta",
];

/// A layer segment and which of the positions graph's outputs it reads: the attention bias and
/// its rotary pair (`cos`/`sin`, or `cos_sliding`/`sin_sliding` on Gemma 3's sliding layers).
struct ChainLayer {
    segment: LoadedSegment,
    /// Each such input's name and its index among the positions graph's outputs.
    tables: Vec<(String, usize)>,
}

impl ChainLayer {
    /// Load `segment`, matching its inputs to the positions graph's `positions` outputs.
    fn load(
        bundle: &Bundle,
        runtime: &Runtime,
        segment: &Segment,
        positions: &[String],
    ) -> Result<Self, ModelError> {
        let tables = position_tables(segment, positions)?
            .into_iter()
            .map(|table| (positions[table].clone(), table))
            .collect();
        Ok(Self {
            segment: load_segment(bundle, runtime, segment, &LAYER_INPUTS, &LAYER_OUTPUTS)?,
            tables,
        })
    }
}

/// Indices into `positions` of the inputs of layer `segment` that are not in [`LAYER_INPUTS`];
/// an input that is neither is an interface error.
fn position_tables(segment: &Segment, positions: &[String]) -> Result<Vec<usize>, ModelError> {
    segment
        .inputs
        .iter()
        .filter(|input| !LAYER_INPUTS.contains(&input.name.as_str()))
        .map(|input| {
            positions
                .iter()
                .position(|name| *name == input.name)
                .ok_or_else(|| ModelError::Interface {
                    file: segment.file.clone(),
                    problem: format!(
                        "input {} is neither a layer input nor an output of the positions graph ({positions:?})",
                        input.name
                    ),
                })
        })
        .collect()
}

/// The names a layer graph's KV buffers are bound to.
const LAYER_KV: KvNames<'static> = KvNames {
    past_key: "past_key",
    past_value: "past_value",
    present_key: "present_key",
    present_value: "present_value",
};

/// What one layer call reads besides the KV buffers.
struct LayerInputs<'a> {
    hidden: &'a DynValue,
    positions: &'a [DynValue],
    lengths: &'a [DynValue; 2],
    delta: &'a DynValue,
}

/// Run layer `index` on `inputs` for `rows`, its KV buffers bound in place: its output `[B, T, d]`.
fn run_layer(
    layer: &mut ChainLayer,
    index: usize,
    inputs: LayerInputs<'_>,
    cache: &mut KvCache,
    rows: Rows,
) -> Result<DynValue, ModelError> {
    let ChainLayer { segment, tables } = layer;
    let name = segment.name.as_str();
    let mut binding = segment.session.create_binding().map_err(run_error(name))?;
    let [seqlens, total] = inputs.lengths;
    let bound = [
        ("hidden_in", inputs.hidden),
        ("seqlens_k", seqlens),
        ("total_sequence_length", total),
        ("steer_delta", inputs.delta),
    ];
    let tables = tables
        .iter()
        .map(|(input, table)| (input.as_str(), &inputs.positions[*table]));
    for (input, value) in bound.into_iter().chain(tables) {
        binding.bind_input(input, value).map_err(run_error(name))?;
    }
    cache.bind(&mut binding, index, LAYER_KV, rows, name)?;
    binding
        .bind_output_to_device("hidden_out", &host_memory()?)
        .map_err(run_error(name))?;
    let mut outputs = segment
        .session
        .run_binding(&binding)
        .map_err(run_error(name))?;
    take(&mut outputs, "hidden_out", name)
}

/// Row `row` of a batch-first tensor (`[B, ...]` -> `[1, ...]`), in the same dtype.
fn row_of(value: &DynValue, row: usize, dtype: Dtype) -> Result<DynValue, ModelError> {
    let (array, _) = crate::runtime::values::to_f32(value, "batch row")?;
    let one = array.select(Axis(0), &[row]);
    Ok(value_in(one, dtype, "batch row")?)
}
/// Outputs every layer segment has.
pub const LAYER_OUTPUTS: [&str; 3] = ["hidden_out", "present_key", "present_value"];

impl SegmentChain {
    /// Build one session per segment, each file verified (by its stamp, or hashed) before ONNX
    /// Runtime reads it.
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
        let positions = find(SegmentKind::Positions)?;
        let positions = PositionsGraph {
            segment: load_segment(
                bundle,
                runtime,
                positions,
                &["position_ids", "attention_mask"],
                &["attention_bias"],
            )?,
            outputs: positions.outputs.iter().map(|o| o.name.clone()).collect(),
        };
        let layers = load_on_every_core(&bundle.layers(), |segment| {
            ChainLayer::load(bundle, runtime, segment, &positions.outputs)
        })?;
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
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        })
    }

    /// Run prefills longer than `tokens` through each layer in query chunks of `tokens` (0: never
    /// chunk). Peak attention memory then grows with `tokens x prompt` rather than `prompt²`, per
    /// head; the results are the same up to float rounding.
    #[must_use]
    pub fn with_prefill_chunk(mut self, tokens: usize) -> Self {
        self.prefill_chunk = tokens;
        self
    }
}

/// `load` of every segment, on as many threads as there are cores, in order: building a session
/// (graph optimisation, weight prepacking) is single-threaded work that start-up waits on.
fn load_on_every_core<T: Send>(
    segments: &[&Segment],
    load: impl Fn(&Segment) -> Result<T, ModelError> + Sync,
) -> Result<Vec<T>, ModelError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, usize::from);
    let mut loaded: Vec<(usize, Result<T, ModelError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers.min(segments.len()))
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(segment) = segments.get(index) else {
                            return done;
                        };
                        done.push((index, load(segment)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    loaded.sort_by_key(|(index, _)| *index);
    loaded.into_iter().map(|(_, result)| result).collect()
}

/// What every layer call of one step shares.
#[derive(Clone, Copy)]
struct StepShape {
    /// Positions already cached.
    past: usize,
    batch: usize,
    decode: bool,
    dtype: Dtype,
}

/// Layer `index` on the query tokens `start..end` of a step: all rows at once, or row by row
/// where GroupQueryAttention needs it (several new tokens after cached ones).
fn run_chunk(
    layer: &mut ChainLayer,
    index: usize,
    inputs: LayerInputs<'_>,
    (start, end): (usize, usize),
    shape: StepShape,
    cache: &mut KvCache,
    profile: &mut Option<SegmentProfile>,
) -> Result<DynValue, ModelError> {
    let StepShape {
        past,
        batch,
        decode,
        dtype,
    } = shape;
    let layer_name = layer.segment.name.clone();
    if batch == 1 || end - start == 1 || past + start == 0 {
        return time_if(profile, decode, &layer_name, || {
            run_layer(layer, index, inputs, cache, Rows::All)
        });
    }
    let mut outputs = Vec::with_capacity(batch);
    for row in 0..batch {
        let hidden = row_of(inputs.hidden, row, dtype)?;
        let positions = inputs
            .positions
            .iter()
            .map(|table| row_of(table, row, dtype))
            .collect::<Result<Vec<_>, _>>()?;
        let lengths = cache.attention_lengths(end, Rows::One(row))?;
        let delta = row_of(inputs.delta, row, dtype)?;
        let inputs = LayerInputs {
            hidden: &hidden,
            positions: &positions,
            lengths: &lengths,
            delta: &delta,
        };
        let out = time_if(profile, decode, &layer_name, || {
            run_layer(layer, index, inputs, cache, Rows::One(row))
        })?;
        outputs.push(hidden_to_f32(&out)?);
    }
    let views: Vec<_> = outputs.iter().map(|o| o.view()).collect();
    let stacked = ndarray::concatenate(Axis(0), &views)
        .map_err(|e| ModelError::Shape(format!("layer rows do not stack: {e}")))?;
    Ok(value_in(stacked, dtype, &layer_name)?)
}

/// The layers of one step: its query chunks and the position tables they read.
struct StepRun<'a> {
    step: &'a Step,
    shape: StepShape,
    chunks: Vec<(usize, usize)>,
    /// The whole step's tables and lengths, when it runs as one chunk.
    whole: Option<(Vec<DynValue>, [DynValue; 2])>,
    positions: &'a mut PositionsGraph,
    profile: &'a mut Option<SegmentProfile>,
}

impl StepRun<'_> {
    /// Layer `index` over the whole step (chunk by chunk) with `delta` added to its output, its
    /// KV in `cache`.
    fn layer(
        &mut self,
        layer: &mut ChainLayer,
        index: usize,
        hidden: &DynValue,
        delta: &DynValue,
        cache: &mut KvCache,
    ) -> Result<DynValue, ModelError> {
        let shape = self.shape;
        if let Some((positions, lengths)) = &self.whole {
            let inputs = LayerInputs {
                hidden,
                positions,
                lengths,
                delta,
            };
            let tokens = self.step.input_ids.ncols();
            return run_chunk(
                layer,
                index,
                inputs,
                (0, tokens),
                shape,
                cache,
                self.profile,
            );
        }
        let full = hidden_to_f32(hidden)?;
        let mut out = Array3::<f32>::zeros(full.dim());
        for &(start, end) in &self.chunks {
            let positions = chunk_positions(
                self.positions,
                self.profile,
                self.step,
                shape.past,
                start,
                end,
            )?;
            let lengths = cache.attention_lengths(end, Rows::All)?;
            let part = full.slice(ndarray::s![.., start..end, ..]).to_owned();
            let part = value_in(part, shape.dtype, &layer.segment.name)?;
            let inputs = LayerInputs {
                hidden: &part,
                positions: &positions,
                lengths: &lengths,
                delta,
            };
            let part = run_chunk(
                layer,
                index,
                inputs,
                (start, end),
                shape,
                cache,
                self.profile,
            )?;
            out.slice_mut(ndarray::s![.., start..end, ..])
                .assign(&hidden_to_f32(&part)?);
        }
        Ok(value_in(out, shape.dtype, &layer.segment.name)?)
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
        let layers = self.layers.len();
        self.run_layers_through(step, cache, hook, layers)
    }

    /// `step` through the embedding and the first `layers` decoder layers: their output `[B, T, d]`.
    fn run_layers_through(
        &mut self,
        step: &Step,
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
        layers: usize,
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
        // A long prompt runs each layer over query chunks: the chunk attends to the cache and to
        // itself, so attention scores are `[chunk, total]` per head instead of `[T, T]`. Every
        // layer still sees the whole prompt before the next one runs, so hooks are unchanged.
        let tokens = step.input_ids.ncols();
        let chunk = match self.prefill_chunk {
            0 => tokens,
            size => size.min(tokens).max(1),
        };
        let past = cache.longest();
        let chunks: Vec<(usize, usize)> = (0..tokens.div_ceil(chunk))
            .map(|k| (k * chunk, ((k + 1) * chunk).min(tokens)))
            .collect();
        let dtype = self.dtype;
        let shape = StepShape {
            past,
            batch,
            decode,
            dtype,
        };
        // The whole step's mask and rotary tables are made once for every layer; a chunked
        // prefill makes each chunk's as it goes, so that only one `[chunk, total]` bias is held.
        let whole = match chunks.as_slice() {
            [_] => Some((
                chunk_positions(&mut self.positions, profile, step, past, 0, tokens)?,
                cache.attention_lengths(tokens, Rows::All)?,
            )),
            _ => None,
        };
        cache.reserve(past + tokens)?;
        let mut run = StepRun {
            step,
            shape,
            chunks,
            whole,
            positions: &mut self.positions,
            profile,
        };
        // Learned interventions read the stream as it runs unsteered, so that each part of a
        // composed spec decides as it would alone: from the first steered layer up to the last
        // observed one, every layer also runs on an unsteered copy whose KV goes to a scratch cache.
        let last_observed = (0..layers).rev().find(|&layer| hook.observes(layer));
        let mut shadow: Option<(DynValue, KvCache)> = None;
        for (index, layer) in self.layers.iter_mut().enumerate().take(layers) {
            let steered = time_if(run.profile, decode, STEERING, || {
                hook.delta(index)
                    .map(|delta| steer_value(delta.clone(), dtype))
                    .transpose()
            })?;
            let rewrites = hook.rewrites(Site::Layer(index));
            let observed_later = last_observed.is_some_and(|last| index <= last);
            if !observed_later {
                shadow = None;
            } else if shadow.is_none() && (steered.is_some() || rewrites) {
                if past > 0 {
                    return Err(ModelError::Intervention(format!(
                        "layer {index} is steered before a learned intervention reads a later layer, \
                         which needs a fresh prefill (this step continues {past} cached positions)"
                    )));
                }
                tracing::debug!(layer = index, "learned reads follow an unsteered copy");
                let mut scratch = KvCache::empty(&self.config, dtype, batch)?;
                scratch.reserve(tokens)?;
                shadow = Some((
                    value_in(hidden_to_f32(&hidden)?, dtype, "unsteered copy")?,
                    scratch,
                ));
            }
            let delta = steered.as_ref().unwrap_or(&unsteered);
            hidden = run.layer(layer, index, &hidden, delta, cache)?;
            if let Some((state, scratch)) = &mut shadow {
                *state = run.layer(layer, index, state, &unsteered, scratch)?;
            }
            hidden = time_if(run.profile, decode, STEERING, || {
                if rewrites {
                    hidden = hook.rewrite(Site::Layer(index), hidden)?;
                }
                if hook.observes(index) {
                    let read = shadow.as_ref().map_or(&hidden, |(state, _)| state);
                    hook.observe(index, read)?;
                }
                Ok::<_, ModelError>(hidden)
            })?;
        }
        cache.advance(step.input_ids.ncols());
        Ok(hidden)
    }

    /// The final norm, the hook's head rewrite and the LM head on the last position of each row
    /// of `hidden` `[R, T, d]`: fp32 logits `[R, vocab]`.
    fn last_logits(
        &mut self,
        hidden: &DynValue,
        hook: &mut dyn LayerHook,
        decode: bool,
    ) -> Result<Array2<f32>, ModelError> {
        let profile = &mut self.profile;
        let norm = &mut self.norm;
        let mut outputs = time_if(profile, decode, &norm.name, || {
            norm.session
                .run(vec![(
                    Cow::Borrowed("hidden_in"),
                    SessionInputValue::from(hidden),
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
        time_if(profile, decode, &head.name, || {
            let outputs = head
                .session
                .run(vec![(
                    Cow::Borrowed("normed"),
                    SessionInputValue::from(&normed),
                )])
                .map_err(run_error(&head.name))?;
            logits_of(&outputs["logits"], &head.name)
        })
    }

    /// One unsteered prefill of `step` that returns the outputs of `layers` (`[B, T, d]`, fp32).
    /// It stops after the highest of them: nothing above it is needed.
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
        let through = layers.iter().max().map_or(0, |&last| last + 1);
        self.run_layers_through(step, &mut cache, &mut capture, through)?;
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
        let logits = self.last_logits(&hidden, hook, decode)?;
        if let Some(profile) = &mut self.profile {
            profile.add_step(decode, started.elapsed());
        }
        Ok(logits)
    }

    fn extend(
        &mut self,
        step: &Step,
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
    ) -> Result<(), ModelError> {
        self.run_layers(step, cache, hook).map(|_| ())
    }

    fn forward_positions(
        &mut self,
        step: &Step,
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
        visit: &mut PositionVisitor<'_>,
    ) -> Result<(), ModelError> {
        let hidden = hidden_to_f32(&self.run_layers(step, cache, hook)?)?;
        let (batch, tokens, width) = hidden.dim();
        // Positions go through the norm and head as rows of their own, position-major, so a
        // chunk is one head call and one chunk's logits are held at a time.
        let per_chunk = (HEAD_ROWS / batch.max(1)).max(1);
        for start in (0..tokens).step_by(per_chunk) {
            let end = (start + per_chunk).min(tokens);
            let mut rows = Array3::<f32>::zeros(((end - start) * batch, 1, width));
            for t in start..end {
                for b in 0..batch {
                    rows.slice_mut(ndarray::s![(t - start) * batch + b, 0, ..])
                        .assign(&hidden.slice(ndarray::s![b, t, ..]));
                }
            }
            let rows = value_in(rows, self.dtype, "position logits")?;
            let logits = self.last_logits(&rows, hook, false)?;
            for t in start..end {
                let offset = (t - start) * batch;
                visit(t, logits.slice(ndarray::s![offset..offset + batch, ..]))?;
            }
        }
        Ok(())
    }

    fn start_profile(&mut self) {
        self.profile = Some(SegmentProfile::default());
    }

    fn take_profile(&mut self) -> Option<SegmentProfile> {
        self.profile.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(inputs: &[&str]) -> Segment {
        let inputs: Vec<_> = inputs
            .iter()
            .map(|name| serde_json::json!({"name": name, "dtype": "float32", "shape": []}))
            .collect();
        serde_json::from_value(serde_json::json!({
            "kind": "layer", "index": 0, "file": "layer_00.onnx", "inputs": inputs, "outputs": []
        }))
        .expect("test segment parses")
    }

    #[test]
    fn a_layer_binds_the_rotary_pair_it_names() {
        let positions =
            ["attention_bias", "cos", "sin", "cos_sliding", "sin_sliding"].map(String::from);
        let global = layer(&[
            "hidden_in",
            "attention_bias",
            "cos",
            "sin",
            "past_key",
            "steer_delta",
        ]);
        assert_eq!(
            position_tables(&global, &positions).ok(),
            Some(vec![0, 1, 2])
        );
        let sliding = layer(&["hidden_in", "attention_bias", "cos_sliding", "sin_sliding"]);
        assert_eq!(
            position_tables(&sliding, &positions).ok(),
            Some(vec![0, 3, 4])
        );
    }

    #[test]
    fn an_input_nothing_provides_is_an_interface_error() {
        let positions = ["attention_bias", "cos", "sin"].map(String::from);
        let err = position_tables(&layer(&["hidden_in", "cos_local"]), &positions)
            .expect_err("cos_local has no source")
            .to_string();
        assert!(
            err.contains("layer_00.onnx") && err.contains("cos_local"),
            "{err}"
        );
    }
}
