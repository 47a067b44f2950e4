//! Per-layer keys and values kept between steps, as slots: one buffer per layer, allocated once,
//! that the layer graphs append to in place, with a slot per running row.
//!
//! Each layer's keys (and values) live in one tensor `[slots, kv_heads, capacity, head_dim]`.
//! A running row owns a slot and its own length: the slot holds the row's positions from 0, and
//! GroupQueryAttention, given each row's length (`seqlens_k`), writes a step's keys at that row's
//! end and attends over that row's filled positions only. Rows of different lengths therefore
//! decode together with no padding between them. The occupied slots are `0..rows`, so a step binds
//! one contiguous view `[rows, kv_heads, capacity, head_dim]` of the buffer as both `past_key` and
//! `present_key`: nothing is concatenated or copied per step.
//!
//! A group that joins a running batch takes the next free slots and is prefilled straight into
//! them ([`KvCache::admit`], then [`KvCache::commit`] or [`KvCache::abandon`]); the other rows'
//! slots are not touched. A row that leaves frees its slot, and the last row moves into it (one
//! row's filled positions, [`KvCache::release`]), which keeps the occupied slots contiguous.
//! A cache made with [`KvCache::with_slots`] never reallocates: the server sizes it from
//! `--max-batch` and `--max-context`. One made with [`KvCache::empty`] grows to what a step or a
//! join needs (tools that know their sizes up front).

use std::ops::Range;

use std::ptr::NonNull;

use ndarray::{ArrayD, ArrayViewMut4, Axis, IxDyn, Slice};
use ort::memory::Allocator;
use ort::session::IoBinding;
use ort::sys::ONNXTensorElementDataType;
use ort::value::{DynTensor, DynValue, Tensor};
use ort::AsPointer;

use super::{host_memory, run_error, ModelError};
use crate::bundle::{Dtype, ModelConfig};
use crate::runtime::RuntimeError;

/// Positions a growing cache adds at least: a decode step that outgrows it reallocates once per
/// this many tokens at first, then at doubling sizes.
const MIN_GROWTH: usize = 64;

/// The graph names a layer's KV buffer is bound to (`past_key` in, `present_key` out, ...).
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvNames<'a> {
    pub past_key: &'a str,
    pub past_value: &'a str,
    pub present_key: &'a str,
    pub present_value: &'a str,
}

/// The rows of a step a binding covers: all of them, or one (GroupQueryAttention takes several
/// new tokens after a cached prefix one row at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rows {
    All,
    One(usize),
}

/// Per-layer key and value slots `[slots, kv_heads, capacity, head_dim]`; see the module docs.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<DynTensor>,
    values: Vec<DynTensor>,
    dtype: Dtype,
    kv_heads: usize,
    head_dim: usize,
    slots: usize,
    capacity: usize,
    /// Whether a step or a join may reallocate the buffers to make room.
    growable: bool,
    /// Filled positions of each occupied slot; the occupied slots are `0..lengths.len()`: the
    /// running rows, then the group being admitted, if any.
    lengths: Vec<usize>,
    /// How many of the occupied slots hold running rows.
    running: usize,
    /// Which rows the next step runs on.
    focus: Focus,
}

/// The rows a step of a [`KvCache`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Focus {
    Running,
    Admitted,
}

impl KvCache {
    /// A cache of `rows` occupied, empty rows that grows to what each step needs: for tools that
    /// run one group (`score`, `perplexity`, `capture`). Call [`KvCache::reserve`] with the final
    /// length to allocate once.
    pub fn empty(config: &ModelConfig, dtype: Dtype, rows: usize) -> Result<Self, ModelError> {
        let mut cache = Self::allocate(config, dtype, rows, 0)?;
        cache.growable = true;
        cache.lengths = vec![0; rows];
        cache.running = rows;
        Ok(cache)
    }

    /// A cache of `slots` free slots of `capacity` positions each, allocated now and never
    /// again: what a server's running batch holds for its whole life. On the CPU the pages of a
    /// slot are only backed by memory once a row writes them.
    pub fn with_slots(
        config: &ModelConfig,
        dtype: Dtype,
        slots: usize,
        capacity: usize,
    ) -> Result<Self, ModelError> {
        Self::allocate(config, dtype, slots, capacity)
    }

