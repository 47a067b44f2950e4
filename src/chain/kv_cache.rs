//! Per-layer keys and values kept between steps, and the row operations a running batch needs.

use ndarray::{ArrayD, Axis, IxDyn};
use ort::value::DynValue;

use super::ModelError;
use crate::bundle::{Dtype, ModelConfig};
use crate::runtime::values::{to_f32, value_in};

/// Per-layer key and value tensors `[B, kv_heads, P, head_dim]` kept between steps.
#[derive(Debug)]
pub struct KvCache {
    pub(super) keys: Vec<DynValue>,
    pub(super) values: Vec<DynValue>,
    batch: usize,
    pub(super) len: usize,
}

impl KvCache {
    /// An empty cache (P = 0) for `batch` rows.
    pub fn empty(config: &ModelConfig, dtype: Dtype, batch: usize) -> Result<Self, ModelError> {
        let shape = [batch, config.num_key_value_heads, 0, config.head_dim];
        let make = || {
            (0..config.num_layers)
                .map(|_| value_in(ArrayD::zeros(IxDyn(&shape)), dtype, "empty KV cache"))
                .collect::<Result<Vec<_>, _>>()
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
        let select = |value: &DynValue| {
            let (array, dtype) = to_f32(value, "KV cache")?;
            let kept = array.select(Axis(0), keep);
            let kept = kept.slice_axis(Axis(2), ndarray::Slice::from(front..));
            value_in(kept.as_standard_layout().into_owned(), dtype, "KV cache")
        };
        let keys = self
            .keys
            .iter()
            .map(select)
            .collect::<Result<Vec<_>, _>>()?;
        let values = self
            .values
            .iter()
            .map(select)
            .collect::<Result<Vec<_>, _>>()?;
        (self.keys, self.values) = (keys, values);
        self.batch = keep.len();
        self.len -= front;
        Ok(())
    }

    /// Append the rows of `other` (a group prefilled on its own) below these. The shorter cache is
    /// left-padded with zeros so that both share one length; returns how many positions were
    /// padded in front of (these rows, `other`'s rows), which their attention masks must mask out.
    /// All or nothing: on error this cache is as it was.
    pub fn append_rows(&mut self, other: &KvCache) -> Result<(usize, usize), ModelError> {
        if self.keys.len() != other.keys.len() {
            return Err(ModelError::Shape(format!(
                "caches of {} and {} layers cannot be merged",
                self.keys.len(),
                other.keys.len()
            )));
        }
        let len = self.len.max(other.len);
        let pads = (len - self.len, len - other.len);
        let stack = |(mine, theirs): (&DynValue, &DynValue)| stack_padded(mine, theirs, len);
        let keys = self.keys.iter().zip(&other.keys).map(stack);
        let keys = keys.collect::<Result<Vec<_>, _>>()?;
        let values = self.values.iter().zip(&other.values).map(stack);
        let values = values.collect::<Result<Vec<_>, _>>()?;
        (self.keys, self.values) = (keys, values);
        self.batch += other.batch;
        self.len = len;
        Ok(pads)
    }
}

/// `a` over `b` along the batch axis, each left-padded with zeros to `len` positions (axis 2).
fn stack_padded(a: &DynValue, b: &DynValue, len: usize) -> Result<DynValue, ModelError> {
    let pad = |array: ArrayD<f32>| {
        let mut shape = array.shape().to_vec();
        let own = shape[2];
        shape[2] = len;
        let mut padded = ArrayD::<f32>::zeros(shape);
        padded
            .slice_axis_mut(Axis(2), ndarray::Slice::from(len - own..))
            .assign(&array);
        padded
    };
    let ((mine, dtype), (theirs, _)) = (to_f32(a, "KV cache")?, to_f32(b, "KV cache")?);
    let stacked = ndarray::concatenate(Axis(0), &[pad(mine).view(), pad(theirs).view()])
        .map_err(|e| ModelError::Shape(format!("KV caches do not stack: {e}")))?;
    Ok(value_in(stacked, dtype, "KV cache")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ort::value::Tensor;

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
        kv.retain_rows(&[2, 0], 0).unwrap();
        assert_eq!(kv.batch(), 2);
        let keys = keys(&kv);
        assert_eq!(keys[[0, 0, 1, 0]], 201.0);
        assert_eq!(keys[[1, 0, 0, 1]], 0.0);
        assert!(kv.retain_rows(&[5], 0).is_err());
        assert!(kv.retain_rows(&[0], 3).is_err());
    }

    #[test]
    fn dropped_front_positions_shorten_every_kept_row() {
        let mut kv = cache(3, 4, 0);
        kv.retain_rows(&[1], 3).unwrap();
        assert_eq!((kv.batch(), kv.len()), (1, 1));
        assert_eq!(keys(&kv).shape(), &[1, 1, 1, 2]);
        assert_eq!(keys(&kv)[[0, 0, 0, 0]], 103.0);
    }

    #[test]
    fn appended_rows_are_left_padded_to_one_length() {
        let mut kv = cache(1, 3, 0);
        let pads = kv.append_rows(&cache(2, 1, 1)).unwrap();
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

    #[test]
    fn a_failed_append_leaves_the_cache_as_it_was() {
        let mut kv = cache(1, 3, 0);
        // Keys stack, values do not (a head_dim of 3 against 2): the merge fails at the values,
        // after the keys were already stacked, and must not keep them.
        let mut other = cache(1, 2, 1);
        other.values = vec![
            Tensor::from_array(ndarray::Array4::<f32>::zeros((1, 1, 2, 3)))
                .unwrap()
                .into_dyn(),
        ];
        assert!(kv.append_rows(&other).is_err());
        assert_eq!((kv.batch(), kv.len()), (1, 3));
        assert_eq!(keys(&kv).shape(), &[1, 1, 3, 2]);
        assert_eq!(keys(&kv)[[0, 0, 2, 0]], 2.0);
    }
}
