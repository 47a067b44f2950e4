//! Per-layer keys and values kept between steps: one buffer per layer that the layer graphs
//! append to in place, and the row operations a running batch needs.
//!
//! Each layer's keys (and values) live in one tensor `[B, kv_heads, capacity, head_dim]`. A step
//! binds it as both `past_key` and `present_key`, and ONNX Runtime's GroupQueryAttention writes
//! the step's keys at positions `len..len + T` and attends over `0..len + T` of the same memory:
//! nothing is concatenated or copied per step. The buffer is reallocated only when a step would
//! pass its capacity ([`KvCache::reserve`] sizes it once when the final length is known), or when
//! rows join or leave a running batch.

use ndarray::{ArrayD, ArrayView4, Axis, IxDyn, Slice};
use ort::session::IoBinding;
use ort::value::{DynTensor, DynValueRefMut, Shape, Tensor, TensorRefMut};

use super::{host_memory, run_error, ModelError};
use crate::bundle::{Dtype, ModelConfig};

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

/// Per-layer key and value buffers `[B, kv_heads, capacity, head_dim]`, of which the first `len`
/// positions are filled.
#[derive(Debug)]
pub struct KvCache {
    keys: Vec<DynTensor>,
    values: Vec<DynTensor>,
    dtype: Dtype,
    kv_heads: usize,
    head_dim: usize,
    batch: usize,
    capacity: usize,
    pub(super) len: usize,
}