    fn allocate(
        config: &ModelConfig,
        dtype: Dtype,
        slots: usize,
        capacity: usize,
    ) -> Result<Self, ModelError> {
        let mut cache = Self {
            keys: Vec::new(),
            values: Vec::new(),
            dtype,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            slots,
            capacity,
            growable: false,
            lengths: Vec::new(),
            running: 0,
            focus: Focus::Running,
        };
        (cache.keys, cache.values) = cache.zeroed(config.num_layers, slots, capacity)?;
        Ok(cache)
    }

    /// Rows the next step runs on.
    pub fn batch(&self) -> usize {
        self.window().len()
    }

    /// Occupied slots: running rows and the group being admitted.
    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    /// The slots the next step runs on.
    fn window(&self) -> Range<usize> {
        match self.focus {
            Focus::Running => 0..self.running,
            Focus::Admitted => self.running..self.lengths.len(),
        }
    }

    /// Aim the next steps at the running rows (a decode step while a group is being admitted).
    pub fn focus_running(&mut self) {
        self.focus = Focus::Running;
    }

    /// Aim the next steps at the group being admitted (its next prefill chunk).
    pub fn focus_admitted(&mut self) {
        self.focus = Focus::Admitted;
    }

    /// True while a group holds slots without having joined ([`KvCache::admit`]).
    pub fn admitting(&self) -> bool {
        self.lengths.len() > self.running
    }

    /// Slots in all, occupied or free.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Positions each slot holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Filled positions of each row the next step runs on.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths[self.window()]
    }

    /// The most positions any row of the next step has cached (the width of its attention mask
    /// before the step's own tokens).
    pub fn longest(&self) -> usize {
        self.lengths().iter().copied().max().unwrap_or(0)
    }

    /// Filled positions over all occupied slots: what `/metrics` reports as KV in use.
    pub fn filled_positions(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Bytes of the key and value buffers (allocated, whether or not rows fill them).
    pub fn bytes(&self) -> usize {
        2 * self.keys.len() * self.slots * self.slot_bytes()
    }

    /// The address of every layer's key and value buffer, in layer order: equal addresses across
    /// steps show that the steps wrote in place.
    pub fn buffer_addresses(&self) -> Vec<usize> {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|buffer| buffer.data_ptr() as usize)
            .collect()
    }

    /// Make room for `total` positions in every slot. A growable cache reallocates (copying the
    /// filled positions) only when it would overflow; a fixed one refuses.
    pub fn reserve(&mut self, total: usize) -> Result<(), ModelError> {
        if total <= self.capacity {
            return Ok(());
        }
        if !self.growable {
            return Err(ModelError::SlotFull {
                positions: total,
                capacity: self.capacity,
            });
        }
        let capacity = total.max(2 * self.capacity).max(MIN_GROWTH);
        tracing::debug!(from = self.capacity, to = capacity, "KV cache grows");
        self.resize(self.slots, capacity)
    }

    /// Claim `rows` free slots for a joining group whose steps will fill `positions` per row,
    /// and aim the next steps at them (empty, after the running rows). A growable cache makes
    /// room; a fixed one refuses a group that does not fit. Follow with [`KvCache::commit`] once
    /// the group's prefill succeeded, or [`KvCache::abandon`].
    pub fn admit(&mut self, rows: usize, positions: usize) -> Result<(), ModelError> {
        if self.admitting() {
            return Err(ModelError::Shape(
                "a group is already being admitted to this KV cache".into(),
            ));
        }
        let occupied = self.rows();
        let needed = occupied + rows;
        if needed > self.slots || positions > self.capacity {
            if !self.growable {
                return Err(ModelError::NoFreeSlot {
                    rows,
                    free: self.slots - occupied,
                    positions,
                    capacity: self.capacity,
                });
            }
            self.resize(needed.max(self.slots), positions.max(self.capacity))?;
        }
        self.lengths.resize(needed, 0);
        self.focus = Focus::Admitted;
        Ok(())
    }

    /// The admitted group becomes running rows: the next steps cover every occupied slot.
    pub fn commit(&mut self) {
        self.running = self.lengths.len();
        self.focus = Focus::Running;
    }

    /// Free the slots of the group being admitted (its prefill failed): the running rows are as
    /// they were.
    pub fn abandon(&mut self) {
        self.lengths.truncate(self.running);
        self.focus = Focus::Running;
    }

    /// Record that a step appended `tokens` positions to each of its rows.
    pub fn advance(&mut self, tokens: usize) {
        let window = self.window();
        for length in &mut self.lengths[window] {
            *length += tokens;
        }
    }

    /// GroupQueryAttention's lengths when the step's rows (or `rows`) end `tokens` positions
    /// past what they have cached: `seqlens_k` (each row's new length minus one) and
    /// `total_sequence_length` (the longest).
    pub(crate) fn attention_lengths(
        &self,
        tokens: usize,
        rows: Rows,
    ) -> Result<[DynValue; 2], ModelError> {
        let lengths = match rows {
            Rows::All => self.lengths(),
            Rows::One(row) => &self.lengths()[row..=row],
        };
        let as_i32 = |n: usize| {
            i32::try_from(n)
                .map_err(|_| ModelError::Shape(format!("{n} positions do not fit int32")))
        };
        let seqlens = lengths
            .iter()
            .map(|&length| as_i32(length + tokens - 1))
            .collect::<Result<Vec<i32>, _>>()?;
        let total = lengths.iter().copied().max().unwrap_or(0) + tokens;
        const WHAT: &str = "attention lengths";
        let seqlens = Tensor::from_array(ndarray::Array1::from(seqlens))
            .map_err(RuntimeError::tensor(WHAT))?;
        let total = Tensor::from_array(ndarray::arr0(as_i32(total)?))
            .map_err(RuntimeError::tensor(WHAT))?;
        Ok([seqlens.into_dyn(), total.into_dyn()])
    }

    /// Bind layer `layer`'s slots of the step's rows to `binding`: as the past inputs and, on the
    /// same memory, as the present outputs, so the graph appends in place. `Rows::One(r)` binds
    /// the step's row `r` alone.
    pub(crate) fn bind(
        &mut self,
        binding: &mut IoBinding,
        layer: usize,
        names: KvNames<'_>,
        rows: Rows,
        segment: &str,
    ) -> Result<(), ModelError> {
        let window = self.window();
        let (first, count) = match rows {
            Rows::All => (window.start, window.len()),
            Rows::One(row) if row < window.len() => (window.start + row, 1),
            Rows::One(row) => {
                return Err(ModelError::Shape(format!(
                    "row {row} is not among the step's {} rows",
                    window.len()
                )))
            }
        };
        let shape = [count, self.kv_heads, self.capacity, self.head_dim];
        let offset = first * self.slot_bytes();
        let dtype = self.dtype;
        let pairs = [
            (&mut self.keys[layer], names.past_key, names.present_key),
            (
                &mut self.values[layer],
                names.past_value,
                names.present_value,
            ),
        ];
        for (buffer, past, present) in pairs {
            // SAFETY: the rows `first..first + count` lie within the buffer, and the binding that
            // holds the views runs and is dropped before the cache changes (every caller binds,
            // runs and drops within one layer call).
            let mut view = || unsafe { slot_value(buffer.data_ptr_mut(), offset, &shape, dtype) };
            // Past and present on the same memory: GroupQueryAttention then appends in place.
            binding
                .bind_input(past, &view()?)
                .map_err(run_error(segment))?;
            binding
                .bind_output(present, view()?)
                .map_err(run_error(segment))?;
        }
        Ok(())
    }

    /// Free the slots of the running rows `leaving` (indices among the running rows): the last
    /// running rows move into the holes, one row's filled positions each, and a group being
    /// admitted moves down behind them. Returns the new order of the running rows: slot `i` now
    /// holds the row that was at `order[i]`.
    pub fn release(&mut self, leaving: &[usize]) -> Result<Vec<usize>, ModelError> {
        let rows = self.running;
        if let Some(&bad) = leaving.iter().find(|&&r| r >= rows) {
            return Err(ModelError::Shape(format!(
                "row {bad} is not among the cache's {rows} running rows"
            )));
        }
        let mut order: Vec<usize> = (0..rows).collect();
        let mut kept = rows;
        let mut moves = Vec::new();
        let mut holes: Vec<usize> = leaving.to_vec();
        holes.sort_unstable();
        holes.dedup();
        for &hole in &holes {
            // Leaving rows at the end go first: they need no move.
            while kept > 0 && holes.binary_search(&order[kept - 1]).is_ok() {
                kept -= 1;
            }
            if hole >= kept {
                break;
            }
            moves.push((kept - 1, hole));
            order[hole] = order[kept - 1];
            kept -= 1;
        }
        order.truncate(kept);
        let admitted = self.running..self.lengths.len();
        moves.extend(admitted.clone().map(|from| (from, from - (rows - kept))));
        for &(from, to) in moves.iter().filter(|(from, to)| from != to) {
            self.move_row(from, to)?;
        }
        self.lengths = order
            .iter()
            .copied()
            .chain(admitted)
            .map(|row| self.lengths[row])
            .collect();
        self.running = kept;
        Ok(order)
    }

    /// The bytes of positions `start..start + count` of the step's row `row`, in every buffer
    /// (keys of each layer, then values; each `[kv_heads, count, head_dim]`): a block of a prompt
    /// prefix to keep.
    pub fn read_positions(
        &mut self,
        row: usize,
        start: usize,
        count: usize,
    ) -> Result<Vec<u8>, ModelError> {
        let slot = self.slot_of(row, start + count)?;
        let shape = self.byte_shape(self.slots, self.capacity);
        let mut bytes = Vec::with_capacity(self.block_bytes(count));
        for buffer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let view = byte_view(buffer, shape);
            for head in 0..shape[1] {
                // One head's positions are contiguous in a slot.
                let lane = view.slice(ndarray::s![slot, head, start..start + count, ..]);
                match lane.as_slice() {
                    Some(lane) => bytes.extend_from_slice(lane),
                    None => bytes.extend(lane.iter()),
                }
            }
        }
        Ok(bytes)
    }

    /// Write `bytes` (as [`KvCache::read_positions`] returns them) at positions
    /// `start..start + count` of the step's row `row`. The row's length is not changed: follow
    /// with a step that continues from there, or [`KvCache::advance`].
    pub fn write_positions(
        &mut self,
        row: usize,
        start: usize,
        count: usize,
        bytes: &[u8],
    ) -> Result<(), ModelError> {
        let slot = self.slot_of(row, start + count)?;
        if bytes.len() != self.block_bytes(count) {
            return Err(ModelError::Shape(format!(
                "{} bytes do not hold {count} positions of this cache ({} bytes)",
                bytes.len(),
                self.block_bytes(count)
            )));
        }
        let shape = self.byte_shape(self.slots, self.capacity);
        let per_buffer = bytes.len() / (self.keys.len() + self.values.len()).max(1);
        let buffers = self.keys.iter_mut().chain(self.values.iter_mut());
        let per_head = per_buffer / shape[1].max(1);
        for (buffer, part) in buffers.zip(bytes.chunks_exact(per_buffer.max(1))) {
            let mut view = byte_view(buffer, shape);
            for (head, from) in part.chunks_exact(per_head.max(1)).enumerate() {
                let mut lane = view.slice_mut(ndarray::s![slot, head, start..start + count, ..]);
                match lane.as_slice_mut() {
                    Some(lane) => lane.copy_from_slice(from),
                    None => lane.iter_mut().zip(from).for_each(|(to, from)| *to = *from),
                }
            }
        }
        Ok(())
    }

    /// Bytes of `count` positions of one row in every buffer.
    pub fn block_bytes(&self, count: usize) -> usize {
        (self.keys.len() + self.values.len())
            * self.kv_heads
            * count
            * self.head_dim
            * self.element_bytes()
    }

    /// The slot of the step's row `row`, checked to hold `end` positions.
    fn slot_of(&self, row: usize, end: usize) -> Result<usize, ModelError> {
        let window = self.window();
        if row >= window.len() || end > self.capacity {
            return Err(ModelError::Shape(format!(
                "positions up to {end} of row {row} are outside {} rows of {} positions",
                window.len(),
                self.capacity
            )));
        }
        Ok(window.start + row)
    }

    /// A growable cache whose rows are copies of these rows `rows` (repeats allowed; indices
    /// among the step's rows), each with its length: one prompt's cache shared by several
    /// continuations.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<KvCache, ModelError> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch()) {
            return Err(ModelError::Shape(format!(
                "row {bad} is not among the cache's {} rows",
                self.batch()
            )));
        }
        let first = self.window().start;
        let mut copy = Self {
            keys: Vec::new(),
            values: Vec::new(),
            growable: true,
            lengths: rows.iter().map(|&r| self.lengths[first + r]).collect(),
            running: rows.len(),
            focus: Focus::Running,
            slots: rows.len(),
            ..*self
        };
        (copy.keys, copy.values) = copy.zeroed(self.keys.len(), rows.len(), self.capacity)?;
        let moves: Vec<(usize, usize, usize)> = rows
            .iter()
            .enumerate()
            .map(|(to, &from)| (first + from, to, self.lengths[first + from]))
            .collect();
        self.copy_rows(&mut copy, &moves);
        Ok(copy)
    }

    /// Copy slot `from`'s filled positions into slot `to` (< `from`), in every buffer.
    fn move_row(&mut self, from: usize, to: usize) -> Result<(), ModelError> {
        let length = self.lengths[from];
        let shape = self.byte_shape(self.slots, self.capacity);
        for buffer in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut slots = byte_view(buffer, shape);
            let (mut low, high) = slots.view_mut().split_at(Axis(0), from);
            low.index_axis_mut(Axis(0), to)
                .slice_axis_mut(Axis(1), Slice::from(..length))
                .assign(
                    &high
                        .index_axis(Axis(0), 0)
                        .slice_axis(Axis(1), Slice::from(..length)),
                );
        }
        Ok(())
    }

    /// Reallocate to `slots` slots of `capacity` positions, the occupied rows' filled positions
    /// copied over.
    fn resize(&mut self, slots: usize, capacity: usize) -> Result<(), ModelError> {
        let mut grown = Self {
            keys: Vec::new(),
            values: Vec::new(),
            lengths: Vec::new(),
            slots,
            capacity,
            ..*self
        };
        (grown.keys, grown.values) = self.zeroed(self.keys.len(), slots, capacity)?;
        let moves: Vec<(usize, usize, usize)> = (self.lengths.iter().enumerate())
            .map(|(row, &length)| (row, row, length))
            .collect();
        self.copy_rows(&mut grown, &moves);
        (self.keys, self.values, self.slots, self.capacity) =
            (grown.keys, grown.values, slots, capacity);
        Ok(())
    }

    /// Copy, in every buffer, the first `length` positions of this cache's slot `from` into
    /// `to`'s slot `into`, for each `(from, into, length)` of `moves`.
    fn copy_rows(&mut self, to: &mut KvCache, moves: &[(usize, usize, usize)]) {
        let (from_shape, into_shape) = (
            self.byte_shape(self.slots, self.capacity),
            to.byte_shape(to.slots, to.capacity),
        );
        let pairs = (to.keys.iter_mut().chain(to.values.iter_mut()))
            .zip(self.keys.iter_mut().chain(self.values.iter_mut()));
        for (into_buffer, from_buffer) in pairs {
            let from_view = byte_view(from_buffer, from_shape);
            let mut into_view = byte_view(into_buffer, into_shape);
            for &(from, into, length) in moves {
                into_view
                    .slice_mut(ndarray::s![into, .., ..length, ..])
                    .assign(&from_view.slice(ndarray::s![from, .., ..length, ..]));
            }
        }
    }

    fn element_bytes(&self) -> usize {
        element_bytes(self.dtype)
    }

    /// A buffer of `slots` x `capacity` as bytes: `[slots, kv_heads, capacity, head_dim bytes]`.
    fn byte_shape(&self, slots: usize, capacity: usize) -> [usize; 4] {
        [
            slots,
            self.kv_heads,
            capacity,
            self.head_dim * self.element_bytes(),
        ]
    }

    fn slot_bytes(&self) -> usize {
        self.kv_heads * self.capacity * self.head_dim * self.element_bytes()
    }

    /// Zeroed key and value buffers for `layers` layers. Zeroed fp32 memory comes from the
    /// allocator's zeroed pages, so the pages of a slot no row writes are never touched.
    fn zeroed(
        &self,
        layers: usize,
        slots: usize,
        capacity: usize,
    ) -> Result<(Vec<DynTensor>, Vec<DynTensor>), ModelError> {
        let shape = [slots, self.kv_heads, capacity, self.head_dim];
        let mut buffers = (0..2 * layers)
            .map(|_| {
                let tensor = match self.dtype {
                    Dtype::Fp32 => {
                        Tensor::from_array(ArrayD::<f32>::zeros(IxDyn(&shape))).map(Tensor::upcast)
                    }
                    Dtype::Fp16 => {
                        Tensor::from_array(ArrayD::from_elem(IxDyn(&shape), half::f16::ZERO))
                            .map(Tensor::upcast)
                    }
                };
                tensor.map_err(run_error("KV cache"))
            })
            .collect::<Result<Vec<DynTensor>, ModelError>>()?;
        let values = buffers.split_off(layers);
        Ok((buffers, values))
    }
}