impl KvCache {
    /// An empty cache (no positions, no capacity yet) for `batch` rows.
    pub fn empty(config: &ModelConfig, dtype: Dtype, batch: usize) -> Result<Self, ModelError> {
        let mut cache = Self {
            keys: Vec::new(),
            values: Vec::new(),
            dtype,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            batch,
            capacity: 0,
            len: 0,
        };
        let empty = cache.buffers(&vec![None; 2 * config.num_layers], 0)?;
        (cache.keys, cache.values) = empty;
        Ok(cache)
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

    /// Positions each row's buffers hold before they must be reallocated.
    pub fn capacity(&self) -> usize {
        self.capacity
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

    /// Make room for `total` positions per row. Call it once with the final length (prompt plus
    /// new tokens) so that no step reallocates; steps call it with their own end, which grows the
    /// buffers (copying the filled positions) only when they would overflow.
    pub fn reserve(&mut self, total: usize) -> Result<(), ModelError> {
        if total <= self.capacity {
            return Ok(());
        }
        let capacity = total.max(2 * self.capacity).max(MIN_GROWTH);
        tracing::debug!(from = self.capacity, to = capacity, "KV cache grows");
        let filled = self.filled(0..self.batch, 0)?;
        (self.keys, self.values) = self.buffers(&filled, capacity)?;
        self.capacity = capacity;
        Ok(())
    }

    /// Bind layer `layer`'s buffers to `binding`: as the past inputs and, on the same memory, as
    /// the present outputs, so the graph appends in place. `Rows::One(r)` binds row `r` alone.
    pub(crate) fn bind(
        &mut self,
        binding: &mut IoBinding,
        layer: usize,
        names: KvNames<'_>,
        rows: Rows,
        segment: &str,
    ) -> Result<(), ModelError> {
        let shape = [
            self.rows_in(rows),
            self.kv_heads,
            self.capacity,
            self.head_dim,
        ];
        let offset = match rows {
            Rows::All => 0,
            Rows::One(row) => row * self.kv_heads * self.capacity * self.head_dim,
        };
        let dtype = self.dtype;
        let pairs = [
            (&self.keys[layer], names.past_key, names.present_key),
            (&self.values[layer], names.past_value, names.present_value),
        ];
        for (buffer, past, present) in pairs {
            let base = buffer.data_ptr() as usize;
            match rows {
                // An owned tensor is bound as it is: ONNX Runtime reads and writes its memory.
                Rows::All => binding.bind_input(past, buffer),
                // One row is read from a copy: the graph then copies the cached prefix into the
                // output view (the same bytes) before appending.
                Rows::One(row) => binding.bind_input(past, &row_copy(buffer, row, dtype)?),
            }
            .map_err(run_error(segment))?;
            binding
                .bind_output(present, memory_view(base, offset, &shape, dtype)?)
                .map_err(run_error(segment))?;
        }
        Ok(())
    }

    /// Keep the rows `keep`, in that order, and drop the others (a finished request leaves a
    /// running batch), and the first `front` positions, which must be padding for every kept row
    /// (a long row that left no longer widens the others). All or nothing: on error the cache is
    /// as it was.
    pub fn retain_rows(&mut self, keep: &[usize], front: usize) -> Result<(), ModelError> {
        if let Some(&bad) = keep.iter().find(|&&r| r >= self.batch) {
            return Err(ModelError::Shape(format!(
                "row {bad} is not in a cache of {} rows",
                self.batch
            )));
        }
        if front > self.len {
            return Err(ModelError::Shape(format!(
                "cannot drop {front} positions of a cache of {}",
                self.len
            )));
        }
        let kept = self.filled(keep.iter().copied(), front)?;
        let mut next = Self {
            batch: keep.len(),
            len: self.len - front,
            keys: Vec::new(),
            values: Vec::new(),
            ..*self
        };
        (next.keys, next.values) = next.buffers(&kept, self.capacity)?;
        *self = next;
        Ok(())
    }

    /// Append the rows of `other` (a group prefilled on its own) below these. The shorter cache is
    /// left-padded with zeros so that both share one length; returns how many positions were
    /// padded in front of (these rows, `other`'s rows), which their attention masks must mask out.
    /// All or nothing: on error this cache is as it was.
    pub fn append_rows(&mut self, other: &KvCache) -> Result<(usize, usize), ModelError> {
        if self.keys.len() != other.keys.len()
            || (self.kv_heads, self.head_dim) != (other.kv_heads, other.head_dim)
        {
            return Err(ModelError::Shape(format!(
                "caches of {} and {} layers ({}x{} and {}x{} per position) cannot be merged",
                self.keys.len(),
                other.keys.len(),
                self.kv_heads,
                self.head_dim,
                other.kv_heads,
                other.head_dim
            )));
        }
        let len = self.len.max(other.len);
        let pads = (len - self.len, len - other.len);
        let mine = self.filled(0..self.batch, 0)?;
        let theirs = other.filled(0..other.batch, 0)?;
        let stacked = mine
            .into_iter()
            .zip(theirs)
            .map(|(a, b)| match (a, b) {
                (Some(a), Some(b)) => stack_padded(a, b, len).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut next = Self {
            batch: self.batch + other.batch,
            len,
            capacity: self.capacity.max(other.capacity).max(len),
            keys: Vec::new(),
            values: Vec::new(),
            ..*self
        };
        (next.keys, next.values) = next.buffers(&stacked, next.capacity)?;
        *self = next;
        Ok(pads)
    }

    fn rows_in(&self, rows: Rows) -> usize {
        match rows {
            Rows::All => self.batch,
            Rows::One(_) => 1,
        }
    }

    /// The filled positions `front..len` of `rows`, per buffer (keys of every layer, then values),
    /// as fp32 `[rows, kv_heads, len - front, head_dim]`; `None` for a buffer with no positions.
    fn filled(
        &self,
        rows: impl Iterator<Item = usize> + Clone,
        front: usize,
    ) -> Result<Vec<Option<ArrayD<f32>>>, ModelError> {
        let rows: Vec<usize> = rows.collect();
        self.keys
            .iter()
            .chain(&self.values)
            .map(|buffer| {
                if self.len == front {
                    return Ok(None);
                }
                let select = |view: ArrayView4<'_, f32>| {
                    view.select(Axis(0), &rows)
                        .slice_axis(Axis(2), Slice::from(front..self.len))
                        .into_dyn()
                        .into_owned()
                };
                Ok(Some(with_f32_view(buffer, select)?))
            })
            .collect()
    }

    /// Key and value buffers of `capacity` positions for this cache's rows, with `filled` (as
    /// [`KvCache::filled`] returns them) written at the front and zeros after.
    fn buffers(
        &self,
        filled: &[Option<ArrayD<f32>>],
        capacity: usize,
    ) -> Result<(Vec<DynTensor>, Vec<DynTensor>), ModelError> {
        let shape = [self.batch, self.kv_heads, capacity, self.head_dim];
        let mut buffers = filled
            .iter()
            .map(|part| {
                let mut buffer = ArrayD::<f32>::zeros(IxDyn(&shape));
                if let Some(part) = part {
                    buffer
                        .slice_axis_mut(Axis(2), Slice::from(..part.shape()[2]))
                        .assign(part);
                }
                buffer_in(buffer, self.dtype)
            })
            .collect::<Result<Vec<DynTensor>, ModelError>>()?;
        let values = buffers.split_off(buffers.len() / 2);
        Ok((buffers, values))
    }
}

/// `a` over `b` along the batch axis, each left-padded with zeros to `len` positions (axis 2).
fn stack_padded(a: ArrayD<f32>, b: ArrayD<f32>, len: usize) -> Result<ArrayD<f32>, ModelError> {
    let pad = |array: ArrayD<f32>| {
        let mut shape = array.shape().to_vec();
        let own = shape[2];
        shape[2] = len;
        let mut padded = ArrayD::<f32>::zeros(shape);
        padded
            .slice_axis_mut(Axis(2), Slice::from(len - own..))
            .assign(&array);
        padded
    };
    ndarray::concatenate(Axis(0), &[pad(a).view(), pad(b).view()])
        .map_err(|e| ModelError::Shape(format!("KV caches do not stack: {e}")))
}

/// `take` applied to a KV buffer as a 4-D fp32 view (an fp16 buffer is widened first).
fn with_f32_view<R>(
    buffer: &DynTensor,
    take: impl Fn(ArrayView4<'_, f32>) -> R,
) -> Result<R, ModelError> {
    let four = |view: ndarray::ArrayViewD<'_, f32>| {
        view.into_dimensionality::<ndarray::Ix4>()
            .map(&take)
            .map_err(|e| ModelError::Shape(format!("KV buffer is not 4-D: {e}")))
    };
    if let Ok(view) = buffer.try_extract_array::<f32>() {
        return four(view);
    }
    let view = buffer
        .try_extract_array::<half::f16>()
        .map_err(|e| ModelError::Shape(format!("KV buffer is neither fp32 nor fp16: {e}")))?;
    four(view.mapv(half::f16::to_f32).view())
}

/// A tensor over `shape` elements of the buffer at address `base`, from element `offset` on.
fn memory_view(
    base: usize,
    offset: usize,
    shape: &[usize; 4],
    dtype: Dtype,
) -> Result<DynValueRefMut<'static>, ModelError> {
    let info = host_memory()?;
    let shape = Shape::from(shape.map(|d| d as i64));
    // SAFETY: `bind` binds the view for one run of a binding that the caller drops before the
    // cache changes, and `offset + shape` elements lie within the buffer (`Rows::One(r)` addresses
    // a row r < batch).
    let view = unsafe {
        match dtype {
            Dtype::Fp32 => {
                let data = (base as *mut f32).add(offset).cast();
                TensorRefMut::<f32>::from_raw(info, data, shape).map(|v| v.into_dyn())
            }
            Dtype::Fp16 => {
                let data = (base as *mut half::f16).add(offset).cast();
                TensorRefMut::<half::f16>::from_raw(info, data, shape).map(|v| v.into_dyn())
            }
        }
    };
    view.map_err(run_error("KV cache"))
}

/// A copy of row `row` of a KV buffer, `[1, kv_heads, capacity, head_dim]`.
fn row_copy(buffer: &DynTensor, row: usize, dtype: Dtype) -> Result<DynTensor, ModelError> {
    fn copy<T: ort::value::PrimitiveTensorElementType + Clone + std::fmt::Debug + 'static>(
        buffer: &DynTensor,
        row: usize,
    ) -> Result<DynTensor, ModelError> {
        let view = buffer
            .try_extract_array::<T>()
            .map_err(run_error("KV cache"))?;
        let one = view.select(Axis(0), &[row]);
        Tensor::from_array(one)
            .map(Tensor::upcast)
            .map_err(run_error("KV cache"))
    }
    match dtype {
        Dtype::Fp32 => copy::<f32>(buffer, row),
        Dtype::Fp16 => copy::<half::f16>(buffer, row),
    }
}

/// An fp32 array as a KV buffer of `dtype`.
fn buffer_in(array: ArrayD<f32>, dtype: Dtype) -> Result<DynTensor, ModelError> {
    let tensor = match dtype {
        Dtype::Fp32 => Tensor::from_array(array).map(Tensor::upcast),
        Dtype::Fp16 => Tensor::from_array(array.mapv(half::f16::from_f32)).map(Tensor::upcast),
    };
    tensor.map_err(run_error("KV cache"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(layers: usize) -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "architecture": "llama", "hidden_size": 2, "num_layers": layers, "num_attention_heads": 1,
            "num_key_value_heads": 1, "head_dim": 2, "vocab_size": 3, "max_position_embeddings": 64,
            "eos_token_ids": [0]
        }))
        .unwrap()
    }

    /// A cache of `rows` rows whose every entry is `row * 100 + position` (+ 1000 for values),
    /// `len` positions filled of `capacity`.
    fn cache(rows: usize, len: usize, capacity: usize, first_row: usize) -> KvCache {
        crate::runtime::test_runtime();
        let mut kv = KvCache::empty(&config(1), Dtype::Fp32, rows).unwrap();
        let part = |offset: f32| {
            Some(
                ndarray::Array4::from_shape_fn((rows, 1, len, 2), |(r, _, p, _)| {
                    offset + ((first_row + r) * 100 + p) as f32
                })
                .into_dyn(),
            )
        };
        (kv.keys, kv.values) = kv.buffers(&[part(0.0), part(1000.0)], capacity).unwrap();
        kv.capacity = capacity;
        kv.len = len;
        kv
    }

    fn keys(cache: &KvCache) -> ndarray::ArrayD<f32> {
        cache.keys[0].try_extract_array::<f32>().unwrap().to_owned()
    }

    #[test]
    fn retained_rows_keep_their_order_contents_and_capacity() {
        let mut kv = cache(3, 2, 8, 0);
        kv.retain_rows(&[2, 0], 0).unwrap();
        assert_eq!((kv.batch(), kv.capacity()), (2, 8));
        let keys = keys(&kv);
        assert_eq!(keys.shape(), &[2, 1, 8, 2]);
        assert_eq!(keys[[0, 0, 1, 0]], 201.0);
        assert_eq!(keys[[1, 0, 0, 1]], 0.0);
        assert!(kv.retain_rows(&[5], 0).is_err());
        assert!(kv.retain_rows(&[0], 3).is_err());
    }

    #[test]
    fn dropped_front_positions_shorten_every_kept_row() {
        let mut kv = cache(3, 4, 4, 0);
        kv.retain_rows(&[1], 3).unwrap();
        assert_eq!((kv.batch(), kv.len()), (1, 1));
        assert_eq!(keys(&kv)[[0, 0, 0, 0]], 103.0);
        assert_eq!(keys(&kv)[[0, 0, 1, 0]], 0.0, "freed positions are zero");
    }

    #[test]
    fn appended_rows_are_left_padded_to_one_length() {
        let mut kv = cache(1, 3, 4, 0);
        let pads = kv.append_rows(&cache(2, 1, 6, 1)).unwrap();
        assert_eq!(pads, (0, 2));
        assert_eq!((kv.batch(), kv.len(), kv.capacity()), (3, 3, 6));
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

    #[test]
    fn a_failed_append_leaves_the_cache_as_it_was() {
        let mut kv = cache(1, 3, 4, 0);
        let mut other = cache(1, 2, 4, 1);
        other.head_dim = 3;
        assert!(kv.append_rows(&other).is_err());
        assert_eq!((kv.batch(), kv.len()), (1, 3));
        assert_eq!(keys(&kv)[[0, 0, 2, 0]], 2.0);
    }

    #[test]
    fn reserving_keeps_the_filled_positions_and_only_grows() {
        let mut kv = cache(2, 3, 4, 0);
        let before = kv.buffer_addresses();
        kv.reserve(4).unwrap();
        assert_eq!(kv.buffer_addresses(), before, "enough room: nothing moves");
        kv.reserve(5).unwrap();
        assert_eq!(kv.capacity(), MIN_GROWTH);
        assert_eq!(keys(&kv)[[1, 0, 2, 1]], 102.0);
        assert_eq!(keys(&kv)[[1, 0, 3, 1]], 0.0);
    }
}