/// Bytes of one element of a KV buffer in `dtype`.
fn element_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::Fp32 => 4,
        Dtype::Fp16 => 2,
    }
}

/// The bytes of a KV buffer allocated as `shape` (`[slots, kv_heads, capacity, head_dim bytes]`):
/// moving positions between slots needs no element type.
fn byte_view(buffer: &mut DynTensor, shape: [usize; 4]) -> ArrayViewMut4<'_, u8> {
    // SAFETY: every buffer is allocated by `KvCache::zeroed` with exactly this many bytes, and the
    // view borrows the tensor mutably for its lifetime.
    unsafe { ArrayViewMut4::from_shape_ptr(shape, buffer.data_ptr_mut().cast::<u8>()) }
}

/// A tensor `shape` in the bundle's dtype over the KV buffer at `base`, from byte `offset` on.
/// Made as ONNX Runtime's own value over the caller's memory (not a borrowed view, which
/// `IoBinding` would copy before binding), so past and present bind the same bytes.
///
/// # Safety
/// `offset` plus the bytes of `shape` must lie within the buffer at `base`, and the value must
/// not be used after the buffer changes or is dropped.
unsafe fn slot_value(
    base: *mut std::ffi::c_void,
    offset: usize,
    shape: &[usize; 4],
    dtype: Dtype,
) -> Result<DynValue, ModelError> {
    let info = host_memory()?;
    let element = match dtype {
        Dtype::Fp32 => ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
        Dtype::Fp16 => ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
    };
    let dims = shape.map(|d| d as i64);
    let length = shape.iter().product::<usize>() * element_bytes(dtype);
    let mut value = std::ptr::null_mut();
    let status = (ort::api().CreateTensorWithDataAsOrtValue)(
        info.ptr(),
        base.cast::<u8>().add(offset).cast(),
        length,
        dims.as_ptr(),
        dims.len(),
        element,
        &mut value,
    );
    ort::Error::result_from_status(status).map_err(run_error("KV cache"))?;
    let value = NonNull::new(value)
        .ok_or_else(|| ModelError::Shape("ONNX Runtime made no KV view".into()))?;
    // ONNX Runtime never frees memory it did not allocate; the allocator only satisfies `from_ptr`.
    Ok(DynValue::from_ptr(value, Some(&Allocator::default())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize) -> ModelConfig {
        crate::bundle::manifest::tiny_config(layers)
    }

    /// A fixed cache of `slots` slots of `capacity` positions whose rows have `lengths`, every
    /// filled key `slot * 100 + position` (values + 1000).
    fn cache(slots: usize, capacity: usize, lengths: &[usize]) -> KvCache {
        crate::runtime::test_runtime();
        let mut kv = KvCache::with_slots(&config(1), Dtype::Fp32, slots, capacity).unwrap();
        for &length in lengths {
            kv.admit(1, length).unwrap();
            kv.advance(length);
            kv.commit();
        }
        for (buffer, offset) in [(&mut kv.keys[0], 0.0), (&mut kv.values[0], 1000.0)] {
            let mut array = buffer.try_extract_array_mut::<f32>().unwrap();
            for (slot, &length) in lengths.iter().enumerate() {
                for position in 0..length {
                    array
                        .slice_mut(ndarray::s![slot, .., position, ..])
                        .fill(offset + (slot * 100 + position) as f32);
                }
            }
        }
        kv
    }

    fn key(cache: &KvCache, slot: usize, position: usize) -> f32 {
        cache.keys[0].try_extract_array::<f32>().unwrap()[[slot, 0, position, 0]]
    }

    #[test]
    fn a_group_takes_free_slots_and_leaves_them_free_when_abandoned() {
        let mut kv = cache(3, 8, &[2, 5]);
        assert_eq!((kv.rows(), kv.batch(), kv.longest()), (2, 2, 5));
        let before = kv.buffer_addresses();
        kv.admit(1, 4).unwrap();
        assert_eq!((kv.batch(), kv.lengths()), (1, &[0][..]));
        kv.abandon();
        assert_eq!((kv.rows(), kv.lengths()), (2, &[2, 5][..]));
        let full = kv.admit(2, 4).unwrap_err().to_string();
        assert!(full.contains("1 KV slots are free"), "{full}");
        let long = kv.admit(1, 9).unwrap_err().to_string();
        assert!(long.contains("8 positions each"), "{long}");
        assert!(matches!(
            kv.reserve(9),
            Err(ModelError::SlotFull {
                positions: 9,
                capacity: 8
            })
        ));
        assert_eq!(kv.buffer_addresses(), before, "a fixed cache never moves");
    }

    #[test]
    fn rows_of_different_lengths_attend_to_their_own() {
        let kv = cache(3, 8, &[2, 5]);
        let [seqlens, total] = kv.attention_lengths(1, Rows::All).unwrap();
        let seqlens = seqlens.try_extract_array::<i32>().unwrap();
        assert_eq!(seqlens.as_slice(), Some(&[2, 5][..]));
        assert_eq!(total.try_extract_array::<i32>().unwrap()[[]], 6);
        let [one, _] = kv.attention_lengths(3, Rows::One(0)).unwrap();
        assert_eq!(
            one.try_extract_array::<i32>().unwrap().as_slice(),
            Some(&[4][..])
        );
    }

    #[test]
    fn a_leaving_row_frees_its_slot_and_the_last_row_moves_in() {
        let mut kv = cache(4, 8, &[2, 3, 4, 1]);
        let before = kv.buffer_addresses();
        let order = kv.release(&[0, 3]).unwrap();
        assert_eq!(order, vec![2, 1]);
        assert_eq!(kv.lengths(), &[4, 3]);
        assert_eq!((key(&kv, 0, 0), key(&kv, 0, 3)), (200.0, 203.0));
        assert_eq!(
            key(&kv, 1, 2),
            102.0,
            "a row that stays in its slot is not copied"
        );
        let value = kv.values[0].try_extract_array::<f32>().unwrap()[[0, 0, 3, 1]];
        assert_eq!(value, 1203.0);
        assert_eq!(kv.buffer_addresses(), before);
        assert_eq!(kv.release(&[1]).unwrap(), vec![0]);
        assert_eq!(kv.release(&[0]).unwrap(), Vec::<usize>::new());
        assert_eq!((kv.rows(), kv.filled_positions()), (0, 0));
        assert!(kv.release(&[0]).is_err());
    }

    #[test]
    fn a_growable_cache_keeps_its_rows_when_it_grows() {
        crate::runtime::test_runtime();
        let mut kv = KvCache::empty(&config(1), Dtype::Fp32, 0).unwrap();
        kv.admit(2, 3).unwrap();
        kv.advance(3);
        kv.commit();
        kv.keys[0].try_extract_array_mut::<f32>().unwrap()[[1, 0, 2, 1]] = 7.0;
        let before = kv.buffer_addresses();
        kv.reserve(3).unwrap();
        assert_eq!(kv.buffer_addresses(), before, "enough room: nothing moves");
        kv.reserve(5).unwrap();
        assert_eq!(kv.capacity(), MIN_GROWTH);
        assert_eq!(
            kv.keys[0].try_extract_array::<f32>().unwrap()[[1, 0, 2, 1]],
            7.0
        );
        kv.admit(1, 100).unwrap();
        assert_eq!((kv.slots(), kv.capacity()), (3, 100));
        assert_eq!(
            kv.keys[0].try_extract_array::<f32>().unwrap()[[1, 0, 2, 1]],
            7.0
        );
    }

    #[test]
    fn selected_rows_are_copies_with_their_lengths() {
        let mut kv = cache(3, 8, &[2, 3]);
        let copy = kv.select_rows(&[1, 1, 0]).unwrap();
        assert_eq!((copy.batch(), copy.lengths()), (3, &[3, 3, 2][..]));
        assert_eq!(
            (key(&copy, 0, 2), key(&copy, 1, 2), key(&copy, 2, 1)),
            (102.0, 102.0, 1.0)
        );
        assert!(kv.select_rows(&[2]).is_err());
    }
}
